"""Concurrency caps: slots of a resource (the gateway, a provider key) shared by every process.

A slot won from the shared table (``CounterStore.acquire_slot``) stays with the process
while its calls reuse it; the slots nobody here needed since the last sync go back at the
next one (``Governor.sync`` writes them in the same transaction as the counts). When the
database cannot be reached, a cap holds per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from tvgate.db import DatabaseRunner, DatabaseUnavailable
from tvgate.governance.plan import Refused
from tvgate.governance.store import CounterStore

log = logging.getLogger("tvgate.governance")

#: The resource name of the gateway-wide concurrency cap.
GATEWAY_RESOURCE = "gateway"


def key_resource(key_id: int) -> str:
    return f"key:{key_id}"


def _resource_name(resource: str) -> str:
    return "the gateway" if resource == GATEWAY_RESOURCE else "this route's provider key"


class Slots:
    """The slots this process holds, the ones its calls have taken, and the calls waiting."""

    def __init__(self, runner: DatabaseRunner, store: CounterStore) -> None:
        self.runner = runner
        self.store = store
        self.held: dict[str, int] = {}
        self.busy: dict[str, int] = {}
        #: The most slots busy at once since the last sync: what the process keeps.
        self.peak: dict[str, int] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, resource: str, cap: int, queue_timeout: float, poll: float) -> None:
        """Take a slot of ``resource`` (at most ``cap`` across every process), waiting up to
        ``queue_timeout`` for one to free (looking again every ``poll`` seconds); raise
        ``Refused`` after that."""
        deadline = time.monotonic() + queue_timeout
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
                await asyncio.wait_for(waiter, timeout=min(left, poll))
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
        async with self._lock:
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

    @contextlib.asynccontextmanager
    async def syncing(self) -> AsyncIterator[dict[str, int]]:
        """The slots to keep (and heartbeat) in the sync written inside this block; no slot
        is won meanwhile."""
        async with self._lock:
            # Slots nobody here needed since the last sync go back; the rest are kept (a
            # steady load does not win them again every second) and heartbeated. Lowered
            # here, before the write, so no call takes a slot that is being given back.
            slots = {
                resource: max(self.busy.get(resource, 0), self.peak.get(resource, 0))
                for resource in self.held
            }
            self.peak = {r: n for r, n in self.busy.items() if n}
            self.held = {resource: n for resource, n in slots.items() if n}
            yield slots

    def wake(self) -> None:
        """After a sync: a slot may have come free in another process."""
        for queue in self._waiters.values():
            if queue and not queue[0].done():
                queue[0].set_result(None)
