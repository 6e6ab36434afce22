"""Visdom Trace session tokens (``tvs_…``): checked against the Visdom Trace server, cached.

tvgate asks ``GET /api/v1/auth/me`` and ``GET /api/v1/me/orgs`` with the token
as a Bearer credential, and keeps the answer in memory keyed by the token's
SHA-256 (never the token): ``visdom_cache_ttl`` seconds for a good token,
``visdom_negative_ttl`` for a rejected one. When Visdom Trace cannot be
reached, a cached answer keeps serving until its TTL; after that the request
gets a 503, never a 401: an outage must not look like a revoked sign-in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import KW_ONLY, dataclass, field

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from tvgate.db import DatabaseRunner, DatabaseUnavailable
from tvgate.identity import VIA_VISDOM, AuthError, IdentityUnavailable, Principal
from tvgate.identity.provision import Membership, OutsideIdentity, provision

TOKEN_PREFIX = "tvs_"  # noqa: S105 - a prefix, not a secret


@dataclass(slots=True)
class _Cached:
    identity: OutsideIdentity | None
    reason: str
    expires: float
    #: When Visdom Trace gave this answer (epoch seconds).
    seen_at: float = 0.0


class VisdomClient:
    """The three calls tvgate makes to Visdom Trace."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = AsyncHTTPClient(force_instance=True)

    async def _call(self, method: str, path: str, token: str | None, body: bytes | None) -> bytes:
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
            if exc.code in (400, 401, 403, 404):
                raise AuthError("Visdom Trace did not accept the credential") from None
            raise IdentityUnavailable(f"Visdom Trace answered {exc.code}") from None
        except OSError as exc:
            raise IdentityUnavailable(f"Visdom Trace unreachable: {type(exc).__name__}") from None
        return response.body

    async def identity(self, token: str) -> OutsideIdentity:
        me = orjson.loads(await self._call("GET", "/api/v1/auth/me", token, None))
        orgs = orjson.loads(await self._call("GET", "/api/v1/me/orgs", token, None))
        try:
            return OutsideIdentity(
                user_external_id=str(me["user_id"]),
                email=str(me["email"]),
                name=str(me.get("name") or ""),
                memberships=tuple(
                    Membership(
                        org_name=str(o["org_name"]),
                        org_external_id=str(o["org_id"]),
                        display_name=str(o.get("display_name") or ""),
                        role=str(o.get("role") or ""),
                    )
                    for o in orgs
                ),
            )
        except (KeyError, TypeError, AttributeError):
            raise IdentityUnavailable("Visdom Trace sent an answer tvgate cannot read") from None

    async def login(self, email: str, password: str) -> str:
        """Visdom Trace's sign-in: a session token for email and password (never stored)."""
        body = orjson.dumps({"email": email, "password": password})
        answer = orjson.loads(await self._call("POST", "/api/v1/auth/login", None, body))
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
    _identities: dict[str, _Cached] = field(default_factory=dict, init=False, repr=False)
    #: (token hash, requested org) -> principal, until the identity's expiry.
    _principals: dict[tuple[str, str], tuple[Principal, float]] = field(
        default_factory=dict, init=False, repr=False
    )

    async def _identity(self, token: str, token_hash: str) -> _Cached:
        now = time.monotonic()
        cached = self._identities.get(token_hash)
        if cached is None or cached.expires <= now:
            seen_at = time.time()
            try:
                identity = await self.client.identity(token)
                cached = _Cached(identity, "", time.monotonic() + self.ttl, seen_at)
            except AuthError as exc:
                cached = _Cached(None, str(exc), time.monotonic() + self.negative_ttl, seen_at)
            if len(self._identities) > 100_000:
                self._identities.clear()
                self._principals.clear()
            self._identities[token_hash] = cached
        if cached.identity is None:
            raise AuthError(cached.reason)
        return cached

    async def identity(self, token: str) -> tuple[OutsideIdentity, float]:
        """Who a session is and when Visdom Trace said so (epoch seconds), through the cache:
        what a token or web session made from this session is re-checked with."""
        cached = await self._identity(token, hashlib.sha256(token.encode()).hexdigest())
        assert cached.identity is not None
        return cached.identity, cached.seen_at

    async def authenticate(self, token: str, requested_org: str | None) -> Principal:
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        cached = await self._identity(token, token_hash)
        identity = cached.identity
        assert identity is not None
        key = (token_hash, requested_org or "")
        known = self._principals.get(key)
        if known is not None and known[1] > time.monotonic():
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
        principal = dataclasses.replace(provisioned, via=VIA_VISDOM)
        self._principals[key] = (principal, cached.expires)
        return principal

    def forget_all(self) -> None:
        self._identities.clear()
        self._principals.clear()
