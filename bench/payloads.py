"""What the benchmark sends and what its upstream answers, as files on disk.

This module owns the bytes of every workload: the request bodies (a small
request and a 190 KB mid-session coding-agent request, each as a JSON call and
as a streamed one), the headers Claude Code sends, and the upstream's answers
in Anthropic's exact wire format (a Message JSON body, and a 50-event SSE
stream framed as the API frames it: ``event: NAME\\ndata: JSON\\n\\n``). Every
byte is deterministic, so two runs send and receive the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.shapes import messages_request

#: Route names the gateway is seeded with; the upstream path prefix of each key.
ROUTE_JSON = "bench-json"
ROUTE_SSE = "bench-sse"
ROUTE_DRIP = "bench-drip"
UPSTREAM_MODEL = "claude-sonnet-4-5-20250929"

#: Sizes the issue asks for.
SMALL_BODY_BYTES = 200
LARGE_BODY_BYTES = 190 * 1024
SSE_EVENTS = 50

#: Headers real Claude Code 2.1.197 sends on ``POST /v1/messages?beta=true`` (less the
#: token, which the load generator adds, and ``Accept-Encoding``/``Connection``, which
#: are the load generator's business).
CLAUDE_CODE_HEADERS: dict[str, str] = {
    "Accept": "application/json",
    "Content-Type": "application/json",
    "User-Agent": "claude-cli/2.1.197 (external, sdk-cli)",
    "X-Claude-Code-Session-Id": "8f91d5c2-ae4e-411a-b178-477b32eaa22e",
    "X-Stainless-Arch": "x64",
    "X-Stainless-Lang": "js",
    "X-Stainless-Os": "Linux",
    "X-Stainless-Package-Version": "0.94.0",
    "X-Stainless-Retry-Count": "0",
    "X-Stainless-Runtime": "node",
    "X-Stainless-Runtime-Version": "v26.3.0",
    "X-Stainless-Timeout": "600",
    "Anthropic-Beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
    "context-management-2025-06-27,effort-2025-11-24",
    "Anthropic-Dangerous-Direct-Browser-Access": "true",
    "Anthropic-Version": "2023-06-01",
    "X-App": "cli",
}

#: Response headers the Anthropic API sends with every answer (values as the fake
#: provider of the tests uses them), so that header handling costs what it costs.
ANTHROPIC_RESPONSE_HEADERS: dict[str, str] = {
    "request-id": "req_011CbenchBenchBenchBench",
    "anthropic-organization-id": "8f2d1c3e-5b4a-4f6e-9d7c-0a1b2c3d4e5f",
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2023-11-14T22:14:20Z",
    "anthropic-ratelimit-tokens-limit": "480000",
    "anthropic-ratelimit-tokens-remaining": "480000",
    "anthropic-ratelimit-tokens-reset": "2023-11-14T22:14:20Z",
    "anthropic-ratelimit-input-tokens-limit": "400000",
    "anthropic-ratelimit-input-tokens-remaining": "400000",
    "anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:14:20Z",
    "anthropic-ratelimit-output-tokens-limit": "80000",
    "anthropic-ratelimit-output-tokens-remaining": "80000",
    "anthropic-ratelimit-output-tokens-reset": "2023-11-14T22:14:20Z",
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
    "via": "1.1 google",
    "cf-cache-status": "DYNAMIC",
    "x-robots-tag": "none",
}

_MESSAGE_ID = "msg_01BenchBenchBenchBenchBe"
_USAGE_START = {
    "input_tokens": 48211,
    "cache_creation_input_tokens": 1024,
    "cache_read_input_tokens": 45000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1024, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 1,
    "service_tier": "standard",
}


def compact(obj: Any) -> bytes:
    """JSON as the APIs frame it: compact, UTF-8, no ASCII escaping."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse_event(name: str, obj: Any) -> bytes:
    """One event exactly as the Anthropic API frames it."""
    return b"event: " + name.encode() + b"\ndata: " + compact(obj) + b"\n\n"


_ANSWER = (
    "I'll update the retry loop so that it backs off exponentially and stops after "
    "the configured number of attempts, then add a test for the give-up path."
)


def answer_words(count: int) -> list[str]:
    words = _ANSWER.split(" ")
    return [words[i % len(words)] + " " for i in range(count)]


def anthropic_stream(events: int = SSE_EVENTS) -> bytes:
    """A text answer of exactly ``events`` events: start, block, ping, deltas, stops."""
    deltas = events - 6
    if deltas < 1:
        raise ValueError("a stream needs at least 7 events")
    words = answer_words(deltas)
    start = {
        "type": "message_start",
        "message": {
            "id": _MESSAGE_ID,
            "type": "message",
            "role": "assistant",
            "model": UPSTREAM_MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _USAGE_START,
        },
    }
    out = [
        sse_event("message_start", start),
        sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    for word in words:
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": word},
        }
        out.append(sse_event("content_block_delta", delta))
    out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": 48211,
            "cache_creation_input_tokens": 1024,
            "cache_read_input_tokens": 45000,
            "output_tokens": deltas,
        },
    }
    out.append(sse_event("message_delta", message_delta))
    out.append(sse_event("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def anthropic_message(words: int = 44) -> bytes:
    """The non-streamed Message the same answer would be."""
    return compact(
        {
            "id": _MESSAGE_ID,
            "type": "message",
            "role": "assistant",
            "model": UPSTREAM_MODEL,
            "content": [{"type": "text", "text": "".join(answer_words(words))}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {**_USAGE_START, "output_tokens": words},
        }
    )


#: Stands in the last user message of every body; the load generators write a sequence
#: number of the same width there, so no two requests of a run are the same bytes (a real
#: session's requests never are: caches of whole bodies must not flatter the figures).
SEQUENCE_MARK = b"@@@@@@@@@@"


def small_request(route: str, stream: bool, size: int = SMALL_BODY_BYTES) -> bytes:
    """A short one-turn request, padded to ``size`` bytes."""
    doc = messages_request(route, 1024, "", stream=stream)
    base = len(compact(doc))
    mark = SEQUENCE_MARK.decode()
    text = (f"Request {mark}. " + "Write a haiku about retries. " * 20)[: max(1, size - base)]
    doc["messages"][0]["content"] = text
    return compact(doc)


#: The source file every tool result of the large requests reads.
SAMPLE_CODE = '''def fetch_with_retry(client, url, attempts=5, base_delay=0.2):
    """GET url, retrying transient failures with exponential backoff."""
    for attempt in range(attempts):
        try:
            response = client.get(url, timeout=10)
        except (ConnectionError, TimeoutError) as exc:
            last = exc
        else:
            if response.status_code < 500:
                return response
            last = RuntimeError(f"server error {response.status_code}")
        time.sleep(base_delay * 2 ** attempt)
    raise last
'''


def coding_tools() -> list[tuple[str, str, dict[str, Any]]]:
    """The large requests' tool definitions: (name, description, JSON schema of the input)."""
    schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Path relative to the repo root"},
            "content": {"type": "string"},
            "limit": {"type": "integer", "minimum": 1},
        },
        "required": ["path"],
    }
    return [
        (name, f"{name.replace('_', ' ').capitalize()} in the working tree. " * 4, schema)
        for name in ("read_file", "write_file", "edit_file", "list_dir", "run_tests", "grep")
    ]


def large_request(route: str, stream: bool, size: int = LARGE_BODY_BYTES) -> bytes:
    """A mid-session coding-agent request of ``size`` bytes (within a few bytes).

    Like Claude Code's: a system prompt, tool definitions, and a history of
    assistant tool calls and tool results full of source code.
    """
    tools = [
        {"name": name, "description": description, "input_schema": schema}
        for name, description, schema in coding_tools()
    ]
    doc: dict[str, Any] = {
        "model": route,
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "You are a coding agent working in a git repository. " * 30}
        ],
        "tools": tools,
        "metadata": {"user_id": "user_bench_0001"},
        "thinking": {"type": "enabled", "budget_tokens": 8000},
        "messages": [],
    }
    if stream:
        doc["stream"] = True

    def turn(n: int) -> list[dict[str, Any]]:
        tool_id = f"toolu_01Bench{n:014d}"
        call = {
            "type": "tool_use",
            "id": tool_id,
            "name": "read_file",
            "input": {"path": f"src/module_{n}.py", "limit": 400},
        }
        result = {"type": "tool_result", "tool_use_id": tool_id, "content": SAMPLE_CODE * 3}
        return [
            {"role": "assistant", "content": [{"type": "text", "text": read_note(n)}, call]},
            {"role": "user", "content": [result]},
        ]

    return fill_session(doc, size, turn)


def read_note(turn: int) -> str:
    """What the assistant says before its ``turn``-th tool call."""
    return f"Let me look at src/module_{turn}.py."


def fill_session(
    doc: dict[str, Any], size: int, turn: Callable[[int], list[dict[str, Any]]]
) -> bytes:
    """``doc`` with turns (tool call, tool result) added to its ``messages`` up to ``size``
    bytes, then a last user message padded to the exact size (within a few bytes)."""
    messages: list[dict[str, Any]] = doc["messages"]
    n = 0
    while len(compact(doc)) < size - 4000:
        messages += turn(n)
        n += 1
    messages.append({"role": "user", "content": ""})
    missing = size - len(compact(doc))
    pad = f"Request {SEQUENCE_MARK.decode()}. " + "Now fix the failing test. " * (missing // 26 + 1)
    messages[-1]["content"] = pad[: max(1, missing)]
    return compact(doc)


@dataclass(frozen=True)
class BodyFiles:
    """Paths of the request bodies, by workload name."""

    small_json: Path
    small_sse: Path
    large_json: Path
    large_sse: Path


def write_upstream_files(root: Path) -> None:
    """``root/json/v1/messages`` and ``root/sse/v1/messages``: the upstream's answers."""
    for prefix, payload in (("json", anthropic_message()), ("sse", anthropic_stream())):
        path = root / prefix / "v1" / "messages"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)


def write_bodies(root: Path) -> BodyFiles:
    root.mkdir(parents=True, exist_ok=True)
    files = BodyFiles(
        small_json=root / "small-json.body",
        small_sse=root / "small-sse.body",
        large_json=root / "large-json.body",
        large_sse=root / "large-sse.body",
    )
    files.small_json.write_bytes(small_request(ROUTE_JSON, stream=False))
    files.small_sse.write_bytes(small_request(ROUTE_SSE, stream=True))
    files.large_json.write_bytes(large_request(ROUTE_JSON, stream=False))
    files.large_sse.write_bytes(large_request(ROUTE_SSE, stream=True))
    return files
