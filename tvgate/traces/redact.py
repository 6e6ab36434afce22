"""Secrets out of traces: finds keys, tokens and private keys in JSON bytes and masks them.

This module owns what counts as a secret in a trace and how it is replaced. A
:class:`Redactor` is built once per org (its provider keys' plaintexts and its
admin's patterns) and then applied to every request body and reassembled answer
before they are stored. Each secret becomes ``[REDACTED:<kind>]``.

What is found
    ``anthropic-key``          ``sk-ant-`` and 20 or more token characters
    ``openai-key``             ``sk-`` (``sk-proj-``, ``sk-svcacct-``...) and 20 or
                               more token characters mixing upper and lower case
    ``github-token``           ``ghp_ gho_ ghu_ ghs_ ghr_`` and 36 or more letters
                               or digits; ``github_pat_`` and 22 or more
    ``aws-access-key-id``      ``AKIA`` or ``ASIA`` and 16 upper-case letters or
                               digits
    ``aws-secret-access-key``  40 or more base64 characters after a label:
                               ``secret access key`` or ``aws secret key`` in
                               any case and spelling (``aws_secret_access_key =``,
                               ``"SecretAccessKey": "``, ``AWS_SECRET_KEY=``);
                               the label stays
    ``private-key``            a PEM ``-----BEGIN ... PRIVATE KEY-----`` block to
                               its ``-----END`` line, also written with ``\\n``
                               escapes inside a JSON string; a block without its
                               END line is masked up to the first character a
                               PEM block cannot hold (so maybe some text after it)
    ``provider-key``           the org's provider keys, exactly (also JSON-escaped);
                               strings shorter than 8 characters are ignored: they
                               are not secrets worth mangling every trace for
    ``custom``                 the admin's patterns

Boundaries (no false positives on prose and code)
    An OpenAI ``sk-`` key must not follow a letter, digit, ``_`` or ``-`` (it may
    follow a JSON escape such as ``\\n``), so ``task-sk-list`` or ``risk-...`` are
    not keys, and it needs both letter cases, because kebab-case names
    (``sk-folding-cube-animation``) have one; a real key (48 random characters or
    more) lacks one with odds near 1e-11, and the org's own keys are matched
    exactly anyway. ``sk-ant-``, ``gh?_`` and ``github_pat_`` are distinctive
    enough with 20 to 36 characters after them to need no left boundary. An AWS key
    id must not touch a letter or digit on either side. Token bodies are taken
    whole (a key glued to more token characters is masked with them).

Staying valid JSON
    The built-in patterns can only match ``"``-free, whole-escape text: their
    characters exclude ``"`` and ``\\``, except that a private key block takes the
    escapes ``\\n \\r \\t \\/ \\\\`` whole, and none starts on a letter that can end
    a JSON escape. Literal keys are searched in their JSON-escaped form, and a
    match starting on the second character of an escape takes the backslash too.
    An admin pattern may match anything, so its matches are trimmed: a match
    inside one string grows to whole escapes and whole UTF-8 characters; one that
    touches a quote, or could lie outside strings, keeps only what lies inside
    strings (found by scanning the body's strings, only then); structural JSON is
    never replaced. Overlapping matches merge into one marker.

Speed
    Python's ``re`` searches a pattern that starts with a literal at memchr-like
    speed but walks a pattern that starts with an alternation character by
    character (far slower: bench/README.md), so the built-ins run as five
    literal-prefixed passes rather than one alternation, and the case-insensitive
    AWS label is only tried where a literal search found ``ecret`` or ``ECRET``
    (past 64 of those, in one search of a lower-cased copy).
    Literal keys are grouped by their first three bytes (the regex parser factors
    a shared prefix out of an alternation). Everything is compiled in the
    constructor.
    The built-ins are ours and linear: every unbounded repeat is possessive, the
    lookarounds are fixed-width or scan one token run, and the AWS label is matched
    within a bounded reach of each hit.

Admin patterns
    RE2 syntax (``google-re2``), matched against the body as UTF-8 text (``.`` and
    classes take whole characters, ``\\w`` and ``\\d`` are ASCII; offsets are in
    bytes). The admin is not trusted to write patterns that are fast: RE2 runs
    any pattern in time linear in the body (a DFA, no backtracking), so ``(a|a)*b``
    or ``\\w*\\w*!`` cost what a simple pattern costs. What RE2 cannot run that way
    (backreferences, lookaround, possessive and atomic repeats) does not compile and
    is refused (ValueError, with RE2's reason), as is a pattern longer than
    :data:`MAX_PATTERN_LENGTH`, one that compiles to more than
    :data:`MAX_PROGRAM_SIZE` instructions (when RE2's DFA runs out of memory it
    falls back to a simulation whose cost per byte grows with the program), and
    one that matches the empty string.

    Searching for every match one after another is not linear even with RE2: each
    search may read to the end of the body before it settles on a match
    (``a.*b|a`` on a run of ``a``: every ``a`` matches, and each search looks for
    a ``b`` first), so a body of n matches costs n times its length. Each search
    therefore reads a window of twice :data:`MATCH_REACH` bytes (a match at most
    that long is found whole, a longer one may be cut), and past
    :data:`MAX_MATCHES` matches in one body (all patterns together) a pattern masks
    everything from its next match on (masking too much is safer than letting a
    secret after those matches through). A body then costs each pattern time linear
    in its length: a DFA pass in the common case, and at worst, when RE2's DFA runs
    out of memory, a simulation whose cost per byte grows with the program's size,
    which :data:`MAX_PROGRAM_SIZE` bounds (figures in bench/README.md). RE2 releases
    the GIL while it searches.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import orjson
import re2

__all__ = [
    "MATCH_REACH",
    "MAX_MATCHES",
    "MAX_PATTERNS",
    "MAX_PATTERN_LENGTH",
    "MAX_PROGRAM_SIZE",
    "MIN_LITERAL_LENGTH",
    "Redactor",
    "builtin_kinds",
    "invalid_patterns",
]

#: Admin patterns: at most this many, each at most this long.
MAX_PATTERNS = 100
MAX_PATTERN_LENGTH = 500
#: RE2 instructions an admin pattern may compile to: ``\w{64}`` is about 200, a
#: ``\pL`` class alone about 1200 (Unicode tables).
MAX_PROGRAM_SIZE = 1000
#: How far a search for an admin pattern reads past where it starts, and how many
#: matches of the admin patterns in one body are looked for one by one (see the
#: module doc).
MATCH_REACH = 4096
MAX_MATCHES = 10_000
#: Literal keys shorter than this are ignored.
MIN_LITERAL_LENGTH = 8

_BUILTIN_KINDS = (
    "anthropic-key",
    "openai-key",
    "github-token",
    "aws-access-key-id",
    "aws-secret-access-key",
    "private-key",
)


def builtin_kinds() -> list[str]:
    """The kinds of secret found without configuration, as they appear in markers."""
    return list(_BUILTIN_KINDS)


def _marker(kind: str) -> bytes:
    return b"[REDACTED:" + kind.encode() + b"]"


_TOKEN = rb"[A-Za-z0-9_\-]"


def _after(prefix: bytes, before: bytes = rb"[A-Za-z0-9_\-]") -> bytes:
    """Lookbehinds placed after ``prefix``: it must not follow a ``before`` character,
    unless that character ends a JSON escape (``\\n``, ``\\r``, ``\\t``).

    Put after the literal rather than in front of it so that the pattern still
    starts with a literal, which ``re`` searches fast.
    """
    return rb"(?:(?<!" + before + prefix + rb")|(?<=\\[nrt]" + prefix + rb"))"


# One pass per literal prefix; the named group that matched gives the kind.
_SK = re.compile(
    rb"sk-(?:"
    # `sk-ant-` is distinctive enough to need no boundary: a key glued to a word
    # (`xsk-ant-...`) is still masked
    rb"(?P<anthropic_key>ant-" + _TOKEN + rb"{20,}+)"
    rb"|" + _after(rb"sk-") + rb"(?P<openai_key>"
    rb"(?=" + _TOKEN + rb"*?[A-Z])(?=" + _TOKEN + rb"*?[a-z])" + _TOKEN + rb"{20,}+))"
)
# Distinctive prefixes with 22 to 36 characters after them: no left boundary either.
_GITHUB = re.compile(rb"gh[pousr]_(?P<github_token>[A-Za-z0-9]{36,}+)")
_GITHUB_PAT = re.compile(rb"github_pat_(?P<github_token>[A-Za-z0-9_]{22,}+)")
_AWS_KEY_ID = re.compile(
    rb"A[KS]IA"
    + _after(rb"A[KS]IA", rb"[A-Za-z0-9]")
    + rb"(?P<aws_access_key_id>[A-Z0-9]{16})(?![A-Za-z0-9])"
)
_PRIVATE_KEY = re.compile(
    rb"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    # base64, PEM headers (Proc-Type: 4,ENCRYPTED), line ends raw or as whole JSON
    # escapes; never a quote, never half an escape
    rb"(?P<private_key>(?:[A-Za-z0-9+/=\s:,]|-(?!----)|\\[nrt/]|\\\\)*+)"
    rb"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----)?"
)
# The label, its separator in the usual notations (JSON, JSON inside JSON, env, ini,
# YAML, code), then the value. Case-insensitive, which `re` cannot search fast: it is
# only tried around each `ecret`/`ECRET`, found by literal searches.
_AWS_SECRET_SOURCE = (
    rb"secret(?:[_\-]?access[_\-]?key|(?<=aws[_\-]secret)[_\-]?key|(?<=awssecret)[_\-]?key)"
    rb"(?:\\*[\"'])?[ \t]*(?:[:=]|=>)[ \t]*(?:\\*[\"'])?"
    # 40 characters, or more when more follow: a labelled value is masked whole
    rb"(?P<aws_secret_access_key>[a-z0-9/+]{40,}+)"
)
_AWS_SECRET = re.compile(_AWS_SECRET_SOURCE, re.IGNORECASE)
_AWS_SECRET_LOWER = re.compile(_AWS_SECRET_SOURCE)
_ECRET = (re.compile(rb"ecret"), re.compile(rb"ECRET"))
#: How far after `ecret` the value may end: the label, quotes, spaces and the value.
_AWS_SECRET_REACH = 4096
#: More `ecret` than this in one body: search a lower-cased copy once instead.
_AWS_SECRET_HITS = 64

# Passes whose whole match is replaced; the named group that took part names the kind.
_WHOLE_MATCH_PASSES = (_SK, _GITHUB, _GITHUB_PAT, _AWS_KEY_ID, _PRIVATE_KEY)
_KIND_OF_GROUP = {kind.replace("-", "_"): kind for kind in _BUILTIN_KINDS}
_MARKERS = {kind: _marker(kind) for kind in (*_BUILTIN_KINDS, "provider-key", "custom")}

# Bytes that valid JSON may hold outside strings: a match made only of these might
# be a number or a literal, not string content.
_STRUCTURAL = b" \t\r\n{}[],:0123456789+-.eEaflnrstu"
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.S)
_BACKSLASH = 0x5C


class _Span(NamedTuple):
    start: int
    end: int
    marker: bytes
    #: Which marker wins when two matches start at one offset and end at one:
    #: the org's own key (0) over a built-in kind (1) over an admin pattern (2).
    rank: int


class Redactor:
    """Masks secrets in JSON bytes or text. Build once, use from any thread."""

    def __init__(self, literals: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self._literals, forms = _compile_literals(literals)
        self._patterns = _compile_patterns(patterns)
        # The built-in patterns never match `"`, `}` or `]`, and look at most one byte
        # past a match (never past a string's closing quote); an org's literal keys are
        # only as safe when no form of them holds those bytes. Admin patterns may match
        # anything.
        self.element_local = not self._patterns and not any(
            byte in form for form in forms for byte in b'"}]'
        )
        """True when no secret this redactor finds can span the end of a JSON array
        element that ends in ``}``, ``]`` or ``"``: redacting the bytes before such an
        end and the bytes after it apart gives the same as redacting them together."""

    def redact_text(self, text: str) -> str:
        """:meth:`redact` for text."""
        encoded = text.encode("utf-8", "surrogatepass")
        redacted = self.redact(encoded)
        return text if redacted is encoded else redacted.decode("utf-8", "surrogatepass")

    def redact(self, data: bytes) -> bytes:
        """``data`` with every secret replaced by its marker; ``data`` itself when none."""
        return self.redact_shifts(data)[0]

    def redact_shifts(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """:meth:`redact`, and where offsets moved: for each marker, the offset just
        after it in the output and the output's length minus the input's up to there."""
        spans = list(self._builtin_spans(data))
        spans.extend(self._literal_spans(data))
        custom: list[tuple[int, int]] = []
        for pattern in self._patterns:
            custom.extend(_admin_matches(pattern, data, MAX_MATCHES - len(custom)))
        if custom:
            spans.extend(_custom_spans(data, custom))
        if not spans:
            return data, []
        return _apply(data, spans)

    def _builtin_spans(self, data: bytes) -> Iterator[_Span]:
        for pattern in _WHOLE_MATCH_PASSES:
            for match in pattern.finditer(data):
                kind = _KIND_OF_GROUP[match.lastgroup or "private_key"]
                yield _Span(match.start(), match.end(), _MARKERS[kind], 1)
        hits = list(
            itertools.islice(
                itertools.chain.from_iterable(word.finditer(data, 1) for word in _ECRET),
                _AWS_SECRET_HITS + 1,
            )
        )
        if len(hits) > _AWS_SECRET_HITS:
            # So many that one search of a lower-cased copy (same offsets) is cheaper.
            found_all: Iterable[re.Match[bytes]] = _AWS_SECRET_LOWER.finditer(data.lower())
        else:
            # The label starts on the "s" before `ecret` (its lookbehinds see "aws").
            found_all = filter(
                None,
                (
                    _AWS_SECRET.match(data, hit.start() - 1, hit.start() + _AWS_SECRET_REACH)
                    for hit in hits
                ),
            )
        for found in found_all:
            start, end = found.span("aws_secret_access_key")
            yield _Span(start, end, _MARKERS["aws-secret-access-key"], 1)

    def _literal_spans(self, data: bytes) -> Iterator[_Span]:
        marker = _MARKERS["provider-key"]
        for pattern in self._literals:
            for match in pattern.finditer(data):
                start = match.start()
                if _inside_escape(data, start):
                    start -= 1  # the match began on the letter of `\n`: take the backslash
                yield _Span(start, match.end(), marker, 0)


def _compile_literals(literals: Iterable[str]) -> tuple[list[re.Pattern[bytes]], set[bytes]]:
    """The searches for the literal keys, and every form of them searched for."""
    forms: set[bytes] = set()
    for literal in literals:
        if not isinstance(literal, str):
            raise TypeError(f"a redaction literal must be a str, not {type(literal).__name__}")
        if len(literal) < MIN_LITERAL_LENGTH:
            continue
        # As the JSON bodies carry it: orjson's escaping (UTF-8 kept) and Python
        # json's (non-ASCII as \\u escapes), and raw when raw cannot break JSON.
        with contextlib.suppress(orjson.JSONEncodeError):  # lone surrogates
            forms.add(orjson.dumps(literal)[1:-1])
        forms.add(json.dumps(literal)[1:-1].encode())
        raw = literal.encode("utf-8", "surrogatepass")
        if b'"' not in raw and b"\\" not in raw:
            forms.add(raw)
    groups: dict[bytes, list[bytes]] = {}
    for form in forms:
        groups.setdefault(form[:3], []).append(form)
    # Longest first, so that a key that extends another is masked whole.
    searches = [
        re.compile(b"|".join(re.escape(form) for form in sorted(group, key=len, reverse=True)))
        for _, group in sorted(groups.items())
    ]
    return searches, forms


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported to the admin, not on stderr
# Memory for the program and the DFA's states, per pattern (RE2's default is 8 MB): an
# org's 100 patterns hold at most about 100 MB, and patterns of MAX_PROGRAM_SIZE
# still run on the DFA as fast as with the default.
_RE2_OPTIONS.max_mem = 1 << 20


def _compile_pattern(pattern: str) -> tuple[Any, str]:
    """``pattern`` compiled by RE2 and "", or None and why it is refused."""
    if not pattern:
        return None, "is empty"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return None, f"is {len(pattern)} characters long; the limit is {MAX_PATTERN_LENGTH}"
    try:
        source = pattern.encode("utf-8")
    except UnicodeEncodeError:
        return None, "holds a lone surrogate, which is not text"
    try:
        regex = re2.compile(source, _RE2_OPTIONS)
    except re2.error as error:
        reason = error.args[0] if error.args else ""
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return None, (
            f"is not RE2 syntax: {reason} (RE2 runs in linear time, so it has no "
            "backreferences, lookaround, possessive or atomic repeats)"
        )
    if regex.programsize > MAX_PROGRAM_SIZE:
        return None, (
            f"compiles to {regex.programsize} RE2 instructions; the limit is "
            f"{MAX_PROGRAM_SIZE} (use smaller repeat counts or classes)"
        )
    if regex.match(b"") is not None:
        return None, "matches the empty string"
    return regex, ""


def invalid_patterns(patterns: Iterable[str]) -> list[tuple[str, str]]:
    """The patterns among ``patterns`` that a :class:`Redactor` refuses, each with why."""
    return [(pattern, reason) for pattern in patterns if (reason := _compile_pattern(pattern)[1])]


def _compile_patterns(patterns: Iterable[str]) -> list[Any]:
    """Each pattern compiled by RE2; ValueError naming the first one refused and why."""
    compiled: list[Any] = []
    for number, pattern in enumerate(patterns, 1):
        if not isinstance(pattern, str):
            raise ValueError(f"redaction pattern {number} must be a string")
        if number > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} redaction patterns are allowed")
        regex, reason = _compile_pattern(pattern)
        if regex is None:
            # Shown as it was given, a lone surrogate escaped: errors are sent as JSON.
            shown = pattern.encode("utf-8", "backslashreplace").decode("utf-8")
            raise ValueError(f"redaction pattern {number} `{shown}` {reason}")
        compiled.append(regex)
    return compiled


def _admin_matches(regex: Any, data: bytes, allowed: int) -> Iterator[tuple[int, int]]:
    """Where an admin pattern matches ``data``, in time bounded by its length.

    Each search reads at most ``2 * MATCH_REACH`` bytes: without a match in them the
    next search starts ``MATCH_REACH`` further on, so a match at most that long is
    never missed; one that reaches the end of its window may go on, so it is looked
    for again from its start. Past ``allowed`` matches, the rest of ``data`` is one
    span (masked inside strings).
    """
    # One unbounded search first: most bodies hold no match, and it finds that in one
    # pass; none starts before the first one it finds.
    first = regex.search(data)
    if first is None:
        return
    size = len(data)
    position, found = first.start(), 0
    while position < size:
        window = min(size, position + 2 * MATCH_REACH)
        match = regex.search(data, position, window)
        if match is None:
            if window == size:
                return
            position += MATCH_REACH
            continue
        start, end = match.span()
        if end == window < size and start > position:
            position = start  # it may go on past the window: search again from its start
            continue
        found += 1
        if found > allowed:
            yield start, size
            return
        yield start, end
        position = end if end > start else end + 1


def _inside_escape(data: bytes, position: int) -> bool:
    """Whether ``data[position]`` is the letter of a two-character escape (``\\n``)."""
    run = 0
    while position - run > 0 and data[position - run - 1] == _BACKSLASH:
        run += 1
    return run % 2 == 1


def _escape_start(data: bytes, position: int) -> int:
    """The start of the escape (``\\n``, ``\\uXXXX``) that ``position`` lies inside,
    or ``position`` when it starts a character."""
    for back in range(1, 7):
        index = position - back
        if index < 0 or data[index] != _BACKSLASH:
            continue
        if _inside_escape(data, index):
            return position  # the nearest backslash is the second half of `\\`
        length = 6 if data[index + 1 : index + 2] == b"u" else 2
        return index if index + length > position else position
    return position


def _align(data: bytes, start: int, end: int) -> tuple[int, int]:
    """Grow a span to whole JSON escapes and whole UTF-8 characters."""
    start = _escape_start(data, start)
    inner = _escape_start(data, end)
    if inner != end:
        end = inner + (6 if data[inner + 1 : inner + 2] == b"u" else 2)
    while start > 0 and 0x80 <= data[start] < 0xC0:
        start -= 1
    while end < len(data) and 0x80 <= data[end] < 0xC0:
        end += 1
    return start, end


def _custom_spans(data: bytes, matches: list[tuple[int, int]]) -> list[_Span]:
    marker = _MARKERS["custom"]
    spans: list[_Span] = []
    hard: list[tuple[int, int]] = []
    for start, end in matches:
        if start == end:
            continue  # an empty match elsewhere than at the start: nothing to mask
        text = data[start:end]
        # No quote, and a byte that valid JSON cannot hold outside a string: the match
        # lies inside one string (or the data is not JSON).
        if b'"' not in text and text.translate(None, _STRUCTURAL):
            spans.append(_Span(*_align(data, start, end), marker, 2))
        else:
            hard.append((start, end))
    if hard:
        if _is_json(data):
            spans.extend(_Span(*span, marker, 2) for span in _clip_to_strings(data, hard))
        else:
            spans.extend(_Span(*_align(data, start, end), marker, 2) for start, end in hard)
    return spans


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but json takes: lone surrogates as \\u escapes
            json.loads(data)
        except ValueError:
            return False
    return True


def _clip_to_strings(data: bytes, matches: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The parts of ``matches`` that lie inside JSON strings, aligned."""
    last = max(end for _, end in matches)
    starts: list[int] = []
    ends: list[int] = []
    for string in _JSON_STRING.finditer(data):
        if string.start() >= last:
            break
        starts.append(string.start() + 1)
        ends.append(string.end() - 1)
    for start, end in matches:
        index = bisect.bisect_right(ends, start)  # the first string ending after `start`
        while index < len(starts) and starts[index] < end:
            low, high = max(start, starts[index]), min(end, ends[index])
            if low < high:
                yield _align(data, low, high)
            index += 1


def _apply(data: bytes, spans: list[_Span]) -> tuple[bytes, list[tuple[int, int]]]:
    """Replace the spans (merged where they overlap); see :meth:`Redactor.redact_shifts`."""
    spans.sort(key=lambda span: (span.start, -span.end, span.rank))
    pieces: list[bytes] = []
    shifts: list[tuple[int, int]] = []
    position = length = 0
    current: _Span | None = None
    for span in [*spans, None]:
        if span is not None and current is not None and span.start < current.end:
            if span.end > current.end:
                current = current._replace(end=span.end)
            continue
        if current is not None:
            pieces += (data[position : current.start], current.marker)
            length += current.start - position + len(current.marker)
            position = current.end
            shifts.append((length, length - position))
        current = span
    pieces.append(data[position:])
    return b"".join(pieces), shifts
