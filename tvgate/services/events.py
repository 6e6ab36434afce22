"""Changes announced: a service that committed a change to an org says so, to this process
and to every other one.

In this process the listeners (the Gateway, which drops what it cached of the org) hear at
once, on the caller's thread. Every other process (another worker, another host, a gateway
after a CLI command) learns it from the org's row of ``org_change``: each change bumps its
counters after commit, and every gateway polls them (``Gateway._poll_changes``), so a change
made anywhere is in force within the poll interval instead of the cache TTL. Services do not
know who listens, like mitmproxy's hooks and addons.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import peewee

from tvgate.models import OrgChange

log = logging.getLogger("tvgate.services")


@dataclass(frozen=True, slots=True)
class OrgChanged:
    """One committed change to an org's routes, keys, policy, rules or users."""

    org_id: int
    #: A provider key whose secret, state or existence changed: its plaintext is stale.
    key_id: int | None = None
    #: A user's role or state, or a token, changed: cached identities are stale.
    identities: bool = False


OrgListener = Callable[[OrgChanged], None]
_listeners: list[OrgListener] = []


def on_org_change(listener: OrgListener) -> Callable[[], None]:
    """Register ``listener``; returns the function that unregisters it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def announce(org_id: int, *, key_id: int | None = None, identities: bool = False) -> None:
    """Tell every process that ``org_id`` changed. Call after the change is committed: a
    process that reads the new count must find the change in the database."""
    bump = {OrgChange.serial: OrgChange.serial + 1}
    if identities:
        bump[OrgChange.identities] = OrgChange.identities + 1
    try:
        OrgChange.insert(org_id=org_id, serial=1, identities=int(identities)).on_conflict(
            conflict_target=[OrgChange.org_id], update=bump
        ).execute()
    except peewee.DatabaseError as exc:
        # The change itself is committed: other processes see it at their cache TTL.
        log.warning("change of org %d not announced to other processes: %s", org_id, exc)
    change = OrgChanged(org_id, key_id, identities)
    for listener in list(_listeners):
        try:
            listener(change)
        except Exception:  # a listener's failure must not undo a committed change
            log.exception("org change listener failed")


def change_counts() -> dict[int, tuple[int, int]]:
    """Every org's (changes, identity changes) so far: one read of a row per org."""
    query = OrgChange.select(OrgChange.org_id, OrgChange.serial, OrgChange.identities)
    # Tuples, not model instances: this runs twice a second in every process.
    rows = cast(Iterable[tuple[int, int, int]], query.tuples())
    return {org_id: (serial, identities) for org_id, serial, identities in rows}
