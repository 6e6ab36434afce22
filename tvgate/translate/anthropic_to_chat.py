"""An Anthropic Messages client on an OpenAI Chat Completions route (OpenAI, vLLM, Ollama).

This module owns the four phases of that translation, Envoy AI Gateway style:

* :func:`translate_request`: a Messages request body → a Chat Completions body for the
  route's model, with the notes of what was dropped; a field Chat Completions cannot
  express raises :class:`TranslationError` (400, naming the field);
* :func:`translate_response`: a ChatCompletion → an Anthropic Message;
* :class:`StreamTranslator`: the upstream's ``chat.completion.chunk`` SSE bytes, fed as
  they arrive, → the Anthropic event sequence (message_start, ping, content_block_*,
  message_delta, message_stop, or an in-band ``error`` event);
* :func:`translate_error`: an upstream error answer → Anthropic's error envelope.

Usage comes from the provider's own figures: OpenAI's ``prompt_tokens`` includes the
cached tokens, Anthropic's ``input_tokens`` does not, so cached (and, where a provider
reports them, cache-write) tokens are moved out of it. Reasoning the upstream streams
(``reasoning_content`` from vLLM/DeepSeek, ``reasoning`` from Ollama/OpenRouter) becomes
thinking blocks whose signature stays empty: a signature is never made up, and thinking
blocks sent back in the history are dropped (and noted), since no upstream could check them.
The module is pure (no I/O); it knows nothing of routes beyond the model it is given.
The stream phase is on the proxy's hot path: a content chunk of the bytes OpenAI sends is
matched whole and its text's JSON string spliced, unparsed, into the client's event
(:class:`tvgate.traces.sse.FastEvents`); any other chunk is parsed once.
It is longer than most modules because the four phases share one set of mappings
(usage, stop reasons, error types, content blocks) that would otherwise be split across
modules importing each other; DESIGN.md's layout is one module per pair.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tvgate.traces.sse import FastEvents, SSEEvent
from tvgate.translate.history import Output, Prefix

JSON = dict[str, Any]
#: What reading a JSON value of an unexpected shape raises.
_MALFORMED = (KeyError, TypeError, AttributeError, IndexError)

#: Request fields that change nothing in the answer's content, or only server-side
#: bookkeeping Chat Completions has no equivalent of: dropped, and named in the notes.
_HARMLESS = frozenset(
    {
        "metadata",
        "service_tier",
        "context_management",
        "cache_control",
        "diagnostics",
        "inference_geo",
        "speed",
    }
)
_MAPPED = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stream",
        "temperature",
        "top_p",
        "stop_sequences",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
    }
)
#: Tool fields that only steer Anthropic's own tool runner or cache.
_HARMLESS_TOOL = frozenset(
    {"cache_control", "defer_loading", "eager_input_streaming", "input_examples", "allowed_callers"}
)
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "xhigh"}
#: Thinking budgets (tokens) under which an effort is chosen, smallest first.
#: The budgets chat_to_anthropic gives each effort (1024, 4096, 16384, 32768) read back as it.
_BUDGET_EFFORT = ((4096, "low"), (16384, "medium"), (32768, "high"))


class TranslationError(Exception):
    """A client request field the upstream API cannot express: a 400 naming the field."""

    status = 400

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.message = f"{field}: {why}"

    def body(self) -> bytes:
        """The error in Anthropic's envelope, as the client expects it."""
        return _error_body("invalid_request_error", self.message)


def _error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


@dataclass(slots=True)
class TranslatedRequest:
    """The upstream body, and what of the client's request could not be carried."""

    body: JSON
    dropped: list[str] = field(default_factory=list)
    stream: bool = False
    #: The output's messages as :mod:`tvgate.translate.history` keeps them (``body``'s
    #: ``messages`` are ``head`` + ``turns`` unless it started from a prefix).
    output: Output = field(default_factory=Output)


# --------------------------------------------------------------------------- request


def translate_request(
    body: JSON,
    *,
    model: str,
    max_tokens_field: str = "max_completion_tokens",
    reasoning_effort: bool = True,
    prefix: Prefix | None = None,
) -> TranslatedRequest:
    """``body`` (an Anthropic Messages request) as a Chat Completions request for ``model``.

    ``max_tokens_field`` is the name the upstream takes the output limit under (older
    vLLM/Ollama builds know only ``max_tokens``); ``reasoning_effort`` False is for an
    upstream model that refuses the parameter: the requested thinking is then noted as dropped.
    ``prefix``: ``body['messages']`` are the conversation's from ``prefix.index`` on, the
    ones before translated already (:mod:`tvgate.translate.history`).
    """
    try:
        return _translate_request(body, model, max_tokens_field, reasoning_effort, prefix)
    except _MALFORMED as exc:
        # A malformed request (a block without its text, a list where an object goes):
        # the client's error, as Anthropic would answer it.
        raise TranslationError("body", f"malformed request ({exc!r})") from exc


def _translate_request(
    body: JSON, model: str, max_tokens_field: str, reasoning_effort: bool, prefix: Prefix | None
) -> TranslatedRequest:
    notes: dict[str, None] = {}
    for key in body:
        if key in _HARMLESS:
            notes[key] = None
        elif key not in _MAPPED:
            raise TranslationError(key, "not supported on an OpenAI Chat Completions route")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages", "must be a list")
    head = _system(body.get("system"), notes)
    output = _messages(messages, prefix)
    out: JSON = {"model": model, "messages": head + output.turns}
    output.head = head
    # The messages' notes after the system prompt's, each once, as if made in one pass.
    notes.update(dict.fromkeys(output.notes))
    if messages and messages[-1].get("role") == "assistant":
        notes["messages[-1]: a final assistant turn is sent as history, not continued"] = None
    if "max_tokens" in body:
        out[max_tokens_field] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("tools"):
        out["tools"] = [_tool(tool, f"tools[{i}]", notes) for i, tool in enumerate(body["tools"])]
    if body.get("tool_choice"):
        _tool_choice(body["tool_choice"], out)
    effort = _effort(body, notes)
    if effort is not None:
        if reasoning_effort:
            out["reasoning_effort"] = effort
        else:
            notes["thinking: the upstream model takes no reasoning effort"] = None
    output_config = body.get("output_config") or {}
    for key in output_config:
        if key not in ("effort", "format"):
            raise TranslationError(f"output_config.{key}", "not supported on an OpenAI route")
    output_format = output_config.get("format")
    if output_format:
        if output_format.get("type") != "json_schema":
            raise TranslationError("output_config.format.type", "only json_schema is supported")
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": output_format["schema"], "strict": True},
        }
    stream = bool(body.get("stream"))
    if stream:
        # Anthropic reports usage on every stream; the upstream only does when asked.
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return TranslatedRequest(out, list(notes), stream, output)


def _messages(messages: list[Any], prefix: Prefix | None) -> Output:
    """The Chat messages of ``messages`` (the conversation's from ``prefix.index`` on);
    each input message's output stands alone, so a later call may start before any."""
    start = prefix.index if prefix is not None else 0
    notes: dict[str, None] = dict.fromkeys(prefix.notes) if prefix is not None else {}
    turns: list[JSON] = []
    marks: list[tuple[int, int, int, Any]] = []
    for i, message in enumerate(messages, start):
        marks.append((i, len(turns), len(notes), None))
        _message(message, f"messages[{i}]", turns, notes)
    marks.append((start + len(messages), len(turns), len(notes), None))
    return Output(turns=turns, marks=marks, notes=list(notes))


def _system(system: Any, notes: dict[str, None], where: str = "system") -> list[JSON]:
    if system is None or system == "" or system == []:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if not isinstance(system, list):
        raise TranslationError(where, "must be a string or a list of text blocks")
    parts = []
    for i, block in enumerate(system):
        if block.get("type") != "text":
            raise TranslationError(f"{where}[{i}].type", "only text blocks are supported")
        parts.append(_text_part(block, f"{where}[{i}]", notes))
    return [{"role": "system", "content": parts}]


def _text_part(block: JSON, where: str, notes: dict[str, None]) -> JSON:
    if "cache_control" in block:
        notes["cache_control"] = None
    if block.get("citations"):
        notes[f"{where}.citations"] = None
    return {"type": "text", "text": block["text"]}


def _message(message: JSON, where: str, out: list[JSON], notes: dict[str, None]) -> None:
    role = message.get("role")
    content = message.get("content")
    if role == "system":
        # A system message within the conversation (Claude Code 2.1 sends its environment
        # so): Chat Completions takes system messages anywhere, at the same place (an
        # empty one says nothing and is left out).
        out.extend(_system(content, notes, where=f"{where}.content"))
        return
    if role not in ("user", "assistant"):
        raise TranslationError(f"{where}.role", "must be user, assistant or system")
    if isinstance(content, str):
        out.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content", "must be a string or a list of blocks")
    if role == "assistant":
        out.append(_assistant(content, where, notes))
        return
    # Tool results become "tool" messages, which must follow the assistant's tool calls
    # at once: they go first, the rest of the user turn after them. Chat tool messages
    # carry text only, so images in a result join that user message.
    parts: list[JSON] = []
    carried: list[JSON] = []
    for j, block in enumerate(content):
        # The usual tool result (text, no flags) inline, its path never written: this
        # runs for every block of a whole conversation on every call.
        if block.get("type") == "tool_result":
            text = block.get("content", "")
            if isinstance(text, str) and not ("is_error" in block or "cache_control" in block):
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            else:
                out.append(_tool_result(block, f"{where}.content[{j}]", carried, notes))
        else:
            parts.append(_part(block, f"{where}.content[{j}]", notes))
    if carried or parts:
        out.append({"role": "user", "content": carried + parts})


def _part(block: JSON, where: str, notes: dict[str, None]) -> JSON:
    kind = block.get("type")
    if kind == "text":
        return _text_part(block, where, notes)
    if kind not in ("image", "document"):
        raise TranslationError(f"{where}.type", f"{kind} blocks not supported in a user turn")
    if "cache_control" in block:
        notes["cache_control"] = None
    source = block["source"]
    source_type = source.get("type")
    if kind == "image":
        if source_type == "base64":
            url = f"data:{source['media_type']};base64,{source['data']}"
        elif source_type == "url":
            url = source["url"]
        else:
            raise TranslationError(f"{where}.source.type", f"{source_type} images not supported")
        return {"type": "image_url", "image_url": {"url": url}}
    if source_type == "text":
        return {"type": "text", "text": source["data"]}
    if source_type == "base64" and source.get("media_type") == "application/pdf":
        return {
            "type": "file",
            "file": {
                "filename": block.get("title") or "document.pdf",
                "file_data": f"data:application/pdf;base64,{source['data']}",
            },
        }
    raise TranslationError(f"{where}.source.type", f"{source_type} documents not supported")


def _tool_result(block: JSON, where: str, carried: list[JSON], notes: dict[str, None]) -> JSON:
    if block.get("is_error"):
        notes[f"{where}.is_error"] = None
    if "cache_control" in block:
        notes["cache_control"] = None
    content = block.get("content", "")
    if not isinstance(content, str):
        texts = []
        for k, item in enumerate(content):
            if item.get("type") == "text":
                texts.append(_text_part(item, f"{where}.content[{k}]", notes))
            else:
                notes[f"{where}.content[{k}]: sent in a user message after the tool results"] = None
                carried.append(_part(item, f"{where}.content[{k}]", notes))
        # An empty list is refused by some upstreams where an empty string is not.
        content = texts or ""
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _assistant(content: list[JSON], where: str, notes: dict[str, None]) -> JSON:
    texts: list[JSON] = []
    calls: list[JSON] = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "text":
            if "cache_control" in block or block.get("citations"):
                texts.append(_text_part(block, f"{where}.content[{j}]", notes))
            else:
                texts.append({"type": "text", "text": block["text"]})
        elif kind == "tool_use":
            if "cache_control" in block:
                notes["cache_control"] = None
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            at = f"{where}.content[{j}]"
            notes[f"{at}: {kind} block (its signature cannot be checked upstream)"] = None
        else:
            raise TranslationError(f"{where}.content[{j}].type", f"{kind} blocks not supported")
    message: JSON = {"role": "assistant", "content": texts or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: JSON, where: str, notes: dict[str, None]) -> JSON:
    if tool.get("type") not in (None, "custom"):
        raise TranslationError(f"{where}.type", f"{tool.get('type')} is an Anthropic server tool")
    function: JSON = {"name": tool["name"]}
    for key in tool:
        if key in _HARMLESS_TOOL:
            notes[f"tools.{key}"] = None
        elif key not in ("type", "name", "description", "input_schema", "strict"):
            raise TranslationError(f"{where}.{key}", "not supported on an OpenAI route")
    if "description" in tool:
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object"}
    if "strict" in tool:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice: JSON, out: JSON) -> None:
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise TranslationError("tool_choice.type", f"{kind} not supported")
    if choice.get("disable_parallel_tool_use") and "tools" in out:
        out["parallel_tool_calls"] = False


def _effort(body: JSON, notes: dict[str, None]) -> str | None:
    """The reasoning effort that stands for the request's thinking: ``output_config.effort``
    where given, else one read off the thinking budget."""
    thinking = body.get("thinking") or {}
    if thinking.get("display") == "omitted":
        notes["thinking.display"] = None
    effort = (body.get("output_config") or {}).get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise TranslationError("output_config.effort", f"unknown effort {effort!r}")
        if effort == "max":
            notes["output_config.effort: max sent as xhigh"] = None
        return _EFFORTS[effort]
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens") or 0
        for limit, name in _BUDGET_EFFORT:
            if budget < limit:
                return name
        return "xhigh"
    return None


# --------------------------------------------------------------------------- usage, stop


_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def anthropic_usage(usage: JSON | None) -> JSON:
    """Chat Completions ``usage`` in Anthropic's terms: cached (read and, where reported,
    written) tokens moved out of ``input_tokens``, reasoning tokens as thinking tokens.
    A figure that is not a count (an upstream may be a member's own server) counts as 0."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details") or {}
    # DeepSeek reports its cache hits beside, not inside, prompt_tokens_details.
    cache_read = _count(details.get("cached_tokens")) or _count(
        usage.get("prompt_cache_hit_tokens")
    )
    cache_write = _count(details.get("cache_write_tokens")) or _count(
        details.get("cache_creation_tokens")
    )
    out: JSON = {
        "input_tokens": max(_count(usage.get("prompt_tokens")) - cache_read - cache_write, 0),
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "output_tokens": _count(usage.get("completion_tokens")),
    }
    reasoning = _count((usage.get("completion_tokens_details") or {}).get("reasoning_tokens"))
    if reasoning:
        out["output_tokens_details"] = {"thinking_tokens": reasoning}
    return out


def _count(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def _stop_reason(finish_reason: str | None, refused: bool) -> str:
    if refused:
        return "refusal"
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def _reasoning(message: JSON) -> str | None:
    """The reasoning text of a message or delta, under either name upstreams use."""
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) and text else None


def _tool_input(arguments: str, where: str, notes: list[str]) -> JSON:
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        notes.append(f"{where}: arguments are not a JSON object, sent as {{}}")
        return {}
    return value


# --------------------------------------------------------------------------- response


def translate_response(body: JSON, notes: list[str] | None = None) -> JSON:
    """A ChatCompletion as an Anthropic Message; what could not be carried goes to ``notes``.
    Raises ValueError on a body that is not a ChatCompletion (one without ``choices``:
    another endpoint's answer, a server's own error)."""
    if "choices" not in body:
        raise ValueError("not a ChatCompletion (no choices)")
    notes = notes if notes is not None else []
    try:
        return _translate_response(body, notes)
    except _MALFORMED as exc:
        raise ValueError(f"not a ChatCompletion ({exc!r})") from exc


def _translate_response(body: JSON, notes: list[str]) -> JSON:
    choices = body.get("choices") or [{}]
    if len(choices) > 1:
        notes.append("choices[1:]: only the first choice is returned")
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[JSON] = []
    reasoning = _reasoning(message)
    if reasoning is not None:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        notes.append("thinking: the upstream gives no signature")
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    refusal = message.get("refusal")
    if refusal:
        content.append({"type": "text", "text": refusal})
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{i}",
                "name": function.get("name", ""),
                "input": _tool_input(function.get("arguments", ""), f"tool_calls[{i}]", notes),
            }
        )
    return {
        "id": _message_id(body.get("id")),
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ""),
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason"), bool(refusal)),
        "stop_sequence": None,
        "usage": anthropic_usage(body.get("usage")),
    }


def _message_id(upstream_id: Any) -> str:
    return f"msg_{upstream_id}" if upstream_id else "msg_translated"


# --------------------------------------------------------------------------- errors


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
#: OpenAI error types (and codes) with a closer Anthropic type than their status gives.
_OPENAI_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "billing_error",
    "server_error": "api_error",
}
_MAX_MESSAGE = 2000


def _error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _error_message(body: Any) -> tuple[str | None, str | None]:
    """The message and type of an error body in OpenAI's envelope (``{"error": {...}}``),
    vLLM's (``{"object": "error", "message": ...}``) or Ollama's (``{"error": "..."}``)."""
    if not isinstance(body, dict):
        return None, None
    error = body.get("error", body)
    if isinstance(error, str):
        return error, None
    if not isinstance(error, dict):
        return None, None
    message = error.get("message")
    kind = error.get("code") if error.get("code") in _OPENAI_ERROR_TYPES else error.get("type")
    return (message if isinstance(message, str) else None), (
        kind if isinstance(kind, str) else None
    )


def translate_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An upstream error answer as Anthropic's error envelope; the status and the
    provider's message are kept (a body that is not JSON becomes the message)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    message, _ = _error_message(parsed)
    if message is None:
        message = body[:_MAX_MESSAGE].decode("utf-8", "replace").strip() or f"upstream {status}"
    return status, _error_body(_error_type(status), message)


# --------------------------------------------------------------------------- stream

_TEXT_DELTA = b'"delta":{"type":"text_delta","text":'
_THINKING_DELTA = b'"delta":{"type":"thinking_delta","thinking":'
_JSON_DELTA = b'"delta":{"type":"input_json_delta","partial_json":'
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


#: A content chunk as OpenAI sends nearly every one: one choice, index 0, a non-empty
#: ``content`` delta (group 1, its JSON string) and nothing else; other members only
#: strings or null (so no usage, no error); in the text only the escapes orjson writes
#: itself and no raw control character, so that the bytes sent do not depend on which
#: path a chunk took. Any other bytes take the parsing path.
_PLAIN = rb'"[^"\\\x00-\x1f]*"'
_MEMBERS = rb'(?:,"(?!error")[a-z_]+":(?:' + _PLAIN + rb"|null))*"
_TEXT_CHUNK = re.compile(
    rb'data: \{"id":' + _PLAIN + rb',"object":"chat\.completion\.chunk","created":\d+,'
    rb'"model":' + _PLAIN + _MEMBERS + rb',"choices":\[\{"index":0,"delta":\{"content":'
    rb'("(?:[^"\\\x00-\x1f]|\\["\\bfnrt])+")'
    rb'\},"logprobs":null,"finish_reason":null\}\]' + _MEMBERS + rb"\}\n\n"
)


def _event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


@dataclass(slots=True)
class _ToolCall:
    """A streamed tool call: its block index once its name is known, else its arguments so far."""

    id: str | None = None
    name: str | None = None
    index: int | None = None
    pending: str = ""


class StreamTranslator:
    """Chat Completions chunks (raw SSE bytes) in, Anthropic Messages events out.

    Feed each upstream chunk to :meth:`feed` (or the events of an SSE parser the caller
    already runs, to :meth:`feed_events`) and send what it returns; :meth:`finish` at the
    upstream's end; :meth:`error` when the upstream fails mid-stream. One content block is
    open at a time, as Anthropic streams them: a switch between reasoning, text and a tool
    call closes the open block. The closing ``message_delta`` waits for the upstream's
    ``[DONE]`` (or end), since its usage chunk comes after the finish reason.
    ``notes`` lists what could not be carried; ``usage`` is the final usage sent.
    """

    __slots__ = (
        "_block",
        "_blocks",
        "_done",
        "_events",
        "_finish_reason",
        "_model",
        "_refused",
        "_started",
        "_tools",
        "_upstream_usage",
        "notes",
        "usage",
    )

    def __init__(self, model: str | None = None) -> None:
        self._events = FastEvents(_TEXT_CHUNK)
        #: The model named to the client; the upstream's own when None.
        self._model = model
        self._started = False
        self._done = False
        self._blocks = 0
        # The open block: (its index, "text" | "thinking" | "tool") or None.
        self._block: tuple[int, str] | None = None
        self._tools: dict[int, _ToolCall] = {}
        self._finish_reason: str | None = None
        self._refused = False
        self._upstream_usage: JSON | None = None
        self.notes: list[str] = []
        self.usage: JSON | None = None

    def _note(self, note: str) -> None:
        # Once each: a note may concern every chunk of a long stream.
        if note not in self.notes:
            self.notes.append(note)

    @property
    def done(self) -> bool:
        """The client's stream is complete (message_stop or error sent)."""
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        """The client bytes that the upstream bytes ``chunk`` complete (often b"")."""
        out: list[bytes] = []
        for event in self._events.feed(chunk):
            if self._done:
                break
            if isinstance(event, SSEEvent):
                self._upstream_event(event, out)
            elif self._block is not None and self._block[1] == "text":
                # A text delta of the usual bytes into the open text block: its JSON
                # string is the client's event's as it is.
                out.append(_block_delta_raw(self._block[0], _TEXT_DELTA, event[1]))
            else:
                self._upstream_event(SSEEvent(None, event[0][6:-2]), out)
        return b"".join(out)

    def feed_events(self, events: Iterable[SSEEvent]) -> bytes:
        """:meth:`feed` for events already parsed from the upstream stream."""
        out: list[bytes] = []
        for event in events:
            if self._done:
                break
            self._upstream_event(event, out)
        return b"".join(out)

    def _upstream_event(self, event: SSEEvent, out: list[bytes]) -> None:
        data = event.data
        if data == b"[DONE]":
            self._close(out)
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._note("an upstream event that is not JSON was skipped")
            return
        try:
            self._chunk(obj, out)
        except _MALFORMED:
            # An upstream may be a member's own server: a chunk of another shape is
            # skipped, never allowed to break the client's stream.
            self._note("an upstream chunk of unexpected shape was skipped")

    def finish(self) -> bytes:
        """The end of the upstream stream: the closing events, or an error event if the
        upstream stopped before its finish reason."""
        out: list[bytes] = []
        self._events.close()
        if not self._done:
            if self._finish_reason is None:
                return self.error("The upstream stream ended before the answer was complete")
            self._close(out)
        return b"".join(out)

    def error(self, message: str, kind: str = "api_error") -> bytes:
        """An in-band Anthropic ``error`` event, which ends the client's stream."""
        if self._done:
            return b""
        self._done = True
        return _event(b"error", _error_body(kind, message))

    # ---- one upstream chunk

    def _chunk(self, obj: JSON, out: list[bytes]) -> None:
        error = obj.get("error")
        if error is not None:
            message, kind = _error_message(obj)
            out.append(
                self.error(
                    message or "upstream error",
                    _OPENAI_ERROR_TYPES.get(kind or "", "api_error"),
                )
            )
            return
        if not self._started:
            self._start(obj, out)
        choices = obj.get("choices")
        if choices:
            choice = choices[0]
            if len(choices) > 1 or choice.get("index", 0):
                self._note("choices[1:]: only the first choice is returned")
            if choice.get("index", 0) == 0:
                delta = choice.get("delta")
                if delta:
                    self._delta(delta, out)
                finish = choice.get("finish_reason")
                if finish:
                    self._finish_reason = finish
                    self._stop_block(out)
        usage = obj.get("usage")
        if usage:
            self._upstream_usage = usage

    def _start(self, obj: JSON, out: list[bytes]) -> None:
        self._started = True
        message: JSON = {
            "id": _message_id(obj.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model or obj.get("model", ""),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The upstream tells usage only at the end: message_delta carries all of it.
            "usage": {
                "input_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        }
        payload = orjson.dumps({"type": "message_start", "message": message})
        out.append(_event(b"message_start", payload))
        out.append(_PING)

    def _delta(self, delta: JSON, out: list[bytes]) -> None:
        # The keys present, in the upstream's order: a delta has one or two, and this is
        # the per-chunk path (a lookup of each known key would be five).
        for key, value in delta.items():
            if not value:
                continue
            if key == "content":
                index = self._open("text", {"type": "text", "text": ""}, out)
                out.append(_block_delta(index, _TEXT_DELTA, value))
            elif key == "reasoning_content" or (
                # vLLM sends the same text under both names; Ollama only as "reasoning".
                key == "reasoning" and not delta.get("reasoning_content")
            ):
                if isinstance(value, str):
                    thinking = {"type": "thinking", "thinking": "", "signature": ""}
                    index = self._open("thinking", thinking, out)
                    out.append(_block_delta(index, _THINKING_DELTA, value))
            elif key == "tool_calls":
                for position, call in enumerate(value):
                    self._tool_delta(call, position, out)
            elif key == "refusal":
                self._refused = True
                index = self._open("text", {"type": "text", "text": ""}, out)
                out.append(_block_delta(index, _TEXT_DELTA, value))

    def _tool_delta(self, call: JSON, position: int, out: list[bytes]) -> None:
        key = call.get("index", position)
        tool = self._tools.get(key)
        if tool is None:
            tool = self._tools[key] = _ToolCall()
        if call.get("id"):
            tool.id = call["id"]
        function = call.get("function") or {}
        if function.get("name"):
            tool.name = function["name"]
        arguments = function.get("arguments") or ""
        if tool.index is None:
            if tool.name is None:
                # Some upstreams name the call after its first fragment.
                tool.pending += arguments
                return
            self._stop_block(out)
            tool.index = self._blocks
            self._blocks += 1
            self._block = (tool.index, "tool")
            block = {
                "type": "tool_use",
                "id": tool.id or f"toolu_{key}",
                "name": tool.name,
                "input": {},
            }
            out.append(_block_start(tool.index, block))
            arguments = tool.pending + arguments
            tool.pending = ""
        elif self._block != (tool.index, "tool"):
            self._note(f"tool call {key}: arguments after its block closed")
        if arguments:
            out.append(_block_delta(tool.index, _JSON_DELTA, arguments))

    def _open(self, kind: str, block: JSON, out: list[bytes]) -> int:
        """The index of the open block of ``kind``, after starting one if needed."""
        current = self._block
        if current is not None and current[1] == kind:
            return current[0]
        self._stop_block(out)
        index = self._blocks
        self._blocks += 1
        self._block = (index, kind)
        if kind == "thinking":
            self._note("thinking: the upstream gives no signature")
        out.append(_block_start(index, block))
        return index

    def _stop_block(self, out: list[bytes]) -> None:
        if self._block is not None:
            index = self._block[0]
            self._block = None
            out.append(
                _event(
                    b"content_block_stop",
                    b'{"type":"content_block_stop","index":%d}' % index,
                )
            )

    def _close(self, out: list[bytes]) -> None:
        """message_delta (stop reason, usage) and message_stop."""
        if not self._started:
            self._start({}, out)
        self._stop_block(out)
        if self._upstream_usage is None:
            self._note("usage: the upstream reported none")
        self.usage = anthropic_usage(self._upstream_usage)
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": _stop_reason(self._finish_reason, self._refused),
                "stop_sequence": None,
            },
            "usage": self.usage,
        }
        out.append(_event(b"message_delta", orjson.dumps(delta)))
        out.append(_MESSAGE_STOP)
        self._done = True


def _block_start(index: int, block: JSON) -> bytes:
    payload = orjson.dumps({"type": "content_block_start", "index": index, "content_block": block})
    return _event(b"content_block_start", payload)


def _block_delta(index: int, head: bytes, value: str) -> bytes:
    # Built from bytes: one orjson call per delta, for the string alone.
    return _block_delta_raw(index, head, orjson.dumps(value))


def _block_delta_raw(index: int, head: bytes, value: bytes) -> bytes:
    """A delta event whose value is given as its JSON string's bytes."""
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' % index
        + head
        + value
        + b"}}\n\n"
    )
