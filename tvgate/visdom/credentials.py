"""Users' own Visdom Trace credentials, which their sessions are pushed with (issue 18).

When a call's identity came from a Visdom Trace user token (a ``tvs_`` session, or a
single-tenant server's Keycloak access token tvgate checked), the pusher sends that
user's events with it instead of the org ingest key, as Visdom Trace's own hooks would.

:class:`CredentialKeeper` (IOLoop) remembers, by the token's hash, what it last kept for
each (org, user); only a token it has not kept (at most one a minute per user; or once
an hour, to see that the row is still there and to move a ``tvs_`` token's expiry)
makes it run :func:`keep` in the database pool: the token sealed by the keyring (kind ``SEALED_VISDOM_USER``, bound to
the org and the user; a Vault keyring's transit path as provider keys), never stored in
plaintext, with its expiry: a JWT's ``exp``; for a ``tvs_`` token the 30-day sliding
expiry Visdom Trace gives it, counted from the last time Visdom Trace accepted it (a
sign-in check or a push with it). Only for orgs connected to Visdom Trace's ingestion;
disconnecting drops them.

:func:`held` gives the pusher the unexpired credentials of some users and deletes the
expired ones; :func:`refused` empties a credential Visdom Trace answered 401 or 403 to,
keeping its fingerprint (a hash) so that the same token is not kept again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tvgate.db import DatabaseRunner
from tvgate.identity import Principal
from tvgate.keyring import SEALED_VISDOM_USER, KeyContext, Keyring
from tvgate.models import VisdomCredential, VisdomSink

log = logging.getLogger("tvgate.visdom")

KIND_SESSION = "tvs"
KIND_JWT = "jwt"
#: Visdom Trace's sliding expiry of a ``tvs_`` session.
SESSION_LIFETIME = 30 * 86400.0
#: Seconds before a credential kept is looked at again (its row, its expiry); a ``tvs_``
#: token's expiry stored is at most this much earlier than Visdom Trace's.
RECHECK = 3600.0
#: Seconds before a call of an org not connected to Visdom Trace's ingestion is looked at again.
RECHECK_UNCONNECTED = 60.0
#: Seconds a credential kept is not replaced by another token of the same user: one who
#: calls from two machines (two sessions) has one sealed a minute at most, not per call.
REPLACE_AFTER = 60.0
#: What :func:`keep` did.
SEALED, EXTENDED, UNCHANGED, REFUSED, NOT_CONNECTED = (
    "sealed",
    "extended",
    "unchanged",
    "refused",
    "not connected",
)


def user_context(org_id: int, user_id: int) -> KeyContext:
    """What a user's credential ciphertext is bound to: their org and themselves."""
    return KeyContext(org_id, user_id, user_id, SEALED_VISDOM_USER)


def token_fingerprint(token: str) -> str:
    """What is stored to recognise a token (a hash of it, never the token)."""
    return hashlib.sha256(b"tvgate-visdom-credential:" + token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Sighting:
    """A call's Visdom Trace credential: whose, which kind, good until when."""

    org_id: int
    user_id: int
    kind: str
    expires_at: float


def keep(sighting: Sighting, token: str, keyring: Keyring, now: float) -> str:
    """Store the user's credential unless it is the one kept (then move its expiry when it
    moved); what was done. Runs in the database pool (a Vault keyring asks Vault)."""
    org_id, user_id = sighting.org_id, sighting.user_id
    if not VisdomSink.select().where(VisdomSink.org_id == org_id).exists():
        return NOT_CONNECTED
    if sighting.expires_at <= now:
        return UNCHANGED
    fingerprint = token_fingerprint(token)
    row = VisdomCredential.get_or_none(
        (VisdomCredential.org_id == org_id) & (VisdomCredential.user_id == user_id)
    )
    if row is not None and row.fingerprint == fingerprint:
        if not row.ciphertext:
            return REFUSED
        if sighting.expires_at <= row.expires_at:
            return UNCHANGED
        VisdomCredential.update(expires_at=sighting.expires_at).where(
            VisdomCredential.id == row.id
        ).execute()
        return EXTENDED
    values = {
        "kind": sighting.kind,
        "ciphertext": keyring.encrypt(token, user_context(org_id, user_id)),
        "fingerprint": fingerprint,
        "expires_at": sighting.expires_at,
        "stored_at": now,
    }
    VisdomCredential.insert(org_id=org_id, user_id=user_id, **values).on_conflict(
        conflict_target=[VisdomCredential.org_id, VisdomCredential.user_id], update=values
    ).execute()
    return SEALED


def held(org_id: int, user_ids: Iterable[int], now: float) -> dict[int, VisdomCredential]:
    """The unexpired credentials of these users, by user id; the org's expired ones deleted."""
    VisdomCredential.delete().where(
        (VisdomCredential.org_id == org_id) & (VisdomCredential.expires_at <= now)
    ).execute()
    wanted = list(set(user_ids))
    if not wanted:
        return {}
    rows = VisdomCredential.select().where(
        (VisdomCredential.org_id == org_id)
        & VisdomCredential.user_id.in_(wanted)
        & (VisdomCredential.ciphertext != "")
    )
    return {row.user_id: row for row in rows}


def refused(org_id: int, user_id: int, ciphertext: str) -> None:
    """Visdom Trace refused this credential: drop it (not a newer one kept meanwhile)."""
    VisdomCredential.update(ciphertext="").where(
        (VisdomCredential.org_id == org_id)
        & (VisdomCredential.user_id == user_id)
        & (VisdomCredential.ciphertext == ciphertext)
    ).execute()


def accepted(org_id: int, user_ids: Iterable[int], now: float) -> None:
    """Visdom Trace took events with these users' ``tvs_`` sessions: a use that slides
    their expiry (in the caller's transaction)."""
    wanted = list(set(user_ids))
    if wanted:
        VisdomCredential.update(expires_at=now + SESSION_LIFETIME).where(
            (VisdomCredential.org_id == org_id)
            & VisdomCredential.user_id.in_(wanted)
            & (VisdomCredential.kind == KIND_SESSION)
            & (VisdomCredential.ciphertext != "")
        ).execute()


def held_count(org_id: int, now: float) -> int:
    return int(
        VisdomCredential.select()
        .where(
            (VisdomCredential.org_id == org_id)
            & (VisdomCredential.ciphertext != "")
            & (VisdomCredential.expires_at > now)
        )
        .count()
    )


def drop_org(org_id: int) -> None:
    """The org no longer pushes: its users' credentials go (in the caller's transaction)."""
    VisdomCredential.delete().where(VisdomCredential.org_id == org_id).execute()


@dataclass(slots=True)
class _Kept:
    token_hash: str
    recheck_at: float
    #: Monotonic time it was kept.
    kept_at: float


class CredentialKeeper:
    """Keeps the Visdom Trace credentials calls come with (see the module), off the IOLoop."""

    #: Entries remembered before the memory is cleared (each is a hash and a float).
    MAX_ENTRIES = 100_000

    def __init__(self, runner: DatabaseRunner, keyring: Keyring) -> None:
        self.runner = runner
        self.keyring = keyring
        self._kept: dict[tuple[int, int], _Kept] = {}
        self._busy: set[tuple[int, int]] = set()
        self._tasks: set[asyncio.Future[None]] = set()

    def note(
        self, principal: Principal, token: str, token_hash: str, kind: str, expires_at: float
    ) -> None:
        """A call of ``principal`` came with ``token`` (``token_hash``: its SHA-256, which
        the authenticator has made already). Returns at once; storing runs in the pool."""
        key = (principal.org_id, principal.user_id)
        kept = self._kept.get(key)
        now = time.monotonic()
        if kept is not None:
            same = kept.token_hash == token_hash
            if now < (kept.recheck_at if same else kept.kept_at + REPLACE_AFTER):
                return
        if key in self._busy:
            return
        self._busy.add(key)
        sighting = Sighting(principal.org_id, principal.user_id, kind, expires_at)
        task = asyncio.ensure_future(self._keep(key, sighting, token, token_hash))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(
        self, key: tuple[int, int], sighting: Sighting, token: str, token_hash: str
    ) -> None:
        try:
            done = await self.runner.run(lambda: keep(sighting, token, self.keyring, time.time()))
        except Exception as exc:  # noqa: BLE001 - tried again on the user's next call
            log.warning(
                "could not keep the Visdom Trace credential of user %d: %s",
                sighting.user_id,
                type(exc).__name__,
            )
            return
        finally:
            self._busy.discard(key)
        wait = RECHECK_UNCONNECTED if done == NOT_CONNECTED else RECHECK
        if len(self._kept) >= self.MAX_ENTRIES:
            self._kept.clear()
        now = time.monotonic()
        self._kept[key] = _Kept(token_hash, now + wait, now)
        if done == SEALED:
            log.info("kept the Visdom Trace credential of user %d for pushing", sighting.user_id)
