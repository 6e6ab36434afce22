"""What tvgate knows of each provider's API: endpoints, key injection, error envelopes.

Errors that tvgate itself raises must look like the API the client speaks, so
that an SDK surfaces them as it would the provider's own: the Anthropic
envelope on ``/v1/messages``, the OpenAI envelope on ``/v1/chat/completions``
and the others. After the first byte of a stream has gone out, an error can
only be told in-band, as an event in that API's stream format.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from tvgate.models import PROVIDER_ANTHROPIC, PROVIDER_OPENAI

ANTHROPIC_MESSAGES = "anthropic.messages"
ANTHROPIC_COUNT_TOKENS = "anthropic.count_tokens"
OPENAI_CHAT = "openai.chat"
OPENAI_RESPONSES = "openai.responses"
OPENAI_EMBEDDINGS = "openai.embeddings"
OPENAI_COMPLETIONS = "openai.completions"

DEFAULT_BASE_URLS = {
    PROVIDER_ANTHROPIC: "https://api.anthropic.com",
    PROVIDER_OPENAI: "https://api.openai.com/v1",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One proxied API operation."""

    api: str
    provider: str
    #: Appended to the key's base URL (which carries ``/v1`` for OpenAI, as its SDK takes it).
    upstream_path: str


#: Keyed by the client's path after ``/v1/``.
ENDPOINTS: dict[str, Endpoint] = {
    "messages": Endpoint(ANTHROPIC_MESSAGES, PROVIDER_ANTHROPIC, "/v1/messages"),
    "messages/count_tokens": Endpoint(
        ANTHROPIC_COUNT_TOKENS, PROVIDER_ANTHROPIC, "/v1/messages/count_tokens"
    ),
    "chat/completions": Endpoint(OPENAI_CHAT, PROVIDER_OPENAI, "/chat/completions"),
    "responses": Endpoint(OPENAI_RESPONSES, PROVIDER_OPENAI, "/responses"),
    "embeddings": Endpoint(OPENAI_EMBEDDINGS, PROVIDER_OPENAI, "/embeddings"),
    "completions": Endpoint(OPENAI_COMPLETIONS, PROVIDER_OPENAI, "/completions"),
}


def auth_headers(provider: str, secret: str) -> list[tuple[str, str]]:
    """The headers that carry a provider key, the way that provider expects it."""
    if provider == PROVIDER_ANTHROPIC:
        return [("x-api-key", secret)]
    return [("Authorization", "Bearer " + secret)]


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    508: "loop_detected",
    529: "overloaded_error",
}
_OPENAI_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_content_encoding"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    508: ("loop_detected", "loop_detected"),
}


def error_body(
    provider: str, status: int, message: str, *, kind: str = "", code: str = ""
) -> bytes:
    """The JSON error envelope of ``provider``'s API for an error tvgate raises; ``kind``
    and ``code`` replace the type and (OpenAI's) code the status would give."""
    if provider == PROVIDER_ANTHROPIC:
        kind = kind or _ANTHROPIC_TYPES.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    status_kind, status_code = _OPENAI_TYPES.get(status, ("server_error", None))
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": kind or status_kind,
                "param": None,
                "code": code or status_code,
            }
        }
    )


def stream_error_event(api: str, message: str, kind: str = "api_error") -> bytes:
    """An in-band error event ending a stream that already started, in ``api``'s format."""
    if api.startswith("anthropic."):
        payload = {"type": "error", "error": {"type": kind, "message": message}}
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
    if api == OPENAI_RESPONSES:
        # The Responses API's own error event, plus the nested "error" object that
        # makes the openai SDKs raise instead of yielding it as an ordinary event.
        payload2 = {
            "type": "error",
            "code": kind,
            "message": message,
            "param": None,
            "error": {"type": kind, "code": kind, "message": message},
        }
        return b"event: error\ndata: " + orjson.dumps(payload2) + b"\n\n"
    payload3 = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return b"data: " + orjson.dumps(payload3) + b"\n\n"
