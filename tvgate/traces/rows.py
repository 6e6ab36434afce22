"""What the trace writer moves around: a trace's row, its body, and the counters kept on them.

A row is the dict the request path builds (one per call). :func:`mend_row` makes any
row insertable, whatever a client or a provider put in it. A body is captured on the
request path (:class:`CapturedBody`, not redacted) and becomes a :class:`RedactedBody`
once the writer has redacted it: the form the spool, the dead-letter file and the
holding store keep. :func:`spool_entry` and :func:`read_entry` are the line format of
the spool and the dead-letter file. :class:`WriterStats` is every counter the writer
keeps, which readiness and the metrics show.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import orjson
import peewee

from tvgate.models import Trace

TraceRow = dict[str, Any]
#: Why traces were lost: the queue was full; the database refused the row even alone
#: (it is kept in the dead-letter file); neither the spool nor the database took them
#: while more than the queue size was held in memory, or at stop; the writer failed
#: while it held them.
DROP_REASONS = ("queue_full", "dead_letter", "spool_error", "writer_error")
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
    JSON. What the spool, the dead-letter file and the holding store keep."""

    request: bytes
    response: bytes | None

    @property
    def size(self) -> int:
        return len(self.request) + len(self.response or b"")


@dataclass(slots=True)
class Item:
    """A trace on its way to the database: its row and its body (if one is kept)."""

    row: TraceRow
    body: CapturedBody | RedactedBody | None
    #: Its number from the serving process (0 when there is none): acknowledged back.
    seq: int = 0

    @property
    def body_size(self) -> int:
        return 0 if self.body is None else self.body.size

    def note(self, anomaly: str) -> None:
        """Name on the trace something that happened to it on the way (a body let go)."""
        self.row["anomalies"] = [*(self.row.get("anomalies") or ()), anomaly]


@dataclass
class WriterStats:
    """The writer's counters (readiness and the metrics read them)."""

    written: int = 0
    spooled: int = 0
    dropped_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    #: Entries in the dead-letter file (counted at start, so a restart still tells).
    dead_letters: int = 0
    bodies_dropped: int = 0
    failures: int = 0
    #: Times the writer's loop failed and was started again.
    restarts: int = 0
    #: The deepest the queue was when the writer took a batch (the benchmark reports it).
    peak_depth: int = 0
    spool_errors: int = 0
    #: The last spool write's error while it fails (readiness reports it).
    spool_error: str | None = None
    #: Spans of written traces the OTLP exporter did not deliver (tvgate.traces.otlp).
    otlp_dropped: int = 0

    @property
    def dropped(self) -> int:
        """Traces lost, for every reason."""
        return sum(self.dropped_by.values())


def _column(field: peewee.Field) -> tuple[str, Any, Any]:
    default = field.default
    return (field.name, field.db_value, default if callable(default) else lambda: default)


#: Every column of a trace, in the model's order: (name, to the database's type, default).
COLUMNS: tuple[tuple[str, Any, Any], ...] = tuple(
    _column(field) for field in Trace._meta.sorted_fields
)
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


def spool_entry(row: TraceRow, body: RedactedBody | None) -> dict[str, Any]:
    """A spool (and dead-letter) line's content: the row and its redacted body, base64."""
    entry: dict[str, Any] = {"row": row}
    if body is not None:
        entry["redacted_request"] = base64.b64encode(body.request).decode()
        if body.response is not None:
            entry["redacted_response"] = base64.b64encode(body.response).decode()
    return entry


#: What :func:`read_entry` raises for a line that does not read (a write torn by a crash).
UNREADABLE = (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error)


def read_entry(line: bytes) -> Item:
    """A spool line as a queued trace; raises one of :data:`UNREADABLE`.

    Lines spooled before bodies were redacted first hold ``request`` (base64) and
    ``response`` (JSON): they are redacted on the way in, as queued traces are."""
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
    return Item(row, body)
