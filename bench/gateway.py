"""The gateways under test: tvgate itself, seeded through its services, and a bare passthrough.

This module owns starting ``tvgate serve`` exactly as deployed (a subprocess
configured by ``TVGATE_*`` environment variables; the launcher and the scratch
PostgreSQL database are tests/harness.py's) over SQLite or a PostgreSQL
database of its own, seeding it the way an operator would (a user, a token,
keys and routes, through :mod:`tvgate.services`), counting the traces it
wrote, and reading the trace writer's counters from its log when it stops.

It also starts :mod:`bench.bare_proxy`, the floor tvgate is measured against:
Tornado and curl with nothing else.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.chat_payloads import OPENAI_MODEL, ROUTE_CHAT_JSON, ROUTE_CHAT_SSE
from bench.payloads import ROUTE_DRIP, ROUTE_JSON, ROUTE_SSE, UPSTREAM_MODEL
from bench.procs import free_port, stop, wait_port
from tests import harness

MASTER_KEY = b"b" * 32
PG_ADMIN_DSN = os.environ.get(
    "TVGATE_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PROVIDER_SECRET = "sk-ant-api03-bench-" + "0" * 32
OPENAI_SECRET = "sk-proj-bench-" + "0" * 40


# --- databases ---


def postgres_available() -> bool:
    try:
        import psycopg2
    except ImportError:
        return False
    try:
        psycopg2.connect(PG_ADMIN_DSN, connect_timeout=3).close()
    except psycopg2.Error:
        return False
    return True


def postgres_version() -> str:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=3)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            row = cur.fetchone()
            return str(row[0]) if row else "?"
    finally:
        conn.close()


def postgres_database() -> AbstractContextManager[str]:
    """A fresh PostgreSQL database for one gateway, dropped afterwards."""
    return harness.postgres_database("tvgate_bench_", PG_ADMIN_DSN)


# --- seeding and counting, through tvgate's own code ---


#: The name of the database variant whose org has budgets, rate limits and caps set.
GOVERNED = "sqlite+governance"


def seed(database_url: str, upstream: str, drip_upstream: str, *, governed: bool = False) -> str:
    """A user, a token, keys and routes (model rewritten, as a route alias does); the token.

    ``governed``: also budgets for the org, the user, each route and each key, rate limits
    for the org, the user and each route, and a concurrency cap on each key, all far above
    what a run uses, so every call is judged against all of them and none is refused.
    """
    from tvgate import services
    from tvgate.db import migrate, open_database
    from tvgate.keyring.local import LocalKeyring
    from tvgate.models import database

    db = open_database(database_url)
    migrate(db)
    keyring = LocalKeyring(MASTER_KEY)
    org = "bench"
    services.add_user("bench@bench.test", org)
    token, _row = services.issue_token("bench@bench.test", org, name="bench")
    for route, base_url in (
        (ROUTE_JSON, upstream + "/json"),
        (ROUTE_SSE, upstream + "/sse"),
        (ROUTE_DRIP, drip_upstream),
    ):
        services.add_key(
            route + "-key",
            "anthropic",
            PROVIDER_SECRET,
            keyring,
            org_name=org,
            base_url=base_url,
            allow_private=True,
        )
        services.add_route(route, route + "-key", model=UPSTREAM_MODEL, org_name=org)
    # The OpenAI Chat routes of the translated workloads (``bench.translated``).
    for route, prefix in ((ROUTE_CHAT_JSON, "/chat-json/v1"), (ROUTE_CHAT_SSE, "/chat-sse/v1")):
        services.add_key(
            route + "-key",
            "openai",
            OPENAI_SECRET,
            keyring,
            org_name=org,
            base_url=upstream + prefix,
            allow_private=True,
        )
        services.add_route(route, route + "-key", model=OPENAI_MODEL, org_name=org)
    if governed:
        _govern(org, [ROUTE_JSON, ROUTE_SSE, ROUTE_DRIP])
    database.close()
    return token


def _govern(org_name: str, routes: list[str]) -> None:
    from tvgate.models import Budget, Org, ProviderKey, RateLimit, User

    org = Org.get(Org.name == org_name)
    user = User.get(User.org == org)
    subjects = [("org", ""), ("user", str(user.id))] + [("route", r) for r in routes]
    for scope, subject in subjects + [("key", r + "-key") for r in routes]:
        Budget.create(
            org=org, scope=scope, subject=subject, metric="tokens", period="day", amount=1e15
        )
        Budget.create(
            org=org, scope=scope, subject=subject, metric="usd", period="month", amount=1e12
        )
    for scope, subject in subjects:
        RateLimit.create(org=org, scope=scope, subject=subject, rpm=10**9, tpm=10**12)
    ProviderKey.update(max_concurrent=100_000).where(ProviderKey.org == org).execute()


def trace_counts(database_url: str, route: str | None = None) -> dict[str, int]:
    """Traces written, by outcome (and ``total``), optionally for one route only."""
    import peewee

    from tvgate.db import open_database
    from tvgate.models import Trace, database

    open_database(database_url)
    try:
        query = Trace.select(Trace.outcome, peewee.fn.COUNT(Trace.id).alias("n"))
        if route is not None:
            query = query.where(Trace.route_name == route)
        # The count comes back as an extra attribute of each row, unknown to the model.
        rows: Any = query.group_by(Trace.outcome)
        counts = {row.outcome: int(row.n) for row in rows}
    finally:
        database.close()
    counts["total"] = sum(counts.values())
    return counts


def overhead_column(database_url: str, route: str, limit: int) -> list[float]:
    """The last ``limit`` traces' ``overhead_ms`` for a route (what the header said)."""
    from tvgate.db import open_database
    from tvgate.models import Trace, database

    open_database(database_url)
    try:
        query = (
            Trace.select(Trace.overhead_ms)
            .where(Trace.route_name == route)
            .order_by(Trace.received_at.desc())
            .limit(limit)
        )
        return [float(row.overhead_ms) for row in query]
    finally:
        database.close()


# --- processes ---

#: The writer's last line: ``written=N dropped=N <reason>=N… failures=N restarts=N peak_depth=N``.
_WRITER_STATS = re.compile(
    r"trace writer stopped: written=(\d+) dropped=(\d+) .*?failures=(\d+) (?:restarts=\d+ )?"
    r"peak_depth=(\d+)"
)


@dataclass
class WriterStats:
    written: int = 0
    dropped: int = 0
    failures: int = 0
    peak_depth: int = 0
    queue_full_errors: int = 0


@dataclass
class TvgateProcess:
    """A running ``tvgate serve``."""

    url: str
    database_url: str
    token: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> WriterStats:
        """Stop it (SIGTERM: it drains its trace queue) and read the writer's counters."""
        stop(self.proc, timeout=60)
        stats = WriterStats()
        text = self.log_path.read_text(errors="replace")
        for line in text.splitlines():
            try:
                msg = json.loads(line).get("msg", "")
            except ValueError:
                continue
            found = _WRITER_STATS.search(msg)
            if found:
                stats.written, stats.dropped, stats.failures, stats.peak_depth = map(
                    int, found.groups()
                )
            elif "trace queue full" in msg:
                stats.queue_full_errors += 1
        return stats

    def errors_logged(self) -> list[str]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("error", "critical"):
                lines.append(str(entry.get("msg")))
        return lines


def start_tvgate(
    database_url: str,
    token: str,
    data_dir: Path,
    name: str,
    *,
    tree: Path = harness.ROOT,
    settings: dict[str, str] | None = None,
) -> TvgateProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = harness.serve_env(
        database_url,
        data_dir,
        0,
        MASTER_KEY,
        # Every connection of the load generators comes from 127.0.0.1 (1,000 at once
        # in the drip workload): the per-address cap is for clients, not for them.
        **{
            "TVGATE_MAX_CONNECTIONS_PER_ADDRESS": "0",
            **{"TVGATE_" + k.upper(): v for k, v in (settings or {}).items()},
        },
    )
    log_path = data_dir / f"{name}.log"
    log_path.unlink(missing_ok=True)  # the writer's counters are read from it at the end
    proc = harness.start_gateway(env, log_path, tree)
    url = "http://" + env["TVGATE_LISTEN"]
    return TvgateProcess(url, database_url, token, proc, log_path, env)


def start_bare(upstream: str, log_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_proxy", "--port", str(port), "--upstream", upstream],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_port(port, proc, log_path)
    return f"http://127.0.0.1:{port}", proc


def wait_traces(database_url: str, expected: int, timeout: float = 60.0) -> dict[str, int]:
    """Trace counts once ``total`` reaches ``expected`` or stops growing for 2 s."""
    deadline = time.monotonic() + timeout
    last = -1
    steady_since = time.monotonic()
    while True:
        counts = trace_counts(database_url)
        if counts["total"] >= expected:
            return counts
        if counts["total"] != last:
            last = counts["total"]
            steady_since = time.monotonic()
        elif time.monotonic() - steady_since > 2.0 or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)
