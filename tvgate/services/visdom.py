"""An org's Visdom Trace ingestion: connect (URL, project, legacy slug, org ingest key),
status (delivery, parked events) and disconnect; admins of the org only, each audited.

The ``tvk_`` key is encrypted by the keyring (bound to the org) before it is stored
and is never returned: the status shows its last four characters. Reconnecting an org
that is connected replaces its settings and key and releases its parked events for
another try (the admin fixed what Visdom Trace refused); the cursor stays, so nothing
already sent is sent again and nothing not yet sent is skipped. Disconnecting drops the
users' own Visdom Trace credentials kept for pushing (tvgate.visdom.credentials) too.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from tvgate.identity import Principal
from tvgate.keyring import SEALED_VISDOM_INGEST, KeyContext, Keyring, fingerprint
from tvgate.models import Org, VisdomEvent, VisdomSession, VisdomSink, database
from tvgate.rows import fields_of
from tvgate.services.access import NotFound, ServiceError, _admin_org, audit
from tvgate.services.upstreams import check_base_url
from tvgate.traces import watermark
from tvgate.visdom import credentials

__all__ = [
    "VisdomStatus",
    "connect_visdom",
    "disconnect_visdom",
    "ingest_context",
    "tenant_org_of",
    "visdom_status",
]

_KEY = re.compile(r"tvk_[A-Za-z0-9_-]{16,200}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
#: Parked events listed in a status (the count says how many there are in all).
PARKED_SHOWN = 20


def ingest_context(org_id: int) -> KeyContext:
    """What an org's ingest key ciphertext is bound to."""
    return KeyContext(org_id, org_id, None, SEALED_VISDOM_INGEST)


def tenant_org_of(url: str) -> str:
    """The tvgate org a single-tenant Visdom Trace server's people act in when no org is
    pinned: the one org whose ingestion is connected to ``url``; "" for none or several
    (which of them would be a guess)."""
    names = [
        org.name
        for org in Org.select(Org.name)
        .join(VisdomSink, on=VisdomSink.org_id == Org.id)
        .where(VisdomSink.url == url.rstrip("/"))
        .limit(2)
    ]
    return names[0] if len(names) == 1 else ""


@dataclass(frozen=True, slots=True)
class VisdomStatus:
    """What may be shown of an org's ingestion. There is no field for the key."""

    org: str
    connected: bool
    url: str = ""
    project: str = ""
    legacy_slug: str = ""
    key: str = ""
    connected_at: float | None = None
    sent: int = 0
    #: Of ``sent``: with the user's own Visdom Trace credential, with the org ingest key.
    sent_with_user_credential: int = 0
    sent_with_org_key: int = 0
    #: Users whose own credential is held now (unexpired): counts, never a token.
    user_credentials: int = 0
    last_sent_at: float | None = None
    last_error: str = ""
    pending: int = 0
    open_sessions: int = 0
    parked_count: int = 0
    parked: list[dict[str, Any]] = field(default_factory=list)
    #: The live trace writers' watermarks, the one the outbox waits for first (calls that
    #: ended after it are not read yet): {"writer", "upto", "updated_at"}.
    waiting_for: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return fields_of(self)


def _checked_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise ServiceError(f"{what} must be letters, digits and . _ : - (at most 200)")
    return value


def connect_visdom(
    url: str,
    key: str,
    keyring: Keyring,
    *,
    org_name: str | None = None,
    project: str = "",
    legacy_slug: str = "",
    allow_private: bool = False,
    actor: Principal | None = None,
) -> VisdomStatus:
    """Push the org's traces to Visdom Trace at ``url`` with the org ingest key ``key``."""
    org = _admin_org(actor, org_name, "connect visdom", url[:200])
    checked = check_base_url(url.strip(), allow_private=allow_private)
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise ServiceError("the ingest key must be a Visdom Trace org key (tvk_…)")
    if project:
        _checked_id(project, "project")
    if legacy_slug:
        _checked_id(legacy_slug, "legacy org slug")
    ciphertext = keyring.encrypt(key, ingest_context(org.id))
    now = time.time()
    values = {
        "url": checked,
        "project": project,
        "legacy_slug": legacy_slug,
        "ciphertext": ciphertext,
        "fingerprint": fingerprint(key),
        "last_error": "",
    }
    with database.atomic():
        existing = VisdomSink.get_or_none(VisdomSink.org_id == org.id)
        if existing is None:
            # From now on: the org's earlier traces are not sent (a connect is not a backfill).
            VisdomSink.create(org_id=org.id, connected_at=now, cursor_at=now, **values)
        else:
            VisdomSink.update(**values).where(VisdomSink.org_id == org.id).execute()
        released = (
            VisdomEvent.update(parked=False, error="")
            .where((VisdomEvent.org_id == org.id) & VisdomEvent.parked)
            .execute()
        )
        audit(
            actor,
            org.id,
            "connect visdom",
            checked,
            {"project": project, "legacy_slug": legacy_slug, "released_parked": released},
        )
    return visdom_status(org_name=org.name, actor=actor)


def visdom_status(*, org_name: str | None = None, actor: Principal | None = None) -> VisdomStatus:
    org = _admin_org(actor, org_name, "read visdom", "")
    sink = VisdomSink.get_or_none(VisdomSink.org_id == org.id)
    if sink is None:
        return VisdomStatus(org=org.name, connected=False)
    events = VisdomEvent.select().where(VisdomEvent.org_id == org.id)
    parked = events.where(VisdomEvent.parked)
    shown = [
        {
            "id": e.id,
            "session_id": e.session_id,
            "event_type": e.event_type,
            "error": e.error,
            "attempts": e.attempts,
            "created_at": e.created_at,
        }
        for e in parked.order_by(VisdomEvent.id).limit(PARKED_SHOWN)
    ]
    return VisdomStatus(
        org=org.name,
        connected=True,
        url=sink.url,
        project=sink.project,
        legacy_slug=sink.legacy_slug,
        key="…" + sink.fingerprint,
        connected_at=sink.connected_at,
        sent=sink.sent,
        sent_with_user_credential=sink.sent_user,
        sent_with_org_key=sink.sent_org,
        user_credentials=credentials.held_count(org.id, time.time()),
        last_sent_at=sink.last_sent_at,
        last_error=sink.last_error,
        pending=events.count(),
        open_sessions=VisdomSession.select()
        .where((VisdomSession.org_id == org.id) & VisdomSession.open)
        .count(),
        parked_count=parked.count(),
        parked=shown,
        waiting_for=[
            {
                # The deployment's hosts and pids are the operator's to see (the CLI),
                # not an org admin's: the API names the worker only.
                "writer": mark.writer if actor is None else watermark.worker_of(mark.writer),
                "upto": mark.upto,
                "updated_at": mark.updated_at,
            }
            for mark in watermark.live(time.time())
        ],
    )


def disconnect_visdom(*, org_name: str | None = None, actor: Principal | None = None) -> int:
    """Stop pushing; the number of events made and not delivered, dropped with it."""
    org = _admin_org(actor, org_name, "disconnect visdom", "")
    with database.atomic():
        if not VisdomSink.delete().where(VisdomSink.org_id == org.id).execute():
            raise NotFound(f"org {org.name} is not connected to Visdom Trace")
        dropped = VisdomEvent.delete().where(VisdomEvent.org_id == org.id).execute()
        VisdomSession.delete().where(VisdomSession.org_id == org.id).execute()
        credentials.drop_org(org.id)
        audit(actor, org.id, "disconnect visdom", "", {"undelivered_dropped": dropped})
    return int(dropped)
