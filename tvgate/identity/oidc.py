"""Keycloak access tokens of a single-tenant Visdom Trace, checked against the issuer it names.

Nothing is configured but ``TVGATE_VISDOM_URL``: the issuer and the audience come
from Visdom Trace's ``GET /api/v1/auth/public-config`` (``oidc_enabled``,
``issuer``, ``audience``), the keys from the issuer's OIDC discovery document
(``jwks_uri``) and its JWKS. Every fetch is asynchronous (never on the IOLoop's
time), one at a time (concurrent first sign-ins wait for the same one), and at
most once per ``jwt_jwks_refetch_interval``: a flood of tokens naming unknown
``kid`` values, or an issuer that is down, never makes tvgate hammer it. The
public config and discovery are kept for an hour (and kept past that while a
refresh fails); the JWKS until a token names a ``kid`` it lacks.

A hostile or broken issuer is bounded: each document at most 256 KiB (read no
further), at most 50 keys, RSA keys at most 8192 bits, a discovery document
whose ``issuer`` is not the one Visdom Trace named refused (OIDC Discovery 4.3),
no redirects, 5 s per fetch. Such an answer is an outage (503), never a 401.

Only public-key algorithms are taken (``jwt_algorithms`` less HMAC; never
``none``), each with the key the issuer publishes: a token cannot choose how it
is checked. The token's ``iss`` must be the issuer, its ``aud`` the audience when
Visdom Trace names one, and it must carry ``exp`` and ``sub``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from tvgate.config import Settings
from tvgate.identity import AuthError, IdentityUnavailable
from tvgate.identity.jwt_issuer import HMAC_ALGORITHMS, signing_header

log = logging.getLogger("tvgate.identity")

#: Largest document tvgate reads from Visdom Trace or its issuer (the body is not read past it).
MAX_DOCUMENT_BYTES = 256 * 1024
#: Most keys an issuer's JWKS may list (Keycloak publishes two or three).
MAX_KEYS = 50
#: Largest RSA key taken: a bigger one only makes each check slower.
MAX_RSA_BITS = 8192
#: Seconds the public config and discovery document are kept before they are asked again.
CONFIG_TTL = 3600.0
#: Seconds each fetch may take.
FETCH_TIMEOUT = 5.0


def bounded_client() -> SimpleAsyncHTTPClient:
    """An HTTP client that reads no body past MAX_DOCUMENT_BYTES (a hostile server's 8 MB
    answer is cut at its Content-Length, or as soon as a chunked one passes the cap)."""
    return SimpleAsyncHTTPClient(
        force_instance=True, max_body_size=MAX_DOCUMENT_BYTES, max_buffer_size=MAX_DOCUMENT_BYTES
    )


class NoOIDC(AuthError):
    """Visdom Trace signs no one in at an OIDC issuer (a multi-org server): a JWT is no
    Visdom Trace credential here (401)."""


@dataclass(frozen=True, slots=True)
class Issuer:
    """What Visdom Trace and its issuer said: who signs, for whom, where the keys are."""

    issuer: str
    audience: str
    jwks_uri: str
    fetched_at: float


def _http_url(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise IdentityUnavailable(f"{what} is not an http(s) URL")
    if len(value) > 2000:
        raise IdentityUnavailable(f"{what} is too long")
    return value


class OIDCVerifier:
    """Checks a single-tenant Visdom Trace's Keycloak access tokens (see the module)."""

    def __init__(self, visdom_url: str, settings: Settings) -> None:
        self.visdom_url = visdom_url.rstrip("/")
        self.leeway = settings.jwt_leeway
        self.refetch_interval = settings.jwt_jwks_refetch_interval
        algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
        self.algorithms = [a for a in algorithms if a not in HMAC_ALGORITHMS]
        self.http = bounded_client()
        self._lock = asyncio.Lock()
        self._issuer: Issuer | None = None
        #: When the public config said there is no OIDC sign-in (monotonic), else None.
        self._no_oidc_at: float | None = None
        self._issuer_tried_at = -float("inf")
        self._keys: dict[str | None, Any] = {}
        self._keys_tried_at = -float("inf")

    async def _get(self, url: str, what: str) -> Any:
        request = HTTPRequest(
            url,
            headers={"Accept": "application/json"},
            connect_timeout=FETCH_TIMEOUT,
            request_timeout=FETCH_TIMEOUT,
            follow_redirects=False,
        )
        try:
            response = await self.http.fetch(request)
            return orjson.loads(response.body)
        except HTTPClientError as exc:
            if exc.code == 404 and what == "public config":
                return None
            raise IdentityUnavailable(f"{what}: HTTP {exc.code}") from None
        except Exception as exc:  # noqa: BLE001 - too big, unreachable, not JSON: all outages
            raise IdentityUnavailable(f"{what}: {type(exc).__name__}") from None

    async def _learn_issuer(self) -> Issuer:
        config = await self._get(self.visdom_url + "/api/v1/auth/public-config", "public config")
        if not isinstance(config, dict) or config.get("oidc_enabled") is not True:
            self._no_oidc_at = time.monotonic()
            raise NoOIDC("Visdom Trace signs no one in with an OIDC issuer; send a tvs_ token")
        issuer = _http_url(config.get("issuer"), "the issuer Visdom Trace names")
        audience = config.get("audience") or ""
        if not isinstance(audience, str) or len(audience) > 500:
            raise IdentityUnavailable("Visdom Trace's audience is not a string")
        discovery = await self._get(
            issuer.rstrip("/") + "/.well-known/openid-configuration", "OIDC discovery"
        )
        if not isinstance(discovery, dict) or discovery.get("issuer") != issuer:
            raise IdentityUnavailable("the issuer's discovery document names another issuer")
        jwks_uri = _http_url(discovery.get("jwks_uri"), "the issuer's jwks_uri")
        self._no_oidc_at = None
        return Issuer(issuer, audience, jwks_uri, time.monotonic())

    async def issuer(self) -> Issuer:
        """The issuer, learnt from Visdom Trace at most once per refetch interval."""
        now = time.monotonic()
        known = self._issuer
        if known is not None and now - known.fetched_at < CONFIG_TTL:
            return known
        async with self._lock:
            known = self._issuer
            now = time.monotonic()
            if known is not None and now - known.fetched_at < CONFIG_TTL:
                return known
            if now - self._issuer_tried_at < self.refetch_interval:
                if known is not None:
                    return known  # stale while a refresh failed a moment ago
                if self._no_oidc_at is not None:
                    raise NoOIDC("Visdom Trace signs no one in with an OIDC issuer")
                raise IdentityUnavailable("the issuer could not be learnt a moment ago")
            self._issuer_tried_at = now
            try:
                self._issuer = await self._learn_issuer()
            except IdentityUnavailable as exc:
                log.warning("Visdom Trace's OIDC issuer is unusable: %s", exc)
                if known is not None:
                    return known
                raise
            if known is not None and known.jwks_uri != self._issuer.jwks_uri:
                self._keys = {}
            return self._issuer

    async def _fetch_keys(self, issuer: Issuer) -> None:
        document = await self._get(issuer.jwks_uri, "JWKS")
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise IdentityUnavailable("the issuer's JWKS has no key list")
        if len(entries) > MAX_KEYS:
            raise IdentityUnavailable(f"the issuer's JWKS lists {len(entries)} keys")
        keys: dict[str | None, Any] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK.from_dict(entry).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, TypeError, ValueError):
                log.warning("skipping a JWKS entry tvgate cannot use")
                continue
            if isinstance(key, RSAPublicKey) and key.key_size > MAX_RSA_BITS:
                log.warning("skipping a JWKS key of %d bits", key.key_size)
                continue
            kid = entry.get("kid")
            keys[kid if isinstance(kid, str) else None] = key
        self._keys = keys

    async def _key(self, issuer: Issuer, kid: str | None) -> Any:
        if kid not in self._keys:
            async with self._lock:
                now = time.monotonic()
                if kid not in self._keys and now - self._keys_tried_at >= self.refetch_interval:
                    self._keys_tried_at = now
                    try:
                        await self._fetch_keys(issuer)
                    except IdentityUnavailable as exc:
                        log.warning("the OIDC issuer's JWKS is unusable: %s", exc)
                        raise
                elif kid not in self._keys and not self._keys:
                    raise IdentityUnavailable("the issuer's JWKS could not be read a moment ago")
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid not in self._keys:
            raise AuthError("token signed with a key the issuer does not publish")
        return self._keys[kid]

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of a good access token; AuthError for any other token (NoOIDC when
        Visdom Trace has no issuer), IdentityUnavailable when the issuer cannot be used."""
        algorithm, kid = signing_header(token, self.algorithms)
        issuer = await self.issuer()
        key = await self._key(issuer, kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=issuer.issuer,
                audience=issuer.audience or None,
                leeway=self.leeway,
                options={
                    "require": ["exp", "iss", "sub"],
                    # Visdom Trace named no audience: it takes any of its realm's tokens.
                    "verify_aud": bool(issuer.audience),
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("JWT expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"JWT rejected: {type(exc).__name__}") from None
        return claims
