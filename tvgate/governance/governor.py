"""The per-process side of governance: admit or refuse a call, count what it used, sync.

What a call is judged by (its plan, demand, admission, refusal) is in ``plan``; budget
headroom in ``headroom``; the concurrency slots in ``slots``; all written to the
database in this module's sync.

The proxy never waits on the database in the steady state:

- A budget admits a call against headroom reserved from the shared counter
  (``CounterStore.reserve_budget``): the call takes its estimate (input bytes
  / 4 + its ``max_tokens``, capped by what is left) from headroom this process
  holds, asking the database for more, a tenth of the budget at a time, only
  when that runs out. A call ends by settling: its reservation comes back and
  its usage is counted. Headroom not held for running calls goes back at the
  next sync. A budget found unable to fit a call, with no headroom held
  anywhere that could come back, is closed for its window, in every process,
  to every call as large.
- Tokens per minute are checked against the shared total read at the last
  sync plus what this process counted since; usage is added locally when a
  call ends and flushed in the next batch. A counter seen for the first time
  is read once before it is trusted.
- Requests per minute are spent from units reserved in blocks from the shared
  counter (``CounterStore.reserve``); a block is asked for only when the last
  one is used up, and units left over go back at the next sync.
- Concurrency slots won from the shared table stay with the process while
  its calls reuse them; idle ones go back at the next sync.

The accuracy this buys is in docs/governance.md. When the database cannot be
reached, budgets and limits are judged on what this process knows, and caps
hold per process: tvgate keeps serving rather than fail every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time

from tvgate.db import DatabaseRunner, DatabaseUnavailable, finished_read
from tvgate.governance.headroom import Headroom
from tvgate.governance.plan import (
    ALL_SCOPES,
    ATTEMPT_SCOPES,
    NO_DEMAND,
    Admission,
    Demand,
    Plan,
    PlanKey,
    Refused,
    build_plan,
    resets_at,
)
from tvgate.governance.policy import Governance
from tvgate.governance.slots import GATEWAY_RESOURCE, Slots, key_resource
from tvgate.governance.store import EPSILON, CounterStore
from tvgate.governance.windows import COUNT_TOKENS
from tvgate.traces.pricing import PriceTable

# What the proxy imports from here, defined beside the Governor.
__all__ = [
    "ATTEMPT_SCOPES",
    "GATEWAY_RESOURCE",
    "Admission",
    "Demand",
    "Governor",
    "Refused",
    "key_resource",
]

log = logging.getLogger("tvgate.governance")

#: Distinct (user, route, key) combinations whose plans are kept; past it, all are dropped.
_PLAN_CACHE_SIZE = 10_000


class Governor:
    """One process's counters, headroom, request units and slots, synced in one batch."""

    def __init__(
        self,
        runner: DatabaseRunner,
        *,
        sync_interval: float = 1.0,
        queue_timeout: float = 10.0,
        gateway_cap: int = 0,
        prices_ttl: float = 60.0,
    ) -> None:
        self.runner = runner
        #: Seconds the price table is kept: an org admin's price counts after this long.
        self.prices_ttl = prices_ttl
        self.sync_interval = sync_interval
        self.queue_timeout = queue_timeout
        self.gateway_cap = gateway_cap
        holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # A holder silent this long has died: its slots no longer count.
        self.store = CounterStore(runner.db, holder, slot_ttl=max(10.0, 10 * sync_interval))
        self.totals: dict[str, float] = {}
        self.pending: dict[str, float] = {}
        #: Counts on their way to the database in the sync under way.
        self.flushing: dict[str, float] = {}
        #: Counters to read back at each sync, with the end of their window.
        self.watched: dict[str, float] = {}
        #: Request units reserved from the shared counter and not yet spent.
        self.units: dict[str, int] = {}
        #: Per-minute counters found at their limit; asked again after the next sync, when
        #: other processes may have given units back.
        self.exhausted: set[str] = set()
        #: Budget headroom held at the shared counters.
        self.headroom = Headroom(runner, self.store, self._used, self._watch)
        self._reserving: dict[str, asyncio.Future[int]] = {}
        self._plans: dict[PlanKey, Plan] = {}
        self._reading: dict[str, asyncio.Future[None]] = {}
        #: Concurrency caps: slots of the gateway and of provider keys.
        self.slots = Slots(runner, self.store)
        self._syncing = False
        self._prices: PriceTable | None = None
        self._prices_at = 0.0
        self.refused = 0

    # --- budgets and rate limits ---

    async def admit(
        self,
        governance: Governance,
        org_id: int,
        user_id: int,
        route: str,
        key: str,
        scopes: tuple[str, ...] = ALL_SCOPES,
        demand: Demand = NO_DEMAND,
    ) -> Admission:
        """Admit a call or raise ``Refused`` naming the budget or limit it would break.

        ``scopes`` narrows the check: a fallback attempt is checked for its own route
        and key only, the org and the user having admitted the call already. Each budget
        reserves ``demand`` (capped by what it has left) until ``settle``; the caller
        settles the admission when the call ends, whatever became of it.
        """
        now = time.time()
        cache_key = (org_id, user_id, route, key, scopes)
        plan = self._plans.get(cache_key)
        if plan is None or plan.governance is not governance or plan.expires <= now:
            plan = build_plan(governance, cache_key, now)
            for check in plan.checks:
                self._watch(check.name, check.end)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[cache_key] = plan
        admission = Admission(list(plan.charges))
        if plan.unread:
            unknown = [check.name for check in plan.checks if check.name not in self.totals]
            if unknown:
                await self._read(unknown)
            plan.unread = False
        # _used, inlined: this loop runs for every budget and limit of every call.
        totals, pending, flushing = self.totals, self.pending, self.flushing
        for check in plan.checks:
            name = check.name
            used = totals.get(name, 0.0) + pending.get(name, 0.0) + flushing.get(name, 0.0)
            if not check.reserves and used >= check.limit:
                self.refused += 1
                raise Refused(
                    f"{check.text} is used up; it resets at {resets_at(check.end)}", check.end - now
                )
            # A budget of 0 warns of nothing: its reservation below refuses every call.
            if check.warn is not None and check.limit > 0 and used >= check.limit * check.warn:
                admission.warnings.append(f"{check.text}: {used / check.limit:.0%} used")
        # A call's estimate is the same for every budget that counts the same thing: worked
        # out once per call (pricing it is the costly part), not once per budget.
        estimates: dict[str, tuple[float, float]] = {}
        try:
            for check in plan.checks:
                if check.reserves:
                    estimate = estimates.get(check.counts)
                    if estimate is None:
                        estimate = estimates[check.counts] = self._estimate(
                            check.counts, org_id, demand
                        )
                    need, want = estimate
                    amount = self.headroom.take(check, need, want)
                    if amount is None:  # no headroom held here: the slow path
                        amount = await self.headroom.reserve(
                            check, need, want, now, self.queue_timeout, self.sync_interval
                        )
                    admission.reservations.append((check.name, amount))
        except Refused:
            self.settle(admission)  # what it reserved on its other budgets goes back
            self.refused += 1
            raise
        spent: list[str] = []
        for name, limit, end, text in plan.rpm:
            if not await self._spend_unit(name, limit, end):
                for earlier in spent:  # not counted for a call that was refused
                    self.units[earlier] = self.units.get(earlier, 0) + 1
                self.settle(admission)
                self.refused += 1
                raise Refused(f"{text} is reached; it resets at {resets_at(end)}", end - now)
            spent.append(name)
        return admission

    def _estimate(self, counts: str, org_id: int, demand: Demand) -> tuple[float, float]:
        """What a call must find left in a budget counting ``counts`` (its input: it is
        spent whatever the answer), and what it reserves when there is more (its input and
        ``max_tokens``)."""
        if counts == COUNT_TOKENS:
            need = float(demand.input_tokens)
            want = float(demand.input_tokens + demand.output_tokens)
        else:
            usage = (demand.input_tokens, demand.output_tokens, 0, 0)
            need = self.cost(org_id, demand.provider, demand.model, (demand.input_tokens, 0, 0, 0))
            want = self.cost(org_id, demand.provider, demand.model, usage)
        # Something must be left, even for a call estimated at nothing (no price known).
        need = max(need, EPSILON)
        return need, max(want, need)

    def settle(self, admission: Admission) -> None:
        """A call has ended (after ``charge``, if it used anything): what it reserved is free
        for this process's next calls, and goes back to the shared counter at the next sync."""
        if admission.reservations:
            self.headroom.settle(admission.reservations)
            admission.reservations = []

    def _used(self, name: str) -> float:
        """The shared total at the last sync, plus what this process counted since."""
        return (
            self.totals.get(name, 0.0) + self.pending.get(name, 0.0) + self.flushing.get(name, 0.0)
        )

    def charge(
        self,
        admission: Admission,
        org_id: int,
        tokens: int,
        provider: str,
        model: str,
        usage: tuple[int, int, int, int],
    ) -> None:
        """Count a finished call's usage against everything it was admitted under, in
        dollars at the prices of the call's org."""
        usd: float | None = None
        pending, headroom = self.pending, self.headroom
        for charge in admission.charges:
            if charge.counts == COUNT_TOKENS:
                amount = float(tokens)
            else:
                if usd is None:
                    usd = self.cost(org_id, provider, model, usage)
                amount = usd
            if amount:
                name = charge.name
                pending[name] = pending.get(name, 0.0) + amount
                headroom.spent(name, amount)

    @property
    def prices_read(self) -> bool:
        """The price table has been read (``cost`` is 0 until then)."""
        return self._prices is not None

    def cost(
        self, org_id: int, provider: str, model: str, usage: tuple[int, int, int, int]
    ) -> float:
        """Dollars of ``usage`` at the org's prices (0 until the prices are read)."""
        if self._prices is None:
            return 0.0
        return self._prices.cost(org_id, provider, model, *usage)

    def _watch(self, name: str, end: float) -> None:
        if name not in self.watched:
            self.watched[name] = end

    async def _read(self, names: list[str]) -> None:
        """Read counters seen for the first time (once each, shared by concurrent calls)."""
        waiting = [self._reading[n] for n in names if n in self._reading]
        fresh = [n for n in names if n not in self._reading]
        if fresh:
            future = asyncio.ensure_future(self._read_now(fresh))
            for name in fresh:
                self._reading[name] = future
            waiting.append(future)
        await asyncio.gather(*waiting)

    async def _read_now(self, names: list[str]) -> None:
        try:
            totals = await self.runner.run(lambda: self.store.sync({}, {}, names))
        except DatabaseUnavailable as exc:
            log.warning("governance counters unavailable (%s); judging on local counts", exc)
            totals = dict.fromkeys(names, 0.0)
        finally:
            for name in names:
                self._reading.pop(name, None)
        for name, value in totals.items():
            self.totals.setdefault(name, value)

    async def _spend_unit(self, name: str, limit: int, end: float) -> bool:
        while True:
            if self.units.get(name, 0) > 0:
                self.units[name] -= 1
                return True
            if name in self.exhausted:
                return False  # the limit was reached: no round trip until the next sync
            reserving = self._reserving.get(name)
            if reserving is None:
                # Blocks of a tenth of the limit: one round trip per ten percent of it, and
                # little held back from other processes when the limit is nearly reached.
                block = max(1, limit // 10)
                reserving = asyncio.ensure_future(
                    self.runner.run(functools.partial(self.store.reserve, name, block, limit, end))
                )
                self._reserving[name] = reserving
                # Credited by a callback, before any waiter resumes: every call that sees the
                # reservation done also sees its units.
                reserving.add_done_callback(functools.partial(self._reserved, name, end))
            elif reserving.done():
                # Done, but its callback has not run yet: awaiting a done future does not
                # yield, so yield here, or this loop would spin on the event loop for ever.
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.shield(reserving)
            except DatabaseUnavailable as exc:
                log.warning("rate limit counter unavailable (%s); admitting", exc)
                return True

    def _reserved(self, name: str, end: float, done: asyncio.Future[int]) -> None:
        granted = finished_read(self._reserving, name, done)
        if granted is None:
            return
        self._watch(name, end)
        if granted:
            self.units[name] = self.units.get(name, 0) + granted
        else:
            self.exhausted.add(name)

    # --- concurrency caps ---

    async def acquire(self, resource: str, cap: int) -> None:
        """Take a slot of ``resource`` (at most ``cap`` across every process), waiting up to
        the queue timeout for one to free; raise ``Refused`` after that."""
        try:
            await self.slots.acquire(resource, cap, self.queue_timeout, self.sync_interval)
        except Refused:
            self.refused += 1
            raise

    def release(self, resource: str) -> None:
        self.slots.release(resource)

    # --- the batch ---

    async def sync(self) -> None:
        """Flush counts, give back unused units and idle slots, read the shared totals."""
        if self._syncing:
            return
        self._syncing = True
        try:
            await self._sync()
        finally:
            self._syncing = False

    async def close(self) -> None:
        """The last batch at a stop: flush what was counted and give back every slot."""
        while self._syncing:
            await asyncio.sleep(0.01)
        self.slots.peak = {}  # nothing is kept for later: every idle slot goes back now
        await self.sync()

    async def _sync(self) -> None:
        now = time.time()
        for name, end in list(self.watched.items()):
            if end < now:
                del self.watched[name]
                self.totals.pop(name, None)
                self.units.pop(name, None)
                self.headroom.forget(name)
        if self._prices is None or time.monotonic() - self._prices_at > self.prices_ttl:
            await self._load_prices()
        if not (self.pending or self.watched or self.slots.held):
            return
        add = {name: (amount, self.watched.get(name, now)) for name, amount in self.pending.items()}
        self.flushing, self.pending = self.pending, {}
        unhold, given_back = self.headroom.give_back()
        for name, units in self.units.items():
            if units:
                amount, _ = add.get(name, (0.0, 0.0))
                add[name] = (amount - units, self.watched.get(name, now))
        self.units = {}
        self.exhausted = set()
        read = list(self.watched)
        async with self.slots.syncing() as slots:
            try:
                totals = await self.runner.run(lambda: self.store.sync(add, slots, read, unhold))
            except DatabaseUnavailable as exc:
                log.warning("governance sync failed (%s); counts kept for the next one", exc)
                for name, amount in self.flushing.items():
                    self.pending[name] = self.pending.get(name, 0.0) + amount
                self.headroom.keep(unhold, given_back)
                return
            finally:
                self.flushing = {}
        self.totals.update(totals)
        self.headroom.wake()  # other processes may have given headroom back
        self.slots.wake()

    async def _load_prices(self) -> None:
        self._prices_at = time.monotonic()
        with contextlib.suppress(DatabaseUnavailable):
            self._prices = await self.runner.run(PriceTable.load)

    def purge(self) -> int:
        return self.store.purge()
