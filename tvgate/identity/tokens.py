"""tvgate proxy tokens (``tvg_…``): minting, hashing, and checking them with a short cache.

Only a token's SHA-256 is stored. A check on a cache miss runs one indexed
query in the database pool; results (positive and negative) are kept for
``cache_ttl`` seconds, so a revocation made in another process is in force
within that time, and at once in the process that made it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from tvgate.db import DatabaseRunner
from tvgate.identity import AuthError, Principal
from tvgate.models import Org, ProxyToken, User

TOKEN_PREFIX = "tvg_"  # noqa: S105 - a prefix, not a secret


def mint_token() -> tuple[str, str, str]:
    """A new token: (plaintext, sha256 hex, display prefix)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_token(token), token[:10]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class _Cached:
    principal: Principal | None
    reason: str
    expires: float


def lookup_token(token_hash: str, at: float) -> tuple[Principal | None, str, float | None]:
    """The principal a token hash stands for, or why it stands for nobody (runs in the pool)."""
    row = (
        ProxyToken.select(ProxyToken, User, Org)
        .join(User)
        .join(Org)
        .where(ProxyToken.token_hash == token_hash)
        .first()
    )
    if row is None:
        return None, "unknown token", None
    if row.revoked_at is not None:
        return None, "token revoked", None
    if row.expires_at is not None and row.expires_at <= at:
        return None, "token expired", None
    user = row.user
    if user.disabled:
        return None, "user disabled", None
    principal = Principal(
        user_id=user.id,
        org_id=user.org.id,
        org_name=user.org.name,
        email=user.email,
        role=user.role,
    )
    return principal, "", row.expires_at


class ProxyTokenAuthenticator:
    def __init__(self, runner: DatabaseRunner, ttl: float) -> None:
        self.runner = runner
        self.ttl = ttl
        self._cache: dict[str, _Cached] = {}

    async def authenticate(self, token: str) -> Principal:
        token_hash = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(token_hash)
        if cached is None or cached.expires <= now:
            at = time.time()
            principal, reason, expires_at = await self.runner.run(
                lambda: lookup_token(token_hash, at)
            )
            if len(self._cache) > 100_000:
                self._cache.clear()
            lifetime = self.ttl
            if expires_at is not None:
                # Never serve a token from the cache past its own expiry.
                lifetime = min(lifetime, max(0.0, expires_at - at))
            cached = _Cached(principal, reason, time.monotonic() + lifetime)
            self._cache[token_hash] = cached
        if cached.principal is None:
            raise AuthError(cached.reason)
        return cached.principal

    async def check(self) -> None:
        """Raise when tokens cannot be looked up (the token store is the database)."""
        await self.runner.run(lambda: ProxyToken.select().limit(1).count())

    def forget_all(self) -> None:
        """Drop every cached result (a token was revoked or a user changed in this process)."""
        self._cache.clear()
