"""Web UI sessions and sign-in throttling.

A session is a random id in a signed, HttpOnly, SameSite cookie; the database
keeps only the id's SHA-256, the user, and when it was made and last used. A
session ends after ``session_idle_timeout`` unused or ``session_max_age`` in
all, at sign-out, or when its user is disabled. It also ends with what it was
opened with (issue 16.4): at once when a pasted ``tvg_`` token is revoked or
expires, at a pasted JWT's ``exp``, and when the Visdom Trace session of a
Visdom Trace sign-in no longer vouches for it (``tvgate.identity.origin``).
Failed sign-ins are counted per (client address, email) in the database; past
``login_attempts`` in 15 minutes the form answers 429 for that pair until the
window moves on. Password spraying (one address, a few guesses at each of many
emails) is capped per address across emails, in memory (``AddressThrottle``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict

from tvgate import services
from tvgate.identity import Principal, SealedOrigin
from tvgate.keyring import SEALED_SESSION_FLASH, SEALED_SESSION_ORIGIN, KeyContext, Keyring
from tvgate.models import LoginFailure, Org, ProxyToken, User, WebSession, database

log = logging.getLogger("tvgate.identity")

#: Touch ``last_seen_at`` at most this often (seconds): a page view is not a write.
_TOUCH_EVERY = 60.0


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start_session(
    principal: Principal,
    address: str,
    keyring: Keyring | None = None,
    visdom_session: str | None = None,
) -> str:
    """A new session for a principal; returns the id for the cookie (runs in the pool).

    It keeps how the person signed in: the pasted ``tvg_`` token it then lives no longer
    than, a JWT's ``exp``, or the Visdom Trace session (sealed by ``keyring``) it is
    re-checked against.
    """
    session_id = secrets.token_urlsafe(32)
    with database.atomic():
        row = WebSession.create(
            session_hash=_digest(session_id),
            user=principal.user_id,
            address=address[:64],
            via=principal.via,
            token_id=principal.token_id,
            expires_at=principal.expires_at,
        )
        if visdom_session:
            if keyring is None:
                raise ValueError("a keyring is needed to keep a Visdom Trace sign-in")
            row.visdom_session = services.seal_origin(
                visdom_session,
                keyring,
                SEALED_SESSION_ORIGIN,
                principal.org_id,
                row.id,
                principal.user_id,
            )
            row.visdom_checked_at = 0.0  # the first page asks Visdom Trace (its cache)
            row.save()
    return session_id


def session_principal(
    session_id: str, idle_timeout: float, max_age: float
) -> tuple[Principal | None, SealedOrigin | None]:
    """The principal of a live session and the Visdom Trace origin it is held to, or
    (None, None); ended sessions are deleted (runs in the pool)."""
    row = (
        WebSession.select(WebSession, User, Org)
        .join(User)
        .join(Org)
        .where(WebSession.session_hash == _digest(session_id))
        .first()
    )
    if row is None:
        return None, None
    now = time.time()
    token = ProxyToken.get_or_none(ProxyToken.id == row.token_id) if row.token_id else None
    if (
        now - row.last_seen_at > idle_timeout
        or now - row.created_at > max_age
        or row.user.disabled
        or (row.expires_at is not None and row.expires_at <= now)
        or (row.token_id is not None and not _token_alive(token, now))
    ):
        row.delete_instance()
        return None, None
    if now - row.last_seen_at > _TOUCH_EVERY:
        WebSession.update(last_seen_at=now).where(WebSession.id == row.id).execute()
    user = row.user
    principal = Principal.of(
        user,
        via=row.via,
        token_id=row.token_id,
        session_id=row.id,
        expires_at=row.expires_at,
    )
    origin = services.session_origin(row, user.org.id)
    if origin is None and token is not None:
        # Opened with a token minted under a Visdom Trace sign-in: held to that sign-in.
        origin = services.token_origin(token, user.org.id)
    return principal, origin


def _token_alive(token: ProxyToken | None, now: float) -> bool:
    """A session opened with a pasted token ends when the token is revoked or expires."""
    return (
        token is not None
        and token.revoked_at is None
        and (token.expires_at is None or token.expires_at > now)
    )


def _flash_context(principal: Principal) -> KeyContext:
    assert principal.session_id is not None, "a web session's principal"
    return KeyContext(
        principal.org_id, principal.session_id, principal.user_id, kind=SEALED_SESSION_FLASH
    )


def hold_once(principal: Principal, secret: str, keyring: Keyring) -> None:
    """Keep ``secret`` in the principal's web session, sealed, for the next page to show
    once (post/redirect/get without the secret in a URL or a cookie; runs in the pool)."""
    sealed = keyring.encrypt(secret, _flash_context(principal))
    WebSession.update(flash=sealed).where(WebSession.id == principal.session_id).execute()


def take_once(principal: Principal, keyring: Keyring) -> str:
    """The secret held in the principal's web session, or ""; it is gone once taken, so a
    reload or a second tab finds nothing (runs in the pool)."""
    row = WebSession.get_or_none(WebSession.id == principal.session_id)
    if row is None or not row.flash:
        return ""
    # Opened before it is cleared, so a key store that is away loses nothing; cleared only
    # while it is still this ciphertext, so of two pages at once one shows it.
    secret = keyring.decrypt(row.flash, _flash_context(principal))
    taken = (
        WebSession.update(flash=None)
        .where(WebSession.id == row.id, WebSession.flash == row.flash)
        .execute()
    )
    return secret if taken else ""


def end_session(session_id: str) -> None:
    WebSession.delete().where(WebSession.session_hash == _digest(session_id)).execute()


class LoginThrottle:
    """At most ``limit`` failed sign-ins per (client address, email) in ``window`` seconds.

    Failures are rows in the database, so every worker and every gateway sharing it
    counts the same ones. Only failures count, and a success clears its pair: someone
    signing in many times is not slowed down, and an attacker's failures lock only the
    pair they guessed from, never the same email from another address (every user
    behind one nginx would otherwise share its count). Two guesses checked at the same
    moment may both pass the check, so the limit can be passed by the attacker's
    parallelism at most. Every method runs in the database pool.
    """

    def __init__(self, limit: int, window: float = 900.0) -> None:
        self.limit = limit
        self.window = window

    @staticmethod
    def _subject(address: str, email: str) -> str:
        return hashlib.sha256(f"{address}\n{email.strip().lower()}".encode()).hexdigest()

    def locked(self, address: str, email: str) -> bool:
        """True when this pair has failed ``limit`` times within the window."""
        recent = LoginFailure.select().where(
            (LoginFailure.subject == self._subject(address, email))
            & (LoginFailure.failed_at > time.time() - self.window)
        )
        return bool(recent.count() >= self.limit)

    def failed(self, address: str, email: str) -> None:
        """Count a failure, and forget those that have left the window (anyone's)."""
        now = time.time()
        with database.atomic():
            LoginFailure.create(subject=self._subject(address, email), failed_at=now)
            LoginFailure.delete().where(LoginFailure.failed_at <= now - self.window).execute()

    def succeeded(self, address: str, email: str) -> None:
        """The pair signed in: its failures no longer count."""
        LoginFailure.delete().where(LoginFailure.subject == self._subject(address, email)).execute()


class AddressThrottle:
    """At most ``limit`` failed sign-ins from one client address in ``window`` seconds,
    whatever the emails: the cap on password spraying, which ``LoginThrottle``'s pairs
    do not see (a few guesses at each of many emails).

    Kept in memory, per process, in bounded space: a count and the start of its window
    for each of at most ``max_addresses`` addresses, the one that failed longest ago
    forgotten first (an attacker with that many addresses is past any per-address cap
    anyway). Each worker counts its own, so the cap is per worker. Successes neither count
    nor clear the count: one good account must not buy more guesses at the others. Runs
    on the IOLoop: no I/O.
    """

    def __init__(self, limit: int, window: float = 900.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        #: address -> (start of its window, failures in it); least recently failed first.
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def locked(self, address: str) -> bool:
        """True when ``address`` has failed ``limit`` times within its window."""
        entry = self._failures.get(address)
        if entry is None:
            return False
        started, count = entry
        if time.monotonic() - started >= self.window:
            del self._failures[address]
            return False
        return count >= self.limit

    def failed(self, address: str) -> None:
        """Count a failure from ``address``."""
        now = time.monotonic()
        started, count = self._failures.pop(address, (now, 0))
        if now - started >= self.window:
            started, count = now, 0
        count += 1
        self._failures[address] = (started, count)
        if count == self.limit:
            log.warning(
                "%d failed sign-ins from %s in %d minutes: its sign-ins are refused for the "
                "rest of the window",
                count,
                address,
                self.window // 60,
            )
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)


def audit_address_locked(address: str, email: str) -> None:
    """A sign-in refused by ``AddressThrottle``: recorded in the org of each user with that
    email (their admins are the ones to know), never for an email no user has, which may
    be a password typed into the wrong field."""
    users = User.select(User.org).where(User.email == email.strip().lower())
    for user in users:
        services.audit_refused_sign_in(
            user.org_id,
            email,
            email,
            "too many failed sign-ins from this client address",
            {"address": address},
        )
