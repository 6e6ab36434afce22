"""Claude on Google Vertex AI: a service account's key, minted into OAuth access tokens.

A Vertex key's secret is the service account's JSON key file (what ``gcloud iam
service-accounts keys create`` writes); its settings are the Google Cloud project and the
region (``us-east5``, ``europe-west1``, ``global``) whose endpoint serves the calls
(``https://{region}-aiplatform.googleapis.com``, the key's base URL unless the admin gives
another). For each call:

* an access token for the ``cloud-platform`` scope, minted by google-auth
  (``google.oauth2.service_account.Credentials``: a JWT signed with the key, exchanged at
  the key file's ``token_uri`` by the JWT bearer grant). google-auth's refresh blocks, so it
  runs in a thread of its own pool, never on the IOLoop; its HTTP exchange is ours
  (``_Transport``: the gateway's HTTP client, bounded by ``tokenfetch`` in size and in
  total time, ``TVGATE_TOKEN_TIMEOUT``, no redirect followed, the answer checked); one
  refresh at a time per key (the calls that need it meanwhile wait for the same one), the
  token cached (a bounded LRU) until ``REFRESH_MARGIN`` before it expires;
* the URL ``{base}/v1/projects/{project}/locations/{region}/publishers/anthropic/models/
  {model}:rawPredict`` (``:streamRawPredict`` for a stream; ``count-tokens:rawPredict``
  counts tokens, with the model in the body);
* the Anthropic body without ``model`` (Vertex takes it from the URL), with
  ``anthropic_version: vertex-2023-10-16`` (a client's own ``vertex-`` version is kept) and
  the client's ``anthropic-beta`` header as ``anthropic_beta`` (unless the body has it);
* its errors: Google's envelope (``{"error": {"code", "message", "status"}}``, or a list
  of them) becomes Anthropic's, Google's message kept; Vertex passes Anthropic's own
  errors and streams on as they are. A token Vertex refuses (401) is dropped: the next
  call mints another.

The key file (whole, as every key is), its private key as JSON writes it, the key's id
and every minted token are given to the call's scrubber.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

import google.auth.exceptions
import google.auth.transport
import orjson

from tvgate.providers.anthropic import COUNT_TOKENS, MESSAGES
from tvgate.providers.clouds import tokenfetch
from tvgate.providers.clouds.base import CheckedKey, CloudCall, CloudError, CloudRequest
from tvgate.proxy.scrub import KeyScrubber
from tvgate.proxy.upstream import url_host

log = logging.getLogger("tvgate.proxy")

#: The Anthropic API version Vertex AI takes in the body.
ANTHROPIC_VERSION = "vertex-2023-10-16"
#: The OAuth scope of a Vertex AI call.
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: A token is minted anew this long before it expires (calls then wait for the new one).
REFRESH_MARGIN = 300.0
#: Tokens kept, one per key (and secret): the least recently used goes first.
CACHE_SIZE = 256
#: Threads that mint tokens (each a blocking HTTP exchange with the token endpoint).
MINT_THREADS = 4
#: The largest service account key file taken (a real one is about 2.3 KB).
MAX_SECRET_CHARS = 16 * 1024

_REQUIRED = ("client_email", "private_key", "token_uri")
#: The fields besides the private key whose values are secret (masked in what comes back).
_MASKED = ("private_key_id",)
#: A project id (``my-project``, or ``example.com:my-project`` for a domain's projects).
_PROJECT = re.compile(r"[a-z0-9][a-z0-9.:-]{0,99}")
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def base_url_for(region: str) -> str:
    """The Vertex AI endpoint of ``region`` (multi-regions ``us`` and ``eu`` have their own)."""
    if region == "global":
        return "https://aiplatform.googleapis.com"
    if region in ("us", "eu"):
        return f"https://aiplatform.{region}.rep.googleapis.com"
    return f"https://{region}-aiplatform.googleapis.com"


def _service_account(secret: str) -> dict[str, str]:
    """The key file's fields; ValueError naming what is missing or wrong (never a value)."""
    if len(secret) > MAX_SECRET_CHARS:
        raise ValueError(f"the service account JSON is over {MAX_SECRET_CHARS} characters")
    try:
        info = orjson.loads(secret)
    except orjson.JSONDecodeError:
        raise ValueError("the secret must be a service account's JSON key file") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ValueError(
            'the secret must be a service account\'s JSON key file ("type": "service_account")'
        )
    for name, value in info.items():
        if not isinstance(value, str):
            raise ValueError(f"the service account JSON's {name!r} must be a string")
    for name in _REQUIRED:
        if not info.get(name):
            raise ValueError(f"the service account JSON has no {name!r}")
    return info


def _settings(settings: object) -> tuple[str, str]:
    """(project, region) of a key's settings; ValueError saying what is wrong."""
    if not isinstance(settings, dict):
        raise ValueError("a Vertex AI key's settings must be an object with project and region")
    unknown = sorted(set(settings) - {"project", "region"})
    if unknown:
        raise ValueError(f"unknown Vertex AI settings: {', '.join(map(str, unknown))}")
    project, region = settings.get("project"), settings.get("region")
    if not isinstance(project, str) or not _PROJECT.fullmatch(project):
        raise ValueError(
            "a Vertex AI key needs its Google Cloud project id (project: lower-case letters, "
            "digits and dashes, as the console shows it)"
        )
    if not isinstance(region, str) or len(region) > 40 or not _REGION.fullmatch(region):
        raise ValueError(
            "a Vertex AI key needs the region whose endpoint serves its calls "
            "(region: us-east5, europe-west1, global ...)"
        )
    return project, region


def secret_strings(info: dict[str, str]) -> list[str]:
    """The strings of a key file that must never come back, as the scrubber looks for them
    (besides the whole file, which every key's scrubbing covers): the private key as JSON
    writes it (its line breaks escaped), and its id.

    Vertex AI never sees either (only the token minted with them): these are for what
    google-auth or a token endpoint might say. The PEM with its raw line breaks is left
    out: an SSE chunk ends in a line break, and a secret with one makes the scrubber look
    for a key's start at the end of every chunk (about 0.25 ms a chunk, measured)."""
    pem = info["private_key"]
    return [orjson.dumps(pem).decode()[1:-1], *(info[n] for n in _MASKED if info.get(n))]


def _map_error(status: int, body: bytes, *, forget: Callable[[], None]) -> bytes:
    """A Vertex AI error answer in Anthropic's envelope, Google's message kept; Anthropic's
    own error (Vertex passes the model's errors on) as it is. A 401 refused the token
    (revoked, or expired before its time): it is ``forget``-ten."""
    if status == 401:
        forget()
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, list) and document:
        document = document[0]  # the streaming endpoint wraps its error in a list
    if isinstance(document, dict):
        if document.get("type") == "error":
            return body
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return MESSAGES.error_body(status, error["message"])
    text = body[:300].decode("utf-8", "replace").strip()
    return MESSAGES.error_body(status, f"Vertex AI answered {status}: {text or 'no message'}")


@dataclass(slots=True)
class _Token:
    value: str
    #: ``time.monotonic()`` readings: when to mint anew, and when it stops working.
    refresh_at: float
    expires_at: float


class _Refused(google.auth.exceptions.TransportError):
    """A token exchange refused by ``tokenfetch`` (or its answer by ``_Transport``): the
    status the client gets, and what it is told."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: dict[str, str]
    data: bytes


class _Transport(google.auth.transport.Request):
    """google-auth's HTTP transport for one mint, in its thread: each exchange is made on
    the IOLoop by ``tokenfetch`` (the gateway's HTTP client and address rules, the answer
    bounded, no redirect), all of them within one ``token_timeout`` (google-auth retries a
    5xx), the thread waiting. What google-auth reads is rebuilt from what was checked: a
    token with a sane lifetime, or an OAuth error's code and one line of its description."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: CloudRequest) -> None:
        self._loop = loop
        self._request = request
        self._deadline = time.monotonic() + request.token_timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Answer:
        # ``method`` is POST: google-auth's token requests are (tokenfetch only POSTs).
        left = self._deadline - time.monotonic()
        exchange = self._exchange(url, dict(headers or {}), body or b"", left)
        future = asyncio.run_coroutine_threadsafe(exchange, self._loop)
        try:
            # tokenfetch ends the exchange at the deadline; the margin is for the IOLoop.
            return future.result(max(0.0, left) + 5.0)
        except CloudError as exc:
            raise _Refused(exc.status, exc.message) from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise _Refused(503, "the token endpoint did not answer in time") from None

    async def _exchange(
        self, url: str, headers: dict[str, str], body: bytes, left: float
    ) -> _Answer:
        # The signed assertion (and its signature) is a credential derived from the key:
        # masked like one, should the endpoint quote it back.
        for assertion in parse_qs(body.decode("latin-1")).get("assertion", []):
            self._request.scrubber.add(assertion)
            self._request.scrubber.add(assertion.rsplit(".", 1)[-1])
        what = "the service account's token endpoint"
        answer = await tokenfetch.fetch(self._request, url, headers, body, what, left)
        where = f"{what} ({url_host(url)})"
        document = tokenfetch.json_object(answer, where)
        if answer.status == 200:
            token = document.get("access_token")
            if not isinstance(token, str) or not token or len(token) > 8192:
                raise CloudError(502, f"{where} answered without an access token")
            seconds = tokenfetch.lifetime(document.get("expires_in"), where)
            checked: dict[str, Any] = {"access_token": token, "expires_in": int(max(1, seconds))}
        else:
            code = document.get("error")
            described = document.get("error_description")
            # Masked before it is cut short: a cut would leave a secret's start unmasked.
            said = self._request.scrubber.text(described) if isinstance(described, str) else ""
            said = " ".join(said.split())[:200]
            checked = {
                "error": re.sub(r"[^\w.-]", "", code)[:60] if isinstance(code, str) else "",
                # Google's own words ("Invalid JWT Signature."), and who said them.
                "error_description": f"{said or f'HTTP {answer.status}'} ({where})",
            }
        return _Answer(answer.status, {"content-type": "application/json"}, orjson.dumps(checked))


def _mint(info: dict[str, str], transport: _Transport) -> tuple[str, float]:
    """A new access token and the seconds it lives: google-auth, blocking (in a thread)."""
    from google.oauth2 import service_account

    credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
    credentials.refresh(transport)
    expiry = credentials.expiry
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    lifetime = (expiry - now).total_seconds() if expiry is not None else 3600.0
    return str(credentials.token), lifetime


def _why(exc: BaseException) -> str:
    """What google-auth says of a failed mint, in a few words (the token endpoint's error)."""
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return " ".join(reason.split())[:300] or type(exc).__name__


def _slot(key_id: int, secret: str) -> tuple[int, str]:
    """Where a key's token is kept: a rotated secret is another account's key."""
    return key_id, hashlib.sha256(secret.encode()).hexdigest()


class TokenCache:
    """Access tokens by key (and secret), minted in a thread pool, one mint at a time per
    key, kept until ``REFRESH_MARGIN`` before they expire."""

    def __init__(self) -> None:
        self._tokens: OrderedDict[tuple[int, str], _Token] = OrderedDict()
        self._minting: dict[tuple[int, str], asyncio.Future[tuple[str, float]]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: Tokens minted by this process (what the tests count).
        self.minted = 0

    async def token(self, request: CloudRequest, info: dict[str, str]) -> str:
        """A token for the key's service account; google-auth's errors pass through."""
        key_id, secret = request.key.id, request.secret
        slot = _slot(key_id, secret)
        now = time.monotonic()
        cached = self._tokens.get(slot)
        if cached is not None and now < cached.refresh_at:
            self._tokens.move_to_end(slot)
            return cached.value
        minting = self._minting.get(slot)
        if minting is None:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    MINT_THREADS, thread_name_prefix="tvgate-vertex-token"
                )
            loop = asyncio.get_running_loop()
            transport = _Transport(loop, request)
            minting = loop.run_in_executor(self._pool, _mint, info, transport)
            self._minting[slot] = minting
            minting.add_done_callback(functools.partial(self._minted, slot, now))
        try:
            # Shielded: a call whose client left does not cancel the mint the others await.
            value, _lifetime = await asyncio.shield(minting)
        except Exception:
            if cached is not None and time.monotonic() < cached.expires_at:
                log.warning("vertex key %d: minting a new token failed; the old one serves", key_id)
                return cached.value
            raise
        return value

    def forget(self, key_id: int, secret: str) -> None:
        """Drop the key's token (Vertex AI refused it): the next call mints another."""
        self._tokens.pop(_slot(key_id, secret), None)

    def _minted(
        self, slot: tuple[int, str], started: float, done: asyncio.Future[tuple[str, float]]
    ) -> None:
        self._minting.pop(slot, None)
        if done.cancelled() or done.exception() is not None:
            return
        value, lifetime = done.result()
        self.minted += 1
        self._tokens[slot] = _Token(value, started + lifetime - REFRESH_MARGIN, started + lifetime)
        self._tokens.move_to_end(slot)
        while len(self._tokens) > CACHE_SIZE:
            self._tokens.popitem(last=False)


class VertexCredentials:
    """The credential module of ``vertex`` keys."""

    def __init__(self) -> None:
        self.tokens = TokenCache()

    def check_key(self, settings: dict[str, Any], secret: str, base_url: str | None) -> CheckedKey:
        project, region = _settings(settings)
        info = _service_account(secret.strip())
        from google.auth import crypt

        try:
            crypt.RSASigner.from_service_account_info(info)
        except ValueError:
            raise ValueError(
                "the service account JSON's private_key is not a PEM RSA private key"
            ) from None
        return CheckedKey(
            {"project": project, "region": region},
            orjson.dumps(info).decode(),
            # The key's id is what the console lists: its last four characters are shown.
            info.get("private_key_id") or "",
            base_url or base_url_for(region),
            {"token_uri": info["token_uri"]},
        )

    async def prepare(self, request: CloudRequest) -> CloudCall:
        try:
            project, region = _settings(orjson.loads(request.key.settings))
            info = _service_account(request.secret)
        except ValueError as exc:  # orjson's JSONDecodeError is one
            message = f"this route's Vertex AI key cannot be used ({exc}); ask an admin"
            raise CloudError(502, message) from None
        _mask(request.scrubber, info)
        try:
            token = await self.tokens.token(request, info)
        except Exception as exc:  # noqa: BLE001 - google-auth's, the transport's: all told
            reason = request.scrubber.text(_why(exc))
            log.warning("vertex key %d: no access token: %s", request.key.id, reason)
            raise CloudError(
                exc.status if isinstance(exc, _Refused) else 502,
                f"Vertex AI: the service account's access token could not be minted: {reason}",
            ) from None
        request.scrubber.add(token)
        body, stream = _vertex_body(request)
        if request.api is COUNT_TOKENS:
            operation = "count-tokens:rawPredict"
        else:
            model = quote(request.upstream_model, safe="@")
            operation = f"{model}:{'streamRawPredict' if stream else 'rawPredict'}"
        url = (
            f"{request.key.base_url.rstrip('/')}/v1/projects/{project}/locations/{region}"
            f"/publishers/anthropic/models/{operation}"
        )
        forget = functools.partial(self.tokens.forget, request.key.id, request.secret)
        return CloudCall(
            url,
            [("Authorization", f"Bearer {token}")],
            body,
            functools.partial(_map_error, forget=forget),
        )


def _mask(scrubber: KeyScrubber, info: dict[str, str]) -> None:
    for value in secret_strings(info):
        scrubber.add(value)


def _vertex_body(request: CloudRequest) -> tuple[bytes, bool]:
    """The body as Vertex AI takes it, and whether it streams."""
    document = orjson.loads(request.body)
    if request.api is not COUNT_TOKENS:
        # The model is in the URL; count-tokens alone takes it in the body.
        document.pop("model", None)
    version = document.get("anthropic_version")
    if not (isinstance(version, str) and version.startswith("vertex-")):
        document["anthropic_version"] = ANTHROPIC_VERSION
    beta = request.client_headers.get("anthropic-beta", "")
    if beta and "anthropic_beta" not in document:
        document["anthropic_beta"] = [b.strip() for b in beta.split(",") if b.strip()]
    return orjson.dumps(document), document.get("stream") is True


CREDENTIALS = VertexCredentials()
