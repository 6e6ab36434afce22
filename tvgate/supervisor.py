"""The parent of several workers: forks them, restarts one that dies, forwards signals.

With ``--workers N`` (N > 1) the parent process serves nothing itself: it holds every
worker's listening sockets (``tvgate.listeners``), forks the workers (each a full
gateway, built after the fork: ``tvgate.server.serve_worker``), restarts a worker that
exits (backing off one that crashes at start), forwards SIGTERM/SIGINT and SIGHUP to
them, and SIGKILLs those still running past the drain timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from tvgate.config import ConfigError, Settings, load_settings

log = logging.getLogger("tvgate")

#: Signals the supervisor takes synchronously (blocked, then sigtimedwait).
_SUPERVISOR_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
#: After a stop is forwarded, how long past drain_timeout the supervisor waits before SIGKILL.
_STOP_GRACE = 15.0
#: A worker that lived less than this counts as crashing at start: its restart is delayed.
_QUICK_EXIT = 10.0


class Supervisor:
    """The parent of the workers: forks them, restarts them, forwards signals to them."""

    def __init__(
        self,
        settings: Settings,
        sockets: list[list[socket.socket]],
        config_file: str | None,
        work: Callable[[int], None],
    ) -> None:
        self.settings = settings
        self.sockets = sockets  # by worker index
        self.config_file = config_file
        #: Serves as worker ``index`` (in the forked child) until it is told to stop.
        self.work = work
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> when it was last started
        self.delays: dict[int, float] = {}  # worker index -> restart delay after a quick exit
        self.due: dict[int, float] = {}  # worker index -> when to restart it

    def spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISOR_SIGNALS)
                # Keep only this worker's socket: a copy of another worker's would keep it
                # open (and queueing connections nobody accepts) after that worker stops.
                for other, group in enumerate(self.sockets):
                    if other != index:
                        for sock in group:
                            sock.close()
                self.work(index)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        self.started[index] = time.monotonic()
        log.info("started worker %d (pid %d)", index, pid)

    def forward(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap(self, stopping: bool) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                log.info("worker %d (pid %d) stopped with %d", index, pid, code)
                continue
            lived = time.monotonic() - self.started.get(index, 0.0)
            delay = 0.5
            if lived < _QUICK_EXIT:
                # Crashing at start (say, the database is down): back off, up to 30 s.
                delay = min(self.delays.get(index, 0.5) * 2, 30.0)
            self.delays[index] = delay
            self.due[index] = time.monotonic() + delay
            log.error(
                "worker %d (pid %d) exited with %d; restarting in %.1fs", index, pid, code, delay
            )

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        for index in range(self.settings.worker_count):
            self.spawn(index)
        stopping = False
        kill_at = 0.0
        while self.children or (self.due and not stopping):
            info = signal.sigtimedwait(_SUPERVISOR_SIGNALS, 0.5)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    self.due.clear()
                    kill_at = time.monotonic() + self.settings.drain_timeout + _STOP_GRACE
                    log.info("stopping %d workers", len(self.children))
                    self.forward(signal.SIGTERM)
                    # Once the workers close theirs too, the port refuses connections at
                    # once (a load balancer tries the next VM) instead of queueing them.
                    self._close_sockets()
                elif info.si_signo == signal.SIGHUP:
                    self._reload_own_log_level()
                    self.forward(signal.SIGHUP)
            self.reap(stopping)
            now = time.monotonic()
            for index, at in list(self.due.items()):
                if at <= now and not stopping:
                    del self.due[index]
                    self.spawn(index)
            if stopping and self.children and now > kill_at:
                log.error("workers still running past the drain timeout; killing them")
                self.forward(signal.SIGKILL)
                kill_at = now + 5
        self._close_sockets()
        log.info("tvgate stopped")
        return 0

    def _close_sockets(self) -> None:
        for group in self.sockets:
            for sock in group:
                sock.close()

    def _reload_own_log_level(self) -> None:
        try:
            level = load_settings(self.config_file).log_level
        except ConfigError:
            return  # the workers log why
        logging.getLogger().setLevel(level.upper())
