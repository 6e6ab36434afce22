"""Tokens and web sessions made from a Visdom Trace sign-in: sealing where they came from, and
asking Visdom Trace again whether that still holds.

A ``tvg_`` token minted, or a web session opened, by someone who signed in
through Visdom Trace keeps that Visdom Trace session, encrypted by the
keyring with the row's kind, org, id and user as the context: a ciphertext
copied onto another row (or a provider key's onto this one) does not open.
The plaintext is never stored, logged or shown; it exists only in the pool
thread that opens it and in the request to Visdom Trace.

When such a row is used and Visdom Trace last vouched for it
``visdom_cache_ttl`` seconds ago or more, the session is asked about again
through the same cached client (``/auth/me`` and ``/me/orgs``). The row ends
(a token is revoked, a session deleted, both audited) when Visdom Trace no
longer accepts the session, when the person is no longer in the row's org,
or when they minted a token for someone else and are no longer an admin
there; a token they minted for themselves acts with their current role.

Outages: while Visdom Trace cannot be reached, a row whose last confirmation
is older than the TTL is refused with a 503, as a ``tvs_`` token is: no
grace beyond ``visdom_cache_ttl``, so an outage is never a silent allow, and
never a revocation either (the row works again once Visdom Trace answers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tvgate import services
from tvgate.db import DatabaseRunner
from tvgate.identity import AuthError, SealedOrigin
from tvgate.identity.visdom import VisdomAuthenticator
from tvgate.keyring import Keyring


@dataclass(eq=False)
class OriginChecker:
    """Re-checks sealed origins with Visdom Trace once their last confirmation is a TTL old."""

    visdom: VisdomAuthenticator | None
    runner: DatabaseRunner
    keyring: Keyring
    ttl: float

    def due(self, origin: SealedOrigin | None) -> bool:
        """True when Visdom Trace must be asked before the row may be used."""
        return origin is not None and origin.checked_at <= time.time() - self.ttl

    def fresh_until(self, origin: SealedOrigin | None) -> float | None:
        """Until when (epoch seconds) the last confirmation holds; None: not a Visdom row."""
        return None if origin is None else origin.checked_at + self.ttl

    async def confirm(self, origin: SealedOrigin) -> None:
        """Ask Visdom Trace about the session behind ``origin``. AuthError when it no longer
        holds (the row is then ended) or cannot be read or checked here; IdentityUnavailable
        when Visdom Trace or the keyring cannot be reached."""
        if self.visdom is None:
            # Another gateway on this database minted it; this one cannot check it.
            raise AuthError("made from a Visdom Trace sign-in this gateway cannot check")
        keyring = self.keyring
        visdom_session = await self.runner.run(lambda: services.open_origin(origin, keyring))
        try:
            identity, seen_at = await self.visdom.identity(visdom_session)
        except AuthError:
            reason = "the Visdom Trace sign-in it came from has ended"
            await self.runner.run(lambda: services.end_origin(origin, reason))
            raise AuthError(reason) from None
        reason = await self.runner.run(lambda: services.settle_origin(origin, identity, seen_at))
        if reason:
            raise AuthError(reason)
