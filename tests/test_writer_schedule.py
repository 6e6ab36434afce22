"""The trace writer process waits behind the serving process, and is never left behind.

A real ``tvgate serve`` (SQLite, then PostgreSQL): while it keeps up, every thread of
its writer process is ``SCHED_IDLE``; with every core taken by other work (one busy
process per core, at the serving process's priority, where a ``SCHED_IDLE`` writer
would get next to no CPU), calls are still traced, every one, because the writer is
raised to ``SCHED_BATCH`` once its traces wait (``tvgate_trace_writer_raised_total``
counts it); it goes behind again once it caught up; and a stop right after a run of
calls drains every trace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import GatewayProcess, scrape, stop_gateway
from tests.test_reliability_writer2 import Load, traces_of, wait_for
from tests.test_writer_process import writer_process
from tvgate.traces import schedule


def policies(pid: int) -> set[int]:
    """The scheduling policy of each thread of ``pid``."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found.add(os.sched_getscheduler(int(tid)))
        except OSError:
            continue  # a thread that just ended
    return found


def behind_policy() -> int:
    """What a writer that keeps up runs at here: SCHED_IDLE where it may be raised again."""
    return os.SCHED_IDLE if schedule.may_leave_idle() else os.SCHED_BATCH


@contextmanager
def every_core_busy() -> Iterator[None]:
    """One busy process per core, at this process's priority, until the block ends."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)


def test_the_writer_waits_behind_keeps_up_under_busy_cores_and_drains_on_stop(
    own_gateway: GatewayProcess, fresh_database_url: str
) -> None:
    gw = own_gateway
    writer = writer_process(gw)
    wait_for(lambda: policies(writer) == {behind_policy()}, "the writer put behind")
    session = uuid.uuid4().hex
    load = Load(gw, session)
    with every_core_busy():
        load.start()
        wait_for(lambda: load.answered >= 200, "calls answered", 120)
        load.finish()
        # Every call answered is traced while the cores stay busy: the writer was raised.
        wait_for(
            lambda: len(traces_of(fresh_database_url, session)) >= load.answered,
            "a trace for every call with every core busy",
            120,
        )
        # Caught up: behind the serving process again.
        wait_for(lambda: policies(writer) == {behind_policy()}, "the writer behind again")
        if schedule.may_leave_idle():
            # It was raised while its traces waited (not only written by a slow trickle).
            assert scrape(gw.url)["tvgate_trace_writer_raised_total"] >= 1
        # A stop right after a run of calls, their traces not all written yet: the drain
        # writes every one.
        stopping = Load(gw, session)
        stopping.start()
        wait_for(lambda: stopping.answered >= 100, "calls before the stop", 120)
        stopping.finish()
        stop_gateway(gw.proc)
    ids = traces_of(fresh_database_url, session)
    assert len(ids) == len(set(ids)) >= load.answered + stopping.answered
    assert "trace writer stopped: written=" in gw.log_text()
