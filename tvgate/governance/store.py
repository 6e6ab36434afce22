"""The counters every gateway process shares, in the database (synchronous: run in the pool).

Three operations, each one short transaction:

- ``sync``: a process's batch, about once a second: add what it counted since
  the last batch (usage, and request units it reserved but did not use, as
  negative amounts), set how many concurrency slots it holds now (its
  heartbeat), and read back the totals it watches.
- ``reserve``: take up to N request units of a per-minute limit at once, never
  past the limit; the process then spends them without asking again.
- ``acquire_slot``: one more concurrency slot on a capped resource, if the
  slots of every live holder leave room.

PostgreSQL serialises ``reserve`` with a row lock and ``acquire_slot`` with a
transaction-scoped advisory lock per resource; SQLite's write transactions
(BEGIN IMMEDIATE) are serial already.
"""

from __future__ import annotations

import math
import time
import zlib

import peewee

from tvgate.models import ConcurrencySlot, UsageCounter

_EXCLUDED = peewee.EXCLUDED
#: Rows per statement when reading many counters.
_READ_CHUNK = 500


class CounterStore:
    def __init__(self, db: peewee.Database, holder: str, slot_ttl: float) -> None:
        self.db = db
        self.holder = holder
        self.slot_ttl = slot_ttl
        self._postgres = isinstance(db, peewee.PostgresqlDatabase)

    def sync(
        self,
        add: dict[str, tuple[float, float]],
        slots: dict[str, int],
        read: list[str],
    ) -> dict[str, float]:
        """Add ``add`` (key → (amount, expires_at)), record ``slots`` (resource → held), and
        return the totals of ``read`` (a counter not yet written reads 0)."""
        now = time.time()
        with self.db.atomic():
            for key in sorted(add):  # one lock order in every process: no deadlocks
                amount, expires_at = add[key]
                self._add(key, amount, expires_at)
            for resource in sorted(slots):
                self._set_slots(resource, slots[resource], now)
            totals = dict.fromkeys(read, 0.0)
            for start in range(0, len(read), _READ_CHUNK):
                chunk = read[start : start + _READ_CHUNK]
                for row in UsageCounter.select(UsageCounter.key, UsageCounter.value).where(
                    UsageCounter.key.in_(chunk)
                ):
                    totals[row.key] = row.value
        return totals

    def reserve(self, key: str, want: int, limit: float, expires_at: float) -> int:
        """Take up to ``want`` units of ``key`` while its total stays within ``limit``."""
        with self.db.atomic():
            UsageCounter.insert(
                key=key, value=0.0, expires_at=expires_at
            ).on_conflict_ignore().execute()
            query = UsageCounter.select(UsageCounter.value).where(UsageCounter.key == key)
            if self._postgres:
                query = query.for_update()
            used = query.scalar() or 0.0
            granted = max(0, min(want, math.floor(limit - used)))
            if granted:
                UsageCounter.update(value=UsageCounter.value + granted).where(
                    UsageCounter.key == key
                ).execute()
        return granted

    def acquire_slot(self, resource: str, held: int, cap: int) -> bool:
        """Hold ``held + 1`` slots of ``resource`` if every live holder's slots stay within
        ``cap``; ``held`` is what this process holds now (it alone writes its row)."""
        now = time.time()
        with self.db.atomic():
            if self._postgres:
                self.db.execute_sql(
                    "SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(resource.encode()),)
                )
            others = (
                ConcurrencySlot.select(peewee.fn.COALESCE(peewee.fn.SUM(ConcurrencySlot.slots), 0))
                .where(
                    (ConcurrencySlot.resource == resource)
                    & (ConcurrencySlot.holder != self.holder)
                    & (ConcurrencySlot.heartbeat_at > now - self.slot_ttl)
                )
                .scalar()
            )
            if others + held + 1 > cap:
                return False
            self._set_slots(resource, held + 1, now)
        return True

    def purge(self, now: float | None = None) -> int:
        """Drop counters of windows that ended over an hour ago and slots of dead holders."""
        now = time.time() if now is None else now
        with self.db.atomic():
            removed = UsageCounter.delete().where(UsageCounter.expires_at < now - 3600).execute()
            ConcurrencySlot.delete().where(
                ConcurrencySlot.heartbeat_at < now - max(self.slot_ttl, 3600)
            ).execute()
        return int(removed)

    def _add(self, key: str, amount: float, expires_at: float) -> None:
        UsageCounter.insert(key=key, value=amount, expires_at=expires_at).on_conflict(
            conflict_target=[UsageCounter.key],
            update={UsageCounter.value: UsageCounter.value + _EXCLUDED.value},
        ).execute()

    def _set_slots(self, resource: str, slots: int, now: float) -> None:
        ConcurrencySlot.insert(
            resource=resource, holder=self.holder, slots=slots, heartbeat_at=now
        ).on_conflict(
            conflict_target=[ConcurrencySlot.resource, ConcurrencySlot.holder],
            update={ConcurrencySlot.slots: slots, ConcurrencySlot.heartbeat_at: now},
        ).execute()
