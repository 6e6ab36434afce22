"""Budgets and rate limits: set, delete and list them with what is counted against
them; both kinds of rule share the same subject, order, write and delete helpers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import peewee

from tvgate.governance.policy import BudgetTerms
from tvgate.governance.windows import (
    budget_counter,
    minute_counters,
)
from tvgate.identity import Principal
from tvgate.models import (
    BUDGET_SCOPES,
    GOVERN_KEY,
    GOVERN_ORG,
    GOVERN_ROUTE,
    GOVERN_USER,
    LIMIT_SCOPES,
    METRIC_TOKENS,
    METRIC_USD,
    PERIOD_DAY,
    PERIOD_MONTH,
    Budget,
    Org,
    RateLimit,
    Route,
    UsageCounter,
    User,
    database,
)
from tvgate.rows import from_row
from tvgate.services.access import (
    NotFound,
    ServiceError,
    _actor_org,
    _admin_org,
    _missing,
    _readable_org,
    _require_admin,
    audit,
    get_key,
    get_user,
)
from tvgate.services.events import announce


def _drop_rules_of(actor: Principal | None, org_id: int, scope: str, name: str) -> None:
    """Budgets and limits of a route name or key that no longer exists go with it (a route
    rule stays while another route of the org still has that name)."""
    if scope == GOVERN_ROUTE and (
        Route.select().where((Route.org == org_id) & (Route.name == name)).exists()
    ):
        return
    budgets = (
        Budget.delete()
        .where((Budget.org == org_id) & (Budget.scope == scope) & (Budget.subject == name))
        .execute()
    )
    limits = (
        RateLimit.delete()
        .where((RateLimit.org == org_id) & (RateLimit.scope == scope) & (RateLimit.subject == name))
        .execute()
    )
    if budgets or limits:
        audit(actor, org_id, f"delete {scope} rules", name, {"budgets": budgets, "limits": limits})


#: The metrics a budget counts and the periods it counts over (UTC days and months).
BUDGET_METRICS = (METRIC_TOKENS, METRIC_USD)


BUDGET_PERIODS = (PERIOD_DAY, PERIOD_MONTH)


#: The largest budget amount and per-minute limit accepted: far above any real one, and
#: small enough that a typo of many zeros is caught.
MAX_BUDGET_AMOUNT = 1e15


MAX_PER_MINUTE = 2**31 - 1

#: A budget or a rate limit: both are rows of (org, scope, subject) with their own values.
Rule = TypeVar("Rule", Budget, RateLimit)


def _subject_row(org: Org, scope: str, subject: str | None) -> tuple[str, str]:
    """(stored subject, subject as shown) for a budget or a limit, checked to exist:
    "" for the org, the user's id for a user (shown as the email), a route's or key's name."""
    if scope == GOVERN_ORG:
        return "", ""
    if not subject or not subject.strip():
        what = {GOVERN_USER: "a user's email", GOVERN_ROUTE: "a route name"}.get(
            scope, "a key name"
        )
        raise ServiceError(f"a {scope} budget or limit needs {what}")
    subject = subject.strip()
    if scope == GOVERN_USER:
        user = get_user(subject, org)
        return str(user.id), user.email
    if scope == GOVERN_ROUTE:
        if not Route.select().where((Route.org == org) & (Route.name == subject)).exists():
            raise NotFound(f"no route named {subject!r} in org {org.name!r}")
        return subject, subject
    get_key(subject, org)
    return subject, subject


def _shown_subjects(org_id: int, rows: list[Any]) -> dict[str, str]:
    """Emails of the users that user-scoped rows name, by stored subject (the user id)."""
    ids = [int(r.subject) for r in rows if r.scope == GOVERN_USER and r.subject.isdigit()]
    if not ids:
        return {}
    users = User.select(User.id, User.email).where((User.org == org_id) & User.id.in_(ids))
    return {str(u.id): u.email for u in users}


def _shown(row: Budget | RateLimit, emails: dict[str, str]) -> str:
    if row.scope == GOVERN_USER:
        return emails.get(row.subject, f"(deleted user {row.subject})")
    return str(row.subject)


def _counters(keys: list[str]) -> dict[str, float]:
    """The shared counters of these names (a counter not yet written is 0)."""
    if not keys:
        return {}
    found = {c.key: c.value for c in UsageCounter.select().where(UsageCounter.key.in_(keys))}
    return {k: float(found.get(k, 0.0)) for k in keys}


@dataclass(frozen=True, slots=True)
class BudgetView(BudgetTerms):
    """A budget and what has been counted against it in the current window. ``used`` is
    what every gateway process has flushed so far (they flush about every second)."""

    id: int
    used: float
    resets_at: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.amount - self.used)

    @property
    def percent(self) -> float:
        """Used, in percent of the amount (100 when a budget of 0 has been touched)."""
        if self.amount > 0:
            return round(100.0 * self.used / self.amount, 1)
        return 100.0 if self.used > 0 else 0.0

    @property
    def state(self) -> str:
        """ok, warn (at or past warn_percent) or exceeded (nothing left)."""
        if self.used >= self.amount and (self.used > 0 or self.amount == 0):
            return "exceeded"
        return "warn" if self.percent >= self.warn_percent else "ok"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "subject": self.subject,
            "metric": self.metric,
            "period": self.period,
            "amount": self.amount,
            "warn_percent": self.warn_percent,
            "used": self.used,
            "remaining": self.remaining,
            "percent": self.percent,
            "state": self.state,
            "resets_at": self.resets_at,
        }


def _budget_views(org_id: int, rows: list[Budget], now: float | None = None) -> list[BudgetView]:
    at = time.time() if now is None else now
    counters = [budget_counter(org_id, b.scope, b.subject, b.metric, b.period, at) for b in rows]
    used = _counters([key for key, _counts, _end in counters])
    emails = _shown_subjects(org_id, rows)
    return [
        from_row(BudgetView, b, subject=_shown(b, emails), used=used[key], resets_at=end)
        for b, (key, _counts, end) in zip(rows, counters, strict=True)
    ]


def _budget_order(query: peewee.ModelSelect[Budget]) -> list[Budget]:
    return _in_order(query, Budget, BUDGET_SCOPES, Budget.metric, Budget.period)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ServiceError(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ServiceError(f"{what} must be a finite number") from None
    if not math.isfinite(number):
        raise ServiceError(f"{what} must be a finite number")
    return number


def set_budget(
    org_name: str | None = None,
    *,
    scope: str,
    subject: str | None = None,
    metric: str,
    period: str,
    amount: float,
    warn_percent: float = 80.0,
    actor: Principal | None = None,
) -> BudgetView:
    """Set (create or replace) the budget of one subject for one metric and period: the
    org, a user (by email), a route or a key (by name). Tokens count input, output and
    cache tokens; usd the cost from the price table. Admins only."""
    org = _actor_org(actor, org_name)
    target = f"{scope} {subject or ''} {metric}/{period}".replace("  ", " ")
    _require_admin(actor, org, "set budget", target)
    _one_of(scope, BUDGET_SCOPES, "scope")
    _one_of(metric, BUDGET_METRICS, "metric")
    _one_of(period, BUDGET_PERIODS, "period")
    amount = _number(amount, "amount")
    if not 0 <= amount <= MAX_BUDGET_AMOUNT:
        raise ServiceError(f"amount must be from 0 to {MAX_BUDGET_AMOUNT:,.0f}")
    warn_percent = _number(warn_percent, "warn_percent")
    if not 0 <= warn_percent <= 100:
        raise ServiceError("warn_percent must be from 0 to 100")
    stored, shown = _subject_row(org, scope, subject)
    target = f"{scope} {shown} {metric}/{period}" if shown else f"{scope} {metric}/{period}"
    where = (
        (Budget.org == org)
        & (Budget.scope == scope)
        & (Budget.subject == stored)
        & (Budget.metric == metric)
        & (Budget.period == period)
    )
    key = {"org": org, "scope": scope, "subject": stored, "metric": metric, "period": period}
    values = {"amount": amount, "warn_percent": warn_percent}
    row = _save_rule(Budget, where, key, values, actor, "set budget", target)
    return _budget_views(org.id, [row])[0]


def _governed_row(
    model: type[Budget] | type[RateLimit],
    row_id: int,
    org_name: str | None,
    actor: Principal | None,
    action: str,
) -> Budget | RateLimit:
    """The budget or limit ``row_id`` of the actor's org (of ``org_name`` for an operator)."""
    what = "budget" if model is Budget else "limit"
    org = _actor_org(actor, org_name) if (actor is not None or org_name is not None) else None
    if org is not None:
        _require_admin(actor, org, action, str(row_id))
    row = model.get_or_none(model.id == row_id)
    if row is None or (org is not None and row.org_id != org.id):
        owner = row.org_id if row is not None else None
        raise _missing(actor, action, str(row_id), f"no {what} {row_id}", owner)
    return row


def _in_order(
    query: peewee.ModelSelect[Rule], model: type[Rule], scopes: tuple[str, ...], *then: Any
) -> list[Rule]:
    """Rules as listed: by scope (org first), then subject, then ``then``."""
    scope_rank = peewee.Case(model.scope, [(s, i) for i, s in enumerate(scopes)], len(scopes))
    return list(query.order_by(scope_rank, model.subject, *then))


def _one_of(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ServiceError(f"{what} must be one of {', '.join(choices)}")


def _save_rule(
    model: type[Rule],
    where: Any,
    key: dict[str, Any],
    values: dict[str, Any],
    actor: Principal | None,
    action: str,
    target: str,
) -> Rule:
    """Create the rule ``where`` finds with ``key`` and ``values``, or give it ``values``;
    audited with each value before and after. Two admins creating it at once: one gets 409."""
    what = "budget" if model is Budget else "limit"
    try:
        with database.atomic():
            row = model.get_or_none(where)
            change = {n: [getattr(row, n) if row else None, v] for n, v in values.items()}
            if row is None:
                row = model.create(**key, **values)
            else:
                for name, value in values.items():
                    setattr(row, name, value)
                row.updated_at = time.time()
                row.save()
            audit(actor, row.org_id, action, target, change)
    except peewee.IntegrityError:
        raise ServiceError(f"that {what} was changed meanwhile; try again", 409) from None
    announce(row.org_id)
    return row


def _delete_rule(
    row: Budget | RateLimit,
    actor: Principal | None,
    action: str,
    target: str,
    change: dict[str, Any],
) -> None:
    with database.atomic():
        row.delete_instance()
        audit(actor, row.org_id, action, target, change)
    announce(row.org_id)


def delete_budget(
    budget_id: int, *, org_name: str | None = None, actor: Principal | None = None
) -> None:
    """Remove a budget (admins); what was counted against it stays until its window ends."""
    row = _governed_row(Budget, budget_id, org_name, actor, "delete budget")
    assert isinstance(row, Budget)
    shown = _shown(row, _shown_subjects(row.org_id, [row]))
    target = f"{row.scope} {shown} {row.metric}/{row.period}".replace("  ", " ")
    _delete_rule(row, actor, "delete budget", target, {"amount": row.amount})


def list_budgets(
    org_name: str | None = None, *, actor: Principal | None = None, now: float | None = None
) -> list[BudgetView]:
    """Every budget of the org with its use in the current window (admins and auditors)."""
    org = _readable_org(actor, org_name)
    return _budget_views(org.id, _budget_order(Budget.select().where(Budget.org == org)), now)


@dataclass(frozen=True, slots=True)
class RateLimitView:
    """A rate limit and this UTC minute's requests and tokens counted against it."""

    id: int
    scope: str
    subject: str
    rpm: int | None
    tpm: int | None
    used_requests: float
    used_tokens: float
    resets_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "subject": self.subject,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "used_requests": int(self.used_requests),
            "used_tokens": int(self.used_tokens),
            "remaining_requests": None
            if self.rpm is None
            else max(0, self.rpm - int(self.used_requests)),
            "remaining_tokens": None
            if self.tpm is None
            else max(0, self.tpm - int(self.used_tokens)),
            "resets_at": self.resets_at,
        }


def _limit_views(
    org_id: int, rows: list[RateLimit], now: float | None = None
) -> list[RateLimitView]:
    at = time.time() if now is None else now
    counters = [minute_counters(org_id, r.scope, r.subject, at) for r in rows]
    used = _counters([k for requests, tokens, _end in counters for k in (requests, tokens)])
    emails = _shown_subjects(org_id, rows)
    return [
        from_row(
            RateLimitView,
            r,
            subject=_shown(r, emails),
            used_requests=used[requests],
            used_tokens=used[tokens],
            resets_at=end,
        )
        for r, (requests, tokens, end) in zip(rows, counters, strict=True)
    ]


def _limit_order(query: peewee.ModelSelect[RateLimit]) -> list[RateLimit]:
    return _in_order(query, RateLimit, LIMIT_SCOPES)


def _per_minute(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PER_MINUTE:
        raise ServiceError(f"{what} must be a whole number from 1 to {MAX_PER_MINUTE}, or none")
    return value


def set_rate_limit(
    org_name: str | None = None,
    *,
    scope: str,
    subject: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    actor: Principal | None = None,
) -> RateLimitView | None:
    """Set the requests and tokens per minute of the org, a user (by email) or a route (by
    name); None lifts that limit, and with both None the limit is removed (returns None).
    Admins only."""
    org = _admin_org(actor, org_name, "set limit", f"{scope} {subject or ''}".strip())
    _one_of(scope, LIMIT_SCOPES, "scope")
    rpm, tpm = _per_minute(rpm, "rpm"), _per_minute(tpm, "tpm")
    stored, shown = _subject_row(org, scope, subject)
    target = f"{scope} {shown}".strip()
    where = (RateLimit.org == org) & (RateLimit.scope == scope) & (RateLimit.subject == stored)
    if rpm is None and tpm is None:
        with database.atomic():
            old = RateLimit.get_or_none(where)
            if old is not None:
                old.delete_instance()
                audit(actor, org.id, "delete limit", target, {"rpm": old.rpm, "tpm": old.tpm})
        if old is not None:
            announce(org.id)
        return None
    key = {"org": org, "scope": scope, "subject": stored}
    row = _save_rule(RateLimit, where, key, {"rpm": rpm, "tpm": tpm}, actor, "set limit", target)
    return _limit_views(org.id, [row])[0]


def delete_rate_limit(
    limit_id: int, *, org_name: str | None = None, actor: Principal | None = None
) -> None:
    row = _governed_row(RateLimit, limit_id, org_name, actor, "delete limit")
    assert isinstance(row, RateLimit)
    target = f"{row.scope} {_shown(row, _shown_subjects(row.org_id, [row]))}".strip()
    _delete_rule(row, actor, "delete limit", target, {"rpm": row.rpm, "tpm": row.tpm})


def list_rate_limits(
    org_name: str | None = None, *, actor: Principal | None = None, now: float | None = None
) -> list[RateLimitView]:
    """Every rate limit of the org with this minute's use (admins and auditors)."""
    org = _readable_org(actor, org_name)
    return _limit_views(org.id, _limit_order(RateLimit.select().where(RateLimit.org == org)), now)


@dataclass(frozen=True, slots=True)
class MyGovernance:
    """The budgets and rate limits that apply to one user's requests."""

    budgets: list[BudgetView]
    limits: list[RateLimitView]

    def as_dict(self) -> dict[str, Any]:
        return {
            "budgets": [b.as_dict() for b in self.budgets],
            "limits": [r.as_dict() for r in self.limits],
        }


def my_budgets(actor: Principal, *, now: float | None = None) -> MyGovernance:
    """What caps the actor's requests: the org's budgets and limits, their own, and those
    of the routes they may use and of the keys behind those routes."""
    from tvgate.routing import load_snapshot

    org = Org.get_by_id(actor.org_id)
    usable = load_snapshot(org.id).available(actor)
    routes = sorted({r.name for r in usable})
    keys = sorted({r.key.name for r in usable})
    me = str(actor.user_id)

    def applies(model: type[Budget] | type[RateLimit]) -> Any:
        condition = (
            (model.scope == GOVERN_ORG)
            | ((model.scope == GOVERN_USER) & (model.subject == me))
            | ((model.scope == GOVERN_ROUTE) & model.subject.in_(routes or [""]))
        )
        if model is Budget:
            condition |= (model.scope == GOVERN_KEY) & model.subject.in_(keys or [""])
        return (model.org == org) & condition

    return MyGovernance(
        budgets=_budget_views(org.id, _budget_order(Budget.select().where(applies(Budget))), now),
        limits=_limit_views(
            org.id, _limit_order(RateLimit.select().where(applies(RateLimit))), now
        ),
    )
