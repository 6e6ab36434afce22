"""tvgate proxy tokens (``tvg_…``): minting, hashing, and checking them with a short cache.

Only a token's SHA-256 is stored. A check on a cache miss runs one indexed
query in the database pool; results (positive and negative) are kept for
``cache_ttl`` seconds, so a revocation made in another process is in force
within that time, and at once in the process that made it. A token minted
under a Visdom Trace sign-in is also held to that sign-in
(``tvgate.identity.origin``): never cached past its next re-check.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvgate.db import DatabaseRunner, DatabaseUnavailable
from tvgate.identity import VIA_TOKEN, AuthError, Principal, SealedOrigin
from tvgate.keyring import SEALED_TOKEN_ORIGIN
from tvgate.models import Org, ProxyToken, User

if TYPE_CHECKING:
    from tvgate.identity.origin import OriginChecker

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


@dataclass(frozen=True, slots=True)
class TokenLookup:
    """What the database says of a token hash: its principal, or why it has none."""

    principal: Principal | None
    reason: str
    expires_at: float | None = None
    token_id: int = 0
    #: The Visdom Trace session it was minted under, sealed; None for other tokens.
    origin: SealedOrigin | None = None


def lookup_token(token_hash: str, at: float) -> TokenLookup:
    """The principal a token hash stands for, or why it stands for nobody (runs in the pool)."""
    row = (
        ProxyToken.select(ProxyToken, User, Org)
        .join(User)
        .join(Org)
        .where(ProxyToken.token_hash == token_hash)
        .first()
    )
    if row is None:
        return TokenLookup(None, "unknown token")
    if row.revoked_at is not None:
        return TokenLookup(None, "token revoked", token_id=row.id)
    if row.expires_at is not None and row.expires_at <= at:
        return TokenLookup(None, "token expired", token_id=row.id)
    user = row.user
    if user.disabled:
        return TokenLookup(None, "user disabled", token_id=row.id)
    principal = Principal.of(user, via=VIA_TOKEN, token_id=row.id)
    origin = SealedOrigin.of(SEALED_TOKEN_ORIGIN, row, user.org.id)
    return TokenLookup(principal, "", row.expires_at, row.id, origin)


def record_last_used(used: dict[int, float]) -> None:
    """Write when tokens were last used (runs in the pool, a batch at a time)."""
    for token_id, at in used.items():
        ProxyToken.update(last_used_at=at).where(ProxyToken.id == token_id).execute()


class ProxyTokenAuthenticator:
    def __init__(
        self, runner: DatabaseRunner, ttl: float, origins: OriginChecker | None = None
    ) -> None:
        self.runner = runner
        self.ttl = ttl
        #: Re-checks tokens minted under a Visdom Trace sign-in (tvgate.identity.origin).
        self.origins = origins
        self._cache: dict[str, _Cached] = {}
        #: Token id -> when it was last used, written in batches by ``flush_last_used``.
        self._used: dict[int, float] = {}

    async def authenticate(self, token: str) -> Principal:
        token_hash = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(token_hash)
        if cached is None or cached.expires <= now:
            try:
                cached = await self._lookup(token_hash)
            except DatabaseUnavailable:
                # Stale if error: a token that was good moments ago keeps working while the
                # database is away (revocations wait for it); an unknown token cannot.
                if cached is not None and cached.principal is not None:
                    self._used[cached.token_id] = time.time()
                    return cached.principal
                raise
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[token_hash] = cached
        if cached.principal is None:
            raise AuthError(cached.reason)
        self._used[cached.token_id] = time.time()
        return cached.principal

    async def _lookup(self, token_hash: str) -> _Cached:
        at = time.time()
        found = await self.runner.run(lambda: lookup_token(token_hash, at))
        origins = self.origins
        if origins is not None and found.principal is not None and origins.due(found.origin):
            assert found.origin is not None
            try:
                await origins.confirm(found.origin)
            except AuthError as exc:
                return _Cached(None, str(exc), time.monotonic() + self.ttl, found.token_id)
            # Confirmed: read it again, with the role Visdom Trace gives the person now.
            at = time.time()
            found = await self.runner.run(lambda: lookup_token(token_hash, at))
        lifetime = self.ttl
        # Never serve a token from the cache past its own expiry, nor past the time its
        # Visdom Trace origin must be asked about again.
        for end in (found.expires_at, origins.fresh_until(found.origin) if origins else None):
            if end is not None:
                lifetime = min(lifetime, max(0.0, end - at))
        return _Cached(found.principal, found.reason, time.monotonic() + lifetime, found.token_id)

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
