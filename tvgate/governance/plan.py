"""What a call is judged by: its demand, the plan of counters it is checked and charged
against, the admission it holds while it runs, and the refusal when it breaks one.

A plan is worked out from the org's ``Governance`` once per (user, route, key) and kept
until the first of its windows ends; the ``Governor`` runs it against its counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tvgate.governance.policy import Governance
from tvgate.governance.windows import COUNT_TOKENS, budget_counter, minute_counters
from tvgate.models import GOVERN_KEY, GOVERN_ORG, GOVERN_ROUTE, GOVERN_USER

ALL_SCOPES = (GOVERN_ORG, GOVERN_USER, GOVERN_ROUTE, GOVERN_KEY)
#: What a fallback attempt is checked and charged for on its own.
ATTEMPT_SCOPES = (GOVERN_ROUTE, GOVERN_KEY)


class Refused(Exception):
    """A call over a budget, a rate limit or a cap: answered 429 with ``retry_after``."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


def resets_at(at: float) -> str:
    """When a window ends, as a refusal names it."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True, slots=True)
class Demand:
    """What a call may use, estimated before it goes out: what its budgets reserve."""

    input_tokens: int
    #: Its ``max_tokens`` (or the API's equivalent); 0 when it sets none.
    output_tokens: int
    provider: str
    model: str


NO_DEMAND = Demand(0, 0, "", "")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    limit: float
    end: float
    text: str
    #: Fraction of the limit from which answers carry a warning; None: no warning.
    warn: float | None
    #: What it counts (tokens or usd); a budget's check reserves, a per-minute one does not.
    counts: str = COUNT_TOKENS
    reserves: bool = False


@dataclass(frozen=True, slots=True)
class Charge:
    name: str
    counts: str
    scope: str


#: Who a plan is for: (org id, user id, route, key, the scopes checked).
PlanKey = tuple[int, int, str, str, tuple[str, ...]]


@dataclass(slots=True)
class Plan:
    governance: Governance
    #: The end of the first of its windows: the plan is worked out again from then on.
    expires: float
    checks: tuple[Check, ...]
    charges: tuple[Charge, ...]
    rpm: tuple[tuple[str, int, float, str], ...]
    #: False once every counter it checks has been read at least once.
    unread: bool = True


@dataclass(slots=True)
class Admission:
    """What one admitted call counts against, and the warnings its answer carries."""

    charges: list[Charge] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Budget headroom the call holds until it ends (counter, amount): ``Governor.settle``.
    reservations: list[tuple[str, float]] = field(default_factory=list)

    def for_attempt(self, attempt: Admission) -> Admission:
        """This call's org and user charges with the route and key charges of ``attempt``."""
        kept = [c for c in self.charges if c.scope not in ATTEMPT_SCOPES]
        return Admission(kept + attempt.charges, self.warnings + attempt.warnings)


def build_plan(governance: Governance, key: PlanKey, now: float) -> Plan:
    """The counters a call of this user on this route and key is judged by, until the
    first of their windows ends (worked out once, not per call)."""
    org_id, user_id, route, provider_key, scopes = key
    checks: list[Check] = []
    charges: list[Charge] = []
    rpm: list[tuple[str, int, float, str]] = []
    for scope, subject in Governance.subjects(user_id, route, provider_key):
        if scope not in scopes:
            continue
        for rule in governance.budgets.get((scope, subject), ()):
            name, counts, end = budget_counter(
                org_id, scope, subject, rule.metric, rule.period, now
            )
            charges.append(Charge(name, counts, scope))
            text = f"{rule.title} ({rule.amount_text(rule.amount)})"
            checks.append(
                Check(name, rule.amount, end, text, rule.warn_percent / 100, counts, True)
            )
        rate = governance.rates.get((scope, subject))
        if rate is None:
            continue
        requests, tokens, end = minute_counters(org_id, scope, subject, now)
        if rate.tpm:
            charges.append(Charge(tokens, COUNT_TOKENS, scope))
            text = f"the limit of {rate.tpm:,} tokens per minute of {rate.owner}"
            checks.append(Check(tokens, rate.tpm, end, text, None))
        if rate.rpm:
            text = f"the limit of {rate.rpm:,} requests per minute of {rate.owner}"
            rpm.append((requests, rate.rpm, end, text))
    ends = [c.end for c in checks] + [r[2] for r in rpm]
    return Plan(governance, min(ends, default=now + 60), tuple(checks), tuple(charges), tuple(rpm))
