"""Web UI sessions and sign-in throttling.

A session is a random id in a signed, HttpOnly, SameSite cookie; the database
keeps only the id's SHA-256, the user, and when it was made and last used. A
session ends after ``session_idle_timeout`` unused or ``session_max_age`` in
all, at sign-out, or when its user is disabled. Failed sign-ins are counted
per (client address, email) in the database; past ``login_attempts`` in 15
minutes the form answers 429 for that pair until the window moves on.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from tvgate.identity import Principal
from tvgate.models import LoginFailure, Org, User, WebSession, database

#: Touch ``last_seen_at`` at most this often (seconds): a page view is not a write.
_TOUCH_EVERY = 60.0


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start_session(user_id: int, address: str) -> str:
    """A new session for a user; returns the id for the cookie (runs in the pool)."""
    session_id = secrets.token_urlsafe(32)
    WebSession.create(session_hash=_digest(session_id), user=user_id, address=address[:64])
    return session_id


def session_principal(session_id: str, idle_timeout: float, max_age: float) -> Principal | None:
    """The principal of a live session, or None (expired sessions are deleted)."""
    row = (
        WebSession.select(WebSession, User, Org)
        .join(User)
        .join(Org)
        .where(WebSession.session_hash == _digest(session_id))
        .first()
    )
    if row is None:
        return None
    now = time.time()
    if now - row.last_seen_at > idle_timeout or now - row.created_at > max_age or row.user.disabled:
        row.delete_instance()
        return None
    if now - row.last_seen_at > _TOUCH_EVERY:
        WebSession.update(last_seen_at=now).where(WebSession.id == row.id).execute()
    user = row.user
    return Principal(
        user_id=user.id,
        org_id=user.org.id,
        org_name=user.org.name,
        email=user.email,
        role=user.role,
    )


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
