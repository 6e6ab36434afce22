"""Incremental Server-Sent Events parsing for the capture layer.

This module owns turning the raw bytes of an upstream ``text/event-stream``
response, as they arrive in chunks of any size, into complete events. It
follows the WHATWG EventSource interpretation rules: lines end in ``\\r\\n``,
``\\n`` or ``\\r``; a line starting with ``:`` is a comment; ``field: value``
loses one leading space; ``id`` and ``retry`` are accepted and ignored; an
event is dispatched on a blank line, and only if it had at least one ``data``
line. It knows nothing of what the events mean (see
:mod:`tvgate.providers.assemble`).

It sits on the proxy's hot path, so lines are found with ``bytes.find`` and
only the unfinished tail of the stream is ever held, never the stream itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LF = 0x0A
_SPACE = 0x20
_BOM = b"\xef\xbb\xbf"
# The shape nearly every provider event has: an optional `event:` line, one `data:`
# line, the blank line. One match takes a whole event; any other shape (comments,
# several data lines, `id:`) goes through the general rules.
_SIMPLE_EVENT = re.compile(rb"(?:event: ?([^\n]*)\n)?data: ?([^\n]*)\n\n")
#: Event names decoded so far: a stream repeats a handful of them.
_EVENT_NAMES: dict[bytes, str | None] = {}
_EVENT_NAMES_MAX = 256


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event."""

    #: The ``event:`` field; None when absent (or empty, which the spec treats alike).
    event: str | None
    #: The event's ``data`` lines joined with ``b"\\n"``.
    data: bytes


class SSEParser:
    """Feed it chunks; it returns the events each chunk completes.

    ``overflowed`` is set once an event's lines (comments included) grew past
    ``max_event_bytes``: that event is dropped and parsing resumes after the
    next blank line, so one runaway event cannot hold the gateway's memory.
    Only the tail of the current line and the current event's data are held.
    ``truncated`` is set by :meth:`close` when the stream ended inside an event.
    """

    __slots__ = (
        "_cr_pending",
        "_data",
        "_event",
        "_first_line",
        "_max",
        "_partial",
        "_size",
        "_skip_content",
        "_skipping",
        "overflowed",
        "truncated",
    )

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._max = max_event_bytes
        # The unterminated tail of the last chunk: the start of a line.
        self._partial = bytearray()
        self._data: list[bytes] = []
        self._event: str | None = None
        # Bytes of the current event's complete lines (the partial one is apart).
        self._size = 0
        # The last chunk ended in "\r": a "\n" opening the next one is the rest of "\r\n".
        self._cr_pending = False
        self._first_line = True
        # After an overflow, lines are dropped until a blank one; the partial
        # line is then not kept, only whether it has any content.
        self._skipping = False
        self._skip_content = False
        self.truncated = False
        self.overflowed = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by ``chunk``, in order."""
        out: list[SSEEvent] = []
        n = len(chunk)
        if not n:
            return out
        pos = 0
        if self._cr_pending:
            self._cr_pending = False
            if chunk[0] == _LF:
                pos = 1
        elif not (self._partial or self._data or self._size or self._skipping) and (
            self._event is None
        ):
            # Nothing pending: the whole events at the head of the chunk (up to its last
            # blank line) are taken at once, when no "\r" can end a line among them.
            end = chunk.rfind(b"\n\n")
            if (
                end != -1
                and end <= self._max
                and chunk.find(b"\r", 0, end) == -1
                and not (self._first_line and chunk.startswith(_BOM))
            ):
                self._first_line = False
                self._whole_events(chunk, end + 2, out)
                pos = end + 2
                if pos == n:
                    return out
        find = chunk.find
        # Each terminator is searched for once per pass over the chunk; a miss
        # (-1) stays a miss, so the scan is linear even with no "\r" at all.
        nl = find(b"\n", pos)
        cr = find(b"\r", pos)
        while pos < n:
            if nl != -1 and nl < pos:
                nl = find(b"\n", pos)
            if cr != -1 and cr < pos:
                cr = find(b"\r", pos)
            if cr == -1:
                if nl == -1:
                    break
                end = nl
                nxt = nl + 1
            elif nl == -1 or cr < nl:
                end = cr
                if cr + 1 < n:
                    nxt = cr + 2 if chunk[cr + 1] == _LF else cr + 1
                else:
                    nxt = n
                    self._cr_pending = True
            else:
                end = nl
                nxt = nl + 1
            if self._skipping:
                blank = end == pos and not self._skip_content
                self._skip_content = False
                if blank:
                    self._skipping = False
            else:
                if self._partial:
                    self._partial += chunk[pos:end]
                    line = bytes(self._partial)
                    self._partial.clear()
                else:
                    line = chunk[pos:end]
                self._line(line, out)
            pos = nxt
        if pos < n:
            self._hold(chunk, pos)
        return out

    def _whole_events(self, chunk: bytes, end: int, out: list[SSEEvent]) -> None:
        """The complete events in ``chunk[:end]``, which ends in a blank line, with lines
        ending in "\\n" only and no event anywhere near ``max_event_bytes``: the rules
        of ``_line``, without its per-line bookkeeping."""
        pos = 0
        names = _EVENT_NAMES
        append = out.append
        # Successive matches, as long as each starts where the last one ended: the first
        # gap is an event of another shape, and the rest goes through _blocks.
        for simple in _SIMPLE_EVENT.finditer(chunk, 0, end):
            if simple.start() != pos:
                break
            name, data = simple.groups()
            event = None
            if name:
                event = names.get(name)
                if event is None:
                    event = name.decode("utf-8", "replace")
                    if len(names) < _EVENT_NAMES_MAX:
                        names[name] = event
            append(SSEEvent(event, data))
            pos = simple.end()
        if pos < end:
            self._blocks(chunk[pos : end - 2], out)

    def _blocks(self, events: bytes, out: list[SSEEvent]) -> None:
        """:meth:`_whole_events` for any shape: ``events`` lacks its last blank line."""
        for block in events.split(b"\n\n"):
            data: list[bytes] = []
            event: str | None = None
            for line in block.split(b"\n"):
                if not line:
                    # A blank line inside the block: "\n\n\n" puts one at its start.
                    if data:
                        out.append(SSEEvent(event, data[0] if len(data) == 1 else b"\n".join(data)))
                    data = []
                    event = None
                    continue
                if line[0] == 0x3A:  # a comment
                    continue
                field, value = _field(line)
                if field == b"data":
                    data.append(value)
                elif field == b"event":
                    event = value.decode("utf-8", "replace") or None
            if data:
                out.append(SSEEvent(event, data[0] if len(data) == 1 else b"\n".join(data)))

    def close(self) -> list[SSEEvent]:
        """End of stream. Per the spec an unterminated event is never dispatched."""
        if self._partial or self._data or self._event is not None or self._skipping:
            self.truncated = True
        self._partial.clear()
        self._data = []
        self._event = None
        self._size = 0
        return []

    def _hold(self, chunk: bytes, pos: int) -> None:
        """Keep ``chunk[pos:]``, the start of a line the next chunk will finish."""
        if self._skipping:
            self._skip_content = True
            return
        extra = len(chunk) - pos
        if self._size + len(self._partial) + extra > self._max:
            self._overflow()
            self._skip_content = True
            return
        self._partial += chunk[pos:] if pos else chunk

    def _overflow(self) -> None:
        self.overflowed = True
        self._skipping = True
        self._skip_content = False
        self._partial.clear()
        self._data = []
        self._event = None
        self._size = 0

    def _line(self, line: bytes, out: list[SSEEvent]) -> None:
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[3:]
                self._size += 3
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                out.append(SSEEvent(self._event, data))
            self._data = []
            self._event = None
            self._size = 0
            return
        # Every line of the event counts, comments too, so that whether an
        # event overflows does not depend on where the chunks were cut.
        self._size += len(line)
        if self._size > self._max:
            self._overflow()
            return
        if line[0] == 0x3A:  # ":" starts a comment
            return
        field, value = _field(line)
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace") or None
        # "id", "retry" and unknown fields are ignored.


def _field(line: bytes) -> tuple[bytes, bytes]:
    """A field line's name and value: one space after the colon is not part of the value."""
    colon = line.find(b":")
    if colon == -1:
        return line, b""
    start = colon + 1
    if start < len(line) and line[start] == _SPACE:
        start += 1
    return line[:colon], line[start:]


class FastEvents:
    """A stream's events, with those of one exact byte shape handed over unparsed.

    For a translator whose events are nearly all of one shape (a text delta): an event
    that ``fast`` matches whole (from its first byte through its blank line) comes back
    as the match, to be copied from without parsing its JSON; every other event comes
    back as an :class:`SSEEvent` of an :class:`SSEParser`, in stream order. The bytes
    after a chunk's last blank line wait for the next chunk; a chunk without a blank line
    or with a ``\\r`` anywhere goes to the parser whole (so the parser's limit bounds
    what is held), and so does everything while the parser holds part of an event.
    """

    __slots__ = ("_fast", "_parser", "_tail")

    def __init__(self, fast: re.Pattern[bytes]) -> None:
        self._fast = fast
        self._parser = SSEParser()
        self._tail = b""

    @property
    def parser(self) -> SSEParser:
        return self._parser

    def feed(self, chunk: bytes) -> list[SSEEvent | re.Match[bytes]]:
        data = self._tail + chunk if self._tail else chunk
        parser = self._parser
        end = data.rfind(b"\n\n") + 2
        busy = parser._partial or parser._data or parser._size or parser._skipping
        if end == 1 or busy or parser._cr_pending or data.find(b"\r") != -1:
            self._tail = b""
            return list(parser.feed(data))
        self._tail = data[end:]
        out: list[SSEEvent | re.Match[bytes]] = []
        match = self._fast.match
        find = data.find
        pos = 0
        while pos < end:
            found = match(data, pos, end)
            if found is not None:
                # The parser never saw this event: a BOM is only the stream's first bytes.
                parser._first_line = False
                out.append(found)
                pos = found.end()
                continue
            # Up to the next blank line (or the last one, after a run of "\n"s).
            nxt = find(b"\n\n", pos, end)
            nxt = end if nxt == -1 else nxt + 2
            out.extend(parser.feed(data[pos:nxt]))
            pos = nxt
        return out

    def close(self) -> None:
        """End of stream (an unfinished event is dropped, as the parser drops it)."""
        if self._tail:
            self._parser.feed(self._tail)
            self._tail = b""
        self._parser.close()
