"""The Gateway: every long-lived service of one tvgate process, built once, stopped once.

Handlers reach these through ``BaseHandler`` properties; the CLI builds only
the parts it needs. Nothing here runs per request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peewee
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.ioloop import IOLoop, PeriodicCallback

from tvgate import services
from tvgate.config import Settings
from tvgate.db import DatabaseRunner, migrate, open_database
from tvgate.identity.authenticator import Authenticator
from tvgate.identity.jwt_issuer import JWTAuthenticator
from tvgate.identity.sessions import Throttle
from tvgate.identity.tokens import ProxyTokenAuthenticator
from tvgate.identity.visdom import VisdomAuthenticator, VisdomClient
from tvgate.keyring import Keyring, PlaintextCache, build_keyring
from tvgate.routing import OrgSnapshot, Router, snapshot_key_refs
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
    _sweeper: PeriodicCallback | None = None
    _unsubscribe: Callable[[], None] | None = None

    @classmethod
    def build(cls, settings: Settings) -> Gateway:
        """Open the database (migrating it), the keyring, and the caches. Call on the IOLoop."""
        db = open_database(settings.resolved_database_url)
        migrate(db)
        runner = DatabaseRunner(db)
        keyring = build_keyring(settings)
        # Tornado switches curl to verbose mode when this logger is at DEBUG, and curl's
        # verbose output prints every request header: the provider key in x-api-key or
        # Authorization. Never let it run, whatever the log level (the canary test).
        logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)
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
        self._watch_keys()

    def _watch_keys(self) -> None:
        """Keep plaintexts in memory no longer than needed.

        A key changed through the services in this process (the API, the UI) is dropped at
        once, with its org's route snapshot. A key changed elsewhere (the CLI, another
        gateway) is dropped when the snapshot refresh no longer carries its ciphertext.
        Expired plaintexts are swept, not kept until the next lookup.
        """
        loop = IOLoop.current()
        loop_thread = threading.get_ident()

        def key_changed(org_id: int, key_id: int) -> None:
            def drop() -> None:
                self.keys.forget(key_id)
                self.router.invalidate(org_id)

            if threading.get_ident() == loop_thread:
                drop()
            else:
                loop.add_callback(drop)

        def reloaded(previous: OrgSnapshot | None, snapshot: OrgSnapshot) -> None:
            if previous is not None:
                for key_id, ciphertext in snapshot_key_refs(previous) - snapshot_key_refs(snapshot):
                    self.keys.forget_version(key_id, ciphertext)

        self._unsubscribe = services.on_key_change(key_changed)
        self.router.on_reload = reloaded
        period = max(1.0, min(self.settings.key_cache_ttl, 60.0))

        def sweep() -> None:
            self.keys.sweep()

        self._sweeper = PeriodicCallback(sweep, period * 1000)
        self._sweeper.start()

    async def _purge(self) -> None:
        """Retention, hourly, in the pool (several processes purging at once is harmless)."""
        try:
            await self.runner.run(purge_all)
        except Exception:
            log.exception("retention purge failed")

    def stop(self) -> None:
        """Flush traces and release connections. Call after the listeners are closed."""
        for timer in (self._token_flusher, self._purger, self._sweeper):
            if timer is not None:
                timer.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.sink is not None:
            self.sink.stop()
        self.router.stop()
        self.http.close()
        self.traces.stop()
        self.runner.close()
