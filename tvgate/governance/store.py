"""The counters every gateway process shares, in the database (synchronous: run in the pool).

Four operations, each one short transaction:

- ``sync``: a process's batch, about once a second: add what it counted since
  the last batch (usage, and request units it reserved but did not use, as
  negative amounts), give back the budget headroom it no longer holds for
  running calls, set how many concurrency slots it holds now (its heartbeat),
  and read back the totals it watches.
- ``reserve``: take up to N request units of a per-minute limit at once, never
  past the limit; the process then spends them without asking again.
- ``reserve_budget``: take budget headroom for calls about to be admitted,
  never past the limit (settled usage plus every process's holdings), or close
  the budget for the rest of its window, to calls as large, when a call cannot
  fit and no process holds headroom that could still come back.
- ``acquire_slot``: one more concurrency slot on a capped resource, if the
  slots of every live holder leave room.

Budget headroom is held per process (``BudgetHold``), heartbeated like the
slots, so what a process that died held stops counting after the slot TTL.

PostgreSQL serialises ``reserve`` and ``reserve_budget`` with a row lock and ``acquire_slot`` with a
transaction-scoped advisory lock per resource; SQLite's write transactions
(BEGIN IMMEDIATE) are serial already.
"""

from __future__ import annotations

import math
import time
import zlib

import peewee

from tvgate.models import BudgetHold, ConcurrencySlot, UsageCounter

_EXCLUDED = peewee.EXCLUDED
#: Rows per statement when reading many counters.
_READ_CHUNK = 500
#: Amounts below this are nothing (USD amounts are sums of floats).
EPSILON = 1e-9

#: What ``reserve_budget`` answers besides the amount: headroom granted; none left, but
#: calls in progress hold some that may come back; the budget is closed for its window.
GRANTED = "granted"
WAIT = "wait"
CLOSED = "closed"


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
        unhold: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Add ``add`` (key → (amount, expires_at)), give back ``unhold`` (key → budget
        headroom no longer held; 0 heartbeats what is still held), record ``slots``
        (resource → held), and return the totals of ``read`` (a counter not yet written
        reads 0)."""
        now = time.time()
        unhold = unhold or {}
        with self.db.atomic():
            # One lock order in every process: no deadlocks.
            for key in sorted(add.keys() | unhold.keys()):
                if key in add:
                    amount, expires_at = add[key]
                    self._add(key, amount, expires_at)
                if key in unhold:
                    self._hold(key, -unhold[key], now)
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

    def reserve_budget(
        self,
        key: str,
        want: float,
        need: float,
        limit: float,
        *,
        may_close: bool,
        expires_at: float,
    ) -> tuple[float, str]:
        """Take up to ``want`` of a budget's headroom, and at least ``need``, while settled
        usage plus every process's holdings stay within ``limit``.

        When ``need`` does not fit: answer ``WAIT`` if live processes other than this one
        hold headroom or, unless ``may_close``, this process's own running calls do, since
        it may come back when they end; otherwise close the budget
        for its window at ``limit`` to calls needing ``need`` or more, so that no process
        admits such a call in it (unless the budget is raised).
        """
        now = time.time()
        with self.db.atomic():
            UsageCounter.insert(
                key=key, value=0.0, expires_at=expires_at
            ).on_conflict_ignore().execute()
            # The counter's row lock serialises every reservation of this budget.
            query = UsageCounter.select(
                UsageCounter.value, UsageCounter.closed_limit, UsageCounter.closed_need
            ).where(UsageCounter.key == key)
            if self._postgres:
                query = query.for_update()
            row = query.get()
            # The smallest need refused at this amount or above (none: nothing refused).
            closed_need = math.inf
            if row.closed_limit is not None and row.closed_need is not None:  # set together
                closed_need = row.closed_need if limit <= row.closed_limit else math.inf
            if need + EPSILON >= closed_need:
                return 0.0, CLOSED  # unless raised since it was closed: then it admits again
            mine, others = 0.0, 0.0
            for hold in BudgetHold.select().where(BudgetHold.key == key):
                if hold.holder == self.holder:
                    mine = hold.amount  # counted even if a long outage kept it from syncing
                elif hold.heartbeat_at > now - self.slot_ttl:
                    others += hold.amount
            left = limit - row.value - mine - others
            if left + EPSILON >= need:
                granted = max(need, min(want, left))
                self._hold(key, granted, now)
                return granted, GRANTED
            if others > EPSILON or not may_close:
                return 0.0, WAIT
            UsageCounter.update(closed_limit=limit, closed_need=min(need, closed_need)).where(
                UsageCounter.key == key
            ).execute()
        return 0.0, CLOSED

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
            BudgetHold.delete().where(
                BudgetHold.heartbeat_at < now - max(self.slot_ttl, 3600)
            ).execute()
        return int(removed)

    def _add(self, key: str, amount: float, expires_at: float) -> None:
        UsageCounter.insert(key=key, value=amount, expires_at=expires_at).on_conflict(
            conflict_target=[UsageCounter.key],
            update={UsageCounter.value: UsageCounter.value + _EXCLUDED.value},
        ).execute()

    def _hold(self, key: str, change: float, now: float) -> None:
        """Change what this process holds of a budget by ``change``, and heartbeat it."""
        BudgetHold.insert(key=key, holder=self.holder, amount=change, heartbeat_at=now).on_conflict(
            conflict_target=[BudgetHold.key, BudgetHold.holder],
            update={
                BudgetHold.amount: BudgetHold.amount + _EXCLUDED.amount,
                BudgetHold.heartbeat_at: now,
            },
        ).execute()

    def _set_slots(self, resource: str, slots: int, now: float) -> None:
        ConcurrencySlot.insert(
            resource=resource, holder=self.holder, slots=slots, heartbeat_at=now
        ).on_conflict(
            conflict_target=[ConcurrencySlot.resource, ConcurrencySlot.holder],
            update={ConcurrencySlot.slots: slots, ConcurrencySlot.heartbeat_at: now},
        ).execute()
