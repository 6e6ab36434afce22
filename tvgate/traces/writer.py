"""The trace writer: a bounded queue drained in batches by one thread, with a spool for outages.

The request path only appends to the queue (never blocks, never touches the
database or the disk). One thread takes what is queued, up to ``batch_size``
traces at a time, stores their captured bodies (redacted, content-addressed),
prices them, and inserts everything in one transaction. Inserts are
idempotent by trace id.

The queue is a ``deque`` the writer polls every ``POLL_INTERVAL``: appending
takes no lock and wakes no thread, and under load a batch holds every trace of
the interval, so the writer runs (and takes the GIL from the event loop) a few
times a second, not once per call. Rows go in through one prepared multi-row
``INSERT`` per batch size, built once, not by the ORM per batch.

When the database cannot be reached, the batch is appended to a spool file in
the data directory (and fsynced) instead, and so is every later batch until
the spool has been replayed, in order, once the database answers again. A
trace is acknowledged once it is in the database or in the spool; ``stop()``
writes or spools everything queued before it returns, so a SIGTERM loses
nothing.

Each worker has its own spool, ``traces.spool.<worker>``, and holds an exclusive
``flock`` on ``traces.lock.<worker>`` while it runs. A replay first renames the
spool to ``traces.spool.<worker>.replay-<n>`` (later traces go to a fresh
file), then writes and removes the renamed files in order. A worker also adopts
the spools of workers that do not run (their lock is free: a restart with fewer
workers, a crash): under that worker's lock it renames their files into its own
``replay-<n>`` names, so no two processes ever read or append one file.

When the spool cannot be written either (a full disk, a read-only one), the
traces are held in memory, behind which every later trace waits in order, and
the database and the spool are both tried again with a backoff: whichever comes
back first takes them. What is held is bounded like the queue: past the body
budget the oldest bodies are let go first (the traces are kept without them),
past the queue size the oldest traces (counted as ``spool_error``).

Bodies are held in memory only up to ``body_budget`` bytes while
queued; past that a trace is recorded without its body rather than not at all.
A spooled body is the redacted form the database would have stored (none for an
org that does not capture bodies), so replay stores exactly the blobs the direct
path would have.

The writer never waits on the keyring. It redacts an org's provider keys with the
plaintexts the gateway's decrypted-key cache holds (a key a call used is there);
while a key of the org is in no cache (the gateway warms it, off this thread), the
org's traces are written at once but their bodies are *held* in memory, redacted
with what is known, never stored or spooled, and stored once every key is known.
Held bodies count against ``body_budget``; those still held at stop are dropped
(counted in ``bodies_dropped``), the traces themselves are kept.

No row can stop the writer. Values from clients and providers are mended before
the insert (:func:`mend_row`: text cut to its column, NULs removed, integers out
of the column's range set to 0, each named in the trace's ``anomalies``). A batch
that fails for any reason but the connection is written again row by row, and a
row that still fails goes to the dead-letter file (redacted like the spool, 0600)
and is counted, as is every trace lost (``dropped_by``). The thread itself is
supervised: an error that escapes is logged, counted and the loop started again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
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
from tvgate.models import Trace
from tvgate.traces.content import blob_digest, store_request
from tvgate.traces.conversations import Conversations
from tvgate.traces.pricing import PriceTable
from tvgate.traces.store import BlobStore, CaptureSettings, KnownPlaintexts, load_capture_settings

log = logging.getLogger("tvgate.traces")

TraceRow = dict[str, Any]
#: How often the writer looks for queued traces (it is woken at once to stop).
POLL_INTERVAL = 0.05
#: While the spool is not empty, how often a replay is tried when no trace comes.
_SPOOL_RETRY = 1.0
#: Rows per INSERT statement.
_INSERT_ROWS = 100
#: While neither the database nor the spool takes the traces held in memory, the first
#: and the longest wait between two tries of both.
_HELD_RETRY_MIN, _HELD_RETRY_MAX = 0.1, 5.0
#: A spool file's name: ``traces.spool`` (before spools were per worker), or a worker's
#: ``traces.spool.<worker>``, either possibly renamed for replay as ``...replay-<n>``.
#: Spool slots tried past a worker's own index, and the step between them.
_SLOTS, _SLOT_STRIDE = 16, 1000
#: How long a worker waits for its spool's lock (held a moment by a worker adopting it).
_LOCK_WAIT = 2.0
_SPOOL_NAME = re.compile(r"^traces\.spool(?:\.(\d+))?(?:\.replay-(\d+))?$")
#: Why traces were lost: the queue was full; the database refused the row even alone
#: (it is kept in the dead-letter file); neither the spool nor the database took them
#: while more than the queue size was held in memory, or at stop; the writer failed
#: while it held them.
DROP_REASONS = ("queue_full", "dead_letter", "spool_error", "writer_error")
#: How long the supervisor waits before it starts the writer's loop again.
_RESTART_DELAY = 1.0
#: PostgreSQL's ``integer``, the narrower of the two databases' integer columns.
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


@dataclass(slots=True)
class CapturedBody:
    """What a call said and answered, as captured on the request path (not yet redacted)."""

    request: bytes
    response: dict[str, Any] | None
    #: Bytes of answer the capture retained (``response`` is built from them).
    response_size: int = 0

    @property
    def size(self) -> int:
        """What the body holds in memory while queued, counted in ``body_budget``."""
        return len(self.request) + self.response_size


@dataclass(slots=True)
class RedactedBody:
    """A body as the writer stores it, redacted already: the request, and the answer as
    JSON. What the spool and the dead-letter file hold."""

    request: bytes
    response: bytes | None


def _column(field: peewee.Field) -> tuple[str, Any, Any]:
    default = field.default
    return (field.name, field.db_value, default if callable(default) else lambda: default)


#: Every column of a trace, in the model's order: (name, to the database's type, default).
_COLUMNS: tuple[tuple[str, Any, Any], ...] = tuple(
    _column(field) for field in Trace._meta.sorted_fields
)
#: A row of every column, in that order, from which the INSERT of each size is built.
_SAMPLE_ROW = (None,) * len(_COLUMNS)
#: Text columns and their sizes (None: unbounded), and integer columns.
_TEXT_COLUMNS: tuple[tuple[str, int | None], ...] = tuple(
    (field.name, field.max_length if isinstance(field, peewee.CharField) else None)
    for field in Trace._meta.sorted_fields
    if isinstance(field, (peewee.CharField, peewee.TextField)) and field.name != "anomalies"
)
_INT_COLUMNS: tuple[str, ...] = tuple(
    field.name for field in Trace._meta.sorted_fields if isinstance(field, peewee.IntegerField)
)


def mend_row(row: TraceRow) -> TraceRow:
    """The row as the database can take it, whatever a client or provider put in it.

    Text is cut to its column (a provider's 300-character model path) and loses NULs
    (PostgreSQL refuses them); an integer outside the column's range becomes 0. Each
    mend is added to the row's ``anomalies`` (a list on the request path), which
    becomes the column's JSON text.
    """
    anomalies = list(row.get("anomalies") or ())
    mended = dict(row)
    for name, size in _TEXT_COLUMNS:
        value = row.get(name)
        if not isinstance(value, str):
            continue
        if "\x00" in value:
            value = value.replace("\x00", "")
            anomalies.append(f"control characters removed: {name}")
        if size is not None and len(value) > size:
            value = value[:size]
            anomalies.append(f"truncated: {name}")
        mended[name] = value
    for name in _INT_COLUMNS:
        value = row.get(name)
        # A float too: a spool line's integer past 64 bits reads back as one.
        if isinstance(value, (int, float)) and not _INT_MIN <= value <= _INT_MAX:
            mended[name] = 0
            anomalies.append(f"{name} out of range")
    mended["anomalies"] = orjson.dumps(anomalies).decode() if anomalies else ""
    return mended


@dataclass(slots=True)
class _WaitingBody:
    """A body whose org has a key not known in plaintext yet: redacted with the keys known,
    waiting in memory for the rest; its trace is in the database already."""

    org_id: int
    body: RedactedBody

    @property
    def size(self) -> int:
        return len(self.body.request) + len(self.body.response or b"")


@dataclass(slots=True)
class _Item:
    row: TraceRow
    body: CapturedBody | RedactedBody | None


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
        body_budget: int = 256 * 1024 * 1024,
        connection_age: ConnectionAge | None = None,
    ) -> None:
        self.db = db
        #: The writer thread's connection is closed between batches once it is due.
        self.connection_age = connection_age or ConnectionAge(IDLE_TIMEOUT, MAX_AGE)
        self.keys = keys
        self.batch_size = batch_size
        self.spool_dir = spool_dir
        self.worker = worker
        #: Whose spool this writer appends to: the worker index, unless another process
        #: on this data directory holds that one (``_take_own_spool``).
        self.slot = worker
        #: Where this worker appends in an outage; only it touches the file (its lock).
        self.spool_path = spool_dir / f"traces.spool.{worker}"
        #: Rows the database refused even alone, beside the spool.
        self.dead_letter_path = spool_dir / f"traces.deadletter.{worker}"
        self.body_budget = body_budget
        self.settings_ttl = settings_ttl
        #: Orgs whose capture settings changed since they were read (``settings_changed``).
        self._stale_settings: set[int] = set()
        self.queue_size = queue_size
        self._queue: deque[_Item] = deque()
        self._stopping = threading.Event()
        self._inserts: dict[int, str] = {}
        self._conversations = Conversations()
        self._thread = threading.Thread(
            target=self._supervise, name="tvgate-trace-writer", daemon=True
        )
        self._pending_body_bytes = 0
        self._settings: dict[int, CaptureSettings] = {}
        #: Bodies held until their org's keys are known, by trace id.
        self._waiting: dict[str, _WaitingBody] = {}
        self._waiting_bytes = 0
        self._release_at = 0.0
        #: The keys each org's bodies wait for, for the gateway to decrypt (another thread).
        self._wanted: dict[int, list[tuple[str, KeyContext]]] = {}
        self._wanted_lock = threading.Lock()
        self._prices: PriceTable | None = None
        self._prices_at = 0.0
        #: Lines in the spool file being appended to, and in each file renamed for replay.
        self._spool_lines = 0
        self._frozen: dict[Path, int] = {}
        #: This worker's ``flock`` on its spool, held while the process lives.
        self._lock_fd: int | None = None
        #: Traces neither the database nor the spool took, oldest first, and their bodies'
        #: bytes; when both are tried next, and the wait after that.
        self._held: deque[_Item] = deque()
        self._held_body_bytes = 0
        self._held_retry_at = 0.0
        self._held_delay = _HELD_RETRY_MIN
        #: The last spool write's error while it fails (readiness reports it).
        self.spool_error: str | None = None
        self.spool_errors = 0
        #: The batch the writer is working on, for the supervisor if the loop fails.
        self._in_hand: list[_Item] = []
        #: Ids dead-lettered by this process: a replay cut short tries them again.
        self._dead_ids: set[str] = set()
        self.written = 0
        self.spooled = 0
        self.dropped_by = dict.fromkeys(DROP_REASONS, 0)
        #: Entries in the dead-letter file (counted at start, so a restart still tells).
        self.dead_letters = 0
        self.bodies_dropped = 0
        self.failures = 0
        #: Times the supervisor started the writer's loop again after an error.
        self.restarts = 0
        #: The deepest the queue was when the writer took a batch (the benchmark reports it).
        self.peak_depth = 0

    # --- the request path (IOLoop thread) ---

    def start(self) -> None:
        self.dead_letters = _count_lines(self.dead_letter_path)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Traces lost, for every reason."""
        return sum(self.dropped_by.values())

    @property
    def running(self) -> bool:
        """The writer's thread is alive (readiness reports it)."""
        return self._thread.is_alive()

    @property
    def capture_stored_bytes(self) -> int:
        """Bytes of request bodies stored (read from any thread)."""
        return self._conversations.stored

    @property
    def capture_scanned_bytes(self) -> int:
        """Of those, the bytes redacted and scanned; the rest continued a conversation."""
        return self._conversations.scanned

    @property
    def held_bodies(self) -> int:
        """Bodies held until their org's keys are known in plaintext (read from any thread)."""
        return len(self._waiting)

    def wanted_keys(self) -> list[tuple[str, KeyContext]]:
        """The keys (ciphertext, context) whose plaintext held bodies wait for (any thread)."""
        with self._wanted_lock:
            return [key for keys in self._wanted.values() for key in keys]

    @property
    def spool_size(self) -> int:
        """Traces waiting in the spool for the database to come back."""
        # Read on the IOLoop thread: summing the dict's values runs in C, under the GIL.
        return self._spool_lines + sum(self._frozen.values())

    @property
    def held(self) -> int:
        """Traces in memory only: neither the database nor the spool took them (yet)."""
        return len(self._held)

    def submit(self, row: TraceRow, body: CapturedBody | None = None) -> None:
        """Queue a trace; never blocks."""
        if len(self._queue) >= self.queue_size:
            self.dropped_by["queue_full"] += 1
            log.error("trace queue full; trace %s dropped", row.get("id"))
            return
        if body is not None:
            if self._pending_body_bytes + self._waiting_bytes + body.size > self.body_budget:
                self.bodies_dropped += 1
                body = None
            else:
                self._pending_body_bytes += body.size
        # deque.append is atomic: the writer thread takes from the other end, no lock.
        self._queue.append(_Item(row, body))

    def stop(self, timeout: float = 60.0) -> None:
        """Write (or spool) everything queued so far, then end the thread."""
        self._stopping.set()
        self._thread.join(timeout)

    # --- the writer thread ---

    def _supervise(self) -> None:
        """Run the loop; if an error escapes it, count it, keep what it held, run it again."""
        self._take_own_spool()
        while True:
            try:
                self._run()
            except Exception as exc:
                self.restarts += 1
                log.exception("trace writer failed; starting it again")
                held, self._in_hand = self._in_hand, []
                self._conversations.forget()
                reset_connection(self.db)
                for item in held:
                    self._dead_letter(item, exc, reason="writer_error")
                if self._stopping.is_set():
                    # No second failure at stop: what is queued goes to the spool, for
                    # the next start to replay.
                    queued = [self._queue.popleft() for _ in range(len(self._queue))]
                    self._hold(self._spool(queued))
                    self._lose_held()
                    break
                self._stopping.wait(_RESTART_DELAY)
                continue
            break
        if not self.db.is_closed():
            self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
        log.info(
            "trace writer stopped: written=%d dropped=%d %s failures=%d restarts=%d peak_depth=%d",
            self.written,
            self.dropped,
            " ".join(f"{reason}={count}" for reason, count in self.dropped_by.items()),
            self.failures,
            self.restarts,
            self.peak_depth,
        )

    def _take_batch(self) -> list[_Item]:
        queued = self._queue
        depth = len(queued)
        if not depth:
            return []
        self.peak_depth = max(self.peak_depth, depth)
        popleft = queued.popleft
        self._in_hand = [popleft() for _ in range(min(depth, self.batch_size))]
        return self._in_hand

    def _run(self) -> None:
        last_replay = time.monotonic()
        while True:
            # Read before taking a batch: a stop asked for after the queue was found empty
            # still finds every trace queued before it.
            ending = self._stopping.is_set()
            if self._waiting and not self.spool_size and time.monotonic() >= self._release_at:
                self._release_at = time.monotonic() + _SPOOL_RETRY
                self._release_waiting()
            self._in_hand = []
            batch = self._take_batch()
            for item in batch:
                if isinstance(item.body, CapturedBody):
                    self._pending_body_bytes -= item.body.size
            if self._held:
                self._while_held(batch, ending)
                if ending and not batch:
                    self._finish_waiting()
                    return
                continue
            if not batch:
                if ending:
                    if self.spool_size:
                        self._replay_spool()  # a last try: what stays is replayed at start
                    self._finish_waiting()
                    return
                if self.spool_size and time.monotonic() - last_replay >= _SPOOL_RETRY:
                    last_replay = time.monotonic()
                    self._replay_spool()
                    continue
                close_own_connection_if_due(self.db, self.connection_age)
                self._stopping.wait(POLL_INTERVAL)
                continue
            if self.spool_size:
                last_replay = time.monotonic()
                if not self._replay_spool():
                    # The database is still away; keep the order: new traces go behind.
                    self._hold(self._spool(batch))
                    continue
            self._hold(self._write_or_spool(batch))
            self.connection_age.note_use(current_connection(self.db))
            close_own_connection_if_due(self.db, self.connection_age)

    def _while_held(self, batch: list[_Item], ending: bool) -> None:
        """Traces are held in memory: the batch waits behind them, and both the database
        and the spool are tried when the backoff says so (at once when stopping: what
        neither takes then is lost, and counted)."""
        self._hold(batch)
        self._in_hand = []
        if ending and not batch:
            self._flush_held()
            self._lose_held()
        elif ending or time.monotonic() >= self._held_retry_at:
            self._flush_held()
        else:
            self._stopping.wait(POLL_INTERVAL)

    def _flush_held(self) -> None:
        """Write what is held to the database, behind the spool to keep the order; when the
        database is away, to the spool. What neither takes is held again, tried later."""
        # They stay held while they are tried (readiness reads it); a failure that escapes
        # leaves them there for the restarted loop.
        held = list(self._held)
        if self.spool_size and not self._replay_spool():
            rest = self._spool(held)
        else:
            rest = self._write_or_spool(held)
        if rest:
            if len(rest) != len(held):  # some could not be spooled at all (counted)
                self._held = deque(rest)
                self._held_body_bytes = sum(_body_size(item.body) for item in rest)
            self._held_retry_at = time.monotonic() + self._held_delay
            self._held_delay = min(self._held_delay * 2, _HELD_RETRY_MAX)
        else:
            self._held.clear()
            self._held_body_bytes = 0
            self._held_delay = _HELD_RETRY_MIN
            log.info("%d traces held in memory are written or spooled", len(held))

    def _hold(self, items: list[_Item]) -> None:
        """Keep traces neither the database nor the spool took, within the queue's bounds:
        past the body budget the oldest bodies go first, past the queue size the oldest
        traces (counted)."""
        if items and not self._held:
            self._held_retry_at = time.monotonic() + self._held_delay
        for item in items:
            self._held.append(item)
            self._held_body_bytes += _body_size(item.body)
        while len(self._held) > self.queue_size:
            lost = self._held.popleft()
            self._held_body_bytes -= _body_size(lost.body)
            self.dropped_by["spool_error"] += 1
            log.error(
                "trace %s lost: neither the database nor the spool took it, and %d traces "
                "are held in memory already",
                lost.row.get("id"),
                self.queue_size,
            )
        for item in self._held:
            if self._held_body_bytes <= self.body_budget:
                break
            if item.body is not None:
                self._held_body_bytes -= _body_size(item.body)
                item.body = None
                self.bodies_dropped += 1
                item.row["anomalies"] = [
                    *(item.row.get("anomalies") or ()),
                    "body not kept: the spool could not be written",
                ]

    def _lose_held(self) -> None:
        """At stop: what is still held in memory is lost, and counted."""
        if not self._held:
            return
        self.dropped_by["spool_error"] += len(self._held)
        log.error(
            "%d traces lost at stop: neither the database nor the spool took them",
            len(self._held),
        )
        self._held.clear()
        self._held_body_bytes = 0

    def _write_or_spool(self, batch: list[_Item]) -> list[_Item]:
        """Write the batch, or spool it when the database is away; what neither took."""
        try:
            self._store(batch)
        except CONNECTION_ERRORS as exc:
            self.failures += 1
            reset_connection(self.db)
            log.warning("database unavailable (%s); spooling %d traces", exc, len(batch))
            return self._spool(batch)
        return []

    def _store(self, batch: list[_Item]) -> None:
        """Write a batch; when it fails for a reason other than the connection (which is
        raised), write its rows one by one and dead-letter each that fails alone."""
        try:
            self._write(batch)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - any row's error: the rows are tried alone
            self.failures += 1
            log.warning(
                "a batch of %d traces failed (%r); writing them one by one", len(batch), exc
            )
        else:
            self.written += len(batch)
            return
        # The failed transaction kept none of the blobs the bodies last seen refer to.
        self._conversations.forget()
        for item in batch:
            try:
                self._write([item])
            except CONNECTION_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - the row is kept aside, not lost
                self._conversations.forget()
                self._dead_letter(item, exc)
            else:
                self.written += 1

    def _write(self, batch: list[_Item]) -> None:
        prices = self._price_table()
        stores: dict[int, BlobStore] = {}
        rows: list[TraceRow] = []
        written_at = time.time()
        with self.db.atomic():
            for item in batch:
                row = mend_row(item.row)
                row["written_at"] = written_at
                row["cost_usd"] = prices.cost(
                    row["org_id"],
                    row["provider"],
                    row["response_model"] or row["upstream_model"],
                    row["input_tokens"],
                    row["output_tokens"],
                    row["cache_read_tokens"],
                    row["cache_write_tokens"],
                )
                if isinstance(item.body, RedactedBody):
                    self._store_redacted(row, item.body, stores)
                elif item.body is not None:
                    self._capture(row, item.body, stores)
                rows.append(row)
            for store in stores.values():
                store.flush()
            for start in range(0, len(rows), _INSERT_ROWS):
                self._insert(rows[start : start + _INSERT_ROWS])
        for store in stores.values():
            store.committed()

    def _insert(self, rows: list[TraceRow]) -> None:
        """``INSERT`` the rows, ignoring ids already stored, with one statement built once."""
        sql = self._inserts.get(len(rows))
        if sql is None:
            # The ORM writes the statement (dialect, quoting, conflict clause) once per size.
            query = Trace.insert_many([_SAMPLE_ROW] * len(rows), fields=Trace._meta.sorted_fields)
            sql = query.on_conflict_ignore().sql()[0]
            self._inserts[len(rows)] = sql
        params: list[Any] = []
        extend = params.extend
        for row in rows:
            extend(
                [
                    convert(row[name]) if name in row else default()
                    for name, convert, default in _COLUMNS
                ]
            )
        self.db.execute_sql(sql, params)

    def settings_changed(self, org_id: int) -> None:
        """An org's policy or keys changed: its capture settings are read again before its
        next trace is written (called from the IOLoop; a set is safe across threads)."""
        self._stale_settings.add(org_id)

    def _capture_settings(self, org_id: int) -> CaptureSettings:
        settings = self._settings.get(org_id)
        stale = org_id in self._stale_settings
        if stale:
            self._stale_settings.discard(org_id)
        if stale or settings is None or time.monotonic() - settings.loaded_at > self.settings_ttl:
            settings = load_capture_settings(org_id, self.keys, settings)
            self._settings[org_id] = settings
        return self._known(org_id, settings)

    def _known(self, org_id: int, settings: CaptureSettings) -> CaptureSettings:
        """``settings`` with the plaintexts the gateway has decrypted since; the keys still
        unknown are left for the gateway to decrypt."""
        if settings.unknown:
            settings.learn(self.keys)
        wanted = [(ref[1], context) for ref, context in settings.unknown.items()]
        if wanted or org_id in self._wanted:
            with self._wanted_lock:
                if wanted:
                    self._wanted[org_id] = wanted
                else:
                    del self._wanted[org_id]
        return settings

    def _hold_body(self, row: TraceRow, body: CapturedBody, settings: CaptureSettings) -> None:
        """Keep the body in memory, redacted with the keys known, until all are known."""
        trace_id = str(row.get("id"))
        if trace_id in self._waiting:
            return  # a batch written again row by row meets its bodies twice
        redactor = settings.redactor
        answer = None if body.response is None else redactor.redact(orjson.dumps(body.response))
        held = _WaitingBody(row["org_id"], RedactedBody(redactor.redact(body.request), answer))
        self._waiting[trace_id] = held
        self._waiting_bytes += held.size

    def _capture(self, row: TraceRow, body: CapturedBody, stores: dict[int, BlobStore]) -> None:
        org_id = row["org_id"]
        settings = self._capture_settings(org_id)
        if not settings.capture_bodies:
            return
        if settings.unknown:
            self._hold_body(row, body, settings)
            return
        store = stores.setdefault(org_id, BlobStore(org_id))
        redactor = settings.redactor
        conversation = (org_id, row.get("user_id"), row.get("session_id") or "")
        root = self._conversations.store(conversation, redactor, body.request, store)
        row["request_blob"] = root.hex()
        if body.response is not None:
            self._store_answer(row, redactor.redact(orjson.dumps(body.response)), store)

    def _store_redacted(
        self, row: TraceRow, body: RedactedBody, stores: dict[int, BlobStore]
    ) -> None:
        """Store a spooled body: redacted already, cut and hashed as the direct path does."""
        store = stores.setdefault(row["org_id"], BlobStore(row["org_id"]))
        row["request_blob"] = store_request(body.request, store).hex()
        if body.response is not None:
            self._store_answer(row, body.response, store)

    @staticmethod
    def _store_answer(row: TraceRow, answer: bytes, store: BlobStore) -> None:
        digest = blob_digest(answer)
        if not store.has(digest):
            store.put(digest, answer)
        row["response_blob"] = digest.hex()

    def _price_table(self) -> PriceTable:
        # Prices are org settings now (an org's admins change them): the same TTL.
        if self._prices is None or time.monotonic() - self._prices_at > self.settings_ttl:
            try:
                self._prices = PriceTable.load()
            except CONNECTION_ERRORS:
                reset_connection(self.db)
                if self._prices is None:
                    raise
            self._prices_at = time.monotonic()
        return self._prices

    # --- bodies held until their org's keys are known ---

    def _release_waiting(self) -> None:
        """Store the held bodies of every org whose keys are all known now, each onto its
        trace; the database being away leaves them held for the next try."""
        by_org: dict[int, list[str]] = {}
        for trace_id, held in self._waiting.items():
            by_org.setdefault(held.org_id, []).append(trace_id)
        for org_id, trace_ids in by_org.items():
            try:
                settings = self._capture_settings(org_id)
                if settings.unknown:
                    continue
                if settings.capture_bodies:
                    self._store_waiting(org_id, trace_ids, settings)
                else:
                    self._unwait(trace_ids, stored=False)
            except CONNECTION_ERRORS:
                reset_connection(self.db)
                return
            except Exception:  # bodies that cannot be stored must not fail the loop again
                log.exception(
                    "%d held bodies of org %d could not be stored", len(trace_ids), org_id
                )
                self._unwait(trace_ids, stored=False)

    def _store_waiting(self, org_id: int, trace_ids: list[str], settings: CaptureSettings) -> None:
        """Redact the held bodies with every key of the org, store them, point their
        traces at them (a trace not in the database, dead-lettered, gets none)."""
        redact = settings.redactor.redact
        store = BlobStore(org_id)
        blobs: dict[str, TraceRow] = {}
        for trace_id in trace_ids:
            body = self._waiting[trace_id].body
            row: TraceRow = {"request_blob": store_request(redact(body.request), store).hex()}
            row["response_blob"] = ""
            if body.response is not None:
                self._store_answer(row, redact(body.response), store)
            blobs[trace_id] = row
        with self.db.atomic():
            store.flush()
            missing = [
                trace_id
                for trace_id, row in blobs.items()
                if not Trace.update(**row).where(Trace.id == trace_id).execute()
            ]
        store.committed()
        self._unwait(missing, stored=False)
        self._unwait(list(blobs.keys() - set(missing)), stored=True)

    def _unwait(self, trace_ids: list[str], *, stored: bool) -> None:
        for trace_id in trace_ids:
            held = self._waiting.pop(trace_id)
            self._waiting_bytes -= held.size
            if not stored:
                self.bodies_dropped += 1

    def _finish_waiting(self) -> None:
        """At stop: store the waiting bodies whose keys are known by now, drop the rest."""
        if self._waiting and not self.spool_size:
            self._release_waiting()
        self._drop_waiting()

    def _drop_waiting(self) -> None:
        """At stop: bodies still waiting for a key are not kept (their traces are)."""
        if self._waiting:
            log.warning(
                "%d held bodies dropped at stop: a key of their org was never known",
                len(self._waiting),
            )
            self._unwait(list(self._waiting), stored=False)

    # --- the spool and the dead-letter file ---

    def _redacted(self, item: _Item) -> RedactedBody | None:
        """The body as the database would store it: redacted, or none for an org that does
        not capture bodies (or whose settings cannot be read now: then none is kept)."""
        body = item.body
        if body is None or isinstance(body, RedactedBody):
            return body
        org_id: int = item.row.get("org_id", 0)
        # In an outage the settings last read are used, however old: they are what the
        # direct path used a moment ago.
        settings = self._settings.get(org_id)
        if settings is not None:
            settings = self._known(org_id, settings)
        else:
            try:
                settings = self._capture_settings(org_id)
            except Exception as exc:  # noqa: BLE001 - no settings: the body is not kept
                if isinstance(exc, CONNECTION_ERRORS):
                    reset_connection(self.db)
                self.bodies_dropped += 1
                item.row["anomalies"] = [
                    *(item.row.get("anomalies") or ()),
                    "body not kept: capture settings unreadable",
                ]
                item.body = None  # once: a held trace may be spooled again
                return None
        if not settings.capture_bodies:
            return None
        if settings.unknown:
            # Never into a file with a key not redacted: held, stored once it is known.
            self._hold_body(item.row, body, settings)
            return None
        redactor = settings.redactor
        answer = None if body.response is None else redactor.redact(orjson.dumps(body.response))
        return RedactedBody(redactor.redact(body.request), answer)

    def _entry(self, item: _Item) -> dict[str, Any]:
        """A spool (and dead-letter) line of a trace: its row and its redacted body."""
        entry: dict[str, Any] = {"row": item.row}
        body = self._redacted(item)
        if body is not None:
            entry["redacted_request"] = base64.b64encode(body.request).decode()
            if body.response is not None:
                entry["redacted_response"] = base64.b64encode(body.response).decode()
        return entry

    def _spool(self, batch: list[_Item]) -> list[_Item]:
        """Append the batch to the spool; what it could not take, for the caller to hold
        (a trace JSON cannot hold is lost, and counted)."""
        lines = []
        kept: list[_Item] = []
        for item in batch:
            try:
                lines.append(orjson.dumps(self._entry(item)) + b"\n")
                kept.append(item)
            except TypeError as exc:  # a value JSON cannot hold: nowhere to keep it
                self.dropped_by["spool_error"] += 1
                log.error("trace %s lost: it cannot be spooled (%s)", item.row.get("id"), exc)
        if not lines:
            return []
        try:
            _append(self.spool_path, lines)
        except OSError as exc:
            self.spool_errors += 1
            if self.spool_error is None:
                log.error(
                    "the spool could not be written (%r); holding %d traces in memory and "
                    "trying the database and the spool again",
                    exc,
                    len(lines),
                )
            self.spool_error = f"{type(exc).__name__}: {exc.strerror or exc}"
            return kept
        if self.spool_error is not None:
            log.info("the spool is written again")
            self.spool_error = None
        self._spool_lines += len(lines)
        self.spooled += len(lines)
        return []

    def _dead_letter(self, item: _Item, exc: BaseException, reason: str = "dead_letter") -> None:
        """Keep a row the database refused even alone in the dead-letter file, and count it."""
        trace_id = str(item.row.get("id"))
        if trace_id in self._dead_ids:
            return
        self._dead_ids.add(trace_id)
        self.dropped_by[reason] += 1
        log.error(
            "trace %s not written (%s: %s); kept in %s",
            trace_id,
            type(exc).__name__,
            exc,
            self.dead_letter_path,
        )
        try:
            entry = {**self._entry(item), "error": type(exc).__name__}
            _append(self.dead_letter_path, [orjson.dumps(entry) + b"\n"])
        except (OSError, TypeError) as write_error:
            log.error("trace %s lost: the dead-letter file failed (%r)", trace_id, write_error)
            return
        self.dead_letters += 1

    def _dead_letter_line(self, line: bytes, exc: Exception) -> None:
        """A spool line that does not read (a write torn by a crash): its content cannot be
        redacted, so only that it was there is kept."""
        digest = blob_digest(line).hex()
        if digest in self._dead_ids:
            return
        self._dead_ids.add(digest)
        self.dropped_by["dead_letter"] += 1
        log.error("an unreadable spool line (%d bytes) was dropped: %r", len(line), exc)
        entry = {"error": type(exc).__name__, "unreadable_spool_line_bytes": len(line)}
        try:
            _append(self.dead_letter_path, [orjson.dumps(entry) + b"\n"])
        except OSError as write_error:
            log.error("the dead-letter file failed (%r)", write_error)
            return
        self.dead_letters += 1

    def _unspooled(self, line: bytes) -> _Item | None:
        """A spool line as a queued trace; None (dead-lettered) when it does not read.

        Lines spooled before bodies were redacted first hold ``request`` (base64) and
        ``response`` (JSON): they are redacted on the way in, as queued traces are."""
        try:
            entry = orjson.loads(line)
            row = entry["row"]
            if not isinstance(row, dict):
                raise TypeError("the row is not an object")
            body: CapturedBody | RedactedBody | None = None
            if "redacted_request" in entry:
                answer = entry.get("redacted_response")
                body = RedactedBody(
                    base64.b64decode(entry["redacted_request"]),
                    None if answer is None else base64.b64decode(answer),
                )
            elif "request" in entry:
                body = CapturedBody(base64.b64decode(entry["request"]), entry.get("response"))
        except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
            self._dead_letter_line(line, exc)
            return None
        return _Item(row, body)

    def _replay_spool(self) -> bool:
        """Write the spool to the database in order; True once it is empty.

        Files renamed for replay (this worker's, and those adopted) go first, oldest
        first, each removed once written. Only then is the file appended to renamed and
        replayed, so what is spooled meanwhile goes to a fresh one, and an outage leaves
        one renamed file, not one per try."""
        self._adopt()
        if not self._replay_frozen():
            return False
        self._freeze()
        return self._replay_frozen()

    def _replay_frozen(self) -> bool:
        replayed = 0
        for path in sorted(self._frozen, key=_replay_order):
            try:
                self._replay_file(path)
            except CONNECTION_ERRORS:
                reset_connection(self.db)
                return False
            # Replay is idempotent by trace id, so a crash before this unlink only repeats work.
            path.unlink(missing_ok=True)
            replayed += self._frozen.pop(path)
        if replayed:
            log.info("replayed %d spooled traces", replayed)
        return True

    def _replay_file(self, path: Path) -> None:
        try:
            with path.open("rb") as fh:
                batch: list[_Item] = []
                for line in fh:
                    if not line.strip():
                        continue
                    item = self._unspooled(line)
                    if item is None:
                        continue
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        self._store(batch)
                        batch = []
                if batch:
                    self._store(batch)
        except FileNotFoundError:
            pass

    def _freeze(self) -> None:
        """Rename the spool being appended to for replay (later traces go to a new file)."""
        frozen = self.spool_dir / f"{self.spool_path.name}.replay-{time.time_ns()}"
        try:
            self.spool_path.rename(frozen)
        except FileNotFoundError:
            self._spool_lines = 0
            return
        self._frozen[frozen] = self._spool_lines
        self._spool_lines = 0

    # --- spools per worker: this worker's lock, and adopting what others left ---

    def _take_own_spool(self) -> None:
        """Lock a spool of this writer's own, then take the files it left, and those of
        workers that do not run.

        The spool is the worker index's, once a worker adopting it has let go. When a
        process that runs holds it past that wait (another ``tvgate serve`` on the same
        data directory has a worker of this index), the first free slot after it is used
        instead (index + 1000, + 2000, …): two gateways never share a spool, and neither
        waits on the other."""
        for slot in range(self.worker, self.worker + _SLOT_STRIDE * _SLOTS, _SLOT_STRIDE):
            try:
                self._lock_fd = _lock_within(self.spool_dir, str(slot), _LOCK_WAIT)
            except BlockingIOError:
                continue
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
                self._use_slot(slot)
            break
        else:
            log.error("no spool slot is free in %s: nothing can be spooled", self.spool_dir)
            return
        self._spool_lines = _count_lines(self.spool_path)
        for path in self.spool_dir.glob(f"{self.spool_path.name}.replay-*"):
            self._frozen[path] = _count_lines(path)
        self._adopt()

    def _use_slot(self, slot: int) -> None:
        self.slot = slot
        self.spool_path = self.spool_dir / f"traces.spool.{slot}"
        self.dead_letter_path = self.spool_dir / f"traces.deadletter.{slot}"
        self.dead_letters = _count_lines(self.dead_letter_path)

    def _adopt(self) -> None:
        """Take the spool files of every worker that does not run (its lock is free) into
        this worker's replay; a spool from before spools were per worker too. Not while
        stopping: what a worker stopping beside this one leaves is for the next start."""
        if self._lock_fd is None or self._stopping.is_set():
            return
        owners: dict[str, list[Path]] = {}
        for path in self.spool_dir.glob("traces.spool*"):
            match = _SPOOL_NAME.match(path.name)
            if match is None or match[1] == str(self.slot):
                continue
            owners.setdefault(match[1] or "", []).append(path)
        for owner, paths in owners.items():
            try:
                fd = _lock(self.spool_dir, owner)
            except BlockingIOError:
                continue  # that worker runs: its spool is its own
            except OSError as exc:
                log.error("the spool of worker %s could not be adopted (%r)", owner, exc)
                continue
            try:
                for path in sorted(paths, key=_replay_order):
                    adopted = self.spool_dir / f"{self.spool_path.name}.replay-{time.time_ns()}"
                    lines = _count_lines(path)
                    path.rename(adopted)
                    self._frozen[adopted] = lines
                    log.info("adopted %d spooled traces of worker %s", lines, owner or "-")
            except OSError as exc:
                log.error("the spool of worker %s could not be adopted (%r)", owner, exc)
            finally:
                os.close(fd)


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
    """An exclusive ``flock`` on a worker's spool lock (``traces.lock`` for the spool from
    before spools were per worker): its descriptor, which holds it until closed. The kernel
    lets go of it when the process dies, however it dies."""
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


def _body_size(body: CapturedBody | RedactedBody | None) -> int:
    if body is None:
        return 0
    if isinstance(body, CapturedBody):
        return body.size
    return len(body.request) + len(body.response or b"")


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _append(path: Path, lines: list[bytes]) -> None:
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
