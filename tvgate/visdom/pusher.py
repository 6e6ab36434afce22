"""The Visdom pusher: delivers each connected org's outbox to Visdom Trace, off the
request path, one process per org at a time (a lease in the org's ``VisdomSink`` row).

Every ``visdom_push_interval`` seconds, for each connected org whose lease it gets, a
process makes the events of the traces written since the org's cursor
(:func:`tvgate.visdom.outbox.plan`) and POSTs the outbox, oldest first, one event per
request with the org ingest key as Bearer. The answer decides:

* 2xx: delivered, the row is deleted (a crash before that resends it: at least once,
  deduplicated by Visdom Trace on chunk index and ``event_uuid``);
* 429, 5xx, a timeout or Visdom Trace away: the org's round stops and is retried with
  exponential backoff (1 s doubling to :data:`MAX_BACKOFF`), from the same event, so
  each session stays in order;
* another 4xx: the event is parked with its error (``tvgate visdom status``), and the
  later events of its session wait behind it until an admin reconnects.

``outcomes`` counts each (the ``tvgate_visdom_events_total`` metric).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter

from tornado.httpclient import HTTPRequest

from tvgate.config import Settings
from tvgate.db import DatabaseRunner
from tvgate.keyring import Keyring
from tvgate.models import VisdomEvent, VisdomSink
from tvgate.services.visdom import ingest_context
from tvgate.traces.sink import PeriodicPusher
from tvgate.visdom import outbox

log = logging.getLogger("tvgate.visdom")

MAX_BACKOFF = 30.0
#: Outcomes counted, in the order the metric lists them.
OUTCOMES = ("sent", "retried", "parked")
#: Rounds of planning per org and tick, so one org's backlog does not hold the others.
_PLANS_PER_TICK = 10


class _Retry(Exception):
    """Visdom Trace did not take an event now; the org's round stops and backs off."""


class VisdomPusher(PeriodicPusher):
    def __init__(self, settings: Settings, runner: DatabaseRunner, keyring: Keyring) -> None:
        super().__init__(settings.visdom_push_interval)
        self.settings = settings
        self.runner = runner
        self.keyring = keyring
        self.outcomes: Counter[str] = Counter({name: 0 for name in OUTCOMES})
        #: org id -> (backoff seconds, monotonic time of the next try).
        self._backoff: dict[int, tuple[float, float]] = {}

    async def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            orgs = await self.runner.run(outbox.connected_orgs)
            for org_id in orgs:
                backoff, retry_at = self._backoff.get(org_id, (0.0, 0.0))
                if time.monotonic() < retry_at:
                    continue
                try:
                    await self._push_org(org_id)
                    self._backoff.pop(org_id, None)
                except Exception as exc:  # noqa: BLE001 - retried; it must never stop the gateway
                    backoff = min(MAX_BACKOFF, max(1.0, backoff * 2))
                    self._backoff[org_id] = (backoff, time.monotonic() + backoff)
                    log.warning(
                        "visdom push for org %d: %s; retrying in %.0f s", org_id, exc, backoff
                    )
        except Exception as exc:  # noqa: BLE001 - the database away: the next tick tries again
            log.warning("visdom push: %s", exc)
        finally:
            self._busy = False

    async def _push_org(self, org_id: int) -> None:
        now = time.time()
        sink = await self.runner.run(lambda: outbox.take_lease(org_id, self.holder, now))
        if sink is None:
            return
        idle = self.settings.visdom_idle_timeout
        for _ in range(_PLANS_PER_TICK):
            made = await self.runner.run(lambda: outbox.plan(org_id, self.holder, now, idle))
            if made < outbox.PLAN_BATCH:
                break
        key = ""
        after = 0
        while True:
            events = await self.runner.run(functools.partial(outbox.next_events, org_id, after))
            if not events:
                return
            if not key:
                # Only for a round that sends (a Vault keyring asks Vault each time).
                key = await self.runner.run(
                    functools.partial(self.keyring.decrypt, sink.ciphertext, ingest_context(org_id))
                )
            parked_sessions: set[str] = set()
            done: list[int] = []
            try:
                for event in events:
                    after = event.id
                    if event.session_id in parked_sessions:
                        continue
                    outcome, error = await self._send(sink, key, event)
                    if outcome == "sent":
                        self.outcomes["sent"] += 1
                        done.append(event.id)
                    elif outcome == "parked":
                        parked_sessions.add(event.session_id)
                        parked = await self.runner.run(
                            functools.partial(outbox.park, org_id, event.id, error, sink.ciphertext)
                        )
                        if parked:
                            self.outcomes["parked"] += 1
                            log.warning(
                                "visdom event %d of org %d parked: %s", event.id, org_id, error
                            )
                    else:
                        self.outcomes["retried"] += 1
                        await self.runner.run(
                            functools.partial(outbox.failed, org_id, event.id, error)
                        )
                        raise _Retry(error)
            finally:
                await self.runner.run(
                    functools.partial(outbox.delivered, org_id, done, time.time())
                )
            # Still ours? (A long round must not outlive its lease unseen.)
            renewed = await self.runner.run(
                lambda: outbox.take_lease(org_id, self.holder, time.time())
            )
            if renewed is None:
                return
            if renewed.ciphertext != sink.ciphertext:
                key = ""  # reconnected meanwhile: the new key
            sink = renewed

    async def _send(self, sink: VisdomSink, key: str, event: VisdomEvent) -> tuple[str, str]:
        """POST one event: its outcome (sent, parked or retried) and the error, if any."""
        target = outbox.stream_target(sink, event.repo)
        if target is None:
            return "parked", "the session has no repo (x-tracevault-repo) and the org no --project"
        url, headers = target
        request = HTTPRequest(
            url,
            method="POST",
            body=bytes(event.body),
            headers={
                **headers,
                "Content-Type": "application/json",
                "Authorization": f"Bearer {key}",
            },
            connect_timeout=10,
            request_timeout=30,
            follow_redirects=False,
        )
        try:
            response = await self.http.fetch(request, raise_error=False)
        except Exception as exc:  # noqa: BLE001 - away, refused, reset: all retried
            return "retried", f"Visdom Trace unreachable: {type(exc).__name__}: {exc}"
        code = response.code
        if 200 <= code < 300:
            return "sent", ""
        text = (response.body or b"")[:300].decode("utf-8", errors="replace")
        error = f"Visdom Trace answered {code}: {text}"
        if code == 429 or code >= 500:
            return "retried", error
        return "parked", error
