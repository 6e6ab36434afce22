"""One proxied call, stage by stage: identity, body, routing, key, upstream, capture, trace.

``ProxyCall`` owns a request from the moment its body is complete. Each stage
either passes on or answers the client with an error in the API's own
envelope. From authentication on, whatever happens (the client leaves, the
provider fails, tvgate refuses) the call ends by queueing exactly one trace.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

from tvgate.db import DatabaseUnavailable
from tvgate.governance.governor import (
    ATTEMPT_SCOPES,
    GATEWAY_RESOURCE,
    Admission,
    Demand,
    Refused,
    key_resource,
)
from tvgate.governance.policy import NO_GOVERNANCE, Governance
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
from tvgate.providers.assemble import (
    JSON_TAIL_BYTES,
    Assembled,
    StreamAssembler,
    assemble_json,
    assemble_json_tail,
    checked_usage,
    stream_assembler,
)
from tvgate.proxy.body import BodyError, ParsedBody, decode_content, parse_request_body, with_model
from tvgate.proxy.hops import HOP_HEADER, incoming_marks, is_loop, outgoing_marks
from tvgate.proxy.scrub import KeyScrubber
from tvgate.proxy.upstream import (
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
#: The gateway stopped (the drain timeout passed) before the call ended.
OUTCOME_GATEWAY_SHUTDOWN = "gateway_shutdown"
#: What a client cut at the drain timeout is told, in its API's format.
SHUTDOWN_MESSAGE = "the gateway is shutting down"

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
#: Response headers that are the business of each hop, not of the client; and what a
#: provider must not say on the gateway's origin, which also serves the web UI: cookies,
#: a content security policy, CORS grants (every ``access-control-*`` header:
#: ``_CORS_PREFIX``), what a browser keeps for the whole origin (HSTS, which tvgate sets
#: itself when its public URL is https; alternative services; site data to clear; pins;
#: where to report errors); and the loop mark of an upstream tvgate.
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
        "set-cookie2",
        "content-security-policy",
        "content-security-policy-report-only",
        "strict-transport-security",
        "alt-svc",
        "clear-site-data",
        "public-key-pins",
        "public-key-pins-report-only",
        "expect-ct",
        "nel",
        "report-to",
        "reporting-endpoints",
        HOP_HEADER,
    }
)
_CORS_PREFIX = "access-control-"
#: A header name (RFC 9110 token), as Tornado checks it.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Stream chunks relayed but not yet parsed, at most: a stream is parsed after its
#: answer is finished, so the client does not wait for it, or in runs of this size.
_UNPARSED_LIMIT = 16 * 1024
#: How much of a failed answer is kept while a fallback is tried.
_HELD_LIMIT = 64 * 1024


def upstream_headers(
    client_headers: HTTPHeaders, provider: str, secret: str, hop_marks: str
) -> dict[str, str] | HTTPHeaders:
    """The client's headers as the provider should see them, with the provider key injected
    and the loop mark (``tvgate.proxy.hops``) set.

    A plain dict when no header name repeats (the usual case): the HTTP client copies it
    into its own ``HTTPHeaders`` anyway, and building one here too would validate and
    normalise every header twice more. Names are already normalised by Tornado's parser.
    """
    lines = _forwarded_lines(client_headers)
    headers: dict[str, str] | HTTPHeaders = dict(lines)
    if len(headers) < len(lines):
        # A name repeats: every line is kept, as the client sent it.
        headers = HTTPHeaders()
        for name, value in lines:
            headers.add(name, value)
    for name, value in auth_headers(provider, secret):
        headers[name] = value
    headers[HOP_HEADER] = hop_marks
    return headers


def _forwarded_lines(client_headers: HTTPHeaders) -> list[tuple[str, str]]:
    """The client's header lines less hop-by-hop, credentials and tvgate's own."""
    connection_listed = {
        token.strip().lower() for token in client_headers.get("Connection", "").split(",")
    }
    return [
        (name, value)
        for name, value in client_headers.get_all()
        if not (
            (lower := name.lower()) in _DROPPED_REQUEST_HEADERS
            or lower in connection_listed
            or lower.startswith(ATTRIBUTION_PREFIXES)
        )
    ]


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
        #: The outcome of a call whose client side ended before the call did: the client
        #: hung up, unless the gateway cut it at stop.
        self.gone_outcome = OUTCOME_CLIENT_CANCELLED
        self.is_stream_response = False
        self.stream_counted = False
        self.assembler: StreamAssembler | None = None
        self.captured: list[bytes] = []
        self.captured_size = 0
        #: The end of a non-streamed answer longer than ``capture_max_bytes``, where its
        #: usage is (empty otherwise).
        self.captured_tail = bytearray()
        self.unparsed: list[bytes] = []
        self.unparsed_size = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.unflushed = 0
        self.draining = False
        self.upstream_request_id = ""
        self.outcome = ""
        self.error_type = ""
        self.error_message = ""
        self.governance: Governance = NO_GOVERNANCE
        self.admission: Admission | None = None
        #: The admission charged when a fallback with budgets of its own served the call.
        self.serving_admission: Admission | None = None
        #: Every admission made for the call (its own, its fallbacks'): settled at its end.
        self.admissions: list[Admission] = []
        self.gateway_slot = False
        #: True while the route being tried has fallbacks left after it.
        self.may_fall_back = False
        self.holding: _HeldAnswer | None = None
        self.last_failure: _HeldAnswer | None = None
        self.attempts: list[dict[str, Any]] = []
        #: The provider keys this call sent, masked in whatever comes back from upstream.
        self.scrubber = KeyScrubber()
        #: The 3xx status the provider answered the current attempt with (0: none).
        self.redirected = 0
        self.hop_marks: list[str] = []

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
            if self.gateway_slot:
                self.gateway.governor.release(GATEWAY_RESOURCE)
            self._queue_trace()  # charges the usage first: settling then frees the rest
            for admission in self.admissions:
                self.gateway.governor.settle(admission)

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
        self.hop_marks = incoming_marks(headers)
        if is_loop(self.hop_marks, self.gateway.hop_id):
            # Before routing and governance: a loop must not take a slot or a budget.
            self._fail(
                508,
                "loop detected: this request already passed through this gateway "
                "(a route's base URL leads back to tvgate)",
                OUTCOME_REJECTED,
            )
            self.error_type = "loop_detected"
            return
        principal = self.principal
        assert principal is not None
        try:
            snapshot, route = await self.gateway.router.resolve(principal, self.body.model)
        except RouteNotFound as exc:
            self._fail(404, str(exc), OUTCOME_REJECTED)
            return
        except DatabaseUnavailable:
            self._fail(503, "route store unavailable; try again shortly", OUTCOME_REJECTED)
            return
        self.route = route
        self.upstream_model = route.upstream_model_for(self.body.model)
        governor = self.gateway.governor
        self.governance = snapshot.governance
        try:
            if self.governance.active:
                self.admission = await governor.admit(
                    self.governance,
                    principal.org_id,
                    principal.user_id,
                    route.name,
                    route.key.name,
                    demand=self._demand(route),
                )
                self.admissions.append(self.admission)
            if governor.gateway_cap:
                await governor.acquire(GATEWAY_RESOURCE, governor.gateway_cap)
                self.gateway_slot = True
        except Refused as exc:
            self._refuse(exc)
            return
        # A fallback this principal may not use (or that no longer exists) is skipped.
        chain: list[tuple[str, RouteEntry | None]] = [(route.name, route)]
        chain += [(name, snapshot.named(principal, name)) for name in route.fallbacks]
        for index, (name, entry) in enumerate(chain):
            self.may_fall_back = index + 1 < len(chain)
            if entry is None:
                self._record_attempt(None, name, 0, OUTCOME_REJECTED, "no such route for you")
                continue
            if await self._attempt(entry, is_fallback=index > 0):
                return
            if self.client_gone:
                self.outcome = self.gone_outcome
                return
        self._answer_last_failure()

    def _demand(self, entry: RouteEntry) -> Demand:
        """What the call may use on ``entry``: its input estimated at 4 bytes a token (about
        what JSON and English text come to), and the output limit it sets."""
        assert self.body is not None
        return Demand(
            -(-len(self.body.raw) // 4),
            self.body.max_output,
            entry.key.provider,
            entry.upstream_model_for(self.body.model),
        )

    async def _attempt(self, entry: RouteEntry, *, is_fallback: bool) -> bool:
        """One upstream attempt on ``entry``; False when the next fallback should be tried."""
        assert self.body is not None and self.principal is not None
        settings = self.gateway.settings
        governor = self.gateway.governor
        model = entry.upstream_model_for(self.body.model)
        refusal: tuple[int, str] | None = None
        if entry.key.provider != self.endpoint.provider:
            refusal = (
                400,
                f"route {entry.name!r} goes to {entry.key.provider}, which does not serve "
                f"this {self.endpoint.provider} endpoint",
            )
        elif not entry.key.base_url.startswith("https://") and not settings.allows_private_upstream(
            entry.key.owner_id is not None
        ):
            refusal = (502, f"route {entry.name!r} has a non-https upstream, which is not allowed")
        elif "?" in entry.key.base_url or "#" in entry.key.base_url:
            # Stored before base URLs with a query or a fragment were refused (add_key).
            refusal = (502, f"route {entry.name!r} has a base URL with a query or fragment")
        if refusal is not None:
            if is_fallback:
                self._record_attempt(entry, model, 0, OUTCOME_REJECTED, refusal[1])
                return False
            self._fail(*refusal, OUTCOME_REJECTED)
            return True
        attempt_admission: Admission | None = None
        key_resource_name = ""
        try:
            if is_fallback and self.governance.active:
                attempt_admission = await governor.admit(
                    self.governance,
                    self.principal.org_id,
                    self.principal.user_id,
                    entry.name,
                    entry.key.name,
                    scopes=ATTEMPT_SCOPES,
                    demand=self._demand(entry),
                )
                self.admissions.append(attempt_admission)
            if entry.key.max_concurrent:
                await governor.acquire(key_resource(entry.key.id), entry.key.max_concurrent)
                key_resource_name = key_resource(entry.key.id)
        except Refused as exc:
            if is_fallback:
                self._record_attempt(entry, model, 429, OUTCOME_REJECTED, str(exc))
                return False
            self._refuse(exc)
            return True
        try:
            self.route = entry
            self.upstream_model = model
            if attempt_admission is not None and self.admission is not None:
                self.serving_admission = self.admission.for_attempt(attempt_admission)
            return await self._attempt_with_key(entry, is_fallback=is_fallback)
        finally:
            if key_resource_name:
                governor.release(key_resource_name)

    async def _attempt_with_key(self, entry: RouteEntry, *, is_fallback: bool) -> bool:
        key = entry.key
        try:
            secret = await self.gateway.keys.get(
                key.ciphertext, KeyContext(key.org_id, key.id, key.owner_id)
            )
        except (KeyringUnavailable, KeyringError) as exc:
            if isinstance(exc, KeyringUnavailable):
                status, message = 503, "the key store is unavailable; try again shortly"
            else:
                log.error("key %s of org %d does not decrypt: %s", key.name, key.org_id, exc)
                status = 502
                message = f"the key of route {entry.name!r} cannot be used; ask an admin"
            if is_fallback:
                self._record_attempt(
                    entry, self.upstream_model, status, OUTCOME_UPSTREAM_ERROR, message
                )
                return False
            self._fail(status, message, OUTCOME_UPSTREAM_ERROR)
            return True
        if self.client_gone:
            self.outcome = self.gone_outcome
            return True
        self.scrubber.add(secret)
        self.gateway.key_uses.record(key.id)
        return await self._forward(secret)

    async def _forward(self, secret: str) -> bool:
        assert self.route is not None and self.body is not None
        settings = self.gateway.settings
        request = self.handler.request
        self.exchange = UpstreamExchange(
            self.gateway.http,
            upstream_url(self.route.key.base_url, self.endpoint.upstream_path, request.query),
            upstream_headers(
                request.headers,
                self.provider,
                secret,
                outgoing_marks(self.hop_marks, self.gateway.hop_id),
            ),
            with_model(self.body, self.upstream_model),
            self,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            allow_private=settings.allows_private_upstream(self.route.key.owner_id is not None),
        )
        started = time.perf_counter()
        if not self.upstream_started:
            self.upstream_started = started
        self.redirected = 0
        result = await self.exchange.run()
        if self.redirected:
            result = dataclasses.replace(
                result,
                refused=f"the provider answered with a redirect ({self.redirected}), "
                "which tvgate neither follows nor relays",
            )
        elapsed = (time.perf_counter() - started) * 1000
        if result.failed and not self.client_gone:
            self._log_failure(result)
        held = self.holding
        if held is not None:
            # The provider failed in a way a fallback may mend, and the client has seen none
            # of it: keep the answer in case no fallback does better.
            self.holding = None
            self.last_failure = held
            self._record_attempt(
                self.route,
                self.upstream_model,
                held.status,
                OUTCOME_UPSTREAM_ERROR,
                held.message(),
                elapsed,
            )
            return False
        if self.may_fall_back and result.failed and not self.status and not self.client_gone:
            status, message, outcome = _classify(result)
            self.last_failure = _HeldAnswer(
                self.route, self.upstream_model, status, [], [], (message, outcome)
            )
            self._record_attempt(self.route, self.upstream_model, status, outcome, message, elapsed)
            return False
        self._complete(result)
        if self.attempts:
            self._record_attempt(
                self.route,
                self.upstream_model,
                self.status,
                self.outcome,
                self.error_message,
                elapsed,
            )
        return True

    def _log_failure(self, result: UpstreamResult) -> None:
        """A transfer failed (not the client's doing): a warning an operator can act on."""
        assert self.route is not None
        key = self.route.key
        log.warning(
            "provider call of org %d on route %r (key %r) failed: %s (curl error %d: %s)",
            key.org_id,
            self.route.name,
            key.name,
            result.describe(),
            result.curl_error,
            self.scrubber.text(result.message),
        )

    def _answer_last_failure(self) -> None:
        """Every route failed: the client gets the last provider failure, as it came."""
        failure = self.last_failure
        if failure is None:
            self._fail(502, "no route could serve this request", OUTCOME_UPSTREAM_ERROR)
            return
        self.route = failure.route
        self.upstream_model = failure.upstream_model
        self.may_fall_back = False
        if failure.classified is not None:
            message, outcome = failure.classified
            self._fail(failure.status, message, outcome)
            return
        self.on_upstream_headers(failure.status, failure.headers, whole_body=False)
        for chunk in failure.chunks:
            self.on_upstream_chunk(chunk)
        self._complete(UpstreamResult(0, ""))

    def _record_attempt(
        self,
        route: RouteEntry | None,
        name_or_model: str,
        status: int,
        outcome: str,
        error: str,
        ms: float = 0.0,
    ) -> None:
        self.attempts.append(
            {
                "route": route.name if route is not None else name_or_model,
                "key": route.key.name if route is not None else "",
                "provider": route.key.provider if route is not None else "",
                "upstream_model": name_or_model if route is not None else "",
                "status": status,
                "outcome": outcome,
                # Masked before it is cut: a cut key would no longer be recognised.
                "error": self.scrubber.text(error)[:500],
                "ms": round(ms, 1),
            }
        )

    def _refuse(self, refusal: Refused) -> None:
        """Over a budget, a rate limit or a cap: 429 in the API's envelope, with retry-after."""
        self.outcome = OUTCOME_REJECTED
        self.error_type = "rate_limited"
        self.error_message = str(refusal)
        self.status = 429
        if not self.client_gone:
            self.handler.send_api_error(
                429, str(refusal), self.provider, retry_after=str(refusal.retry_after)
            )

    # --- the upstream listener (called synchronously from curl's callbacks) ---

    def on_upstream_headers(
        self, status: int, headers: list[tuple[str, str]], *, whole_body: bool = True
    ) -> None:
        """The provider's status and headers, passed on to the client.

        ``whole_body``: every byte of the body will follow (not a held answer cut at
        its limit), so a ``Content-Length`` can be kept. A redirect is neither followed nor
        relayed (its ``Location`` would send the client, credential and all, wherever the
        provider says): the transfer is stopped and the call fails with a 502. Keys the
        provider echoes are masked in every header.
        """
        if 300 <= status < 400:
            self.redirected = status
            if self.exchange is not None:
                self.exchange.abort()
            return
        if self.may_fall_back and (status in (429, 529) or status >= 500):
            assert self.route is not None
            self.holding = _HeldAnswer(self.route, self.upstream_model, status, headers, [], None)
            return
        handler = self.handler
        self.status = status
        handler.set_status(status)
        length = ""
        framed = False
        seen: set[str] = set()
        mask = self.scrubber.text
        for raw_name, raw_value in headers:
            lower = raw_name.lower()
            if lower in _DROPPED_RESPONSE_HEADERS or lower.startswith(_CORS_PREFIX):
                if lower == "content-length":
                    length = raw_value
                elif lower == "transfer-encoding":
                    framed = True  # the length, if any, is not the body's (RFC 9112 6.3)
                continue
            name, value = mask(raw_name), mask(raw_value)
            if lower in ("content-type", "server", "date"):
                handler.set_header(name, value)
                if lower == "content-type" and value.startswith("text/event-stream"):
                    self.is_stream_response = True
            elif lower in seen or not _FIELD_NAME.fullmatch(name):
                handler.add_header(name, value)  # a repeated line; or refused, as it should be
            else:
                # The first line of this name: add_header would validate the name and value
                # again on top of set_header's check of the value.
                seen.add(lower)
                handler.set_header(name, value)
            if lower in ("request-id", "x-request-id"):
                self.upstream_request_id = value
        if (
            length.isdigit()
            and not framed
            and whole_body
            and not self.is_stream_response
            and status != 204
        ):
            # The body is relayed byte for byte (a masked key is as long as the key): with
            # its length known, Tornado sends it with the headers in one write, not chunked
            # with a closing chunk after it.
            # (A stream is left chunked: a failure may add an error event to it.)
            handler.set_header("Content-Length", length)
        handler.set_header("x-tvgate-overhead-ms", f"{self._overhead_ms():.3f}")
        admission = self.serving_admission or self.admission
        if admission is not None and admission.warnings:
            # Names may be any Unicode; a header is Latin-1 on the wire: escape the rest.
            warning = "; ".join(admission.warnings).encode("ascii", "backslashreplace")
            handler.set_header("x-tvgate-budget-warning", warning.decode())
        if self.is_stream_response and not self.stream_counted:
            self.stream_counted = True  # closed again in _queue_trace
            self.gateway.metrics.stream_opened()
        if self.is_stream_response and self.endpoint.api != ANTHROPIC_COUNT_TOKENS:
            # What the trace keeps of the answer is bounded per call, whatever the stream's
            # length: past the bound the capture is cut (and the trace marked truncated).
            self.assembler = stream_assembler(
                self.endpoint.api, max_retained=self.gateway.settings.capture_max_bytes
            )

    def on_upstream_chunk(self, chunk: bytes) -> bool:
        if self.client_gone:
            return True  # the exchange is aborting; nothing to deliver to
        if self.holding is not None:
            self.holding.keep(chunk)
            return True
        handler = self.handler
        if self.unflushed >= self.gateway.settings.client_buffer_bytes:
            stream = handler.request.connection.stream  # type: ignore[union-attr]
            if stream.writing():
                self._wait_for_client(stream)
                return False
            self.unflushed = 0
        # Masked only once taken: a chunk refused above comes again after the pause.
        self._relay(self.scrubber.chunk(chunk))
        return True

    def _relay(self, chunk: bytes) -> None:
        """Send (and keep for the trace) a part of the provider's body, keys masked."""
        if not chunk:
            return  # all of it held back by the scrubber until the next chunk
        handler = self.handler
        if not self.committed:
            self.committed = True
            self.first_byte = time.perf_counter()
        handler.write(chunk)
        handler.flush()
        size = len(chunk)
        self.bytes_out += size
        self.unflushed += size
        if self.assembler is not None:
            self.unparsed.append(chunk)
            self.unparsed_size += size
            if self.unparsed_size >= _UNPARSED_LIMIT:
                self._parse_unparsed(self.assembler)
        elif not self.captured_tail and self.captured_size + size <= self._capture_max:
            self.captured.append(chunk)
            self.captured_size += size
        else:
            self._keep_tail(chunk)

    @property
    def _capture_max(self) -> int:
        return self.gateway.settings.capture_max_bytes

    def _keep_tail(self, chunk: bytes) -> None:
        """Past ``capture_max_bytes`` of a JSON answer, keep only its end, where its usage is:
        the head cannot be parsed without the rest, so it is let go."""
        keep = min(JSON_TAIL_BYTES, self._capture_max)
        tail = self.captured_tail
        if self.captured:
            tail += b"".join(self.captured)[-keep:]
            self.captured.clear()
            self.captured_size = 0
        tail += chunk[-keep:]
        if len(tail) > keep:
            del tail[: len(tail) - keep]

    def _parse_unparsed(self, assembler: StreamAssembler) -> StreamAssembler:
        for chunk in self.unparsed:
            assembler.feed(chunk)
        self.unparsed.clear()
        self.unparsed_size = 0
        return assembler

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

    def shut_down(self) -> None:
        """The gateway stops and the drain timeout passed: tell the client in its API's
        format (the in-band error event once a stream started), stop the provider's work,
        and record the call as ``gateway_shutdown``, not as the client's doing."""
        if self.client_gone or self.handler._finished:
            return
        self._fail(503, SHUTDOWN_MESSAGE, OUTCOME_GATEWAY_SHUTDOWN)
        self.gone_outcome = OUTCOME_GATEWAY_SHUTDOWN
        self.on_client_gone()

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
        if not self.client_gone:
            self._relay(self.scrubber.end())  # what was held back as the possible start of a key
        # A client that hangs up right after the last event (SDKs do, on [DONE]) got the
        # whole answer, even if that made tvgate abort the transfer's last empty chunk.
        answered = not result.failed or (
            self.assembler is not None and self._parse_unparsed(self.assembler).finish().complete
        )
        if answered:
            self.outcome = OUTCOME_OK if self.status < 400 else OUTCOME_UPSTREAM_ERROR
            if not self.client_gone:
                self.handler.finish()
            return
        if self.client_gone:
            self.outcome = self.gone_outcome
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
        # The provider may be a member's own server: an absurd figure counts toward nothing.
        usage, anomalies = checked_usage(assembled.usage) if assembled is not None else (None, [])
        finished = time.perf_counter()
        route = self.route
        truncated = assembled is not None and (
            assembled.truncated or (self.assembler is not None and not assembled.complete)
        )
        retained = self._retained()
        metrics = self.gateway.metrics
        metrics.capture_retained_max = max(metrics.capture_retained_max, retained)
        response = assembled.response if assembled is not None else None
        captured = (
            # The answer is held (as a document) until the writer stores it: its size
            # counts in the writer's memory budget with the request's.
            CapturedBody(body.raw, response, retained if response is not None else 0)
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
                "stream": bool(body and body.stream),
                "status_code": self.status,
                "outcome": self.outcome or self.gone_outcome,
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
                "attempts": orjson.dumps(self.attempts).decode() if len(self.attempts) > 1 else "",
                "request_blob": "",
                "response_blob": "",
                "cost_usd": 0.0,
                "anomalies": anomalies,
            },
            captured,
        )
        self.gateway.metrics.observe(row)
        admission = self.serving_admission or self.admission
        if admission is not None and usage is not None:
            self.gateway.governor.charge(
                admission,
                principal.org_id,
                usage.input_tokens
                + usage.output_tokens
                + usage.cache_read_tokens
                + usage.cache_write_tokens,
                self.provider,
                (assembled.model if assembled is not None else "") or self.upstream_model,
                (
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_read_tokens,
                    usage.cache_write_tokens,
                ),
            )

    def _retained(self) -> int:
        """Bytes of answer this call's capture holds for its trace."""
        if self.assembler is not None:
            return self.assembler.retained
        return self.captured_size + len(self.captured_tail)

    def _at(self, perf: float) -> float | None:
        return self.received_at + (perf - self.started) if perf else None

    def _assembled(self) -> Assembled | None:
        if self.assembler is not None:
            return self._parse_unparsed(self.assembler).finish()
        if self.endpoint.api == ANTHROPIC_COUNT_TOKENS:
            return None
        if self.captured_tail:
            # Too large to parse whole: the usage (and so the charge) is read from the
            # end, and the trace is marked truncated.
            return assemble_json_tail(self.endpoint.api, bytes(self.captured_tail))
        if self.captured:
            return assemble_json(self.endpoint.api, b"".join(self.captured))
        return None


class _HeldAnswer:
    """A provider failure kept back while fallbacks are tried: status, headers and (the start
    of) its body, or the transfer error it ended with (``classified``)."""

    __slots__ = ("chunks", "classified", "headers", "route", "size", "status", "upstream_model")

    def __init__(
        self,
        route: RouteEntry,
        upstream_model: str,
        status: int,
        headers: list[tuple[str, str]],
        chunks: list[bytes],
        classified: tuple[str, str] | None,
    ) -> None:
        self.route = route
        self.upstream_model = upstream_model
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.classified = classified
        self.size = 0

    def keep(self, chunk: bytes) -> None:
        # Error bodies are small; past this much, the rest is not needed to tell the client.
        if self.size < _HELD_LIMIT:
            self.chunks.append(chunk)
            self.size += len(chunk)

    def message(self) -> str:
        if self.classified is not None:
            return self.classified[0]
        body = b"".join(self.chunks)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body[:200].decode("utf-8", "replace")
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        return body[:200].decode("utf-8", "replace")


def _classify(result: UpstreamResult) -> tuple[int, str, str]:
    """(status, message, outcome) for a transfer that failed; the message names the
    provider's host and the cause (``UpstreamResult.describe``)."""
    if result.refused:
        return 502, result.describe(), OUTCOME_UPSTREAM_ERROR
    if result.timed_out or result.curl_error == CURLE_OPERATION_TIMEDOUT:
        return 504, result.describe(), OUTCOME_TIMEOUT
    return 502, result.describe(), OUTCOME_UPSTREAM_ERROR
