"""Many long streams at once: an upstream that drips events, and a client that times each one.

This module owns the "1,000 open streams" workload. ``serve`` answers every
POST with an Anthropic Messages stream (chunked, ``event:``/``data:`` framed
exactly as the API frames it) whose text deltas come one every ``interval``
seconds; each delta's text carries the ``CLOCK_MONOTONIC`` nanosecond at which
it was written. ``load`` opens ``streams`` connections spread over ``ramp``
seconds, posts one request on each, and for every delta it reads computes
"received minus written" (both processes read the same system-wide monotonic
clock). Streams start at different moments, so their events interleave
evenly instead of arriving in one burst per interval, as real sessions do.

Both sides are plain asyncio protocols, cheap enough per event that the
gateway in between is what the figures measure. Each prints one
``BENCH_JSON`` line when done.

``python -m bench.drip serve --port 9998 --events 100 --interval 0.1``
``python -m bench.drip load URL BODY_FILE HEADERS_FILE --streams 1000 --ramp 2``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.loadgen import read_headers_file
from bench.payloads import ANTHROPIC_RESPONSE_HEADERS, sse_event

_MARK = b"t=@"

# --- the dripping upstream ---


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _head() -> bytes:
    lines = [
        b"HTTP/1.1 200 OK",
        b"Content-Type: text/event-stream; charset=utf-8",
        b"Cache-Control: no-cache",
        b"Transfer-Encoding: chunked",
    ]
    lines += [f"{k}: {v}".encode() for k, v in ANTHROPIC_RESPONSE_HEADERS.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


_START = sse_event(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_01DripDripDripDripDripDr",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 1200, "output_tokens": 1},
        },
    },
) + sse_event(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)


def _delta() -> bytes:
    # The mark and the write time, as the text of a text_delta: the client looks for it.
    text = f"t=@{time.monotonic_ns()} "
    return (
        b"event: content_block_delta\ndata: "
        + json.dumps(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            },
            separators=(",", ":"),
        ).encode()
        + b"\n\n"
    )


def _end(events: int) -> bytes:
    return (
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": events},
            },
        )
        + sse_event("message_stop", {"type": "message_stop"})
    )


class _DripProtocol(asyncio.Protocol):
    """One connection: requests one after another (keep-alive), each answered by a stream."""

    def __init__(self, wheel: _Wheel) -> None:
        self.wheel = wheel
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def stream_done(self) -> None:
        self.streaming = False
        self._next_request()

    def _next_request(self) -> None:
        if self.streaming:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").lower()
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        self.streaming = True
        assert self.transport is not None
        self.transport.write(_head() + _chunk(_START))
        self.wheel.add(self)


class _Wheel:
    """Every stream's next event, in 1 ms slots: one timer for all streams, not one each.

    A stream that starts at t gets its deltas at t + k * interval (to the
    millisecond). Each delta is stamped when it is written, so the slot's
    granularity never shows in the measured latency; what it saves is a
    timer, a future and a task step per event, which on a shared 2-core
    machine is CPU the gateway under test would otherwise not get.
    """

    def __init__(self, events: int, interval: float) -> None:
        self.events = events
        self.slots = max(1, round(interval * 1000))
        self.wheel: list[list[tuple[_DripProtocol, int]]] = [[] for _ in range(self.slots)]
        self.position = 0
        self.loop = asyncio.get_running_loop()
        self.next_tick = self.loop.time()
        self.loop.call_soon(self._tick)

    def add(self, stream: _DripProtocol) -> None:
        # Due one interval from now: the slot just behind the current one.
        self.wheel[(self.position - 1) % self.slots].append((stream, self.events))

    def _tick(self) -> None:
        slot = self.wheel[self.position]
        self.wheel[self.position] = keep = []
        for stream, left in slot:
            transport = stream.transport
            if transport is None or transport.is_closing():
                continue
            if left > 1:
                transport.write(_chunk(_delta()))
                keep.append((stream, left - 1))
            else:
                transport.write(_chunk(_delta()) + _chunk(_end(self.events)) + b"0\r\n\r\n")
                stream.stream_done()
        self.position = (self.position + 1) % self.slots
        self.next_tick += 0.001
        self.loop.call_at(max(self.next_tick, self.loop.time()), self._tick)


async def serve(port: int, events: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    wheel = _Wheel(events, interval)
    server = await loop.create_server(lambda: _DripProtocol(wheel), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# --- the timing client ---


class _Stats:
    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.open = 0
        self.peak_open = 0
        self.completed = 0
        self.failed = 0
        self.opened = 0
        self.expected = 0
        self.unparsed = 0
        #: When each timed event was read (same order as latencies_ns).
        self.received_at: list[int] = []
        #: When the last stream was opened, and when the first one ended.
        self.all_open_ns = 0
        self.first_end_ns = 0
        self.statuses: dict[int, int] = {}


class _StreamClient(asyncio.Protocol):
    """One stream: send the request, time every marked event, note the end."""

    def __init__(self, request: bytes, stats: _Stats, done: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.done = done
        self.tail = b""
        self.head_seen = False
        self.finished = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.open += 1
        self.stats.peak_open = max(self.stats.peak_open, self.stats.open)
        self.stats.opened += 1
        if self.stats.opened == self.stats.expected:
            self.stats.all_open_ns = time.monotonic_ns()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.tail:
            data = self.tail + data
            self.tail = b""
        if not self.head_seen:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.tail = data
                return
            self.head_seen = True
            status = int(data[9:12])
            self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
            data = data[end + 4 :]
        latencies = self.stats.latencies_ns
        pos = 0
        while True:
            at = data.find(_MARK, pos)
            if at < 0:
                break
            stop = data.find(b" ", at)
            if stop < 0:
                pos = at  # the timestamp is cut by the read: finish it with the next one
                break
            try:
                latencies.append(now - int(data[at + 3 : stop]))
                self.stats.received_at.append(now)
            except ValueError:
                self.stats.unparsed += 1  # a chunk boundary fell inside the timestamp
            pos = stop
        # Keep what may hold a cut mark, timestamp or "message_stop", never a counted mark.
        if b"message_stop" in data and not self.finished:
            self.finished = True
            self.stats.completed += 1
            if not self.stats.first_end_ns:
                self.stats.first_end_ns = now
            assert self.transport is not None
            self.transport.close()
            return
        self.tail = data[max(pos, len(data) - 16) :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open -= 1
        if not self.finished:
            self.stats.failed += 1
        if not self.done.done():
            self.done.set_result(None)


async def load(
    url: str, body: bytes, headers: dict[str, str], streams: int, ramp: float, timeout: float
) -> dict[str, float]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    loop = asyncio.get_running_loop()
    stats = _Stats()
    stats.expected = streams
    dones: list[asyncio.Future[None]] = []
    started = loop.time()
    for i in range(streams):
        due = started + ramp * i / max(1, streams)
        await asyncio.sleep(max(0.0, due - loop.time()))
        done: asyncio.Future[None] = loop.create_future()
        dones.append(done)
        try:
            await loop.create_connection(
                lambda done=done: _StreamClient(request, stats, done),  # type: ignore[misc]
                parts.hostname or "127.0.0.1",
                parts.port or 80,
            )
        except OSError:
            stats.failed += 1
            done.set_result(None)
    # Streams still open at the timeout count as failed (they never saw message_stop).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*dones), timeout)
    # Steady state: from a second after the last stream opened to the first stream's
    # end, every stream is open and none is starting or ending.
    low = stats.all_open_ns + 1_000_000_000 if stats.all_open_ns else 0
    high = stats.first_end_ns or (1 << 62)
    steady = sorted(
        lat
        for lat, at in zip(stats.latencies_ns, stats.received_at, strict=True)
        if low <= at <= high
    )
    ordered = sorted(stats.latencies_ns)

    def pct(values: list[int], p: float) -> float:
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(len(values) * p / 100))] / 1e6

    return {
        "streams": streams,
        "completed": stats.completed,
        "failed": stats.failed,
        "peak_open": stats.peak_open,
        "events": len(ordered),
        "unparsed": stats.unparsed,
        "ok_statuses": stats.statuses.get(200, 0),
        "lat_p50_ms": pct(ordered, 50),
        "lat_p99_ms": pct(ordered, 99),
        "lat_p999_ms": pct(ordered, 99.9),
        "lat_max_ms": ordered[-1] / 1e6 if ordered else 0.0,
        "steady_events": len(steady),
        "steady_p50_ms": pct(steady, 50),
        "steady_p99_ms": pct(steady, 99),
        "steady_p999_ms": pct(steady, 99.9),
        "seconds": loop.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="dripping upstream and its timing client")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.1)
    p = sub.add_parser("load")
    p.add_argument("url")
    p.add_argument("body_file", type=Path)
    p.add_argument("headers_file", type=Path)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--ramp", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.port, args.events, args.interval))
        return
    headers = read_headers_file(args.headers_file)
    result = asyncio.run(
        load(
            args.url,
            args.body_file.read_bytes(),
            headers,
            args.streams,
            args.ramp,
            args.timeout,
        )
    )
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
