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
nothing. Bodies are held in memory only up to ``body_budget`` bytes while
queued; past that a trace is recorded without its body rather than not at all.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import peewee

from tvgate.db import CONNECTION_ERRORS, reset_connection
from tvgate.keyring import Keyring
from tvgate.models import Trace
from tvgate.traces.content import blob_digest
from tvgate.traces.conversations import Conversations
from tvgate.traces.pricing import PriceTable
from tvgate.traces.store import BlobStore, CaptureSettings, load_capture_settings

log = logging.getLogger("tvgate.traces")

TraceRow = dict[str, Any]
#: How often the writer looks for queued traces (it is woken at once to stop).
POLL_INTERVAL = 0.05
#: While the spool is not empty, how often a replay is tried when no trace comes.
_SPOOL_RETRY = 1.0
#: Rows per INSERT statement.
_INSERT_ROWS = 100


@dataclass(slots=True)
class CapturedBody:
    """What a call said and answered, as captured on the request path (not yet redacted)."""

    request: bytes
    response: dict[str, Any] | None

    @property
    def size(self) -> int:
        return len(self.request)


def _column(field: peewee.Field) -> tuple[str, Any, Any]:
    default = field.default
    return (field.name, field.db_value, default if callable(default) else lambda: default)


#: Every column of a trace, in the model's order: (name, to the database's type, default).
_COLUMNS: tuple[tuple[str, Any, Any], ...] = tuple(
    _column(field) for field in Trace._meta.sorted_fields
)
#: A row of every column, in that order, from which the INSERT of each size is built.
_SAMPLE_ROW = (None,) * len(_COLUMNS)


@dataclass(slots=True)
class _Item:
    row: TraceRow
    body: CapturedBody | None


class TraceWriter:
    def __init__(
        self,
        db: peewee.Database,
        keyring: Keyring,
        *,
        queue_size: int,
        batch_size: int,
        spool_path: Path,
        settings_ttl: float,
        body_budget: int = 256 * 1024 * 1024,
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.batch_size = batch_size
        self.spool_path = spool_path
        self.body_budget = body_budget
        self.settings_ttl = settings_ttl
        self.queue_size = queue_size
        self._queue: deque[_Item] = deque()
        self._stopping = threading.Event()
        self._inserts: dict[int, str] = {}
        self._conversations = Conversations()
        self._thread = threading.Thread(target=self._run, name="tvgate-trace-writer", daemon=True)
        self._pending_body_bytes = 0
        self._settings: dict[int, CaptureSettings] = {}
        self._prices: PriceTable | None = None
        self._prices_at = 0.0
        self._spool_lines = 0
        self.written = 0
        self.spooled = 0
        self.dropped = 0
        self.bodies_dropped = 0
        self.failures = 0
        #: The deepest the queue was when the writer took a batch (the benchmark reports it).
        self.peak_depth = 0

    # --- the request path (IOLoop thread) ---

    def start(self) -> None:
        if self.spool_path.exists():
            with self.spool_path.open("rb") as fh:
                self._spool_lines = sum(1 for _ in fh)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def capture_stored_bytes(self) -> int:
        """Bytes of request bodies stored (read from any thread)."""
        return self._conversations.stored

    @property
    def capture_scanned_bytes(self) -> int:
        """Of those, the bytes redacted and scanned; the rest continued a conversation."""
        return self._conversations.scanned

    @property
    def spool_size(self) -> int:
        """Traces waiting in the spool for the database to come back."""
        return self._spool_lines

    def submit(self, row: TraceRow, body: CapturedBody | None = None) -> None:
        """Queue a trace; never blocks."""
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            log.error("trace queue full; trace %s dropped", row.get("id"))
            return
        if body is not None:
            if self._pending_body_bytes + body.size > self.body_budget:
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

    def _take_batch(self) -> list[_Item]:
        queued = self._queue
        depth = len(queued)
        if not depth:
            return []
        self.peak_depth = max(self.peak_depth, depth)
        popleft = queued.popleft
        return [popleft() for _ in range(min(depth, self.batch_size))]

    def _run(self) -> None:
        last_replay = time.monotonic()
        while True:
            # Read before taking a batch: a stop asked for after the queue was found empty
            # still finds every trace queued before it.
            ending = self._stopping.is_set()
            batch = self._take_batch()
            if not batch:
                if ending:
                    if self._spool_lines:
                        self._replay_spool()  # a last try: what stays is replayed at start
                    break
                if self._spool_lines and time.monotonic() - last_replay >= _SPOOL_RETRY:
                    last_replay = time.monotonic()
                    self._replay_spool()
                    continue
                self._stopping.wait(POLL_INTERVAL)
                continue
            for item in batch:
                if item.body is not None:
                    self._pending_body_bytes -= item.body.size
            if self._spool_lines:
                last_replay = time.monotonic()
                if not self._replay_spool():
                    # The database is still away; keep the order: new traces go behind.
                    self._spool(batch)
                    continue
            self._write_or_spool(batch)
        if not self.db.is_closed():
            self.db.close()
        log.info(
            "trace writer stopped: written=%d dropped=%d failures=%d peak_depth=%d",
            self.written,
            self.dropped,
            self.failures,
            self.peak_depth,
        )

    def _write_or_spool(self, batch: list[_Item]) -> None:
        try:
            self._write(batch)
            self.written += len(batch)
        except CONNECTION_ERRORS as exc:
            self.failures += 1
            reset_connection(self.db)
            log.warning("database unavailable (%s); spooling %d traces", exc, len(batch))
            self._spool(batch)

    def _write(self, batch: list[_Item]) -> None:
        prices = self._price_table()
        stores: dict[int, BlobStore] = {}
        rows: list[TraceRow] = []
        written_at = time.time()
        with self.db.atomic():
            for item in batch:
                row = dict(item.row)
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
                if item.body is not None:
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

    def _capture(self, row: TraceRow, body: CapturedBody, stores: dict[int, BlobStore]) -> None:
        org_id = row["org_id"]
        settings = self._settings.get(org_id)
        if settings is None or time.monotonic() - settings.loaded_at > self.settings_ttl:
            settings = load_capture_settings(org_id, self.keyring)
            self._settings[org_id] = settings
        if not settings.capture_bodies:
            return
        store = stores.setdefault(org_id, BlobStore(org_id))
        redactor = settings.redactor
        conversation = (org_id, row.get("user_id"), row.get("session_id") or "")
        root = self._conversations.store(conversation, redactor, body.request, store)
        row["request_blob"] = root.hex()
        if body.response is not None:
            answer = redactor.redact(orjson.dumps(body.response))
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

    # --- the spool ---

    def _spool(self, batch: list[_Item]) -> None:
        if not batch:
            return
        lines = []
        for item in batch:
            entry: dict[str, Any] = {"row": item.row}
            if item.body is not None:
                entry["request"] = base64.b64encode(item.body.request).decode()
                entry["response"] = item.body.response
            lines.append(orjson.dumps(entry) + b"\n")
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.spool_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._spool_lines += len(lines)
        self.spooled += len(lines)

    def _replay_spool(self) -> bool:
        """Write the spool to the database in order; True once it is empty."""
        try:
            with self.spool_path.open("rb") as fh:
                batch: list[_Item] = []
                for line in fh:
                    if not line.strip():
                        continue
                    entry = orjson.loads(line)
                    body = None
                    if "request" in entry:
                        body = CapturedBody(
                            base64.b64decode(entry["request"]), entry.get("response")
                        )
                    batch.append(_Item(entry["row"], body))
                    if len(batch) >= self.batch_size:
                        self._write(batch)
                        batch = []
                if batch:
                    self._write(batch)
        except CONNECTION_ERRORS:
            reset_connection(self.db)
            return False
        except FileNotFoundError:
            pass
        replayed = self._spool_lines
        # Replay is idempotent by trace id, so a crash before this unlink only repeats work.
        self.spool_path.unlink(missing_ok=True)
        self._spool_lines = 0
        self.written += replayed
        log.info("replayed %d spooled traces", replayed)
        return True
