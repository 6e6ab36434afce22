"""What tvgate knows of OpenAI's APIs in common, and of Chat Completions.

:class:`OpenAIAPI` is what every OpenAI operation shares: the key as a Bearer
``Authorization``, the ``{"error": {...}}`` envelope, the ``/v1/models`` format and
how usage counts cached tokens (``prompt_tokens`` includes them). :class:`OpenAIChat`
adds ``/chat/completions`` and its assembler, which rebuilds a ChatCompletion from
its chunks as the ``openai`` SDK's accumulator does; the legacy Completions stream
(``tvgate.providers.openai_legacy``) is read by a subclass of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from tvgate.models import PROVIDER_OPENAI
from tvgate.providers.base import JSON, OPENAI_CHAT
from tvgate.providers.common import (
    Assembled,
    SSEStream,
    StreamAssembler,
    Usage,
    as_int,
    as_str,
    error_fields,
    event_index,
    sub_object,
)

#: (type, code) of the envelope of an error tvgate raises, by status.
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_content_encoding"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    508: ("loop_detected", "loop_detected"),
}


class OpenAIAPI:
    """What OpenAI's operations share; each subclass names its paths and its answer."""

    api = ""
    provider = PROVIDER_OPENAI
    client_path = ""
    upstream_path = ""
    default_base_url = "https://api.openai.com/v1"
    charged = True

    def auth_headers(self, secret: str) -> list[tuple[str, str]]:
        return [("Authorization", "Bearer " + secret)]

    def error_body(self, status: int, message: str, *, kind: str = "", code: str = "") -> bytes:
        status_kind, status_code = _ERROR_TYPES.get(status, ("server_error", None))
        return orjson.dumps(
            {
                "error": {
                    "message": message,
                    "type": kind or status_kind,
                    "param": None,
                    "code": code or status_code,
                }
            }
        )

    def stream_error_event(self, message: str, kind: str = "api_error") -> bytes:
        payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def models_body(self, routes: Sequence[tuple[str, str]], *, has_more: bool = False) -> bytes:
        # OpenAI's list has no pages: every route is in it.
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": provider}
            for name, provider in routes
        ]
        return orjson.dumps({"object": "list", "data": data})

    def uncached_input(self, input_tokens: int, cache_read_tokens: int) -> int:
        # OpenAI counts cached tokens inside prompt_tokens.
        return max(0, input_tokens - cache_read_tokens)

    def stream_assembler(self, max_retained: int) -> StreamAssembler | None:
        return None

    def assemble(self, obj: JSON) -> Assembled:
        raise NotImplementedError

    def read_usage(self, usage: object) -> Usage:
        return chat_usage(usage)


class OpenAIChat(OpenAIAPI):
    """``/v1/chat/completions``."""

    api = OPENAI_CHAT
    client_path = "chat/completions"
    upstream_path = "/chat/completions"

    def stream_assembler(self, max_retained: int) -> StreamAssembler | None:
        return ChatStream(max_retained)

    def assemble(self, obj: JSON) -> Assembled:
        choices = obj.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        return Assembled(
            obj,
            chat_usage(obj.get("usage")),
            as_str(obj.get("id")),
            as_str(obj.get("model")),
            as_str(first.get("finish_reason")) if isinstance(first, dict) else None,
            complete=True,
        )


CHAT = OpenAIChat()


def openai_usage(u: object, inputs: str, outputs: str) -> Usage:
    """An OpenAI usage object, whose figures are named ``{inputs}_tokens`` (cached ones
    in ``{inputs}_tokens_details``) and ``{outputs}_tokens`` (reasoning in its details)."""
    if not isinstance(u, dict):
        return Usage()
    details = sub_object(u, inputs + "_tokens_details")
    return Usage(
        as_int(u.get(inputs + "_tokens")),
        as_int(u.get(outputs + "_tokens")),
        as_int(details.get("cached_tokens")),
        as_int(details.get("cache_write_tokens")),
        as_int(sub_object(u, outputs + "_tokens_details").get("reasoning_tokens")),
    )


def chat_usage(u: object) -> Usage:
    """Chat Completions' (and Completions', Embeddings') usage: prompt and completion."""
    return openai_usage(u, "prompt", "completion")


class ChatChoice:
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


class ChatStream(SSEStream):
    """Chat Completions; legacy Completions subclasses it for its ``text`` choices."""

    __slots__ = ("_choices", "_done", "_top", "_usage")

    _OBJECT = "chat.completion"

    def __init__(self, max_retained: int) -> None:
        super().__init__(max_retained)
        self._top: JSON = {}
        self._usage: JSON | None = None
        self._choices: dict[int, ChatChoice] = {}
        self._done = False

    def _on_text(self, data: bytes) -> None:
        if data.startswith(b"[DONE]"):
            self._done = True

    def _on_event(self, name: str | None, obj: JSON, size: int) -> None:
        err = obj.get("error")
        if err:
            self._error = error_fields(err)
            return
        top = self._top
        for key, value in obj.items():
            if value is not None and key not in _CHUNK_SKIP:
                top[key] = value
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        for ch in obj.get("choices") or ():
            idx = event_index(ch.get("index", 0))
            st = self._choices.get(idx)
            if st is None:
                st = self._choices[idx] = ChatChoice()
            self._choice(st, ch, size)

    def _choice(self, st: ChatChoice, ch: JSON, size: int) -> None:
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

    def _tool_call(self, st: ChatChoice, tc: JSON, size: int) -> None:
        idx = tc.get("index", len(st.calls))
        if idx != -1:
            idx = event_index(idx)
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

    def _audio(self, st: ChatChoice, audio: JSON) -> None:
        if st.audio is None:
            st.audio = {}
        for key, value in audio.items():
            if key == "data" or key == "transcript":
                if value:
                    st.audio_parts.setdefault(key, []).append(self._take(value))
            elif value is not None and key not in st.audio:
                st.audio[key] = value

    def _message(self, st: ChatChoice) -> JSON:
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

    def _build_choice(self, idx: int, st: ChatChoice) -> JSON:
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
            chat_usage(self._usage),
            as_str(top.get("id")),
            as_str(top.get("model")),
            first.finish_reason if first is not None else None,
            complete=self._done or (finished and self._usage is not None),
        )
