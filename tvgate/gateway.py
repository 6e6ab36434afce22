"""The Gateway: every long-lived service of one tvgate process, built once, stopped once.

Handlers reach these through ``BaseHandler`` properties; the CLI builds only
the parts it needs. Nothing here runs per request. What a graceful stop and a
reload need of it (the calls in flight, the settings a reload applies) is
``tvgate.lifecycle``'s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peewee
from tornado.ioloop import IOLoop, PeriodicCallback

from tvgate import services
from tvgate.config import Settings
from tvgate.db import DatabaseRunner, migrate, open_database
from tvgate.forwarded import Network, parse_networks
from tvgate.governance.governor import Governor
from tvgate.identity.authenticator import Authenticator
from tvgate.identity.jwt_issuer import JWTAuthenticator
from tvgate.identity.oidc import OIDCVerifier
from tvgate.identity.origin import OriginChecker
from tvgate.identity.sessions import AddressThrottle, LoginThrottle
from tvgate.identity.tokens import ProxyTokenAuthenticator
from tvgate.identity.visdom import VisdomAuthenticator, VisdomClient
from tvgate.keyring import (
    Keyring,
    KeyringError,
    KeyringSet,
    KeyringUnavailable,
    PlaintextCache,
    build_keyring,
)
from tvgate.keyring.local import LocalKeyring
from tvgate.keyring.vault import VaultKeyring
from tvgate.lifecycle import InFlight
from tvgate.metrics import Metrics
from tvgate.proxy.curl_client import UpstreamCurlClient
from tvgate.proxy.hops import deployment_id
from tvgate.routing import OrgSnapshot, Router, snapshot_key_refs
from tvgate.services.visdom import tenant_org_of
from tvgate.traces.client import WriterClient, WriterConfig
from tvgate.traces.retention import purge_all
from tvgate.traces.sink import PushSink
from tvgate.traces.writer import BODY_BUDGET
from tvgate.visdom.credentials import CredentialKeeper
from tvgate.visdom.pusher import VisdomPusher

log = logging.getLogger("tvgate")

#: Seconds between two looks at the keys the trace writer waits for.
WARM_INTERVAL = 1.0

#: Seconds between two looks at the org change counts (``tvgate.services.events``): a change
#: made in another process (the CLI, another worker or host) is in force within about this.
CHANGE_POLL_INTERVAL = 0.5

#: Seconds between two writes of when keys were last used (a key's "Last used" lags by
#: at most this; what a stop cuts short of it is lost, which only ages the time shown).
KEY_USE_FLUSH_INTERVAL = 5.0


class KeyUses:
    """When this process last sent each provider key upstream. The proxy notes a use in
    memory; ``flush`` writes them in one statement, from a timer, in the database pool."""

    def __init__(self, runner: DatabaseRunner) -> None:
        self.runner = runner
        #: Key id -> when it was last sent upstream, since the last flush.
        self._used: dict[int, float] = {}

    def record(self, key_id: int) -> None:
        self._used[key_id] = time.time()

    async def flush(self) -> None:
        if not self._used:
            return
        used, self._used = self._used, {}
        try:
            await self.runner.run(lambda: services.record_key_uses(used))
        except Exception as exc:  # noqa: BLE001 - kept for the next flush, not worth more
            log.warning("key last-used times not written (%s); trying again", type(exc).__name__)
            for key_id, at in used.items():
                # A use noted meanwhile is later than the one that was not written.
                self._used.setdefault(key_id, at)


@dataclass
class Gateway:
    settings: Settings
    db: peewee.Database
    runner: DatabaseRunner
    keyring: Keyring
    keys: PlaintextCache
    auth: Authenticator
    #: Re-checks tokens and web sessions made from a Visdom Trace sign-in.
    origins: OriginChecker
    visdom: VisdomClient | None
    router: Router
    traces: WriterClient
    http: UpstreamCurlClient
    login_throttle: LoginThrottle
    address_throttle: AddressThrottle
    governor: Governor
    key_uses: KeyUses
    sink: PushSink | None = None
    #: Delivers the traces of orgs connected to Visdom Trace (tvgate visdom connect).
    visdom_pusher: VisdomPusher | None = None
    _governance_syncer: PeriodicCallback | None = None
    _token_flusher: PeriodicCallback | None = None
    _key_use_flusher: PeriodicCallback | None = None
    _purger: PeriodicCallback | None = None
    _sweeper: PeriodicCallback | None = None
    _warmer: PeriodicCallback | None = None
    _change_poller: PeriodicCallback | None = None
    _unsubscribe: Callable[[], None] | None = None
    #: The org change counts at the last poll, by org id.
    _change_counts: dict[int, tuple[int, int]] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    inflight: InFlight = field(default_factory=InFlight)
    #: Index of this worker process (0 when there is one process).
    worker: int = 0
    #: The reverse proxies whose X-Forwarded-For is believed (``trusted_proxies``).
    trusted_proxies: tuple[Network, ...] = ()
    #: The loop mark of this deployment's upstream requests (``tvgate.proxy.hops``).
    hop_id: str = ""

    @classmethod
    def build(cls, settings: Settings, worker: int = 0) -> Gateway:
        """Open the database (migrating it), the keyring, and the caches. Call on the IOLoop."""
        db = open_database(settings.resolved_database_url)
        migrate(db)
        runner = DatabaseRunner(
            db, idle_timeout=settings.db_idle_timeout, max_age=settings.db_max_age
        )
        keyring = build_keyring(settings)
        keys = PlaintextCache(keyring, runner.executor, settings.key_cache_ttl)
        # Tornado switches curl to verbose mode when this logger is at DEBUG, and curl's
        # verbose output prints every request header: the provider key in x-api-key or
        # Authorization. Never let it run, whatever the log level (the canary test).
        logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)
        # The trace writer is a process of its own (tvgate.traces.child): its batches
        # never take this process's GIL from the IOLoop.
        local = keyring.readers.get("local") if isinstance(keyring, KeyringSet) else None
        writer = WriterClient(
            WriterConfig(
                database_url=settings.resolved_database_url,
                spool_dir=str(Path(settings.data_dir)),
                worker=worker,
                queue_size=settings.trace_queue_size,
                batch_size=settings.trace_batch_size,
                settings_ttl=settings.cache_ttl,
                body_budget=BODY_BUDGET,
                db_idle_timeout=settings.db_idle_timeout,
                db_max_age=settings.db_max_age,
                log_level=settings.log_level,
                otlp_endpoint=settings.otlp_endpoint,
                otlp_headers=settings.otlp_headers,
                otlp_timeout=settings.otlp_timeout,
            ),
            keys,
            local if isinstance(local, LocalKeyring) else None,
        )
        # Provider calls only: it streams every response through the caller's callbacks
        # and never buffers a body, so it takes no max_body_size.
        http = UpstreamCurlClient(max_clients=settings.max_clients, force_instance=True)
        visdom = (
            VisdomClient(
                settings.visdom_url,
                tenant_org=settings.pinned_org,
                # Without a pinned org: the one org connected to this server's ingestion.
                tenant_lookup=lambda: runner.run(lambda: tenant_org_of(settings.visdom_url)),
            )
            if settings.visdom_url
            else None
        )
        visdom_auth = (
            VisdomAuthenticator(
                visdom,
                runner,
                ttl=settings.visdom_cache_ttl,
                negative_ttl=settings.visdom_negative_ttl,
                pinned_org=settings.pinned_org,
                # A single-tenant server's Keycloak sign-in, learnt from the server itself.
                oidc=OIDCVerifier(settings.visdom_url, settings),
                keeper=CredentialKeeper(runner, keyring),
            )
            if visdom is not None
            else None
        )
        origins = OriginChecker(visdom_auth, runner, keyring, settings.visdom_cache_ttl)
        auth = Authenticator(
            ProxyTokenAuthenticator(runner, settings.cache_ttl, origins),
            visdom_auth,
            JWTAuthenticator(settings, runner) if settings.jwt_issuer else None,
            settings.pinned_org,
        )
        gateway = cls(
            settings=settings,
            db=db,
            runner=runner,
            keyring=keyring,
            keys=keys,
            auth=auth,
            origins=origins,
            visdom=visdom,
            router=Router(runner, settings.cache_ttl),
            traces=writer,
            http=http,
            login_throttle=LoginThrottle(settings.login_attempts),
            address_throttle=AddressThrottle(settings.login_attempts_per_address),
            governor=Governor(
                runner,
                sync_interval=settings.governance_sync_interval,
                queue_timeout=settings.queue_timeout,
                gateway_cap=settings.max_concurrent_calls,
                prices_ttl=settings.cache_ttl,
            ),
            key_uses=KeyUses(runner),
            sink=PushSink(settings, runner) if settings.sink_url else None,
            visdom_pusher=VisdomPusher(settings, runner, keyring),
            metrics=Metrics(worker),
            worker=worker,
            trusted_proxies=parse_networks(settings.trusted_proxies),
            hop_id=deployment_id(db),
        )
        gateway._export_metrics()
        return gateway

    def _export_metrics(self) -> None:
        metrics, traces, inflight, governor = (
            self.metrics,
            self.traces,
            self.inflight,
            self.governor,
        )
        metrics.price = governor.cost
        metrics.priced = lambda: governor.prices_read
        if self.visdom_pusher is not None:
            outcomes = self.visdom_pusher.outcomes
            metrics.sample_by(
                "tvgate_visdom_events_total",
                "Events this process tried to deliver to Visdom Trace, by outcome: sent, "
                "retried (429, 5xx, timeout, unreachable: tried again with backoff) or parked "
                "(another 4xx: held until an admin reconnects; tvgate visdom status).",
                "outcome",
                lambda: dict(outcomes),
                kind="counter",
            )
            sent_with = self.visdom_pusher.sent_with
            metrics.sample_by(
                "tvgate_visdom_sent_total",
                "Events this process delivered to Visdom Trace, by the credential they went "
                "with: user (the user's own Visdom Trace token) or org (the org ingest key).",
                "credential",
                lambda: dict(sent_with),
                kind="counter",
            )
        metrics.sample(
            "tvgate_sink_backlog",
            "Traces sent to the trace writer process and not yet in the database or the spool "
            "(not acknowledged): what a kill -9 of the writer would have it resend.",
            lambda: traces.backlog,
        )
        metrics.sample(
            "tvgate_otlp_spans_dropped_total",
            "Spans of written traces the OTLP exporter did not deliver: the export failed "
            "after its retries, its queue was full, or a stop's wait ran out.",
            lambda: traces.stats.otlp_dropped,
            kind="counter",
        )
        metrics.sample(
            "tvgate_governance_refused_total",
            "Calls refused (429) by a budget, a rate limit or a concurrency cap.",
            lambda: governor.refused,
            kind="counter",
        )
        metrics.sample(
            "tvgate_concurrency_slots_held",
            "Concurrency slots this process holds on capped keys and the gateway cap.",
            lambda: sum(governor.slots.held.values()),
        )
        metrics.sample(
            "tvgate_requests_in_flight",
            "Proxy calls in progress (streaming or not); a stop waits for them.",
            lambda: inflight.count,
        )
        metrics.sample(
            "tvgate_trace_queue_depth",
            "Traces sent to the trace writer process and not taken by it yet.",
            lambda: traces.depth,
        )
        metrics.sample(
            "tvgate_traces_written_total",
            "Traces written to the database.",
            lambda: traces.stats.written,
            kind="counter",
        )
        metrics.sample(
            "tvgate_capture_body_bytes_total",
            "Request body bytes stored with traces.",
            lambda: traces.capture_stored_bytes,
            kind="counter",
        )
        metrics.sample(
            "tvgate_capture_scanned_bytes_total",
            "Of those, the bytes redacted, cut and hashed; the rest continued a conversation's "
            "previous body.",
            lambda: traces.capture_scanned_bytes,
            kind="counter",
        )
        metrics.sample(
            "tvgate_trace_spool_size",
            "Traces waiting in the spool file for the database to come back.",
            lambda: traces.spool_size,
        )
        metrics.sample(
            "tvgate_trace_held",
            "Traces in memory only: the spool could not be written while the database was "
            "away; they go to whichever comes back first.",
            lambda: traces.held,
        )
        metrics.sample(
            "tvgate_trace_spool_errors_total",
            "Spool writes that failed (a full or read-only disk).",
            lambda: traces.stats.spool_errors,
            kind="counter",
        )
        metrics.sample(
            "tvgate_traces_spooled_total",
            "Traces written to the spool while the database was unreachable.",
            lambda: traces.stats.spooled,
            kind="counter",
        )
        metrics.sample_by(
            "tvgate_traces_dropped_total",
            "Traces not in the database, by reason: the queue was full; the database refused "
            "the row even alone (dead_letter: kept in the dead-letter file); neither the spool "
            "nor the database took them while more than the queue size was held in memory, or "
            "at stop (spool_error); the writer failed while holding them.",
            "reason",
            lambda: traces.stats.dropped_by,
            kind="counter",
        )
        metrics.sample(
            "tvgate_trace_dead_letter_size",
            "Traces in the dead-letter file (rows the database refused), also from before a "
            "restart.",
            lambda: traces.stats.dead_letters,
        )
        metrics.sample(
            "tvgate_trace_bodies_held",
            "Bodies held in memory until every provider key of their org is known in "
            "plaintext (to redact it); their traces are written already.",
            lambda: traces.held_bodies,
        )
        vault = self.keyring.readers.get("vault") if isinstance(self.keyring, KeyringSet) else None
        if isinstance(vault, VaultKeyring):
            vault_keyring = vault
            metrics.sample(
                "tvgate_keyring_timeouts_total",
                "Vault requests that timed out (each starts or prolongs a fail-fast period).",
                lambda: vault_keyring.timeouts,
                kind="counter",
            )
            metrics.sample(
                "tvgate_keyring_refused_fast_total",
                "Vault requests refused at once, unsent, while Vault did not answer.",
                lambda: vault_keyring.refused_fast,
                kind="counter",
            )
        metrics.sample(
            "tvgate_trace_writer_up",
            "1 while the trace writer process runs (and its writer thread).",
            lambda: 1 if traces.running else 0,
        )
        metrics.sample(
            "tvgate_trace_writer_raised_total",
            "Times the trace writer process, waiting behind the calls at SCHED_IDLE, was "
            "raised to SCHED_BATCH because its traces waited.",
            lambda: traces.raises,
            kind="counter",
        )
        metrics.sample(
            "tvgate_trace_writer_restarts_total",
            "Times the trace writer process died, or its loop failed, and was started again.",
            lambda: traces.stats.restarts,
            kind="counter",
        )
        metrics.sample(
            "tvgate_trace_write_failures_total",
            "Trace batches that failed to write and were retried.",
            lambda: traces.stats.failures,
            kind="counter",
        )

    def start(self) -> None:
        self.traces.start()
        self.router.start()
        self._governance_syncer = PeriodicCallback(
            self.governor.sync, self.settings.governance_sync_interval * 1000
        )
        self._governance_syncer.start()
        self._token_flusher = PeriodicCallback(self.auth.proxy_tokens.flush_last_used, 30_000)
        self._token_flusher.start()
        self._key_use_flusher = PeriodicCallback(self.key_uses.flush, KEY_USE_FLUSH_INTERVAL * 1000)
        self._key_use_flusher.start()
        self._purger = PeriodicCallback(self._purge, 3600_000)
        self._purger.start()
        if self.sink is not None:
            self.sink.start()
        if self.visdom_pusher is not None:
            self.visdom_pusher.start()
        self._watch_changes()
        self._watch_keys()

    def _watch_changes(self) -> None:
        """Drop what this process cached of an org as soon as the org changes.

        A change made through the services in this process (the API, the UI) is heard at
        once; one made elsewhere (the CLI, another worker or gateway) when the poll of the
        change counts sees its org's count move.
        """
        loop = IOLoop.current()
        loop_thread = threading.get_ident()

        def org_changed(change: services.OrgChanged) -> None:
            def drop() -> None:
                if change.key_id is not None:
                    self.keys.forget(change.key_id)
                self._forget_org(change.org_id, identities=change.identities)

            if threading.get_ident() == loop_thread:
                drop()
            else:
                # Queued before the service call's result, so it runs before the handler
                # that made the change answers.
                loop.add_callback(drop)

        self._unsubscribe = services.on_org_change(org_changed)
        self._change_poller = PeriodicCallback(self._poll_changes, CHANGE_POLL_INTERVAL * 1000)
        self._change_poller.start()

    def _forget_org(self, org_id: int, *, identities: bool) -> None:
        self.router.invalidate(org_id)
        self.traces.settings_changed(org_id)
        if identities:
            self.auth.forget_all()

    async def read_change_counts(self) -> None:
        """Read the change counts once before serving, so that the first poll forgets only
        the orgs changed since (not every org, and every cached identity, of a gateway that
        has just warmed its caches); when the database cannot be read, the first poll
        forgets every org, as a gateway that knows no counts must."""
        with contextlib.suppress(Exception):
            self._change_counts = await self.runner.run(services.change_counts)

    async def _poll_changes(self) -> None:
        """One read of the change counts, in the pool; an org whose counts moved since the
        last poll (every org at the first) is forgotten. Its own changes come back here
        too, which costs one more snapshot load per change."""
        try:
            # Twice a second whatever the traffic: not a use that keeps a connection open.
            counts = await self.runner.run(services.change_counts, keeps_alive=False)
        except Exception as exc:  # noqa: BLE001 - the next poll tries again; the TTL still holds
            log.debug("change counts not read: %s", exc)
            return
        seen, self._change_counts = self._change_counts, counts
        identities = False
        for org_id, count in counts.items():
            before = seen.get(org_id)
            if before != count:
                self._forget_org(org_id, identities=False)
                identities = identities or before is None or before[1] != count[1]
        if identities:
            self.auth.forget_all()

    def _watch_keys(self) -> None:
        """Keep plaintexts in memory no longer than needed.

        A key changed through the services in this process (the API, the UI) is dropped at
        once (``_watch_changes``). A key changed elsewhere (the CLI, another gateway) is
        dropped when the reloaded snapshot no longer carries its ciphertext. Expired
        plaintexts are swept, not kept until the next lookup.
        """

        def reloaded(previous: OrgSnapshot | None, snapshot: OrgSnapshot) -> None:
            if previous is not None:
                for key_id, ciphertext in snapshot_key_refs(previous) - snapshot_key_refs(snapshot):
                    self.keys.forget_version(key_id, ciphertext)

        self.router.on_reload = reloaded
        period = max(1.0, min(self.settings.key_cache_ttl, 60.0))

        def sweep() -> None:
            self.keys.sweep()

        self._sweeper = PeriodicCallback(sweep, period * 1000)
        self._sweeper.start()
        self._warmer = PeriodicCallback(self._warm_keys, WARM_INTERVAL * 1000)
        self._warmer.start()

    async def _warm_keys(self) -> None:
        """Decrypt, in the pool, the keys whose plaintext the trace writer waits for to
        redact an org's bodies (keys no call has used lately), so that it never decrypts
        (nor waits on the keyring) itself."""
        for ciphertext, context in self.traces.wanted_keys():
            try:
                await self.keys.get(ciphertext, context)
            except KeyringUnavailable:
                return  # the next tick tries again; a hung Vault refuses at once meanwhile
            except KeyringError:
                continue  # noted by the cache: the writer stops waiting for this key

    async def _purge(self) -> None:
        """Retention, hourly, in the pool (several processes purging at once is harmless)."""
        try:
            await self.runner.run(purge_all)
            await self.runner.run(self.governor.purge)
        except Exception:
            log.exception("retention purge failed")

    def stop(self) -> None:
        """Flush traces and release connections. Call after the listeners are closed."""
        for timer in (
            self._governance_syncer,
            self._token_flusher,
            self._key_use_flusher,
            self._purger,
            self._sweeper,
            self._warmer,
            self._change_poller,
        ):
            if timer is not None:
                timer.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.sink is not None:
            self.sink.stop()
        if self.visdom_pusher is not None:
            self.visdom_pusher.stop()
        self.router.stop()
        self.http.close()
        self.traces.stop()
        self.runner.close()
