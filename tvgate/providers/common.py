"""What every provider API's answer reading shares: usage, the assembled answer, the bounds.

An API module (``tvgate.providers.anthropic``, ...) reads a provider's response body,
streamed or not, into an :class:`Assembled`: the answer in the shape the provider's
*non-streaming* API returns it, the token usage, ids, stop reason and any in-stream
error. It is what a trace records of a call, whichever way the client asked for it.
This module owns what those readers have in common: :class:`Usage` and
:func:`checked_usage`, :class:`SSEStream` (the base of every stream assembler), the
reading of a whole JSON body (:func:`assemble_body`) and of the tail of one too large
to keep (:func:`assemble_tail`).

Streamed bodies are fed chunk by chunk as they pass through the proxy, so the
assemblers do one JSON parse per event, keep no copy of the raw stream, and
retain at most ``max_retained`` characters of answer: past that, text is cut
and ``Assembled.truncated`` says so. A stream that ends early keeps what
arrived, with ``complete`` False. Malformed events are skipped, never raised.

Token counts are as the provider reports them: Anthropic's ``input_tokens``
excludes cached tokens, OpenAI's ``prompt_tokens`` includes them. A provider may
be a member's own server, so :func:`checked_usage` keeps only figures a real call
can have: a negative or absurd one counts as 0 and is named as an anomaly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Protocol

import orjson

from tvgate.providers.base import JSON
from tvgate.traces.sse import SSEParser

if TYPE_CHECKING:
    from tvgate.providers.base import ProviderAPI

#: Characters of answer an assembler keeps before it cuts (and marks) the rest.
MAX_RETAINED = 64 * 1024 * 1024
#: Bytes of the end of a JSON answer too large to keep whole that are kept to read its
#: usage from: every API puts ``usage`` after the bulk (choices, content, embeddings),
#: and a usage object is well under 1 KiB.
JSON_TAIL_BYTES = 64 * 1024
#: Occurrences of a key looked at, from the end of the tail back, before giving up.
_TAIL_TRIES = 8

#: What a handler may raise on an event of unexpected shape; such events are skipped.
MALFORMED = (KeyError, TypeError, IndexError, AttributeError, ValueError)


@dataclass(slots=True)
class Usage:
    """Token counts of one call; zero where the provider did not say."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


#: The largest token count one figure of one call may have: a hundred times the
#: largest context window sold today, and small enough that the five figures summed
#: fit a 32-bit column.
MAX_TOKENS = 100_000_000
_USAGE_FIELDS = tuple(f.name for f in fields(Usage))


def checked_usage(usage: Usage) -> tuple[Usage, list[str]]:
    """``usage`` with every figure outside 0..MAX_TOKENS set to 0, and the anomalies
    (``"usage.input_tokens out of range"``) naming them."""
    wrong = [name for name in _USAGE_FIELDS if not 0 <= getattr(usage, name) <= MAX_TOKENS]
    if not wrong:
        return usage, []
    return replace(usage, **dict.fromkeys(wrong, 0)), [
        f"usage.{name} out of range" for name in wrong
    ]


@dataclass(slots=True)
class Assembled:
    """What a trace records of a call's answer."""

    #: The answer as the provider's non-streaming API would have returned it.
    response: JSON | None
    usage: Usage = field(default_factory=Usage)
    message_id: str | None = None
    model: str | None = None
    stop_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    #: The terminal event arrived (for a JSON body: it parsed).
    complete: bool = False
    #: Part of the answer was dropped to bound memory (text cap or an oversized event).
    truncated: bool = False


class StreamAssembler(Protocol):
    """Fed a streamed body chunk by chunk; :meth:`finish` may be called more than once."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Assembled: ...

    @property
    def retained(self) -> int:
        """Characters of answer (text and kept structures) held so far."""
        ...


def assemble_body(api: ProviderAPI, body: bytes) -> Assembled:
    """Read a non-streamed response body of ``api``; never raises on what the body holds."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Assembled(None)
    if not isinstance(obj, dict):
        return Assembled(None)
    err = obj.get("error")
    if obj.get("type") == "error" or (
        isinstance(err, dict) and "object" not in obj and "id" not in obj
    ):
        etype, emsg = error_fields(err)
        return Assembled(None, error_type=etype, error_message=emsg, complete=True)
    try:
        return api.assemble(obj)
    except MALFORMED:
        return Assembled(None)


def assemble_tail(api: ProviderAPI, tail: bytes) -> Assembled:
    """What the end of a JSON answer too large to keep whole says: its usage and, where it
    comes after the bulk (an embeddings list), its model. Always marked truncated.

    The head is gone, so the body cannot be parsed; the last ``"usage"`` key of the tail
    whose value parses as an object is taken. A provider could put a fake one there, as it
    could put false figures in a whole answer: :func:`checked_usage` bounds both.
    """
    text = tail.decode("utf-8", "replace")
    usage = _last_value(text, "usage")
    model = _last_value(text, "model")
    return Assembled(
        None,
        api.read_usage(usage) if isinstance(usage, dict) else Usage(),
        model=as_str(model),
        truncated=True,
    )


_DECODER = json.JSONDecoder()


def _last_value(text: str, key: str) -> object:
    """The value of the last ``"key": value`` in ``text`` that parses, else None."""
    needle = f'"{key}"'
    end = len(text)
    for _ in range(_TAIL_TRIES):
        at = text.rfind(needle, 0, end)
        if at == -1:
            return None
        end = at
        pos = at + len(needle)
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text) or text[pos] != ":":
            continue  # a string value, not a key
        pos += 1
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        try:
            value, _ = _DECODER.raw_decode(text, pos)
        except ValueError:
            continue
        return value
    return None


def as_int(v: object) -> int:
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        # 1e400 parses as infinity; -1 is out of range, so checked_usage names it.
        return int(v) if math.isfinite(v) else -1
    return 0


def as_str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def event_index(v: object) -> int:
    """An event's index field; anything else makes the event malformed."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    raise TypeError("index is not a non-negative integer")


def sub_object(d: JSON, key: str) -> JSON:
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def error_fields(err: object) -> tuple[str | None, str | None]:
    if not isinstance(err, dict):
        return None, None
    code = err.get("code")
    # Some OpenAI-compatible servers give an HTTP status as the code.
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    return as_str(err.get("type")) or as_str(code), as_str(err.get("message"))


class SSEStream:
    """SSE in, one orjson parse per event, a bounded budget of retained text."""

    __slots__ = ("_budget", "_error", "_max_retained", "_parser", "_result", "_truncated")

    def __init__(self, max_retained: int) -> None:
        self._parser = SSEParser()
        self._max_retained = max_retained
        self._budget = max_retained
        self._truncated = False
        self._error: tuple[str | None, str | None] | None = None
        self._result: Assembled | None = None

    def feed(self, chunk: bytes) -> None:
        if self._result is not None:
            return
        # One JSON parse per event; this loop runs for every event of every stream.
        on_event = self._on_event
        loads = orjson.loads
        for ev in self._parser.feed(chunk):
            data = ev.data
            try:
                obj = loads(data)
            except orjson.JSONDecodeError:
                self._on_text(data)
                continue
            if type(obj) is dict:  # orjson makes plain dicts
                # Not contextlib.suppress: that builds a context manager per event.
                try:  # noqa: SIM105
                    on_event(ev.event, obj, len(data))
                except MALFORMED:
                    pass

    def finish(self) -> Assembled:
        if self._result is None:
            self._parser.close()
            try:
                result = self._build()
            except MALFORMED:
                result = Assembled(None)
            if self._error is not None:
                result.error_type, result.error_message = self._error
            result.truncated = self._truncated or self._parser.overflowed
            self._result = result
        return self._result

    @property
    def retained(self) -> int:
        return self._max_retained - self._budget

    def _on_text(self, data: bytes) -> None:
        """A non-JSON event, such as ``[DONE]``."""

    def _on_event(self, name: str | None, obj: JSON, size: int) -> None:
        raise NotImplementedError

    def _build(self) -> Assembled:
        raise NotImplementedError

    def _take(self, s: object) -> str:
        """``s``, or as much of it as the budget allows."""
        if not isinstance(s, str):
            raise TypeError("text delta is not a string")
        n = len(s)
        if n <= self._budget:
            self._budget -= n
            return s
        s = s[: self._budget]
        self._budget = 0
        self._truncated = True
        return s

    def _charge(self, n: int) -> bool:
        """Whether an ``n``-byte structure may be kept."""
        if n <= self._budget:
            self._budget -= n
            return True
        self._truncated = True
        return False

    def _refund(self, parts: list[str]) -> None:
        self._budget += sum(map(len, parts))
