"""Load generation: wrk with ``bench/post.lua`` when installed, else a built-in asyncio client.

This module owns one measurement: N keep-alive connections posting one body
file to one URL for a fixed time, and what came of it (requests, latency
percentiles, errors, and the gateway's ``x-tvgate-overhead-ms`` when asked).
The built-in client is a fallback for machines without wrk; being Python, it
saturates long before wrk does, so throughput figures taken with it say more
about the client than about the gateway (RESULTS.md says which one was used).

Run the built-in client alone with
``python -m bench.loadgen URL BODY_FILE HEADERS_FILE -c 16 -d 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from bench.payloads import SEQUENCE_MARK

LUA_SCRIPT = Path(__file__).with_name("post.lua")


@dataclass
class LoadResult:
    requests: int = 0
    duration_us: int = 0
    bytes: int = 0
    errors_connect: int = 0
    errors_read: int = 0
    errors_write: int = 0
    errors_status: int = 0
    errors_timeout: int = 0
    lat_p50_us: float = 0.0
    lat_p90_us: float = 0.0
    lat_p99_us: float = 0.0
    lat_mean_us: float = 0.0
    lat_max_us: float = 0.0
    overhead_n: int = 0
    overhead_p50_ms: float = 0.0
    overhead_p99_ms: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def errors(self) -> int:
        return (
            self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_status
            + self.errors_timeout
        )

    @classmethod
    def from_output(cls, output: str) -> LoadResult:
        for line in output.splitlines():
            if line.startswith("BENCH_JSON "):
                data = json.loads(line[len("BENCH_JSON ") :])
                names = {f.name for f in fields(cls)}
                return cls(**{k: v for k, v in data.items() if k in names})
        raise RuntimeError(f"no BENCH_JSON line in the load generator's output:\n{output[-3000:]}")


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_version() -> str:
    result = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (result.stdout or result.stderr).strip().splitlines()[0].split(" Copyright")[0]


def write_headers_file(path: Path, headers: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}: {value}\n" for name, value in headers.items()))
    return path


def read_headers_file(path: Path) -> dict[str, str]:
    """The headers of a ``write_headers_file`` file (``Name: value`` lines)."""
    headers: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return headers


def run_load(
    url: str,
    body_file: Path,
    headers_file: Path,
    connections: int,
    duration: float,
    *,
    overhead: bool = False,
    use_wrk: bool = True,
    python: str = "python3",
) -> LoadResult:
    """One timed run; raises if the generator fails."""
    env = dict(os.environ)
    env["BENCH_OVERHEAD"] = "1" if overhead else "0"
    if use_wrk:
        cmd = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(LUA_SCRIPT),
            url,
            "--",
            str(body_file),
            str(headers_file),
        ]
    else:
        cmd = [
            python,
            "-m",
            "bench.loadgen",
            url,
            str(body_file),
            str(headers_file),
            "-c",
            str(connections),
            "-d",
            str(duration),
        ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=duration + 120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return LoadResult.from_output(result.stdout)


# --- the built-in client ---


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int, str]:
    """(status, body bytes, x-tvgate-overhead-ms) of one response; chunked or sized."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = -1
    chunked = False
    overhead = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        lower = name.strip().lower()
        if lower == "content-length":
            length = int(value.strip())
        elif lower == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif lower == "x-tvgate-overhead-ms":
            overhead = value.strip()
    size = 0
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            n = int(size_line.split(b";", 1)[0], 16)
            await reader.readexactly(n + 2)
            size += n
            if n == 0:
                break
    elif length >= 0:
        await reader.readexactly(length)
        size = length
    return status, size, overhead


async def _worker(
    url: str,
    next_request: Callable[[], bytes],
    deadline: float,
    latencies: list[float],
    overheads: list[float],
    result: LoadResult,
) -> None:
    parts = urlsplit(url)
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    except OSError:
        result.errors_connect += 1
        return
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(next_request())
            try:
                status, size, overhead = await asyncio.wait_for(_read_response(reader), 30)
            except TimeoutError:
                result.errors_timeout += 1
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                result.errors_read += 1
                return
            latencies.append((time.perf_counter() - started) * 1e6)
            result.requests += 1
            result.bytes += size
            if status >= 400:
                result.errors_status += 1
            if overhead:
                overheads.append(float(overhead))
    finally:
        writer.close()


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * p / 100 + 0.5) - 1))]


async def builtin_load(
    url: str, body: bytes, headers: dict[str, str], connections: int, duration: float
) -> LoadResult:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    # Each request gets its own sequence number in the body's mark (same width, same length).
    mark = request.find(SEQUENCE_MARK)
    numbers = itertools.count(int(time.time()) % 100000 * 10000)

    def next_request() -> bytes:
        if mark < 0:
            return request
        number = b"%010d" % (next(numbers) % 10**10)
        return request[:mark] + number + request[mark + len(SEQUENCE_MARK) :]

    result = LoadResult()
    latencies: list[float] = []
    overheads: list[float] = []
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(
            _worker(url, next_request, deadline, latencies, overheads, result)
            for _ in range(connections)
        )
    )
    result.duration_us = int((time.perf_counter() - started) * 1e6)
    result.lat_p50_us = _percentile(latencies, 50)
    result.lat_p90_us = _percentile(latencies, 90)
    result.lat_p99_us = _percentile(latencies, 99)
    result.lat_mean_us = sum(latencies) / len(latencies) if latencies else 0.0
    result.lat_max_us = max(latencies, default=0.0)
    result.overhead_n = len(overheads)
    result.overhead_p50_ms = _percentile(overheads, 50)
    result.overhead_p99_ms = _percentile(overheads, 99)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="built-in load generator (wrk's stand-in)")
    parser.add_argument("url")
    parser.add_argument("body_file", type=Path)
    parser.add_argument("headers_file", type=Path)
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    args = parser.parse_args()
    headers = read_headers_file(args.headers_file)
    result = asyncio.run(
        builtin_load(
            args.url, args.body_file.read_bytes(), headers, args.connections, args.duration
        )
    )
    data = {f.name: getattr(result, f.name) for f in fields(result)}
    print("BENCH_JSON " + json.dumps(data), flush=True)


if __name__ == "__main__":
    main()
