"""The frames between a serving process and its trace writer process, over a socketpair.

A frame is a 4-byte big-endian payload length, a 1-byte kind, and the payload.

From the serving process:

- ``TRACE``: a sequence number (8 bytes), the length of a JSON document (4 bytes), the
  document (``{"row": ..., "response": ..., "size": ..., "body": bool}``), then the
  request body's raw bytes (when ``body``).
- ``KEY``: JSON ``{"id": key id, "c": ciphertext, "p": plaintext or null}`` (null: the
  key does not decrypt). ``LOCAL``: the local keyring's master key (raw bytes). Both
  only ever held in the writer's memory: never logged, spooled or stored.
- ``CHANGED``: an org id (8 bytes): its policy or keys changed (``tvgate.services``
  announced it), so its capture settings are read again before its next trace.
- ``CLOCK``: the serving process's wall clock (a double, 8 bytes) as it sent the frame:
  every trace of a call that ended before it was sent before it (the writer's watermark,
  :mod:`tvgate.traces.watermark`).
- ``STOP``: write or spool everything sent so far, report, and exit.

From the writer process:

- ``ACK``: the highest sequence number up to which every trace is in the database or
  the spool (or counted lost).
- ``STATS``: JSON of the writer's counters and gauges (:func:`stats_document`), the keys
  its held bodies wait for among them. ``DONE``: the last ``STATS``, before it exits.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from tvgate.keyring import KeyContext
from tvgate.traces.rows import CapturedBody, TraceRow, WriterStats

TRACE, KEY, LOCAL, CHANGED, CLOCK, STOP = b"T"[0], b"K"[0], b"L"[0], b"C"[0], b"W"[0], b"S"[0]
ACK, STATS, DONE = b"A"[0], b"M"[0], b"D"[0]
_HEADER = struct.Struct(">IB")
_TRACE = struct.Struct(">QI")
_SEQ = struct.Struct(">Q")
_CLOCK = struct.Struct(">d")
HEADER_SIZE = _HEADER.size


def frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload), kind) + payload


def header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(payload length, kind) of the header at the start of ``data``."""
    length, kind = _HEADER.unpack_from(data)
    return length, kind


def changed_frame(org_id: int) -> bytes:
    return frame(CHANGED, _SEQ.pack(org_id))


def read_changed(payload: bytes) -> int:
    (org_id,) = _SEQ.unpack(payload)
    return int(org_id)


def clock_frame(now: float) -> bytes:
    return frame(CLOCK, _CLOCK.pack(now))


def read_clock(payload: bytes) -> float:
    (now,) = _CLOCK.unpack(payload)
    return float(now)


def trace_frame(seq: int, row: TraceRow, body: CapturedBody | None) -> bytes:
    """A trace as the serving process sends it (raises TypeError: not JSON)."""
    if body is None:
        document = orjson.dumps({"row": row, "body": False})
        return frame(TRACE, _TRACE.pack(seq, len(document)) + document)
    document = orjson.dumps(
        {"row": row, "body": True, "response": body.response, "size": body.response_size}
    )
    return frame(TRACE, b"".join((_TRACE.pack(seq, len(document)), document, body.request)))


def read_trace(payload: bytes) -> tuple[int, TraceRow, CapturedBody | None]:
    seq, length = _TRACE.unpack_from(payload)
    start = _TRACE.size
    document = orjson.loads(payload[start : start + length])
    body = None
    if document["body"]:
        request = payload[start + length :]
        body = CapturedBody(request, document["response"], document["size"])
    return seq, document["row"], body


def key_frame(key_id: int, ciphertext: str, plaintext: str | None) -> bytes:
    return frame(KEY, orjson.dumps({"id": key_id, "c": ciphertext, "p": plaintext}))


def ack_frame(seq: int) -> bytes:
    return frame(ACK, _SEQ.pack(seq))


def read_ack(payload: bytes) -> int:
    seq: int = _SEQ.unpack(payload)[0]
    return seq


def stats_document(
    stats: WriterStats, gauges: dict[str, Any], wanted: list[tuple[str, KeyContext]]
) -> bytes:
    return orjson.dumps(
        {
            "counters": {
                "written": stats.written,
                "spooled": stats.spooled,
                "dropped_by": stats.dropped_by,
                "bodies_dropped": stats.bodies_dropped,
                "failures": stats.failures,
                "restarts": stats.restarts,
                "spool_errors": stats.spool_errors,
                "otlp_dropped": stats.otlp_dropped,
            },
            "gauges": {
                **gauges,
                "dead_letters": stats.dead_letters,
                "peak_depth": stats.peak_depth,
                "spool_error": stats.spool_error,
            },
            "wanted": [
                [ciphertext, c.org_id, c.key_id, c.owner_id, c.kind] for ciphertext, c in wanted
            ],
        }
    )


def read_wanted(document: dict[str, Any]) -> list[tuple[str, KeyContext]]:
    return [
        (ciphertext, KeyContext(org_id, key_id, owner_id, kind))
        for ciphertext, org_id, key_id, owner_id, kind in document["wanted"]
    ]
