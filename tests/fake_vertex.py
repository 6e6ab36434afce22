"""A fake Google Vertex AI serving Claude, and the fake OAuth token endpoint it trusts.

``FakeVertex`` is a ``FakeProvider`` (tests/fake_provider.py) on 127.0.0.1 that answers
what Vertex AI and Google's token endpoint answer, and checks what they check:

* ``POST /token``: the OAuth 2.0 JWT bearer grant (RFC 7523) a service account's key file
  leads to (its ``token_uri``). Only ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
  with an ``assertion`` signed (RS256) by the private key of an account this fake made
  (``service_account()``), for Google's token endpoint (``aud``), short-lived (an hour at most), for
  the ``cloud-platform`` scope; anything else is refused as Google refuses it
  (``{"error": "invalid_grant", "error_description": ...}``). A grant mints an access
  token (``ya29.…``) that lives ``expires_in`` seconds (a knob).
* ``POST /v1/projects/{p}/locations/{r}/publishers/anthropic/models/{m}:rawPredict``,
  ``:streamRawPredict`` and ``…/models/count-tokens:rawPredict``: only with a Bearer token
  it minted, unexpired; the project and region it serves; a body with
  ``anthropic_version: vertex-2023-10-16`` and no ``model`` (count-tokens: with the model);
  ``stream`` as the method says. Google's refusals come in Google's envelope
  (``{"error": {"code", "message", "status"}}``; the streaming method wraps it in a list).
  A call that passes is answered as the fake Anthropic API answers ``/v1/messages`` for the
  model of the path, scenarios (``x-fake-scenario``) and all: the same bytes, the same SSE.

Every request is recorded as sent (``requests``, the original path and body), every grant
counted (``mints``).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fake_provider import FakeProvider, _Handler

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: The audience of a grant's assertion: Google's token endpoint, wherever it is reached.
AUDIENCE = "https://oauth2.googleapis.com/token"
ANTHROPIC_VERSION = "vertex-2023-10-16"
_PATH = re.compile(
    r"/v1/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/models/([^/]+):([A-Za-z]+)"
)
UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


class _GoogleError(Exception):
    def __init__(self, code: int, status: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


class _OAuthError(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


@dataclass
class _Account:
    email: str
    key_id: str
    public_key: Any
    revoked: bool = False


class _VertexHandler(_Handler):
    provider: FakeVertex

    async def post(self) -> None:
        if self.request.path == "/token":
            self._token_endpoint()
            return
        streaming = self.request.path.endswith(":streamRawPredict")
        try:
            self._vertex_call()
        except _GoogleError as exc:
            error = {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}
            self.clear()
            self.set_status(exc.code)
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(json.dumps([error] if streaming else error, indent=2) + "\n")
            return
        await self._serve()

    async def get(self) -> None:
        self.send_error(404)

    # ---- the token endpoint

    def _token_endpoint(self) -> None:
        try:
            token, lifetime = self._grant()
        except _OAuthError as exc:
            self.set_status(400)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"error": exc.error, "error_description": exc.description}))
            return
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(
            json.dumps({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"})
        )

    def _grant(self) -> tuple[str, int]:
        form = urllib.parse.parse_qs(self.request.body.decode("utf-8", "replace"))
        grant = form.get("grant_type", [""])[0]
        if grant != JWT_BEARER:
            raise _OAuthError("unsupported_grant_type", f"Invalid grant_type: {grant}")
        assertion = form.get("assertion", [""])[0]
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise _OAuthError("invalid_grant", "Invalid JWT: could not be parsed.") from None
        account = self.provider.accounts.get(str(claims.get("iss")))
        if account is None or account.revoked or header.get("kid") != account.key_id:
            raise _OAuthError("invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=AUDIENCE,
                issuer=account.email,
                options={"require": ["iat", "exp", "aud", "iss"]},
            )
        except jwt.InvalidSignatureError:
            raise _OAuthError("invalid_grant", "Invalid JWT Signature.") from None
        except jwt.PyJWTError as exc:
            raise _OAuthError("invalid_grant", f"Invalid JWT: {exc}") from None
        if int(claims["exp"]) - int(claims["iat"]) > 3600:
            raise _OAuthError(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe.",
            )
        if SCOPE not in str(claims.get("scope", "")).split():
            raise _OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        return self.provider.mint(account.email), self.provider.expires_in

    # ---- Vertex AI

    def _vertex_call(self) -> None:
        """Google's checks of a call, in its order; then the call made a ``/v1/messages``
        (or count_tokens) call of the fake Anthropic API, for the model of the path."""
        authorization = self.request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            raise _GoogleError(
                401,
                "UNAUTHENTICATED",
                "Request is missing required authentication credential. Expected OAuth 2 "
                "access token, login cookie or other valid authentication credential. See "
                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
            )
        if not self.provider.valid(authorization[7:]):
            raise _GoogleError(401, "UNAUTHENTICATED", UNAUTHENTICATED)
        found = _PATH.fullmatch(self.request.path)
        if found is None or found[4] not in ("rawPredict", "streamRawPredict"):
            raise _GoogleError(
                404, "NOT_FOUND", f"The requested URL {self.request.path} was not found."
            )
        project, region, model, method = found.groups()
        resource = f"projects/{project}/locations/{region}/publishers/anthropic/models/{model}"
        if project != self.provider.project:
            raise _GoogleError(
                403,
                "PERMISSION_DENIED",
                f"Permission 'aiplatform.endpoints.predict' denied on resource "
                f"'//aiplatform.googleapis.com/{resource}' (or it may not exist).",
            )
        if region != self.provider.region:
            raise _GoogleError(
                400,
                "FAILED_PRECONDITION",
                f"Location {region} is not served by the {self.provider.region} endpoint.",
            )
        counting = model == "count-tokens"
        if not counting and not model.startswith("claude-"):
            raise _GoogleError(404, "NOT_FOUND", f"Publisher Model `{resource}` not found.")
        try:
            body = json.loads(self.request.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _GoogleError(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        version = body.get("anthropic_version")
        if version != ANTHROPIC_VERSION:
            raise _GoogleError(
                400,
                "INVALID_ARGUMENT",
                f"anthropic_version: must be {ANTHROPIC_VERSION!r}, got {version!r}",
            )
        if counting:
            if method != "rawPredict" or not isinstance(body.get("model"), str):
                raise _GoogleError(
                    400, "INVALID_ARGUMENT", "count-tokens takes the model in the body"
                )
            self.request.path = "/v1/messages/count_tokens"
        else:
            if "model" in body:
                raise _GoogleError(
                    400, "INVALID_ARGUMENT", "model: the model is given in the URL, not the body"
                )
            if (method == "streamRawPredict") != (body.get("stream") is True):
                raise _GoogleError(
                    400,
                    "INVALID_ARGUMENT",
                    f"stream must be {method == 'streamRawPredict'} for {method}",
                )
            body = {"model": model, **body}
            self.request.path = "/v1/messages"
        self.provider.calls.append((model, body))
        del body["anthropic_version"]
        body.pop("anthropic_beta", None)
        self.request.body = json.dumps(body).encode()

    def _authenticate(self, api: str) -> None:
        """The token was checked (``_vertex_call``): the fake Anthropic API asks for no key."""


class FakeVertex(FakeProvider):
    """Vertex AI for one project and region, and its token endpoint (``url + "/token"``)."""

    handler_class = _VertexHandler

    def __init__(self, project: str = "tvgate-test", region: str = "us-east5") -> None:
        super().__init__(None)
        self.project = project
        self.region = region
        self.accounts: dict[str, _Account] = {}
        #: How long minted tokens live, in seconds.
        self.expires_in = 3600
        #: The account email of each grant, in order.
        self.mints: list[str] = []
        #: (model, body as received) of each call that passed Google's checks.
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def service_account(self, name: str = "tvgate") -> dict[str, str]:
        """A new service account's JSON key file, whose ``token_uri`` is this fake's."""
        assert self.url, "start() first"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        email = f"{name}-{secrets.token_hex(3)}@{self.project}.iam.gserviceaccount.com"
        key_id = secrets.token_hex(20)
        self.accounts[email] = _Account(email, key_id, key.public_key())
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**21)).rjust(21, "1"),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.url + "/token",
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + urllib.parse.quote(email),
            "universe_domain": "googleapis.com",
        }

    def revoke(self, email: str) -> None:
        """Delete the account's key: its grants are refused from now on."""
        self.accounts[email].revoked = True

    def mint(self, email: str) -> str:
        token = "ya29.c." + secrets.token_urlsafe(96)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.expires_in
            self.mints.append(email)
        return token

    def valid(self, token: str) -> bool:
        with self._lock:
            expires = self._tokens.get(token)
        return expires is not None and time.monotonic() < expires

    def expire_tokens(self) -> None:
        """Every token minted so far stops working (as if its hour had passed)."""
        with self._lock:
            self._tokens = dict.fromkeys(self._tokens, 0.0)

    @property
    def tokens(self) -> list[str]:
        """Every token minted so far."""
        with self._lock:
            return list(self._tokens)
