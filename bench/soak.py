"""A load soak: mixed streaming and JSON traffic at a steady rate, for minutes, through tvgate.

Starts the fake provider and a real ``tvgate serve`` (SQLite, local keyring, capture on),
sends a fixed rate of requests (Anthropic streams, Anthropic JSON, OpenAI chat streams),
samples the gateway's RSS every 10 s, and at the end checks that every request has its
trace. Reports RSS growth after warm-up and the error count; both should be near zero.

    python -m bench.soak [--minutes 10] [--rate 40]

Loopback only, bounded in time and count; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
import uuid
from pathlib import Path

import httpx2
import orjson

from tests.conftest import gateway_env, seed, start_gateway, stop_gateway
from tests.fake_provider import FakeProvider
from tvgate.db import open_database
from tvgate.models import Trace

RESULTS = Path(__file__).parent / "soak-results.md"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


WORKLOADS = [
    (
        "/v1/messages",
        {
            "model": "claude-test",
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": "soak stream"}],
        },
    ),
    (
        "/v1/messages",
        {
            "model": "claude-test",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "soak json"}],
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": "gpt-test",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "soak chat"}],
        },
    ),
]


async def drive(
    url: str, token: str, session: str, seconds: float, rate: float, pid: int
) -> dict[str, object]:
    errors = 0
    sent = 0
    samples: list[tuple[float, float]] = []
    interval = 1.0 / rate
    started = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx2.Limits(max_connections=200)
    async with httpx2.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(index: int) -> None:
            nonlocal errors
            path, body = WORKLOADS[index % len(WORKLOADS)]
            try:
                response = await client.post(
                    path,
                    content=orjson.dumps(body),
                    headers={"x-api-key": token, "x-tvgate-session": session},
                )
                if response.status_code != 200 or b'"type":"error"' in response.content[-300:]:
                    errors += 1
            except httpx2.HTTPError:
                errors += 1

        next_sample = started
        while (now := time.monotonic()) - started < seconds:
            if now >= next_sample:
                samples.append((now - started, rss_mib(pid)))
                next_sample += 10
            task = asyncio.create_task(one(sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent * interval - time.monotonic()))
        await asyncio.gather(*tasks)
    samples.append((time.monotonic() - started, rss_mib(pid)))
    return {"sent": sent, "errors": errors, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    args = parser.parse_args()
    fake = FakeProvider().start()
    data = Path(tempfile.mkdtemp(prefix="tvgate-soak-"))
    database_url = f"sqlite:///{data / 'tvgate.db'}"
    tokens = seed(database_url, data, fake)
    env = gateway_env(database_url, data, 0, TVGATE_CACHE_TTL="5")
    proc = start_gateway(env, data / "tvgate.log")
    session = uuid.uuid4().hex
    try:
        result = asyncio.run(
            drive(
                "http://" + env["TVGATE_LISTEN"],
                tokens["dev@acme.test"],
                session,
                args.minutes * 60,
                args.rate,
                proc.pid,
            )
        )
    finally:
        stop_gateway(proc)
        fake.stop()
    open_database(database_url)
    traces = Trace.select().where(Trace.session_id == session).count()
    samples = result["samples"]
    assert isinstance(samples, list)
    warm = next((rss for at, rss in samples if at >= 60), samples[0][1])
    end = samples[-1][1]
    peak = max(rss for _, rss in samples)
    lines = [
        "# Soak",
        "",
        f"{args.minutes:g} minutes at {args.rate:g} requests/s, mixed: Anthropic stream, Anthropic JSON,"
        " OpenAI chat stream with usage; SQLite, local keyring, bodies captured and redacted.",
        f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}.",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| requests sent | {result['sent']} |",
        f"| errors | {result['errors']} |",
        f"| traces written | {traces} |",
        f"| gateway RSS after 1 min (warm) | {warm:.1f} MiB |",
        f"| gateway RSS at the end | {end:.1f} MiB |",
        f"| RSS growth after warm-up | {end - warm:+.1f} MiB |",
        f"| peak RSS | {peak:.1f} MiB |",
        "",
        "RSS samples (seconds, MiB): " + ", ".join(f"{at:.0f}: {rss:.1f}" for at, rss in samples),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
