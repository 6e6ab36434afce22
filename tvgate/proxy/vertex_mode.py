"""Claude Code's Vertex AI mode (and the ``anthropic`` SDK's ``AnthropicVertex``) pointed at
tvgate: Vertex AI's paths, served as Anthropic Messages calls.

``CLAUDE_CODE_USE_VERTEX=1 ANTHROPIC_VERTEX_BASE_URL=<tvgate>/vertex/v1
CLAUDE_CODE_SKIP_VERTEX_AUTH=1`` makes Claude Code call
``/vertex/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:rawPredict``
(``:streamRawPredict`` for a stream, ``count-tokens:rawPredict`` to count tokens), with the
Anthropic body less ``model`` and with ``anthropic_version`` (``vertex-2023-10-16``). The
``{model}`` is a route name: the call is routed, governed and traced as any Messages call,
so such a client reaches every route it may use (an Anthropic route, a Vertex AI one,
another provider's through translation). The project and region in the path are the
client's, and tvgate needs neither: the route's key has its own.

The body becomes an Anthropic Messages body before anything else reads it
(``client_body``, then ``model`` from the path as for any path naming the route);
``anthropic_version`` dropped (the
Anthropic API takes its version as a header, which is set to ``2023-06-01`` unless the
client sent one; a Vertex AI route's key puts Vertex's own back, the only one it takes);
``anthropic_beta`` moved into the ``anthropic-beta`` header after the betas the client
sent there (a Vertex AI route's key puts them back in the body as they were).

With ``CLAUDE_CODE_SKIP_VERTEX_AUTH=1`` Claude Code sends no credential of its own: the
tvgate token goes in ``ANTHROPIC_CUSTOM_HEADERS`` (``Authorization: Bearer tvg_...``, or
``x-api-key``), which it adds to every call.
"""

from __future__ import annotations

from typing import Any

import orjson
from tornado.web import stream_request_body

from tvgate.providers.anthropic import COUNT_TOKENS, MESSAGES
from tvgate.proxy.body import BodyError, json_object
from tvgate.proxy.handlers import ProxyHandler
from tvgate.translate.pairs import ANTHROPIC_VERSION

#: ``/vertex`` then Vertex AI's path (its ``/v1`` optional: the SDK's default base URL has
#: it, a base URL given as ``<tvgate>/vertex`` has not).
_PREFIX = r"/vertex(?:/v1)?/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/"
#: At most this many betas are moved from the body into the header.
_MAX_BETAS = 64


@stream_request_body
class VertexHandler(ProxyHandler):
    """``POST …/models/{model}:rawPredict`` (and the others): a Messages call on route
    ``{model}``, or a token count (``count-tokens``, whose body names the route)."""

    serves_subscriptions = False

    def client_body(self, decoded: bytes) -> bytes:
        document = json_object(decoded)
        version = document.pop("anthropic_version", None)
        if version is not None and not isinstance(version, str):
            raise BodyError(400, "anthropic_version must be a string")
        headers = self.request.headers
        betas = document.pop("anthropic_beta", None)
        if betas is not None:
            if (
                not isinstance(betas, list)
                or len(betas) > _MAX_BETAS
                or not all(isinstance(b, str) and b and "," not in b for b in betas)
            ):
                raise BodyError(400, "anthropic_beta must be a list of beta names")
            sent = [b.strip() for b in headers.get("anthropic-beta", "").split(",") if b.strip()]
            headers["anthropic-beta"] = ",".join(dict.fromkeys([*sent, *betas]))
        if "anthropic-version" not in headers:
            headers["anthropic-version"] = ANTHROPIC_VERSION
        # The route the path names becomes the body's model as an Azure path's does
        # (``ProxyHandler.path_route``, ``tvgate.proxy.body.parse_request_body``).
        return orjson.dumps(document)


default_handlers: list[tuple[str, type, dict[str, Any]]] = [
    (_PREFIX + r"count-tokens:rawPredict", VertexHandler, {"endpoint": COUNT_TOKENS}),
    (_PREFIX + r"([^/]+):(?:rawPredict|streamRawPredict)", VertexHandler, {"endpoint": MESSAGES}),
]
