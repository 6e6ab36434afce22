"""``/api/v1/traces``, ``/api/v1/sessions``, ``/api/v1/prices``: reading what went through."""

from __future__ import annotations

from tvgate import services
from tvgate.api.base import APIHandler, check_fields, int_arg


class TracesHandler(APIHandler):
    async def get(self) -> None:
        filters = {
            name: value
            for name in services.TRACE_FILTERS
            if (value := self.get_query_argument(name, "")) != ""
        }
        cursor = self.get_query_argument("cursor", None)
        limit = int_arg(self.get_query_argument("limit", "50"), "limit")
        page, following = await self.run_service(
            lambda: services.list_traces(filters, cursor=cursor, limit=limit, actor=self.principal)
        )
        self.send({"traces": page, "next_cursor": following})


class TraceHandler(APIHandler):
    async def get(self, trace_id: str) -> None:
        document = await self.run_service(
            lambda: services.get_trace(trace_id, actor=self.principal)
        )
        self.send(document)


class SessionHandler(APIHandler):
    async def get(self, session: str) -> None:
        view = await self.run_service(lambda: services.session_view(session, actor=self.principal))
        self.send(view)


class PricesHandler(APIHandler):
    async def get(self) -> None:
        prices = await self.run_service(lambda: services.list_prices(actor=self.principal))
        self.send({"prices": prices})


class PriceHandler(APIHandler):
    """A model's price for the caller's own org (admins); the default table is the
    operator's (``tvgate prices set``)."""

    async def put(self, model: str) -> None:
        body = self.body()
        check_fields(body, services.PRICE_FIELDS, required=services.REQUIRED_PRICE_FIELDS)
        price = await self.run_service(
            lambda: services.set_price(model, body, actor=self.principal)
        )
        self.send(price)

    async def delete(self, model: str) -> None:
        await self.run_service(lambda: services.delete_price(model, actor=self.principal))
        self.send({"deleted": model})


default_handlers = [
    (r"/api/v1/traces", TracesHandler),
    (r"/api/v1/traces/([^/]+)", TraceHandler),
    (r"/api/v1/sessions/([^/]+)", SessionHandler),
    (r"/api/v1/prices", PricesHandler),
    (r"/api/v1/prices/([^/]+)", PriceHandler),
]
