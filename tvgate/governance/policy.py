"""An org's budgets and rate limits as the proxy sees them: immutable, held in the route snapshot.

Loaded with the org's routes and keys (``tvgate.routing.load_snapshot``), so
a request never reads them from the database, and a change reaches every
gateway process within the snapshot's refresh period.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvgate.models import (
    GOVERN_KEY,
    GOVERN_ORG,
    GOVERN_ROUTE,
    GOVERN_USER,
    METRIC_USD,
    Budget,
    RateLimit,
    User,
)
from tvgate.rows import from_row


@dataclass(frozen=True, slots=True)
class BudgetTerms:
    """What a budget says, however it is held: whose it is (scope and subject), what it
    counts per which period, how much, and from what percent it warns."""

    scope: str
    subject: str
    metric: str
    period: str
    amount: float
    warn_percent: float


@dataclass(frozen=True, slots=True)
class BudgetRule(BudgetTerms):
    """A budget as the proxy enforces it."""

    #: Whose budget, for people: "the org", "user ada@example.com", "route fast".
    owner: str

    @property
    def title(self) -> str:
        unit = "cost" if self.metric == METRIC_USD else "token"
        return f"the {unit} budget per {self.period} of {self.owner}"

    def amount_text(self, value: float) -> str:
        if self.metric == METRIC_USD:
            return f"${value:,.2f}"
        return f"{value:,.0f} tokens"


@dataclass(frozen=True, slots=True)
class RateRule:
    scope: str
    subject: str
    rpm: int | None
    tpm: int | None
    owner: str


@dataclass(frozen=True, slots=True)
class Governance:
    """Every budget and rate limit of one org, by (scope, subject)."""

    budgets: dict[tuple[str, str], tuple[BudgetRule, ...]] = field(default_factory=dict)
    rates: dict[tuple[str, str], RateRule] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.budgets or self.rates)

    @staticmethod
    def subjects(user_id: int, route_name: str, key_name: str) -> tuple[tuple[str, str], ...]:
        """The (scope, subject) pairs one call counts against."""
        return (
            (GOVERN_ORG, ""),
            (GOVERN_USER, str(user_id)),
            (GOVERN_ROUTE, route_name),
            (GOVERN_KEY, key_name),
        )


NO_GOVERNANCE = Governance()


def _owner(scope: str, subject: str, emails: dict[int, str]) -> str:
    if scope == GOVERN_ORG:
        return "the org"
    if scope == GOVERN_USER:
        return f"user {emails.get(int(subject), subject)}" if subject.isdigit() else subject
    return f"{scope} {subject}"


def load_governance(org_id: int) -> Governance:
    """Read an org's budgets and rate limits (runs in the database pool)."""
    budgets = list(Budget.select().where(Budget.org == org_id))
    rates = list(RateLimit.select().where(RateLimit.org == org_id))
    if not budgets and not rates:
        return NO_GOVERNANCE
    subjects = [(row.scope, row.subject) for row in budgets] + [
        (row.scope, row.subject) for row in rates
    ]
    user_ids = {int(subject) for scope, subject in subjects if scope == GOVERN_USER and subject}
    emails = (
        {u.id: u.email for u in User.select(User.id, User.email).where(User.id.in_(user_ids))}
        if user_ids
        else {}
    )
    by_subject: dict[tuple[str, str], list[BudgetRule]] = {}
    for row in budgets:
        by_subject.setdefault((row.scope, row.subject), []).append(
            from_row(BudgetRule, row, owner=_owner(row.scope, row.subject, emails))
        )
    return Governance(
        budgets={k: tuple(v) for k, v in by_subject.items()},
        rates={
            (row.scope, row.subject): from_row(
                RateRule, row, owner=_owner(row.scope, row.subject, emails)
            )
            for row in rates
            if row.rpm or row.tpm
        },
    )
