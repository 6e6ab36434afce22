"""The overview page: usage over time and by user, route and tool, drawn on the server."""

from __future__ import annotations

from typing import Any

from tornado.web import authenticated

from admin_ui.base import READERS, UIHandler
from admin_ui.charts import Chart, bar_chart
from admin_ui.governance import template_helpers
from tvgate import services


class OverviewHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        range_name = self.get_query_argument("range", "24h")
        user = self.user
        reader = user.role in READERS

        def load() -> tuple[dict[str, Any], list[services.BudgetView]]:
            usage = services.usage_overview(range_name, actor=user)
            # Readers see every budget of the org; members the ones that apply to them.
            budgets = (
                services.list_budgets(actor=user) if reader else services.my_budgets(user).budgets
            )
            return usage, budgets

        data, budgets = await self.run_service(load)
        self.render(
            "overview.html",
            data=data,
            subject="",
            scope_org=reader,
            charts=overview_charts(data),
            tables=overview_tables(data, reader),
            budgets=budgets,
            deletable=False,
            **template_helpers(),
        )


def overview_charts(data: dict[str, Any]) -> list[Chart]:
    seconds = data["bucket_seconds"]
    series = data["series"]
    return [
        bar_chart("Requests", series, "requests", seconds),
        bar_chart("Tokens (in + out)", series, "tokens", seconds, css="tokens"),
        bar_chart("Cost (USD)", series, "cost", seconds, fmt=lambda v: f"${v:,.2f}", css="cost"),
        bar_chart("Errors", series, "errors", seconds, css="errors"),
    ]


def overview_tables(
    data: dict[str, Any], with_users: bool
) -> list[tuple[str, str, list[dict[str, Any]]]]:
    tables = [
        ("By route", "Route", data["by_route"]),
        ("By tool", "Tool", data["by_tool"]),
        ("Slowest routes", "Route", data["slowest_routes"]),
        ("Failing routes", "Route", data["failing_routes"]),
    ]
    if with_users:
        tables.insert(0, ("By user", "User", data["by_user"]))
    return tables


default_handlers = [(r"/ui/?", OverviewHandler)]
