"""One proxied call, stage by stage: identity, body, routing, governance, key, upstream.

``ProxyCall`` owns a request from the moment its body is complete. Each stage
either passes on or answers the client with an error in the API's own
envelope; then the route and its fallbacks are tried in turn, each attempt
returning what it came to (``Answered`` or ``Failed``). A route of another provider
than the client's API is served through the translator of that pair
(``tvgate.translate.pairs``), unless the route turns translation off; what an attempt may do
is planned, or refused, before any key or slot (``tvgate.proxy.plan``). What goes back to the
client (headers, body, back-pressure, held failures) is ``ClientRelay``'s
(``tvgate.proxy.relay``). From authentication on, whatever happens (the client
leaves, the provider fails, tvgate refuses) the call ends by queueing exactly
one trace and charging its usage (``tvgate.proxy.record``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
from tvgate.identity import IdentityError, Principal
from tvgate.keyring import KeyContext, KeyringError, KeyringUnavailable
from tvgate.models import (
    OUTCOME_CLIENT_CANCELLED,
    OUTCOME_GATEWAY_SHUTDOWN,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    OUTCOME_TIMEOUT,
    OUTCOME_UPSTREAM_ERROR,
)
from tvgate.providers import ProviderAPI
from tvgate.providers.clouds import credentials_for
from tvgate.providers.clouds.base import CloudError, CloudReader, CloudRequest
from tvgate.proxy.body import BodyError, ParsedBody, decode_content, parse_request_body, with_model
from tvgate.proxy.estimate import ESTIMATE_NOTE, answer_estimate
from tvgate.proxy.hops import incoming_marks, is_loop, outgoing_marks
from tvgate.proxy.plan import Refusal, plan_attempt
from tvgate.proxy.record import record_call
from tvgate.proxy.relay import TRANSLATED_LIMIT, ClientRelay, HeldAnswer
from tvgate.proxy.scrub import KeyScrubber
from tvgate.proxy.subscription import SubscriptionRefused, subscription_auth, subscription_route
from tvgate.proxy.upstream import (
    CURLE_OPERATION_TIMEDOUT,
    UpstreamExchange,
    UpstreamListener,
    UpstreamResult,
    upstream_headers,
    upstream_url,
)
from tvgate.routing import RouteEntry, RouteNotFound
from tvgate.translate.pairs import Pair, Translation

if TYPE_CHECKING:
    from tvgate.proxy.client import ClientSide

log = logging.getLogger("tvgate.proxy")

#: What a client cut at the drain timeout is told, in its API's format.
SHUTDOWN_MESSAGE = "the gateway is shutting down"


@dataclass(frozen=True, slots=True)
class Answered:
    """What an attempt came to when no further route is tried: the client has its answer
    (the provider's, or tvgate's error), or is gone.

    ``ms``: how long the provider took, when one answered (then recorded in the trace's
    attempts once a fallback was tried before)."""

    ms: float | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """An attempt that failed in a way the next route may mend, as the trace's attempts
    record it; ``held``: the provider's failure, kept back to be told when no route does
    better (None when the attempt never reached a provider)."""

    route: RouteEntry
    upstream_model: str
    status: int
    outcome: str
    error: str
    ms: float = 0.0
    held: HeldAnswer | None = None


#: An attempt answered the call without a provider's answer to time.
_ANSWERED = Answered()


class ProxyCall:
    """A request through the proxy: its stages and its chain of fallback routes."""

    def __init__(self, handler: ClientSide, endpoint: ProviderAPI, started: float) -> None:
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
        self.upstream_started = 0.0
        #: The outcome of a call whose client side ended before the call did: the client
        #: hung up, unless the gateway cut it at stop.
        self.gone_outcome = OUTCOME_CLIENT_CANCELLED
        self.bytes_in = 0
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
        self.last_failure: Failed | None = None
        self.attempts: list[dict[str, Any]] = []
        #: The provider keys this call sent, masked in whatever comes back from upstream.
        self.scrubber = KeyScrubber()
        self.hop_marks: list[str] = []
        #: What the trace notes of how the call was served (in its anomalies).
        self.notes: list[str] = []
        settings = self.gateway.settings
        self.relay = ClientRelay(
            handler,
            endpoint,
            self.scrubber,
            self.gateway.metrics,
            client_buffer_bytes=settings.client_buffer_bytes,
            capture_max_bytes=settings.capture_max_bytes,
        )

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
            record_call(self)  # charges the usage first: settling then frees the rest
            for admission in self.admissions:
                self.gateway.governor.settle(admission)

    async def _authenticate(self) -> Principal | None:
        try:
            return await self.handler.authenticate_token()
        except IdentityError as exc:
            self.handler.send_api_error(exc.status, exc.public, self.endpoint)
            return None

    async def _proxy(self, raw_body: bytes) -> None:
        settings = self.gateway.settings
        headers = self.handler.client_headers
        try:
            decoded = decode_content(
                raw_body, headers.get("Content-Encoding"), settings.max_body_bytes
            )
            self.body = parse_request_body(
                self.handler.client_body(decoded), self.handler.path_route
            )
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
            if self.handler.subscription:
                # The caller's own Claude subscription (tvgate.proxy.subscription).
                snapshot, route = await subscription_route(
                    self.gateway, principal, self.endpoint, self.handler
                )
            else:
                snapshot, route = await self.gateway.router.resolve(principal, self.body.model)
        except RouteNotFound as exc:
            self._fail(404, str(exc), OUTCOME_REJECTED)
            return
        except SubscriptionRefused as exc:
            self._fail(exc.status, str(exc), OUTCOME_REJECTED)
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
            if entry is None:
                self._record_attempt(None, name, 0, OUTCOME_REJECTED, "no such route for you")
                continue
            tried = await self._attempt(
                entry, is_fallback=index > 0, may_fall_back=index + 1 < len(chain)
            )
            if isinstance(tried, Answered):
                if tried.ms is not None and self.attempts:
                    self._record_attempt(
                        entry,
                        self.upstream_model,
                        self.relay.status,
                        self.outcome,
                        self.error_message,
                        tried.ms,
                    )
                return
            self._record_attempt(
                tried.route,
                tried.upstream_model,
                tried.status,
                tried.outcome,
                tried.error,
                tried.ms,
            )
            if tried.held is not None:
                self.last_failure = tried
            if self.relay.client_gone:
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

    async def _attempt(
        self, entry: RouteEntry, *, is_fallback: bool, may_fall_back: bool
    ) -> Answered | Failed:
        """One upstream attempt on ``entry``, with the admission and the key's slot it needs."""
        assert self.body is not None and self.principal is not None
        settings = self.gateway.settings
        governor = self.gateway.governor
        model = entry.upstream_model_for(self.body.model)
        plan = plan_attempt(
            self.endpoint,
            entry,
            model,
            self.body.raw,
            (self.principal.org_id, self.principal.user_id),
            settings.allows_private_upstream,
        )
        if isinstance(plan, Refusal):
            if is_fallback:
                return Failed(entry, model, 0, OUTCOME_REJECTED, plan.message)
            self._fail(plan.status, plan.message, OUTCOME_REJECTED)
            return _ANSWERED
        pair, translation = plan.pair, plan.translation
        if plan.counted is not None and translation is not None:
            # No provider call: tvgate's estimate of the count (tvgate.proxy.estimate).
            self.route, self.provider, self.upstream_model = entry, entry.key.provider, model
            self.notes.append(ESTIMATE_NOTE)
            self.outcome = OUTCOME_OK
            answer_estimate(self.relay, translation.body, self.overhead_ms())
            return _ANSWERED
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
                return Failed(entry, model, 429, OUTCOME_REJECTED, str(exc))
            self._refuse(exc)
            return _ANSWERED
        try:
            self.route = entry
            self.provider = entry.key.provider
            self.upstream_model = model
            if attempt_admission is not None and self.admission is not None:
                self.serving_admission = self.admission.for_attempt(attempt_admission)
            return await self._attempt_with_key(
                entry,
                pair,
                translation,
                is_fallback=is_fallback,
                may_fall_back=may_fall_back,
            )
        finally:
            if key_resource_name:
                governor.release(key_resource_name)

    async def _attempt_with_key(
        self,
        entry: RouteEntry,
        pair: Pair | None,
        translation: Translation | None,
        *,
        is_fallback: bool,
        may_fall_back: bool,
    ) -> Answered | Failed:
        key = entry.key
        if self.handler.subscription:
            # The caller's own credential: no key of tvgate's to decrypt or count as used.
            self.scrubber.add(self.handler.subscription)
            return await self._forward(
                entry, pair, translation, self.handler.subscription, may_fall_back=may_fall_back
            )
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
                return Failed(entry, self.upstream_model, status, OUTCOME_UPSTREAM_ERROR, message)
            self._fail(status, message, OUTCOME_UPSTREAM_ERROR)
            return _ANSWERED
        if self.relay.client_gone:
            self.outcome = self.gone_outcome
            return _ANSWERED
        self.scrubber.add(secret)
        self.gateway.key_uses.record(key.id)
        return await self._forward(entry, pair, translation, secret, may_fall_back=may_fall_back)

    async def _forward(
        self,
        entry: RouteEntry,
        pair: Pair | None,
        translation: Translation | None,
        secret: str,
        *,
        may_fall_back: bool,
    ) -> Answered | Failed:
        """The request to the provider of ``entry``, its answer relayed (or held back);
        through ``translation`` to the API of ``pair`` when the route's is not the client's."""
        assert self.body is not None
        settings = self.gateway.settings
        client_headers = self.handler.client_headers
        relay = self.relay
        if pair is None or translation is None:
            api, auth, body = self.endpoint, [], with_model(self.body, self.upstream_model)
        else:
            api, auth, body = pair.upstream, list(pair.required_headers), translation.body
        url = upstream_url(entry.key.base_url, api.upstream_path, self.handler.forwarded_query)
        allow_private = settings.allows_private_upstream(entry.key.owner_id is not None)
        listener: UpstreamListener = relay
        cloud = credentials_for(entry.key.provider)
        if cloud is None:
            sent = subscription_auth if self.handler.subscription else api.auth_headers
            auth = sent(secret) + auth
        else:
            # The cloud's URL, credentials and body; its answer mapped to the API's.
            try:
                call = await cloud.prepare(
                    CloudRequest(
                        key=entry.key,
                        secret=secret,
                        api=api,
                        upstream_model=self.upstream_model,
                        body=body,
                        client_headers=client_headers,
                        scrubber=self.scrubber,
                        http=self.gateway.http,
                        allow_private=allow_private,
                        connect_timeout=settings.connect_timeout,
                        token_timeout=settings.token_timeout,
                    )
                )
            except CloudError as exc:
                return self._unprepared(entry, exc, may_fall_back=may_fall_back)
            url, auth, body = call.url, call.auth + auth, call.body
            translation = call.answer(api, translation)
            listener = call.listener(relay)
        exchange = UpstreamExchange(
            self.gateway.http,
            url,
            upstream_headers(
                client_headers, auth, outgoing_marks(self.hop_marks, self.gateway.hop_id)
            ),
            body,
            listener,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            allow_private=allow_private,
        )
        started = time.perf_counter()
        if not self.upstream_started:
            self.upstream_started = started
        relay.attempt(
            exchange,
            may_fall_back=may_fall_back,
            overhead_ms=self.overhead_ms(),
            warnings=self._budget_warnings(),
            api=api,
            translation=translation,
        )
        result = await exchange.run()
        if isinstance(listener, CloudReader):
            listener.end()  # the cloud's reader passes on what it held back
        if relay.redirected:
            result = dataclasses.replace(
                result,
                refused=f"the provider answered with a redirect ({relay.redirected}), "
                "which tvgate neither follows nor relays",
            )
        elif relay.too_large:
            result = dataclasses.replace(
                result,
                refused=f"the provider's answer is over {TRANSLATED_LIMIT} bytes, "
                "more than tvgate translates",
            )
        elapsed = (time.perf_counter() - started) * 1000
        if result.failed and not relay.client_gone:
            self._log_failure(entry, result)
        held = relay.take_held()
        if held is not None:
            # The provider failed in a way a fallback may mend, and the client has seen none
            # of it: keep the answer in case no fallback does better.
            return Failed(
                entry,
                self.upstream_model,
                held.status,
                OUTCOME_UPSTREAM_ERROR,
                held.message(),
                elapsed,
                held,
            )
        if may_fall_back and result.failed and not relay.status and not relay.client_gone:
            status, message, outcome = _classify(result)
            held = HeldAnswer(status, [], [], (message, outcome))
            return Failed(entry, self.upstream_model, status, outcome, message, elapsed, held)
        self._complete(result)
        return Answered(elapsed)

    def _unprepared(
        self, entry: RouteEntry, exc: CloudError, *, may_fall_back: bool
    ) -> Failed | Answered:
        """The cloud call of ``entry`` cannot be made (its key unreadable, no token): held
        for a fallback to mend, else told to the client."""
        if self.relay.client_gone:
            self.outcome = self.gone_outcome
            return _ANSWERED
        message = self.scrubber.text(exc.message)
        log.warning("key %r of org %d: %s", entry.key.name, entry.key.org_id, message)
        if may_fall_back:
            held = HeldAnswer(exc.status, [], [], (message, OUTCOME_UPSTREAM_ERROR))
            return Failed(
                entry, self.upstream_model, exc.status, OUTCOME_UPSTREAM_ERROR, message, 0.0, held
            )
        self._fail(exc.status, message, OUTCOME_UPSTREAM_ERROR)
        return _ANSWERED

    def _budget_warnings(self) -> list[str]:
        """The warnings of the admission that serves the call, for the answer's header."""
        admission = self.serving_admission or self.admission
        return admission.warnings if admission is not None else []

    def _log_failure(self, entry: RouteEntry, result: UpstreamResult) -> None:
        """A transfer failed (not the client's doing): a warning an operator can act on."""
        key = entry.key
        log.warning(
            "provider call of org %d on route %r (key %r) failed: %s (curl error %d: %s)",
            key.org_id,
            entry.name,
            key.name,
            result.describe(),
            result.curl_error,
            self.scrubber.text(result.message),
        )

    def _answer_last_failure(self) -> None:
        """Every route failed: the client gets the last provider failure, as it came."""
        failure = self.last_failure
        if failure is None or failure.held is None:
            self._fail(502, "no route could serve this request", OUTCOME_UPSTREAM_ERROR)
            return
        self.route = failure.route
        self.upstream_model = failure.upstream_model
        held = failure.held
        if held.classified is not None:
            message, outcome = held.classified
            self._fail(held.status, message, outcome)
            return
        self._end(self.relay.replay(held, self._budget_warnings()), UpstreamResult(0, ""))

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
        self.relay.status = 429
        if not self.relay.client_gone:
            self.handler.send_api_error(
                429, str(refusal), self.endpoint, retry_after=str(refusal.retry_after)
            )

    def on_client_gone(self) -> None:
        """The client closed its connection: stop the provider's work at once."""
        self.relay.on_client_gone()

    def shut_down(self) -> None:
        """The gateway stops and the drain timeout passed: tell the client in its API's
        format (the in-band error event once a stream started), stop the provider's work,
        and record the call as ``gateway_shutdown``, not as the client's doing."""
        self.cut_off(503, SHUTDOWN_MESSAGE, OUTCOME_GATEWAY_SHUTDOWN)

    def cut_off(self, status: int, message: str, outcome: str) -> None:
        """End the call from tvgate's side: ``message`` told the client as ``_fail`` tells
        it, the provider's work stopped, the trace's outcome ``outcome``."""
        if self.relay.client_gone or self.handler._finished:
            return
        self._fail(status, message, outcome)
        self.gone_outcome = outcome
        self.on_client_gone()

    # --- endings ---

    def overhead_ms(self) -> float:
        """tvgate's own time: from the complete request to the upstream request going out."""
        if not self.upstream_started:
            return (time.perf_counter() - self.started) * 1000
        return (self.upstream_started - self.started) * 1000

    def at(self, perf: float) -> float | None:
        """The wall-clock time of a ``perf_counter`` reading of this call (None for 0)."""
        return self.received_at + (perf - self.started) if perf else None

    def _fail(self, status: int, message: str, outcome: str) -> None:
        """End the call with an error, told the way the client can still hear it."""
        self.outcome = outcome
        self.error_type = "gateway_error"
        self.error_message = message
        self.relay.send_error(status, message)

    def _complete(self, result: UpstreamResult) -> None:
        self._end(self.relay.complete(result), result)

    def _end(self, answered: bool, result: UpstreamResult) -> None:
        """The outcome of a transfer the relay has ended (``answered``: the client has it)."""
        if answered:
            self.outcome = OUTCOME_OK if self.relay.status < 400 else OUTCOME_UPSTREAM_ERROR
            return
        if self.relay.client_gone:
            self.outcome = self.gone_outcome
            return
        self._fail(*_classify(result))


def _classify(result: UpstreamResult) -> tuple[int, str, str]:
    """(status, message, outcome) for a transfer that failed; the message names the
    provider's host and the cause (``UpstreamResult.describe``)."""
    if result.refused:
        return 502, result.describe(), OUTCOME_UPSTREAM_ERROR
    if result.timed_out or result.curl_error == CURLE_OPERATION_TIMEDOUT:
        return 504, result.describe(), OUTCOME_TIMEOUT
    return 502, result.describe(), OUTCOME_UPSTREAM_ERROR
