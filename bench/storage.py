"""Storage benchmark: a 100-turn coding session stored whole against content-addressed.

Run ``python -m bench.storage``. It replays a synthetic but realistic Claude Code
session in the Anthropic Messages format (deterministic: seeded RNG): a system
prompt of about 10 KB in two blocks, about 15 KB of tool JSON schemas, and per turn
a user message, an assistant message with text and a ``tool_use``, and a
``tool_result`` holding 1-20 KB of a Python-like file printed with line numbers, as
Claude Code's Read tool does. Every file is new (no re-reads, which would only
help the content-addressed store). Like Claude Code, each request resends the whole
conversation and carries a ``cache_control`` marker on the last block of the
newest message, which moves on at the next turn.

It reports the size of the final request, the bytes needed to store every request
whole (raw and zstd level 3), and the bytes needed by :mod:`tvgate.traces.content`
with a sink that compresses each blob with zstd level 3 and charges each blob its
digest plus a row overhead of :data:`ROW_OVERHEAD` bytes (a B-tree entry and row
header of a blobs table). The root node of each request is one of those blobs.
Also timed: splitting and redacting a body of about 190 KB (a mid-session request).

The table is printed and written to ``bench/storage-results.md``.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import orjson
import zstandard

from tvgate.traces.content import blob_digest, load_request, store_request
from tvgate.traces.redact import Redactor
from tvgate.traces.split import split_offsets

TURNS = 100
SEED = 20240611
#: Bytes a stored blob costs besides its compressed data and its digest.
ROW_OVERHEAD = 40
RESULTS = Path(__file__).with_name("storage-results.md")

_WORDS = [
    *[
        "request",
        "response",
        "session",
        "token",
        "config",
        "value",
        "result",
        "error",
        "handler",
        "client",
        "server",
    ],
    *[
        "buffer",
        "stream",
        "record",
        "trace",
        "route",
        "policy",
        "key",
        "cache",
        "entry",
        "index",
        "offset",
        "length",
        "limit",
    ],
    *[
        "timeout",
        "retry",
        "status",
        "header",
        "body",
        "field",
        "item",
        "batch",
        "queue",
        "worker",
        "writer",
        "reader",
        "path",
    ],
    *[
        "name",
        "user",
        "org",
        "model",
        "provider",
        "upstream",
        "chunk",
        "event",
        "message",
        "content",
        "block",
        "usage",
    ],
]
_TYPES = ("str", "int", "bytes", "float", "bool", "dict[str, Any]", "list[str]", "None")
_PROSE = [
    "You are an interactive CLI tool that helps users with software engineering tasks",
    "Use the instructions below and the tools available to you to assist the user",
    "Never introduce code that exposes or logs secrets and keys",
    "When you make changes to files, first understand the file's code conventions",
    "Prefer editing existing files to creating new ones",
    "Run the tests after a change and fix what fails before you report back",
    "Keep your answers short: fewer than four lines unless the user asks for detail",
    "Do not add comments that restate the code; explain why, not what",
]


class CountingSink:
    """Blobs in memory; each is charged zstd(data) + digest + ROW_OVERHEAD."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.compressed: dict[bytes, int] = {}
        self._zstd = zstandard.ZstdCompressor(level=3)

    def has(self, digest: bytes) -> bool:
        return digest in self.blobs

    def put(self, digest: bytes, data: bytes) -> None:
        self.blobs[digest] = data
        self.compressed[digest] = len(self._zstd.compress(data))

    def get(self, digest: bytes) -> bytes:
        return self.blobs[digest]

    def charged(self, digests: list[bytes]) -> int:
        return sum(self.compressed[d] + len(d) + ROW_OVERHEAD for d in digests)


def _identifier(rng: random.Random) -> str:
    return "_".join(rng.sample(_WORDS, rng.randint(1, 3)))


def _statement(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return f"{_identifier(rng)} = self.{_identifier(rng)}({_identifier(rng)})"
    if kind < 0.5:
        return f'log.info("{" ".join(rng.sample(_WORDS, 4))} %s", {_identifier(rng)})'
    if kind < 0.6:
        return f"# {' '.join(rng.sample(_WORDS, 7))}"
    if kind < 0.7:
        return f'raise ValueError(f"bad {_identifier(rng)}: {{{_identifier(rng)}!r}}")'
    if kind < 0.8:
        return f"return {_identifier(rng)}"
    return f"self.{_identifier(rng)}.append({_identifier(rng)}[{rng.randint(0, 9)}])"


def _source_file(rng: random.Random, size: int) -> str:
    """Python-like source, numbered like Claude Code's Read prints it, of about ``size`` bytes."""
    lines: list[str] = [
        '"""' + " ".join(rng.sample(_WORDS, 8)).capitalize() + '."""',
        "",
        "from __future__ import annotations",
        "",
        f"import {rng.choice(_WORDS)}",
        f"from .{_identifier(rng)} import {_identifier(rng).title().replace('_', '')}",
    ]
    numbered = sum(len(line) + 8 for line in lines)  # "{:6}\t" before, "\n" after
    while numbered < size:
        if len(lines) == 6 or rng.random() < 0.15:  # a class first, then mostly methods
            name = _identifier(rng).title().replace("_", "")
            block = ["", "", f"class {name}:", f'    """{" ".join(rng.sample(_WORDS, 6))}."""']
        else:
            args = "".join(
                f", {_identifier(rng)}: {rng.choice(_TYPES)}" for _ in range(rng.randint(0, 3))
            )
            block = ["", f"    def {_identifier(rng)}(self{args}) -> {rng.choice(_TYPES)}:"]
            depth = 2
            for _ in range(rng.randint(2, 9)):
                if rng.random() < 0.2:
                    block.append("    " * depth + f"if {_identifier(rng)} is None:")
                    depth = min(depth + 1, 4)
                block.append("    " * depth + _statement(rng))
                if rng.random() < 0.3:
                    depth = 2
        lines += block
        numbered += sum(len(line) + 8 for line in block)
    return "\n".join(f"{number:6}\t{line}" for number, line in enumerate(lines, 1))


def _system(rng: random.Random) -> list[dict[str, Any]]:
    text = ""
    while len(text) < 9500:
        text += rng.choice(_PROSE).strip() + ". "
        if rng.random() < 0.1:
            text += "\n\n# " + " ".join(rng.sample(_WORDS, 3)).title() + "\n"
    return [
        {
            "type": "text",
            "text": "You are Claude Code, Anthropic's official CLI for Claude.",
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}},
    ]


def _tools(rng: random.Random) -> list[dict[str, Any]]:
    tools = []
    for name in (
        "Bash",
        "Read",
        "Edit",
        "Write",
        "Glob",
        "Grep",
        "Task",
        "WebFetch",
        "TodoWrite",
        "NotebookEdit",
        "WebSearch",
        "ExitPlanMode",
    ):
        properties = {
            _identifier(rng): {
                "type": rng.choice(["string", "integer", "boolean", "array"]),
                "description": " ".join(rng.choice(_PROSE).split()[:14]),
            }
            for _ in range(rng.randint(3, 7))
        }
        tools.append(
            {
                "name": name,
                "description": ". ".join(rng.choice(_PROSE) for _ in range(6)) + ".",
                "input_schema": {
                    "type": "object",
                    "properties": properties,
                    "required": list(properties)[:2],
                    "additionalProperties": False,
                    "$schema": "http://json-schema.org/draft-07/schema#",
                },
            }
        )
    return tools


def session_requests(turns: int = TURNS, seed: int = SEED) -> list[bytes]:
    """The request bodies of one session, in order."""
    rng = random.Random(seed)
    system, tools = _system(rng), _tools(rng)
    messages: list[dict[str, Any]] = []
    bodies: list[bytes] = []
    for _ in range(turns):
        path = f"src/{_identifier(rng)}/{_identifier(rng)}.py"
        tool_id = f"toolu_01{rng.getrandbits(80):020x}"
        messages += [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": f"Now look at {path} and {rng.choice(_PROSE).lower()}.",
                    }
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "text",
                        "text": f"I'll read `{path}` to see how {rng.choice(_WORDS)} is handled.",
                    },
                    {
                        "type": "tool_use",
                        "id": tool_id,
                        "name": "Read",
                        "input": {"file_path": f"/home/dev/repo/{path}"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": tool_id,
                        "content": _source_file(rng, rng.randint(1024, 19 * 1024)),
                    }
                ],
            },
        ]
        sent = [
            *messages[:-1],
            {
                **messages[-1],
                "content": [
                    {**messages[-1]["content"][-1], "cache_control": {"type": "ephemeral"}}
                ],
            },
        ]
        bodies.append(
            orjson.dumps(
                {
                    "model": "claude-sonnet-4-6",
                    "messages": sent,
                    "system": system,
                    "tools": tools,
                    "metadata": {"user_id": "user_4f2a_account_9d1c_session_8f91d5c2"},
                    "max_tokens": 32000,
                    "thinking": {"type": "enabled", "budget_tokens": 31999},
                    "stream": True,
                }
            )
        )
    return bodies


def _best_us(function: Any, repeat: int = 30) -> float:
    """Best CPU time of ``repeat`` runs: on a shared machine, wall time also counts
    the time other processes held the CPU."""
    best = float("inf")
    for _ in range(repeat):
        began = time.process_time()
        function()
        best = min(best, time.process_time() - began)
    return best * 1e6


def _kb(size: float) -> str:
    return f"{size / 1024:,.1f} KB" if size < 1024 * 1024 else f"{size / 1024 / 1024:,.2f} MB"


def run() -> str:
    began = time.perf_counter()
    bodies = session_requests()
    zstd = zstandard.ZstdCompressor(level=3)
    final = bodies[-1]
    final_zstd = len(zstd.compress(final))
    whole_raw = sum(len(body) for body in bodies)
    whole_zstd = sum(len(zstd.compress(body)) for body in bodies)
    whole_rows = whole_zstd + len(bodies) * ROW_OVERHEAD

    sink = CountingSink()
    store_times = []
    roots = []
    for body in bodies:
        start = time.perf_counter()
        roots.append(store_request(body, sink))
        store_times.append(time.perf_counter() - start)
    assert load_request(roots[-1], sink) == final
    nodes = [d for d, blob in sink.blobs.items() if blob.startswith(b"TVN")]
    data = [d for d in sink.blobs if d not in set(nodes)]
    stored = sink.charged(list(sink.blobs))
    overhead = len(sink.blobs) * (16 + ROW_OVERHEAD)

    # A mid-session body of about 190 KB, timed on its own.
    mid = min(bodies, key=lambda body: abs(len(body) - 190 * 1024))
    split_us = _best_us(lambda: split_offsets(mid))
    hash_us = _best_us(lambda: blob_digest(mid))
    warm = CountingSink()
    store_request(mid, warm)
    store_again_us = _best_us(lambda: store_request(mid, warm))
    redactor = Redactor(
        literals=["sk-ant-api03-" + "Xy7" * 30 + "AA"],
        patterns=[r"acme-[0-9]{8}", r"(?<![\w.%+-])[\w.%+-]+@acme\.example"],
    )
    builtin_redactor = Redactor()
    redact_us = _best_us(lambda: builtin_redactor.redact(mid))
    redact_custom_us = _best_us(lambda: redactor.redact(mid))
    parts = len(split_offsets(mid)) - 1
    elapsed = time.perf_counter() - began

    rows = [
        ("Requests in the session", f"{len(bodies)}"),
        ("Final request, raw", _kb(len(final))),
        ("Final request, zstd -3", _kb(final_zstd)),
        ("Every request stored whole, raw", _kb(whole_raw)),
        ("Every request stored whole, zstd -3 (+ 40 B/row)", _kb(whole_rows)),
        (
            "**Content-addressed, stored**",
            f"**{_kb(stored)}** = {stored / len(final):.2f}x the final request "
            f"({stored / final_zstd:.2f}x its zstd size)",
        ),
        (
            "- data blobs",
            f"{len(data)} blobs, {_kb(sum(sink.compressed[d] for d in data))} compressed "
            f"(from {_kb(sum(len(sink.blobs[d]) for d in data))} raw)",
        ),
        (
            "- tree nodes (roots included)",
            f"{len(nodes)} nodes, {_kb(sum(sink.compressed[d] for d in nodes))} compressed "
            f"(from {_kb(sum(len(sink.blobs[d]) for d in nodes))} raw)",
        ),
        ("- digests + row overhead (16 + 40 B/blob)", _kb(overhead)),
        ("Saving against whole + zstd", f"{whole_rows / stored:.0f}x"),
        (
            f"Split of a {_kb(len(mid))} body ({parts} parts)",
            f"{split_us:,.0f} µs (SHA-256 of it alone: {hash_us:,.0f} µs)",
        ),
        (
            "store_request of that body, all blobs known",
            f"{store_again_us:,.0f} µs",
        ),
        (
            "store_request over the session",
            f"median {statistics.median(store_times) * 1e3:.1f} ms, "
            f"max {max(store_times) * 1e3:.1f} ms (new blobs compressed by the sink)",
        ),
        ("Redaction of that body, built-in kinds", f"{redact_us:,.0f} µs"),
        ("Redaction, + 1 literal key + 2 admin patterns", f"{redact_custom_us:,.0f} µs"),
    ]
    table = "| Measure | Value |\n|---|---|\n" + "".join(
        f"| {name} | {value} |\n" for name, value in rows
    )
    goal = "met" if stored <= 2 * len(final) else "NOT met"
    return (
        "## Trace storage: a 100-turn coding session\n\n"
        "`python -m bench.storage`: a synthetic Claude Code session (seeded), every request\n"
        "resending the whole conversation; see the docstring of `bench/storage.py`.\n\n"
        + table
        + f"\nGoal, content-addressed storage at most 2x the final request: **{goal}**.\n"
        f"Timings are the best CPU time of 30 runs on the build machine; the whole run took {elapsed:.1f} s.\n"
    )


def main() -> None:
    report = run()
    print(report)
    RESULTS.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
