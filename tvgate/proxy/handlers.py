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
A WebSocket upgrade on a Responses path (each of its aliases) goes to
``tvgate.proxy.websocket.ResponsesSocket`` instead, Codex's Responses API over WebSocket.
"""

from __future__ import annotations

import contextlib
import logging
import time
from asyncio import Future
from typing import Any
from urllib.parse import parse_qsl, urlencode

from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.routing import Rule
from tornado.web import stream_request_body

from tvgate.db import DatabaseUnavailable
from tvgate.models import PROVIDER_ANTHROPIC, PROVIDER_OPENAI
from tvgate.providers import ENDPOINTS, ProviderAPI
from tvgate.proxy.call import ProxyCall
from tvgate.proxy.model_list import PageError, PageRequest, listed_routes
from tvgate.proxy.websocket import ResponsesSocket, UpgradeMatches
from tvgate.traces.attribution import detect_tool
from tvgate.web import BaseHandler, Refusal

log = logging.getLogger("tvgate.proxy")


@stream_request_body
class ProxyHandler(BaseHandler):
    """``POST /v1/<endpoint>``: authenticate, route, stream to the provider and back."""

    SUPPORTED_METHODS = ("POST", "GET")
    transport = ""
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
    def client_headers(self) -> HTTPHeaders:
        return self.request.headers

    def pending_write(self) -> Future[None] | None:
        stream = self.request.connection.stream  # type: ignore[union-attr]
        return stream.write(b"") if stream.writing() else None

    def cut(self) -> None:
        self.request.connection.stream.close()  # type: ignore[union-attr]

    @property
    def forwarded_query(self) -> str:
        """The client's query as it goes upstream: without Azure's ``api-version``."""
        query = self.request.query
        if "api-version" not in query:
            return query
        return urlencode([(k, v) for k, v in parse_qsl(query) if k != "api-version"])

    @property
    def request_path(self) -> str:
        return self.request.path

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
            # Responses is served over WebSocket (tvgate.proxy.websocket); for any other
            # endpoint, 426 makes a client fall back to HTTP at once.
            self.set_header("Connection", "close")
            self.send_api_error(426, "tvgate serves this endpoint over HTTP only", self.endpoint)
            return
        self.send_api_error(405, f"use POST for {self.request.path}", self.endpoint)

    def on_connection_close(self) -> None:
        if self.call is not None:
            self.call.on_client_gone()


class ModelsHandler(BaseHandler):
    """``GET /v1/models``: the routes this caller may use, in the format its API uses, a
    page at a time in Anthropic's (``tvgate.proxy.model_list``)."""

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
        routes = listed_routes(snapshot.available(principal), api)
        has_more, limit = False, 0
        if api.provider == PROVIDER_ANTHROPIC:
            try:
                request = PageRequest.parse(lambda name: self.get_query_argument(name, None))
            except PageError as exc:
                raise Refusal(400, str(exc)) from None
            routes, has_more = request.page(routes)
            limit = request.limit
        if log.isEnabledFor(logging.DEBUG):
            # Whether a tool's model discovery reached the gateway and what it was shown
            # (names its user may see anyway; never the query's cursors as sent).
            log.debug(
                "model list for user %d (%s, %s format, limit %d): %d routes%s: %s",
                principal.user_id,
                detect_tool(self.request.headers.get("User-Agent", ""))[0],
                api.provider,
                limit,
                len(routes),
                ", more follow" if has_more else "",
                ", ".join(name for name, _ in routes[:50]),
            )
        self.set_header("Content-Type", "application/json")
        self.finish(api.models_body(routes, has_more=has_more))


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


def _endpoint_routes() -> list[Rule | tuple[str, type, dict[str, Any]]]:
    routes: list[Rule | tuple[str, type, dict[str, Any]]] = []
    responses_paths = [f"{prefix}/v1/responses" for prefix in PREFIXES[PROVIDER_OPENAI]]
    responses_paths.append("/openai/responses")
    # Responses over WebSocket on the same paths (an upgrade request goes there, a POST here).
    routes += [Rule(UpgradeMatches(path), ResponsesSocket) for path in responses_paths]
    for suffix, endpoint in ENDPOINTS.items():
        for prefix in PREFIXES[endpoint.provider]:
            routes.append((f"{prefix}/v1/{suffix}", ProxyHandler, {"endpoint": endpoint}))
        if suffix in _DEPLOYMENT_OPERATIONS:
            path = f"/openai/deployments/([^/]+)/{suffix}"
            routes.append((path, ProxyHandler, {"endpoint": endpoint}))
    routes.append(("/openai/responses", ProxyHandler, {"endpoint": ENDPOINTS["responses"]}))
    return routes


default_handlers: list[Rule | tuple[str, type, dict[str, Any]] | tuple[str, type]] = [
    ("/", RootHandler),
    *_endpoint_routes(),
    (r"(?:(?:/proxy)?/anthropic|(?:/proxy)?/openai)?/v1/models", ModelsHandler),
]
