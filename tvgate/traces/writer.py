"""The trace writer: a bounded queue drained in batches by one thread, with a spool for outages.

It runs in the writer process (:mod:`tvgate.traces.child`), fed from the serving
process's :class:`~tvgate.traces.client.WriterClient`; ``submit`` only appends to the
queue (never blocks, never touches the database or the disk), and ``on_progress`` says
up to which trace everything is in the database or the spool. One thread takes what
is queued, up to ``batch_size`` traces at a time, and hands the batch to the
:class:`~tvgate.traces.batch.BatchWriter` (redaction, content-addressed bodies,
prices, one transaction).

The queue is a ``deque`` the writer polls every ``POLL_INTERVAL``: appending
takes no lock and wakes no thread, and under load a batch holds every trace of
the interval (after a batch short of ``batch_size`` the writer waits an interval
before it takes the next), so the writer runs a few times a second, not once per
call.

When the database cannot be reached, the batch is appended to the writer's spool
(:mod:`tvgate.traces.spool`: per slot, fsynced) instead, and so is every later batch
until the spool has been replayed, in order, once the database answers again. A
trace is acknowledged once it is in the database or in the spool; ``stop()``
writes or spools everything queued before it returns, so a SIGTERM loses nothing.
When the spool cannot be written either (a full disk, a read-only one), the traces
go to the :class:`~tvgate.traces.holding.HoldingStore`, behind which every later
trace waits in order, and the database and the spool are both tried again with a
backoff: whichever comes back first takes them.

Bodies are held in memory only up to ``body_budget`` bytes while queued or held;
past that a trace is recorded without its body rather than not at all. A spooled
body is the redacted form the database would have stored (none for an org that does
not capture bodies), so replay stores exactly the blobs the direct path would have.
Bodies of an org with a key not known in plaintext wait in the holding store (their
traces are written at once); those still held at stop are dropped (counted in
``bodies_dropped``), the traces themselves are kept.

With each batch, and every ``HEARTBEAT`` while idle, the writer publishes its watermark
(:mod:`tvgate.traces.watermark`): every call of its worker that ended before it is in the
database. Readers that need a session's calls in order (the Visdom outbox) wait for it.

No row can stop the writer (see :mod:`tvgate.traces.batch`), and the thread itself is
supervised: an error that escapes is logged, counted and the loop started again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import peewee

from tvgate.db import (
    CONNECTION_ERRORS,
    IDLE_TIMEOUT,
    MAX_AGE,
    ConnectionAge,
    close_own_connection_if_due,
    current_connection,
    reset_connection,
)
from tvgate.keyring import KeyContext
from tvgate.traces import watermark
from tvgate.traces.batch import BatchWriter
from tvgate.traces.holding import HoldingStore
from tvgate.traces.rows import (
    DROP_REASONS,
    UNREADABLE,
    CapturedBody,
    Item,
    TraceRow,
    WriterStats,
    read_entry,
)
from tvgate.traces.spool import Spool, count_lines, read_lines
from tvgate.traces.store import KnownPlaintexts

__all__ = ["DROP_REASONS", "CapturedBody", "TraceRow", "TraceWriter"]

log = logging.getLogger("tvgate.traces")

#: How often the writer looks for queued traces (it is woken at once to stop).
POLL_INTERVAL = 0.05
#: While the spool is not empty, how often a replay is tried when no trace comes.
_SPOOL_RETRY = 1.0
#: Bytes of bodies held in memory, queued or held, at most (past it, traces go bodiless).
BODY_BUDGET = 256 * 1024 * 1024
#: How long the supervisor waits before it starts the writer's loop again.
_RESTART_DELAY = 1.0
#: Seconds between watermarks after batches at most (one more statement per batch).
_MARK_AFTER_BATCH = 0.2


class TraceWriter:
    def __init__(
        self,
        db: peewee.Database,
        keys: KnownPlaintexts,
        *,
        queue_size: int,
        batch_size: int,
        spool_dir: Path,
        settings_ttl: float,
        worker: int = 0,
        body_budget: int = BODY_BUDGET,
        connection_age: ConnectionAge | None = None,
    ) -> None:
        self.db = db
        #: The writer thread's connection is closed between batches once it is due.
        self.connection_age = connection_age or ConnectionAge(IDLE_TIMEOUT, MAX_AGE)
        self.batch_size = batch_size
        self.worker = worker
        self.body_budget = body_budget
        self.queue_size = queue_size
        self.stats = WriterStats()
        self.spool = Spool(spool_dir, worker)
        self.holding = HoldingStore(queue_size, body_budget, self.stats)
        self.batches = BatchWriter(db, keys, self.holding, self.spool, self.stats, settings_ttl)
        self._queue: deque[Item] = deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, name="tvgate-trace-writer", daemon=True
        )
        self._pending_body_bytes = 0
        self._release_at = 0.0
        #: The batch the writer is working on, for the supervisor if the loop fails.
        self._in_hand: list[Item] = []
        #: Called (on the writer's thread) with the highest ``seq`` up to which every
        #: trace taken is in the database or the spool, or counted lost, when it moves
        #: on, and after a replay.
        self.on_progress: Callable[[int], None] | None = None
        self._taken_seq = self._durable_seq = 0
        self.identity = watermark.writer_identity(worker)
        #: The serving process's clock as of the last CLOCK read (0: none yet).
        self._sent_upto = 0.0
        #: The earliest end of what is in the spool (None: it is empty; 0: not known, as
        #: for a spool left by an earlier run or adopted).
        self._spooled_from: float | None = None
        self._marked_at = 0.0

    # --- the request path (IOLoop thread) ---

    def start(self) -> None:
        # Counted before the thread runs, so that readiness tells at once.
        self.stats.dead_letters = count_lines(self.spool.dead_letter_path)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        """The writer's thread is alive (readiness reports it)."""
        return self._thread.is_alive()

    @property
    def capture_stored_bytes(self) -> int:
        """Bytes of request bodies stored (read from any thread)."""
        return self.batches.conversations.stored

    @property
    def capture_scanned_bytes(self) -> int:
        """Of those, the bytes redacted and scanned; the rest continued a conversation."""
        return self.batches.conversations.scanned

    @property
    def held(self) -> int:
        """Traces in memory only: neither the database nor the spool took them (yet)."""
        return len(self.holding.traces)

    @property
    def held_bodies(self) -> int:
        """Bodies held until their org's keys are known in plaintext (read from any thread)."""
        return len(self.holding.bodies)

    @property
    def spool_size(self) -> int:
        """Traces waiting in the spool for the database to come back."""
        return self.spool.size

    def wanted_keys(self) -> list[tuple[str, KeyContext]]:
        """The keys (ciphertext, context) whose plaintext held bodies wait for (any thread)."""
        return self.batches.wanted_keys()

    def submit(self, row: TraceRow, body: CapturedBody | None = None, seq: int = 0) -> None:
        """Queue a trace; never blocks."""
        if len(self._queue) >= self.queue_size:
            self.stats.dropped_by["queue_full"] += 1
            log.error("trace queue full; trace %s dropped", row.get("id"))
            return
        if body is not None:
            if self._pending_body_bytes + self.holding.body_bytes + body.size > self.body_budget:
                self.stats.bodies_dropped += 1
                body = None
            else:
                self._pending_body_bytes += body.size
        # deque.append is atomic: the writer thread takes from the other end, no lock.
        self._queue.append(Item(row, body, seq))

    def clock(self, now: float) -> None:
        """The serving process's clock, read behind every trace it sent before (reader
        thread): each call of it that ended before ``now`` is queued here by now."""
        self._sent_upto = now

    def settings_changed(self, org_id: int) -> None:
        """An org's policy or keys changed: its capture settings are read again before its
        next trace is written."""
        self.batches.settings_changed(org_id)

    def release_soon(self) -> None:
        """A key's plaintext came: try the held bodies at the next turn (any thread)."""
        self._release_at = 0.0

    def stop(self, timeout: float = 60.0) -> None:
        """Write (or spool) everything queued so far, then end the thread."""
        self._stopping.set()
        self._thread.join(timeout)

    # --- the writer thread ---

    def _supervise(self) -> None:
        """Run the loop; if an error escapes it, count it, keep what it held, run it again."""
        self.spool.open()
        if self.spool.size:
            self._spooled_from = 0.0
        # Counted again: the slot taken may not be the worker's.
        self.stats.dead_letters = count_lines(self.spool.dead_letter_path)
        while True:
            try:
                self._run()
            except Exception as exc:
                self.stats.restarts += 1
                log.exception("trace writer failed; starting it again")
                held, self._in_hand = self._in_hand, []
                self.batches.conversations.forget()
                reset_connection(self.db)
                for item in held:
                    self.batches.dead_letter(item, exc, reason="writer_error")
                if self._stopping.is_set():
                    # No second failure at stop: what is queued goes to the spool, for
                    # the next start to replay.
                    queued = [self._queue.popleft() for _ in range(len(self._queue))]
                    if queued:
                        self._taken_seq = queued[-1].seq
                    self.holding.hold(self._spool(queued))
                    self.holding.lose()
                    break
                self._stopping.wait(_RESTART_DELAY)
                continue
            break
        # Everything taken is in the database or the spool now, or counted lost.
        self._durable()
        if not self.spool.size and not self.holding.traces:
            self._try_watermark(watermark.withdraw, self.identity)
        if not self.db.is_closed():
            self.db.close()
        self.spool.close()
        stats = self.stats
        log.info(
            "trace writer stopped: written=%d dropped=%d %s failures=%d restarts=%d peak_depth=%d",
            stats.written,
            stats.dropped,
            " ".join(f"{reason}={count}" for reason, count in stats.dropped_by.items()),
            stats.failures,
            stats.restarts,
            stats.peak_depth,
        )

    def _take_batch(self) -> list[Item]:
        queued = self._queue
        depth = len(queued)
        if not depth:
            return []
        self.stats.peak_depth = max(self.stats.peak_depth, depth)
        popleft = queued.popleft
        self._in_hand = [popleft() for _ in range(min(depth, self.batch_size))]
        self._taken_seq = self._in_hand[-1].seq
        for item in self._in_hand:
            if isinstance(item.body, CapturedBody):
                self._pending_body_bytes -= item.body.size
        return self._in_hand

    def _run(self) -> None:
        last_replay = time.monotonic()
        holding = self.holding
        while True:
            # Read before taking a batch: a stop asked for after the queue was found empty
            # still finds every trace queued before it.
            ending = self._stopping.is_set()
            if not holding.traces:
                self._durable()
            if holding.bodies and not self.spool.size and time.monotonic() >= self._release_at:
                self._release_at = time.monotonic() + _SPOOL_RETRY
                self.batches.release_bodies()
                self._progress()
            self._in_hand = []
            batch = self._take_batch()
            if holding.traces:
                self._while_held(batch, ending)
                if ending and not batch:
                    self._finish_bodies()
                    return
                continue
            if not batch:
                if ending:
                    if self.spool.size:
                        self._replay_spool()  # a last try: what stays is replayed at start
                    self._finish_bodies()
                    return
                if self.spool.size and time.monotonic() - last_replay >= _SPOOL_RETRY:
                    last_replay = time.monotonic()
                    self._replay_spool()
                    continue
                self._mark(watermark.HEARTBEAT)
                close_own_connection_if_due(self.db, self.connection_age)
                self._stopping.wait(POLL_INTERVAL)
                continue
            if self.spool.size:
                last_replay = time.monotonic()
                if not self._replay_spool():
                    # The database is still away; keep the order: new traces go behind.
                    holding.hold(self._spool(batch))
                    continue
            holding.hold(self._write_or_spool(batch))
            self._mark(_MARK_AFTER_BATCH)
            self.connection_age.note_use(current_connection(self.db))
            close_own_connection_if_due(self.db, self.connection_age)
            if len(batch) < self.batch_size and not holding.traces and not ending:
                # A batch per interval under load: the traces that come while one is
                # written wait for the next, not taken a few at a time as they come
                # (each batch pays a transaction, an ack and its orgs' key check, so a
                # writer with a core to spare spent 2-4x the CPU per trace).
                self._durable()
                self._stopping.wait(POLL_INTERVAL)

    @property
    def taken_seq(self) -> int:
        """The ``seq`` of the last trace taken from the queue."""
        return self._taken_seq

    def _progress(self) -> None:
        """Say how far it is (and so, its counters) after work no new trace marks."""
        if self.on_progress is not None:
            self.on_progress(self._durable_seq)

    def _durable(self) -> None:
        if self._taken_seq != self._durable_seq and self.on_progress is not None:
            self._durable_seq = self._taken_seq
            self.on_progress(self._taken_seq)

    def _watermark(self) -> float:
        """Every call of this worker that ended before the time returned is written."""
        # The clock first: a trace queued before it was read is in the queue copied next.
        upto = self._sent_upto
        for items in (self._queue.copy(), self.holding.traces):
            for item in items:
                upto = min(upto, _ended(item))
        if self._spooled_from is not None:
            upto = min(upto, self._spooled_from)
        return upto

    def _mark(self, every: float) -> None:
        """Publish the watermark if ``every`` seconds passed since the last (not while the
        spool or memory holds traces: it cannot move then, and the database is away)."""
        if self.spool.size or self.holding.traces or time.monotonic() - self._marked_at < every:
            return
        self._marked_at = time.monotonic()
        self._try_watermark(watermark.publish, self.identity, self._watermark(), time.time())

    def _try_watermark(self, step: Callable[..., None], *args: object) -> bool:
        """Write the watermark; a failure costs the traces nothing (it is tried again)."""
        try:
            step(*args)
        except CONNECTION_ERRORS:
            reset_connection(self.db)
            return False
        except peewee.DatabaseError as exc:
            # Not migrated yet (tvgate migrate): readers find no watermark of this writer.
            log.warning("trace writer watermark not written: %s", exc)
            reset_connection(self.db)
            return False
        return True

    def _while_held(self, batch: list[Item], ending: bool) -> None:
        """Traces are held in memory: the batch waits behind them, and both the database
        and the spool are tried when the backoff says so (at once when stopping: what
        neither takes then is lost, and counted)."""
        self.holding.hold(batch)
        self._in_hand = []
        if ending and not batch:
            self._flush_held()
            self.holding.lose()
        elif ending or self.holding.due():
            self._flush_held()
        else:
            self._stopping.wait(POLL_INTERVAL)

    def _flush_held(self) -> None:
        """Write what is held to the database, behind the spool to keep the order; when the
        database is away, to the spool. What neither takes is held again, tried later."""
        # They stay held while they are tried (readiness reads it); a failure that escapes
        # leaves them there for the restarted loop.
        held = list(self.holding.traces)
        if self.spool.size and not self._replay_spool():
            rest = self._spool(held)
        else:
            rest = self._write_or_spool(held)
        self.holding.tried(held, rest)

    def _finish_bodies(self) -> None:
        """At stop: store the held bodies whose keys are known by now, drop the rest."""
        if self.holding.bodies and not self.spool.size:
            self.batches.release_bodies()
        self.holding.drop_bodies()

    def _write_or_spool(self, batch: list[Item]) -> list[Item]:
        """Write the batch, or spool it when the database is away; what neither took."""
        try:
            self.batches.store(batch)
        except CONNECTION_ERRORS as exc:
            self.stats.failures += 1
            reset_connection(self.db)
            log.warning("database unavailable (%s); spooling %d traces", exc, len(batch))
            return self._spool(batch)
        return []

    def _spool(self, batch: list[Item]) -> list[Item]:
        """Append the batch to the spool; what it could not take, for the caller to hold
        (a trace JSON cannot hold is lost, and counted)."""
        stats = self.stats
        lines = []
        kept: list[Item] = []
        for item in batch:
            try:
                lines.append(self.batches.spool_line(item))
                kept.append(item)
            except TypeError as exc:  # a value JSON cannot hold: nowhere to keep it
                stats.dropped_by["spool_error"] += 1
                log.error("trace %s lost: it cannot be spooled (%s)", item.row.get("id"), exc)
        if not lines:
            return []
        try:
            self.spool.append(lines)
        except OSError as exc:
            stats.spool_errors += 1
            if stats.spool_error is None:
                log.error(
                    "the spool could not be written (%r); holding %d traces in memory and "
                    "trying the database and the spool again",
                    exc,
                    len(lines),
                )
            stats.spool_error = f"{type(exc).__name__}: {exc.strerror or exc}"
            return kept
        if stats.spool_error is not None:
            log.info("the spool is written again")
            stats.spool_error = None
        stats.spooled += len(lines)
        ended = min(_ended(item) for item in kept)
        self._spooled_from = min(
            ended, self._spooled_from if self._spooled_from is not None else ended
        )
        return []

    def _replay_spool(self) -> bool:
        """Write the spool to the database in order; True once it is empty.

        Files renamed for replay (this writer's, and those adopted) go first, oldest
        first, each removed once written. Only then is the file appended to renamed and
        replayed, so what is spooled meanwhile goes to a fresh one, and an outage leaves
        one renamed file, not one per try. What a writer stopping beside this one leaves
        is not adopted while this one stops: it is for the next start."""
        if not self._stopping.is_set():
            adopted = self.spool.size
            self.spool.adopt()
            if self.spool.size != adopted:
                self._spooled_from = 0.0  # a gone worker's traces: their times not known
        if not self._replay_frozen():
            return False
        self.spool.freeze()
        if not self._replay_frozen():
            return False
        self._spooled_from = None
        return True

    def _replay_frozen(self) -> bool:
        replayed = 0
        for path in self.spool.in_order():
            try:
                self._replay_file(path)
            except CONNECTION_ERRORS:
                reset_connection(self.db)
                return False
            except _WatermarkNotWritten:
                return False
            replayed += self.spool.replayed(path)
        if replayed:
            log.info("replayed %d spooled traces", replayed)
            self._progress()
        return True

    def _replay_file(self, path: Path) -> None:
        batch: list[Item] = []
        published = False

        def store(batch: list[Item]) -> None:
            nonlocal published
            # Readers wait for the spooled traces first (the watermark may have gone stale
            # meanwhile): it is published before the first of them is written, not before
            # the file is read (one that cannot be read fails the writer, restarted and
            # reported, whether the database is there or not).
            if not published:
                upto = self._watermark()
                if not self._try_watermark(watermark.publish, self.identity, upto, time.time()):
                    raise _WatermarkNotWritten
                published = True
            self.batches.store(batch)

        for line in read_lines(path):
            try:
                batch.append(read_entry(line))
            except UNREADABLE as exc:
                self.batches.dead_letter_line(line, exc)
                continue
            if len(batch) >= self.batch_size:
                store(batch)
                batch = []
        if batch:
            store(batch)


class _WatermarkNotWritten(Exception):
    """The watermark could not be published before a replay (the database is away)."""


def _ended(item: Item) -> float:
    """When the item's call ended (when it came, for one that never finished)."""
    return float(item.row.get("finished_at") or item.row["received_at"])
