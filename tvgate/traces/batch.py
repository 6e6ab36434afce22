"""One batch of traces into the database: bodies redacted and stored, rows priced and inserted.

:meth:`BatchWriter.store` writes a batch in one transaction: each captured body is
redacted with its org's settings and stored content-addressed (a conversation's
unchanged prefix once), each row mended (:func:`~tvgate.traces.rows.mend_row`) and
priced, and every row goes in through one prepared multi-row ``INSERT`` per batch
size, built once, not by the ORM per batch. Inserts are idempotent by trace id.

A batch that fails for any reason but the connection (which is raised, for the
caller to spool) is written again row by row, and a row that still fails goes to the
dead-letter file (redacted like the spool, 0600) and is counted.

Redaction never waits on the keyring: an org's provider keys are redacted with the
plaintexts ``keys`` holds (the gateway's decrypted-key cache, or what it sent the
writer). While a key of the org is not known, its bodies go to the holding store,
redacted with what is known, and :meth:`wanted_keys` names the keys for the gateway to
decrypt (off the writer); :meth:`release_bodies` stores them once all are known.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import peewee

from tvgate.db import CONNECTION_ERRORS, reset_connection
from tvgate.keyring import KeyContext
from tvgate.models import Trace
from tvgate.traces.content import blob_digest, store_request
from tvgate.traces.conversations import Conversations
from tvgate.traces.holding import HoldingStore
from tvgate.traces.pricing import PriceTable
from tvgate.traces.rows import (
    COLUMNS,
    CapturedBody,
    Item,
    RedactedBody,
    TraceRow,
    WriterStats,
    mend_row,
    spool_entry,
)
from tvgate.traces.spool import Spool, append
from tvgate.traces.store import (
    BlobStore,
    CaptureSettings,
    KnownPlaintexts,
    insert_chunks,
    key_refs,
    load_capture_settings,
)

log = logging.getLogger("tvgate.traces")

#: Rows per INSERT statement at most (a power of two: see ``insert_chunks``).
_INSERT_ROWS = 64
#: A row of every column, in the model's order, from which the INSERT of each size is built.
_SAMPLE_ROW = (None,) * len(COLUMNS)


class BatchWriter:
    def __init__(
        self,
        db: peewee.Database,
        keys: KnownPlaintexts,
        holding: HoldingStore,
        spool: Spool,
        stats: WriterStats,
        settings_ttl: float,
    ) -> None:
        self.db = db
        self.keys = keys
        self.holding = holding
        self.spool = spool
        self.stats = stats
        self.settings_ttl = settings_ttl
        self.conversations = Conversations()
        self._inserts: dict[int, str] = {}
        self._settings: dict[int, CaptureSettings] = {}
        #: The keys each org's bodies wait for, for the gateway to decrypt (another thread).
        self._wanted: dict[int, list[tuple[str, KeyContext]]] = {}
        self._wanted_lock = threading.Lock()
        self._prices: PriceTable | None = None
        self._prices_at = 0.0
        #: Orgs whose keys were checked against their settings in the batch being written.
        self._checked: set[int] = set()
        #: Orgs whose capture settings changed since they were read (``settings_changed``).
        self._stale: set[int] = set()
        #: Ids dead-lettered by this process: a replay cut short tries them again.
        self._dead_ids: set[str] = set()
        #: Handed every batch of rows once committed, priced and mended (the OTLP spans).
        self.on_written: Callable[[list[TraceRow]], None] | None = None

    def wanted_keys(self) -> list[tuple[str, KeyContext]]:
        """The keys (ciphertext, context) whose plaintext held bodies wait for (any thread)."""
        with self._wanted_lock:
            return [key for keys in self._wanted.values() for key in keys]

    # --- a batch into the database ---

    def store(self, batch: list[Item]) -> None:
        """Write a batch; when it fails for a reason other than the connection (which is
        raised), write its rows one by one and dead-letter each that fails alone."""
        try:
            self._write(batch)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - any row's error: the rows are tried alone
            self.stats.failures += 1
            log.warning(
                "a batch of %d traces failed (%r); writing them one by one", len(batch), exc
            )
        else:
            self.stats.written += len(batch)
            return
        # The failed transaction kept none of the blobs the bodies last seen refer to.
        self.conversations.forget()
        for item in batch:
            try:
                self._write([item])
            except CONNECTION_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - the row is kept aside, not lost
                self.conversations.forget()
                self.dead_letter(item, exc)
            else:
                self.stats.written += 1

    def _write(self, batch: list[Item]) -> None:
        prices = self._price_table()
        stores: dict[int, BlobStore] = {}
        rows: list[TraceRow] = []
        written_at = time.time()
        self._checked.clear()
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
            for start, end in insert_chunks(len(rows), _INSERT_ROWS):
                self._insert(rows[start:end])
        for store in stores.values():
            store.committed()
        if self.on_written is not None:
            self.on_written(rows)

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
                    for name, convert, default in COLUMNS
                ]
            )
        self.db.execute_sql(sql, params)

    def _capture(self, row: TraceRow, body: CapturedBody, stores: dict[int, BlobStore]) -> None:
        org_id = row["org_id"]
        settings = self._capture_settings(org_id)
        if settings.span_content and not settings.unknown and self.on_written is not None:
            # Redacted with every key of the org, for the span only (not a column).
            redact = settings.redactor.redact
            answer = None if body.response is None else redact(orjson.dumps(body.response))
            row["span_content"] = (redact(body.request), answer)
        if not settings.capture_bodies:
            return
        if settings.unknown:
            self._hold_body(row, body, settings)
            return
        store = stores.setdefault(org_id, BlobStore(org_id))
        redactor = settings.redactor
        conversation = (org_id, row.get("user_id"), row.get("session_id") or "")
        root = self.conversations.store(conversation, redactor, body.request, store)
        row["request_blob"] = root.hex()
        if body.response is not None:
            _store_answer(row, redactor.redact(orjson.dumps(body.response)), store)

    def _store_redacted(
        self, row: TraceRow, body: RedactedBody, stores: dict[int, BlobStore]
    ) -> None:
        """Store a spooled body: redacted already, cut and hashed as the direct path does."""
        store = stores.setdefault(row["org_id"], BlobStore(row["org_id"]))
        row["request_blob"] = store_request(body.request, store).hex()
        if body.response is not None:
            _store_answer(row, body.response, store)

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

    # --- capture settings, and the keys they wait for ---

    def settings_changed(self, org_id: int) -> None:
        """Read the org's capture settings again before its next trace (any thread: adding
        to a set is atomic)."""
        self._stale.add(org_id)

    def _capture_settings(self, org_id: int) -> CaptureSettings:
        settings = self._settings.get(org_id)
        stale = org_id in self._stale
        if stale:
            self._stale.discard(org_id)
        if (
            stale
            or settings is None
            or time.monotonic() - settings.loaded_at > self.settings_ttl
            or self._keys_changed(org_id, settings)
        ):
            settings = load_capture_settings(org_id, self.keys, settings)
            self._settings[org_id] = settings
        return self._known(org_id, settings)

    def _keys_changed(self, org_id: int, settings: CaptureSettings) -> bool:
        """The org's keys are not those ``settings`` were read with: a key added since the
        settings were read would otherwise be stored unredacted until they expire. Looked
        at once per batch (in this process, off the serving one's GIL)."""
        if org_id in self._checked:
            return False
        self._checked.add(org_id)
        return key_refs(org_id) != settings.refs

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
        redactor = settings.redactor
        answer = None if body.response is None else redactor.redact(orjson.dumps(body.response))
        redacted = RedactedBody(redactor.redact(body.request), answer)
        self.holding.hold_body(str(row.get("id")), row["org_id"], redacted)

    # --- held bodies, stored once their org's keys are known ---

    def release_bodies(self) -> None:
        """Store the held bodies of every org whose keys are all known now, each onto its
        trace; the database being away leaves them held for the next try."""
        for org_id, trace_ids in self.holding.bodies_by_org().items():
            try:
                settings = self._capture_settings(org_id)
                if settings.unknown:
                    continue
                if settings.capture_bodies:
                    self._store_held(org_id, trace_ids, settings)
                else:
                    self.holding.release(trace_ids, stored=False)
            except CONNECTION_ERRORS:
                reset_connection(self.db)
                return
            except Exception:  # bodies that cannot be stored must not fail the loop again
                log.exception(
                    "%d held bodies of org %d could not be stored", len(trace_ids), org_id
                )
                self.holding.release(trace_ids, stored=False)

    def _store_held(self, org_id: int, trace_ids: list[str], settings: CaptureSettings) -> None:
        """Redact the held bodies with every key of the org, store them, point their
        traces at them (a trace not in the database, dead-lettered, gets none)."""
        redact = settings.redactor.redact
        store = BlobStore(org_id)
        blobs: dict[str, TraceRow] = {}
        for trace_id in trace_ids:
            body = self.holding.bodies[trace_id][1]
            row: TraceRow = {"request_blob": store_request(redact(body.request), store).hex()}
            row["response_blob"] = ""
            if body.response is not None:
                _store_answer(row, redact(body.response), store)
            blobs[trace_id] = row
        with self.db.atomic():
            store.flush()
            missing = [
                trace_id
                for trace_id, row in blobs.items()
                if not Trace.update(**row).where(Trace.id == trace_id).execute()
            ]
        store.committed()
        self.holding.release(missing, stored=False)
        self.holding.release(list(blobs.keys() - set(missing)), stored=True)

    # --- the forms kept on disk: the spool's and the dead-letter file's ---

    def redacted(self, item: Item) -> RedactedBody | None:
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
                self.stats.bodies_dropped += 1
                item.note("body not kept: capture settings unreadable")
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

    def spool_line(self, item: Item) -> bytes:
        """A trace as a spool line (raises TypeError for a value JSON cannot hold)."""
        return orjson.dumps(spool_entry(item.row, self.redacted(item))) + b"\n"

    def dead_letter(self, item: Item, exc: BaseException, reason: str = "dead_letter") -> None:
        """Keep a row the database refused even alone in the dead-letter file, and count it."""
        trace_id = str(item.row.get("id"))
        if trace_id in self._dead_ids:
            return
        self._dead_ids.add(trace_id)
        self.stats.dropped_by[reason] += 1
        path = self.spool.dead_letter_path
        log.error(
            "trace %s not written (%s: %s); kept in %s", trace_id, type(exc).__name__, exc, path
        )
        try:
            entry = {**spool_entry(item.row, self.redacted(item)), "error": type(exc).__name__}
            append(path, [orjson.dumps(entry) + b"\n"])
        except (OSError, TypeError) as write_error:
            log.error("trace %s lost: the dead-letter file failed (%r)", trace_id, write_error)
            return
        self.stats.dead_letters += 1

    def dead_letter_line(self, line: bytes, exc: Exception) -> None:
        """A spool line that does not read (a write torn by a crash): its content cannot be
        redacted, so only that it was there is kept."""
        digest = blob_digest(line).hex()
        if digest in self._dead_ids:
            return
        self._dead_ids.add(digest)
        self.stats.dropped_by["dead_letter"] += 1
        log.error("an unreadable spool line (%d bytes) was dropped: %r", len(line), exc)
        entry = {"error": type(exc).__name__, "unreadable_spool_line_bytes": len(line)}
        try:
            append(self.spool.dead_letter_path, [orjson.dumps(entry) + b"\n"])
        except OSError as write_error:
            log.error("the dead-letter file failed (%r)", write_error)
            return
        self.stats.dead_letters += 1


def _store_answer(row: TraceRow, answer: bytes, store: BlobStore) -> None:
    digest = blob_digest(answer)
    if not store.has(digest):
        store.put(digest, answer)
    row["response_blob"] = digest.hex()
