"""The trace writer: a bounded queue drained in batches by one thread.

The request path only appends to the queue (never blocks, never touches the
database). One thread takes what is queued, up to ``batch_size`` rows at a
time, and inserts them in one transaction. Inserts are idempotent by trace id,
so a batch that is retried after a failure never duplicates a trace. While the
database is unreachable the writer keeps the failed batch and retries with
backoff; ``stop()`` drains everything that was queued before it returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import peewee

from tvgate.db import CONNECTION_ERRORS, reset_connection
from tvgate.models import Trace

log = logging.getLogger("tvgate.traces")

TraceRow = dict[str, Any]


class TraceWriter:
    def __init__(self, db: peewee.Database, queue_size: int, batch_size: int) -> None:
        self.db = db
        self.batch_size = batch_size
        self._queue: queue.Queue[TraceRow | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="tvgate-trace-writer", daemon=True)
        self._stopping = threading.Event()
        self.written = 0
        self.dropped = 0
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, row: TraceRow) -> None:
        """Queue a trace; called on the IOLoop, so it must never block."""
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1
            log.error("trace queue full; trace %s dropped", row.get("id"))

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything queued so far, then end the thread."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _take_batch(self) -> tuple[list[TraceRow], bool]:
        first = self._queue.get()
        if first is None:
            batch: list[TraceRow] = []
            ended = True
        else:
            batch, ended = [first], False
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended = True
                break
            batch.append(item)
        return batch, ended

    def _run(self) -> None:
        ended = False
        while not ended:
            batch, ended = self._take_batch()
            if batch:
                self._write_with_retry(batch)
        # Anything submitted after the stop marker still gets written.
        rest: list[TraceRow] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                rest.append(item)
        if rest:
            self._write_with_retry(rest)
        if not self.db.is_closed():
            self.db.close()

    def _write_with_retry(self, batch: list[TraceRow]) -> None:
        delay = 0.1
        while True:
            try:
                self._write(batch)
                self.written += len(batch)
                return
            except CONNECTION_ERRORS as exc:
                self.failures += 1
                reset_connection(self.db)
                log.warning("trace batch of %d not written (%s); retrying", len(batch), exc)
                if self._stopping.is_set() and delay > 5:
                    log.error("database unreachable at stop; %d traces not written", len(batch))
                    self.dropped += len(batch)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _write(self, batch: list[TraceRow]) -> None:
        with self.db.atomic():
            for chunk in peewee.chunked(batch, 100):
                Trace.insert_many(chunk).on_conflict_ignore().execute()
