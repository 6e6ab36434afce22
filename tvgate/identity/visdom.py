"""Visdom Trace credentials: ``tvs_…`` sessions, and a single-tenant server's Keycloak tokens.

tvgate asks ``GET /api/v1/auth/me`` and ``GET /api/v1/me/orgs`` with the token
as a Bearer credential, and keeps the answer in memory keyed by the token's
SHA-256 (never the token): ``visdom_cache_ttl`` seconds for a good token,
``visdom_negative_ttl`` for a rejected one. When Visdom Trace cannot be
reached, a cached answer keeps serving until its TTL; after that the request
gets a 503, never a 401: an outage must not look like a revoked sign-in.

A single-tenant server (today's) has no ``/me/orgs`` (404): its people act in
the operator's pinned org, or without one in the one tvgate org connected to this
server's ingestion (``tvgate visdom connect --url`` the gateway's TVGATE_VISDOM_URL),
with the role ``/auth/me`` gives (``tracing-admin``
→ admin, ``tracing`` → member), and ``/auth/me`` answering 403 (no tracing
role) is a 403 with Visdom Trace's message. Its credentials are Keycloak access
tokens, checked against the issuer it names first (``tvgate.identity.oidc``):
a forged one never reaches Visdom Trace. The extractor's text/plain 401s and a
``name`` or ``display_name`` of null are read as what they are.

Each call's token is handed to a ``CredentialKeeper`` (tvgate.visdom.credentials), which
keeps it sealed when it is new, so that the user's sessions are pushed to Visdom Trace
with their own credential.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import orjson
from tornado.httpclient import HTTPClientError, HTTPRequest

from tvgate.db import DatabaseRunner, DatabaseUnavailable
from tvgate.identity import (
    VIA_JWT,
    VIA_VISDOM,
    AuthError,
    IdentityUnavailable,
    NoAccess,
    OrgSelectionError,
    Principal,
)
from tvgate.identity.oidc import OIDCVerifier, bounded_client
from tvgate.identity.provision import Membership, OutsideIdentity, provision
from tvgate.visdom.credentials import (
    KIND_JWT,
    KIND_SESSION,
    SESSION_LIFETIME,
    CredentialKeeper,
)

TOKEN_PREFIX = "tvs_"  # noqa: S105 - a prefix, not a secret
#: Visdom Trace's org API keys: automation credentials that act for no person.
ORG_KEY_PREFIX = "tvk_"
#: Most characters of a message of Visdom Trace's that tvgate passes on.
MESSAGE_CHARS = 300


def _message(body: bytes | None) -> str:
    """Visdom Trace's message in an error answer: a JSON ``{"error": msg}`` (its domain
    errors) or a text/plain body (its extractor's 401s), printable and cut short."""
    if not body:
        return ""
    try:
        document = orjson.loads(body)
        text = document.get("error") if isinstance(document, dict) else None
    except orjson.JSONDecodeError:
        text = body[: MESSAGE_CHARS * 4].decode("utf-8", "replace")
    if not isinstance(text, str):
        return ""
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text[:MESSAGE_CHARS]


def _tenant_role(value: Any) -> str:
    """The role in a single-tenant ``/auth/me`` (a string; a list of realm roles read too)."""
    if isinstance(value, list):
        roles = [r for r in value if isinstance(r, str)]
        return next((r for r in ("tracing-admin", "tracing") if r in roles), "")
    return value if isinstance(value, str) else ""


@dataclass(slots=True)
class _Cached:
    identity: OutsideIdentity | None
    #: Why Visdom Trace refused the credential (its 401, or its 403 to the account).
    refusal: AuthError | None
    expires: float
    #: When Visdom Trace gave this answer (epoch seconds).
    seen_at: float = 0.0


class VisdomClient:
    """The calls tvgate makes to Visdom Trace. ``tenant_org`` is the tvgate org a
    single-tenant server's people act in (the pinned org); empty: ``tenant_lookup``
    names it (the one org connected to this server; "" for none or several)."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 5.0,
        tenant_org: str = "",
        tenant_lookup: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.tenant_org = tenant_org
        self.tenant_lookup = tenant_lookup
        self.http = bounded_client()

    async def _call(
        self, method: str, path: str, token: str | None, body: bytes | None, *, gone: bool = False
    ) -> bytes | None:
        """The answer's body; None for a 404 when ``gone`` (an endpoint the server lacks)."""
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = HTTPRequest(
            self.base_url + path,
            method=method,
            headers=headers,
            body=body,
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=False,
        )
        try:
            response = await self.http.fetch(request)
        except HTTPClientError as exc:
            if exc.code == 404 and gone:
                return None
            said = _message(exc.response.body if exc.response is not None else None)
            if exc.code == 403 and path == "/api/v1/auth/me":
                raise NoAccess(
                    "Visdom Trace refused this account: " + (said or "no access")
                ) from None
            if exc.code in (400, 401, 403, 404):
                why = f": {said}" if said else ""
                raise AuthError("Visdom Trace did not accept the credential" + why) from None
            raise IdentityUnavailable(f"Visdom Trace answered {exc.code}") from None
        except Exception as exc:  # noqa: BLE001 - unreachable, too big, cut off: an outage
            raise IdentityUnavailable(f"Visdom Trace unreachable: {type(exc).__name__}") from None
        return response.body

    async def _json(self, path: str, token: str, *, gone: bool = False) -> Any:
        body = await self._call("GET", path, token, None, gone=gone)
        try:
            return None if body is None else orjson.loads(body)
        except orjson.JSONDecodeError:
            raise IdentityUnavailable("Visdom Trace sent an answer tvgate cannot read") from None

    async def _tenant(self, me: dict[str, Any]) -> tuple[Membership, ...]:
        """A single-tenant server's one membership: the pinned org (else the one org
        connected to this server), ``/auth/me``'s role."""
        org = self.tenant_org
        if not org and self.tenant_lookup is not None:
            org = await self.tenant_lookup()
        if not org:
            raise OrgSelectionError(
                "this Visdom Trace server has a single tenant (no /api/v1/me/orgs) and "
                "no one tvgate org is connected to it; the operator sets "
                "TVGATE_PINNED_ORG to the tvgate org its people act in"
            )
        return (Membership(org, None, "", _tenant_role(me.get("role"))),)

    async def identity(self, token: str) -> OutsideIdentity:
        me = await self._json("/api/v1/auth/me", token)
        orgs = await self._json("/api/v1/me/orgs", token, gone=True)
        tenant = await self._tenant(me) if orgs is None and isinstance(me, dict) else None
        try:
            memberships = (
                tenant
                if tenant is not None
                else tuple(
                    Membership(
                        org_name=str(o["org_name"]),
                        org_external_id=str(o["org_id"]),
                        display_name=str(o.get("display_name") or ""),
                        role=str(o.get("role") or ""),
                    )
                    for o in orgs
                )
            )
            return OutsideIdentity(
                user_external_id=str(me["user_id"]),
                email=str(me["email"]),
                name=str(me.get("name") or ""),
                memberships=memberships,
            )
        except (KeyError, TypeError, AttributeError):
            raise IdentityUnavailable("Visdom Trace sent an answer tvgate cannot read") from None

    async def login(self, email: str, password: str) -> str:
        """Visdom Trace's sign-in: a session token for email and password (never stored)."""
        body = orjson.dumps({"email": email, "password": password})
        raw = await self._call("POST", "/api/v1/auth/login", None, body)
        try:
            answer = orjson.loads(raw or b"")
        except orjson.JSONDecodeError:
            raise IdentityUnavailable("Visdom Trace sent no session token") from None
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            raise IdentityUnavailable("Visdom Trace sent no session token")
        return token

    async def check(self) -> None:
        """Raise IdentityUnavailable unless Visdom Trace answers (a 401 to no token counts)."""
        try:
            await self._call("GET", "/api/v1/auth/me", None, None)
        except AuthError:
            return

    def close(self) -> None:
        self.http.close()


@dataclass(eq=False)
class VisdomAuthenticator:
    client: VisdomClient
    runner: DatabaseRunner
    _: KW_ONLY
    ttl: float
    negative_ttl: float
    pinned_org: str
    #: Checks a single-tenant server's Keycloak tokens; None: JWTs are not Visdom Trace's.
    oidc: OIDCVerifier | None = None
    #: Keeps the token a call came with, for pushing its user's sessions to Visdom Trace.
    keeper: CredentialKeeper | None = None
    _identities: dict[str, _Cached] = field(default_factory=dict, init=False, repr=False)
    #: (token hash, requested org) -> principal, until the identity's expiry.
    _principals: dict[tuple[str, str], tuple[Principal, float]] = field(
        default_factory=dict, init=False, repr=False
    )
    #: Token hash -> the ``exp`` of a Keycloak token whose signature checked out.
    _verified: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    async def _identity(self, token: str, token_hash: str) -> _Cached:
        now = time.monotonic()
        cached = self._identities.get(token_hash)
        if cached is None or cached.expires <= now:
            seen_at = time.time()
            try:
                identity = await self.client.identity(token)
                cached = _Cached(identity, None, time.monotonic() + self.ttl, seen_at)
            except AuthError as exc:
                cached = _Cached(None, exc, time.monotonic() + self.negative_ttl, seen_at)
            if len(self._identities) > 100_000:
                self.forget_all()
            self._identities[token_hash] = cached
        if cached.refusal is not None:
            # A fresh one each time: the cached one would carry every earlier traceback.
            raise type(cached.refusal)(str(cached.refusal))
        return cached

    async def identity(self, token: str) -> tuple[OutsideIdentity, float]:
        """Who a session is and when Visdom Trace said so (epoch seconds), through the cache:
        what a token or web session made from this session is re-checked with."""
        cached = await self._identity(token, hashlib.sha256(token.encode()).hexdigest())
        assert cached.identity is not None
        return cached.identity, cached.seen_at

    async def authenticate(self, token: str, requested_org: str | None) -> Principal:
        """The principal of a ``tvs_`` session."""
        return await self._principal(token, requested_org, via=VIA_VISDOM, expires_at=None)

    async def authenticate_jwt(self, token: str, requested_org: str | None) -> Principal:
        """The principal of a single-tenant server's Keycloak access token: its signature,
        issuer, audience and expiry checked here first, then Visdom Trace asked who it is.
        It acts as a JWT sign-in does (what it mints lasts at most jwt_token_max_age)."""
        if self.oidc is None:
            raise AuthError("JWT sign-in is not configured on this gateway")
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        expires_at = self._verified.get(token_hash)
        if expires_at is None or expires_at <= time.time():
            claims = await self.oidc.verify(token)
            expires_at = float(claims["exp"])
            if len(self._verified) > 100_000:
                self._verified.clear()
            self._verified[token_hash] = expires_at
        return await self._principal(token, requested_org, via=VIA_JWT, expires_at=expires_at)

    async def _principal(
        self, token: str, requested_org: str | None, *, via: str, expires_at: float | None
    ) -> Principal:
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        cached = await self._identity(token, token_hash)
        identity = cached.identity
        assert identity is not None
        key = (token_hash, requested_org or "")
        known = self._principals.get(key)
        if known is not None and known[1] > time.monotonic():
            self._keep(known[0], token, token_hash, cached, expires_at)
            return known[0]
        try:
            # The org is chosen among the tvgate orgs the memberships are bound to, so it
            # takes the database; Visdom Trace's emails are never verified ones (its answer
            # does not say), so they never link a user by email.
            provisioned = await self.runner.run(
                lambda: provision(identity, requested_org, self.pinned_org)
            )
        except DatabaseUnavailable:
            if known is not None:
                return known[0]  # stale if error: the database is away, Visdom Trace is not
            raise
        principal = dataclasses.replace(provisioned, via=via, expires_at=expires_at)
        self._principals[key] = (principal, cached.expires)
        self._keep(principal, token, token_hash, cached, expires_at)
        return principal

    def _keep(
        self,
        principal: Principal,
        token: str,
        token_hash: str,
        cached: _Cached,
        expires_at: float | None,
    ) -> None:
        """Hand the token to the keeper: a JWT good until its ``exp``, a ``tvs_`` session
        for Visdom Trace's sliding lifetime from when Visdom Trace last accepted it."""
        if self.keeper is None:
            return
        if expires_at is not None:
            self.keeper.note(principal, token, token_hash, KIND_JWT, expires_at)
        else:
            lifetime = cached.seen_at + SESSION_LIFETIME
            self.keeper.note(principal, token, token_hash, KIND_SESSION, lifetime)

    def forget_all(self) -> None:
        self._identities.clear()
        self._principals.clear()
        self._verified.clear()
