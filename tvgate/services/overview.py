"""The usage overview behind the web UI's charts: requests, tokens and cost by hour or
day, for the org or for one user.
"""

from __future__ import annotations

import time
from typing import Any

import peewee

from tvgate.identity import Principal
from tvgate.models import (
    OUTCOME_OK,
    ROLE_MEMBER,
    Trace,
    User,
)
from tvgate.services.access import ServiceError, _actor_org, get_user
from tvgate.services.traces import _trace_scope

#: Overview ranges: name -> (bucket width in seconds, number of buckets).
OVERVIEW_RANGES = {"24h": (3600, 24), "30d": (86400, 30)}


def usage_overview(
    range_name: str = "24h",
    *,
    user_email: str | None = None,
    actor: Principal | None = None,
    org_name: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Requests, tokens, cost and errors over time and by user, route and tool, plus the
    slowest and most failing routes. Aggregated in the database (GROUP BY), never by
    loading traces. Admins and auditors see the org (or one user of it); members only
    themselves, whatever ``user_email`` says."""
    if range_name not in OVERVIEW_RANGES:
        raise ServiceError(f"range must be one of {', '.join(OVERVIEW_RANGES)}")
    width, count = OVERVIEW_RANGES[range_name]
    org = _actor_org(actor, org_name)
    query = _trace_scope(actor, org)
    if user_email is not None and (actor is None or actor.role != ROLE_MEMBER):
        query = query.where(Trace.user_id == get_user(user_email, org).id)
    # Whole buckets: the first starts at a multiple of the width (UTC hours or days).
    end = (int(now if now is not None else time.time()) // width + 1) * width
    start = end - width * count
    query = query.where(Trace.received_at >= start)
    tokens = Trace.input_tokens + Trace.output_tokens
    errors = peewee.Case(None, [(Trace.outcome != OUTCOME_OK, 1)], 0)
    duration = Trace.finished_at - Trace.received_at
    # CAST(... AS BIGINT) / width is integer division on SQLite and PostgreSQL alike
    # (PostgreSQL rounds the cast, which moves a bucket edge by half a second at most).
    bucket = peewee.Cast(Trace.received_at, "BIGINT") / width

    def aggregate(*group: Any) -> peewee.ModelSelect[Trace]:
        return query.select(
            *group,
            peewee.fn.COUNT(Trace.id).alias("requests"),
            peewee.fn.COALESCE(peewee.fn.SUM(tokens), 0).alias("tokens"),
            peewee.fn.COALESCE(peewee.fn.SUM(Trace.cost_usd), 0).alias("cost"),
            peewee.fn.COALESCE(peewee.fn.SUM(errors), 0).alias("errors"),
            peewee.fn.AVG(duration).alias("avg_s"),
            peewee.fn.MAX(duration).alias("max_s"),
        ).group_by(*group)

    def row(label: str, r: Any) -> dict[str, Any]:
        return {
            "label": label,
            "requests": int(r.requests),
            "tokens": int(r.tokens),
            "cost": float(r.cost),
            "errors": int(r.errors),
            "avg_ms": round(float(r.avg_s) * 1000, 1) if r.avg_s is not None else None,
            "max_ms": round(float(r.max_s) * 1000, 1) if r.max_s is not None else None,
        }

    by_bucket: dict[int, Any] = {
        int(getattr(r, "bucket")): r  # noqa: B009 (an aggregate column, not a field)
        for r in aggregate(bucket.alias("bucket"))
    }
    series = []
    for i in range(count):
        at = start + i * width
        found = by_bucket.get(at // width)
        series.append({"at": at, **(row("", found) if found is not None else row("", _EMPTY_ROW))})
    users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
    by_user = [
        row(users.get(r.user_id or 0, "(deleted user)"), r)
        for r in aggregate(Trace.user_id).order_by(peewee.SQL("requests").desc()).limit(20)
    ]
    by_route_rows = list(aggregate(Trace.route_name))
    by_route = [row(r.route_name or "(no route)", r) for r in by_route_rows]
    by_tool = [
        row(r.tool or "(unknown)", r)
        for r in aggregate(Trace.tool).order_by(peewee.SQL("requests").desc()).limit(20)
    ]
    totals = row("total", aggregate().get()) if series else row("total", _EMPTY_ROW)
    return {
        "range": range_name,
        "bucket_seconds": width,
        "start": start,
        "end": end,
        "totals": totals,
        "series": series,
        "by_user": by_user,
        "by_route": sorted(by_route, key=lambda r: -r["requests"])[:20],
        "by_tool": by_tool,
        "slowest_routes": sorted(
            (r for r in by_route if r["avg_ms"] is not None), key=lambda r: -r["avg_ms"]
        )[:10],
        "failing_routes": sorted(
            (r for r in by_route if r["errors"]), key=lambda r: (-r["errors"], r["label"])
        )[:10],
    }


class _Empty:
    requests = tokens = cost = errors = 0
    avg_s = max_s = None


_EMPTY_ROW: Any = _Empty()
