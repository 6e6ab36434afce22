"""``make bench``: every workload direct to the upstream, through a bare passthrough and through tvgate.

This module owns the benchmark run: it checks what the machine has (nginx,
wrk, PostgreSQL), writes the payloads, starts the upstream, the bare
passthrough and a seeded tvgate per workload (auth, routing, capture and
traces all on), runs each workload against the three targets in turn,
``repeat`` times, and writes the medians and their ratios to
``bench/RESULTS.md`` (written by ``bench.report``). The plan and the workloads are in
``bench.workloads``, what is known of the machine in ``bench.machine``.

Workloads (the issue's list):

* latency at concurrency 1: a small JSON call, a 50-event stream;
* throughput at concurrency 16 and 64: 200-byte and 190 KB bodies, JSON and SSE;
* 1,000 open streams dripping an event every 100 ms: gateway RSS, per-event
  latency, every trace written;
* the trace writer under the throughput runs: peak queue depth, traces
  written against requests answered;
* translated calls (``bench.translated``): a client of one API on a route of the other,
  CPU per call beside the passthrough call of the same size.

A figure for tvgate is only read next to the direct figure of the same run:
the machine is shared, so absolute numbers move, ratios much less.

``python -m bench.run [--quick] [--repeat N] [--translated-only] [--output bench/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import gateway as gw
from bench import payloads, upstream
from bench.loadgen import LoadResult, run_load, write_headers_file, wrk_available, wrk_version
from bench.machine import ROOT, MachineLoad, machine, raise_fd_limit
from bench.procs import RssSampler, family_rss_kib, free_port, stop, wait_port
from bench.translated import TranslatedResult, run_translated
from bench.translated import render as translated_section
from bench.workloads import (
    FULL,
    QUICK,
    Plan,
    Workload,
    governed_workloads,
    postgres_workloads,
    workloads,
)


@dataclass
class Figures:
    """The repeats of one workload against one target."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        values = [float(run[key]) for run in self.runs]
        return statistics.median(values) if values else 0.0


@dataclass
class WorkloadResult:
    workload: Workload
    targets: dict[str, Figures]
    writer: gw.WriterStats
    traces: dict[str, int]
    answered: int
    cancelled_bound: int


@dataclass
class StreamResult:
    database: str
    direct: list[dict[str, Any]]
    tvgate: list[dict[str, Any]]
    bare: list[dict[str, Any]]
    rss_idle_mib: float
    rss_peak_mib: float
    pss_peak_mib: float
    traces: dict[str, int]
    expected_traces: int
    writer: gw.WriterStats


# --- the run ---


class Bench:
    def __init__(self, plan: Plan, tmp: Path, log: Any) -> None:
        self.plan = plan
        self.tmp = tmp
        self.log = log
        self.use_wrk = wrk_available()
        self.use_nginx = upstream.nginx_available()
        self.python = sys.executable
        self.procs: list[subprocess.Popen[bytes]] = []

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    @contextlib.contextmanager
    def services(self) -> Iterator[None]:
        """The upstream, the dripping upstream and the bare passthrough, for the whole run."""
        tmp = self.tmp
        www = tmp / "www"
        upstream.write_answers(www)
        self.bodies = payloads.write_bodies(tmp / "bodies")
        self.drip_body = tmp / "bodies" / "drip.body"
        self.drip_body.write_bytes(payloads.small_request(payloads.ROUTE_DRIP, stream=True))
        port = free_port()
        if self.use_nginx:
            self.procs.append(upstream.start_nginx(tmp, www, port))
        else:
            self.procs.append(upstream.start_builtin(tmp, www, port, self.python))
        self.upstream = f"http://127.0.0.1:{port}"
        drip_port = free_port()
        drip_log = tmp / "drip-upstream.log"
        drip = subprocess.Popen(
            [
                self.python,
                "-m",
                "bench.drip",
                "serve",
                "--port",
                str(drip_port),
                "--events",
                str(self.plan.stream_events),
                "--interval",
                str(self.plan.stream_interval),
            ],
            stdout=subprocess.DEVNULL,
            stderr=drip_log.open("wb"),
            cwd=ROOT,
        )
        self.procs.append(drip)
        wait_port(drip_port, drip, drip_log)
        self.drip_upstream = f"http://127.0.0.1:{drip_port}"
        self.bare_url, bare = gw.start_bare(self.upstream, tmp / "bare.log")
        self.procs.append(bare)
        self.drip_bare_url, drip_bare = gw.start_bare(self.drip_upstream, tmp / "bare-drip.log")
        self.procs.append(drip_bare)
        self.drip_bare_pid = drip_bare.pid
        self.direct_headers = write_headers_file(
            tmp / "direct.headers", payloads.CLAUDE_CODE_HEADERS
        )
        try:
            yield
        finally:
            for proc in reversed(self.procs):
                stop(proc)

    @contextlib.contextmanager
    def database(self, kind: str) -> Iterator[str]:
        if kind.startswith("sqlite"):
            path = self.tmp / f"sqlite-{time.monotonic_ns()}" / "tvgate.db"
            path.parent.mkdir(parents=True)
            yield f"sqlite:///{path}"
        else:
            with gw.postgres_database() as url:
                yield url

    def load(self, url: str, workload: Workload, headers: Path) -> LoadResult:
        seconds = self.plan.latency_seconds if workload.latency else self.plan.throughput_seconds
        result = run_load(
            url,
            workload.body,
            headers,
            workload.connections,
            seconds,
            overhead=workload.latency,
            use_wrk=self.use_wrk,
            python=self.python,
        )
        if result.requests == 0:
            raise RuntimeError(f"{workload.name}: no request completed against {url}")
        if result.errors_status:
            # Figures of failed requests would be meaningless: stop here.
            raise RuntimeError(
                f"{workload.name}: {result.errors_status} answers with an error status from {url}"
            )
        return result

    def run_workload(self, workload: Workload, database_url: str, token: str) -> WorkloadResult:
        """A fresh tvgate; direct, bare and tvgate in turn, ``repeat`` times.

        Traces are counted in the database before the gateway starts and after it
        stopped (stopping drains the writer's queue): every request tvgate
        answered must be there; requests wrk cut off when a run ended are there
        too, as client_cancelled (at most ``connections`` per run).
        """
        before = gw.trace_counts(database_url)
        governed = workload.database == gw.GOVERNED
        tvgate = gw.start_tvgate(
            database_url,
            token,
            self.tmp / "gateway",
            f"{workload.name}-{workload.database}".replace("+", "-"),
            # The gateway-wide cap too, so every call takes a slot.
            settings={"max_concurrent_calls": "100000"} if governed else None,
        )
        gw_headers = write_headers_file(
            self.tmp / "tvgate.headers",
            {**payloads.CLAUDE_CODE_HEADERS, "Authorization": f"Bearer {token}"},
        )
        path = "/v1/messages?beta=true"
        targets = {
            "direct": (f"{self.upstream}/{workload.kind}{path}", self.direct_headers),
            "tvgate": (tvgate.url + path, gw_headers),
        }
        if workload.database == "sqlite" and workload.connections <= 16:
            # The floor, for reference (left out where it adds nothing new, to keep the
            # whole run near ten minutes).
            targets["bare"] = (f"{self.bare_url}/{workload.kind}{path}", self.direct_headers)
        figures = {name: Figures() for name in targets}
        answered = 0
        try:
            # Warm the fresh gateway (connections, caches), outside the figures.
            url, headers = targets["tvgate"]
            warm = run_load(
                url,
                workload.body,
                headers,
                workload.connections,
                1,
                use_wrk=self.use_wrk,
                python=self.python,
            )
            answered += warm.requests
            for _ in range(self.plan.repeat):
                for name, (url, headers) in targets.items():
                    with MachineLoad(tvgate.pid if name == "tvgate" else None) as load:
                        result = self.load(url, workload, headers)
                    run = asdict(result)
                    run["rps"] = result.rps
                    run["machine_busy"] = load.busy
                    run["proxy_cpu"] = load.cpu
                    figures[name].runs.append(run)
                    if name == "tvgate":
                        answered += result.requests
                    if result.errors:
                        self.say(f"    ! {name}: {result.errors} errors")
        finally:
            writer = tvgate.stop()
        after = gw.trace_counts(database_url)
        traces = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return WorkloadResult(
            workload,
            figures,
            writer,
            traces,
            answered,
            cancelled_bound=workload.connections * (self.plan.repeat + 1),
        )

    def run_streams(self, database_url: str, token: str, database: str) -> StreamResult:
        """1,000 open streams: direct, through the bare passthrough, through a fresh tvgate.

        Each run also records how busy the whole machine was and how much CPU the
        gateway used: a gateway that is not short of CPU while the machine is
        full is being kept waiting by the machine, not by its own work.
        """
        plan = self.plan
        before = gw.trace_counts(database_url, payloads.ROUTE_DRIP)
        tvgate = gw.start_tvgate(database_url, token, self.tmp / "gateway", f"streams-{database}")
        gw_headers = write_headers_file(
            self.tmp / "tvgate.headers",
            {**payloads.CLAUDE_CODE_HEADERS, "Authorization": f"Bearer {token}"},
        )
        time.sleep(0.5)
        idle_kib = family_rss_kib(tvgate.pid)
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "bare": [], "tvgate": []}
        peak = peak_pss = 0.0
        try:
            for _ in range(plan.repeat):
                with MachineLoad() as load:
                    run = self.drip_load(self.drip_upstream + "/v1/messages", self.direct_headers)
                runs["direct"].append({**run, "machine_busy": load.busy})
                if database == "sqlite":
                    with MachineLoad(self.drip_bare_pid) as load:
                        run = self.drip_load(
                            self.drip_bare_url + "/v1/messages", self.direct_headers
                        )
                    runs["bare"].append({**run, "machine_busy": load.busy, "proxy_cpu": load.cpu})
                with RssSampler(tvgate.pid) as rss, MachineLoad(tvgate.pid) as load:
                    run = self.drip_load(tvgate.url + "/v1/messages?beta=true", gw_headers)
                runs["tvgate"].append({**run, "machine_busy": load.busy, "proxy_cpu": load.cpu})
                peak = max(peak, rss.peak_mib)
                peak_pss = max(peak_pss, rss.peak_pss_mib)
        finally:
            writer = tvgate.stop()
        after = gw.trace_counts(database_url, payloads.ROUTE_DRIP)
        traces = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return StreamResult(
            database,
            runs["direct"],
            runs["tvgate"],
            runs["bare"],
            idle_kib / 1024,
            peak,
            peak_pss,
            traces,
            plan.streams * plan.repeat,
            writer,
        )

    def drip_load(self, url: str, headers: Path) -> dict[str, Any]:
        plan = self.plan
        timeout = plan.ramp_seconds + plan.stream_events * plan.stream_interval + 60
        cmd = [
            self.python,
            "-m",
            "bench.drip",
            "load",
            url,
            str(self.drip_body),
            str(headers),
            "--streams",
            str(plan.streams),
            "--ramp",
            str(plan.ramp_seconds),
            "--timeout",
            str(timeout),
        ]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout + 60, check=False, cwd=ROOT
        )
        for line in result.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                data: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
                return data
        raise RuntimeError(f"drip client failed ({result.returncode}):\n{result.stderr[-3000:]}")


def run(plan: Plan, output: Path | None, quick: bool, translated_only: bool = False) -> int:
    """The whole benchmark, written to ``output``; or (``translated_only``) the translated
    workloads alone, their table printed (and written to ``output`` if given)."""
    raise_fd_limit()
    started = time.monotonic()
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="tvgate-bench-"))
    # nginx's workers run as an unprivileged user: they must be able to read the answers.
    tmp.chmod(0o755)
    bench = Bench(plan, tmp, sys.stdout)
    tools = {
        "upstream": f"nginx {upstream.nginx_version()}"
        if bench.use_nginx
        else "built-in (asyncio)",
        "load generator": wrk_version() if bench.use_wrk else "built-in (asyncio)",
    }
    pg = plan.postgres and gw.postgres_available()
    tools["PostgreSQL"] = gw.postgres_version() if pg else "not available: SQLite only"
    bench.say(f"tvgate bench ({'quick' if quick else 'full'}): {tools}; scratch {tmp}")
    results: list[WorkloadResult] = []
    streams: list[StreamResult] = []
    translated: TranslatedResult | None = None
    try:
        with bench.services():
            databases = ["sqlite", gw.GOVERNED] + (["postgresql"] if pg else [])
            if translated_only:
                databases = ["sqlite"]
            plans = {
                "sqlite": workloads,
                gw.GOVERNED: governed_workloads,
                "postgresql": postgres_workloads,
            }
            for database in databases:
                with bench.database(database) as url:
                    token = gw.seed(
                        url,
                        bench.upstream,
                        bench.drip_upstream,
                        governed=database == gw.GOVERNED,
                    )
                    todo = [] if translated_only else plans[database](bench.bodies)
                    for workload in todo:
                        bench.say(f"  {database:10s} {workload.title} ...")
                        result = bench.run_workload(workload, url, token)
                        results.append(result)
                        bench.say("    " + one_line(result))
                    if database == "sqlite" and not translated_only:
                        bench.say(f"  {database:10s} {plan.streams} open streams ...")
                        stream = bench.run_streams(url, token, database)
                        streams.append(stream)
                        bench.say("    " + stream_line(stream))
                    if database == "sqlite":
                        bench.say(f"  {database:10s} translated calls ...")
                        translated = run_translated(bench, url, token)
    except BaseException:
        # The gateways' and upstreams' logs say why a run failed: keep them.
        bench.say(f"the run failed: its scratch directory (logs included) is kept at {tmp}")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    if translated_only:
        assert translated is not None
        table = "\n".join(translated_section(translated))
        bench.say(table)
        if output is not None:
            output.write_text(table)
        bench.say(f"translated workloads in {elapsed:.0f} s")
        return 0
    from bench.report import render

    assert output is not None
    report = render(info, tools, plan, quick, results, streams, translated, elapsed)
    # The other benchmarks (trace storage, the soak) keep their latest tables in files of
    # their own; RESULTS.md carries them too, so one page has every figure.
    for section in ("storage-results.md", "soak-results.md"):
        path = output.parent / section
        if path.exists():
            report += "\n" + path.read_text().replace("\n# ", "\n## ", 1)
    output.write_text(report)
    bench.say(f"wrote {output} in {elapsed:.0f} s")
    return 0


def one_line(result: WorkloadResult) -> str:
    direct = result.targets["direct"]
    tvgate = result.targets["tvgate"]
    if result.workload.latency:
        return (
            f"p50 direct {direct.median('lat_p50_us') / 1000:.3f} ms, "
            f"tvgate {tvgate.median('lat_p50_us') / 1000:.3f} ms; header "
            f"{tvgate.median('overhead_p50_ms'):.3f} ms; traces {result.traces.get('total', 0)}"
            f"/{result.answered}"
        )
    return (
        f"direct {direct.median('rps'):.0f}/s, tvgate {tvgate.median('rps'):.0f}/s; "
        f"traces {result.traces.get('total', 0)}/{result.answered}, "
        f"peak queue {result.writer.peak_depth}"
    )


def stream_line(stream: StreamResult) -> str:
    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(float(r[key]) for r in runs) if runs else 0.0

    return (
        f"RSS {stream.rss_peak_mib:.0f} MiB (idle {stream.rss_idle_mib:.0f}, "
        f"PSS {stream.pss_peak_mib:.0f}); steady per-event p99 "
        f"direct {med(stream.direct, 'steady_p99_ms'):.2f} ms, bare "
        f"{med(stream.bare, 'steady_p99_ms'):.2f} ms, tvgate {med(stream.tvgate, 'steady_p99_ms'):.2f} ms "
        f"(gateway CPU {med(stream.tvgate, 'proxy_cpu'):.0f}%, machine "
        f"{med(stream.tvgate, 'machine_busy'):.0f}%); traces {stream.traces.get('total', 0)}"
        f"/{stream.expected_traces}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, short runs")
    parser.add_argument("--repeat", type=int, help="repeats of each figure (median reported)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--translated-only",
        action="store_true",
        help="only the translated workloads; their table printed, RESULTS.md left alone",
    )
    parser.add_argument("--output", type=Path, help="where to write (bench/RESULTS.md)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.repeat:
        plan.repeat = args.repeat
    if args.no_postgres:
        plan.postgres = False
    output = args.output
    if output is None and not args.translated_only:
        output = ROOT / "bench" / "RESULTS.md"
    sys.exit(run(plan, output, args.quick, args.translated_only))


if __name__ == "__main__":
    main()
