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

from tvgate.db import DatabaseRunner, DatabaseUnavailable
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
    token_id: int = 0


def lookup_token(token_hash: str, at: float) -> tuple[Principal | None, str, float | None, int]:
    """The principal a token hash stands for, or why it stands for nobody (runs in the pool)."""
    row = (
        ProxyToken.select(ProxyToken, User, Org)
        .join(User)
        .join(Org)
        .where(ProxyToken.token_hash == token_hash)
        .first()
    )
    if row is None:
        return None, "unknown token", None, 0
    if row.revoked_at is not None:
        return None, "token revoked", None, row.id
    if row.expires_at is not None and row.expires_at <= at:
        return None, "token expired", None, row.id
    user = row.user
    if user.disabled:
        return None, "user disabled", None, row.id
    principal = Principal(
        user_id=user.id,
        org_id=user.org.id,
        org_name=user.org.name,
        email=user.email,
        role=user.role,
    )
    return principal, "", row.expires_at, row.id


def record_last_used(used: dict[int, float]) -> None:
    """Write when tokens were last used (runs in the pool, a batch at a time)."""
    for token_id, at in used.items():
        ProxyToken.update(last_used_at=at).where(ProxyToken.id == token_id).execute()


class ProxyTokenAuthenticator:
    def __init__(self, runner: DatabaseRunner, ttl: float) -> None:
        self.runner = runner
        self.ttl = ttl
        self._cache: dict[str, _Cached] = {}
        #: Token id -> when it was last used, written in batches by ``flush_last_used``.
        self._used: dict[int, float] = {}

    async def authenticate(self, token: str) -> Principal:
        token_hash = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(token_hash)
        if cached is None or cached.expires <= now:
            at = time.time()
            try:
                principal, reason, expires_at, token_id = await self.runner.run(
                    lambda: lookup_token(token_hash, at)
                )
            except DatabaseUnavailable:
                # Stale if error: a token that was good moments ago keeps working while the
                # database is away (revocations wait for it); an unknown token cannot.
                if cached is not None and cached.principal is not None:
                    self._used[cached.token_id] = time.time()
                    return cached.principal
                raise
            if len(self._cache) > 100_000:
                self._cache.clear()
            lifetime = self.ttl
            if expires_at is not None:
                # Never serve a token from the cache past its own expiry.
                lifetime = min(lifetime, max(0.0, expires_at - at))
            cached = _Cached(principal, reason, time.monotonic() + lifetime, token_id)
            self._cache[token_hash] = cached
        if cached.principal is None:
            raise AuthError(cached.reason)
        self._used[cached.token_id] = time.time()
        return cached.principal

    async def flush_last_used(self) -> None:
        """Record last-used times, at most once per flush, never on the request path."""
        if not self._used:
            return
        used, self._used = self._used, {}
        try:
            await self.runner.run(lambda: record_last_used(used))
        except Exception:  # noqa: BLE001 - a missed last-used time is not worth an error
            return

    async def check(self) -> None:
        """Raise when tokens cannot be looked up (the token store is the database)."""
        await self.runner.run(lambda: ProxyToken.select().limit(1).count())

    def forget_all(self) -> None:
        """Drop every cached result (a token was revoked or a user changed in this process)."""
        self._cache.clear()
