"""One proxied call, stage by stage: identity, body, routing, key, upstream, capture, trace.

``ProxyCall`` owns a request from the moment its body is complete. Each stage
either passes on or answers the client with an error in the API's own
envelope. From authentication on, whatever happens (the client leaves, the
provider fails, tvgate refuses) the call ends by queueing exactly one trace.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

from tvgate.db import DatabaseUnavailable
from tvgate.identity import (
    ORG_HEADER,
    AuthError,
    IdentityUnavailable,
    OrgSelectionError,
    Principal,
    credential_from_headers,
)
from tvgate.keyring import KeyContext, KeyringError, KeyringUnavailable
from tvgate.providers import (
    ANTHROPIC_COUNT_TOKENS,
    Endpoint,
    auth_headers,
    stream_error_event,
)
from tvgate.providers.assemble import Assembled, StreamAssembler, assemble_json, stream_assembler
from tvgate.proxy.body import BodyError, ParsedBody, decode_content, parse_request_body, with_model
from tvgate.proxy.upstream import (
    CURLE_COULDNT_CONNECT,
    CURLE_COULDNT_RESOLVE_HOST,
    CURLE_OPERATION_TIMEDOUT,
    UpstreamExchange,
    UpstreamResult,
    upstream_url,
)
from tvgate.routing import RouteEntry, RouteNotFound
from tvgate.traces.attribution import (
    ATTRIBUTION_PREFIXES,
    attribution_header,
    detect_tool,
    session_id,
)
from tvgate.traces.writer import CapturedBody

if TYPE_CHECKING:
    from tvgate.proxy.handlers import ProxyHandler

log = logging.getLogger("tvgate.proxy")

OUTCOME_OK = "ok"
OUTCOME_CLIENT_CANCELLED = "client_cancelled"
OUTCOME_UPSTREAM_ERROR = "upstream_error"
OUTCOME_TIMEOUT = "timeout"
OUTCOME_REJECTED = "rejected"

#: Request headers that never go upstream: hop-by-hop, the client's own credentials
#: and cookies, and what tvgate recomputes (length, encoding).
_DROPPED_REQUEST_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "expect",
        "x-api-key",
        "authorization",
        "cookie",
    }
)
#: Response headers that are the business of each hop, not of the client.
_DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "content-length",
        "trailer",
        "upgrade",
        "set-cookie",
    }
)
#: How much of a non-streamed answer is kept for its trace.
_CAPTURE_LIMIT = 8 * 1024 * 1024


def upstream_headers(client_headers: HTTPHeaders, provider: str, secret: str) -> HTTPHeaders:
    """The client's headers as the provider should see them, with the provider key injected."""
    connection_listed = {
        token.strip().lower() for token in client_headers.get("Connection", "").split(",")
    }
    headers = HTTPHeaders()
    for name, value in client_headers.get_all():
        lower = name.lower()
        if (
            lower in _DROPPED_REQUEST_HEADERS
            or lower in connection_listed
            or lower.startswith(ATTRIBUTION_PREFIXES)
        ):
            continue
        headers.add(name, value)
    for name, value in auth_headers(provider, secret):
        headers[name] = value
    return headers


class ProxyCall:
    """A request through the proxy; also the upstream exchange's listener."""

    def __init__(self, handler: ProxyHandler, endpoint: Endpoint, started: float) -> None:
        self.handler = handler
        self.gateway = handler.gateway
        self.endpoint = endpoint
        self.provider = endpoint.provider
        self.started = started  # perf_counter when the body was complete
        self.received_at = time.time()
        self.principal: Principal | None = None
        self.route: RouteEntry | None = None
        self.body: ParsedBody | None = None
        self.upstream_model = ""
        self.exchange: UpstreamExchange | None = None
        self.upstream_started = 0.0
        self.first_byte = 0.0
        self.status = 0
        self.committed = False
        self.client_gone = False
        self.is_stream_response = False
        self.stream_counted = False
        self.assembler: StreamAssembler | None = None
        self.captured: list[bytes] = []
        self.captured_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.unflushed = 0
        self.draining = False
        self.upstream_request_id = ""
        self.outcome = ""
        self.error_type = ""
        self.error_message = ""

    # --- stages ---

    async def run(self, raw_body: bytes) -> None:
        self.bytes_in = len(raw_body)
        principal = await self._authenticate()
        if principal is None:
            return
        self.principal = principal
        try:
            await self._proxy(raw_body)
        except Exception:
            log.exception("proxy call failed")
            self._fail(500, "internal error in tvgate", OUTCOME_UPSTREAM_ERROR)
        finally:
            self._queue_trace()

    async def _authenticate(self) -> Principal | None:
        token = credential_from_headers(self.handler.request.headers)
        if not token:
            self.handler.send_api_error(
                401,
                "no credential: send your tvgate token as x-api-key or Authorization: Bearer",
                self.provider,
            )
            return None
        try:
            return await self.gateway.auth.authenticate(
                token, self.handler.request.headers.get(ORG_HEADER)
            )
        except AuthError as exc:
            self.handler.send_api_error(401, f"invalid credential: {exc}", self.provider)
        except OrgSelectionError as exc:
            self.handler.send_api_error(403, str(exc), self.provider)
        except (IdentityUnavailable, DatabaseUnavailable):
            self.handler.send_api_error(
                503, "identity check unavailable; try again shortly", self.provider
            )
        return None

    async def _proxy(self, raw_body: bytes) -> None:
        settings = self.gateway.settings
        headers = self.handler.request.headers
        try:
            decoded = decode_content(
                raw_body, headers.get("Content-Encoding"), settings.max_body_bytes
            )
            self.body = parse_request_body(decoded)
        except BodyError as exc:
            self._fail(exc.status, str(exc), OUTCOME_REJECTED)
            return
        assert self.principal is not None
        try:
            route = await self.gateway.router.resolve(self.principal, self.body.model)
        except RouteNotFound as exc:
            self._fail(404, str(exc), OUTCOME_REJECTED)
            return
        except DatabaseUnavailable:
            self._fail(503, "route store unavailable; try again shortly", OUTCOME_REJECTED)
            return
        self.route = route
        self.upstream_model = route.upstream_model_for(self.body.model)
        if route.key.provider != self.endpoint.provider:
            self._fail(
                400,
                f"route {route.name!r} goes to {route.key.provider}, which does not serve "
                f"this {self.endpoint.provider} endpoint",
                OUTCOME_REJECTED,
            )
            return
        if not settings.allow_private_upstreams and not route.key.base_url.startswith("https://"):
            self._fail(
                502,
                f"route {route.name!r} has a non-https upstream, which is not allowed",
                OUTCOME_REJECTED,
            )
            return
        key = route.key
        try:
            secret = await self.gateway.keys.get(
                key.ciphertext, KeyContext(key.org_id, key.id, key.owner_id)
            )
        except KeyringUnavailable:
            self._fail(
                503, "the key store is unavailable; try again shortly", OUTCOME_UPSTREAM_ERROR
            )
            return
        except KeyringError:
            log.error("key %s of org %d does not decrypt", key.name, key.org_id)
            self._fail(
                502,
                f"the key of route {route.name!r} cannot be used; ask an admin",
                OUTCOME_UPSTREAM_ERROR,
            )
            return
        if self.client_gone:
            self.outcome = OUTCOME_CLIENT_CANCELLED
            return
        await self._forward(secret)

    async def _forward(self, secret: str) -> None:
        assert self.route is not None and self.body is not None
        settings = self.gateway.settings
        request = self.handler.request
        self.exchange = UpstreamExchange(
            self.gateway.http,
            upstream_url(self.route.key.base_url, self.endpoint.upstream_path, request.query),
            upstream_headers(request.headers, self.provider, secret),
            with_model(self.body, self.upstream_model),
            self,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            allow_private=settings.allow_private_upstreams,
        )
        self.upstream_started = time.perf_counter()
        result = await self.exchange.run()
        self._complete(result)

    # --- the upstream listener (called synchronously from curl's callbacks) ---

    def on_upstream_headers(self, status: int, headers: list[tuple[str, str]]) -> None:
        handler = self.handler
        self.status = status
        handler.set_status(status)
        for name, value in headers:
            lower = name.lower()
            if lower in _DROPPED_RESPONSE_HEADERS:
                continue
            if lower in ("content-type", "server", "date"):
                handler.set_header(name, value)
                if lower == "content-type" and value.startswith("text/event-stream"):
                    self.is_stream_response = True
            else:
                handler.add_header(name, value)
            if lower in ("request-id", "x-request-id"):
                self.upstream_request_id = value
        handler.set_header("x-tvgate-overhead-ms", f"{self._overhead_ms():.3f}")
        if self.is_stream_response and not self.stream_counted:
            self.stream_counted = True  # closed again in _queue_trace
            self.gateway.metrics.stream_opened()
        if self.is_stream_response and self.endpoint.api != ANTHROPIC_COUNT_TOKENS:
            self.assembler = stream_assembler(self.endpoint.api)

    def on_upstream_chunk(self, chunk: bytes) -> bool:
        if self.client_gone:
            return True  # the exchange is aborting; nothing to deliver to
        handler = self.handler
        if self.unflushed >= self.gateway.settings.client_buffer_bytes:
            stream = handler.request.connection.stream  # type: ignore[union-attr]
            if stream.writing():
                self._wait_for_client(stream)
                return False
            self.unflushed = 0
        if not self.committed:
            self.committed = True
            self.first_byte = time.perf_counter()
        handler.write(chunk)
        handler.flush()
        size = len(chunk)
        self.bytes_out += size
        self.unflushed += size
        if self.assembler is not None:
            self.assembler.feed(chunk)
        elif self.captured_size < _CAPTURE_LIMIT:
            self.captured.append(chunk)
            self.captured_size += size
        return True

    def _wait_for_client(self, stream: Any) -> None:
        """Pause the provider until the client has read what it was sent."""
        if self.draining:
            return
        self.draining = True
        try:
            drained = stream.write(b"")
        except StreamClosedError:
            self.on_client_gone()
            return

        def resume(_future: Any) -> None:
            self.draining = False
            self.unflushed = 0
            if self.exchange is not None:
                self.exchange.resume()

        drained.add_done_callback(resume)

    def on_client_gone(self) -> None:
        """The client closed its connection: stop the provider's work at once."""
        self.client_gone = True
        if self.exchange is not None:
            self.exchange.abort()

    # --- endings ---

    def _overhead_ms(self) -> float:
        """tvgate's own time: from the complete request to the upstream request going out."""
        if not self.upstream_started:
            return (time.perf_counter() - self.started) * 1000
        return (self.upstream_started - self.started) * 1000

    def _fail(self, status: int, message: str, outcome: str) -> None:
        """End the call with an error, told the way the client can still hear it."""
        handler = self.handler
        self.outcome = outcome
        self.error_type = "gateway_error"
        self.error_message = message
        if handler._finished or self.client_gone:
            return
        if not self.committed:
            self.status = status
            handler.send_api_error(status, message, self.provider)
        elif self.is_stream_response:
            handler.write(stream_error_event(self.endpoint.api, message))
            handler.finish()
        else:
            # A JSON answer cut halfway cannot be mended; make the cut visible to the client.
            handler.request.connection.stream.close()  # type: ignore[union-attr]

    def _complete(self, result: UpstreamResult) -> None:
        # A client that hangs up right after the last event (SDKs do, on [DONE]) got the
        # whole answer, even if that made tvgate abort the transfer's last empty chunk.
        answered = result.curl_error == 0 or (
            self.assembler is not None and self.assembler.finish().complete
        )
        if answered:
            self.outcome = OUTCOME_OK if self.status < 400 else OUTCOME_UPSTREAM_ERROR
            if not self.client_gone:
                self.handler.finish()
            return
        if self.client_gone:
            self.outcome = OUTCOME_CLIENT_CANCELLED
            return
        self._fail(*_classify(result))

    def _queue_trace(self) -> None:
        principal = self.principal
        if principal is None:
            return
        assembled = self._assembled()
        if assembled is not None and assembled.error_type and self.outcome == OUTCOME_OK:
            self.outcome = OUTCOME_UPSTREAM_ERROR
        headers = self.handler.request.headers
        tool, tool_version = detect_tool(headers.get("User-Agent", ""))
        body = self.body
        usage = assembled.usage if assembled is not None else None
        finished = time.perf_counter()
        route = self.route
        truncated = assembled is not None and (
            assembled.truncated or (self.assembler is not None and not assembled.complete)
        )
        captured = (
            CapturedBody(body.raw, assembled.response if assembled is not None else None)
            if body is not None
            else None
        )
        if self.stream_counted:
            self.gateway.metrics.stream_closed()
        self.gateway.traces.submit(
            row := {
                "id": uuid.uuid4().hex,
                "org_id": principal.org_id,
                "user_id": principal.user_id,
                "route_name": route.name if route else "",
                "key_name": route.key.name if route else "",
                "provider": self.provider,
                "endpoint": self.endpoint.api,
                "requested_model": body.model if body else "",
                "upstream_model": self.upstream_model,
                "response_model": (assembled.model or "") if assembled else "",
                "stream": bool(body and body.document.get("stream") is True),
                "status_code": self.status,
                "outcome": self.outcome or OUTCOME_CLIENT_CANCELLED,
                "error_type": (assembled.error_type if assembled and assembled.error_type else "")
                or self.error_type,
                "error_message": (
                    (assembled.error_message or "") if assembled and assembled.error_type else ""
                )
                or self.error_message,
                "received_at": self.received_at,
                "first_byte_at": self._at(self.first_byte),
                "finished_at": self._at(finished),
                "overhead_ms": round(self._overhead_ms(), 3),
                "input_tokens": usage.input_tokens if usage else 0,
                "output_tokens": usage.output_tokens if usage else 0,
                "cache_read_tokens": usage.cache_read_tokens if usage else 0,
                "cache_write_tokens": usage.cache_write_tokens if usage else 0,
                "reasoning_tokens": usage.reasoning_tokens if usage else 0,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "tool": tool,
                "tool_version": tool_version,
                "session_id": session_id(headers),
                "upstream_request_id": self.upstream_request_id,
                "message_id": (assembled.message_id or "") if assembled else "",
                "repo": attribution_header(headers, "repo"),
                "branch": attribution_header(headers, "branch"),
                "truncated": truncated,
                "request_blob": "",
                "response_blob": "",
                "cost_usd": 0.0,
            },
            captured,
        )
        self.gateway.metrics.observe(row)

    def _at(self, perf: float) -> float | None:
        return self.received_at + (perf - self.started) if perf else None

    def _assembled(self) -> Assembled | None:
        if self.assembler is not None:
            return self.assembler.finish()
        if self.captured and self.endpoint.api != ANTHROPIC_COUNT_TOKENS:
            return assemble_json(self.endpoint.api, b"".join(self.captured))
        return None


def _classify(result: UpstreamResult) -> tuple[int, str, str]:
    """(status, message, outcome) for a transfer that failed."""
    if result.refused:
        return 502, result.refused, OUTCOME_UPSTREAM_ERROR
    if result.timed_out or result.curl_error == CURLE_OPERATION_TIMEDOUT:
        return 504, "timed out waiting for the provider", OUTCOME_TIMEOUT
    if result.curl_error in (CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_CONNECT):
        return 502, "could not connect to the provider", OUTCOME_UPSTREAM_ERROR
    return 502, "the connection to the provider failed", OUTCOME_UPSTREAM_ERROR
