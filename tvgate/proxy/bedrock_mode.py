"""Clients in Bedrock mode pointed at tvgate: ``/bedrock/model/{model}/invoke`` and
``/invoke-with-response-stream``, answered as Bedrock answers.

Claude Code (``CLAUDE_CODE_USE_BEDROCK=1``, ``ANTHROPIC_BEDROCK_BASE_URL=<tvgate>/bedrock``,
``CLAUDE_CODE_SKIP_BEDROCK_AUTH=1``, the tvgate token as ``AWS_BEARER_TOKEN_BEDROCK``) and
the ``anthropic`` SDK's ``AnthropicBedrock`` send an Anthropic Messages body without
``model`` (it is in the path, URL-encoded: a route name, an inference profile id or an
ARN) and with ``anthropic_version``/``anthropic_beta``. :class:`BedrockModeHandler` reads
that as an Anthropic Messages call on the route the path names, whatever the route's
provider (an Anthropic key, a Bedrock key, or a translated one): the version and betas
become the Anthropic headers (a Bedrock route puts them back in its body), and the answer
goes back in Bedrock's framing: a stream as AWS event-stream frames, an error as
Bedrock's ``{"message"}`` with ``x-amzn-ErrorType``. ``GET /bedrock/inference-profiles``
(which Claude Code may probe) lists the caller's routes as inference profiles.
"""

from __future__ import annotations

from asyncio import Future
from typing import Any

import orjson
from tornado.web import stream_request_body

from tvgate.db import DatabaseUnavailable
from tvgate.providers import anthropic
from tvgate.providers.clouds.eventstream import AWS_EXCEPTIONS, CONTENT_TYPE, SSEToEventStream
from tvgate.proxy.body import json_object
from tvgate.proxy.handlers import ProxyHandler
from tvgate.web import BaseHandler, Refusal

#: The ``x-amzn-ErrorType`` of a status Bedrock would give, when the error's type does not
#: say better.
_STATUS_ERRORS = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    413: "ValidationException",
    429: "ThrottlingException",
    503: "ServiceUnavailableException",
    529: "ServiceUnavailableException",
}
#: What the trace of a call in Bedrock mode notes (in its anomalies).
BEDROCK_MODE_NOTE = "client in Bedrock mode (/bedrock)"
#: The Anthropic API version a call in Bedrock mode is sent upstream with.
_VERSION = "2023-06-01"


@stream_request_body
class BedrockModeHandler(ProxyHandler):
    """``POST /bedrock/model/{model}/invoke[-with-response-stream]``."""

    SUPPORTED_METHODS = ("POST", "GET")
    serves_subscriptions = False

    def initialize(self) -> None:  # type: ignore[override]
        super().initialize(anthropic.MESSAGES)
        self._stream = False
        #: The SSE the proxy writes as event-stream frames, once the answer is a stream.
        self._frames: SSEToEventStream | None = None
        #: An error answer's body, rewritten in Bedrock's shape when it is finished.
        self._error: list[bytes] | None = None

    async def post(self, *args: str) -> None:
        self._stream = args[1] == "invoke-with-response-stream"
        await super().post()

    def client_body(self, body: bytes) -> bytes:
        """The Bedrock body as the Anthropic one: ``model`` from the path, ``stream`` from
        the action, the version and betas as the headers an Anthropic upstream reads."""
        document = json_object(body)
        document.pop("anthropic_version", None)
        betas = document.pop("anthropic_beta", None)
        headers = self.request.headers
        if isinstance(betas, list) and betas and "anthropic-beta" not in headers:
            headers["anthropic-beta"] = ",".join(str(beta) for beta in betas[:64])
        if "anthropic-version" not in headers:
            headers["anthropic-version"] = _VERSION
        # The path's model becomes the body's as for any path naming the route
        # (``ProxyHandler.path_route``).
        if self.call is not None:
            self.call.notes.append(BEDROCK_MODE_NOTE)
        if self._stream:
            document["stream"] = True
        else:
            document.pop("stream", None)
        return orjson.dumps(document)

    # What the proxy writes, in Bedrock's framing.

    def set_header(self, name: str, value: Any) -> None:
        lower = name.lower()
        if lower == "content-type" and str(value).startswith("text/event-stream"):
            self._frames = SSEToEventStream()
            value = CONTENT_TYPE
        elif lower == "content-length" and self._status_code >= 400:
            return  # the error is rewritten: its length changes
        super().set_header(name, value)

    def clear(self) -> None:
        super().clear()
        self._frames = None
        self._error = None

    def write(self, chunk: str | bytes | dict[str, Any]) -> None:
        if self._frames is not None and isinstance(chunk, bytes):
            chunk = self._frames.feed(chunk)
            if not chunk:
                return
        elif self._status_code >= 400 and isinstance(chunk, bytes):
            if self._error is None:
                self._error = []
            self._error.append(chunk)
            return
        super().write(chunk)

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        if chunk is not None:
            self.write(chunk)
        if self._error is not None:
            error, self._error = b"".join(self._error), None
            aws_type, body = _bedrock_error(self._status_code, error)
            self.set_header("x-amzn-ErrorType", aws_type)
            super().write(body)
        return super().finish()


def _bedrock_error(status: int, body: bytes) -> tuple[str, bytes]:
    """An error answer (the Anthropic envelope tvgate and Anthropic write) as Bedrock's:
    (``x-amzn-ErrorType``, ``{"message": ...}``)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    message, kind = "", ""
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict):
            message, kind = str(error.get("message") or ""), str(error.get("type") or "")
        elif isinstance(document.get("message"), str):
            message = document["message"]
    if not message:
        message = body[:500].decode("utf-8", "replace") or f"HTTP {status}"
    named = AWS_EXCEPTIONS.get(kind)
    aws_type = named[0].upper() + named[1:] if named else ""
    if not aws_type or aws_type == "InternalServerException":
        aws_type = _STATUS_ERRORS.get(status, "InternalServerException")
    return aws_type, orjson.dumps({"message": message})


class InferenceProfilesHandler(BaseHandler):
    """``GET /bedrock/inference-profiles`` and ``/inference-profiles/{id}``: the caller's
    routes as Bedrock inference profiles, each backed by its upstream model (Claude Code in
    Bedrock mode lists them, and asks an application profile's backing model)."""

    SUPPORTED_METHODS = ("GET",)
    token_required = True

    async def get(self, profile: str | None = None) -> None:
        try:
            snapshot = await self.gateway.router.snapshot(self.principal.org_id)
        except DatabaseUnavailable:
            raise Refusal(503, "route store unavailable; try again shortly") from None
        routes = {
            r.name: r.upstream_model or r.name
            for r in snapshot.available(self.principal)
            if not r.is_pattern
        }
        self.set_header("Content-Type", "application/json")
        if profile is None:
            listed = [_profile(name, model) for name, model in routes.items()]
            self.finish(orjson.dumps({"inferenceProfileSummaries": listed}))
        elif profile in routes:
            self.finish(orjson.dumps(_profile(profile, routes[profile])))
        else:
            self.set_header("x-amzn-ErrorType", "ResourceNotFoundException")
            self.set_status(404)
            self.finish(orjson.dumps({"message": f"no route named {profile!r} for you"}))


def _profile(name: str, model: str) -> dict[str, Any]:
    return {
        "inferenceProfileName": name,
        "inferenceProfileId": name,
        "inferenceProfileArn": name,
        "description": "a tvgate route",
        "models": [{"modelArn": f"arn:aws:bedrock:::foundation-model/{model}"}],
        "status": "ACTIVE",
        "type": "SYSTEM_DEFINED",
    }


default_handlers: list[tuple[str, type]] = [
    (r"/bedrock/model/([^/]+)/(invoke|invoke-with-response-stream)", BedrockModeHandler),
    (r"/bedrock/inference-profiles(?:/([^/]+))?", InferenceProfilesHandler),
]
