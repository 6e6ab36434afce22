"""Tests of tvgate.traces.sse: chunk boundaries anywhere, the WHATWG line rules, overflow."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvgate.traces.sse import FastEvents, SSEEvent, SSEParser

BOM = b"\xef\xbb\xbf"

# Each sample stream with the events it must give.
SAMPLES: dict[str, tuple[bytes, list[SSEEvent]]] = {
    "anthropic_lf": (
        b"event: message_start\n"
        b'data: {"type":"message_start"}\n'
        b"\n"
        b"event: ping\n"
        b'data: {"type": "ping"}\n'
        b"\n"
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","delta":{"text":"h\xc3\xa9"}}\n'
        b"\n",
        [
            SSEEvent("message_start", b'{"type":"message_start"}'),
            SSEEvent("ping", b'{"type": "ping"}'),
            SSEEvent(
                "content_block_delta",
                b'{"type":"content_block_delta","delta":{"text":"h\xc3\xa9"}}',
            ),
        ],
    ),
    "crlf_comments_multiline": (
        b": keep-alive comment\r\n"
        b"\r\n"
        b"id: 1\r\n"
        b"retry: 3000\r\n"
        b"event: update\r\n"
        b"data: first line\r\n"
        b"data:second line\r\n"
        b"data:  two spaces\r\n"
        b": comment inside an event\r\n"
        b"\r\n"
        b"event: no-data\r\n"
        b"\r\n"
        b"data: [DONE]\r\n"
        b"\r\n",
        [
            SSEEvent("update", b"first line\nsecond line\n two spaces"),
            SSEEvent(None, b"[DONE]"),
        ],
    ),
    # "\n" only: whole events are taken by the fast path, one match per usual event,
    # and the general rules from the first event of another shape on.
    "lf_mixed_shapes": (
        b"event: a\ndata: 1\n\ndata:2\n\nevent:\ndata: 3\n\n"
        b": comment\ndata: 4\n\ndata: 5\ndata: 6\n\nid: 7\ndata: 7\n\n"
        b"event: b\ndata:  8\n\n\ndata: 9\n\n",
        [
            SSEEvent("a", b"1"),
            SSEEvent(None, b"2"),
            SSEEvent(None, b"3"),
            SSEEvent(None, b"4"),
            SSEEvent(None, b"5\n6"),
            SSEEvent(None, b"7"),
            SSEEvent("b", b" 8"),
            SSEEvent(None, b"9"),
        ],
    ),
    "cr_only": (
        b"event: a\rdata: one\r\rdata: two\rdata\r\r:c\r\r",
        [SSEEvent("a", b"one"), SSEEvent(None, b"two\n")],
    ),
    "mixed_endings_bom": (
        BOM + b"data: x\r\n\n"
        b"data: y\r\rdata: z\n\r\n"
        b"unknown: field\nevent:\ndata\n\n"
        b"event: tail\ndata: cut",
        [
            SSEEvent(None, b"x"),
            SSEEvent(None, b"y"),
            SSEEvent(None, b"z"),
            SSEEvent(None, b""),
        ],
    ),
}


def feed_all(chunks: list[bytes], parser: SSEParser | None = None) -> list[SSEEvent]:
    parser = parser or SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events


def reference(stream: bytes) -> list[SSEEvent]:
    """The WHATWG algorithm written the slow, obvious way."""
    if stream.startswith(BOM):
        stream = stream[3:]
    events: list[SSEEvent] = []
    data: list[bytes] = []
    event: str | None = None
    for match in re.finditer(rb"([^\r\n]*)(?:\r\n|\r|\n)", stream):
        line = match.group(1)
        if not line:
            if data:
                events.append(SSEEvent(event or None, b"\n".join(data)))
            data, event = [], None
            continue
        if line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return events


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_single_feed(name: str) -> None:
    stream, expected = SAMPLES[name]
    assert feed_all([stream]) == expected
    assert reference(stream) == expected


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_every_split(name: str) -> None:
    stream, expected = SAMPLES[name]
    for i in range(len(stream) + 1):
        assert feed_all([stream[:i], stream[i:]]) == expected, i


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_every_three_way_split(name: str) -> None:
    stream, expected = SAMPLES[name]
    n = len(stream)
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1, 5):
            assert feed_all([stream[:i], stream[i:j], stream[j:]]) == expected, (i, j)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_one_byte_chunks(name: str) -> None:
    stream, expected = SAMPLES[name]
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == expected


def test_cr_at_chunk_end_then_lf() -> None:
    # "\r" ends one chunk, "\n" opens the next: one "\r\n", not a blank line.
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r") == [SSEEvent(None, b"a\nb")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == []
    parser.close()
    assert not parser.truncated


def test_empty_chunks_are_harmless() -> None:
    parser = SSEParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [SSEEvent(None, b"a")]


def test_truncated_only_for_a_partial_event() -> None:
    parser = SSEParser()
    parser.feed(b"data: whole\n\n")
    assert parser.close() == []
    assert not parser.truncated

    for tail in (b"data: par", b"data: line\n", b"event: x\n", b"data: x\r"):
        parser = SSEParser()
        assert parser.feed(b"data: whole\n\n" + tail) == [SSEEvent(None, b"whole")]
        assert parser.close() == []
        assert parser.truncated, tail


def test_no_data_lines_no_event() -> None:
    assert feed_all([b"event: ping\n\nid: 4\nretry: 10\n\n:\n\n"]) == []


def test_bom_only_at_stream_start() -> None:
    assert feed_all([BOM[:1], BOM[1:] + b"data: a\n\n"]) == [SSEEvent(None, b"a")]
    # Later, a BOM is part of the line: this one is an unknown field.
    assert feed_all([b"data: a\n\n" + BOM + b"data: b\n\n"]) == [SSEEvent(None, b"a")]


def test_invalid_utf8_event_name() -> None:
    assert feed_all([b"event: \xff\xfe\ndata: d\n\n"]) == [SSEEvent("\ufffd\ufffd", b"d")]


def test_overflow_drops_event_and_resyncs() -> None:
    big = b"x" * 500
    stream = b"data: small\n\nevent: big\ndata: " + big + b"\ndata: more\n\ndata: after\n\n"
    expected = [SSEEvent(None, b"small"), SSEEvent(None, b"after")]
    parser = SSEParser(max_event_bytes=100)
    assert feed_all([stream], parser) == expected
    assert parser.overflowed
    assert not parser.truncated
    for i in range(len(stream) + 1):
        parser = SSEParser(max_event_bytes=100)
        assert feed_all([stream[:i], stream[i:]], parser) == expected, i
        assert parser.overflowed
    parser = SSEParser(max_event_bytes=100)
    assert feed_all([stream[i : i + 1] for i in range(len(stream))], parser) == expected


def test_overflow_from_many_small_lines() -> None:
    stream = b"data: 0123456789\n" * 20 + b"\ndata: ok\n\n"
    parser = SSEParser(max_event_bytes=100)
    assert feed_all([stream], parser) == [SSEEvent(None, b"ok")]
    assert parser.overflowed


def test_overflow_keeps_memory_bounded() -> None:
    parser = SSEParser(max_event_bytes=4096)
    parser.feed(b"data: ")
    for _ in range(1000):
        assert parser.feed(b"y" * 1024) == []
        assert len(parser._partial) <= 4096
    assert parser.overflowed
    assert parser.feed(b"\n\ndata: ok\n\n") == [SSEEvent(None, b"ok")]


def test_event_at_the_limit_is_kept() -> None:
    line = b"data: " + b"z" * 94  # 100 bytes
    for chunks in ([line + b"\n\n"], [line[:50], line[50:], b"\n\n"]):
        parser = SSEParser(max_event_bytes=100)
        assert feed_all(chunks, parser) == [SSEEvent(None, b"z" * 94)]
        assert not parser.overflowed
        parser = SSEParser(max_event_bytes=99)
        assert feed_all(chunks, parser) == []
        assert parser.overflowed


TOKENS = [
    b"data",
    b"data: ",
    b"event",
    b"event: ",
    b"id: 1",
    b"retry: 5",
    b":",
    b" ",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"x",
    b"[DONE]",
    b"{}",
    BOM,
    b"\xff",
    b"\x00",
]
streams = st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in points:
        chunks.append(stream[prev:p])
        prev = p
    chunks.append(stream[prev:])
    return chunks


@settings(max_examples=300, deadline=None, database=None)
@given(streams, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_random_splits_match_single_feed(stream: bytes, cuts: list[int]) -> None:
    whole = SSEParser()
    single = feed_all([stream], whole)
    assert single == reference(stream)
    parts = SSEParser()
    assert feed_all(split(stream, cuts), parts) == single
    assert parts.truncated == whole.truncated


@settings(max_examples=200, deadline=None, database=None)
@given(
    streams,
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    st.integers(min_value=1, max_value=40),
)
def test_random_splits_with_overflow_match_single_feed(
    stream: bytes, cuts: list[int], limit: int
) -> None:
    whole = SSEParser(max_event_bytes=limit)
    single = feed_all([stream], whole)
    parts = SSEParser(max_event_bytes=limit)
    assert feed_all(split(stream, cuts), parts) == single
    assert parts.overflowed == whole.overflowed


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=1000), max_size=8))
def test_garbage_never_raises(data: bytes, cuts: list[int]) -> None:
    parser = SSEParser(max_event_bytes=64)
    for chunk in split(data, cuts):
        for event in parser.feed(chunk):
            assert isinstance(event.data, bytes)
    assert parser.close() == []


# A fast shape for FastEvents: a data-only event of letters.
_FAST = re.compile(rb"data: ([a-z]+)\n\n")


def feed_fast(chunks: list[bytes]) -> list[SSEEvent]:
    """FastEvents' output, its matches read as the events they are."""
    events = FastEvents(_FAST)
    out: list[SSEEvent] = []
    for chunk in chunks:
        for ev in events.feed(chunk):
            out.append(ev if isinstance(ev, SSEEvent) else SSEEvent(None, ev[1]))
    events.close()
    return out


fast_tokens = st.sampled_from([*TOKENS, b"data: abc\n\n", b"data: x\n\n", b"\n\n\n"])


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(fast_tokens, max_size=60).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_fast_events_split_anywhere_are_the_parser_events(stream: bytes, cuts: list[int]) -> None:
    assert feed_fast(split(stream, cuts)) == reference(stream)


def test_fast_events_hand_over_matches_and_parse_the_rest() -> None:
    events = FastEvents(_FAST)
    out = events.feed(b"data: abc\n\nevent: e\ndata: 1\n\ndata: x\n\ndata: A")
    assert [ev if isinstance(ev, SSEEvent) else ev[0] for ev in out] == [
        b"data: abc\n\n",
        SSEEvent("e", b"1"),
        b"data: x\n\n",
    ]
    assert events.feed(b"\n\n") == [SSEEvent(None, b"A")]
