"""``/api/v1/visdom``: the caller's org's Visdom Trace ingestion (admins of the org only):
its status, connecting it (the org ingest key in, never out), disconnecting it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvgate import services
from tvgate.api.base import APIError, APIHandler, check_fields
from tvgate.identity import Principal
from tvgate.web import BaseHandler

CONNECT_FIELDS = {"url", "key", "project", "legacy_org_slug"}


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a string")
    if required and not value:
        raise APIError(400, f"{name} is required")
    return value


def connect(
    handler: BaseHandler, actor: Principal, url: str, key: str, project: str, slug: str
) -> Callable[[], services.VisdomStatus]:
    """The connect a handler of the API or the UI runs, as ``actor``, with the gateway's
    keyring and upstream rules."""
    gateway = handler.gateway
    return lambda: services.connect_visdom(
        url,
        key,
        gateway.keyring,
        project=project,
        legacy_slug=slug,
        allow_private=gateway.settings.allow_private_upstreams,
        actor=actor,
    )


class VisdomHandler(APIHandler):
    async def get(self) -> None:
        status = await self.run_service(lambda: services.visdom_status(actor=self.principal))
        self.send(status.as_dict())

    async def put(self) -> None:
        body = self.body()
        check_fields(body, CONNECT_FIELDS, required=("url", "key"))
        url, key = _text(body, "url", required=True), _text(body, "key", required=True)
        project, slug = _text(body, "project"), _text(body, "legacy_org_slug")
        status = await self.run_service(connect(self, self.principal, url, key, project, slug))
        self.send(status.as_dict())

    async def delete(self) -> None:
        dropped = await self.run_service(lambda: services.disconnect_visdom(actor=self.principal))
        self.send({"disconnected": True, "undelivered_dropped": dropped})


default_handlers = [(r"/api/v1/visdom", VisdomHandler)]
