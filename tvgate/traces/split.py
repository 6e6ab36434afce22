"""Where a request body is cut into parts: byte offsets only, never a re-serialisation.

The parts are what ``tvgate.traces.content`` stores as blobs keyed by their content;
the cuts fall where a coding agent's conversation repeats from one call to the next,
so a new call's body shares all but its new turn's parts with the last one.

Splitting (:func:`split_offsets`)
    The body is cut at byte offsets only, never parsed into objects and
    re-serialised, so joining the parts gives back the exact bytes whatever they
    are. For a JSON object the cuts fall at:

    * the start and end of the values of ``system``, ``tools`` and
      ``instructions`` (each value is one part: they rarely change in a session);
    * inside the conversation arrays ``messages`` and ``input`` (a string
      ``input`` is one part): after the ``[`` and after each element. A part is
      therefore an element *with the separator before it* (``,`` plus any
      whitespace): the conversation only grows at its end, so an element is
      preceded by the same separator on every later turn and nothing is lost
      against storing the separators apart, while the references and hash calls
      halve;
    * around every string of at least :data:`BIG_STRING` bytes inside an element
      (a tool result, a file, an image). The bytes around it (``tool_use_id``,
      ``cache_control``...) change between turns or calls (Claude Code moves its
      ``cache_control`` marker to the newest message) while the big string does
      not, and an agent re-reads the same file often: the big string still dedupes.

    The bytes between those cuts (``{"model":...,"messages":[``, ``],"system":``)
    are parts too; they are the same on every call of a session. Parts larger than
    :data:`MAX_PART` are cut every :data:`MAX_PART` bytes; a body that is not a JSON
    object, or the rest of one after a syntax error, is cut only that way.

    The scan never loops over characters in Python. A first pass, one regular
    expression matched again per string that may be big, finds the big strings;
    strings are matched quote to quote (``[^"]*+`` runs at memchr-like speed in
    ``re``, a class such as ``[^"\\\\]`` several times slower), a quote being
    escaped when a fixed-width lookbehind sees an odd run of backslashes before it.
    The structure is then parsed in a skeleton, the body with each big string
    replaced by ``""`` (a tenth of a coding agent's body), where one regular
    expression (:data:`_VALUE`) matches a whole element, hopping over strings and
    up to :data:`_NEST` levels of brackets inside the C regex engine (deeper
    elements fall back to a loop per bracket), and the cuts are mapped back. A
    wrong guess about malformed JSON can only make the cuts worse, never the bytes
    wrong: the parts are consecutive slices of the body by construction. The
    Python-level steps are bounded per body (:data:`SCAN_BUDGET`).

Continuing a scan (:func:`continue_split`)
    A scan also records where it may be taken over (:attr:`Split.resumes`): just
    after each element of a top-level conversation array that ends in ``}``, ``]``
    or ``"``. Such an element ends there whatever bytes follow, and the scan before
    it never looked further, so a later body that starts with the same bytes up to
    that offset is cut there exactly as this one was: only the rest is scanned, and
    :func:`tvgate.traces.content.store_parts` is given the digests of the parts
    before it. The trace writer uses this for a conversation's next body
    (:mod:`.conversations`).
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import re
from dataclasses import dataclass, field

__all__ = [
    "BIG_STRING",
    "MAX_PART",
    "SCAN_BUDGET",
    "Split",
    "continue_split",
    "split_body",
    "split_offsets",
]

#: A string token (quotes included) at least this long inside a conversation
#: element becomes its own part. Longer than any key looked for (`"instructions"`):
#: the structure is parsed with big strings blanked out.
BIG_STRING = 1024
#: No part is longer than this: bounds the size of one stored row.
MAX_PART = 1 << 20
#: Python-level steps (members, elements, hops over brackets nested too deep, strings
#: measured) a scan of one body may take; past it the rest of the body is cut in
#: plain chunks. A real session has thousands; a hostile body of a million one-byte
#: elements then costs a tenth of a second, not seconds.
SCAN_BUDGET = 50_000

#: The keys whose array elements are parts of their own.
CONVERSATION_KEYS = frozenset({b"messages", b"input"})
#: The keys whose whole value is one part.
WHOLE_KEYS = frozenset({b"system", b"tools", b"instructions"})

# A closing quote is escaped when an odd run of backslashes precedes it. The first
# lookbehind rejects the usual case (no backslash) at once; fixed-width ones then
# count runs of 1, 3, 5 and 7. A quote after 9 or more backslashes is taken for a
# closing one, which can only misplace a cut (the bytes stay exact).
_ESCAPED = (
    rb"(?<=\\)"
    rb"(?:(?<=[^\\]\\)|(?<=[^\\]\\\\\\)|(?<=[^\\]\\\\\\\\\\)|(?<=[^\\]\\\\\\\\\\\\\\))"
)
# One JSON string, hopping from quote to quote.
_STR = rb'"(?>[^"]*+(?:' + _ESCAPED + rb'"[^"]*+)*+)"'
#: Bracket levels inside an element that the one-call match handles.
_NEST = 16


def _nested(depth: int) -> bytes:
    """The inside of a container: anything, with up to ``depth`` levels of nesting."""
    inner = rb'(?:[^"\[\]{}]++|' + _STR + rb")*+"
    for _ in range(depth):
        inner = rb'(?:[^"\[\]{}]++|' + _STR + rb"|[\[{]" + inner + rb"[\]}])*+"
    return inner


# A value inside a container: stops before a `,` `]` or `}` of its own level (or
# before a bracket nested deeper than _NEST, which sends the caller to the slow path).
_VALUE = re.compile(
    rb'(?:[^"\[\]{},]++|' + _STR + rb"|[\[{]" + _nested(_NEST - 1) + rb"[\]}])*+", re.S
)
# The slow path: hop to the next bracket or comma outside strings.
_HOP = re.compile(rb'(?:[^"\[\]{},]++|' + _STR + rb")*+([\[\]{},])?", re.S)
_OPEN = re.compile(rb"[ \t\r\n]*\{")
_KEY = re.compile(rb'[ \t\r\n]*"((?:[^"\\]|\\.)*)"[ \t\r\n]*:[ \t\r\n]*', re.S)
_OBJECT_NEXT = re.compile(rb"[ \t\r\n]*([,}])")
_ARRAY_NEXT = re.compile(rb"[ \t\r\n]*([,\]])")
_WS = re.compile(rb"[ \t\r\n]*")
_WS_BYTES = frozenset(b" \t\r\n")
#: The last byte of an element whose end does not depend on what follows it.
_CLOSING = frozenset(b'}]"')


class _Unparsable(Exception):
    """The JSON scan cannot go on; the rest of the body becomes plain chunks."""


@dataclass(frozen=True, slots=True)
class Split:
    """Where one body is cut, and where the scan of a later body may take over from it."""

    #: The cut offsets: 0, ..., len(body), strictly increasing.
    cuts: list[int]
    #: Offsets just after an element of a top-level conversation array that ends in
    #: ``}``, ``]`` or ``"`` (ascending). Such an element ends there whatever follows,
    #: so a body that starts with the same bytes up to one of these offsets is cut
    #: there exactly as this one was: :func:`continue_split` scans only the rest.
    resumes: list[int]
    #: The top-level members the scan read, in order: each key's bytes as written
    #: (escapes undone by no one) and the offset its value starts at. Complete only when
    #: the scan reached the end of the object (``tvgate.translate.history`` checks it
    #: against the parsed body).
    members: list[tuple[bytes, int]] = field(default_factory=list)


def split_offsets(raw: bytes) -> list[int]:
    """The cut offsets of a body: 0, ..., len(raw), strictly increasing.

    Part *i* is ``raw[offsets[i]:offsets[i + 1]]``; an empty body gives ``[0]``.
    """
    return split_body(raw).cuts


def split_body(raw: bytes) -> Split:
    """Scan a whole body: its cuts, and the offsets a later body may resume at."""
    return _split(raw, 0, [0], [], [])


def continue_split(raw: bytes, previous: Split, resume: int) -> Split:
    """Split ``raw``, which starts with the same bytes as ``previous``'s body up to ``resume``.

    ``resume`` must be one of ``previous.resumes``. Only ``raw[resume:]`` is scanned;
    the cuts before it are ``previous``'s, which a whole scan of ``raw`` would find
    too (up to the step budget, which each scan has anew).
    """
    index = bisect.bisect_left(previous.cuts, resume)
    if index == len(previous.cuts) or previous.cuts[index] != resume:
        raise ValueError(f"offset {resume} is not a cut of the previous body")
    resumes = previous.resumes[: bisect.bisect_right(previous.resumes, resume)]
    if not resumes or resumes[-1] != resume:
        raise ValueError(f"offset {resume} is not where the previous body's scan can resume")
    members = [member for member in previous.members if member[1] < resume]
    return _split(raw, resume, previous.cuts[: index + 1], resumes, members)


def _split(
    raw: bytes, start: int, cuts: list[int], resumes: list[int], members: list[tuple[bytes, int]]
) -> Split:
    """Scan ``raw[start:]`` (the whole body from 0, or the rest after a resume offset)."""
    # The big strings are most of a body's bytes. One pass finds them; the structure
    # is then parsed in a skeleton where each is an empty string `""`, a tenth of the
    # body, instead of hopping over them a second time. Offsets in the skeleton are
    # relative to `start`.
    bigs = [(begin - start, end - start) for begin, end in _big_strings(raw, start)]
    holes: list[int] = []  # where each big string's `""` starts in the skeleton
    shifts: list[int] = []  # bytes removed up to and including each big string
    view = memoryview(raw)[start:]
    if bigs:
        pieces: list[bytes | memoryview] = []
        previous = removed = 0
        for begin, end in bigs:
            pieces += (view[previous:begin], b'""')
            holes.append(begin - removed)
            removed += end - begin - 2
            shifts.append(removed)
            previous = end
        pieces.append(view[previous:])
        skeleton = b"".join(pieces)
    else:
        skeleton = raw if start == 0 else view.tobytes()
    scan = _Scan(skeleton, holes)
    # On a syntax error the cuts made so far stay: the rest is one tail, chunked below.
    with contextlib.suppress(_Unparsable):
        if start:
            scan.resume()
        else:
            scan.object()

    def to_raw(offset: int) -> int:
        return start + (_raw_offset(offset, holes, shifts, bigs) if bigs else offset)

    kept = len(cuts) - 1  # the cuts before it were capped already
    cuts.extend(to_raw(cut) for cut in scan.cuts[1:])
    resumes.extend(to_raw(offset) for offset in scan.resumes)
    members.extend((key, to_raw(offset)) for key, offset in scan.seen)
    if cuts[-1] != len(raw):
        cuts.append(len(raw))
    return Split(_cap_parts(cuts, kept), resumes, members)


_big_scans: dict[int, re.Pattern[bytes]] = {}


def _big_strings(raw: bytes, pos: int = 0) -> list[tuple[int, int]]:
    """The spans of the strings of at least :data:`BIG_STRING` bytes, quotes included,
    from ``pos`` (outside any string) on."""
    scan = _big_scans.get(BIG_STRING)
    if scan is None:
        # Strings that close, unescaped, within BIG_STRING bytes are passed over inside
        # the regex engine; the rest (big ones, and small ones holding an escaped
        # quote) come back here to be measured.
        small = rb'"[^"]{0,%d}+(?<!\\)"' % max(BIG_STRING - 3, 0)
        scan = _big_scans[BIG_STRING] = re.compile(
            rb'(?:[^"]++|' + small + rb")*+(" + _STR + rb")?", re.S
        )
    found: list[tuple[int, int]] = []
    for _ in range(SCAN_BUDGET):  # past it, big strings further on are not cut out
        match = scan.match(raw, pos)
        assert match is not None  # the pattern matches the empty string at least
        start, end = match.span(1)
        if start < 0:
            break  # the end, or an unterminated string
        if end - start >= BIG_STRING:
            found.append((start, end))
        pos = end
    return found


def _raw_offset(
    offset: int, holes: list[int], shifts: list[int], bigs: list[tuple[int, int]]
) -> int:
    """Map an offset in the skeleton back to the body."""
    index = bisect.bisect_right(holes, offset) - 1
    if index < 0:
        return offset
    if offset < holes[index] + 2:  # on the `""` itself: only a malformed body cuts there
        return bigs[index][0] + offset - holes[index]
    return offset + shifts[index]


class _Scan:
    """The structural scan of one skeleton: where it cuts, within a step budget."""

    __slots__ = ("budget", "cuts", "data", "holes", "resumes", "seen")

    def __init__(self, data: bytes, holes: list[int]) -> None:
        self.data = data
        self.holes = holes
        self.cuts = [0]
        self.resumes: list[int] = []
        self.seen: list[tuple[bytes, int]] = []  # the members read: (key, value offset)
        self.budget = SCAN_BUDGET

    def step(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _Unparsable  # a hostile shape: a million tiny elements or brackets

    def cut(self, offset: int) -> None:
        if offset > self.cuts[-1]:
            self.cuts.append(offset)

    def object(self) -> None:
        """Scan the top-level object."""
        data = self.data
        opened = _OPEN.match(data)
        if opened is None:
            raise _Unparsable
        pos = opened.end()
        if data[self.skip(pos) : self.skip(pos) + 1] == b"}":
            return  # {}
        self.members(pos)

    def resume(self) -> None:
        """Scan on from offset 0, just after an element of a top-level conversation array."""
        after = _ARRAY_NEXT.match(self.data, 0)
        if after is None:
            raise _Unparsable
        end = after.end() if after.group(1) == b"]" else self.elements(after.end())
        self.members_after(end)

    def members(self, pos: int) -> None:
        """The top-level object's members from the one whose key starts at ``pos``."""
        data = self.data
        while True:
            self.step()
            member = _KEY.match(data, pos)
            if member is None:
                raise _Unparsable
            key = member.group(1)
            start = member.end()
            self.seen.append((key, start))
            if key in CONVERSATION_KEYS and data[start : start + 1] == b"[":
                end = self.array(start + 1)
            else:
                end = self.value_end(start)
                if key in WHOLE_KEYS or key in CONVERSATION_KEYS:
                    self.cut(start)
                    self.cut(end)
            after = _OBJECT_NEXT.match(data, end)
            if after is None:
                raise _Unparsable
            if after.group(1) == b"}":
                return
            pos = after.end()

    def members_after(self, end: int) -> None:
        """The members after a value that ends at ``end``."""
        after = _OBJECT_NEXT.match(self.data, end)
        if after is None:
            raise _Unparsable
        if after.group(1) == b",":
            self.members(after.end())

    def array(self, pos: int) -> int:
        """Cut a conversation array whose ``[`` ends at ``pos``, and around the big
        strings in its elements; return the offset after its ``]``."""
        self.cut(pos)
        first = self.skip(pos)
        if self.data[first : first + 1] == b"]":
            return first + 1  # []
        return self.elements(pos)

    def elements(self, pos: int) -> int:
        """The elements of a conversation array from the one at ``pos``; return the
        offset after the array's ``]``."""
        data, holes = self.data, self.holes
        while True:
            self.step()
            start = pos
            end = self.value_end(pos)
            index = bisect.bisect_left(holes, start)
            while index < len(holes) and holes[index] < end:
                self.cut(holes[index])
                self.cut(holes[index] + 2)
                index += 1
            self.cut(end)
            if data[end - 1] in _CLOSING:
                self.resumes.append(end)
            after = _ARRAY_NEXT.match(data, end)
            if after is None:
                raise _Unparsable
            if after.group(1) == b"]":
                return after.end()
            pos = after.end()

    def skip(self, pos: int) -> int:
        match = _WS.match(self.data, pos)
        return match.end() if match else pos

    def value_end(self, pos: int) -> int:
        """Where the value starting at ``pos`` (after optional whitespace) ends."""
        data = self.data
        match = _VALUE.match(data, pos)
        assert match is not None  # the pattern matches the empty string at least
        end = match.end()
        following = data[end : end + 1]
        if following in (b"[", b"{"):
            end = self.value_end_slow(pos)  # nested deeper than _NEST
        elif following not in (b",", b"]", b"}"):
            raise _Unparsable  # an unterminated string, or the end of the body
        while end > pos and data[end - 1] in _WS_BYTES:
            end -= 1
        if end == pos:
            raise _Unparsable  # an empty value: `[,` or `: ,`
        return end

    def value_end_slow(self, pos: int) -> int:
        depth = 0
        while True:
            self.step()
            hop = _HOP.match(self.data, pos)
            assert hop is not None
            char = hop.group(1)
            if char is None:
                raise _Unparsable
            if char in b"[{":
                depth += 1
            elif depth == 0:
                return hop.start(1)  # `,` `]` or `}` of the value's own level
            elif char != b",":
                depth -= 1
            pos = hop.end()


def _cap_parts(cuts: list[int], start: int = 0) -> list[int]:
    """``cuts`` with a cut every :data:`MAX_PART` bytes in longer parts, from ``cuts[start]`` on."""
    if max(map(operator.sub, cuts[start + 1 :], cuts[start:-1]), default=0) <= MAX_PART:
        return cuts
    capped = cuts[: start + 1]
    for end in cuts[start + 1 :]:
        while end - capped[-1] > MAX_PART:
            capped.append(capped[-1] + MAX_PART)
        capped.append(end)
    return capped
