"""Trace pages: a filterable list, one trace as a readable conversation, its raw JSON,
and a tool session's tree of agents and traces in order. Members see their own traces;
admins and auditors their org's (the services decide)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import orjson
from tornado.web import authenticated

from admin_ui.base import UIHandler
from admin_ui.conversation import conversation
from tvgate import services
from tvgate.models import OUTCOME_OK, OUTCOMES


def when(at: float | None) -> str:
    """A UTC time the way every page shows it."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) if at else ""


class TracesHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        filters = {
            name: value.strip()
            for name in services.TRACE_FILTERS
            if (value := self.get_query_argument(name, "")).strip()
        }
        cursor = self.get_query_argument("cursor", "") or None
        user = self.user
        page, next_cursor = await self.run_service(
            lambda: services.list_traces(filters, cursor=cursor, limit=50, actor=user)
        )
        query = urlencode(filters)
        self.render(
            "traces.html",
            traces=page,
            filters=filters,
            next_cursor=next_cursor,
            filter_query=query,
            outcomes=OUTCOMES,
            when=when,
        )


class TraceHandler(UIHandler):
    @authenticated
    async def get(self, trace_id: str) -> None:
        user = self.user
        trace = await self.run_service(lambda: services.get_trace(trace_id, actor=user))
        talk = conversation(
            trace["endpoint"], trace["provider"], trace["request"], trace["response"]
        )
        self.render("trace.html", trace=trace, talk=talk, when=when)


class TraceRawHandler(UIHandler):
    """The trace as the JSON API gives it: request and answer exactly as captured."""

    @authenticated
    async def get(self, trace_id: str) -> None:
        user = self.user
        trace = await self.run_service(lambda: services.get_trace(trace_id, actor=user))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        # A browser shows it as text; nosniff (set for every page) keeps it that way.
        self.finish(orjson.dumps(trace, option=orjson.OPT_INDENT_2))


def nested(agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The agents (depth-first, with their depths) with what the page's nested list needs
    after each one: ``opens`` (its subagents follow in a list of their own) or ``closes``
    (how many enclosing lists end with it)."""
    rows = []
    for index, agent in enumerate(agents):
        following = agents[index + 1]["depth"] if index + 1 < len(agents) else 0
        opens = following > agent["depth"]
        rows.append({**agent, "opens": opens, "closes": 0 if opens else agent["depth"] - following})
    return rows


class SessionHandler(UIHandler):
    @authenticated
    async def get(self, session_id: str) -> None:
        user = self.user
        view = await self.run_service(lambda: services.session_view(session_id, actor=user))
        traces = view["traces"]
        totals: dict[str, Any] = {
            "input": sum(t["usage"]["input_tokens"] for t in traces),
            "output": sum(t["usage"]["output_tokens"] for t in traces),
            "cost": sum(t["cost_usd"] or 0 for t in traces),
            "errors": sum(1 for t in traces if t["outcome"] != OUTCOME_OK),
        }
        self.render(
            "session.html",
            session_id=session_id,
            traces=traces,
            agents=nested(view["agents"]),
            totals=totals,
            when=when,
            truncated=view["truncated"],
            traces_limit=view["traces_limit"],
        )


default_handlers = [
    (r"/ui/traces", TracesHandler),
    (r"/ui/traces/([0-9a-zA-Z_-]+)", TraceHandler),
    (r"/ui/traces/([0-9a-zA-Z_-]+)/raw", TraceRawHandler),
    (r"/ui/sessions/([^/]+)", SessionHandler),
]
