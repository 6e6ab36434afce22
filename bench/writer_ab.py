"""A/B of two trees of tvgate, the same load on each, alternated: latency and CPU per call.

``python -m bench.writer_ab A_TREE B_TREE``: for each round, each tree's ``tvgate serve``
(``PYTHONPATH`` set to the tree; one worker, SQLite) behind nginx's static upstream is
sent small JSON calls by wrk at concurrency 1, then 16, with the bare Tornado + curl
passthrough's figures of the same round beside them. Besides wrk's latency, it reads
the CPU seconds the serving process and its children (the trace writer process) spent
per 1,000 calls from ``/proc``: on a shared, loaded machine these move far less than
latency does. Every call must leave a trace.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import payloads
from bench.gateway import seed, start_bare, start_tvgate, wait_traces
from bench.loadgen import LoadResult, run_load, write_headers_file
from bench.procs import cpu_split, free_port, stop
from bench.upstream import start_nginx, write_answers


def line(name: str, result: LoadResult, cpu: tuple[float, float] | None = None) -> str:
    text = (
        f"{name:>6}: {result.rps:7.0f} req/s  p50 {result.lat_p50_us / 1000:6.2f} ms  "
        f"p99 {result.lat_p99_us / 1000:6.2f} ms"
    )
    if cpu is not None and result.requests:
        per = 1000 / result.requests
        text += f"  cpu/1k calls: serving {cpu[0] * per:5.2f} s, writer {cpu[1] * per:5.2f} s"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tvgate-ab-"))
    root = tmp / "upstream"
    write_answers(root)
    upstream_port = free_port()
    nginx = start_nginx(tmp, root, upstream_port)
    upstream = f"http://127.0.0.1:{upstream_port}"
    body = tmp / "small.body"
    body.write_bytes(payloads.small_request(payloads.ROUTE_JSON, stream=False))
    direct = write_headers_file(tmp / "direct.headers", payloads.CLAUDE_CODE_HEADERS)
    bare_url, bare = start_bare(upstream, tmp / "bare.log")
    path = "/v1/messages?beta=true"
    try:
        for round_ in range(args.rounds):
            for connections in (1, 16):
                result = run_load(
                    f"{bare_url}/json{path}", body, direct, connections, args.duration
                )
                print(f"round {round_ + 1} c={connections} {line('bare', result)}")
            for label, tree in zip("AB", args.trees, strict=True):
                os.environ["PYTHONPATH"] = tree
                data = tmp / f"{label}{round_}"
                url = f"sqlite:///{data / 'tvgate.db'}"
                data.mkdir()
                token = seed(url, upstream, upstream)
                gateway = start_tvgate(url, token, data, label, tree=Path(tree))
                headers = write_headers_file(
                    data / "h", {**payloads.CLAUDE_CODE_HEADERS, "Authorization": f"Bearer {token}"}
                )
                calls = 0
                try:
                    for connections in (1, 16):
                        before = cpu_split(gateway.pid)
                        result = run_load(
                            gateway.url + path, body, headers, connections, args.duration
                        )
                        after = cpu_split(gateway.pid)
                        calls += result.requests
                        cpu = (after[0] - before[0], after[1] - before[1])
                        print(f"round {round_ + 1} c={connections} {line(label, result, cpu)}")
                finally:
                    writer = gateway.stop()
                counts = wait_traces(url, calls)
                print(
                    f"round {round_ + 1} {label}: {calls} calls, {counts['total']} traces, "
                    f"writer written={writer.written} dropped={writer.dropped}"
                )
    finally:
        stop(bare)
        stop(nginx)


if __name__ == "__main__":
    main()
