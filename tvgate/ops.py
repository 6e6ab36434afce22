"""Operations endpoints: ``/healthz`` (alive), ``/readyz`` (can serve) and ``/metrics`` (Prometheus).

``/healthz`` answers as long as the IOLoop turns, and says which worker
process answered. ``/readyz`` asks the database, the keyring, the token store
and Visdom Trace (when configured), each with a timeout, and says which one
is not ready; a load balancer takes the VM out of rotation on 503, which
Visdom Trace alone never causes. It also tells how the trace writer is (not
ready when its process or thread has stopped, or while it holds traces in memory that
neither the database nor the spool took), whether the spool fails, and how
many traces it could not write.
``/metrics`` renders this
process's registry (``tvgate.metrics``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from tvgate.db import DatabaseUnavailable
from tvgate.identity import IdentityUnavailable
from tvgate.keyring import KeyringUnavailable
from tvgate.metrics import CONTENT_TYPE
from tvgate.models import Org
from tvgate.web import BaseHandler

#: Seconds each readiness check may take before it counts as unavailable.
CHECK_TIMEOUT = 5.0
#: The checks that decide readiness; the others (Visdom Trace) are only reported.
REQUIRED_CHECKS = ("database", "keyring", "identity")


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(
            orjson.dumps({"status": "ok", "worker": self.gateway.worker, "pid": os.getpid()})
        )


async def _check(probe: Callable[[], Awaitable[Any]]) -> str:
    try:
        await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"unavailable: {_what_is_wrong(exc)}"
    return "ok"


def _what_is_wrong(exc: Exception) -> str:
    """A failed check's reason in words. ``/readyz`` answers anyone who can reach it: the
    keyring's and the identity checks' messages are written to hold no secret and are
    shown; the database's (which may name hosts and users) are not."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {CHECK_TIMEOUT:g} s"
    if isinstance(exc, KeyringUnavailable | IdentityUnavailable):
        return str(exc) or type(exc).__name__
    if isinstance(exc, DatabaseUnavailable):
        return "the database does not answer"
    return f"the check failed ({type(exc).__name__})"


class ReadyHandler(BaseHandler):
    """Ready when the database, the keyring and the token store answer and the trace writer
    runs with nothing held in memory only; says which does not.

    Visdom Trace is reported too but does not decide readiness: while it is down, tokens
    minted by tvgate and the principals cached from it still work, and taking every
    gateway out of the load balancer would stop those as well.
    """

    async def get(self) -> None:
        gateway = self.gateway
        loop = asyncio.get_running_loop()

        def database() -> Awaitable[Any]:
            return gateway.runner.run(lambda: Org.select().limit(1).count())

        def keyring() -> Awaitable[Any]:
            return loop.run_in_executor(gateway.runner.executor, gateway.keyring.check)

        def identity() -> Awaitable[None]:
            return gateway.auth.proxy_tokens.check()

        probes: dict[str, Callable[[], Awaitable[Any]]] = {
            "database": database,
            "keyring": keyring,
            "identity": identity,
        }
        if gateway.visdom is not None:
            probes["visdom"] = gateway.visdom.check
        results = await asyncio.gather(*(_check(p) for p in probes.values()))
        checks = dict(zip(probes, results, strict=True))
        traces = gateway.traces
        # A gateway whose calls are no longer recorded (or only in memory, where a crash or
        # a long outage loses them) must leave the rotation.
        ready = (
            all(checks[name] == "ok" for name in REQUIRED_CHECKS)
            and traces.running
            and not traces.held
        )
        writer = {
            "running": traces.running,
            "restarts": traces.stats.restarts,
            "spool": traces.spool_size,
            "spool_error": traces.stats.spool_error,
            "held": traces.held,
            "dead_letter": traces.stats.dead_letters,
            "held_bodies": traces.held_bodies,
            "dropped": traces.stats.dropped_by,
        }
        self.set_status(200 if ready else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(
            orjson.dumps(
                {"ready": ready, "checks": checks, "trace_writer": writer, "worker": gateway.worker}
            )
        )


class MetricsHandler(BaseHandler):
    """This process's metrics in the Prometheus text format."""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.set_header("Cache-Control", "no-store")
        self.finish(self.gateway.metrics.render())


default_handlers = [
    ("/healthz", HealthHandler),
    ("/readyz", ReadyHandler),
    ("/metrics", MetricsHandler),
]

#: What the per-worker metrics listener (``metrics_listen``) serves.
metrics_handlers: list[Any] = [
    ("/metrics", MetricsHandler),
    ("/healthz", HealthHandler),
]
