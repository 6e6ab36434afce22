"""The Gateway: every long-lived service of one tvgate process, built once, stopped once.

Handlers reach these through ``BaseHandler`` properties; the CLI builds only
the parts it needs. Nothing here runs per request. It also owns what a
graceful stop and a reload need: the count of proxy calls in flight and the
list of settings that can change while the process runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import peewee
from tornado.curl_httpclient import CurlAsyncHTTPClient

from tvgate.config import Settings
from tvgate.db import DatabaseRunner, migrate, open_database
from tvgate.identity.tokens import ProxyTokenAuthenticator
from tvgate.keyring import Keyring, PlaintextCache, build_keyring
from tvgate.metrics import Metrics
from tvgate.routing import Router
from tvgate.traces.writer import TraceWriter

log = logging.getLogger("tvgate")

#: Settings a SIGHUP applies to a running process. Everything else (listen,
#: database, keyring, workers, queue sizes, max_clients) is built once at start
#: and needs a restart; a reload that changes one of those says so in the log.
RELOADABLE_SETTINGS = (
    "log_level",
    "cache_ttl",
    "key_cache_ttl",
    "connect_timeout",
    "idle_timeout",
    "max_body_bytes",
    "client_buffer_bytes",
    "drain_timeout",
)


class InFlight:
    """Proxy calls in progress in this process, so that a stop can wait for them."""

    def __init__(self) -> None:
        self.count = 0

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight or ``timeout`` seconds pass; True when idle."""
        deadline = time.monotonic() + timeout
        # Polling only runs during a stop, never on the request path.
        while self.count > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.count <= 0


@dataclass
class Gateway:
    settings: Settings
    db: peewee.Database
    runner: DatabaseRunner
    keyring: Keyring
    keys: PlaintextCache
    tokens: ProxyTokenAuthenticator
    router: Router
    traces: TraceWriter
    http: CurlAsyncHTTPClient
    metrics: Metrics = field(default_factory=Metrics)
    inflight: InFlight = field(default_factory=InFlight)
    #: Index of this worker process (0 when there is one process).
    worker: int = 0

    @classmethod
    def build(cls, settings: Settings, worker: int = 0) -> Gateway:
        """Open the database (migrating it), the keyring, and the caches. Call on the IOLoop."""
        db = open_database(settings.resolved_database_url)
        migrate(db)
        runner = DatabaseRunner(db)
        keyring = build_keyring(settings)
        # Peewee connections are per thread, so the writer thread has its own.
        writer = TraceWriter(
            db,
            queue_size=settings.trace_queue_size,
            batch_size=settings.trace_batch_size,
        )
        http = CurlAsyncHTTPClient(
            max_clients=settings.max_clients,
            # Responses are streamed to the client, never buffered whole; this only bounds
            # what Tornado would hold if a body were buffered.
            max_body_size=settings.max_body_bytes,
            force_instance=True,
        )
        gateway = cls(
            settings=settings,
            db=db,
            runner=runner,
            keyring=keyring,
            keys=PlaintextCache(keyring, runner.executor, settings.key_cache_ttl),
            tokens=ProxyTokenAuthenticator(runner, settings.cache_ttl),
            router=Router(runner, settings.cache_ttl),
            traces=writer,
            http=http,
            metrics=Metrics(worker),
            worker=worker,
        )
        gateway._export_metrics()
        return gateway

    def _export_metrics(self) -> None:
        metrics, traces, inflight = self.metrics, self.traces, self.inflight
        metrics.sample(
            "tvgate_requests_in_flight",
            "Proxy calls in progress (streaming or not); a stop waits for them.",
            lambda: inflight.count,
        )
        metrics.sample(
            "tvgate_trace_queue_depth",
            "Traces waiting for the writer thread.",
            lambda: traces.depth,
        )
        metrics.sample(
            "tvgate_traces_written_total",
            "Traces written to the database.",
            lambda: traces.written,
            kind="counter",
        )
        metrics.sample(
            "tvgate_traces_dropped_total",
            "Traces lost: the queue was full, or the database was unreachable at stop.",
            lambda: traces.dropped,
            kind="counter",
        )
        metrics.sample(
            "tvgate_trace_write_failures_total",
            "Trace batches that failed to write and were retried.",
            lambda: traces.failures,
            kind="counter",
        )

    def reload(self, new: Settings) -> list[str]:
        """Apply the reloadable settings of ``new``; returns the changed ones that need a restart."""
        current = self.settings
        for name in RELOADABLE_SETTINGS:
            value = getattr(new, name)
            if getattr(current, name) != value:
                log.info("reload: %s changed", name)
                setattr(current, name, value)
        logging.getLogger().setLevel(current.log_level.upper())
        self.tokens.ttl = current.cache_ttl
        self.keys.ttl = current.key_cache_ttl
        if self.router.ttl != current.cache_ttl:
            # The refresh period follows the TTL, so restart the refresher.
            self.router.stop()
            self.router.ttl = current.cache_ttl
            self.router.start()
        return [
            f.name
            for f in dataclasses.fields(new)
            if f.name not in RELOADABLE_SETTINGS
            and getattr(new, f.name) != getattr(current, f.name)
        ]

    def start(self) -> None:
        self.traces.start()
        self.router.start()

    def stop(self) -> None:
        """Flush traces and release connections. Call after the listeners are closed."""
        self.router.stop()
        self.http.close()
        self.traces.stop()
        self.runner.close()
