"""The per-process governor on a real database: request units, slots, and their races.

The two-process behaviour is in test_governance.py; these drive one ``Governor``
directly, on its own event loop, to reach interleavings a gateway makes rarely.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tvgate.db import DatabaseRunner, migrate, open_database
from tvgate.governance.governor import Governor, Refused
from tvgate.governance.policy import Governance, RateRule
from tvgate.models import ConcurrencySlot, UsageCounter

T = TypeVar("T")


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DatabaseRunner]:
    db = open_database(f"sqlite:///{tmp_path / 'governor.db'}")
    migrate(db)
    pool = DatabaseRunner(db, threads=4)
    yield pool
    pool.close()
    db.close()


def run_in_thread(coroutine_fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 20.0) -> T:
    """Run a coroutine on a loop of its own in a thread: a loop that spins for ever fails
    the test after ``timeout`` instead of hanging it."""
    outcome: dict[str, T] = {}

    def main() -> None:
        outcome["value"] = asyncio.run(coroutine_fn())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the event loop never came back"
    return outcome["value"]


def per_minute(rpm: int) -> Governance:
    return Governance(rates={("route", "r"): RateRule("route", "r", rpm, None, "route r")})


def test_a_call_arriving_as_a_reservation_completes_does_not_spin(
    runner: DatabaseRunner,
) -> None:
    async def scenario() -> bool:
        governor = Governor(runner, sync_interval=1.0)
        name = "1|requests|minute|0|route|r"
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        governor._reserving[name] = done
        done.add_done_callback(lambda f: governor._reserved(name, time.time() + 60, f))
        done.set_result(3)  # granted; its callback is scheduled but has not run yet
        return await governor._spend_unit(name, 30, time.time() + 60)

    assert run_in_thread(scenario) is True


def test_many_concurrent_calls_get_exactly_the_limit(runner: DatabaseRunner) -> None:
    left = 60 - time.time() % 60
    if left < 5:  # a fixed window: run well inside one minute
        time.sleep(left + 0.2)

    async def scenario() -> tuple[int, bool, bool, float]:
        governor = Governor(runner, sync_interval=1.0)
        governance = per_minute(50)

        async def call() -> bool:
            try:
                await governor.admit(governance, 1, 1, "r", "k")
            except Refused:
                return False
            return True

        admitted = sum(await asyncio.gather(*(call() for _ in range(200))))
        # Found at its limit: a refusal now asks the database nothing, until the next sync.
        refused = not await call()
        asked = bool(governor._reserving)
        await governor.sync()
        return admitted, refused, asked, UsageCounter.select().get().value

    admitted, refused, asked, value = run_in_thread(scenario)
    assert admitted == 50
    assert refused and not asked
    assert value == 50


def test_slots_stay_while_needed_and_go_back_when_idle(runner: DatabaseRunner) -> None:
    async def scenario() -> list[int]:
        governor = Governor(runner, sync_interval=1.0, queue_timeout=0.2)
        held = []
        for _ in range(3):
            await governor.acquire("key:1", 5)
        for _ in range(3):
            governor.release("key:1")
        await governor.sync()  # needed in the last interval: kept
        held.append(sum(s.slots for s in ConcurrencySlot.select()))
        await governor.sync()  # idle for a whole interval: given back
        held.append(sum(s.slots for s in ConcurrencySlot.select()))
        with pytest.raises(Refused):
            for _ in range(6):
                await governor.acquire("key:1", 5)
        held.append(governor.slots.busy["key:1"])
        return held

    assert run_in_thread(scenario) == [3, 0, 5]
