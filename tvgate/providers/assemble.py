"""Rebuilding the final answer of an LLM call from what the provider sent back.

This module owns reading a provider's response body, streamed or not, into an
:class:`Assembled`: the answer in the shape the provider's *non-streaming* API
returns it (an Anthropic Message, an OpenAI ChatCompletion, Response or legacy
Completion), the token usage, ids, stop reason and any in-stream error. It is
what a trace records of a call, whichever way the client asked for it.

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
from typing import Any, Protocol

import orjson

from tvgate.providers import (
    ANTHROPIC_COUNT_TOKENS,
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
)
from tvgate.traces.sse import SSEParser

#: Characters of answer an assembler keeps before it cuts (and marks) the rest.
MAX_RETAINED = 64 * 1024 * 1024
#: Bytes of the end of a JSON answer too large to keep whole that are kept to read its
#: usage from: every API puts ``usage`` after the bulk (choices, content, embeddings),
#: and a usage object is well under 1 KiB.
JSON_TAIL_BYTES = 64 * 1024
#: Occurrences of a key looked at, from the end of the tail back, before giving up.
_TAIL_TRIES = 8

# What a handler may raise on an event of unexpected shape; such events are skipped.
_MALFORMED = (KeyError, TypeError, IndexError, AttributeError, ValueError)

JSON = dict[str, Any]


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


def stream_assembler(api: str, *, max_retained: int = MAX_RETAINED) -> StreamAssembler:
    """A fresh assembler for a streamed response of ``api``."""
    cls = _STREAMS.get(api)
    if cls is None:
        raise ValueError(f"no stream assembler for {api!r}")
    return cls(max_retained)


def assemble_json(api: str, body: bytes) -> Assembled:
    """Read a non-streamed response body; never raises on what the body holds."""
    if api not in _JSON_APIS:
        raise ValueError(f"no assembler for {api!r}")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Assembled(None)
    if not isinstance(obj, dict):
        return Assembled(None)
    try:
        return _assemble_obj(api, obj)
    except _MALFORMED:
        return Assembled(None)


def assemble_json_tail(api: str, tail: bytes) -> Assembled:
    """What the end of a JSON answer too large to keep whole says: its usage and, where it
    comes after the bulk (an embeddings list), its model. Always marked truncated.

    The head is gone, so the body cannot be parsed; the last ``"usage"`` key of the tail
    whose value parses as an object is taken. A provider could put a fake one there, as it
    could put false figures in a whole answer: :func:`checked_usage` bounds both.
    """
    reader = _USAGE_READERS.get(api)
    if reader is None:
        raise ValueError(f"no assembler for {api!r}")
    text = tail.decode("utf-8", "replace")
    usage = _last_value(text, "usage")
    model = _last_value(text, "model")
    return Assembled(
        None,
        reader(usage) if isinstance(usage, dict) else Usage(),
        model=_str(model),
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


def _assemble_obj(api: str, obj: JSON) -> Assembled:
    err = obj.get("error")
    if obj.get("type") == "error" or (
        isinstance(err, dict) and "object" not in obj and "id" not in obj
    ):
        etype, emsg = _error_fields(err)
        return Assembled(None, error_type=etype, error_message=emsg, complete=True)
    if api == ANTHROPIC_MESSAGES:
        return Assembled(
            obj,
            _anthropic_usage(obj.get("usage")),
            _str(obj.get("id")),
            _str(obj.get("model")),
            _str(obj.get("stop_reason")),
            complete=True,
        )
    if api == ANTHROPIC_COUNT_TOKENS:
        return Assembled(None, Usage(input_tokens=_int(obj.get("input_tokens"))), complete=True)
    if api == OPENAI_EMBEDDINGS:
        return Assembled(
            None, _chat_usage(obj.get("usage")), model=_str(obj.get("model")), complete=True
        )
    if api == OPENAI_RESPONSES:
        etype, emsg = _error_fields(err)
        return Assembled(
            obj,
            _responses_usage(obj.get("usage")),
            _str(obj.get("id")),
            _str(obj.get("model")),
            _responses_stop(obj),
            etype,
            emsg,
            complete=True,
        )
    choices = obj.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return Assembled(
        obj,
        _chat_usage(obj.get("usage")),
        _str(obj.get("id")),
        _str(obj.get("model")),
        _str(first.get("finish_reason")) if isinstance(first, dict) else None,
        complete=True,
    )


def _int(v: object) -> int:
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        # 1e400 parses as infinity; -1 is out of range, so checked_usage names it.
        return int(v) if math.isfinite(v) else -1
    return 0


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _index(v: object) -> int:
    """An event's index field; anything else makes the event malformed."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    raise TypeError("index is not a non-negative integer")


def _sub(d: JSON, key: str) -> JSON:
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def _error_fields(err: object) -> tuple[str | None, str | None]:
    if not isinstance(err, dict):
        return None, None
    code = err.get("code")
    # Some OpenAI-compatible servers give an HTTP status as the code.
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    return _str(err.get("type")) or _str(code), _str(err.get("message"))


def _anthropic_usage(u: object) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        _int(u.get("input_tokens")),
        _int(u.get("output_tokens")),
        _int(u.get("cache_read_input_tokens")),
        _int(u.get("cache_creation_input_tokens")),
        _int(_sub(u, "output_tokens_details").get("thinking_tokens")),
    )


def _chat_usage(u: object) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    prompt = _sub(u, "prompt_tokens_details")
    return Usage(
        _int(u.get("prompt_tokens")),
        _int(u.get("completion_tokens")),
        _int(prompt.get("cached_tokens")),
        _int(prompt.get("cache_write_tokens")),
        _int(_sub(u, "completion_tokens_details").get("reasoning_tokens")),
    )


def _responses_usage(u: object) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    details = _sub(u, "input_tokens_details")
    return Usage(
        _int(u.get("input_tokens")),
        _int(u.get("output_tokens")),
        _int(details.get("cached_tokens")),
        _int(details.get("cache_write_tokens")),
        _int(_sub(u, "output_tokens_details").get("reasoning_tokens")),
    )


def _responses_stop(resp: JSON) -> str | None:
    status = _str(resp.get("status"))
    if status == "incomplete":
        return _str(_sub(resp, "incomplete_details").get("reason")) or status
    if status in ("completed", "failed", "cancelled"):
        return status
    return None


class _Stream:
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
                except _MALFORMED:
                    pass

    def finish(self) -> Assembled:
        if self._result is None:
            self._parser.close()
            try:
                result = self._build()
            except _MALFORMED:
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


# Content block deltas that extend a string field of their block.
_ANTHROPIC_TEXT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking"}


class _AnthropicStream(_Stream):
    __slots__ = ("_blocks", "_done", "_json", "_message", "_parts")

    def __init__(self, max_retained: int) -> None:
        super().__init__(max_retained)
        self._message: JSON | None = None
        self._blocks: dict[int, JSON] = {}
        # Per open block: the field its deltas extend ("text"/"thinking") and the pieces.
        self._parts: dict[int, tuple[str, list[str]]] = {}
        # Per open tool block: pieces of its input JSON, parsed when the block stops.
        self._json: dict[int, list[str]] = {}
        self._done = False

    def _msg(self) -> JSON:
        if self._message is None:
            self._message = {"type": "message", "role": "assistant", "content": []}
        return self._message

    def _on_event(self, name: str | None, obj: JSON, size: int) -> None:
        kind = obj.get("type") or name
        if kind == "content_block_delta":
            idx = _index(obj["index"])
            delta = obj["delta"]
            dtype = delta["type"]
            text_field = _ANTHROPIC_TEXT_DELTAS.get(dtype)
            if text_field is not None:
                parts = self._parts.get(idx)
                if parts is not None and parts[0] == text_field:
                    parts[1].append(self._take(delta[text_field]))
            elif dtype == "input_json_delta":
                pieces = self._json.get(idx)
                if pieces is not None:
                    pieces.append(self._take(delta["partial_json"]))
            elif dtype == "signature_delta":
                block = self._blocks.get(idx)
                if block is not None and block.get("type") == "thinking":
                    block["signature"] = delta["signature"]
            elif dtype == "citations_delta":
                block = self._blocks.get(idx)
                if block is not None and block.get("type") == "text" and self._charge(size):
                    citations = block.get("citations")
                    if citations:
                        citations.append(delta["citation"])
                    else:
                        block["citations"] = [delta["citation"]]
        elif kind == "content_block_start":
            idx = _index(obj["index"])
            block = obj["content_block"]
            if not isinstance(block, dict):
                return
            if not self._charge(size):
                return
            self._msg()
            self._blocks[idx] = block
            btype = block.get("type")
            if btype == "text" or btype == "thinking":
                self._parts[idx] = (btype, [])
            elif isinstance(btype, str) and btype.endswith("tool_use"):
                self._json[idx] = []
        elif kind == "content_block_stop":
            self._close_block(obj["index"])
        elif kind == "message_start":
            message = obj["message"]
            if isinstance(message, dict) and self._charge(size):
                self._message = message
                for i, block in enumerate(message.get("content") or ()):
                    if isinstance(block, dict):
                        self._blocks[i] = block
        elif kind == "message_delta":
            msg = self._msg()
            for key, value in _sub(obj, "delta").items():
                # Stop fields are set even when null, as the SDK does; other
                # fields (container) only when given.
                if value is not None or key.startswith("stop_"):
                    msg[key] = value
            usage = msg.get("usage")
            if not isinstance(usage, dict):
                usage = msg["usage"] = {}
            # message_delta usage is cumulative: each given field replaces the
            # message_start value, absent ones leave it.
            for key, value in _sub(obj, "usage").items():
                if value is not None:
                    usage[key] = value
        elif kind == "message_stop":
            self._done = True
        elif kind == "error":
            self._error = _error_fields(obj.get("error"))

    def _close_block(self, idx: object) -> None:
        if not isinstance(idx, int):
            return
        block = self._blocks.get(idx)
        if block is None:
            return
        parts = self._parts.pop(idx, None)
        if parts is not None:
            key, pieces = parts
            start = block.get(key)
            block[key] = (start if isinstance(start, str) else "") + "".join(pieces)
        json_pieces = self._json.pop(idx, None)
        if json_pieces:
            raw = "".join(json_pieces)
            if raw:
                try:
                    block["input"] = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    block["input"] = raw

    def _build(self) -> Assembled:
        for idx in list(self._parts) + list(self._json):
            self._close_block(idx)
        msg = self._message
        if msg is None:
            return Assembled(None, complete=self._done)
        msg["content"] = [self._blocks[i] for i in sorted(self._blocks)]
        return Assembled(
            msg,
            _anthropic_usage(msg.get("usage")),
            _str(msg.get("id")),
            _str(msg.get("model")),
            _str(msg.get("stop_reason")),
            complete=self._done,
        )


class _ChatChoice:
    __slots__ = (
        "audio",
        "audio_parts",
        "calls",
        "content",
        "extra",
        "finish_reason",
        "logprobs",
        "refusal",
        "role",
        "texts",
    )

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        # Other streamed strings, e.g. reasoning_content from OpenAI-compatible servers.
        self.texts: dict[str, list[str]] = {}
        # Tool calls by index: the call, and the (object, field, pieces) its deltas extend.
        self.calls: dict[int, tuple[JSON, str, str, list[str]]] = {}
        self.audio: JSON | None = None
        # Audio output streams its base64 data and transcript in pieces.
        self.audio_parts: dict[str, list[str]] = {}
        self.extra: JSON = {}
        self.finish_reason: str | None = None
        self.logprobs: JSON | None = None


# Top-level chunk fields the completion object does not carry over.
_CHUNK_SKIP = frozenset(("choices", "usage", "object", "obfuscation"))
_STREAMED_STRINGS = frozenset(("reasoning_content", "reasoning"))


class _ChatStream(_Stream):
    """Chat Completions; legacy Completions subclasses it for its ``text`` choices."""

    __slots__ = ("_choices", "_done", "_top", "_usage")

    _OBJECT = "chat.completion"

    def __init__(self, max_retained: int) -> None:
        super().__init__(max_retained)
        self._top: JSON = {}
        self._usage: JSON | None = None
        self._choices: dict[int, _ChatChoice] = {}
        self._done = False

    def _on_text(self, data: bytes) -> None:
        if data.startswith(b"[DONE]"):
            self._done = True

    def _on_event(self, name: str | None, obj: JSON, size: int) -> None:
        err = obj.get("error")
        if err:
            self._error = _error_fields(err)
            return
        top = self._top
        for key, value in obj.items():
            if value is not None and key not in _CHUNK_SKIP:
                top[key] = value
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        for ch in obj.get("choices") or ():
            idx = _index(ch.get("index", 0))
            st = self._choices.get(idx)
            if st is None:
                st = self._choices[idx] = _ChatChoice()
            self._choice(st, ch, size)

    def _choice(self, st: _ChatChoice, ch: JSON, size: int) -> None:
        delta = ch.get("delta")
        if delta:
            for key, value in delta.items():
                if value is None:
                    continue
                if key == "content":
                    if st.content is None:
                        st.content = []
                    st.content.append(self._take(value))
                elif key == "tool_calls":
                    for tc in value:
                        self._tool_call(st, tc, size)
                elif key == "refusal":
                    if st.refusal is None:
                        st.refusal = []
                    st.refusal.append(self._take(value))
                elif key == "role":
                    st.role = value
                elif key in _STREAMED_STRINGS:
                    st.texts.setdefault(key, []).append(self._take(value))
                elif key == "function_call":
                    self._tool_call(st, {"index": -1, "function_call": value}, size)
                elif key == "audio":
                    self._audio(st, value)
                elif isinstance(value, list):
                    if self._charge(size):
                        st.extra.setdefault(key, []).extend(value)
                elif self._charge(size):
                    st.extra[key] = value
        reason = ch.get("finish_reason")
        if reason:
            st.finish_reason = reason
        logprobs = ch.get("logprobs")
        if logprobs and self._charge(size):
            if st.logprobs is None:
                st.logprobs = {}
            for key, value in logprobs.items():
                if isinstance(value, list):
                    have = st.logprobs.get(key)
                    if isinstance(have, list):
                        have.extend(value)
                    else:
                        st.logprobs[key] = list(value)
                elif key not in st.logprobs or value is not None:
                    st.logprobs[key] = value

    def _tool_call(self, st: _ChatChoice, tc: JSON, size: int) -> None:
        idx = tc.get("index", len(st.calls))
        if idx != -1:
            idx = _index(idx)
        entry = st.calls.get(idx)
        if entry is None:
            if not self._charge(size):
                return
            call: JSON = {}
            if tc.get("id") is not None:
                call["id"] = tc["id"]
            sub, stream_field = "function", "arguments"
            if "custom" in tc:
                sub, stream_field = "custom", "input"
            elif "function_call" in tc:
                sub = "function_call"
            if sub != "function_call":
                call["type"] = tc.get("type") or sub
            call[sub] = {}
            entry = st.calls[idx] = (call, sub, stream_field, [])
        call, sub, stream_field, pieces = entry
        if not call.get("id") and tc.get("id"):
            call["id"] = tc["id"]
        inner = tc.get(sub)
        if not inner:
            return
        target = call[sub]
        for key, value in inner.items():
            if key == stream_field:
                if value:
                    pieces.append(self._take(value))
            # The SDK concatenates every string; a name or id repeated by a
            # provider would then double, so they are set once instead.
            elif value is not None and not target.get(key):
                target[key] = value

    def _audio(self, st: _ChatChoice, audio: JSON) -> None:
        if st.audio is None:
            st.audio = {}
        for key, value in audio.items():
            if key == "data" or key == "transcript":
                if value:
                    st.audio_parts.setdefault(key, []).append(self._take(value))
            elif value is not None and key not in st.audio:
                st.audio[key] = value

    def _message(self, st: _ChatChoice) -> JSON:
        msg: JSON = {
            "role": st.role or "assistant",
            "content": None if st.content is None else "".join(st.content),
            "refusal": None if st.refusal is None else "".join(st.refusal),
        }
        for key, pieces in st.texts.items():
            msg[key] = "".join(pieces)
        msg.update(st.extra)
        if st.audio is not None:
            audio = dict(st.audio)
            for key, pieces in st.audio_parts.items():
                audio[key] = "".join(pieces)
            msg["audio"] = audio
        calls = []
        for idx in sorted(st.calls):
            call, sub, stream_field, pieces = st.calls[idx]
            call[sub][stream_field] = "".join(pieces)
            if sub == "function_call":
                msg["function_call"] = call[sub]
            else:
                calls.append(call)
        if calls:
            msg["tool_calls"] = calls
        return msg

    def _build_choice(self, idx: int, st: _ChatChoice) -> JSON:
        return {
            "index": idx,
            "message": self._message(st),
            "logprobs": st.logprobs,
            "finish_reason": st.finish_reason,
        }

    def _build(self) -> Assembled:
        if not self._top and not self._choices:
            return Assembled(None, complete=self._done)
        top = self._top
        resp: JSON = {
            "id": top.get("id"),
            "object": self._OBJECT,
            "created": top.get("created"),
            "model": top.get("model"),
            "choices": [self._build_choice(i, self._choices[i]) for i in sorted(self._choices)],
            "usage": self._usage,
        }
        for key, value in top.items():
            resp.setdefault(key, value)
        first = self._choices[min(self._choices)] if self._choices else None
        finished = bool(self._choices) and all(st.finish_reason for st in self._choices.values())
        return Assembled(
            resp,
            _chat_usage(self._usage),
            _str(top.get("id")),
            _str(top.get("model")),
            first.finish_reason if first is not None else None,
            complete=self._done or (finished and self._usage is not None),
        )


class _CompletionsStream(_ChatStream):
    """Legacy Completions: ``choices[].text`` pieces instead of a message delta."""

    __slots__ = ()

    _OBJECT = "text_completion"

    def _choice(self, st: _ChatChoice, ch: JSON, size: int) -> None:
        text = ch.get("text")
        if text is not None:
            if st.content is None:
                st.content = []
            st.content.append(self._take(text))
        reason = ch.get("finish_reason")
        if reason:
            st.finish_reason = reason
        logprobs = ch.get("logprobs")
        if logprobs and self._charge(size):
            if st.logprobs is None:
                st.logprobs = {}
            for key, value in logprobs.items():
                have = st.logprobs.get(key)
                if isinstance(value, list) and isinstance(have, list):
                    have.extend(value)
                else:
                    st.logprobs[key] = list(value) if isinstance(value, list) else value

    def _build_choice(self, idx: int, st: _ChatChoice) -> JSON:
        return {
            "text": "".join(st.content or ()),
            "index": idx,
            "logprobs": st.logprobs,
            "finish_reason": st.finish_reason,
        }


_RESPONSE_LIFECYCLE = frozenset(("response.created", "response.in_progress", "response.queued"))
_RESPONSE_TERMINAL = frozenset(("response.completed", "response.failed", "response.incomplete"))

# Delta events: the item list the part lives in, the part's index field, its text field.
_RESPONSE_DELTAS: dict[str, tuple[str, str, str]] = {
    "response.output_text.delta": ("content", "content_index", "text"),
    "response.refusal.delta": ("content", "content_index", "refusal"),
    "response.reasoning_text.delta": ("content", "content_index", "text"),
    "response.reasoning_summary_text.delta": ("summary", "summary_index", "text"),
}
_RESPONSE_DONES: dict[str, tuple[str, str, str]] = {
    "response.output_text.done": ("content", "content_index", "text"),
    "response.refusal.done": ("content", "content_index", "refusal"),
    "response.reasoning_text.done": ("content", "content_index", "text"),
    "response.reasoning_summary_text.done": ("summary", "summary_index", "text"),
}
_RESPONSE_PART_ADDED = {
    "response.content_part.added": ("content", "content_index"),
    "response.reasoning_summary_part.added": ("summary", "summary_index"),
}


class _ResponsesStream(_Stream):
    __slots__ = (
        "_args",
        "_base",
        "_base_size",
        "_done_items",
        "_final",
        "_items",
        "_max",
        "_parts",
        "_terminal",
    )

    def __init__(self, max_retained: int) -> None:
        super().__init__(max_retained)
        self._max = max_retained
        self._base: JSON | None = None
        self._base_size = 0
        self._final: JSON | None = None
        self._terminal: str | None = None
        self._items: dict[int, JSON] = {}
        self._done_items: dict[int, JSON] = {}
        # (output_index, list name, part index, text field) -> pieces.
        self._parts: dict[tuple[int, str, int, str], list[str]] = {}
        self._args: dict[int, list[str]] = {}

    def _on_event(self, name: str | None, obj: JSON, size: int) -> None:
        kind = obj.get("type") or name
        spec = _RESPONSE_DELTAS.get(kind) if isinstance(kind, str) else None
        if spec is not None:
            oi = obj["output_index"]
            if oi in self._items and oi not in self._done_items:
                key = (oi, spec[0], _index(obj[spec[1]]), spec[2])
                self._parts.setdefault(key, []).append(self._take(obj["delta"]))
        elif kind == "response.function_call_arguments.delta" or (
            kind == "response.custom_tool_call_input.delta"
        ):
            oi = obj["output_index"]
            if oi in self._items and oi not in self._done_items:
                self._args.setdefault(oi, []).append(self._take(obj["delta"]))
        elif kind == "response.output_item.added":
            oi = obj["output_index"]
            item = obj["item"]
            if isinstance(oi, int) and isinstance(item, dict) and self._charge(size):
                self._items[oi] = item
        elif kind == "response.output_item.done":
            oi = obj["output_index"]
            item = obj["item"]
            if isinstance(oi, int) and isinstance(item, dict):
                # The finished item replaces the one built from deltas, if it fits
                # in the budget that replacing frees.
                freed = sum(map(len, self._args.get(oi, ())))
                freed += sum(sum(map(len, v)) for k, v in self._parts.items() if k[0] == oi)
                if size > self._budget + freed:
                    self._truncated = True
                    return
                self._drop_item(oi)
                self._charge(size)
                self._done_items[oi] = item
        elif kind in _RESPONSE_DONES:
            spec = _RESPONSE_DONES[kind]
            oi = obj["output_index"]
            key = (oi, spec[0], _index(obj[spec[1]]), spec[2])
            old = self._parts.get(key)
            if old is not None:
                self._refund(old)
            if oi in self._items and oi not in self._done_items:
                self._parts[key] = [self._take(obj[spec[2]])]
        elif kind in _RESPONSE_PART_ADDED:
            where, index_field = _RESPONSE_PART_ADDED[kind]
            item = self._items.get(obj["output_index"])
            part = obj["part"]
            if item is not None and isinstance(part, dict) and self._charge(size):
                parts = item.get(where)
                if not isinstance(parts, list):
                    parts = item[where] = []
                _put(parts, obj[index_field], part)
        elif kind == "response.output_text.annotation.added":
            item = self._items.get(obj["output_index"])
            if item is not None and self._charge(size):
                part = item["content"][obj["content_index"]]
                annotations = part.get("annotations")
                if not isinstance(annotations, list):
                    annotations = part["annotations"] = []
                _put(annotations, obj.get("annotation_index", len(annotations)), obj["annotation"])
        elif kind in _RESPONSE_TERMINAL:
            resp = obj["response"]
            if not isinstance(resp, dict):
                return
            self._terminal = kind
            if kind == "response.failed":
                self._error = _error_fields(resp.get("error"))
            if isinstance(resp.get("output"), list) and size <= self._max:
                # The final response carries the whole answer: the rest is spent.
                self._items.clear()
                self._done_items.clear()
                self._parts.clear()
                self._args.clear()
                self._base = None
                self._budget = self._max - size
                self._truncated = False
            else:
                # No output given, or too much to keep: the streamed items stand in.
                resp.pop("output", None)
            self._final = resp
        elif kind in _RESPONSE_LIFECYCLE:
            resp = obj["response"]
            if isinstance(resp, dict):
                self._budget += self._base_size
                self._base, self._base_size = None, 0
                if self._charge(size):
                    self._base, self._base_size = resp, size
        elif kind == "error":
            err = obj.get("error")
            if isinstance(err, dict):
                self._error = _error_fields(err)
            else:
                self._error = (_str(obj.get("code")) or "error", _str(obj.get("message")))

    def _drop_item(self, oi: int) -> None:
        self._items.pop(oi, None)
        args = self._args.pop(oi, None)
        if args is not None:
            self._refund(args)
        for key in [k for k in self._parts if k[0] == oi]:
            self._refund(self._parts.pop(key))

    def _built_item(self, oi: int) -> JSON:
        item = self._items[oi]
        for (index, where, part_index, text_field), pieces in self._parts.items():
            if index == oi:
                parts = item.get(where)
                if isinstance(parts, list) and 0 <= part_index < len(parts):
                    part = parts[part_index]
                    if isinstance(part, dict):
                        part[text_field] = "".join(pieces)
        args = self._args.get(oi)
        if args is not None:
            item["input" if item.get("type") == "custom_tool_call" else "arguments"] = "".join(args)
        return item

    def _output(self) -> list[JSON]:
        indices = sorted(self._items.keys() | self._done_items.keys())
        return [
            self._done_items[i] if i in self._done_items else self._built_item(i) for i in indices
        ]

    def _build(self) -> Assembled:
        resp = self._final
        if resp is not None:
            if not isinstance(resp.get("output"), list):
                resp["output"] = self._output()
        elif self._base is not None or self._items or self._done_items:
            resp = dict(self._base or {})
            resp["output"] = self._output()
        else:
            return Assembled(None)
        return Assembled(
            resp,
            _responses_usage(resp.get("usage")),
            _str(resp.get("id")),
            _str(resp.get("model")),
            _responses_stop(resp) if self._terminal else None,
            complete=self._terminal is not None,
        )


def _put(items: list[Any], index: object, value: object) -> None:
    """Set ``items[index]``, appending when it is the next one (or not an index at all)."""
    if isinstance(index, int) and 0 <= index < len(items):
        items[index] = value
    else:
        items.append(value)


_STREAMS: dict[str, type[_Stream]] = {
    ANTHROPIC_MESSAGES: _AnthropicStream,
    OPENAI_CHAT: _ChatStream,
    OPENAI_RESPONSES: _ResponsesStream,
    OPENAI_COMPLETIONS: _CompletionsStream,
}
_JSON_APIS = frozenset(
    (
        ANTHROPIC_MESSAGES,
        ANTHROPIC_COUNT_TOKENS,
        OPENAI_CHAT,
        OPENAI_RESPONSES,
        OPENAI_COMPLETIONS,
        OPENAI_EMBEDDINGS,
    )
)
#: How each API's usage object (the value of a body's ``usage`` key) is read.
_USAGE_READERS = {
    ANTHROPIC_MESSAGES: _anthropic_usage,
    OPENAI_CHAT: _chat_usage,
    OPENAI_COMPLETIONS: _chat_usage,
    OPENAI_EMBEDDINGS: _chat_usage,
    OPENAI_RESPONSES: _responses_usage,
}
