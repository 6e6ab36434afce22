"""An OpenAI Responses client (Codex) on a Chat Completions-only upstream (vLLM, Ollama).

This module owns the four phases of that translation, as pure functions (no I/O):
:func:`translate_request` (a ``/v1/responses`` body to a ``/v1/chat/completions`` body
for the route's model), :func:`translate_response` (a ChatCompletion to a Response),
:class:`StreamTranslator` (``chat.completion.chunk`` SSE bytes to Responses events,
incrementally) and :func:`translate_error` (an upstream error, in OpenAI's, vLLM's or
Ollama's shape, to OpenAI's envelope, message kept). The Responses side it shares with
:mod:`.responses_to_anthropic` is in :mod:`.responses_api`; how an upstream's Chat
errors, reasoning fields and finish reasons read is :mod:`.anthropic_to_chat`'s.

Reasoning the upstream streams (``reasoning_content`` from vLLM, ``reasoning`` from
Ollama) becomes a reasoning item whose summary is that text, with no
``encrypted_content``: a Chat upstream gives nothing to send back, so reasoning items
in the client's input are dropped and noted.
"""

from __future__ import annotations

import orjson

from tvgate.translate import responses_api as api
from tvgate.translate.anthropic_to_chat import StreamTranslator as ChatChunkReader
from tvgate.translate.anthropic_to_chat import _reasoning
from tvgate.translate.anthropic_to_chat import translate_error as anthropic_error
from tvgate.translate.chat_to_anthropic import JSON, TranslationError
from tvgate.translate.chat_to_anthropic import translate_error as chat_error

__all__ = [
    "StreamTranslator",
    "TranslationError",
    "translate_error",
    "translate_request",
    "translate_response",
]

#: What reading a JSON value of an unexpected shape raises.
_MALFORMED = (KeyError, TypeError, AttributeError, IndexError)


# --- request ------------------------------------------------------------------------


def translate_request(
    body: JSON,
    model: str,
    *,
    max_tokens_field: str = "max_completion_tokens",
    reasoning_effort_field: bool = True,
) -> api.ResponsesRequest:
    """``body`` (a Responses request) as a Chat Completions request for ``model``.

    ``max_tokens_field`` is the name the upstream takes the output limit under (older
    vLLM/Ollama builds know only ``max_tokens``); ``reasoning_effort_field`` False is for
    an upstream model that refuses the parameter (the effort is then noted as dropped).
    Raises :class:`TranslationError` for a field Chat Completions cannot express."""
    dropped: list[str] = []
    api.check_fields(body, dropped)
    messages: list[JSON] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    elif instructions is not None and not isinstance(instructions, str):
        raise TranslationError("instructions", "instructions must be a string")
    for i, item in enumerate(api.input_items(body)):
        _item(item, f"input[{i}]", messages, dropped)
    out: JSON = {"model": model, "messages": messages}
    limit = api.max_output_tokens(body)
    if limit is not None:
        out[max_tokens_field] = limit
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    tools = api.function_tools(body, dropped)
    if tools:
        out["tools"] = [api.chat_tool(t) for t in tools]
        if body.get("parallel_tool_calls") is False:
            out["parallel_tool_calls"] = False
    choice = api.chat_tool_choice(body)
    if choice is not None:
        out["tool_choice"] = choice
    schema = api.json_schema(body)
    if schema is not None:
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    effort = api.reasoning_effort(body)
    if effort is not None:
        if reasoning_effort_field:
            out["reasoning_effort"] = effort
        else:
            dropped.append("reasoning.effort: the upstream model takes no reasoning effort")
    if isinstance(body.get("user"), str):
        out["user"] = body["user"]
    stream = bool(body.get("stream"))
    if stream:
        # Responses reports usage on every stream; the upstream only does when asked.
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    include = body.get("include")
    if isinstance(include, list) and api.ENCRYPTED in include:
        dropped.append(f"include: {api.ENCRYPTED} (the upstream gives none)")
    return api.ResponsesRequest(out, stream, api.request_echo(body), False, dropped)


def _item(item: JSON, where: str, messages: list[JSON], dropped: list[str]) -> None:
    kind = api.item_type(item)
    last = messages[-1] if messages else None
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise TranslationError(f"{where}.role", f"{where}.role {role!r} is not supported")
        # vLLM's and Ollama's chat templates know "system", not "developer".
        role = "system" if role == "developer" else role
        content = _content(item.get("content"), where, role, dropped)
        messages.append({"role": role, "content": content})
    elif kind == "function_call":
        arguments = orjson.dumps(api.arguments_object(item.get("arguments"), f"{where}.arguments"))
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": arguments.decode()},
        }
        # Parallel calls (and the text before them) are one assistant message on Chat.
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            output = _content(output, f"{where}.output", "tool", dropped)
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
    elif kind == "reasoning":
        dropped.append(f"{where}: reasoning (a Chat upstream takes none back)")
    else:
        raise TranslationError(f"{where}.type", f"{where}.type {kind!r} is not supported")


def _content(content: object, where: str, role: str, dropped: list[str]) -> str | list[JSON]:
    """A message's parts in Chat's shape: text for every role, images and files for a
    user; a content of one text part is sent as a string, which every upstream takes."""
    if isinstance(content, str):
        return content
    out: list[JSON] = []
    for j, part in enumerate(api.content_parts(content, where)):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            out.append({"type": "text", "text": part.get("text", "")})
        elif kind == "refusal":
            dropped.append(f"{at}: refusal")
        elif role != "user":
            raise TranslationError(f"{at}.type", f"{at}: only text is supported for {role}")
        elif kind == "input_image":
            image: JSON = {"url": api.image_url(part, at)}
            if part.get("detail") is not None:
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and isinstance(part.get("file_data"), str):
            file: JSON = {"file_data": part["file_data"]}
            if isinstance(part.get("filename"), str):
                file["filename"] = part["filename"]
            out.append({"type": "file", "file": file})
        else:
            raise TranslationError(f"{at}.type", f"{at}.type {kind!r} is not supported")
    if len(out) == 1 and out[0]["type"] == "text":
        return str(out[0]["text"])
    return out


# --- response -----------------------------------------------------------------------


def translate_response(body: JSON, request: api.ResponsesRequest) -> JSON:
    """The Response for a ChatCompletion ``body``; what it could not carry goes to
    ``request.dropped``. Raises ValueError on a body that is not a ChatCompletion (one
    without ``choices``: another endpoint's answer, a server's own error)."""
    if "choices" not in body:
        raise ValueError("not a ChatCompletion (no choices)")
    try:
        return _translate_response(body, request)
    except _MALFORMED as exc:
        raise ValueError(f"not a ChatCompletion ({exc!r})") from exc


def _translate_response(body: JSON, request: api.ResponsesRequest) -> JSON:
    choices = body.get("choices") or [{}]
    if len(choices) > 1:
        request.dropped.append("choices[1:]: only the first choice is returned")
    choice = choices[0]
    message = choice.get("message") or {}
    response_id = f"resp_{body.get('id') or 0}"
    base = response_id[5:]
    output: list[JSON] = []
    reasoning = _reasoning(message)
    if reasoning is not None:
        output.append(api.reasoning_item(f"rs_{base}_0", reasoning, None))
    text = message.get("content") or message.get("refusal")
    if isinstance(text, str) and text:
        output.append(api.message_item(f"msg_{base}_{len(output)}", text))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        output.append(
            api.call_item(
                f"fc_{base}_{len(output)}",
                call.get("id"),
                function.get("name"),
                arguments if isinstance(arguments, str) else "",
            )
        )
    # A refusal is what Responses reports as stopped by its content filter.
    finish = "content_filter" if message.get("refusal") else choice.get("finish_reason")
    status, incomplete = api.status_of(finish)
    usage = api.responses_usage(body.get("usage"))
    return api.response_object(
        request.echo, response_id, body.get("model"), status, output, usage, incomplete=incomplete
    )


# --- errors -------------------------------------------------------------------------


def translate_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An upstream error answer in OpenAI's envelope: the status and the provider's
    message kept, the type read off the status (vLLM's and Ollama's are not OpenAI's).
    The rules are :mod:`.anthropic_to_chat`'s and :mod:`.chat_to_anthropic`'s, composed."""
    return chat_error(*anthropic_error(status, body))


# --- stream -------------------------------------------------------------------------

_TEXT, _REASONING = "text", "reasoning"


class StreamTranslator(ChatChunkReader):
    """Chat Completions chunks (raw SSE bytes) in, Responses events out.

    The upstream's chunks are read as :mod:`.anthropic_to_chat` reads them (its
    :meth:`feed`, :meth:`feed_events` and :meth:`finish`: ``[DONE]``, a chunk that is
    not JSON or of another shape, a stream cut before its finish reason); what they
    become is written by :class:`~.responses_api.ResponsesWriter`. :meth:`error` ends
    the client's stream with ``response.failed``. Reasoning and text are one item at a
    time (a switch closes the open one); each tool call is an item of its own, open until
    the answer ends, since Chat may interleave the fragments of parallel calls.
    ``response.completed`` waits for the upstream's ``[DONE]`` (or end), since its usage
    chunk comes after the finish reason."""

    __slots__ = ("_pending", "_writer")

    def __init__(self, request: api.ResponsesRequest) -> None:
        super().__init__()
        self._writer = api.ResponsesWriter(request.echo)
        #: What could not be carried: the request's list.
        self.notes = request.dropped
        # Chat tool call index -> (call id, arguments so far) until its name is known.
        self._pending: dict[object, tuple[object, str]] = {}

    def error(self, message: str, kind: str = "api_error") -> bytes:
        """``response.failed`` with ``message``, which ends the client's stream (once)."""
        self._done = True
        return self._writer.fail(kind, message)

    def _close(self, out: list[bytes]) -> None:
        """``[DONE]``, or the upstream's end after its finish reason."""
        if self._upstream_usage is None:
            self._note("usage: the upstream reported none")
        self._done = True
        usage = api.responses_usage(self._upstream_usage)
        finish = "content_filter" if self._refused else self._finish_reason or "stop"
        out.append(self._writer.complete(finish, usage))

    def _start(self, obj: JSON, out: list[bytes]) -> None:
        self._started = True
        out.append(self._writer.start(obj.get("id"), obj.get("model")))

    def _delta(self, delta: JSON, out: list[bytes]) -> None:
        w = self._writer
        reasoning = _reasoning(delta)
        if reasoning is not None:
            out.append(self._switch(_REASONING, _TEXT))
            out.append(w.delta(_REASONING, reasoning))
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            out.append(self._switch(_TEXT, _REASONING))
            out.append(w.delta(_TEXT, text))
            if delta.get("refusal"):
                self._refused = True
        for position, call in enumerate(delta.get("tool_calls") or ()):
            self._tool_delta(call, position, out)

    def _switch(self, key: str, other: str) -> bytes:
        w = self._writer
        if w.is_open(key):
            return b""
        return w.close(other) + w.open(key, "message" if key == _TEXT else "reasoning")

    def _tool_delta(self, call: JSON, position: int, out: list[bytes]) -> None:
        w = self._writer
        key = ("call", call.get("index", position))
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        if not w.is_open(key):
            call_id, pending = self._pending.pop(key, (None, ""))
            call_id = call.get("id") or call_id
            name = function.get("name")
            if not name:
                # Some upstreams name the call after its first fragment.
                self._pending[key] = (call_id, pending + arguments)
                return
            for other in (_TEXT, _REASONING):
                out.append(w.close(other))
            out.append(w.open(key, "function_call", call_id or f"call_{key[1]}", name))
            arguments = pending + arguments
        out.append(w.delta(key, arguments))
