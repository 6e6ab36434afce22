"""OpenAI Chat Completions client on an Anthropic Messages route.

This module owns the four phases of that translation, as pure functions of the bytes
and JSON given (no I/O, no configuration): :func:`translate_request` (the client's
``/v1/chat/completions`` body to a ``/v1/messages`` body for the route's model),
:func:`translate_response` (a Message to a ChatCompletion), :class:`StreamTranslator`
(Anthropic SSE bytes to Chat Completions chunks, incrementally) and
:func:`translate_error` (Anthropic's error envelope to OpenAI's, message kept).

What the target cannot express is refused with :class:`TranslationError` (a 400 naming
the field); what is harmless to lose (``metadata``, ``store``, ``seed``...) is dropped
and named in a ``dropped`` list the trace records. Nothing is invented: a thinking
block goes back to Anthropic only with the signature Anthropic gave it
(``thinking_blocks``, the convention LiteLLM and OpenRouter use on Chat), and
``reasoning_content`` without one is dropped and noted.

Reasoning: ``reasoning_effort`` becomes ``thinking.budget_tokens`` (kept below
``max_tokens``, which on both APIs includes the thinking); thinking comes back as
``reasoning_content`` (the field DeepSeek, vLLM and LiteLLM use on Chat).

Usage comes from Anthropic's own figures: ``prompt_tokens`` is input plus cache read
plus cache write (OpenAI's includes cached tokens, Anthropic's ``input_tokens`` does
not), with ``cached_tokens`` and ``cache_write_tokens`` in ``prompt_tokens_details``.

The module is longer than most (~850 lines) because it is one idea, the mapping
between two APIs: the four phases share their rules (finish reasons, usage, tool
calls, the error envelope), and a rule lives in one place for all of them.

Answers may come from a member's own server, so the response and stream phases never
raise on a wrong shape (a field of the wrong type counts as absent), and the request
phase raises nothing but :class:`TranslationError`.

The stream phase is on the proxy's hot path: a text delta of the bytes Anthropic sends
is matched whole and its JSON string spliced, unparsed, into a prefix built once per
stream (:class:`tvgate.traces.sse.FastEvents`); any other event is parsed once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from tvgate.traces.sse import FastEvents, SSEEvent
from tvgate.translate.history import Output, Prefix, Unresumable

JSON = dict[str, Any]

#: Anthropic requires ``max_tokens``; Chat does not. Used when the client gave none.
DEFAULT_MAX_TOKENS = 4096
#: ``reasoning_effort`` to ``thinking.budget_tokens`` (Anthropic's minimum is 1024).
EFFORT_BUDGET = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
_MIN_BUDGET = 1024

#: Anthropic's stop reasons as Chat finish reasons.
FINISH_REASON = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Chat fields with no Anthropic counterpart whose loss changes nothing the client
# relies on: dropped and noted.
_HARMLESS = frozenset(
    ("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "seed")
)
# Chat fields dropped only at the value that means "off"; any other value is refused.
_DEFAULT_ONLY: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "verbosity": (None, "medium"),
    "audio": (None,),
    "functions": (None,),
    "function_call": (None,),
    "web_search_options": (None,),
}
_HANDLED = frozenset(
    (
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning_effort",
        "user",
    )
)


class TranslationError(Exception):
    """A client field the upstream API cannot express: the call is refused with a 400."""

    status = 400

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message

    def client_body(self) -> bytes:
        """The refusal in OpenAI's error envelope."""
        return _error_body(self.message, "invalid_request_error", self.param, None)


@dataclass(slots=True)
class UpstreamRequest:
    """What :func:`translate_request` made of a client's request."""

    body: JSON
    stream: bool
    #: ``stream_options.include_usage``: the stream ends with a usage chunk.
    include_usage: bool
    #: What could not be carried, one note each, for the trace.
    dropped: list[str] = field(default_factory=list)
    #: The output's messages as :mod:`tvgate.translate.history` keeps them (``body``'s
    #: ``messages`` are ``turns`` unless it started from a prefix).
    output: Output = field(default_factory=Output)


# --- request ------------------------------------------------------------------------


def translate_request(
    body: JSON,
    upstream_model: str,
    *,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    prefix: Prefix | None = None,
) -> UpstreamRequest:
    """The Anthropic Messages body for a Chat Completions ``body``, on ``upstream_model``;
    ``prefix``: ``body['messages']`` are the conversation's from ``prefix.index`` on, the
    ones before translated already (:mod:`tvgate.translate.history`).

    Raises :class:`TranslationError` for a field Anthropic cannot express."""
    dropped: list[str] = []
    check_fields(body, _HANDLED, _HARMLESS, _DEFAULT_ONLY, dropped)

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("messages", "messages must be a non-empty array")
    output = _messages(messages, prefix)
    system, turns = output.system, output.turns
    dropped.extend(output.notes)
    out: JSON = {"model": upstream_model}
    if system:
        out["system"] = system
    out["messages"] = turns

    limit = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    max_tokens = body.get(limit)
    if max_tokens is None:
        max_tokens = default_max_tokens
        dropped.append(f"max_tokens not given: {default_max_tokens} sent")
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise TranslationError(limit, f"{limit} must be a positive integer")
    out["max_tokens"] = max_tokens

    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise TranslationError("stop", "stop must be a string or an array of strings")
        out["stop_sequences"] = stop
    stream = bool(body.get("stream"))
    if stream:
        out["stream"] = True
    include_usage = False
    options = body.get("stream_options")
    if isinstance(options, dict):
        include_usage = bool(options.get("include_usage"))
        dropped.extend(f"stream_options.{k}" for k in options if k != "include_usage")

    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(i, t) for i, t in enumerate(_list(tools, "tools"))]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice

    fmt = _response_format(body.get("response_format"))
    if fmt is not None:
        out["output_config"] = {"format": fmt}
    effort = body.get("reasoning_effort")
    if effort is not None:
        add_thinking(out, effort, dropped, output.tool_loop)
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return UpstreamRequest(out, stream, include_usage, dropped, output)


def check_fields(
    body: JSON,
    handled: frozenset[str],
    harmless: frozenset[str],
    default_only: dict[str, tuple[object, ...]],
    dropped: list[str],
) -> None:
    """Refuse a top-level field that is neither ``handled``, ``harmless`` (dropped,
    noted) nor at the value that means "off" (``default_only``: dropped, noted)."""
    for key, value in body.items():
        if key in handled:
            continue
        if key in harmless:
            dropped.append(key)
        elif key in default_only:
            if value not in default_only[key]:
                raise TranslationError(key, f"{key}={_short(value)} is not supported on this route")
            if value is not None:
                dropped.append(key)
        else:
            raise TranslationError(key, f"{key} is not supported on this route")


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TranslationError(where, f"{where} must be an array")
    return value


def _short(value: object) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(slots=True)
class _State:
    """What the messages before a mark leave for the ones after it: the system blocks
    they hoisted, the role of their last turn, and whether their last assistant turn is
    a tool call without thinking (:func:`_thinking_refused`)."""

    #: The first ``hoisted`` of ``system`` (a list never changed once kept).
    system: list[JSON] = field(default_factory=list)
    hoisted: int = 0
    role: str | None = None
    tool_loop: bool = False


@dataclass(slots=True)
class _Messages(Output):
    """The output of a Chat conversation: its turns, and the system blocks it hoists."""

    system: list[JSON] = field(default_factory=list)
    #: The last assistant turn before ``turns`` is a tool call without thinking.
    tool_loop: bool = False


def _messages(messages: list[Any], prefix: Prefix | None) -> _Messages:
    """The Anthropic turns of ``messages`` (the conversation's from ``prefix.index`` on).
    A mark goes where a message starts a new turn: the turns before it are final."""
    start = 0
    state = _State()
    dropped: list[str] = []
    if prefix is not None:
        start, state, dropped = prefix.index, prefix.state, list(prefix.notes)
    system: list[JSON] = state.system[: state.hoisted]
    turns: list[JSON] = []
    marks: list[tuple[int, int, int, Any]] = []
    tool_loop = state.tool_loop
    for i, msg in enumerate(messages, start):
        notes_before = len(dropped)
        # A message's path is written only for an error or a note: this loop runs once per
        # message of a whole conversation on every call.
        if not isinstance(msg, dict):
            raise TranslationError(f"messages[{i}]", f"messages[{i}] must be an object")
        role = msg.get("role")
        if msg.get("name") is not None:
            dropped.append(f"messages[{i}].name")
        if role in ("system", "developer"):
            system.extend(_text_blocks(msg.get("content"), f"messages[{i}]"))
            continue
        if role == "user":
            content = msg.get("content")
            if isinstance(content, str):
                blocks = [{"type": "text", "text": content}]
            else:
                blocks = _user_blocks(content, f"messages[{i}]", dropped)
        elif role == "assistant":
            blocks = _assistant_blocks(msg, i, dropped)
            if not blocks:
                dropped.append(f"messages[{i}]: empty assistant message")
                continue
        elif role == "tool":
            blocks = [_tool_result(msg, i)]
            role = "user"
        else:
            where = f"messages[{i}]"
            raise TranslationError(f"{where}.role", f"{where}.role {role!r} is not supported")
        # Anthropic alternates roles; parallel tool results (one Chat message each)
        # belong in one user turn, before any text that follows them.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
            continue
        if not turns and role == state.role:
            raise Unresumable  # it would join the last turn before the prefix's mark
        tool_loop = _mark(marks, i, turns, notes_before, system, state, tool_loop)
        turns.append({"role": role, "content": blocks})
    # After the last message: its turn is final unless the next call's first message joins
    # it (then that call is translated whole).
    tool_loop = _mark(marks, start + len(messages), turns, len(dropped), system, state, tool_loop)
    return _Messages(
        turns=turns,
        marks=marks,
        notes=dropped,
        system=system,
        tool_loop=tool_loop,
    )


def _mark(
    marks: list[tuple[int, int, int, Any]],
    index: int,
    turns: list[JSON],
    notes: int,
    system: list[JSON],
    state: _State,
    tool_loop: bool,
) -> bool:
    """A mark before message ``index``, where ``turns`` are final; whether the last
    assistant turn so far is a tool call without thinking."""
    if turns and turns[-1]["role"] == "assistant":
        tool_loop = _tool_loop(turns[-1]["content"])
    role = turns[-1]["role"] if turns else state.role
    marks.append((index, len(turns), notes, _State(system, len(system), role, tool_loop)))
    return tool_loop


def _tool_loop(content: list[JSON]) -> bool:
    """Whether an assistant turn calls a tool without starting with a thinking block."""
    return any(b["type"] == "tool_use" for b in content) and content[0]["type"] not in (
        "thinking",
        "redacted_thinking",
    )


def _text_blocks(content: object, where: str) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content", f"{where}.content must be a string or array")
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise TranslationError(
                f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part"
            )
        out.append(_text(part))
    return out


def _text(part: JSON) -> JSON:
    block: JSON = {"type": "text", "text": part.get("text", "")}
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def _user_blocks(content: object, where: str, dropped: list[str]) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content", f"{where}.content must be a string or array")
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(_text(part))
        elif kind == "image_url":
            image = part.get("image_url")
            # Some clients send the URL itself rather than {"url": ...}.
            image = {"url": image} if isinstance(image, str) else _dict(image)
            if image.get("detail") not in (None, "auto"):
                dropped.append(f"{at}.image_url.detail")
            out.append({"type": "image", "source": _source(image.get("url"), f"{at}.image_url")})
        elif kind == "file":
            file = _dict(part.get("file"))
            if not file.get("file_data"):
                raise TranslationError(f"{at}.file", f"{at}.file needs file_data on this route")
            out.append({"type": "document", "source": _source(file["file_data"], f"{at}.file")})
        else:
            raise TranslationError(f"{at}.type", f"{at}.type {kind!r} is not supported")
    return out


def _source(url: object, where: str) -> JSON:
    """A data URL or an http(s) URL as an Anthropic image/document source."""
    if not isinstance(url, str):
        raise TranslationError(where, f"{where} needs a URL")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise TranslationError(where, f"{where}: only base64 data URLs are supported")
        return {"type": "base64", "media_type": head[5:-7], "data": data}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise TranslationError(where, f"{where}: not a data or http(s) URL")


def _assistant_blocks(msg: JSON, i: int, dropped: list[str]) -> list[JSON]:
    where = f"messages[{i}]"
    if msg.get("audio") is not None or msg.get("function_call") is not None:
        key = "audio" if msg.get("audio") is not None else "function_call"
        raise TranslationError(f"{where}.{key}", f"{where}.{key} is not supported")
    out: list[JSON] = []
    thinking = msg.get("thinking_blocks")
    for k, block in enumerate(
        _list(thinking, f"{where}.thinking_blocks") if thinking is not None else ()
    ):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking" and block.get("signature"):
            out.append(
                {
                    "type": "thinking",
                    "thinking": block.get("thinking", ""),
                    "signature": block["signature"],
                }
            )
        elif kind == "redacted_thinking" and block.get("data"):
            out.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            # Anthropic checks the signature; one is never made up.
            dropped.append(f"{where}.thinking_blocks[{k}]: no signature")
    if msg.get("reasoning_content") and not out:
        dropped.append(f"{where}.reasoning_content: no signature")
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            out.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if part.get("text"):
                    out.append(_text(part))
            elif kind == "refusal":
                dropped.append(f"{where}.content[{j}]: refusal")
            else:
                raise TranslationError(
                    f"{where}.content[{j}].type",
                    f"{where}.content[{j}].type {kind!r} is not supported",
                )
    elif content is not None:
        raise TranslationError(f"{where}.content", f"{where}.content must be a string or array")
    calls = msg.get("tool_calls")
    for k, call in enumerate(_list(calls, f"{where}.tool_calls") if calls is not None else ()):
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            at = f"{where}.tool_calls[{k}]"
            raise TranslationError(f"{at}.type", f"{at}: only function tool calls are supported")
        fn = call.get("function")
        if not isinstance(fn, dict):
            fn = {}
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError):
            args = None
        if not isinstance(args, dict):
            at = f"{where}.tool_calls[{k}].function.arguments"
            raise TranslationError(at, f"{at} must be a JSON object")
        out.append(
            {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": args}
        )
    return out


def _tool_result(msg: JSON, i: int) -> JSON:
    content = msg.get("content")
    if not isinstance(content, str):
        content = _text_blocks(content, f"messages[{i}]")
    return {"type": "tool_result", "tool_use_id": msg.get("tool_call_id"), "content": content}


def _tool(i: int, tool: object) -> JSON:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise TranslationError(f"tools[{i}].type", f"tools[{i}]: only function tools are supported")
    fn = _dict(tool.get("function"))
    out: JSON = {
        "name": fn.get("name"),
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    if fn.get("strict"):
        out["strict"] = True
    return out


def _tool_choice(choice: object, parallel: object) -> JSON | None:
    if choice is None:
        out: JSON | None = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": _dict(choice.get("function")).get("name")}
    else:
        raise TranslationError("tool_choice", f"tool_choice {_short(choice)} is not supported")
    if parallel is False:
        out = out or {"type": "auto"}
        out["disable_parallel_tool_use"] = True
    return out


def _response_format(fmt: object) -> JSON | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise TranslationError("response_format", "response_format must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_schema":
        schema = _dict(fmt.get("json_schema")).get("schema")
        if not isinstance(schema, dict):
            raise TranslationError(
                "response_format.json_schema.schema",
                "response_format.json_schema.schema is required",
            )
        return {"type": "json_schema", "schema": schema}
    # Anthropic constrains output to a schema only; "any JSON object" has none.
    raise TranslationError(
        "response_format.type", f"response_format.type {kind!r} is not supported"
    )


def add_thinking(
    out: JSON, effort: object, dropped: list[str], tool_loop: bool | None = None
) -> None:
    """``thinking`` for a reasoning ``effort`` on the Messages body ``out``, where
    Anthropic would take it (else noted), and the sampling it forbids dropped;
    ``tool_loop``: whether the conversation's last assistant turn is a tool call without
    thinking, when ``out['messages']`` may not hold it (None: read it there)."""
    thinking = _thinking(effort, out["max_tokens"], dropped)
    if thinking is not None and _thinking_refused(out, dropped, tool_loop):
        thinking = None
    if thinking is not None:
        out["thinking"] = thinking
        _sampling_for_thinking(out, dropped)


def _thinking(effort: object, max_tokens: int, dropped: list[str]) -> JSON | None:
    if effort in ("none", "minimal"):
        if effort == "minimal":
            dropped.append("reasoning_effort=minimal: thinking off")
        return None
    if not isinstance(effort, str) or effort not in EFFORT_BUDGET:
        raise TranslationError(
            "reasoning_effort", f"reasoning_effort {_short(effort)} is not supported"
        )
    budget = min(EFFORT_BUDGET[effort], max_tokens - 1)
    if budget < _MIN_BUDGET:
        dropped.append(f"reasoning_effort: max_tokens {max_tokens} leaves no thinking budget")
        return None
    return {"type": "enabled", "budget_tokens": budget}


def _thinking_refused(out: JSON, dropped: list[str], tool_loop: bool | None) -> bool:
    """Whether Anthropic would refuse thinking on this request: it forbids forced tool
    use with thinking, and a tool loop whose last assistant turn does not start with a
    signed thinking block (one the client did not send back cannot be made up)."""
    if _dict(out.get("tool_choice")).get("type") in ("any", "tool"):
        dropped.append("reasoning_effort: thinking off, a tool is forced")
        return True
    if tool_loop is None:
        turns: list[JSON] = out["messages"]
        last: list[JSON] = next(
            (t["content"] for t in reversed(turns) if t["role"] == "assistant"), []
        )
        tool_loop = _tool_loop(last)
    if tool_loop:
        dropped.append("reasoning_effort: thinking off, the last tool call has no thinking block")
        return True
    return False


def _sampling_for_thinking(out: JSON, dropped: list[str]) -> None:
    """Anthropic refuses thinking with a temperature other than 1 or a top_p below
    0.95; the client asked for reasoning by name, so those give way (as OpenAI's
    reasoning models ignore them), noted."""
    if out.get("temperature", 1) != 1:
        dropped.append(f"temperature={_short(out.pop('temperature'))}: thinking is on")
    top_p = out.get("top_p", 1)
    if not isinstance(top_p, (int, float)) or top_p < 0.95:
        dropped.append(f"top_p={_short(out.pop('top_p'))}: thinking is on")


# --- response -----------------------------------------------------------------------


def translate_response(body: JSON, dropped: list[str] | None = None) -> JSON:
    """The ChatCompletion for an Anthropic Message ``body``; what it could not carry is
    appended to ``dropped``."""
    notes = dropped if dropped is not None else []
    text: list[str] = []
    reasoning: list[str] = []
    thinking_blocks: list[JSON] = []
    calls: list[JSON] = []
    content = body.get("content")
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(block.get("text", ""))
            if block.get("citations"):
                notes.append("content: citations")
        elif kind == "tool_use":
            calls.append(
                _call(block.get("id"), block.get("name"), orjson.dumps(block.get("input", {})))
            )
        elif kind == "thinking":
            reasoning.append(block.get("thinking", ""))
            thinking_blocks.append(
                {
                    "type": "thinking",
                    "thinking": block.get("thinking", ""),
                    "signature": block.get("signature"),
                }
            )
        elif kind == "redacted_thinking":
            thinking_blocks.append({"type": "redacted_thinking", "data": block.get("data")})
        else:
            notes.append(f"content: {kind} block")
    message: JSON = {
        "role": "assistant",
        "content": "".join(text) if text else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if thinking_blocks:
        message["thinking_blocks"] = thinking_blocks
    return {
        "id": body.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish(body.get("stop_reason"), notes),
            }
        ],
        "usage": chat_usage(body.get("usage")),
    }


def _call(call_id: object, name: object, arguments: bytes) -> JSON:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments.decode()},
    }


def _finish(stop_reason: object, notes: list[str]) -> str:
    if stop_reason == "pause_turn":
        notes.append("stop_reason: pause_turn")
    return FINISH_REASON.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def chat_usage(usage: object) -> JSON:
    """Anthropic's usage in Chat's shape, cache reads and writes included."""
    u = _dict(usage)
    read = _int(u.get("cache_read_input_tokens"))
    write = _int(u.get("cache_creation_input_tokens"))
    prompt = _int(u.get("input_tokens")) + read + write
    completion = _int(u.get("output_tokens"))
    out: JSON = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    }
    thinking = _dict(u.get("output_tokens_details")).get("thinking_tokens")
    if thinking is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": _int(thinking)}
    return out


def _dict(value: object) -> JSON:
    """``value`` if it is an object, else an empty one: the upstream may be a member's
    own server, and a wrong shape must not raise."""
    return value if isinstance(value, dict) else {}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- stream -------------------------------------------------------------------------

_SUFFIX = b',"logprobs":null,"finish_reason":null}]}\n\n'
_DONE = b"data: [DONE]\n\n"
# Anthropic pings while the model thinks; a comment keeps idle client connections
# open and every SSE client ignores it.
_PING = b": ping\n\n"
_SKIP = -1
#: A text delta as Anthropic sends nearly every event: its JSON string goes into the
#: client's chunk as it is. Only the escapes orjson writes itself and no raw control
#: character, so that the bytes sent do not depend on which path an event took (the
#: chunks' cuts decide that); an event of any other bytes takes the parsing path.
_TEXT_EVENT = re.compile(
    rb'event: content_block_delta\ndata: (\{"type":"content_block_delta","index":\d+,'
    rb'"delta":\{"type":"text_delta","text":'
    rb'("(?:[^"\\\x00-\x1f]|\\["\\bfnrt])*")'
    rb"\}\})\n\n"
)


class StreamTranslator:
    """Anthropic Messages SSE bytes in, Chat Completions SSE bytes out.

    :meth:`feed` takes the upstream's chunks as they come (an event may be split
    anywhere) and returns what to send the client now; :meth:`finish` is called at the
    end of the upstream stream; :meth:`error` ends the client's stream with an in-band
    error (the upstream failed mid-stream). Only the SSE parser's unfinished event is
    held, never the answer.
    """

    __slots__ = (
        "_blocks",
        "_done",
        "_events",
        "_head",
        "_include_usage",
        "_prefix",
        "_tools",
        "_usage",
        "dropped",
    )

    def __init__(self, include_usage: bool = False, dropped: list[str] | None = None) -> None:
        self._events = FastEvents(_TEXT_EVENT)
        self._include_usage = include_usage
        #: What could not be carried (shared with the request's list when given).
        self.dropped = dropped if dropped is not None else []
        # Chunk JSON up to "choices", and the text up to a delta, built at message_start.
        self._head = b""
        self._prefix = b""
        # Anthropic content block index -> Chat tool call index, or _SKIP.
        self._blocks: dict[int, int] = {}
        self._tools = 0
        self._usage: JSON = {}
        self._done = False

    @classmethod
    def for_request(cls, request: UpstreamRequest) -> StreamTranslator:
        return cls(request.include_usage, request.dropped)

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        for ev in self._events.feed(chunk):
            if isinstance(ev, SSEEvent):
                self._event(ev.event, ev.data, out)
            else:
                self._text_event(ev, out)
            if self._done:
                break
        return b"".join(out)

    def _text_event(self, event: re.Match[bytes], out: list[bytes]) -> None:
        """A text delta of the usual bytes (``_TEXT_EVENT``: group 1 the event's data,
        group 2 its text's JSON string, which goes into the client's chunk as it is)."""
        out.append(self._delta(b'{"content":' + event[2] + b"}"))

    def finish(self) -> bytes:
        """End of the upstream stream: nothing more if it ended properly, else an error."""
        self._events.close()
        return self.error("upstream stream ended before message_stop")

    def error(self, message: str, kind: str = "api_error") -> bytes:
        """The in-band error event that ends the client's stream (once)."""
        if self._done:
            return b""
        self._done = True
        return b"data: " + _error_body(message, kind, None, kind) + b"\n\n"

    def _note(self, note: str) -> None:
        if note not in self.dropped:
            self.dropped.append(note)

    def _delta(self, delta: bytes) -> bytes:
        if not self._prefix:
            self._start({})
        return self._prefix + delta + _SUFFIX

    def _start(self, message: JSON) -> None:
        self._head = (
            b'{"id":'
            + orjson.dumps(message.get("id"))
            + b',"object":"chat.completion.chunk","created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + orjson.dumps(message.get("model"))
            + b","
        )
        self._prefix = b"data: " + self._head + b'"choices":[{"index":0,"delta":'
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._usage.update(usage)

    def _event(self, name: str | None, data: bytes, out: list[bytes]) -> None:
        if name == "ping":
            out.append(_PING)
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            out.append(self.error("upstream sent an unreadable event"))
            return
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "content_block_delta":
            self._block_delta(obj, out)
        elif kind == "content_block_start":
            self._block_start(obj, out)
        elif kind == "message_start":
            self._start(_dict(obj.get("message")))
            out.append(self._prefix + b'{"role":"assistant","content":""}' + _SUFFIX)
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                # Cumulative: each figure given replaces the one before.
                self._usage.update(usage)
            reason = _finish(_dict(obj.get("delta")).get("stop_reason"), self.dropped)
            if not self._prefix:
                self._start({})
            out.append(
                self._prefix
                + b'{},"logprobs":null,"finish_reason":"'
                + reason.encode()
                + b'"}]}\n\n'
            )
        elif kind == "message_stop":
            if self._include_usage:
                usage = orjson.dumps(chat_usage(self._usage))
                out.append(b"data: " + self._head + b'"choices":[],"usage":' + usage + b"}\n\n")
            out.append(_DONE)
            self._done = True
        elif kind == "error":
            err = _dict(obj.get("error"))
            message, kind = err.get("message"), err.get("type")
            out.append(
                self.error(
                    message if isinstance(message, str) else "upstream error",
                    kind if isinstance(kind, str) else "api_error",
                )
            )

    def _block_start(self, obj: JSON, out: list[bytes]) -> None:
        block = _dict(obj.get("content_block"))
        kind = block.get("type")
        index = _index(obj)
        if kind == "tool_use":
            k = self._blocks[index] = self._tools
            self._tools += 1
            call = _call(block.get("id"), block.get("name"), b"")
            out.append(self._delta(b'{"tool_calls":[' + orjson.dumps({"index": k, **call}) + b"]}"))
        elif kind == "text":
            if block.get("text"):
                out.append(self._delta(b'{"content":' + orjson.dumps(block["text"]) + b"}"))
        elif kind == "thinking":
            if block.get("thinking"):
                out.append(
                    self._delta(b'{"reasoning_content":' + orjson.dumps(block["thinking"]) + b"}")
                )
        else:
            self._blocks[index] = _SKIP
            self._note(f"content: {kind} block")

    def _block_delta(self, obj: JSON, out: list[bytes]) -> None:
        delta = _dict(obj.get("delta"))
        kind = delta.get("type")
        if kind == "text_delta":
            out.append(self._delta(b'{"content":' + orjson.dumps(delta.get("text", "")) + b"}"))
        elif kind == "input_json_delta":
            k = self._blocks.get(_index(obj), _SKIP)
            partial = delta.get("partial_json")
            if k != _SKIP and partial:
                args = orjson.dumps({"index": k, "function": {"arguments": partial}})
                out.append(self._delta(b'{"tool_calls":[' + args + b"]}"))
        elif kind == "thinking_delta":
            out.append(
                self._delta(
                    b'{"reasoning_content":' + orjson.dumps(delta.get("thinking", "")) + b"}"
                )
            )
        elif kind == "signature_delta":
            # Chat chunks have no place for it; never sent, so never sent back.
            self._note("thinking signature (stream)")
        elif kind == "citations_delta":
            self._note("content: citations")


def _index(obj: JSON) -> int:
    index = obj.get("index")
    return index if isinstance(index, int) else _SKIP


# --- errors -------------------------------------------------------------------------


def _error_body(message: str, kind: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def translate_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An Anthropic error answer as an OpenAI one: same status, the provider's message
    and error type kept (the type also as ``code``, OpenAI's machine-readable slot)."""
    message, kind = _anthropic_error(body)
    return status, _error_body(message, kind, None, kind)


def _anthropic_error(body: bytes) -> tuple[str, str]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"], str(err.get("type") or "api_error")
    # Not Anthropic's envelope (a proxy's HTML page, say): its text is the message.
    return body[:1000].decode("utf-8", "replace").strip() or "upstream error", "api_error"
