"""Token counts tvgate answers itself: ``count_tokens`` on a route of another provider.

Anthropic's ``POST /v1/messages/count_tokens`` counts a Messages request's input tokens
(Claude Code asks before it sends a large one). A route whose provider is not Anthropic
has no such endpoint, and no tokenizer of the upstream model is at hand offline, so tvgate
answers an estimate without calling the provider: the request as the route's API would
get it (the translation of the Messages request it counts, which also checks it, so bad
input is the 400 the call itself would get), at 4 bytes a token, rounded up; the same
rule the budgets estimate a call's input with (``ProxyCall._demand``). Deterministic:
the same request on the same route gives the same count. The answer is in Anthropic's
format (``{"input_tokens": N}``) and carries ``ESTIMATE_HEADER``, so a client can tell
it from a provider's count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from tvgate.providers import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES, ProviderAPI, api_for

if TYPE_CHECKING:
    from tvgate.proxy.relay import ClientRelay

#: The response header marking a count as tvgate's estimate; its value names the rule.
ESTIMATE_HEADER = "x-tvgate-token-estimate"
ESTIMATE_RULE = "bytes/4"
#: What the trace of an estimated count notes (in its anomalies).
ESTIMATE_NOTE = (
    "count_tokens estimated by tvgate (the translated request's bytes / 4): no provider call"
)

#: The APIs that only count a request's tokens, by the API of the request they count.
_COUNTS: dict[str, str] = {ANTHROPIC_COUNT_TOKENS: ANTHROPIC_MESSAGES}


def counted_api(client: ProviderAPI) -> ProviderAPI | None:
    """The API whose requests ``client`` counts, when ``client`` is a token counter."""
    counted = _COUNTS.get(client.api)
    return api_for(counted) if counted is not None else None


def estimate_body(translated: bytes) -> bytes:
    """The count's answer, in Anthropic's format, for a request whose body in the route's
    API is ``translated``."""
    return orjson.dumps({"input_tokens": -(-len(translated) // 4)})


def answer_estimate(relay: ClientRelay, translated: bytes, overhead_ms: float) -> None:
    """Answer the client with the estimate, marked as one."""
    relay.send_own_answer(
        estimate_body(translated), ((ESTIMATE_HEADER, ESTIMATE_RULE),), overhead_ms
    )
