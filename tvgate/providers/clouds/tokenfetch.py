"""One bounded exchange with a credential endpoint: a token endpoint, STS.

A cloud key names the endpoint its credentials are exchanged at (a service account's
``token_uri``, an Entra ID authority, an STS endpoint), so what answers there is hostile
like any provider. Every such exchange goes through the gateway's own HTTP client (its
address rules on every connection, https unless private upstreams are allowed, no
redirect followed) and is bounded here:

* its answer: at most ``MAX_ANSWER`` bytes (the transfer is aborted past it);
* its time: ``CloudRequest.token_timeout`` seconds for the whole exchange, however slowly
  the bytes come (``TVGATE_TOKEN_TIMEOUT``; the idle timeout alone is per read);
* a redirect is an error, not followed; so is an answer that is not what a token endpoint
  sends (``json_object``), and a token that lives for no time or an absurd time
  (``lifetime``).

Every refusal is a ``CloudError`` naming the endpoint's host and what was wrong, never
what it sent (which may quote the secret).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from tvgate.providers.clouds.base import CloudError, CloudRequest
from tvgate.proxy.upstream import UpstreamExchange, url_host

#: The most a credential endpoint's answer may be (a token answer is a few KB).
MAX_ANSWER = 64 * 1024
#: The longest a minted credential is taken to live (Entra ID's and Google's live an hour,
#: an STS role's at most 12 h): a longer one is an endpoint's error, or a lie.
MAX_LIFETIME = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class CredentialAnswer:
    """A credential endpoint's answer, whole: its status, content type and body."""

    status: int
    content_type: str
    body: bytes


class _Collected:
    """An upstream listener keeping an answer of at most ``MAX_ANSWER`` bytes; past it, the
    transfer is aborted."""

    def __init__(self) -> None:
        self.status = 0
        self.content_type = ""
        self.body = bytearray()
        self.too_large = False
        self.exchange: UpstreamExchange | None = None

    def on_upstream_headers(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.content_type = next((v for n, v in headers if n.lower() == "content-type"), "")

    def on_upstream_chunk(self, chunk: bytes) -> bool:
        if len(self.body) + len(chunk) > MAX_ANSWER:
            self.too_large = True
            if self.exchange is not None:
                self.exchange.abort()
            return True
        self.body += chunk
        return True


async def fetch(
    request: CloudRequest,
    url: str,
    headers: dict[str, str],
    body: bytes,
    what: str,
    timeout: float | None = None,
) -> CredentialAnswer:
    """POST ``body`` to the credential endpoint ``url`` (``what`` names it for the client:
    "the Entra ID token endpoint"), bounded as the module says (``timeout``: what is left of
    the token timeout, if not all of it); CloudError if it cannot be reached, is too slow,
    too long, or redirects."""
    where = f"{what} ({url_host(url)})"
    if not url.startswith("https://") and not request.allow_private:
        # As for a route's base URL: a signed grant or a client secret never goes in clear.
        raise CloudError(502, f"{where} is not https, which is not allowed")
    limit = request.token_timeout if timeout is None else timeout
    if limit <= 0:
        raise CloudError(503, _too_slow(where, request))
    answer = _Collected()
    exchange = UpstreamExchange(
        request.http,
        url,
        headers,
        body,
        answer,
        connect_timeout=min(request.connect_timeout, limit),
        idle_timeout=max(1, int(limit)),
        allow_private=request.allow_private,
    )
    answer.exchange = exchange
    expired = False

    def deadline() -> None:
        nonlocal expired
        expired = True
        exchange.abort()

    timer = asyncio.get_running_loop().call_later(limit, deadline)
    try:
        result = await exchange.run()
    finally:
        timer.cancel()
    if answer.too_large:
        raise CloudError(502, f"{where} answered with over {MAX_ANSWER // 1024} KiB")
    if expired:
        raise CloudError(503, _too_slow(where, request))
    if result.failed:
        raise CloudError(502, f"{where} could not be reached: {result.describe()}")
    if 300 <= answer.status < 400:
        raise CloudError(
            502, f"{where} answered with a redirect (HTTP {answer.status}), not followed"
        )
    return CredentialAnswer(answer.status, answer.content_type, bytes(answer.body))


def _too_slow(where: str, request: CloudRequest) -> str:
    return f"{where} did not answer within {request.token_timeout:g} s (TVGATE_TOKEN_TIMEOUT)"


def json_object(answer: CredentialAnswer, where: str) -> dict[str, Any]:
    """The answer's JSON object; CloudError if it is something else (an HTML page)."""
    try:
        document = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        kind = answer.content_type.split(";")[0].strip() or "no content type"
        raise CloudError(
            502, f"{where} answered HTTP {answer.status} with something not JSON ({kind})"
        )
    return document


def lifetime(value: object, where: str) -> float:
    """The seconds a minted credential lives, from its ``expires_in`` (a number, or digits
    as Entra ID's v1 endpoint sends); CloudError for none, or one out of reason."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CloudError(502, f"{where} minted a token with no expiry")
    if not 0 < value <= MAX_LIFETIME:
        raise CloudError(
            502,
            f"{where} minted a token said to live {value:g} s "
            f"(a token lives over 0 s and at most {MAX_LIFETIME:g} s)",
        )
    return float(value)
