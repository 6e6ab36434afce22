"""The Gateway: every long-lived service of one tvgate process, built once, stopped once.

Handlers reach these through ``BaseHandler`` properties; the CLI builds only
the parts it needs. Nothing here runs per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import peewee
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.ioloop import PeriodicCallback

from tvgate.config import Settings
from tvgate.db import DatabaseRunner, migrate, open_database
from tvgate.identity.authenticator import Authenticator
from tvgate.identity.jwt_issuer import JWTAuthenticator
from tvgate.identity.sessions import Throttle
from tvgate.identity.tokens import ProxyTokenAuthenticator
from tvgate.identity.visdom import VisdomAuthenticator, VisdomClient
from tvgate.keyring import Keyring, PlaintextCache, build_keyring
from tvgate.routing import Router
from tvgate.traces.retention import purge_all
from tvgate.traces.sink import PushSink
from tvgate.traces.writer import TraceWriter

log = logging.getLogger("tvgate")


@dataclass
class Gateway:
    settings: Settings
    db: peewee.Database
    runner: DatabaseRunner
    keyring: Keyring
    keys: PlaintextCache
    auth: Authenticator
    visdom: VisdomClient | None
    router: Router
    traces: TraceWriter
    http: CurlAsyncHTTPClient
    login_throttle: Throttle
    sink: PushSink | None = None
    _token_flusher: PeriodicCallback | None = None
    _purger: PeriodicCallback | None = None

    @classmethod
    def build(cls, settings: Settings) -> Gateway:
        """Open the database (migrating it), the keyring, and the caches. Call on the IOLoop."""
        db = open_database(settings.resolved_database_url)
        migrate(db)
        runner = DatabaseRunner(db)
        keyring = build_keyring(settings)
        # Peewee connections are per thread, so the writer thread has its own.
        writer = TraceWriter(
            db,
            keyring,
            queue_size=settings.trace_queue_size,
            batch_size=settings.trace_batch_size,
            spool_path=Path(settings.data_dir) / "traces.spool",
            settings_ttl=settings.cache_ttl,
        )
        http = CurlAsyncHTTPClient(
            max_clients=settings.max_clients,
            # Responses are streamed to the client, never buffered whole; this only bounds
            # what Tornado would hold if a body were buffered.
            max_body_size=settings.max_body_bytes,
            force_instance=True,
        )
        visdom = VisdomClient(settings.visdom_url) if settings.visdom_url else None
        auth = Authenticator(
            ProxyTokenAuthenticator(runner, settings.cache_ttl),
            VisdomAuthenticator(
                visdom,
                runner,
                ttl=settings.visdom_cache_ttl,
                negative_ttl=settings.visdom_negative_ttl,
                pinned_org=settings.pinned_org,
            )
            if visdom is not None
            else None,
            JWTAuthenticator(settings, runner) if settings.jwt_issuer else None,
            settings.pinned_org,
        )
        gateway = cls(
            settings=settings,
            db=db,
            runner=runner,
            keyring=keyring,
            keys=PlaintextCache(keyring, runner.executor, settings.key_cache_ttl),
            auth=auth,
            visdom=visdom,
            router=Router(runner, settings.cache_ttl),
            traces=writer,
            http=http,
            login_throttle=Throttle(settings.login_attempts),
            sink=PushSink(settings, runner) if settings.sink_url else None,
        )
        return gateway

    def start(self) -> None:
        self.traces.start()
        self.router.start()
        self._token_flusher = PeriodicCallback(self.auth.proxy_tokens.flush_last_used, 30_000)
        self._token_flusher.start()
        self._purger = PeriodicCallback(self._purge, 3600_000)
        self._purger.start()
        if self.sink is not None:
            self.sink.start()

    async def _purge(self) -> None:
        """Retention, hourly, in the pool (several processes purging at once is harmless)."""
        try:
            await self.runner.run(purge_all)
        except Exception:
            log.exception("retention purge failed")

    def stop(self) -> None:
        """Flush traces and release connections. Call after the listeners are closed."""
        for timer in (self._token_flusher, self._purger):
            if timer is not None:
                timer.stop()
        if self.sink is not None:
            self.sink.stop()
        self.router.stop()
        self.http.close()
        self.traces.stop()
        self.runner.close()
