"""Web UI sessions and sign-in throttling.

A session is a random id in a signed, HttpOnly, SameSite cookie; the database
keeps only the id's SHA-256, the user, and when it was made and last used. A
session ends after ``session_idle_timeout`` unused or ``session_max_age`` in
all, at sign-out, or when its user is disabled. Sign-in attempts are counted
per address and per email in memory; past ``login_attempts`` in 15 minutes
the form answers 429 until the window moves on.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque

from tvgate.identity import Principal
from tvgate.models import Org, User, WebSession

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


class Throttle:
    """At most ``limit`` events per key in a sliding ``window`` of seconds."""

    def __init__(self, limit: int, window: float = 900.0) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}

    def allow(self, *keys: str) -> bool:
        """Count an attempt for every key; False if any key is over its limit."""
        now = time.monotonic()
        allowed = True
        for key in keys:
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                allowed = False
            events.append(now)
        if len(self._events) > 100_000:
            self._events = {
                k: v for k, v in self._events.items() if v and v[-1] > now - self.window
            }
        return allowed
