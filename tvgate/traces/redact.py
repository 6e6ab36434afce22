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
    character (more than ten times slower), so the built-ins run as five
    literal-prefixed passes rather than one alternation, and the case-insensitive
    AWS label is only tried where a literal search found ``ecret`` or ``ECRET``
    (past 64 of those, in one search of a lower-cased copy).
    Literal keys are grouped by their first three bytes (the regex parser factors
    a shared prefix out of an alternation). Everything is compiled in the
    constructor. About 0.6 ms for a 190 KB body on the build machine.

Admin patterns
    Python regular expressions, matched against the UTF-8 bytes (so ``\\w`` and
    ``\\d`` are ASCII). ``re`` has no time limit, and a body is one long line that
    may hold a long base64 run, so a pattern is refused (ValueError, with the
    reason) when it is longer than :data:`MAX_PATTERN_LENGTH`, does not compile,
    matches the empty string, nests a variable repeat inside another repeat
    (``(a+)+``, ``(\\w+\\s?)*``: the shape that backtracks exponentially; make
    the inner repeat possessive, ``a++``, or atomic, ``(?>...)``, if it is meant),
    or fails a timing probe: run on a body-shaped sample, it must cost at most
    :data:`PROBE_MAX_COST` times a literal search, and its time must grow about
    linearly with the sample (a search that is retried at every offset of a long
    run, such as ``.*secret`` or an unanchored ``\\w+@example\\.com``, grows
    with its square; ``(?<![\\w.-])\\w+@example\\.com`` does not). The probe
    costs a few milliseconds per pattern, once per Redactor: build one per
    configuration, not per request.

    A pattern is searched only in a body holding the longest literal its top level
    requires (``@acme.example`` in ``(?<![\\w.-])[\\w.-]+@acme\\.example``), found by
    one fast substring search: a pattern that starts with a character class costs
    tens of times a literal search, because ``re`` retries it at every offset.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib
import itertools
import json
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import orjson

__all__ = ["MAX_PATTERNS", "MAX_PATTERN_LENGTH", "MIN_LITERAL_LENGTH", "Redactor", "builtin_kinds"]

#: Admin patterns: at most this many, each at most this long.
MAX_PATTERNS = 100
MAX_PATTERN_LENGTH = 500
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
        custom = [
            (match.start(), match.end())
            for pattern, required in self._patterns
            if required is None or required in data
            for match in pattern.finditer(data)
        ]
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


def _compile_patterns(patterns: Iterable[str]) -> list[tuple[re.Pattern[bytes], bytes | None]]:
    """Each pattern, checked, with the literal every match of it contains (if any)."""
    compiled: list[tuple[re.Pattern[bytes], bytes | None]] = []
    for number, pattern in enumerate(patterns, 1):
        if not isinstance(pattern, str):
            raise ValueError(f"redaction pattern {number} must be a string")
        if number > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} redaction patterns are allowed")
        if not pattern:
            raise ValueError(f"redaction pattern {number} is empty")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(
                f"redaction pattern {number} is {len(pattern)} characters long; "
                f"the limit is {MAX_PATTERN_LENGTH}"
            )
        try:
            regex = re.compile(pattern.encode("utf-8"))
        except re.error as error:
            raise ValueError(
                f"redaction pattern {number} ({pattern!r}) does not compile: {error}"
            ) from None
        if regex.match(b"") is not None:
            raise ValueError(f"redaction pattern {number} ({pattern!r}) matches the empty string")
        if _nested_repeat(pattern):
            raise ValueError(
                f"redaction pattern {number} ({pattern!r}) repeats a variable repeat, which can "
                "backtrack exponentially; make the inner repeat possessive (a++) or atomic (?>...)"
            )
        problem = _probe(regex)
        if problem:
            raise ValueError(f"redaction pattern {number} ({pattern!r}) {problem}")
        compiled.append((regex, _required_literal(regex)))
    return compiled


def _required_literal(regex: re.Pattern[bytes]) -> bytes | None:
    """The longest literal run (3 bytes or more) at the top level of ``regex``.

    Every match contains it, so a body without it cannot match: one fast substring
    search then replaces a regex search that is tried at every offset (``\\w+@x``
    costs tens of times a literal search).
    """
    if regex.flags & re.IGNORECASE:
        return None
    try:
        parser: Any = importlib.import_module("re._parser")
        items = list(parser.parse(regex.pattern, regex.flags))
    except Exception:  # noqa: BLE001 - a private module: without it, no shortcut
        return None
    best = run = b""
    for op, argument in items:
        if str(op) == "LITERAL":
            run += bytes((argument,))
            best = max(best, run, key=len)
        else:
            run = b""
    return best if len(best) >= 3 else None


# The probe: a pattern is timed on a sample shaped like a request body (one line of
# JSON with prose, escaped code, a number list and a base64 run) at two sizes.
#: Slower than this many times a literal search on the small sample: rejected.
PROBE_MAX_COST = 200
#: Time on the sample 8 times larger over time on the small one: about 8 when the
#: pattern is linear, 64 when quadratic (``.*x``, ``[^"]*x``, or ``\w+@`` inside a
#: long base64 run, where the search restarts at every offset of the run).
PROBE_MAX_GROWTH = 24
_PROBE_BASELINE = _SK
_probe_samples: tuple[bytes, bytes] | None = None


def _probe_sample(scale: int) -> bytes:
    prose = b"The quick brown fox jumps over the lazy dog; see https://example.com/a?b=c. " * (
        4 * scale
    )
    code = b"".join(
        b'    def handler_%d(self, request):\\n        return render(\\"page\\", id=%d)\\n' % (i, i)
        for i in range(8 * scale)
    )
    # A deterministic base64-looking run (no randomness: the probe must be repeatable).
    run = b"".join(b"%08X" % (i * 2654435761 % 4294967296) for i in range(128 * scale))
    numbers = b",".join(b"%d" % (i * 7919) for i in range(40 * scale))
    return (
        b'{"model":"m","messages":[{"role":"user","content":"' + prose + b'"},'
        b'{"role":"assistant","content":"' + code + b'"},'
        b'{"type":"image","data":"' + run + b'"}],"n":[' + numbers + b"]}"
    )


def _best_time(regex: re.Pattern[bytes], data: bytes) -> float:
    best = float("inf")
    for _ in range(3):  # best of three: a preempted run must not reject a good pattern
        began = time.perf_counter()
        for _ in regex.finditer(data):
            pass
        best = min(best, time.perf_counter() - began)
    return best


def _probe(regex: re.Pattern[bytes]) -> str:
    """Why ``regex`` is too slow for every request body, or "" when it is not."""
    global _probe_samples
    if _probe_samples is None:
        _probe_samples = (_probe_sample(1), _probe_sample(8))
    small, large = _probe_samples
    cost = _best_time(regex, small)
    if cost > PROBE_MAX_COST * _best_time(_PROBE_BASELINE, small):
        return "is too slow: make it start with a literal or anchor it"
    large_cost = _best_time(regex, large)
    if large_cost > PROBE_MAX_GROWTH * cost and large_cost > 20 * _best_time(
        _PROBE_BASELINE, large
    ):
        return (
            "takes time growing faster than the text (a leading or unbounded repeat that "
            "is retried at every offset); bound it or anchor it, e.g. (?<![\\w.-]) before "
            "a leading \\w+"
        )
    return ""


def _nested_repeat(pattern: str) -> bool:
    """Whether a backtracking repeat holds a variable one (the exponential shape)."""
    try:
        parser: Any = importlib.import_module("re._parser")
        tree = parser.parse(pattern)
    except Exception:  # noqa: BLE001 - a private module: without it, skip the guard
        return False
    return _walk(tree, inside_repeat=False)


def _walk(items: Iterable[Any], inside_repeat: bool) -> bool:
    for op, argument in items:
        name = str(op)
        subpatterns: Iterable[Any]
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, subpattern = argument
            # A variable repeat of more than one (`+`, `*`, `{2,5}`) inside another
            # repeat can split a run in exponentially many ways; `?` cannot.
            if inside_repeat and high != low and high > 1:
                return True
            subpatterns, inside = (subpattern,), inside_repeat or high > 1
        elif name == "SUBPATTERN":
            subpatterns, inside = (argument[3],), inside_repeat
        elif name == "BRANCH":
            subpatterns, inside = argument[1], inside_repeat
        elif name in ("ASSERT", "ASSERT_NOT"):
            subpatterns, inside = (argument[1],), inside_repeat
        elif name == "POSSESSIVE_REPEAT":
            # Never backtracked into, so it splits nothing; what it holds may still.
            subpatterns, inside = (argument[2],), False
        elif name == "ATOMIC_GROUP":
            subpatterns, inside = (argument,), False
        else:
            continue  # literals, classes and anchors hold nothing
        if any(_walk(subpattern, inside) for subpattern in subpatterns):
            return True
    return False


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
