"""JWTs from a configured issuer (an OIDC provider or any signer), verified with pyjwt.

Only the algorithms the operator listed are accepted, never ``none``; the key
for an HMAC algorithm is only ever the shared secret and the key for a public
key algorithm only ever a public key, so a token cannot choose how it is
checked (no key confusion). Keys come from a PEM file or a JWKS URL; the JWKS
is cached and refetched when a token names an unknown ``kid``, at most once per
``jwt_jwks_refetch_interval`` (a minute). A verified token is remembered by its SHA-256 until it expires (or the
cache TTL passes), so its signature is not checked again on every request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from tvgate.config import ConfigError, Settings
from tvgate.db import DatabaseRunner, DatabaseUnavailable
from tvgate.identity import VIA_JWT, AuthError, IdentityUnavailable, OrgSelectionError, Principal
from tvgate.identity.provision import Membership, OutsideIdentity, provision

log = logging.getLogger("tvgate.identity")

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


def signing_header(token: str, accepted: list[str]) -> tuple[str, str | None]:
    """The algorithm a JWT's header names, refused (AuthError) unless it is one of
    ``accepted``, and the header's ``kid`` (None when it names none, or not a string)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("malformed JWT") from None
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in accepted:
        raise AuthError(f"JWT algorithm {algorithm!r} is not accepted")
    kid = header.get("kid")
    return algorithm, kid if isinstance(kid, str) else None


class JWTAuthenticator:
    def __init__(self, settings: Settings, runner: DatabaseRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
        self.public_algorithms = [a for a in self.algorithms if a not in HMAC_ALGORITHMS]
        self.hmac_algorithms = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        self.static_key: Any = None
        if settings.jwt_public_key:
            try:
                pem = Path(settings.jwt_public_key).read_bytes()
            except OSError as exc:
                raise ConfigError(f"jwt_public_key: {exc}") from None
            try:
                self.static_key = load_pem_public_key(pem)
            except ValueError:
                raise ConfigError("jwt_public_key is not a PEM public key") from None
        self.jwks: dict[str, Any] = {}
        self.jwks_fetched_at = -settings.jwt_jwks_refetch_interval
        self.http = AsyncHTTPClient(force_instance=True)
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def _public_key(self, kid: str | None) -> Any:
        if self.static_key is not None:
            return self.static_key
        if not self.settings.jwt_jwks_url:
            raise AuthError("no public key is configured for this token's algorithm")
        since = time.monotonic() - self.jwks_fetched_at
        if kid not in self.jwks and since >= self.settings.jwt_jwks_refetch_interval:
            await self._fetch_jwks()
        if kid is None and len(self.jwks) == 1:
            return next(iter(self.jwks.values()))
        if kid not in self.jwks:
            raise AuthError("token signed with a key the issuer does not publish")
        return self.jwks[kid]

    async def _fetch_jwks(self) -> None:
        self.jwks_fetched_at = time.monotonic()
        request = HTTPRequest(
            self.settings.jwt_jwks_url, connect_timeout=5, request_timeout=5, follow_redirects=False
        )
        try:
            response = await self.http.fetch(request)
            document = orjson.loads(response.body)
        except Exception as exc:  # noqa: BLE001 - any failure means the JWKS is unavailable
            raise IdentityUnavailable(f"JWKS unavailable: {type(exc).__name__}") from None
        keys: dict[str, Any] = {}
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            try:
                keys[entry.get("kid")] = jwt.PyJWK.from_dict(entry).key
            except (jwt.PyJWKError, TypeError, ValueError):
                log.warning("skipping a JWKS entry tvgate cannot use")
        self.jwks = keys

    async def _claims(self, token: str) -> dict[str, Any]:
        algorithm, kid = signing_header(token, self.algorithms)
        if algorithm in HMAC_ALGORITHMS:
            if not self.settings.jwt_secret:
                raise AuthError("no shared secret is configured for HMAC tokens")
            key: Any = self.settings.jwt_secret
            allowed = self.hmac_algorithms
        else:
            key = await self._public_key(kid)
            allowed = self.public_algorithms
        required = ["exp", "iss"] + (["aud"] if self.settings.jwt_audience else [])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=allowed,
                issuer=self.settings.jwt_issuer,
                audience=self.settings.jwt_audience or None,
                leeway=self.settings.jwt_leeway,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("JWT expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("JWT not valid yet") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"JWT rejected: {type(exc).__name__}") from None
        return claims

    async def authenticate(self, token: str, requested_org: str | None) -> Principal:
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        known = self._verified.get(token_hash + "\0" + (requested_org or ""))
        if known is not None and known[1] > time.time():
            return known[0]
        claims = await self._claims(token)
        settings = self.settings
        user_id = claims.get(settings.jwt_claim_user_id)
        email = claims.get(settings.jwt_claim_email)
        if not isinstance(user_id, str | int) or not isinstance(email, str) or "@" not in email:
            raise AuthError("JWT lacks a user id or an email claim")
        org_claim = claims.get(settings.jwt_claim_org) if settings.jwt_claim_org else None
        org_names = [org_claim] if isinstance(org_claim, str) else org_claim or []
        if not isinstance(org_names, list) or not all(isinstance(o, str) for o in org_names):
            raise AuthError("JWT org claim must be a string or a list of strings")
        if not org_names and not settings.pinned_org:
            raise OrgSelectionError("the JWT names no org and this gateway pins none")
        role = str(claims.get(settings.jwt_claim_role) or "")
        if org_names:
            # A JWT org is the issuer's: bound by (iss, claim value), never by the name alone.
            memberships = tuple(
                Membership(name, name, "", role, jwt_issuer=settings.jwt_issuer)
                for name in org_names
            )
        else:
            # No org claim: the operator pinned the org every token of the issuer acts in.
            memberships = (Membership(settings.pinned_org, None, "", role),)
        identity = OutsideIdentity(
            str(user_id),
            email,
            str(claims.get("name") or ""),
            memberships,
            email_verified=claims.get("email_verified") is True,
        )
        try:
            provisioned = await self.runner.run(
                lambda: provision(
                    identity,
                    requested_org,
                    settings.pinned_org,
                    link_by_email=settings.link_users_by_email,
                )
            )
        except DatabaseUnavailable:
            # Stale if error: the signature and expiry were just checked; only the user row
            # could not be refreshed.
            if known is not None:
                return known[0]
            raise
        # What it mints lasts at most jwt_token_max_age; a web session, until ``exp``.
        principal = dataclasses.replace(provisioned, via=VIA_JWT, expires_at=float(claims["exp"]))
        until = min(float(claims["exp"]), time.time() + settings.cache_ttl)
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified[token_hash + "\0" + (requested_org or "")] = (principal, until)
        return principal

    def forget_all(self) -> None:
        self._verified.clear()

    def close(self) -> None:
        self.http.close()
