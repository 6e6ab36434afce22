"""What ``make bench`` measures: the plan of a run (full or quick) and its workloads.

Each workload is run against the upstream direct, the bare passthrough and tvgate;
the lists below are the issue's: on SQLite, again with budgets, rate limits and caps
on every call, and the trace writer's heaviest cases on PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import gateway as gw
from bench import payloads


@dataclass
class Plan:
    repeat: int
    latency_seconds: float
    throughput_seconds: float
    streams: int
    stream_events: int
    stream_interval: float
    ramp_seconds: float
    postgres: bool
    #: Seconds of each run of the translated workloads (``bench.translated``).
    translated_seconds: float


FULL = Plan(3, 4.0, 3.0, 1000, 80, 0.1, 2.0, True, 2.0)
QUICK = Plan(1, 2.0, 2.0, 300, 30, 0.1, 1.0, True, 2.0)


@dataclass
class Workload:
    name: str
    title: str
    body: Path
    kind: str  # "json" or "sse": which upstream answer
    connections: int
    latency: bool  # a latency run (concurrency 1, overhead header read)
    database: str = "sqlite"


def workloads(bodies: payloads.BodyFiles) -> list[Workload]:
    out = [
        Workload("latency-json", "small JSON, c=1", bodies.small_json, "json", 1, True),
        Workload("latency-sse", "50-event stream, c=1", bodies.small_sse, "sse", 1, True),
    ]
    for size, json_body, sse_body in (
        ("200 B", bodies.small_json, bodies.small_sse),
        ("190 KB", bodies.large_json, bodies.large_sse),
    ):
        for connections in (16, 64):
            slug = "small" if size == "200 B" else "large"
            out.append(
                Workload(
                    f"tp-{slug}-json-c{connections}",
                    f"{size} JSON, c={connections}",
                    json_body,
                    "json",
                    connections,
                    False,
                )
            )
            out.append(
                Workload(
                    f"tp-{slug}-sse-c{connections}",
                    f"{size} SSE, c={connections}",
                    sse_body,
                    "sse",
                    connections,
                    False,
                )
            )
    return out


def postgres_workloads(bodies: payloads.BodyFiles) -> list[Workload]:
    """The trace writer's heaviest cases, on PostgreSQL."""
    return [
        Workload(
            "latency-json", "small JSON, c=1", bodies.small_json, "json", 1, True, "postgresql"
        ),
        Workload(
            "tp-small-json-c64",
            "200 B JSON, c=64",
            bodies.small_json,
            "json",
            64,
            False,
            "postgresql",
        ),
        Workload(
            "tp-small-sse-c64", "200 B SSE, c=64", bodies.small_sse, "sse", 64, False, "postgresql"
        ),
    ]


def governed_workloads(bodies: payloads.BodyFiles) -> list[Workload]:
    """The goals' workloads again, with budgets, rate limits and caps on every call."""
    return [
        Workload(
            "latency-json", "small JSON, c=1", bodies.small_json, "json", 1, True, gw.GOVERNED
        ),
        Workload(
            "latency-sse", "50-event stream, c=1", bodies.small_sse, "sse", 1, True, gw.GOVERNED
        ),
        Workload(
            "tp-small-json-c16",
            "200 B JSON, c=16",
            bodies.small_json,
            "json",
            16,
            False,
            gw.GOVERNED,
        ),
        Workload(
            "tp-large-json-c16",
            "190 KB JSON, c=16",
            bodies.large_json,
            "json",
            16,
            False,
            gw.GOVERNED,
        ),
    ]
