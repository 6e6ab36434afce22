"""The AWS event stream (``application/vnd.amazon.eventstream``), both ways, for Bedrock.

Bedrock's ``InvokeModelWithResponseStream`` answers in binary frames, not SSE: each
frame is a prelude (total length, headers length, the prelude's CRC32), typed headers
(``:message-type`` ``event``/``exception``, ``:event-type chunk``), a payload and the
CRC32 of all of it. A ``chunk`` event's payload is ``{"bytes": <base64 of one Anthropic
stream event's JSON>}``; an ``exception`` frame's is ``{"message": ...}`` with its kind in
``:exception-type``.

:class:`EventStreamToSSE` turns a Bedrock stream into the Anthropic SSE the rest of
tvgate reads (each frame as it completes; a frame over ``max_frame`` bytes, or one whose
CRC fails, ends the stream with an error event). :class:`SSEToEventStream` does the
reverse for clients in Bedrock mode (``/bedrock``). Frames are parsed, and their CRCs
checked, by botocore's own decoder (``botocore.eventstream``); botocore has no encoder,
so :func:`frame` writes them (a dozen lines of the format above).
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Sequence

import orjson
from botocore.eventstream import EventStreamBuffer, EventStreamMessage, ParserError

from tvgate.traces.sse import SSEParser

CONTENT_TYPE = "application/vnd.amazon.eventstream"
#: The largest frame read from a provider: an Anthropic event is at most a few KiB but
#: a ``content_block_start`` may carry a large block; botocore's own cap is 16 MiB.
MAX_FRAME = 16 * 1024 * 1024
_PRELUDE = struct.Struct("!III")
_STRING = 7  # the header value type of a string

#: Anthropic error types as Bedrock's stream exceptions name them, and back.
AWS_EXCEPTIONS = {
    "invalid_request_error": "validationException",
    "authentication_error": "accessDeniedException",
    "permission_error": "accessDeniedException",
    "not_found_error": "resourceNotFoundException",
    "rate_limit_error": "throttlingException",
    "overloaded_error": "serviceUnavailableException",
    "timeout_error": "modelTimeoutException",
    "api_error": "internalServerException",
}
#: Bedrock's error names (any case, header or stream) as Anthropic error types.
ANTHROPIC_TYPES = {
    "validationexception": "invalid_request_error",
    "accessdeniedexception": "permission_error",
    "unrecognizedclientexception": "authentication_error",
    "invalidsignatureexception": "authentication_error",
    "expiredtokenexception": "authentication_error",
    "resourcenotfoundexception": "not_found_error",
    "throttlingexception": "rate_limit_error",
    "servicequotaexceededexception": "rate_limit_error",
    "modelnotreadyexception": "overloaded_error",
    "serviceunavailableexception": "overloaded_error",
    "modeltimeoutexception": "timeout_error",
}


def anthropic_type(aws_type: str) -> str:
    """The Anthropic error type of a Bedrock error name (``ThrottlingException``, or a
    header's ``ThrottlingException:http://...``)."""
    return ANTHROPIC_TYPES.get(aws_type.split(":", 1)[0].strip().lower(), "api_error")


def frame(headers: Sequence[tuple[str, str]], payload: bytes) -> bytes:
    """One event-stream frame: string headers, the payload, both CRCs."""
    encoded = b"".join(
        struct.pack("!B", len(n := name.encode()))
        + n
        + struct.pack("!BH", _STRING, len(v := value.encode()))
        + v
        for name, value in headers
    )
    total = _PRELUDE.size + len(encoded) + len(payload) + 4
    prelude = struct.pack("!II", total, len(encoded))
    head = prelude + struct.pack("!I", binascii.crc32(prelude)) + encoded + payload
    return head + struct.pack("!I", binascii.crc32(head))


def chunk_frame(event_json: bytes) -> bytes:
    """A ``chunk`` event carrying one Anthropic stream event."""
    payload = orjson.dumps({"bytes": base64.b64encode(event_json).decode()})
    return frame(
        (
            (":event-type", "chunk"),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ),
        payload,
    )


def exception_frame(exception_type: str, message: str) -> bytes:
    """An ``exception`` frame, as Bedrock ends a stream that failed."""
    return frame(
        (
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ),
        orjson.dumps({"message": message}),
    )


def sse_error(kind: str, message: str) -> bytes:
    """An Anthropic stream ``error`` event."""
    payload = {"type": "error", "error": {"type": kind, "message": message}}
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


class FrameReader:
    """Whole frames out of a byte stream, each bounded by ``max_frame`` (FrameError past it,
    or on a CRC mismatch); only the unfinished frame is held."""

    __slots__ = ("_buffer", "_max", "_pending")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._max = max_frame
        self._pending = bytearray()
        self._buffer = EventStreamBuffer()

    @property
    def partial(self) -> bool:
        """Bytes of an unfinished frame are held."""
        return bool(self._pending)

    def feed(self, chunk: bytes) -> list[EventStreamMessage]:
        pending = self._pending
        pending += chunk
        messages: list[EventStreamMessage] = []
        start = 0
        while len(pending) - start >= 4:
            (total,) = struct.unpack_from("!I", pending, start)
            if total > self._max or total < _PRELUDE.size + 4:
                raise FrameError(f"an event-stream frame of {total} bytes (at most {self._max})")
            if len(pending) - start < total:
                break
            # botocore checks both CRCs and parses the headers.
            self._buffer.add_data(bytes(pending[start : start + total]))
            try:
                messages.extend(self._buffer)
            except ParserError as exc:
                raise FrameError(f"an event-stream frame does not decode: {exc}") from None
            start += total
        del pending[:start]
        return messages


class FrameError(Exception):
    """The provider's event stream is malformed or over its bounds."""


class EventStreamToSSE:
    """A Bedrock event stream, fed as it comes, as Anthropic SSE bytes."""

    __slots__ = ("_failed", "_reader")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._reader = FrameReader(max_frame)
        self._failed = False

    def feed(self, chunk: bytes) -> bytes:
        if self._failed:
            return b""
        try:
            messages = self._reader.feed(chunk)
        except FrameError as exc:
            self._failed = True
            return sse_error("api_error", f"the provider's stream is malformed: {exc}")
        return b"".join(_sse_of(message) for message in messages)

    def end(self) -> bytes:
        """The stream ended: an error event if it ended inside a frame."""
        if self._reader.partial and not self._failed:
            self._failed = True
            return sse_error("api_error", "the provider's stream ended inside an event")
        return b""


def _sse_of(message: EventStreamMessage) -> bytes:
    headers = message.headers
    kind = headers.get(":message-type")
    try:
        payload = orjson.loads(message.payload)
    except orjson.JSONDecodeError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    if kind == "event":
        if headers.get(":event-type") != "chunk" or not isinstance(payload.get("bytes"), str):
            return b""  # an event of no answer (none is sent today)
        try:
            event = base64.b64decode(payload["bytes"], validate=True)
            name = orjson.loads(event).get("type")
        except (binascii.Error, orjson.JSONDecodeError, AttributeError):
            return sse_error("api_error", "the provider sent an event that does not decode")
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            return sse_error("api_error", "the provider sent an event of no type")
        return b"event: " + name.encode() + b"\ndata: " + event + b"\n\n"
    aws_type = str(headers.get(":exception-type") or headers.get(":error-code") or "")
    message_text = payload.get("message") or payload.get("Message") or aws_type
    if not isinstance(message_text, str):
        message_text = aws_type
    return sse_error(anthropic_type(aws_type), message_text or "the provider's stream failed")


class SSEToEventStream:
    """Anthropic SSE (what tvgate relays), fed as it comes, as event-stream frames for a
    client in Bedrock mode; an ``error`` event becomes an ``exception`` frame."""

    __slots__ = ("_parser",)

    def __init__(self) -> None:
        self._parser = SSEParser()

    def feed(self, chunk: bytes) -> bytes:
        out = []
        for event in self._parser.feed(chunk):
            if event.event == "error" or event.data.startswith(b'{"type":"error"'):
                out.append(_exception_of(event.data))
            elif event.event != "ping":
                out.append(chunk_frame(event.data))
        return b"".join(out)


def _exception_of(data: bytes) -> bytes:
    try:
        error = orjson.loads(data).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return exception_frame("internalServerException", "the stream failed")
    kind, message = error.get("type"), error.get("message")
    return exception_frame(
        AWS_EXCEPTIONS.get(kind if isinstance(kind, str) else "", "modelStreamErrorException"),
        message if isinstance(message, str) else "the stream failed",
    )
