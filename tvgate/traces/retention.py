"""Retention: each org's traces older than its ``retention_days`` are deleted, a batch at a time,
and then the blobs no kept trace refers to.

Blobs carry ``referenced_at``, moved forward whenever a trace refers to them
(a blob deep in a request's tree may lag by an hour per level, see
``traces.store``), so a blob whose ``referenced_at`` is more than a day older
than the cutoff belongs to no kept trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tvgate.models import Blob, Org, Trace, database

_DAY = 86400.0
_BATCH = 1000


@dataclass(slots=True)
class Purged:
    traces: int = 0
    blobs: int = 0


def purge_org(org: Org, now: float | None = None, batch: int = _BATCH) -> Purged:
    """Delete one org's expired traces and unreferenced blobs, in small transactions."""
    purged = Purged()
    if org.retention_days <= 0:
        return purged
    cutoff = (now or time.time()) - org.retention_days * _DAY
    purged.traces = _delete_in_batches(
        Trace, (Trace.org_id == org.id) & (Trace.received_at < cutoff), batch
    )
    # A blob touched within a day of a kept trace may belong to it; leave a day.
    purged.blobs = _delete_in_batches(
        Blob, (Blob.org_id == org.id) & (Blob.referenced_at < cutoff - _DAY), batch
    )
    return purged


def _delete_in_batches(model: type[Trace] | type[Blob], where: Any, batch: int) -> int:
    """Delete the rows ``where`` selects, ``batch`` at a time, each batch its own
    transaction (none grows with the backlog); returns how many."""
    deleted = 0
    while True:
        with database.atomic():
            ids = [row.id for row in model.select(model.id).where(where).limit(batch)]
            if not ids:
                return deleted
            deleted += model.delete().where(model.id.in_(ids)).execute()


def purge_all(now: float | None = None) -> dict[str, Purged]:
    return {org.name: purge_org(org, now) for org in Org.select()}
