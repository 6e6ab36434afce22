"""Proxy handlers: the provider-compatible endpoints tools call, kept thin.

Each handler reads the request and hands it to ``ProxyCall``. The paths are
those of the providers' APIs, also under ``/anthropic`` and ``/openai`` for
tools that want a provider-specific base URL, and under ``/proxy/anthropic`` and
``/proxy/openai``: Visdom Trace's own proxy path, so that the settings
``tracevault proxy info`` prints (``ANTHROPIC_BASE_URL=<server>/proxy/anthropic``)
work against tvgate unchanged; and Azure OpenAI's, for the ``openai`` SDK's
``AzureOpenAI`` client pointed at tvgate as its endpoint:
``/openai/deployments/{route}/chat/completions`` (the path names the route, as Azure's
names the deployment) and ``/openai/responses``, with the ``api-version`` query such a
client sends, which tvgate does not pass on (an Azure key sends its own). Every alias is
the same handler: same pipeline, same identity from ``x-api-key`` or ``Authorization``.
"""

from __future__ import annotations

import contextlib
import time
from asyncio import Future
from typing import Any
from urllib.parse import parse_qsl, urlencode

from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from tvgate.db import DatabaseUnavailable
from tvgate.models import PROVIDER_ANTHROPIC, PROVIDER_OPENAI
from tvgate.providers import ENDPOINTS, ProviderAPI, speaks
from tvgate.proxy.call import ProxyCall
from tvgate.translate.pairs import pair_for
from tvgate.web import BaseHandler, Refusal


@stream_request_body
class ProxyHandler(BaseHandler):
    """``POST /v1/<endpoint>``: authenticate, route, stream to the provider and back."""

    SUPPORTED_METHODS = ("POST", "GET")
    takes_subscription = True
    #: A caller's own Claude subscription may pass through this path (the Anthropic API's
    #: own; a cloud mode's path refuses it: tvgate.proxy.subscription).
    serves_subscriptions = True

    def initialize(self, endpoint: ProviderAPI) -> None:
        self.endpoint = endpoint
        self.call: ProxyCall | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._sent: Future[None] | None = None
        #: The route an Azure OpenAI path (``/openai/deployments/{route}/…``) or a Vertex AI
        #: one (``…/models/{route}:rawPredict``, ``tvgate.proxy.vertex_mode``) names, or "".
        self.path_route = ""

    @property
    def forwarded_query(self) -> str:
        """The client's query as it goes upstream: without Azure's ``api-version``."""
        query = self.request.query
        if "api-version" not in query:
            return query
        return urlencode([(k, v) for k, v in parse_qsl(query) if k != "api-version"])

    def prepare(self) -> None:
        if self.path_args:
            self.path_route = self.path_args[0]
        if self.request.method != "POST":
            return
        limit = self.gateway.settings.max_body_bytes
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            self._too_large = True
        # Tornado would drop the connection past its own limit; tvgate wants to answer
        # 413 in the API's envelope, so it reads (and discards) an oversized body itself.
        self.request.connection.set_max_body_size(max(limit * 4, 64 * 1024 * 1024))  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._size += len(chunk)
        if self._size > self.gateway.settings.max_body_bytes:
            self._too_large = True
            self._chunks.clear()
            return
        self._chunks.append(chunk)

    async def post(self, *_args: str) -> None:
        started = time.perf_counter()
        if self._too_large:
            limit = self.gateway.settings.max_body_bytes
            self.send_api_error(413, f"request body is over the {limit}-byte limit", self.endpoint)
            return
        self.call = ProxyCall(self, self.endpoint, started)
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        # A graceful stop waits for the calls counted here, until their last byte is sent.
        inflight = self.gateway.inflight
        inflight.enter(self.call)
        try:
            await self.call.run(body)
            if self._sent is not None:
                with contextlib.suppress(StreamClosedError):
                    await self._sent
        finally:
            inflight.leave(self.call)
            # The call refers to this handler: drop the reference back so that both are
            # freed when the request ends, not by the cyclic garbage collector.
            self.call = None

    def client_body(self, decoded: bytes) -> bytes:
        """The request body (its Content-Encoding undone) as the endpoint's API has it: as
        it came, unless a path of another shape carries the call (``tvgate.proxy.vertex_mode``);
        raises ``BodyError``."""
        return decoded

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        # Keep the future that resolves once the response has been written to the socket.
        self._sent = super().finish(chunk)
        return self._sent

    async def get(self, *_args: str) -> None:
        if self.request.headers.get("Upgrade", "").lower() == "websocket":
            # Codex tries Responses over WebSocket first; 426 makes it fall back to HTTP at once.
            self.set_header("Connection", "close")
            self.send_api_error(426, "tvgate serves this endpoint over HTTP only", self.endpoint)
            return
        self.send_api_error(405, f"use POST for {self.request.path}", self.endpoint)

    def on_connection_close(self) -> None:
        if self.call is not None:
            self.call.on_client_gone()


class ModelsHandler(BaseHandler):
    """``GET /v1/models``: the routes this caller may use, in the format its API uses."""

    SUPPORTED_METHODS = ("GET",)
    token_required = True
    takes_subscription = True

    async def get(self, *_args: str) -> None:
        if self.subscription:
            # Its calls take the model as sent to Anthropic, not a route of tvgate's.
            raise Refusal(
                400,
                "GET /v1/models lists tvgate's routes, which a Claude subscription does not "
                "use: its calls go to Anthropic with the model as sent; send your tvgate "
                "token as the credential to list the routes",
            )
        principal = self.principal
        try:
            snapshot = await self.gateway.router.snapshot(principal.org_id)
        except DatabaseUnavailable:
            raise Refusal(503, "route store unavailable; try again shortly") from None
        api = self.error_api()
        # A route of the other provider is usable through translation, unless it is off.
        routes = [
            (r.name, r.key.provider)
            for r in snapshot.available(principal)
            if not r.is_pattern
            and (
                speaks(r.key.provider) == api.provider
                or (r.translate and pair_for(api, speaks(r.key.provider)) is not None)
            )
        ]
        self.set_header("Content-Type", "application/json")
        self.finish(api.models_body(routes))


class RootHandler(BaseHandler):
    """``GET /`` and ``HEAD /``: tools probe the base URL; browsers get a link to the UI."""

    def head(self) -> None:
        self.set_status(200)

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            b'<!doctype html><meta charset="utf-8"><title>tvgate</title>'
            b'<p>tvgate is running. <a href="/ui/">Open the web UI</a>.</p>'
        )


#: Where each provider's endpoints are served, before ``/v1/``.
PREFIXES = {p: ("", "/" + p, "/proxy/" + p) for p in (PROVIDER_ANTHROPIC, PROVIDER_OPENAI)}
#: The operations Azure OpenAI serves under a deployment, which the path names.
_DEPLOYMENT_OPERATIONS = ("chat/completions", "completions", "embeddings")


def _endpoint_routes() -> list[tuple[str, type, dict[str, Any]]]:
    routes: list[tuple[str, type, dict[str, Any]]] = []
    for suffix, endpoint in ENDPOINTS.items():
        for prefix in PREFIXES[endpoint.provider]:
            routes.append((f"{prefix}/v1/{suffix}", ProxyHandler, {"endpoint": endpoint}))
        if suffix in _DEPLOYMENT_OPERATIONS:
            path = f"/openai/deployments/([^/]+)/{suffix}"
            routes.append((path, ProxyHandler, {"endpoint": endpoint}))
    routes.append(("/openai/responses", ProxyHandler, {"endpoint": ENDPOINTS["responses"]}))
    return routes


default_handlers: list[tuple[str, type, dict[str, Any]] | tuple[str, type]] = [
    ("/", RootHandler),
    *_endpoint_routes(),
    (r"(?:(?:/proxy)?/anthropic|(?:/proxy)?/openai)?/v1/models", ModelsHandler),
]
