"""Budget headroom: what this process holds of each budget at the shared counter.

A call takes its estimate from headroom held here (``take``), or asks the shared counter
(``CounterStore.reserve_budget``) for more: a tenth of the budget beyond the call's
estimate, so the next calls need no round trip (``reserve``). A call that ends gives its
reservation back to this process's free headroom (``settle``); what no running call
holds goes back to the shared counter at the governor's next sync (``give_back``). A
budget found unable to fit a call, with no headroom held anywhere that could come back,
is closed for its window, to every call as large.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tvgate.db import DatabaseRunner, DatabaseUnavailable
from tvgate.governance.plan import Check, Refused, resets_at
from tvgate.governance.store import CLOSED, EPSILON, GRANTED, CounterStore

log = logging.getLogger("tvgate.governance")

#: ``_ask_headroom``'s answer when the database cannot be reached.
_UNAVAILABLE = "unavailable"


@dataclass(eq=False)
class Headroom:
    """Per budget counter: the headroom held, the part of it free, the part running calls
    reserved, and whether the budget is closed."""

    runner: DatabaseRunner
    store: CounterStore
    #: What a counter has used, as this process knows it (the shared total at the last sync
    #: plus what it counted since): a budget is judged on it when the database is down.
    used: Callable[[str], float]
    #: Called with a counter and the end of its window once headroom is held on it.
    watch: Callable[[str, float], None]
    #: Budget headroom this process holds at the shared counter; of it, what no running
    #: call has reserved (negative: calls used more than they reserved), and what the
    #: running calls reserved.
    hold: dict[str, float] = field(default_factory=dict, init=False)
    free: dict[str, float] = field(default_factory=dict, init=False)
    running: dict[str, float] = field(default_factory=dict, init=False)
    #: Budgets closed for their window: (the amount they were closed at, the smallest
    #: need refused). A call needing as much is refused with no round trip, unless the
    #: budget has been raised since.
    closed: dict[str, tuple[float, float]] = field(default_factory=dict, init=False)
    #: One round trip at a time per budget counter: calls arriving together share it.
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)
    #: Calls waiting for budget headroom held by calls in progress to come back.
    _waiters: list[asyncio.Future[None]] = field(default_factory=list, init=False)

    def take(self, check: Check, need: float, want: float) -> float | None:
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

    def _is_closed(self, check: Check, need: float) -> bool:
        closed_limit, closed_need = self.closed.get(check.name, (-math.inf, math.inf))
        return check.limit <= closed_limit and need + EPSILON >= closed_need

    async def reserve(
        self, check: Check, need: float, want: float, now: float, queue_timeout: float, poll: float
    ) -> float:
        """Reserve a call's estimate of ``check``'s budget, capped by what is left and no
        less than what it must find left, asking the shared counter and waiting for
        headroom held by calls in progress (up to ``queue_timeout``, looking again every
        ``poll`` seconds); raise ``Refused`` when it is not there."""
        name = check.name
        deadline = time.monotonic() + queue_timeout
        while True:
            if self._is_closed(check, need):
                raise Refused(
                    f"{check.text} has too little left for a call of this size; "
                    f"it resets at {resets_at(check.end)}",
                    check.end - now,
                )
            amount = self.take(check, need, want)
            if amount is not None:
                return amount
            async with self._locks.setdefault(name, asyncio.Lock()):
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
                if self.used(name) >= check.limit:
                    raise Refused(
                        f"{check.text} is used up; it resets at {resets_at(check.end)}",
                        check.end - now,
                    )
                return 0.0
            left = deadline - time.monotonic()
            if left <= 0:
                raise Refused(
                    f"the rest of {check.text} is reserved by calls in progress; try again shortly",
                    1,
                )
            await self._wait(min(left, poll))

    async def _ask_headroom(self, check: Check, need: float, want: float) -> str:
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
        self.watch(name, check.end)
        if granted:
            self.hold[name] = self.hold.get(name, 0.0) + granted
            self.free[name] = self.free.get(name, 0.0) + granted
        return answer

    async def _wait(self, timeout: float) -> None:
        """Until a call here settles or a sync has run (others give headroom back at theirs)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout=timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def wake(self) -> None:
        """Calls waiting for headroom look again: a call settled, or a sync ran."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def settle(self, reservations: list[tuple[str, float]]) -> None:
        """Calls have ended: what they reserved is free for this process's next calls, and
        goes back to the shared counter at the next sync."""
        running, free = self.running, self.free
        for name, amount in reservations:
            if name in running:  # else its window ended and was dropped meanwhile
                running[name] -= amount
                free[name] = free.get(name, 0.0) + amount
        if self._waiters:
            self.wake()

    def spent(self, name: str, amount: float) -> None:
        """A finished call used ``amount`` of budget ``name``: spent from headroom held here,
        it reaches the shared total at the sync."""
        if name in self.hold:
            self.free[name] = self.free.get(name, 0.0) - amount

    def forget(self, name: str) -> None:
        """The window of budget counter ``name`` has ended."""
        for budget_state in (self.hold, self.free, self.running):
            budget_state.pop(name, None)
        self.closed.pop(name, None)
        self._locks.pop(name, None)

    def give_back(self) -> tuple[dict[str, float], dict[str, float]]:
        """Before a sync's write: headroom beyond what running calls reserved goes back
        (including what was spent, which reaches the shared total in the same transaction),
        or 0 is written as a heartbeat of what they keep. Lowered here, before the write, so
        no call takes headroom that is being given back. Returns what to write (``unhold``)
        and the free headroom given up, for ``keep`` should the write fail."""
        unhold = {name: hold - self.running.get(name, 0.0) for name, hold in self.hold.items()}
        given_back = self.free
        self.hold = {name: amount for name, amount in self.running.items() if amount > EPSILON}
        self.free = {}
        return unhold, given_back

    def keep(self, unhold: dict[str, float], given_back: dict[str, float]) -> None:
        """The sync's write failed: what ``give_back`` lowered is still held, usable until
        the next one."""
        for name, amount in unhold.items():
            self.hold[name] = self.hold.get(name, 0.0) + amount
        for name, amount in given_back.items():
            self.free[name] = self.free.get(name, 0.0) + amount
