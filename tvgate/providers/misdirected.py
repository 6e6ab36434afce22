"""What a request to a path tvgate does not serve is told: that the endpoint does not exist,
and, when the path is a provider endpoint under a wrong prefix, how to fix the base URL.

The usual cause is a tool's base URL: Anthropic tools add ``/v1/messages`` to theirs,
OpenAI tools add ``/chat/completions`` (and the others) to theirs, which therefore ends
in ``/v1``. ``ANTHROPIC_BASE_URL=https://gw/v1`` makes ``/v1/v1/messages``;
``OPENAI_BASE_URL=https://gw`` makes ``/chat/completions``.

A misplaced Anthropic endpoint (``…/messages``) is answered 400, not 404: Claude Code
reports every 404 as "There's an issue with the selected model", whatever the body says,
and the user would look for a model problem; on a 400 it shows the message. Every other
unknown path answers 404 (OpenAI's tools show a 404's message). The envelope is the API's
the request looks like (``envelope_api``), its type ``not_found_error`` and, in OpenAI's
envelope, its code ``unknown_endpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvgate.providers import ENDPOINTS, ProviderAPI, api_for
from tvgate.providers.base import ANTHROPIC_MESSAGES

ERROR_TYPE = "not_found_error"
ERROR_CODE = "unknown_endpoint"
#: What tools append to their base URL after ``/v1``: the proxied endpoints and the model list.
_TAILS = sorted([*ENDPOINTS, "models"], key=len, reverse=True)


@dataclass(frozen=True, slots=True)
class UnknownEndpoint:
    status: int
    message: str
    #: The path ends like an Anthropic endpoint (``…/messages``).
    anthropic_path: bool


def _tail(path: str) -> str | None:
    """The endpoint a path ends with (``messages``, ``chat/completions``, …), if any."""
    trimmed = path.rstrip("/")
    for tail in _TAILS:
        if trimmed == "/" + tail or trimmed.endswith("/" + tail):
            return tail
    return None


def unknown_endpoint(method: str, path: str, base_url: str) -> UnknownEndpoint:
    """The answer to ``method path``, which no handler serves, on a gateway at ``base_url``."""
    fix = (
        "an Anthropic tool's base URL is the gateway's URL without /v1 "
        f"(ANTHROPIC_BASE_URL={base_url}), an OpenAI tool's is the gateway's URL with /v1 "
        f"(OPENAI_BASE_URL={base_url}/v1)"
    )
    # The path is the client's own; a very long one is cut in what is said back.
    head = f"no endpoint {method} {path if len(path) <= 200 else path[:200] + '…'}"
    tail = _tail(path)
    if tail is None:
        return UnknownEndpoint(404, f"{head}: {fix}", False)
    before = path.rstrip("/")[: -len(tail) - 1]
    if "/v1/v1/" in path + "/":
        why = "/v1 appears twice in the path"
    elif not before.endswith("/v1"):
        why = f"tvgate serves /{tail} under /v1, as /v1/{tail}"
    else:
        why = f"tvgate serves /v1/{tail} without {before[: -len('/v1')]} in front"
    anthropic_path = tail.startswith("messages")
    return UnknownEndpoint(400 if anthropic_path else 404, f"{head}: {why}; {fix}", anthropic_path)


def envelope_api(
    unknown: UnknownEndpoint, request_api: ProviderAPI, has_api_key: bool
) -> ProviderAPI:
    """The API whose envelope answers: the one the request says it speaks (``request_api``,
    Anthropic's from ``anthropic-version`` or the ``/anthropic`` prefix), or Anthropic's
    when it sends an ``x-api-key`` to a ``…/messages`` path, as Claude Code and the
    Anthropic SDKs do."""
    if has_api_key and unknown.anthropic_path:
        return api_for(ANTHROPIC_MESSAGES)
    return request_api
