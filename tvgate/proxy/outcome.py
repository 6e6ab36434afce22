"""What a proxied call came to, and the endings that settle it.

Each attempt on a route returns ``Answered`` (no further route is tried) or ``Failed`` (the
next route may mend it, the failure held back meanwhile). ``CallOutcome`` is the part of
``ProxyCall`` (``tvgate.proxy.call``) that ends the call: it records each attempt for the
trace, tells the client tvgate's own error or the last held failure when no route did
better, maps a failed transfer to its status and outcome (``_classify``), and answers a
refusal, a client that left and a stop at the drain timeout. ``ProxyCall`` sets the
attributes it reads; what the trace records of them is ``tvgate.proxy.record``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tvgate.governance.governor import Admission, Refused
from tvgate.models import (
    OUTCOME_GATEWAY_SHUTDOWN,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    OUTCOME_TIMEOUT,
    OUTCOME_UPSTREAM_ERROR,
)
from tvgate.providers import ProviderAPI
from tvgate.proxy.relay import ClientRelay, HeldAnswer
from tvgate.proxy.scrub import KeyScrubber
from tvgate.proxy.upstream import CURLE_OPERATION_TIMEDOUT, UpstreamResult
from tvgate.routing import RouteEntry

if TYPE_CHECKING:
    from tvgate.proxy.client import ClientSide


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


class CallOutcome:
    """How a ``ProxyCall`` ends: its attempts recorded, its client told, its outcome set."""

    handler: ClientSide
    endpoint: ProviderAPI
    relay: ClientRelay
    scrubber: KeyScrubber
    route: RouteEntry | None
    upstream_model: str
    #: The trace's outcome, error type and message (``OUTCOME_*``; "" while in progress).
    outcome: str
    error_type: str
    error_message: str
    gone_outcome: str
    admission: Admission | None
    serving_admission: Admission | None
    last_failure: Failed | None
    attempts: list[dict[str, Any]]

    def _budget_warnings(self) -> list[str]:
        """The warnings of the admission that serves the call, for the answer's header."""
        admission = self.serving_admission or self.admission
        return admission.warnings if admission is not None else []

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
