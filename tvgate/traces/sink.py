"""The push sink: batches of traces POSTed as JSON to a configured URL, signed, at least once.

Every ``sink_interval`` seconds one gateway process (the holder of a lease in
the ``sink_state`` row, so several processes and VMs do not send the same
batch) reads the traces written after its durable cursor, oldest first, and
POSTs them with ``X-Tvgate-Signature: sha256=<HMAC-SHA256 of timestamp.body>``
and ``X-Tvgate-Timestamp``. The cursor moves only after a 2xx answer; failures
are retried with exponential backoff. The cursor follows ``written_at``, with
a short lag for transactions of other processes still committing, so traces
written late (a spool replayed after an outage) are still sent. Receivers
deduplicate by trace id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import time
from typing import Any

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.ioloop import IOLoop, PeriodicCallback

from tvgate.config import Settings
from tvgate.db import DatabaseRunner
from tvgate.models import SinkState, Trace, User
from tvgate.services import trace_summary

log = logging.getLogger("tvgate.sink")

SINK = "default"
#: Traces written less than this long ago wait: another process may still be committing
#: a batch with an earlier written_at.
_LAG = 2.0
_LEASE = 30.0
_MAX_BACKOFF = 300.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def _take_lease(holder: str, now: float) -> tuple[float, str] | None:
    """Hold the sink's lease for a while; the cursor if this process may push now."""
    SinkState.insert(name=SINK).on_conflict_ignore().execute()
    taken = (
        SinkState.update(holder=holder, lease_until=now + _LEASE)
        .where(
            (SinkState.name == SINK)
            & ((SinkState.lease_until < now) | (SinkState.holder == holder))
        )
        .execute()
    )
    if not taken:
        return None
    state = SinkState.get_by_id(SINK)
    return state.cursor_at, state.cursor_id


def _batch_after(cursor: tuple[float, str], limit: int, now: float) -> list[Trace]:
    at, ident = cursor
    return list(
        Trace.select()
        .where(
            ((Trace.written_at > at) | ((Trace.written_at == at) & (Trace.id > ident)))
            & (Trace.written_at < now - _LAG)
        )
        .order_by(Trace.written_at, Trace.id)
        .limit(limit)
    )


def _documents(traces: list[Trace]) -> list[dict[str, Any]]:
    ids = {t.user_id for t in traces if t.user_id}
    emails = {u.id: u.email for u in User.select(User.id, User.email).where(User.id.in_(ids))}
    documents = []
    for trace in traces:
        document = trace_summary(trace, emails.get(trace.user_id or 0, ""))
        document["org_id"] = trace.org_id
        documents.append(document)
    return documents


def _advance(holder: str, trace: Trace) -> None:
    SinkState.update(cursor_at=trace.written_at, cursor_id=trace.id).where(
        (SinkState.name == SINK) & (SinkState.holder == holder)
    ).execute()


class PeriodicPusher:
    """What a pusher off the request path has: a round every ``interval`` seconds on the
    IOLoop (and one at start), an HTTP client of its own, a lease holder name."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.http = AsyncHTTPClient(force_instance=True)
        self._timer: PeriodicCallback | None = None
        self._busy = False

    async def _tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._timer = PeriodicCallback(self._tick, self.interval * 1000)
        self._timer.start()
        IOLoop.current().add_callback(self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.http.close()


class PushSink(PeriodicPusher):
    def __init__(self, settings: Settings, runner: DatabaseRunner) -> None:
        super().__init__(settings.sink_interval)
        self.settings = settings
        self.runner = runner
        self._backoff = 0.0
        self._retry_at = 0.0
        self.sent = 0
        self.failures = 0

    async def _tick(self) -> None:
        if self._busy or time.monotonic() < self._retry_at:
            return
        self._busy = True
        try:
            while await self._push_one_batch():
                pass
        except Exception as exc:  # noqa: BLE001 - the sink retries; it must never stop the gateway
            self.failures += 1
            self._backoff = min(_MAX_BACKOFF, max(1.0, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            log.warning("push sink: %s; retrying in %.0f s", exc, self._backoff)
        finally:
            self._busy = False

    async def _push_one_batch(self) -> bool:
        """Send one batch; True when a full batch went out (there may be more)."""
        now = time.time()
        cursor = await self.runner.run(lambda: _take_lease(self.holder, now))
        if cursor is None:
            return False
        limit = self.settings.sink_batch_size
        traces = await self.runner.run(lambda: _batch_after(cursor, limit, now))
        if not traces:
            return False
        documents = await self.runner.run(lambda: _documents(traces))
        body = orjson.dumps({"traces": documents})
        timestamp = str(int(time.time()))
        request = HTTPRequest(
            self.settings.sink_url,
            method="POST",
            body=body,
            headers={
                "Content-Type": "application/json",
                "X-Tvgate-Timestamp": timestamp,
                "X-Tvgate-Signature": sign(self.settings.sink_secret, timestamp, body),
            },
            connect_timeout=10,
            request_timeout=30,
            follow_redirects=False,
        )
        try:
            await self.http.fetch(request)
        except HTTPClientError as exc:
            raise RuntimeError(f"receiver answered {exc.code}") from None
        last = traces[-1]
        await self.runner.run(lambda: _advance(self.holder, last))
        self.sent += len(traces)
        self._backoff = 0.0
        return len(traces) == limit
