"""How the trace writer process is scheduled: behind the serving process, never left behind.

While the writer keeps up, every thread of its process is ``SCHED_IDLE``: it runs only
on a core nothing else wants, a serving process that wakes takes the core back at
once, and the kernel counts a core that runs only such threads as idle when it places
a woken thread (the load generator, nginx, the serving process find it free). Its
batches (about 5 ms of redaction, hashing and SQL every 50 ms under load) then no longer
sit in the way of a call on a two-core machine.

When its backlog grows (``RAISE_BACKLOG`` traces unacknowledged, or none acknowledged
for ``STALL_SECONDS`` while some wait), while it has a spool to replay or traces held in
memory (an outage, spools adopted at start), and for the drain at stop, it is raised to
``SCHED_BATCH`` at nice 10 (where it starts): it still never preempts a call on wake-up
and gets the smaller share of a contended core, but it does get one, so a busy gateway
never leaves its traces behind. Once it is back under ``LOWER_BACKLOG``, it waits
behind again.

Leaving ``SCHED_IDLE`` needs ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` that allows nice 10
(systemd: ``LimitNICE=10``, which the unit template sets). Without either, the writer is
never put to ``SCHED_IDLE`` (it could not be raised again) and stays at ``SCHED_BATCH``,
nice 10. Where the policies do not exist or may not be set (not Linux, a sandbox), all
of this is silently a no-op: the writer then runs as the serving process does.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

#: The writer's nice value (set by the writer process itself when it starts).
WRITER_NICE = 10
#: Unacknowledged traces past which the writer is raised (a full batch or more waits).
RAISE_BACKLOG = 500
#: ... and under which it is put back behind the serving process.
LOWER_BACKLOG = 50
#: Seconds without an acknowledgement, while traces wait, after which it is raised.
STALL_SECONDS = 1.0
#: Linux's CAP_SYS_NICE, a bit of ``CapEff`` in /proc/self/status.
_CAP_SYS_NICE = 23


def start_behind() -> None:
    """In the writer process, before its threads start (they inherit it): SCHED_BATCH
    (no wake-up preemption) at nice 10 more than the serving process."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.nice(WRITER_NICE)


def may_leave_idle() -> bool:
    """Whether the writer process of this (serving) process, its user and limits, once
    put to SCHED_IDLE, may be raised again: the kernel lets it when RLIMIT_NICE allows
    the writer's nice value (10 more than this process's), or with CAP_SYS_NICE."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    writer_nice = min(19, os.nice(0) + WRITER_NICE)
    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or soft >= 20 - writer_nice:
        return True
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    return False


class WriterPriority:
    """The scheduling of one writer process, as the serving process sets it: idle while
    it keeps up, batch when it falls behind. Every change is a few system calls, made
    only when the state flips."""

    def __init__(self, pid: int | None, *, idle_allowed: bool) -> None:
        self.pid = pid
        self.idle_allowed = idle_allowed
        #: Its threads are at SCHED_IDLE now.
        self.idle = False

    def behind(self) -> None:
        """It keeps up: let it wait behind the serving process (SCHED_IDLE)."""
        if self.idle or not self.idle_allowed:
            return
        self.idle = _set_all(self.pid, os.SCHED_IDLE)

    def raised(self) -> bool:
        """It falls behind, or must drain: SCHED_BATCH at nice 10. True when it was idle."""
        if not self.idle:
            return False
        self.idle = False
        _set_all(self.pid, os.SCHED_BATCH)
        return True


def raise_own() -> None:
    """In the writer process, at its drain: every thread of its own to SCHED_BATCH (the
    serving process may be gone and unable to raise it)."""
    if hasattr(os, "SCHED_BATCH"):
        _set_all(os.getpid(), os.SCHED_BATCH)


def _set_all(pid: int | None, policy: int) -> bool:
    """Set ``policy`` on every thread of ``pid``; True when it was set on any."""
    if pid is None:
        return False
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    done = False
    for tid in threads:
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
        except OSError:
            continue  # the thread ended, or it may not be set here: left as it is
        done = True
    return done
