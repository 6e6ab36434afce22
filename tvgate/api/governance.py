"""``/api/v1`` governance: budgets and rate limits (admins set them; admins and auditors
read them with the current window's use), and ``/api/v1/me/budgets``, what caps my own
requests. The services decide who may do what and write the audit log."""

from __future__ import annotations

from typing import Any

from tvgate import services
from tvgate.api.base import APIError, APIHandler, check_fields
from tvgate.api.resources import _str

BUDGET_FIELDS = {"scope", "subject", "metric", "period", "amount", "warn_percent"}
LIMIT_FIELDS = {"scope", "subject", "rpm", "tpm"}


def _rule_target(body: dict[str, Any]) -> tuple[str, str | None]:
    """The scope and subject a budget or limit names (the org by default)."""
    return _str(body, "scope", "org") or "org", _str(body, "subject")


class BudgetsHandler(APIHandler):
    async def get(self) -> None:
        await self.send_list("budgets", services.list_budgets)

    async def post(self) -> None:
        """Set (create or replace) the budget of a subject for a metric and period."""
        body = self.body()
        check_fields(body, BUDGET_FIELDS, required=("metric", "period", "amount"))
        scope, subject = _rule_target(body)
        metric, period = _str(body, "metric"), _str(body, "period")
        if metric is None or period is None:
            raise APIError(400, "metric and period must not be null")
        amount, warn = body["amount"], body.get("warn_percent", 80.0)
        view = await self.run_service(
            lambda: services.set_budget(
                scope=scope,
                subject=subject,
                metric=metric,
                period=period,
                amount=amount,
                warn_percent=warn,
                actor=self.principal,
            )
        )
        self.send(view.as_dict())


class BudgetHandler(APIHandler):
    async def delete(self, budget_id: str) -> None:
        await self.delete_row(budget_id, "budget", services.delete_budget)


class LimitsHandler(APIHandler):
    async def get(self) -> None:
        await self.send_list("limits", services.list_rate_limits)

    async def post(self) -> None:
        """Set the requests and tokens per minute of a subject; null lifts one, and with
        both null the limit is removed."""
        body = self.body()
        check_fields(body, LIMIT_FIELDS)
        scope, subject = _rule_target(body)
        rpm, tpm = body.get("rpm"), body.get("tpm")
        view = await self.run_service(
            lambda: services.set_rate_limit(
                scope=scope, subject=subject, rpm=rpm, tpm=tpm, actor=self.principal
            )
        )
        self.send(view.as_dict() if view is not None else {"deleted": True})


class LimitHandler(APIHandler):
    async def delete(self, limit_id: str) -> None:
        await self.delete_row(limit_id, "limit", services.delete_rate_limit)


class MyBudgetsHandler(APIHandler):
    async def get(self) -> None:
        mine = await self.run_service(lambda: services.my_budgets(self.principal))
        self.send(mine.as_dict())


default_handlers = [
    (r"/api/v1/budgets", BudgetsHandler),
    (r"/api/v1/budgets/([^/]+)", BudgetHandler),
    (r"/api/v1/limits", LimitsHandler),
    (r"/api/v1/limits/([^/]+)", LimitHandler),
    (r"/api/v1/me/budgets", MyBudgetsHandler),
]
