"""Translating only a conversation's new turns: the previous call's translated history, reused.

This module owns the serving process's memory of recent translated requests. A coding
agent sends its whole conversation again on every call, so a translated call would
parse, translate and serialise a 190 KB history each time to change one or two
messages at its end (bench/README.md: ~6 M instructions, most of what a translated call
costs beyond a passthrough one). For each caller and pair, the last few bodies are
kept with the translation of their ``messages``: the serialised output messages, and
marks saying how much of that output the first *i* input messages made.

A new body is compared, byte for byte, with the bodies kept (:class:`Histories`): the
longest prefix it shares with one, ending just after an element of its ``messages``
array (:attr:`tvgate.traces.split.Split.resumes`), gives the input messages whose
translation is reused; only the members and the messages after them are parsed
(the body with the shared messages cut out of its array) and translated, and the body
sent upstream is the reused bytes spliced into the serialisation of the rest. The
result is the same bytes, notes and errors as translating the whole body, because:

* the translation of the first *i* messages is a function of their bytes alone (and
  of their index, which is the same): :class:`Prefix` carries everything a translator
  keeps across messages (its notes, and for Chat to Anthropic the hoisted system
  blocks, the role of the last turn and whether the last assistant turn is a tool
  call without thinking), and a mark is only placed where no later message can change
  the output before it (Chat to Anthropic merges a message into the turn before it
  when the roles match: such a merge across a mark makes the translator raise
  :class:`Unresumable`, and the body is translated whole);
* the body cut short is checked against its scan: its top-level keys, parsed, must be
  the keys the scan read as written (no escaped or repeated key, such as a second
  ``messages`` that a parser would take instead), and its ``messages`` must be as many
  as the scan found after the cut (every element an object it could follow); any
  doubt and the body is translated whole;
* orjson writes a list as its elements' own serialisations joined by ``,``, so the
  spliced bytes are what serialising the whole output would write.

Finding a body's message ends is a scan of the whole body (:func:`split_body`, about
twice what translating it costs), so a body is scanned only once its caller has sent
one whose first half it starts with: a one-off request is translated whole and kept
unscanned, and bodies under :data:`MIN_BODY` are not kept at all.

Memory is bounded: at most :data:`PER_OWNER` bodies per caller and pair, and
:data:`DEFAULT_BUDGET` bytes in all (bodies and their translations), oldest dropped
first. Everything runs on the event loop, one call at a time, and entries are never
changed once kept: concurrent calls of one conversation each start from a complete
entry and add their own.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tvgate.traces.recent import Recent
from tvgate.traces.split import Split, continue_split, split_body

JSON = dict[str, Any]

#: Bodies kept per caller and pair (parallel conversations: subagents, a title request).
PER_OWNER = 4
#: Bytes of bodies and translations kept in all, per serving process.
DEFAULT_BUDGET = 32 * 1024 * 1024
#: Bodies shorter than this are translated whole and not kept: their translation costs
#: less than keeping them would.
MIN_BODY = 16 * 1024
#: Rough bytes of bookkeeping per mark and per message offset.
_MARK_OVERHEAD = 100
_WS = b" \t\r\n"


class Unresumable(Exception):
    """A translation cannot go on from the mark it was given (a message merges into the
    turn before it): the body is translated whole instead."""


@dataclass(frozen=True, slots=True)
class Mark:
    """The translation of a body's first ``index`` messages: ``size`` bytes of output
    messages, ``notes`` of the notes its messages made, and the translator's own state."""

    index: int
    size: int
    notes: int
    state: Any = None


@dataclass(frozen=True, slots=True)
class Prefix:
    """Where a translation of ``messages[index:]`` starts: the notes the messages before
    made (in order) and the translator's state after them."""

    index: int
    notes: list[str]
    state: Any = None


@dataclass(slots=True)
class Output:
    """The messages of one translation, as a translator hands them over: ``head``, output
    messages that precede the conversation's own (an Anthropic ``system`` as Chat system
    messages); ``turns``, the output of the input messages from the prefix's index on;
    ``marks``, (input index, turns before it, notes before it, state) where a later
    translation may start; ``notes``, the notes of the input messages, the prefix's first."""

    head: list[JSON] = field(default_factory=list)
    turns: list[JSON] = field(default_factory=list)
    marks: list[tuple[int, int, int, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Entry:
    raw: bytes
    split: Split
    #: Offset just after the ``[`` of ``messages``, and just after each of its elements.
    opened: int
    ends: list[int]
    #: The translated body, and where in it the output of the input messages is (their
    #: output messages, serialised and joined by ``,``).
    translated: bytes
    start: int
    marks: list[Mark]
    notes: list[str]

    def output(self, size: int) -> memoryview:
        """The first ``size`` bytes of the messages' output (a mark's)."""
        return memoryview(self.translated)[self.start : self.start + size]

    @property
    def size(self) -> int:
        return (
            len(self.raw)
            + len(self.translated)
            + _MARK_OVERHEAD * (len(self.marks) + len(self.ends) + len(self.split.cuts))
        )

    def shared(self, raw: bytes) -> int:
        """How many of this body's messages ``raw`` starts with, bytes before them included
        (0 when it does not start with the first)."""
        ends = self.ends
        view = memoryview(self.raw)
        # The usual cases first: the same history with its last message changed, or one
        # more turn after it.
        for count in (len(ends), len(ends) - 1):
            if count > 0 and raw.startswith(view[: ends[count - 1]]):
                return count
        low, high = 0, len(ends) - 1  # `low` messages are shared, `high` are not
        while high - low > 1:
            middle = (low + high) // 2
            if raw.startswith(view[: ends[middle - 1]]):
                low = middle
            else:
                high = middle
        return low


@dataclass(slots=True, eq=False)
class _Seen:
    """A body translated whole and not scanned (none of its caller's before it was like it)."""

    raw: bytes

    @property
    def size(self) -> int:
        return len(self.raw)


#: A translator of a document (cut short or whole) from a prefix (None: from the first
#: message): its own result, the output body as objects, and the output's messages.
Translate = Callable[[JSON, Prefix | None], tuple[Any, JSON, Output]]


@dataclass(slots=True)
class Translated:
    """One translated request: the body's bytes, its objects (``messages`` short of the
    reused history when resumed) and the translator's own result."""

    body: bytes
    result: Any
    #: Input messages whose translation was reused (0: translated whole).
    reused: int = 0


class Histories:
    """The last translated bodies per owner (a caller and a pair), bounded in bytes."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        #: Calls translated whole, and from a kept body's history.
        self.whole = 0
        self.resumed = 0
        #: The bodies kept (``recent.size`` bytes, at most ``recent.budget``).
        self.recent: Recent[Hashable, _Entry | _Seen] = Recent(budget, PER_OWNER)

    def translate(
        self,
        owner: Hashable,
        raw: bytes,
        translate: Translate,
    ) -> Translated:
        """Translate the request body ``raw`` with ``translate(document, prefix)``, which
        returns (its result, the output body as objects, its messages): from the history
        of a body of ``owner`` kept here when ``raw`` continues one, else whole."""
        entry, count = self._best(owner, raw)
        if entry is not None:
            resumed = self._resume(owner, entry, count, raw, translate)
            if resumed is not None:
                self.resumed += 1
                return resumed
        self.whole += 1
        document = orjson.loads(raw)
        result, out, output = translate(document, None)
        if len(raw) < MIN_BODY:
            return Translated(orjson.dumps(out), result)
        body, start, marks = _assemble(out, output, b"", [])
        if not self._continues(owner, raw):
            # Scanning a body costs more than translating it: only once the caller's
            # bodies are seen to repeat (a one-off large request never pays for it).
            self.recent.add(owner, _Seen(raw))
            return Translated(body, result)
        split = split_body(raw)
        found = _messages(split, raw, document)
        if found is not None:
            opened, ends = found
            entry = _Entry(raw, split, opened, ends, body, start, marks, output.notes)
            self.recent.add(owner, entry)
        return Translated(body, result)

    def _best(self, owner: Hashable, raw: bytes) -> tuple[_Entry | None, int]:
        best: _Entry | None = None
        most = 0
        for entry in self.recent.get(owner):
            if isinstance(entry, _Entry):
                count = entry.shared(raw)
                if count > most:
                    best, most = entry, count
        return best, most

    def _continues(self, owner: Hashable, raw: bytes) -> bool:
        """Whether ``raw`` starts with the first half of a body of ``owner`` kept here."""
        return any(
            raw.startswith(memoryview(entry.raw)[: len(entry.raw) // 2])
            for entry in self.recent.get(owner)
        )

    def _resume(
        self, owner: Hashable, entry: _Entry, count: int, raw: bytes, translate: Translate
    ) -> Translated | None:
        """``raw``'s translation from the last mark within its ``count`` messages shared
        with ``entry``, or the mark before it when a message would join the turn before
        the last (None when neither will do: then it is translated whole)."""
        end = entry.ends[count - 1]
        following = _skip(raw, end)
        if following >= len(raw):
            return None
        if raw[following] == ord("]"):
            count -= 1  # all shared: the last message is translated again
        # The last mark at or before `count` messages: where the translation goes on.
        at = bisect.bisect_right(entry.marks, count, key=lambda mark: mark.index) - 1
        split = continue_split(raw, entry.split, end)
        for tried in (at, at - 1):
            if tried < 0 or entry.marks[tried].index == 0:
                return None
            try:
                resumed = self._from_mark(owner, entry, tried, raw, split, translate)
            except Unresumable:
                continue
            if resumed is not None:
                return resumed
        return None

    def _from_mark(
        self,
        owner: Hashable,
        entry: _Entry,
        at: int,
        raw: bytes,
        split: Split,
        translate: Translate,
    ) -> Translated | None:
        mark = entry.marks[at]
        # The body with messages[:mark.index] cut out of its array.
        start = _skip(raw, entry.ends[mark.index - 1])
        if raw[start : start + 1] != b",":
            return None
        start = _skip(raw, start + 1)
        view = memoryview(raw)
        try:
            document = orjson.loads(b"".join((view[: entry.opened], view[start:])))
        except orjson.JSONDecodeError:
            return None
        found = _messages(split, raw, document, mark.index)
        if found is None:
            return None
        prefix = Prefix(mark.index, entry.notes[: mark.notes], mark.state)
        result, out, output = translate(document, prefix)
        body, start, marks = _assemble(out, output, entry.output(mark.size), entry.marks[: at + 1])
        kept = _Entry(raw, split, found[0], found[1], body, start, marks, output.notes)
        self.recent.add(owner, kept, replacing=entry)
        return Translated(body, result, mark.index)


def _skip(raw: bytes, pos: int) -> int:
    while pos < len(raw) and raw[pos] in _WS:
        pos += 1
    return pos


def _messages(
    split: Split, raw: bytes, document: JSON, cut: int = 0
) -> tuple[int, list[int]] | None:
    """Where ``messages`` opens in ``raw`` and where each of its elements ends, when the
    scan's reading of the body is the parser's (``document``: the body with its first
    ``cut`` messages cut out); None when in any doubt."""
    keys = [key for key, _ in split.members]
    try:
        if [key.decode() for key in keys] != list(document):
            return None  # an escaped or repeated key, or a scan that stopped short
    except UnicodeDecodeError:
        return None
    messages = document.get("messages")
    if not isinstance(messages, list) or keys.count(b"messages") != 1:
        return None
    index = keys.index(b"messages")
    value = split.members[index][1]
    if raw[value : value + 1] != b"[":
        return None
    limit = split.members[index + 1][1] if index + 1 < len(keys) else len(raw)
    ends = [end for end in split.resumes if value < end < limit]
    if len(ends) != cut + len(messages):
        return None  # an element the scan could not follow (or no object)
    return value + 1, ends


def _assemble(
    out: JSON, output: Output, reused: bytes | memoryview, kept: list[Mark]
) -> tuple[bytes, int, list[Mark]]:
    """``orjson.dumps(out)`` written from the bytes, its ``messages`` the head, then the
    ``reused`` output, then the turns (``out['messages']`` is not read); where the output
    of the conversation's messages starts in it; and the body's marks."""
    pieces = [orjson.dumps(turn) for turn in output.turns]
    base = len(reused)
    sizes = [0]
    for piece in pieces:
        # Each piece after the first (or after reused bytes) is preceded by its comma.
        sizes.append(sizes[-1] + len(piece) + (1 if base or len(sizes) > 1 else 0))
    marks = kept + [
        Mark(index, base + sizes[turns], notes, state)
        for index, turns, notes, state in output.marks
        if not kept or index > kept[-1].index
    ]
    before: JSON = {}
    after: JSON = {}
    seen = False
    for key, value in out.items():
        if key == "messages":
            seen = True
        elif seen:
            after[key] = value
        else:
            before[key] = value
    parts: list[bytes | memoryview] = [
        orjson.dumps(before)[:-1] + b',"messages":[' if before else b'{"messages":['
    ]
    head = orjson.dumps(output.head)[1:-1]
    if head:
        parts.append(head + b"," if base or pieces else head)
    start = sum(map(len, parts))
    if base:
        parts.append(reused)
    for j, piece in enumerate(pieces):
        if base or j:
            parts.append(b",")
        parts.append(piece)
    parts.append(b"]," + orjson.dumps(after)[1:] if after else b"]}")
    return b"".join(parts), start, marks
