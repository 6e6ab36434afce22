"""Tests of tvgate.traces.content and .split: byte-exact round trips, where bodies are cut, dedup, the tree."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import time
from typing import Any
from unittest import mock

import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.shapes import chat_tool_call, tool_use
from tvgate.traces import content, split
from tvgate.traces.content import ROOT_FANOUT, blob_digest, load_request, store_request
from tvgate.traces.split import BIG_STRING, split_offsets
from tvgate.traces.store import insert_chunks

ROW_OVERHEAD = 40  # bytes a stored blob costs besides its data and digest


class MemorySink:
    """A sink that keeps blobs in a dict and records what it was asked."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.puts: list[bytes] = []
        self.has_calls = 0
        self._zstd = zstandard.ZstdCompressor(level=3)

    def has(self, digest: bytes) -> bool:
        self.has_calls += 1
        return digest in self.blobs

    def put(self, digest: bytes, data: bytes) -> None:
        assert isinstance(data, bytes)
        assert digest not in self.blobs, "a blob the sink has was put again"
        assert blob_digest(data) == digest
        self.blobs[digest] = data
        self.puts.append(digest)

    def get(self, digest: bytes) -> bytes:
        return self.blobs[digest]

    def stored_bytes(self) -> int:
        return sum(
            len(self._zstd.compress(data)) + len(digest) + ROW_OVERHEAD
            for digest, data in self.blobs.items()
        )


def roundtrip(raw: bytes, sink: MemorySink | None = None) -> bytes:
    sink = sink if sink is not None else MemorySink()
    root = store_request(raw, sink)
    assert len(root) == content.DIGEST_SIZE
    return load_request(root, sink)


def parts(raw: bytes) -> list[bytes]:
    offsets = split_offsets(raw)
    return [raw[a:b] for a, b in itertools.pairwise(offsets)]


# --- realistic requests -----------------------------------------------------------

PNG = base64.b64encode(hashlib.sha256(b"image").digest() * 200).decode()
SOURCE = "\n".join(
    f'    def method_{i}(self, path: str = "C:\\\\tmp\\\\x") -> dict:  # caf\u00e9 \u2603 {{}}[]'
    for i in range(60)
)


def anthropic_request() -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "messages": [
            {"role": "user", "content": "Fix the failing test in tests/test_x.py \U0001f600"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Let me read it.", "signature": "c2ln"},
                    {"type": "text", "text": 'I\'ll read "tests/test_x.py" first.'},
                    tool_use(
                        "toolu_01",
                        "Read",
                        {"file_path": "tests/test_x.py", "limit": [1, {"deep": [[]]}]},
                    ),
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01",
                        "content": [{"type": "text", "text": SOURCE}],
                    },
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": 'Quote " backslash \\ tab \t nul \u0000'}],
            },
        ],
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Env: linux\n" * 50},
        ],
        "tools": [
            {
                "name": "Read",
                "description": "Reads a file.",
                "input_schema": {
                    "type": "object",
                    "properties": {"file_path": {"type": "string"}},
                    "required": ["file_path"],
                },
            }
        ],
        "metadata": {"user_id": "u_1"},
        "max_tokens": 32000,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "stream": True,
    }


def openai_chat_request() -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful coding agent."},
            {"role": "user", "content": "List the files, then read main.py"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [chat_tool_call("call_1", "read", '{"path": "main.py"}')],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": SOURCE},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "read",
                    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
                },
            }
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
    }


def responses_request(input_as_string: bool = False) -> dict[str, Any]:
    items: Any = (
        "just one prompt"
        if input_as_string
        else [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "reasoning", "encrypted_content": "gAAAA" + "x" * 2000, "summary": []},
            {
                "type": "function_call",
                "call_id": "call_9",
                "name": "shell",
                "arguments": '{"command":["cat","a.py"]}',
            },
            {"type": "function_call_output", "call_id": "call_9", "output": SOURCE},
        ]
    )
    return {
        "model": "gpt-5-codex",
        "instructions": "You are Codex, a coding agent." * 20,
        "input": items,
        "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "01a21b73",
    }


def dumpings(document: Any) -> dict[str, bytes]:
    return {
        "compact": orjson.dumps(document),
        "python-default": json.dumps(document).encode(),
        "pretty": json.dumps(document, indent=2, ensure_ascii=False).encode(),
        "tabs-crlf": json.dumps(document, indent="\t").replace("\n", "\r\n").encode(),
    }


REQUESTS = {
    f"{name}-{style}": raw
    for name, document in {
        "anthropic": anthropic_request(),
        "openai-chat": openai_chat_request(),
        "responses": responses_request(),
        "responses-string-input": responses_request(input_as_string=True),
    }.items()
    for style, raw in dumpings(document).items()
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_real_requests_round_trip(name: str) -> None:
    raw = REQUESTS[name]
    assert roundtrip(raw) == raw


def reference_cuts(raw: bytes) -> set[int]:
    """Where the splitter must cut a well-formed body, found with json's own scanner."""
    text = raw.decode("utf-8", "surrogatepass")
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def offset(i: int) -> int:
        return len(text[:i].encode("utf-8", "surrogatepass"))

    cuts: set[int] = set()
    i = skip(0)
    assert text[i] == "{"
    i = skip(i + 1)
    while text[i] != "}":
        key, i = decoder.raw_decode(text, i)
        i = skip(i)
        assert text[i] == ":"
        i = skip(i + 1)
        if key in ("messages", "input") and text[i] == "[":
            cuts.add(offset(i + 1))
            i = skip(i + 1)
            while text[i] != "]":
                _, i = decoder.raw_decode(text, i)
                cuts.add(offset(i))
                i = skip(i)
                if text[i] == ",":
                    i = skip(i + 1)
            i += 1
        else:
            _, end = decoder.raw_decode(text, i)
            if key in ("system", "tools", "instructions", "messages", "input"):
                cuts |= {offset(i), offset(end)}
            i = end
        i = skip(i)
        if text[i] == ",":
            i = skip(i + 1)
    return cuts


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_real_requests_are_cut_at_their_elements(name: str) -> None:
    raw = REQUESTS[name]
    offsets = split_offsets(raw)
    assert reference_cuts(raw) <= set(offsets)
    # Every big string in the conversation is a part of its own.
    pieces = parts(raw)
    for text in (SOURCE, PNG):
        for token in (orjson.dumps(text), json.dumps(text).encode()):
            if token in raw:
                assert token in pieces


def test_compact_anthropic_parts_exactly() -> None:
    raw = b'{"model":"m","messages":[{"a":1},{"b":[2,{"c":"]}\\""}]}],"system":"s","x":1}'
    assert parts(raw) == [
        b'{"model":"m","messages":[',
        b'{"a":1}',
        b',{"b":[2,{"c":"]}\\""}]}',
        b'],"system":',
        b'"s"',
        b',"x":1}',
    ]


def test_big_strings_are_their_own_parts() -> None:
    big = 'line "quoted" \\ back\n' * 100
    message = {"role": "user", "content": [{"type": "tool_result", "content": big}]}
    with_marker = {**message, "cache_control": {"type": "ephemeral"}}
    one = parts(orjson.dumps({"messages": [message]}))
    two = parts(orjson.dumps({"messages": [with_marker]}))
    assert orjson.dumps(big) in one
    assert orjson.dumps(big) in two  # the same blob although the element differs


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"{}",
        b"[]",
        b"null",
        b'"just a string"',
        b"\x00\xff\xfe binary \x80",
        bytes(range(256)) * 50,
        b"not json at all, {messages: [1, 2]}",
        b'{"messages":[{"a":1},{"b":2}',  # truncated
        b'{"messages":[{"a":"unterminated}]}',
        b'{"messages":[,,]}',
        b'{"messages":[1 2 3]}',
        b'{"messages":[{"a":1}}]}',  # bracket mismatch
        b'{"messages":"x","messages":[1,2],"tools":}',
        b'{"messages":[' + b"[" * 40 + b'"deep"' + b"]" * 40 + b',{"ok":1}]}',  # slow path
        b'{"messages":[' + b"[" * 40 + b'"deep"',  # deep and truncated
        b'{"messages":["\\\\","\\\\\\"","a\\\\\\\\\\"b"],"system":"\\\\"}',  # backslash runs
        b'{"input":"\\u00e9\\ud83d\\ude00","instructions":"\xc3\xa9"}',
        b'\xef\xbb\xbf{"messages":[1]}',  # a BOM
    ],
)
def test_odd_bodies_round_trip(raw: bytes) -> None:
    assert roundtrip(raw) == raw
    offsets = split_offsets(raw)
    assert offsets[0] == 0 and offsets[-1] == len(raw)
    assert all(a < b for a, b in itertools.pairwise(offsets))


def test_deep_elements_are_still_cut() -> None:
    deep = b"[" * 40 + b'"]deep["' + b"]" * 40
    raw = b'{"messages":[' + deep + b',{"ok":1}]}'
    assert deep in parts(raw)
    assert b',{"ok":1}' in parts(raw)


def test_malformed_tail_keeps_the_cuts_before_it() -> None:
    raw = b'{"messages":[{"a":1},{"b":2},{"c":'
    assert parts(raw)[:3] == [b'{"messages":[', b'{"a":1}', b',{"b":2}']


def test_huge_parts_are_capped() -> None:
    raw = b'{"messages":["' + b"x" * 5000 + b'"]}'
    with mock.patch.object(split, "MAX_PART", 1000):
        pieces = parts(raw)
        assert max(map(len, pieces)) <= 1000
        assert roundtrip(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages":[' + b"1," * 300_000 + b"1]}",  # a million-ish tiny elements
        b'{"messages":[' + b"[" * 200_000 + b"]" * 200_000 + b"]}",  # deep
        b'{"messages":[' + b'"\\"",' * 200_000 + b"1]}",  # strings to measure
        b"{" + b'"a":1,' * 200_000 + b'"z":1}',  # members
    ],
    ids=["elements", "nesting", "escaped-strings", "members"],
)
def test_hostile_shapes_cost_a_bounded_scan(raw: bytes) -> None:
    began = time.process_time()
    offsets = split_offsets(raw)
    assert time.process_time() - began < 5  # about 0.1 s; unbounded, tens of seconds
    assert len(offsets) <= split.SCAN_BUDGET + 3
    assert roundtrip(raw) == raw


def test_empty_body_is_a_root_with_no_parts() -> None:
    sink = MemorySink()
    root = store_request(b"", sink)
    assert load_request(root, sink) == b""
    assert len(sink.blobs) == 1


def test_blob_digest_is_truncated_sha256() -> None:
    assert blob_digest(b"abc") == hashlib.sha256(b"abc").digest()[:16]
    assert blob_digest(memoryview(b"xabc")[1:]) == blob_digest(b"abc")


def test_load_rejects_foreign_and_corrupt_blobs() -> None:
    sink = MemorySink()
    root = store_request(orjson.dumps(anthropic_request()), sink)
    data_blob = next(d for d, blob in sink.blobs.items() if not blob.startswith(b"TVN"))
    with pytest.raises(ValueError, match="not a request tree node"):
        load_request(data_blob, sink)
    sink.blobs[data_blob] = sink.blobs[data_blob] + b"tampered"
    with pytest.raises(ValueError, match="does not match its digest"):
        load_request(root, sink)
    with pytest.raises(KeyError):
        load_request(b"\x00" * 16, sink)


# --- property tests -----------------------------------------------------------------

TRICKY = st.text(
    alphabet=st.sampled_from(list('ab "\\\n\t{}[],:/\u00e9\u20ac\U0001f600\x00\x1f')), max_size=40
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TRICKY
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TRICKY, children, max_size=5),
    max_leaves=25,
)
BODIES = st.fixed_dictionaries(
    {"model": st.text(max_size=5), "messages": st.lists(JSON_VALUES, max_size=8)},
    optional={
        "system": JSON_VALUES,
        "tools": JSON_VALUES,
        "input": JSON_VALUES,
        "instructions": JSON_VALUES,
        "other": JSON_VALUES,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=BODIES,
    indent=st.sampled_from([None, 0, 1, 2, "\t", " \r\n"]),
    separators=st.sampled_from([None, (",", ":"), (" , ", " : "), (",\n", ":\t")]),
    ensure_ascii=st.booleans(),
    big=st.integers(min_value=16, max_value=BIG_STRING),
)
def test_any_json_round_trips(
    body: dict[str, Any],
    indent: Any,
    separators: Any,
    ensure_ascii: bool,
    big: int,
) -> None:
    raw = json.dumps(body, indent=indent, separators=separators, ensure_ascii=ensure_ascii)
    data = raw.encode("utf-8", "surrogatepass")
    # A low threshold cuts out the small strings too, exercising that path.
    with mock.patch.object(split, "BIG_STRING", big):
        assert roundtrip(data) == data
        pieces = parts(data)
        assert reference_cuts(data) <= set(split_offsets(data))
    assert b"".join(pieces) == data


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000))
def test_any_bytes_round_trip(data: bytes) -> None:
    assert roundtrip(data) == data


@settings(max_examples=200, deadline=None)
@given(body=BODIES, cut=st.integers(min_value=0, max_value=10_000), junk=st.binary(max_size=8))
def test_truncated_or_damaged_json_round_trips(body: dict[str, Any], cut: int, junk: bytes) -> None:
    raw = json.dumps(body).encode()
    cut %= len(raw) + 1
    for data in (raw[:cut], raw[:cut] + junk + raw[cut:], raw[:cut] + raw[cut + 1 :]):
        assert roundtrip(data) == data


# --- dedup and the tree --------------------------------------------------------------


def conversation_requests(turns: int, seed: int = 5) -> list[bytes]:
    """A session where every request resends the conversation so far, as Claude Code does
    (its `cache_control` marker sits on the newest message and moves each turn)."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "path", "config", "if", "else", "for", "data"]
    messages: list[dict[str, Any]] = []
    requests = []
    for turn in range(turns):
        source = "\n".join(
            "    " * rng.randint(0, 3) + " ".join(rng.choices(words, k=rng.randint(3, 10)))
            for _ in range(rng.randint(20, 200))
        )
        messages += [
            {"role": "user", "content": [{"type": "text", "text": f"step {turn}: go on"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Reading file {turn}."},
                    {"type": "tool_use", "id": f"toolu_{turn}", "name": "Read", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": f"toolu_{turn}", "content": source}
                ],
            },
        ]
        sent = [dict(m) for m in messages]
        last = dict(sent[-1]["content"][-1], cache_control={"type": "ephemeral"})
        sent[-1] = {**sent[-1], "content": [*sent[-1]["content"][:-1], last]}
        requests.append(
            orjson.dumps(
                {
                    "model": "claude-sonnet-4-6",
                    "messages": sent,
                    "system": [{"type": "text", "text": "You are an agent. " * 300}],
                    "tools": [
                        {"name": f"tool{i}", "input_schema": {"type": "object"}} for i in range(20)
                    ],
                    "max_tokens": 32000,
                    "stream": True,
                }
            )
        )
    return requests


def test_a_growing_conversation_grows_storage_linearly() -> None:
    requests = conversation_requests(20)
    sink = MemorySink()
    for raw in requests:
        assert load_request(store_request(raw, sink), sink) == raw
    final_compressed = len(zstandard.ZstdCompressor(level=3).compress(requests[-1]))
    whole = sum(len(zstandard.ZstdCompressor(level=3).compress(r)) for r in requests)
    stored = sink.stored_bytes()
    assert stored < 2 * final_compressed + 20 * 1024
    assert stored * 5 < whole


def test_identical_messages_are_stored_once() -> None:
    requests = conversation_requests(20)
    sink = MemorySink()
    for raw in requests:
        store_request(raw, sink)
    assert len(sink.puts) == len(set(sink.puts))  # MemorySink.put also asserts this
    stored = set(sink.blobs.values())
    first = orjson.loads(requests[0])
    # The first user message and the system prompt, as they appear in every request.
    assert orjson.dumps(first["messages"][0]) in stored
    assert orjson.dumps(first["system"]) in stored
    # Each tool result's text is stored once, although the element around it changed
    # when the cache_control marker moved on.
    results = [m["content"][0]["content"] for m in orjson.loads(requests[-1])["messages"][2::3]]
    assert all(orjson.dumps(text) in stored for text in results)


def test_storing_the_same_request_twice_writes_nothing() -> None:
    raw = conversation_requests(3)[-1]
    sink = MemorySink()
    root = store_request(raw, sink)
    puts, calls = len(sink.puts), sink.has_calls
    assert store_request(raw, sink) == root
    assert len(sink.puts) == puts
    assert sink.has_calls == calls + 1  # the root only


def test_tree_references_grow_logarithmically() -> None:
    """A new turn of a long session writes a few nodes and asks about few blobs."""
    requests = conversation_requests(120, seed=9)
    sink = MemorySink()
    for raw in requests[:-1]:
        store_request(raw, sink)
    node_digests = {d for d, blob in sink.blobs.items() if blob.startswith(b"TVN")}
    puts_before, calls_before = len(sink.puts), sink.has_calls
    root = store_request(requests[-1], sink)
    new = sink.puts[puts_before:]
    new_nodes = [d for d in new if sink.blobs[d].startswith(b"TVN")]
    level = sink.blobs[root][4]
    part_count = len(split_offsets(requests[-1])) - 1
    assert part_count > 500 and level >= 2
    assert len(sink.blobs[root]) <= 5 + ROOT_FANOUT * 16
    assert len(new_nodes) <= 2 * level + 2  # the changed tail of each level, and the root
    assert sum(len(sink.blobs[d]) for d in new_nodes) < 5000
    assert sink.has_calls - calls_before < 120  # not one per part
    assert len(node_digests) > 0
    assert load_request(root, sink) == requests[-1]


def test_children_are_written_before_their_parents() -> None:
    sink = MemorySink()
    for raw in conversation_requests(40):
        store_request(raw, sink)
    position = {digest: index for index, digest in enumerate(sink.puts)}
    for digest, blob in sink.blobs.items():
        if blob.startswith(b"TVN"):
            size = blob[3]
            for offset in range(5, len(blob), size):
                assert position[blob[offset : offset + size]] < position[digest]


def reference_chunk(digests: list[bytes]) -> list[list[bytes]]:
    """The node grouping of the module doc, entry by entry."""
    chunks: list[list[bytes]] = []
    start = previous = 0
    for index, digest in enumerate(digests):
        size = index + 1 - start
        cut = (digest[0] ^ previous) & content._CUT_MASK == 0
        if size >= content.MAX_FANOUT or (size >= content.MIN_FANOUT and cut):
            chunks.append(digests[start : index + 1])
            start = index + 1
        previous = digest[1]
    if start < len(digests):
        chunks.append(digests[start:])
    return chunks


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=400),
    seed=st.integers(min_value=0, max_value=2**32),
    mode=st.sampled_from(["random", "never", "always", "mixed"]),
)
def test_nodes_end_where_the_entry_by_entry_rule_ends_them(
    count: int, seed: int, mode: str
) -> None:
    rng = random.Random(seed)
    digests: list[bytes] = []
    for _ in range(count):
        digest = bytearray(rng.randbytes(16))
        if digests and mode != "random":
            # Steer the cut test: never passing (runs of MAX_FANOUT), always, or either.
            passes = mode == "always" or (mode == "mixed" and rng.random() < 0.3)
            low = digests[-1][1] & 0x0F
            digest[0] = (digest[0] & 0xF0) | (low if passes else low ^ 1)
        digests.append(bytes(digest))
    assert content._chunk(digests) == reference_chunk(digests)


def test_insert_chunks_cover_the_rows_in_few_sizes() -> None:
    """Every row once, in order, in chunks of the largest size or a power of two below it:
    the statements a writer builds stay at log2(largest) + 1 sizes whatever its batches."""
    sizes: set[int] = set()
    for count in range(300):
        chunks = insert_chunks(count, 64)
        assert [row for start, end in chunks for row in range(start, end)] == list(range(count))
        sizes.update(end - start for start, end in chunks)
    assert sizes == {1, 2, 4, 8, 16, 32, 64}
