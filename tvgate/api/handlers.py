"""The API's URL table, and its answer for paths it does not have."""

from __future__ import annotations

from typing import Any

from tvgate.api import governance, openapi, resources, tokens, traces, visdom
from tvgate.api.base import APIError, APIHandler


class APINotFoundHandler(APIHandler):
    async def prepare(self) -> None:
        raise APIError(404, f"the API has no {self.request.method} {self.request.path}")


default_handlers: list[Any] = [
    *openapi.default_handlers,
    *tokens.default_handlers,
    *resources.default_handlers,
    *governance.default_handlers,
    *traces.default_handlers,
    *visdom.default_handlers,
    (r"/api/.*", APINotFoundHandler),
]
