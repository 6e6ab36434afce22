"""The Visdom pusher's database side: the per-org lease, turning traces into outbox
events with their sessions' state, and recording what delivery did. Synchronous (Peewee):
the pusher runs these in the database pool.

Events are made once, from the traces written after the org's durable cursor, in the
same transaction that stores them in the outbox (``VisdomEvent``), saves each session's
state (``VisdomSession``: transcript offset, open tool uses, totals) and moves the
cursor. So a restart, a crash or another process taking the lease over resumes exactly
where the last commit left: an event is never made twice (its chunk offsets and uuid
are fixed in the outbox) and never skipped. The cursor follows ``written_at`` with a
short lag for other processes' transactions still committing (as tvgate.traces.sink).

A session's calls are read in order: the worker processes and gateways each have their
own trace writer, so a session's next call (served by another worker) can be written
before the call before it; read first, it would put its turn ahead of the earlier one in
the transcript. So a call is read only once every live writer's watermark
(:mod:`tvgate.traces.watermark`) is past its end, and no trace written but not read yet
(past the lag, past this batch) ended before it. A writer that is slow, paused or cut
from the database holds every org's outbox back until it catches up or its watermark goes
stale (order over latency); ``tvgate visdom status`` shows what it waits for.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from urllib.parse import quote

import orjson
import peewee

from tvgate.models import Trace, VisdomEvent, VisdomSession, VisdomSink, database
from tvgate.rows import from_row
from tvgate.traces import watermark
from tvgate.traces.content import load_request
from tvgate.traces.store import BlobStore
from tvgate.visdom import credentials
from tvgate.visdom.events import CallRecord, SessionState, call_events, session_end
from tvgate.visdom.lines import cwd_of

#: Traces written less than this long ago wait: another process may still be committing.
LAG = 2.0
LEASE = 30.0
#: Traces turned into events per transaction.
PLAN_BATCH = 100
#: Events read for sending at once.
SEND_BATCH = 100
#: Characters of a refusal kept with a parked event.
ERROR_CHARS = 500


def connected_orgs() -> list[int]:
    return [row.org_id for row in VisdomSink.select(VisdomSink.org_id)]


def take_lease(org_id: int, holder: str, now: float) -> VisdomSink | None:
    """Hold the org's lease for a while; its sink row if this process may push now."""
    taken = (
        VisdomSink.update(holder=holder, lease_until=now + LEASE)
        .where(
            (VisdomSink.org_id == org_id)
            & ((VisdomSink.lease_until < now) | (VisdomSink.holder == holder))
        )
        .execute()
    )
    return VisdomSink.get_or_none(VisdomSink.org_id == org_id) if taken else None


def _session_of(trace: Trace) -> str:
    """The tool's session id; a call without one joins its user's session of the day."""
    if trace.session_id:
        return str(trace.session_id)
    day = datetime.fromtimestamp(trace.received_at, UTC).strftime("%Y%m%d")
    return f"tvgate-user-{trace.user_id or 0}-{day}"


def _record(trace: Trace, store: BlobStore) -> CallRecord:
    request = response = None
    cwd = ""
    captured = bool(trace.request_blob)
    if captured:
        try:
            raw = load_request(bytes.fromhex(trace.request_blob), store)
            cwd = cwd_of(raw)
            request = orjson.loads(raw)
            if trace.response_blob:
                response = orjson.loads(store.get(bytes.fromhex(trace.response_blob)))
        except (KeyError, ValueError):
            # Swept by retention, or not JSON: sent as a call whose bodies are not kept.
            captured, request, response = False, None, None
    return from_row(
        CallRecord,
        trace,
        trace_id=trace.id,
        session_id=_session_of(trace),
        model=trace.response_model or trace.upstream_model or trace.requested_model,
        request_id=trace.upstream_request_id,
        cwd=cwd,
        request=request,
        response=response,
        captured=captured,
    )


def _ended(trace: Trace) -> float:
    return float(trace.finished_at or trace.received_at)


def read_up_to(org_id: int, after: tuple[float, str], now: float) -> float:
    """Calls that ended before the time returned may be read now: every live writer has
    written them, and none of the org's traces after ``after`` (not read in this plan:
    within the lag, or past the batch) ended before it."""
    # The watermarks first: a trace they cover is committed, so the query below sees it.
    upto = watermark.written_before(now)
    at, ident = after
    later = (
        Trace.select(peewee.fn.MIN(peewee.fn.COALESCE(Trace.finished_at, Trace.received_at)))
        .where(
            (Trace.org_id == org_id)
            & ((Trace.written_at > at) | ((Trace.written_at == at) & (Trace.id > ident)))
        )
        .scalar()
    )
    return min(upto, later) if later is not None else upto


def _held_from(traces: list[Trace], upto: float) -> int:
    """Where the traces that wait start: at the first call that ended at or after
    ``upto`` (a call before it in its session may not be written yet), back to the start
    of its writer's batch (one ``written_at``: a batch is read whole, then in the order
    of the calls, never split by the order of its ids)."""
    for index, trace in enumerate(traces):
        if _ended(trace) >= upto:
            while index > 0 and traces[index - 1].written_at == trace.written_at:
                index -= 1
            return index
    return len(traces)


def plan(org_id: int, holder: str, now: float, idle_timeout: float) -> int:
    """Make the events of the org's next traces and the ``session_end`` of its idle
    sessions, in one transaction; the number of traces read (PLAN_BATCH: maybe more)."""
    sink = VisdomSink.get_or_none(VisdomSink.org_id == org_id)
    if sink is None:
        return 0
    at, ident = sink.cursor_at, sink.cursor_id
    traces = list(
        Trace.select()
        .where(
            (Trace.org_id == org_id)
            & ((Trace.written_at > at) | ((Trace.written_at == at) & (Trace.id > ident)))
            & (Trace.written_at < now - LAG)
        )
        .order_by(Trace.written_at, Trace.id)
        .limit(PLAN_BATCH)
    )
    last = (traces[-1].written_at, traces[-1].id) if traces else (at, ident)
    del traces[_held_from(traces, read_up_to(org_id, last, now)) :]
    store = BlobStore(org_id)
    records = [(trace, _record(trace, store)) for trace in traces]
    with database.atomic():
        # Still ours? Another process may have taken the lease over meanwhile.
        sink = VisdomSink.get_or_none((VisdomSink.org_id == org_id) & (VisdomSink.holder == holder))
        if sink is None or (sink.cursor_at, sink.cursor_id) != (at, ident):
            return 0
        sessions: dict[str, tuple[VisdomSession, SessionState]] = {}
        events: list[dict[str, object]] = []
        written: dict[str, float] = {}
        for trace, record in sorted(records, key=lambda pair: pair[1].received_at):
            sid = record.session_id
            if sid not in sessions:
                row = VisdomSession.get_or_none(
                    (VisdomSession.org_id == org_id) & (VisdomSession.session_id == sid)
                ) or VisdomSession(org_id=org_id, session_id=sid, repo=trace.repo)
                sessions[sid] = (row, SessionState.loads(row.state))
            row, state = sessions[sid]
            row.user_id = trace.user_id
            for event in call_events(record, state):
                events.append(_outbox_row(org_id, row, event))
            row.open = True
            written[sid] = max(written.get(sid, 0.0), trace.written_at)
        for row, state in sessions.values():
            row.state = state.dumps()
            # Idle from the later of its last call and the writing of its trace: a trace
            # written late (the writer's batches, a spool replayed) must not find its
            # session sealed by a wait that only the writing made.
            row.last_at = max(state.last_at, written.get(row.session_id, 0.0))
            row.save()
        cursor = (traces[-1].written_at, traces[-1].id) if traces else (at, ident)
        waiting = _sessions_after(org_id, cursor)
        for row in VisdomSession.select().where(
            (VisdomSession.org_id == org_id)
            & VisdomSession.open
            & (VisdomSession.last_at < now - idle_timeout)
        ):
            if _raw_session(row.session_id) in waiting:
                continue  # a call of it is written and not read yet: not idle
            state = SessionState.loads(row.state)
            key = f"{org_id}/{row.session_id}/{state.first_at!r}"
            events.append(_outbox_row(org_id, row, session_end(row.session_id, state, key)))
            row.state, row.open = state.dumps(), False
            row.save()
        if events:
            VisdomEvent.insert_many(events).execute()
        if traces:
            VisdomSink.update(cursor_at=traces[-1].written_at, cursor_id=traces[-1].id).where(
                VisdomSink.org_id == org_id
            ).execute()
    return len(traces)


#: Sessions of the traces after the cursor looked at, at most; past it none is sealed.
_WAITING_LIMIT = 1000
_SYNTHETIC = "tvgate-user-"


def _raw_session(session_id: str) -> str:
    """The trace's session id a session row stands for ("" for a user's day session)."""
    return "" if session_id.startswith(_SYNTHETIC) else session_id


def _sessions_after(org_id: int, cursor: tuple[float, str]) -> set[str] | _All:
    """The session ids of the org's traces written after ``cursor`` (lag or not): their
    sessions are not idle, whatever their last call's time says (a trace can be written
    well after its call: the writer's batches, a spool replayed after an outage)."""
    at, ident = cursor
    rows = list(
        Trace.select(Trace.session_id)
        .where(
            (Trace.org_id == org_id)
            & ((Trace.written_at > at) | ((Trace.written_at == at) & (Trace.id > ident)))
        )
        .distinct()
        .limit(_WAITING_LIMIT + 1)
    )
    if len(rows) > _WAITING_LIMIT:
        return _All()
    return {row.session_id for row in rows}


class _All:
    """Every session: too many are waiting to list (a backlog); none is sealed now."""

    def __contains__(self, item: object) -> bool:
        return True


def _outbox_row(org_id: int, session: VisdomSession, event: dict[str, object]) -> dict[str, object]:
    return {
        "org_id": org_id,
        "session_id": session.session_id,
        "repo": session.repo,
        # Whose credential it goes with: the user of the call it was made from (of the
        # session's latest call, for a session_end).
        "user_id": session.user_id,
        "event_type": event["event_type"],
        "body": orjson.dumps(event),
        "created_at": time.time(),
    }


def next_events(org_id: int, after: int) -> list[VisdomEvent]:
    """The next events to send, in order, but none of a session that has a parked one
    (its later events wait behind it: in order per session)."""
    held = VisdomEvent.select(VisdomEvent.session_id).where(
        (VisdomEvent.org_id == org_id) & VisdomEvent.parked
    )
    return list(
        VisdomEvent.select()
        .where(
            (VisdomEvent.org_id == org_id)
            & (VisdomEvent.id > after)
            & ~VisdomEvent.parked
            & VisdomEvent.session_id.not_in(held)
        )
        .order_by(VisdomEvent.id)
        .limit(SEND_BATCH)
    )


def stream_target(sink: VisdomSink, repo: str) -> tuple[str, dict[str, str]] | None:
    """Where an event of a session with ``repo`` goes; None when nowhere is configured."""
    base = sink.url.rstrip("/")
    if repo:
        repo_part = quote(repo, safe="")
        if sink.legacy_slug:
            slug = quote(sink.legacy_slug, safe="")
            return f"{base}/api/v1/orgs/{slug}/repos/{repo_part}/stream", {}
        return f"{base}/api/v1/repos/{repo_part}/stream", {}
    if sink.project:
        project = quote(sink.project, safe="")
        return (
            f"{base}/api/v1/projects/{project}/stream",
            {"x-tracevault-project-attribution": "derived"},
        )
    return None


def delivered(org_id: int, ids: list[int], by_user: list[int], now: float) -> None:
    """Events ``ids`` are delivered; ``by_user``: the user of each that went with its
    user's own credential (the others went with the org key)."""
    if not ids:
        return
    with database.atomic():
        VisdomEvent.delete().where(VisdomEvent.id.in_(ids)).execute()
        VisdomSink.update(
            sent=VisdomSink.sent + len(ids),
            sent_user=VisdomSink.sent_user + len(by_user),
            sent_org=VisdomSink.sent_org + len(ids) - len(by_user),
            last_sent_at=now,
            last_error="",
        ).where(VisdomSink.org_id == org_id).execute()
        credentials.accepted(org_id, by_user, now)


def park(org_id: int, event_id: int, error: str, ciphertext: str) -> bool:
    """Park an event refused under the settings whose key is ``ciphertext``; not if the
    org was reconnected meanwhile (every connect seals the key anew): then the event is
    tried again with the new settings."""
    with database.atomic():
        current = VisdomSink.get_or_none(VisdomSink.org_id == org_id)
        if current is None or current.ciphertext != ciphertext:
            return False
        VisdomEvent.update(
            parked=True, error=error[:ERROR_CHARS], attempts=VisdomEvent.attempts + 1
        ).where(VisdomEvent.id == event_id).execute()
        VisdomSink.update(last_error=f"event {event_id} parked: {error}"[:ERROR_CHARS]).where(
            VisdomSink.org_id == org_id
        ).execute()
    return True


def failed(org_id: int, event_id: int, error: str) -> None:
    """A try that will be retried (429, 5xx, timeout, Visdom Trace away)."""
    with database.atomic():
        VisdomEvent.update(attempts=VisdomEvent.attempts + 1).where(
            VisdomEvent.id == event_id
        ).execute()
        VisdomSink.update(last_error=error[:ERROR_CHARS]).where(
            VisdomSink.org_id == org_id
        ).execute()
