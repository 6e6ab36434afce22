"""The spool and the dead-letter file of one writer, and the slot by which it owns them.

When the database cannot be reached, batches are appended to the spool (fsynced), in
order, and replayed once it answers again. Each writer owns a *slot* ``n``: it holds an
exclusive ``flock`` on ``traces.lock.<n>`` while it runs, appends to
``traces.spool.<n>`` and dead-letters into ``traces.deadletter.<n>``. Its slot is its
worker's index when that lock is free (after a short wait: a writer adopting that
spool holds it a moment); otherwise the first ``n`` whose lock is free (another
``tvgate serve`` on the same data directory runs a worker of that index). The kernel
lets go of a lock when its process dies, however it dies, so a free lock is a slot
nobody writes to.

A replay first renames the spool to ``traces.spool.<n>.replay-<t>`` (later traces go to
a fresh file), then writes and removes the renamed files in order. A writer also
*adopts* the spools of slots whose lock is free (a restart with fewer workers, a
crash): under that slot's lock it renames their files into its own ``replay-<t>``
names, so no two processes ever read or append one file. ``traces.spool`` and
``traces.lock`` are the single spool from before spools were per worker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("tvgate.traces")

#: How long a writer waits for its worker's lock (held a moment by a writer adopting it).
_LOCK_WAIT = 2.0
#: Slots tried, at most, for a free lock (far more writers than one machine runs).
_MAX_SLOTS = 4096
#: A spool file's name: ``traces.spool`` (before spools were per worker), or a slot's
#: ``traces.spool.<n>``, either possibly renamed for replay as ``...replay-<t>``.
_SPOOL_NAME = re.compile(r"^traces\.spool(?:\.(\d+))?(?:\.replay-(\d+))?$")


class Spool:
    """One writer's spool files, their line counts, and the lock of its slot.

    Nothing here redacts or writes to the database: lines come in encoded, and replay
    reads them back for the writer to store."""

    def __init__(self, spool_dir: Path, worker: int) -> None:
        self.dir = spool_dir
        self.worker = worker
        self.slot = worker
        #: Where this writer appends in an outage; only it touches the file (its lock).
        self.path = spool_dir / f"traces.spool.{worker}"
        #: Rows the database refused even alone, beside the spool.
        self.dead_letter_path = spool_dir / f"traces.deadletter.{worker}"
        #: Lines in the file appended to, and in each file renamed for replay.
        self.lines = 0
        self.frozen: dict[Path, int] = {}
        self._lock_fd: int | None = None

    @property
    def size(self) -> int:
        """Traces waiting in the spool for the database to come back."""
        return self.lines + sum(self.frozen.values())

    def open(self) -> None:
        """Lock a slot, then take the files it holds and those of slots nobody runs."""
        try:
            self._lock_fd, slot = _take_slot(self.dir, self.worker)
        except OSError as exc:
            # The data directory is not writable: nothing can be spooled, nor adopted.
            log.error("the spool lock could not be taken (%r)", exc)
            return
        if slot != self.worker:
            log.warning(
                "the spool of worker %d is held by another process on this data directory"
                " (a second tvgate serve?); this one spools as %d",
                self.worker,
                slot,
            )
            self.slot = slot
            self.path = self.dir / f"traces.spool.{slot}"
            self.dead_letter_path = self.dir / f"traces.deadletter.{slot}"
        self.lines = count_lines(self.path)
        for path in self.dir.glob(f"{self.path.name}.replay-*"):
            self.frozen[path] = count_lines(path)
        self.adopt()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None

    def append(self, lines: list[bytes]) -> None:
        """Append encoded traces (raises OSError: nothing was appended)."""
        append(self.path, lines)
        self.lines += len(lines)

    def freeze(self) -> None:
        """Rename the file appended to for replay (later traces go to a new file)."""
        frozen = self.dir / f"{self.path.name}.replay-{time.time_ns()}"
        try:
            self.path.rename(frozen)
        except FileNotFoundError:
            self.lines = 0
            return
        self.frozen[frozen] = self.lines
        self.lines = 0

    def in_order(self) -> list[Path]:
        """The files renamed for replay, oldest first."""
        return sorted(self.frozen, key=_replay_order)

    def replayed(self, path: Path) -> int:
        """Remove a file whose every line is in the database; its line count."""
        # Replay is idempotent by trace id, so a crash before this unlink only repeats work.
        path.unlink(missing_ok=True)
        return self.frozen.pop(path)

    def adopt(self) -> None:
        """Take the spool files of every slot nobody runs (its lock is free) into this
        writer's replay; a spool from before spools were per worker too."""
        if self._lock_fd is None:
            return
        owners: dict[str, list[Path]] = {}
        for path in self.dir.glob("traces.spool*"):
            match = _SPOOL_NAME.match(path.name)
            if match is None or match[1] == str(self.slot):
                continue
            owners.setdefault(match[1] or "", []).append(path)
        for owner, paths in owners.items():
            try:
                fd = _lock(self.dir, owner)
            except BlockingIOError:
                continue  # that slot's writer runs: its spool is its own
            except OSError as exc:
                log.error("the spool of worker %s could not be adopted (%r)", owner, exc)
                continue
            try:
                for path in sorted(paths, key=_replay_order):
                    adopted = self.dir / f"{self.path.name}.replay-{time.time_ns()}"
                    lines = count_lines(path)
                    path.rename(adopted)
                    self.frozen[adopted] = lines
                    log.info("adopted %d spooled traces of worker %s", lines, owner or "-")
            except OSError as exc:
                log.error("the spool of worker %s could not be adopted (%r)", owner, exc)
            finally:
                os.close(fd)


def read_lines(path: Path) -> Iterator[bytes]:
    """The non-empty lines of a spool file (none if it is gone)."""
    try:
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    yield line
    except FileNotFoundError:
        return


def _take_slot(spool_dir: Path, worker: int) -> tuple[int, int]:
    """The lock of the worker's own slot, once a writer adopting it lets go; when a process
    that runs keeps it past that wait, the first free slot: (descriptor, slot)."""
    try:
        return _lock_within(spool_dir, str(worker), _LOCK_WAIT), worker
    except BlockingIOError:
        pass
    for slot in itertools.chain(range(worker), range(worker + 1, _MAX_SLOTS)):
        try:
            return _lock(spool_dir, str(slot)), slot
        except BlockingIOError:
            continue
    raise OSError(errno.EBUSY, f"no spool slot is free in {spool_dir}")


def _lock_within(spool_dir: Path, owner: str, seconds: float) -> int:
    """``_lock`` of ``owner``'s spool, tried for up to ``seconds`` (an adoption holds it for
    a moment only); BlockingIOError when a process that runs keeps it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return _lock(spool_dir, owner)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _lock(spool_dir: Path, owner: str) -> int:
    """An exclusive ``flock`` on a slot's lock (``traces.lock`` for the spool from before
    spools were per worker): its descriptor, which holds it until closed."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    name = f"traces.lock.{owner}" if owner else "traces.lock"
    # Read-only: flock needs no more, and a file open for writing would keep the file
    # system from being remounted read-only.
    fd = os.open(spool_dir / name, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _replay_order(path: Path) -> int:
    """Replay files oldest first: by the time in their name (the spool appended to last)."""
    match = _SPOOL_NAME.match(path.name)
    return int(match[2]) if match is not None and match[2] else time.time_ns()


def count_lines(path: Path) -> int:
    """Lines in a spool file; 0 when none can be read (it is missing, or not a file: the
    append that follows fails and says so)."""
    try:
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


def append(path: Path, lines: list[bytes]) -> None:
    """Append lines to a file only this user may read (0600, also if it was not), fsynced.

    All or nothing: a write cut short (a full disk) is taken back, so the file never ends
    in a torn line and the traces that did not fit are only where the caller keeps them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(lines)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
