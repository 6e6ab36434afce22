"""The per-process side of governance: admit or refuse a call, count what it used, cap concurrency.

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
import math
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tvgate.db import DatabaseRunner, DatabaseUnavailable
from tvgate.governance.policy import Governance
from tvgate.governance.store import CLOSED, EPSILON, GRANTED, CounterStore
from tvgate.governance.windows import (
    COUNT_TOKENS,
    budget_counter,
    minute_counters,
)
from tvgate.models import GOVERN_KEY, GOVERN_ORG, GOVERN_ROUTE, GOVERN_USER
from tvgate.traces.pricing import PriceTable

log = logging.getLogger("tvgate.governance")

#: The resource name of the gateway-wide concurrency cap.
GATEWAY_RESOURCE = "gateway"
#: Distinct (user, route, key) combinations whose plans are kept; past it, all are dropped.
_PLAN_CACHE_SIZE = 10_000


class Refused(Exception):
    """A call over a budget, a rate limit or a cap: answered 429 with ``retry_after``."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


ALL_SCOPES = (GOVERN_ORG, GOVERN_USER, GOVERN_ROUTE, GOVERN_KEY)
#: ``_ask_headroom``'s answer when the database cannot be reached.
_UNAVAILABLE = "unavailable"
#: What a fallback attempt is checked and charged for on its own.
ATTEMPT_SCOPES = (GOVERN_ROUTE, GOVERN_KEY)


@dataclass(frozen=True, slots=True)
class Demand:
    """What a call may use, estimated before it goes out: what its budgets reserve."""

    input_tokens: int
    #: Its ``max_tokens`` (or the API's equivalent); 0 when it sets none.
    output_tokens: int
    provider: str
    model: str


NO_DEMAND = Demand(0, 0, "", "")


@dataclass(frozen=True, slots=True)
class _Check:
    name: str
    limit: float
    end: float
    text: str
    #: Fraction of the limit from which answers carry a warning; None: no warning.
    warn: float | None
    #: What it counts (tokens or usd); a budget's check reserves, a per-minute one does not.
    counts: str = COUNT_TOKENS
    reserves: bool = False


@dataclass(frozen=True, slots=True)
class _Charge:
    name: str
    counts: str
    scope: str


@dataclass(slots=True)
class _Plan:
    governance: Governance
    #: The end of the first of its windows: the plan is worked out again from then on.
    expires: float
    checks: tuple[_Check, ...]
    charges: tuple[_Charge, ...]
    rpm: tuple[tuple[str, int, float, str], ...]
    #: False once every counter it checks has been read at least once.
    unread: bool = True


@dataclass(slots=True)
class Admission:
    """What one admitted call counts against, and the warnings its answer carries."""

    charges: list[_Charge] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Budget headroom the call holds until it ends (counter, amount): ``Governor.settle``.
    reservations: list[tuple[str, float]] = field(default_factory=list)

    def for_attempt(self, attempt: Admission) -> Admission:
        """This call's org and user charges with the route and key charges of ``attempt``."""
        kept = [c for c in self.charges if c.scope not in ATTEMPT_SCOPES]
        return Admission(kept + attempt.charges, self.warnings + attempt.warnings)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def key_resource(key_id: int) -> str:
    return f"key:{key_id}"


class Governor:
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
        #: Budget headroom this process holds at the shared counter; of it, what no running
        #: call has reserved (negative: calls used more than they reserved), and what the
        #: running calls reserved.
        self.hold: dict[str, float] = {}
        self.free: dict[str, float] = {}
        self.running: dict[str, float] = {}
        #: Budgets closed for their window: (the amount they were closed at, the smallest
        #: need refused). A call needing as much is refused with no round trip, unless the
        #: budget has been raised since.
        self.closed: dict[str, tuple[float, float]] = {}
        #: One round trip at a time per budget counter: calls arriving together share it.
        self._budget_locks: dict[str, asyncio.Lock] = {}
        #: Calls waiting for budget headroom held by calls in progress to come back.
        self._headroom_waiters: list[asyncio.Future[None]] = []
        self._reserving: dict[str, asyncio.Future[int]] = {}
        self._plans: dict[tuple[int, int, str, str, tuple[str, ...]], _Plan] = {}
        self._reading: dict[str, asyncio.Future[None]] = {}
        self.held: dict[str, int] = {}
        self.busy: dict[str, int] = {}
        #: The most slots busy at once since the last sync: what the process keeps.
        self.peak: dict[str, int] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._slot_lock = asyncio.Lock()
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
            plan = self._plan(governance, org_id, user_id, route, key, scopes, now)
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
                    f"{check.text} is used up; it resets at {_when(check.end)}", check.end - now
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
                    amount = self._take(check, need, want)
                    if amount is None:  # no headroom held here: the slow path
                        amount = await self._reserve(check, need, want, now)
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
                raise Refused(f"{text} is reached; it resets at {_when(end)}", end - now)
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

    def _take(self, check: _Check, need: float, want: float) -> float | None:
        """Reserve ``want`` (at least ``need``) from headroom held here; None if there is not
        enough (or the budget is closed to such a call)."""
        name = check.name
        free = self.free.get(name, 0.0)
        if free + EPSILON < need or (self.closed and self._is_closed(check, need)):
            return None
        # max(need, min(want, free)), without the two builtin calls (once per budget).
        amount = want if want <= free else free
        if amount < need:
            amount = need
        self.free[name] = free - amount
        self.running[name] = self.running.get(name, 0.0) + amount
        return amount

    def _is_closed(self, check: _Check, need: float) -> bool:
        closed_limit, closed_need = self.closed.get(check.name, (-math.inf, math.inf))
        return check.limit <= closed_limit and need + EPSILON >= closed_need

    async def _reserve(self, check: _Check, need: float, want: float, now: float) -> float:
        """Reserve a call's estimate of ``check``'s budget, capped by what is left and no
        less than what it must find left, asking the shared counter and waiting for
        headroom held by calls in progress; raise ``Refused`` when it is not there."""
        name = check.name
        deadline = time.monotonic() + self.queue_timeout
        while True:
            if self._is_closed(check, need):
                raise Refused(
                    f"{check.text} has too little left for a call of this size; "
                    f"it resets at {_when(check.end)}",
                    check.end - now,
                )
            amount = self._take(check, need, want)
            if amount is not None:
                return amount
            async with self._budget_locks.setdefault(name, asyncio.Lock()):
                if self.free.get(name, 0.0) + EPSILON >= need:
                    continue  # another call refilled it while this one waited for the lock
                answer = await self._ask_headroom(check, need, want)
            if answer == GRANTED:
                continue
            if answer == CLOSED:
                closed_limit, closed_need = self.closed.get(name, (-math.inf, math.inf))
                smallest = closed_need if check.limit <= closed_limit else math.inf
                self.closed[name] = (check.limit, min(need, smallest))
                continue
            if answer == _UNAVAILABLE:
                # Judged on this process's view, as without reservations: the gateway
                # serves on, and what the call uses is counted when it ends.
                if self._used(name) >= check.limit:
                    raise Refused(
                        f"{check.text} is used up; it resets at {_when(check.end)}",
                        check.end - now,
                    )
                return 0.0
            left = deadline - time.monotonic()
            if left <= 0:
                raise Refused(
                    f"the rest of {check.text} is reserved by calls in progress; try again shortly",
                    1,
                )
            await self._wait_for_headroom(min(left, self.sync_interval))

    async def _ask_headroom(self, check: _Check, need: float, want: float) -> str:
        """Ask the shared counter for headroom (a tenth of the budget beyond this call's
        estimate, so the next calls need no round trip); credit what it grants."""
        name = check.name
        free = self.free.get(name, 0.0)
        try:
            granted, answer = await self.runner.run(
                functools.partial(
                    self.store.reserve_budget,
                    name,
                    want - free + check.limit / 10,
                    need - free,
                    check.limit,
                    may_close=self.running.get(name, 0.0) <= EPSILON,
                    expires_at=check.end,
                )
            )
        except DatabaseUnavailable as exc:
            log.warning("budget counter unavailable (%s); judging on local counts", exc)
            return _UNAVAILABLE
        self._watch(name, check.end)
        if granted:
            self.hold[name] = self.hold.get(name, 0.0) + granted
            self.free[name] = self.free.get(name, 0.0) + granted
        return answer

    async def _wait_for_headroom(self, timeout: float) -> None:
        """Until a call here settles or a sync has run (others give headroom back at theirs)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._headroom_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout=timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in self._headroom_waiters:
                self._headroom_waiters.remove(waiter)

    def _wake_headroom_waiters(self) -> None:
        waiters, self._headroom_waiters = self._headroom_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def settle(self, admission: Admission) -> None:
        """A call has ended (after ``charge``, if it used anything): what it reserved is free
        for this process's next calls, and goes back to the shared counter at the next sync."""
        if not admission.reservations:
            return
        running, free = self.running, self.free
        for name, amount in admission.reservations:
            if name in running:  # else its window ended and was dropped meanwhile
                running[name] -= amount
                free[name] = free.get(name, 0.0) + amount
        admission.reservations = []
        if self._headroom_waiters:
            self._wake_headroom_waiters()

    def _plan(
        self,
        governance: Governance,
        org_id: int,
        user_id: int,
        route: str,
        key: str,
        scopes: tuple[str, ...],
        now: float,
    ) -> _Plan:
        """The counters a call of this user on this route and key is judged by, until the
        first of their windows ends (worked out once, not per call)."""
        checks: list[_Check] = []
        charges: list[_Charge] = []
        rpm: list[tuple[str, int, float, str]] = []
        for scope, subject in Governance.subjects(user_id, route, key):
            if scope not in scopes:
                continue
            for rule in governance.budgets.get((scope, subject), ()):
                name, counts, end = budget_counter(
                    org_id, scope, subject, rule.metric, rule.period, now
                )
                charges.append(_Charge(name, counts, scope))
                text = f"{rule.title} ({rule.amount_text(rule.amount)})"
                checks.append(
                    _Check(name, rule.amount, end, text, rule.warn_percent / 100, counts, True)
                )
            rate = governance.rates.get((scope, subject))
            if rate is None:
                continue
            requests, tokens, end = minute_counters(org_id, scope, subject, now)
            if rate.tpm:
                charges.append(_Charge(tokens, COUNT_TOKENS, scope))
                text = f"the limit of {rate.tpm:,} tokens per minute of {rate.owner}"
                checks.append(_Check(tokens, rate.tpm, end, text, None))
            if rate.rpm:
                text = f"the limit of {rate.rpm:,} requests per minute of {rate.owner}"
                rpm.append((requests, rate.rpm, end, text))
        for check in checks:
            self._watch(check.name, check.end)
        ends = [c.end for c in checks] + [r[2] for r in rpm]
        return _Plan(
            governance,
            min(ends, default=now + 60),
            tuple(checks),
            tuple(charges),
            tuple(rpm),
        )

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
        pending, hold, free = self.pending, self.hold, self.free
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
                if name in hold:
                    # Spent from headroom held here: it reaches the shared total at the sync.
                    free[name] = free.get(name, 0.0) - amount

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
        if self._reserving.get(name) is done:
            del self._reserving[name]
        if done.cancelled() or done.exception() is not None:
            return
        granted = done.result()
        self._watch(name, end)
        if granted:
            self.units[name] = self.units.get(name, 0) + granted
        else:
            self.exhausted.add(name)

    # --- concurrency caps ---

    async def acquire(self, resource: str, cap: int) -> None:
        """Take a slot of ``resource`` (at most ``cap`` across every process), waiting up to
        the queue timeout for one to free; raise ``Refused`` after that."""
        deadline = time.monotonic() + self.queue_timeout
        while True:
            busy = self.busy.get(resource, 0)
            if busy < self.held.get(resource, 0):
                self.busy[resource] = busy + 1
                if busy + 1 > self.peak.get(resource, 0):
                    self.peak[resource] = busy + 1
                return
            if await self._grow(resource, cap):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                self.refused += 1
                raise Refused(
                    f"{_resource_name(resource)} has {cap} calls open already (its cap); "
                    "try again shortly",
                    1,
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue = self._waiters.setdefault(resource, deque())
            queue.append(waiter)
            try:
                # Woken by a release here; a slot freed by another process shows at a sync.
                await asyncio.wait_for(waiter, timeout=min(left, self.sync_interval))
            except TimeoutError:
                pass
            finally:
                if waiter in queue:
                    queue.remove(waiter)

    def release(self, resource: str) -> None:
        self.busy[resource] = max(0, self.busy.get(resource, 0) - 1)
        queue = self._waiters.get(resource)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _grow(self, resource: str, cap: int) -> bool:
        async with self._slot_lock:
            held = self.held.get(resource, 0)
            if self.busy.get(resource, 0) < held:
                return True  # a slot came free while this call waited for the lock
            try:
                won = await self.runner.run(lambda: self.store.acquire_slot(resource, held, cap))
            except DatabaseUnavailable as exc:
                log.warning("concurrency slots unavailable (%s); capping this process only", exc)
                won = held < cap
            if won:
                self.held[resource] = held + 1
            return won

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
        self.peak = {}  # nothing is kept for later: every idle slot goes back now
        await self.sync()

    async def _sync(self) -> None:
        now = time.time()
        for name, end in list(self.watched.items()):
            if end < now:
                del self.watched[name]
                self.totals.pop(name, None)
                self.units.pop(name, None)
                for budget_state in (self.hold, self.free, self.running):
                    budget_state.pop(name, None)
                self.closed.pop(name, None)
                self._budget_locks.pop(name, None)
        if self._prices is None or time.monotonic() - self._prices_at > self.prices_ttl:
            await self._load_prices()
        if not (self.pending or self.watched or self.held):
            return
        add = {name: (amount, self.watched.get(name, now)) for name, amount in self.pending.items()}
        self.flushing, self.pending = self.pending, {}
        # Budget headroom beyond what running calls reserved goes back (including what was
        # spent, which reaches the shared total in this same transaction), or 0 is written
        # as a heartbeat of what they keep. Lowered here, before the write, so no call
        # takes headroom that is being given back.
        unhold = {name: hold - self.running.get(name, 0.0) for name, hold in self.hold.items()}
        given_back = self.free
        self.hold = {name: amount for name, amount in self.running.items() if amount > EPSILON}
        self.free = {}
        for name, units in self.units.items():
            if units:
                amount, _ = add.get(name, (0.0, 0.0))
                add[name] = (amount - units, self.watched.get(name, now))
        self.units = {}
        self.exhausted = set()
        read = list(self.watched)
        async with self._slot_lock:
            # Slots nobody here needed since the last sync go back; the rest are kept (a
            # steady load does not win them again every second) and heartbeated. Lowered
            # here, before the write, so no call takes a slot that is being given back.
            slots = {
                resource: max(self.busy.get(resource, 0), self.peak.get(resource, 0))
                for resource in self.held
            }
            self.peak = {r: n for r, n in self.busy.items() if n}
            self.held = {resource: n for resource, n in slots.items() if n}
            try:
                totals = await self.runner.run(lambda: self.store.sync(add, slots, read, unhold))
            except DatabaseUnavailable as exc:
                log.warning("governance sync failed (%s); counts kept for the next one", exc)
                for name, amount in self.flushing.items():
                    self.pending[name] = self.pending.get(name, 0.0) + amount
                for name, amount in unhold.items():  # still held: usable until the next one
                    self.hold[name] = self.hold.get(name, 0.0) + amount
                for name, amount in given_back.items():
                    self.free[name] = self.free.get(name, 0.0) + amount
                return
            finally:
                self.flushing = {}
        self.totals.update(totals)
        self._wake_headroom_waiters()  # other processes may have given headroom back
        for queue in self._waiters.values():
            if queue and not queue[0].done():
                queue[0].set_result(None)  # a slot may have come free elsewhere

    async def _load_prices(self) -> None:
        self._prices_at = time.monotonic()
        with contextlib.suppress(DatabaseUnavailable):
            self._prices = await self.runner.run(PriceTable.load)

    def purge(self) -> int:
        return self.store.purge()


def _resource_name(resource: str) -> str:
    return "the gateway" if resource == GATEWAY_RESOURCE else "this route's provider key"
