"""Writing ``bench/RESULTS.md``: the machine, the goals, every figure beside its direct figure.

This module owns how results are presented: medians of the repeats, the
ratio of tvgate to the direct call of the same run, the goals of the issue
and whether each was met, then every repeat, so that a reader can see the
spread and judge the noise.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from bench.gateway import GOVERNED
from bench.translated import render as translated_section

if TYPE_CHECKING:
    from bench.run import StreamResult, WorkloadResult
    from bench.translated import TranslatedResult
    from bench.workloads import Plan

#: name -> (metric, goal, direction) where direction "<=" or ">=".
GOALS = {
    "latency-json": ("added p50 latency", 0.5, "<="),
    "latency-sse": ("added p50 latency", 0.8, "<="),
    "tp-small-json-c16": ("requests/s", 2000.0, ">="),
    "tp-small-sse-c16": ("requests/s", 2000.0, ">="),
    "tp-large-json-c16": ("requests/s", 700.0, ">="),
    "tp-large-sse-c16": ("requests/s", 700.0, ">="),
}
RSS_GOAL_MB = 300.0
EVENT_P99_GOAL_MS = 2.0


def _met(value: float, goal: float, direction: str) -> str:
    ok = value <= goal if direction == "<=" else value >= goal
    return "yes" if ok else "**no**"


def _ms(us: float) -> str:
    return f"{us / 1000:.3f}"


GOVERNED_NOTE = ", budgets + limits + caps on"
#: The database variants, in the order the report shows them.
DATABASES = ("sqlite", GOVERNED, "postgresql")


def _by_name(results: list[WorkloadResult], database: str) -> dict[str, WorkloadResult]:
    return {r.workload.name: r for r in results if r.workload.database == database}


def _per_core(fig: Any) -> float:
    """Requests per second of the gateway's own CPU time: what one busy core would serve."""
    values = [
        float(run["rps"]) * 100.0 / float(run["proxy_cpu"])
        for run in fig.runs
        if float(run.get("proxy_cpu", 0)) > 0
    ]
    return statistics.median(values) if values else 0.0


def _medians(result: WorkloadResult, key: str) -> tuple[float, float, float]:
    """A figure's median against direct, bare (0 without a bare run) and tvgate."""
    bare = result.targets.get("bare")
    return (
        result.targets["direct"].median(key),
        bare.median(key) if bare else 0.0,
        result.targets["tvgate"].median(key),
    )


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs) if runs else 0.0


def render(
    info: dict[str, str],
    tools: dict[str, str],
    plan: Plan,
    quick: bool,
    results: list[WorkloadResult],
    streams: list[StreamResult],
    translated: TranslatedResult | None,
    elapsed: float,
) -> str:
    out: list[str] = []
    add = out.append
    add("# tvgate benchmark results")
    add("")
    add(
        f"Written by `make bench{'-quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {elapsed:.0f} s. "
        f"Every figure is the median of {plan.repeat} run(s); tvgate, the bare passthrough "
        "and the direct call take turns within each repeat, on the same machine, so read "
        "tvgate next to the direct figure of the same row, not as an absolute. All runs are "
        "on 127.0.0.1. tvgate runs as one `tvgate serve` process with a proxy token, "
        "routing (the route rewrites `model`), capture (the stream is parsed and the answer "
        "rebuilt) and a trace per request all on; the bare passthrough is Tornado and "
        "Tornado's curl client with nothing else (`bench/bare_proxy.py`)."
    )
    add("")
    add("## Machine and versions")
    add("")
    add("| | |")
    add("|---|---|")
    for key, value in {**info, **tools}.items():
        add(f"| {key} | {value} |")
    add("")

    sqlite = _by_name(results, "sqlite")
    add("## Goals (one process, every feature on, SQLite)")
    add("")
    add(
        "A goal is met on the figure measured, nothing else. In parentheses after a "
        "throughput: requests per second of the gateway's own CPU time (its serving process "
        "and its trace writer process together), what one core given "
        "to the gateway alone would serve; on this machine the load generator and the "
        "upstream share the two cores with it (and with whatever else runs there), so the "
        "measured figure is the lower one."
    )
    add("")
    add("| figure | direct | bare passthrough | tvgate | tvgate vs direct | goal | met |")
    add("|---|---|---|---|---|---|---|")
    governed = _by_name(results, GOVERNED)
    for name, (metric, goal, direction) in GOALS.items():
        for result, note in ((sqlite.get(name), ""), (governed.get(name), GOVERNED_NOTE)):
            if result is None:
                continue
            if metric == "added p50 latency":
                d, b, t = _medians(result, "lat_p50_us")
                added = (t - d) / 1000
                add(
                    f"| {result.workload.title}{note}: p50 latency, ms | {_ms(d)} | {_ms(b)} | "
                    f"{_ms(t)} | +{added:.3f} ms ({t / d:.1f}x) | added <= {goal} ms | "
                    f"{_met(added, goal, direction)} |"
                )
            else:
                d, b, t = _medians(result, "rps")
                add(
                    f"| {result.workload.title}{note}: requests/s (per gateway CPU-second) | "
                    f"{d:.0f} | {b:.0f} | {t:.0f} ({_per_core(result.targets['tvgate']):.0f}) | {t / d:.2f}x | "
                    f">= {goal:.0f}/s | {_met(t, goal, direction)} |"
                )
    for stream in streams:
        if stream.database != "sqlite":
            continue
        rss_mb = stream.rss_peak_mib * 1.048576
        d99 = _median(stream.direct, "steady_p99_ms")
        b99 = _median(stream.bare, "steady_p99_ms")
        t99 = _median(stream.tvgate, "steady_p99_ms")
        add(
            f"| {plan.streams} open streams: gateway peak RSS, MB | | | {rss_mb:.0f} | | "
            f"<= {RSS_GOAL_MB:.0f} MB | {_met(rss_mb, RSS_GOAL_MB, '<=')} |"
        )
        add(
            f"| {plan.streams} open streams: per-event p99 latency (all streams open), ms | "
            f"{d99:.2f} | {b99:.2f} | {t99:.2f} | +{t99 - d99:.2f} ms | "
            f"added <= {EVENT_P99_GOAL_MS} ms | {_met(t99 - d99, EVENT_P99_GOAL_MS, '<=')} |"
        )
    lat = sqlite.get("latency-json")
    if lat is not None:
        header = lat.targets["tvgate"].median("overhead_p50_ms")
        added = (
            lat.targets["tvgate"].median("lat_p50_us") - lat.targets["direct"].median("lat_p50_us")
        ) / 1000
        add(
            f"| `x-tvgate-overhead-ms`, small JSON, median | | | {header:.3f} | "
            f"of +{added:.3f} ms added | tvgate's own time | see below |"
        )
    add("")

    add("## Added latency at concurrency 1")
    add("")
    add("| workload | target | p50 ms | p90 ms | p99 ms | added p50 | added p99 | requests/s |")
    add("|---|---|---|---|---|---|---|---|")
    for database in DATABASES:
        for name, result in _by_name(results, database).items():
            if not result.workload.latency:
                continue
            direct = result.targets["direct"]
            for target, fig in result.targets.items():
                added50 = (fig.median("lat_p50_us") - direct.median("lat_p50_us")) / 1000
                added99 = (fig.median("lat_p99_us") - direct.median("lat_p99_us")) / 1000
                label = f"{result.workload.title} ({database})" if target == "direct" else ""
                add(
                    f"| {label} | {target} | {_ms(fig.median('lat_p50_us'))} | "
                    f"{_ms(fig.median('lat_p90_us'))} | {_ms(fig.median('lat_p99_us'))} | "
                    f"{'' if target == 'direct' else f'+{added50:.3f}'} | "
                    f"{'' if target == 'direct' else f'+{added99:.3f}'} | {fig.median('rps'):.0f} |"
                )
            del name
    add("")
    add(
        "`x-tvgate-overhead-ms` is tvgate's own time for a call: from the complete request "
        "body to the request handed to curl (identity, body, routing, key, upstream "
        "request), plus the handling of the provider's response headers. It leaves out "
        "what no gateway can avoid and what happens after the header is sent: reading and "
        "parsing the HTTP request (Tornado), the event loop, the second loopback hop, curl, "
        "relaying the body, the trace. The added latency above is all of that."
    )
    add("")
    add("| workload | header p50 ms | header p99 ms | added p50 ms (measured) |")
    add("|---|---|---|---|")
    for database in DATABASES:
        for result in _by_name(results, database).values():
            if not result.workload.latency:
                continue
            fig = result.targets["tvgate"]
            added = (
                fig.median("lat_p50_us") - result.targets["direct"].median("lat_p50_us")
            ) / 1000
            add(
                f"| {result.workload.title} ({database}) | {fig.median('overhead_p50_ms'):.3f} | "
                f"{fig.median('overhead_p99_ms'):.3f} | {added:.3f} |"
            )
    add("")

    add("## Throughput")
    add("")
    add(
        "| workload | database | direct req/s | bare req/s | tvgate req/s | tvgate / direct | "
        "tvgate / bare | tvgate p50 ms | tvgate p99 ms | gateway CPU % | machine % | "
        "tvgate req per gateway CPU-second |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for database in DATABASES:
        for result in _by_name(results, database).values():
            if result.workload.latency:
                continue
            tvgate, bare = result.targets["tvgate"], "bare" in result.targets
            d, b, t = _medians(result, "rps")
            add(
                f"| {result.workload.title} | {database} | {d:.0f} | "
                f"{f'{b:.0f}' if bare else ''} | {t:.0f} | {t / d:.3f} | "
                f"{f'{t / b:.2f}' if bare else ''} | {_ms(tvgate.median('lat_p50_us'))} | "
                f"{_ms(tvgate.median('lat_p99_us'))} | {tvgate.median('proxy_cpu'):.0f} | "
                f"{tvgate.median('machine_busy'):.0f} | {_per_core(tvgate):.0f} |"
            )
    add("")

    add("## Trace writer")
    add("")
    add(
        "Each workload runs on a fresh gateway. Traces are counted in the database before "
        "it starts and after it stops (stopping drains the queue). Every request tvgate "
        "answered must have its trace; requests the load generator cut off at the end of a "
        "run leave one too, as `client_cancelled`. The peak queue depth is the deepest the "
        "queue was when the writer took a batch (it polls every 50 ms)."
    )
    add("")
    add(
        "| workload | database | answered | traces written | ok | client_cancelled | "
        "writer's count | dropped | peak queue depth | no trace lost |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        traces = result.traces
        total = traces.get("total", 0)
        ok = traces.get("ok", 0)
        lost = (
            ok < result.answered
            or total > result.answered + result.cancelled_bound
            or result.writer.dropped > 0
            or result.writer.written != total
        )
        add(
            f"| {result.workload.title} | {result.workload.database} | {result.answered} | "
            f"{total} | {ok} | {traces.get('client_cancelled', 0)} | {result.writer.written} | "
            f"{result.writer.dropped} | {result.writer.peak_depth} | "
            f"{'**no**' if lost else 'yes'} |"
        )
    add("")

    add(f"## {plan.streams} open streams")
    add("")
    add(
        f"{plan.streams} connections opened over {plan.ramp_seconds:.0f} s, each a streamed "
        f"Messages call whose upstream sends a text delta every "
        f"{plan.stream_interval * 1000:.0f} ms ({plan.stream_events} deltas, so "
        f"{plan.stream_events * plan.stream_interval:.0f} s per stream). Each delta carries "
        "the monotonic time it was written; the client subtracts it from the time it read "
        "it. Streams start at different moments, so events arrive evenly, "
        f"{plan.streams / plan.stream_interval:.0f} a second with every stream open. "
        "*Steady* counts the events read while every stream was open and none was starting "
        "or ending; *all* counts every event. The gateway's RSS (the serving process and its "
        "trace writer process together) is sampled every 100 ms, and their PSS beside it: "
        "the two processes map the same libraries, which their RSS figures added count "
        "twice and PSS once. "
        "*Machine* is how busy both cores were during the run (200% = full), *gateway CPU* "
        "the share of the serving process and its trace writer process together (so it may "
        "pass 100%): a serving process well under 100% while the machine is full "
        "is kept waiting by the machine (the load generator, the upstream, and whatever "
        "else runs there), not by its own work."
    )
    add("")
    add(
        "| database | target | completed | peak open | events | steady p50 ms | steady p99 ms "
        "| steady p99.9 ms | all p99 ms | added steady p99 | machine % | gateway CPU % |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for stream in streams:
        d99 = _median(stream.direct, "steady_p99_ms")
        for target, runs in (
            ("direct", stream.direct),
            ("bare", stream.bare),
            ("tvgate", stream.tvgate),
        ):
            if not runs:
                continue
            added_text = (
                "" if target == "direct" else f"+{_median(runs, 'steady_p99_ms') - d99:.2f}"
            )
            cpu_text = "" if target == "direct" else f"{_median(runs, 'proxy_cpu'):.0f}"
            add(
                f"| {stream.database if target == 'direct' else ''} | {target} | "
                f"{_median(runs, 'completed'):.0f} | {_median(runs, 'peak_open'):.0f} | "
                f"{_median(runs, 'events'):.0f} | {_median(runs, 'steady_p50_ms'):.2f} | "
                f"{_median(runs, 'steady_p99_ms'):.2f} | {_median(runs, 'steady_p999_ms'):.2f} | "
                f"{_median(runs, 'lat_p99_ms'):.2f} | {added_text} | "
                f"{_median(runs, 'machine_busy'):.0f} | {cpu_text} |"
            )
    add("")
    add(
        "| database | gateway RSS idle MB | gateway RSS peak MB | gateway PSS peak MB | streams "
        "| traces written | ok | other outcomes | dropped | no trace lost |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    for stream in streams:
        total = stream.traces.get("total", 0)
        ok = stream.traces.get("ok", 0)
        others = ", ".join(
            f"{k} {v}" for k, v in sorted(stream.traces.items()) if k not in ("ok", "total") and v
        )
        lost = total != stream.expected_traces or stream.writer.dropped > 0
        add(
            f"| {stream.database} | {stream.rss_idle_mib * 1.048576:.0f} | "
            f"{stream.rss_peak_mib * 1.048576:.0f} | {stream.pss_peak_mib * 1.048576:.0f} | "
            f"{stream.expected_traces} | {total} | {ok} | "
            f"{others or 'none'} | {stream.writer.dropped} | {'**no**' if lost else 'yes'} |"
        )
    add("")

    if translated is not None:
        out += translated_section(translated)

    add("## Every run")
    add("")
    add(
        "| workload | database | target | run | requests | req/s | p50 ms | p99 ms | errors "
        "| machine % | gateway CPU % |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for target, fig in result.targets.items():
            for i, run in enumerate(fig.runs, 1):
                cpu_text = "" if target == "direct" else f"{run.get('proxy_cpu', 0):.0f}"
                errors = sum(
                    int(run[k])
                    for k in (
                        "errors_connect",
                        "errors_read",
                        "errors_write",
                        "errors_status",
                        "errors_timeout",
                    )
                )
                add(
                    f"| {result.workload.title} | {result.workload.database} | {target} | {i} | "
                    f"{run['requests']} | {run['rps']:.0f} | {_ms(run['lat_p50_us'])} | "
                    f"{_ms(run['lat_p99_us'])} | {errors} | {run.get('machine_busy', 0):.0f} | "
                    f"{cpu_text} |"
                )
    add("")
    return "\n".join(out) + "\n"
