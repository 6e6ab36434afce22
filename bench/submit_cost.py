"""What a trace costs the serving process at submit: µs per call, in process.

``python -m bench.submit_cost``: a real :class:`~tvgate.traces.client.WriterClient`
with its writer process over a throwaway SQLite database; times ``submit`` of a row
as the request path builds it, without a body and with 1 KiB and 190 KiB bodies (the
frame serialised with orjson and written to the socketpair), then stops the writer
(which writes them all). The bodies' org captures no bodies, so the writer process
does no redaction: what is timed is only the serving process's side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tornado.ioloop import IOLoop

from bench.procs import rss_kib
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.keyring import PlaintextCache
from tvgate.keyring.local import LocalKeyring
from tvgate.traces.client import WriterClient, WriterConfig
from tvgate.traces.rows import CapturedBody


def row(org_id: int) -> dict[str, Any]:
    """A trace row with the request path's fields and typical values."""
    now = time.time()
    return {
        "id": uuid.uuid4().hex,
        "org_id": org_id,
        "user_id": 1,
        "route_name": "claude",
        "key_name": "org-anthropic",
        "provider": "anthropic",
        "endpoint": "messages",
        "requested_model": "claude-sonnet-4-5",
        "upstream_model": "claude-sonnet-4-5-20250929",
        "response_model": "claude-sonnet-4-5-20250929",
        "stream": True,
        "status_code": 200,
        "outcome": "ok",
        "error_type": "",
        "error_message": "",
        "received_at": now,
        "first_byte_at": now + 0.2,
        "finished_at": now + 1.1,
        "overhead_ms": 0.412,
        "input_tokens": 1834,
        "output_tokens": 211,
        "cache_read_tokens": 12000,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "bytes_in": 7340,
        "bytes_out": 2210,
        "tool": "claude-code",
        "tool_version": "2.0.14",
        "session_id": uuid.uuid4().hex,
        "upstream_request_id": "req_011CTz" + uuid.uuid4().hex[:16],
        "message_id": "msg_01" + uuid.uuid4().hex[:20],
        "anomalies": [],
    }


def body(size: int) -> CapturedBody:
    request = b'{"model":"claude","messages":[{"role":"user","content":"' + b"x" * size + b'"}]}'
    answer = {"id": "msg_1", "content": [{"type": "text", "text": "y" * 400}], "usage": {}}
    return CapturedBody(request, answer, 600)


async def measure(calls: int) -> dict[str, list[float]]:
    data = Path(tempfile.mkdtemp(prefix="tvgate-submit-"))
    url = f"sqlite:///{data / 'tvgate.db'}"
    migrate(open_database(url))
    org_id = services.ensure_org("bench").id
    services.set_policy("bench", capture_bodies=False)
    keyring = LocalKeyring(b"k" * 32)
    client = WriterClient(
        WriterConfig(url, str(data), 0, calls * 4, 200, 60.0, 256 << 20, 300.0, 3600.0, "warning"),
        PlaintextCache(keyring, None, 60.0),  # type: ignore[arg-type]
        keyring,
    )
    client.start()
    timings: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    for name, captured in (
        ("no body", None),
        ("1 KiB body", body(1024)),
        ("190 KiB body", body(190 << 10)),
    ):
        samples = timings.setdefault(name, [])
        cpu_started = time.thread_time()
        for _ in range(calls):
            trace = row(org_id)
            started = time.perf_counter()
            client.submit(trace, captured)
            samples.append((time.perf_counter() - started) * 1e6)
            await asyncio.sleep(0)  # the loop writes what the socket did not take
        # CPU of this thread per call, the loop's turns included: what a shared machine's
        # other processes do not add to, as they do to the wall-clock samples.
        cpu[name] = (time.thread_time() - cpu_started) / calls * 1e6
    assert client.pid is not None
    print(f"writer process RSS after the calls: {rss_kib(client.pid)[0] / 1024:.1f} MiB")
    await asyncio.get_running_loop().run_in_executor(None, client.stop)
    print(f"written by the writer process: {client.stats.written} of {3 * calls}")
    for name, per_call in cpu.items():
        print(f"submit, {name}: {per_call:.1f} µs of CPU per call (with building the row)")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    timings = IOLoop.current().run_sync(lambda: measure(args.calls))
    for name, samples in timings.items():
        samples.sort()
        p50 = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99)]
        print(
            f"submit, {name}: p50 {p50:.1f} µs, p99 {p99:.1f} µs, mean {statistics.fmean(samples):.1f} µs"
        )


if __name__ == "__main__":
    main()
