"""Reading traces: the filtered, paged list, one trace with its bodies, a session's
traces with its tree of agents (``tvgate.services.agents``) and the export; members see
their own, admins and auditors their org's.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import peewee

from tvgate.identity import Principal
from tvgate.models import (
    ROLE_MEMBER,
    Org,
    Trace,
    User,
)
from tvgate.services.access import NotFound, ServiceError, _actor_org, _deny, get_org
from tvgate.services.agents import agent_tree

TRACE_FILTERS = ("user", "route", "tool", "session", "outcome", "since", "until")


def _trace_scope(actor: Principal | None, org: Org) -> peewee.ModelSelect[Trace]:
    """Traces the actor may read: their own, or the org's for admins and auditors."""
    query = Trace.select().where(Trace.org_id == org.id)
    if actor is not None and actor.role == ROLE_MEMBER:
        query = query.where(Trace.user_id == actor.user_id)
    return query


def parse_time(value: str) -> float:
    """Seconds since the epoch, from a number or an ISO 8601 date/time (UTC if no zone)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ServiceError(f"{value!r} is not a time (epoch seconds or ISO 8601)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _encode_cursor(trace: Trace) -> str:
    return base64.urlsafe_b64encode(f"{trace.received_at!r}|{trace.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        at, _, ident = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return float(at), ident
    except (ValueError, UnicodeDecodeError):
        raise ServiceError("cursor is not one tvgate gave out") from None


def list_traces(
    filters: dict[str, str],
    *,
    cursor: str | None = None,
    limit: int = 50,
    actor: Principal | None = None,
    org_name: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of traces, newest first, and the cursor of the next page (None at the end)."""
    org = _actor_org(actor, org_name)
    query = _trace_scope(actor, org)
    users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
    for name, value in filters.items():
        if name not in TRACE_FILTERS:
            raise ServiceError(f"unknown filter {name!r}; use {', '.join(TRACE_FILTERS)}")
        if name == "user":
            user_id = next((i for i, email in users.items() if email == value.lower()), -1)
            query = query.where(Trace.user_id == user_id)
        elif name == "route":
            query = query.where(Trace.route_name == value)
        elif name == "tool":
            query = query.where(Trace.tool == value)
        elif name == "session":
            query = query.where(Trace.session_id == value)
        elif name == "outcome":
            query = query.where(Trace.outcome == value)
        elif name == "since":
            query = query.where(Trace.received_at >= parse_time(value))
        elif name == "until":
            query = query.where(Trace.received_at < parse_time(value))
    if cursor:
        at, ident = _decode_cursor(cursor)
        query = query.where(
            (Trace.received_at < at) | ((Trace.received_at == at) & (Trace.id < ident))
        )
    limit = max(1, min(limit, 500))
    rows = list(query.order_by(Trace.received_at.desc(), Trace.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    page = [trace_summary(t, users.get(t.user_id or 0, "")) for t in rows]
    return page, (_encode_cursor(rows[-1]) if more else None)


def trace_summary(trace: Trace, email: str) -> dict[str, Any]:
    def after(moment: float | None) -> float | None:
        return round((moment - trace.received_at) * 1000, 3) if moment else None

    return {
        "id": trace.id,
        "user": email,
        "route": trace.route_name,
        "key": trace.key_name,
        "provider": trace.provider,
        "endpoint": trace.endpoint,
        "requested_model": trace.requested_model,
        "upstream_model": trace.upstream_model,
        "response_model": trace.response_model,
        "stream": trace.stream,
        "transport": trace.transport,
        "status": trace.status_code,
        "outcome": trace.outcome,
        "error_type": trace.error_type,
        "error_message": trace.error_message,
        "received_at": trace.received_at,
        "first_byte_ms": after(trace.first_byte_at),
        "total_ms": after(trace.finished_at),
        "overhead_ms": trace.overhead_ms,
        "usage": {
            "input_tokens": trace.input_tokens,
            "output_tokens": trace.output_tokens,
            "cache_read_tokens": trace.cache_read_tokens,
            "cache_write_tokens": trace.cache_write_tokens,
            "reasoning_tokens": trace.reasoning_tokens,
        },
        "cost_usd": trace.cost_usd,
        "tool": trace.tool,
        "tool_version": trace.tool_version,
        "session_id": trace.session_id,
        "agent_id": trace.agent_id,
        "parent_agent_id": trace.parent_agent_id,
        "repo": trace.repo,
        "branch": trace.branch,
        "upstream_request_id": trace.upstream_request_id,
        "message_id": trace.message_id,
        "bytes_in": trace.bytes_in,
        "bytes_out": trace.bytes_out,
        # "subscription": the call went out with the caller's own Claude subscription.
        "client_credential": trace.client_credential,
        "truncated": trace.truncated,
        "captured": bool(trace.request_blob),
        # Every upstream attempt when fallbacks were tried; empty when the first route answered.
        "attempts": orjson.loads(trace.attempts) if trace.attempts else [],
        # What the writer found wrong with the call's figures and mended (an absurd
        # usage figure counted as 0, a provider's over-long value cut).
        "anomalies": orjson.loads(trace.anomalies) if trace.anomalies else [],
    }


def _body_document(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", errors="replace")


def get_trace(
    trace_id: str, *, actor: Principal | None = None, org_name: str | None = None
) -> dict[str, Any]:
    """One trace with its captured request (byte-exact, as JSON) and reassembled answer."""
    from tvgate.traces.content import load_request
    from tvgate.traces.store import BlobStore

    org = _actor_org(actor, org_name)
    trace = _trace_scope(actor, org).where(Trace.id == trace_id).first()
    if trace is None:
        error = NotFound(f"no trace {trace_id}")
        hidden = Trace.select(Trace.org_id).where(Trace.id == trace_id).first()
        if actor is None or hidden is None:
            raise error
        raise _deny(actor, "read trace", trace_id, error, owner_org_id=hidden.org_id)
    user = User.get_or_none(User.id == trace.user_id)
    document = trace_summary(trace, user.email if user else "")
    store = BlobStore(org.id)
    document["request"] = (
        _body_document(load_request(bytes.fromhex(trace.request_blob), store))
        if trace.request_blob
        else None
    )
    document["response"] = (
        _body_document(store.get(bytes.fromhex(trace.response_blob)))
        if trace.response_blob
        else None
    )
    return document


#: The most traces a session view holds (its first ones): a client names its sessions and
#: agents, and one that makes a session of endless calls gets a bounded page.
SESSION_TRACES_LIMIT = 5000


def session_traces(
    session: str, *, actor: Principal | None = None, org_name: str | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """A tool session's first ``SESSION_TRACES_LIMIT`` traces, oldest first, and whether
    it has more."""
    org = _actor_org(actor, org_name)
    users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
    query = _trace_scope(actor, org).where(Trace.session_id == session)
    rows = list(query.order_by(Trace.received_at, Trace.id).limit(SESSION_TRACES_LIMIT + 1))
    if not rows:
        raise NotFound(f"no session {session}")
    kept = rows[:SESSION_TRACES_LIMIT]
    return [trace_summary(t, users.get(t.user_id or 0, "")) for t in kept], len(rows) > len(kept)


def session_view(
    session: str, *, actor: Principal | None = None, org_name: str | None = None
) -> dict[str, Any]:
    """A tool session: its traces, oldest first, and its agents as a tree (``agent_tree``),
    of its first ``SESSION_TRACES_LIMIT`` calls (``truncated`` when it has more)."""
    traces, truncated = session_traces(session, actor=actor, org_name=org_name)
    return {
        "session_id": session,
        "traces": traces,
        "agents": agent_tree(traces),
        "truncated": truncated,
        "traces_limit": SESSION_TRACES_LIMIT,
    }


def export_traces(
    org_name: str | None, since: float, until: float | None = None, *, bodies: bool = False
) -> Iterator[dict[str, Any]]:
    """Every trace of an org from ``since`` on, oldest first, read a page at a time (CLI)."""
    org = get_org(org_name)
    after_at, after_id = since, ""
    while True:
        query = Trace.select().where(
            (Trace.org_id == org.id)
            & (
                (Trace.received_at > after_at)
                | ((Trace.received_at == after_at) & (Trace.id > after_id))
            )
        )
        if until is not None:
            query = query.where(Trace.received_at < until)
        rows = list(query.order_by(Trace.received_at, Trace.id).limit(500))
        if not rows:
            return
        users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
        for trace in rows:
            yield (
                get_trace(trace.id, org_name=org.name)
                if bodies
                else trace_summary(trace, users.get(trace.user_id or 0, ""))
            )
        after_at, after_id = rows[-1].received_at, rows[-1].id
