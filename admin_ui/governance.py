"""The budgets and rate limits page: every budget and limit of the org with what has been
counted against it, and (for admins) the forms that set and remove them. Auditors read;
members get 403 (they see what applies to them on the overview and "My gateway")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tornado.web import authenticated

from admin_ui.base import READERS, PageError, UIHandler
from admin_ui.traces import when
from tvgate import services
from tvgate.models import ROLE_ADMIN

ADMIN = (ROLE_ADMIN,)

#: The budget form's "measure" choices: (metric, period) by form value, with labels.
MEASURES = {
    "tokens-day": ("tokens", "day", "Tokens per day"),
    "tokens-month": ("tokens", "month", "Tokens per month"),
    "usd-day": ("usd", "day", "US dollars per day"),
    "usd-month": ("usd", "month", "US dollars per month"),
}


def amount(value: float, metric: str) -> str:
    """A budget's amount or use as people read it: dollars with cents, or whole tokens."""
    return f"${value:,.2f}" if metric == "usd" else f"{value:,.0f}"


def template_helpers() -> dict[str, Any]:
    """What the budget and limit tables (_governance.html) need in their namespace."""
    return {"amount": amount, "when": when}


def _number(handler: UIHandler, name: str, what: str) -> float:
    text = handler.get_body_argument(name, "").strip().replace(",", "").lstrip("$")
    try:
        return float(text)
    except ValueError:
        raise PageError(400, f"{what} must be a number.") from None


def _per_minute(handler: UIHandler, name: str) -> int | None:
    text = handler.get_body_argument(name, "").strip().replace(",", "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise PageError(400, f"{name.upper()} must be a whole number, or empty.") from None


def _ident(text: str, what: str) -> int:
    """A row id from the URL (digits only, by the route pattern), within what rows have."""
    if len(text) > 15:
        raise PageError(404, f"No {what} {text}.")
    return int(text)


class GovernanceHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        self.require(*READERS)
        user = self.user

        def load() -> dict[str, Any]:
            return {
                "budgets": services.list_budgets(actor=user),
                "limits": services.list_rate_limits(actor=user),
                "users": [u.email for u in services.list_users(actor=user)],
                "routes": sorted({r.name for r in services.list_routes(actor=user)}),
                "keys": [k.name for k in services.list_keys(actor=user)],
            }

        data = await self.run_service(load)
        self.render("governance.html", measures=MEASURES, **template_helpers(), **data)


def _rule_target(handler: UIHandler) -> tuple[str, str | None]:
    """The scope and subject a budget or limit form names (the org by default)."""
    subject = handler.get_body_argument("subject", "").strip() or None
    return handler.get_body_argument("scope", "org"), subject


class BudgetsHandler(UIHandler):
    @authenticated
    async def post(self) -> None:
        self.require(*ADMIN)
        user = self.user
        scope, subject = _rule_target(self)
        measure = MEASURES.get(self.get_body_argument("measure", ""))
        if measure is None:
            raise PageError(400, "Choose what the budget counts.")
        metric, period, _label = measure
        value = _number(self, "amount", "The amount")
        warn_text = self.get_body_argument("warn_percent", "").strip()
        warn = _number(self, "warn_percent", "The warning percent") if warn_text else 80.0
        await self.run_service(
            lambda: services.set_budget(
                scope=scope,
                subject=subject,
                metric=metric,
                period=period,
                amount=value,
                warn_percent=warn,
                actor=user,
            )
        )
        self.done("/ui/governance")


class LimitsHandler(UIHandler):
    @authenticated
    async def post(self) -> None:
        self.require(*ADMIN)
        user = self.user
        scope, subject = _rule_target(self)
        rpm, tpm = _per_minute(self, "rpm"), _per_minute(self, "tpm")
        view = await self.run_service(
            lambda: services.set_rate_limit(
                scope=scope, subject=subject, rpm=rpm, tpm=tpm, actor=user
            )
        )
        self.done("/ui/governance", "saved" if view is not None else "deleted")


class RuleDeleteHandler(UIHandler):
    """Deletes a budget or a rate limit: ``kind`` and its service are the route's."""

    def initialize(self, kind: str, delete: Callable[..., None]) -> None:
        self.kind = kind
        self.delete = delete

    @authenticated
    async def post(self, rule_id: str) -> None:
        self.require(*ADMIN)
        user = self.user
        ident = _ident(rule_id, self.kind)
        await self.run_service(lambda: self.delete(ident, actor=user))
        self.done("/ui/governance", "deleted")


default_handlers = [
    (r"/ui/governance", GovernanceHandler),
    (r"/ui/governance/budgets", BudgetsHandler),
    (
        r"/ui/governance/budgets/([0-9]+)/delete",
        RuleDeleteHandler,
        {"kind": "budget", "delete": services.delete_budget},
    ),
    (r"/ui/governance/limits", LimitsHandler),
    (
        r"/ui/governance/limits/([0-9]+)/delete",
        RuleDeleteHandler,
        {"kind": "limit", "delete": services.delete_rate_limit},
    ),
]
