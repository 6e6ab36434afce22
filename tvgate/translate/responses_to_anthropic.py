"""An OpenAI Responses client (Codex) on an Anthropic Messages route.

This module owns the four phases of that translation, as pure functions of the bytes
and JSON given (no I/O, no configuration): :func:`translate_request` (a
``/v1/responses`` body to a ``/v1/messages`` body for the route's model),
:func:`translate_response` (a Message to a Response), :class:`StreamTranslator`
(Anthropic SSE bytes to Responses events, incrementally) and :func:`translate_error`
(Anthropic's error envelope to OpenAI's, which Responses shares, message kept). What
the Responses side of it has in common with :mod:`.responses_to_chat` is in
:mod:`.responses_api`; the rules an OpenAI client on an Anthropic route follows either
way (finish reasons, usage, thinking budgets, image sources, the error envelope) are
:mod:`.chat_to_anthropic`'s, imported.

Thinking: ``reasoning.effort`` becomes ``thinking.budget_tokens``; a thinking block comes
back as a reasoning item whose summary is the thinking text. When the client asks for
``reasoning.encrypted_content`` (Codex does, with ``store: false``), the item carries the
whole Anthropic block (text and signature, or the redacted data) sealed in that field,
so the block goes back to Anthropic exactly as Anthropic gave it; a reasoning item
without such a seal (one OpenAI made, or none asked for) is dropped and noted, never
turned into a block with a made-up signature.
"""

from __future__ import annotations

import base64
import binascii
import re

import orjson

from tvgate.translate import responses_api as api
from tvgate.translate.chat_to_anthropic import (
    DEFAULT_MAX_TOKENS,
    EFFORT_BUDGET,
    JSON,
    TranslationError,
    _anthropic_error,
    _dict,
    _finish,
    _index,
    _source,
    _tool,
    _tool_choice,
    add_thinking,
    chat_usage,
    translate_error,
)
from tvgate.translate.chat_to_anthropic import StreamTranslator as AnthropicReader

__all__ = [
    "StreamTranslator",
    "TranslationError",
    "translate_error",
    "translate_request",
    "translate_response",
]

#: What a sealed thinking block starts with: only such a seal goes back to Anthropic.
_SEAL = "tvgate.anthropic.v1:"


# --- request ------------------------------------------------------------------------


def translate_request(
    body: JSON, upstream_model: str, *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> api.ResponsesRequest:
    """The Anthropic Messages body for a Responses ``body``, on ``upstream_model``.

    Raises :class:`TranslationError` for a field Anthropic cannot express."""
    dropped: list[str] = []
    api.check_fields(body, dropped)
    system, turns = _turns(api.input_items(body), dropped)
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        system.insert(0, {"type": "text", "text": instructions})
    elif instructions is not None and not isinstance(instructions, str):
        raise TranslationError("instructions", "instructions must be a string")
    if not turns:
        raise TranslationError("input", "input has no user or assistant turn")
    out: JSON = {"model": upstream_model}
    if system:
        out["system"] = system
    out["messages"] = turns

    max_tokens = api.max_output_tokens(body)
    effort = api.reasoning_effort(body)
    if max_tokens is None:
        # Codex never gives one. Anthropic's max_tokens counts the thinking too: the
        # effort's budget comes on top, so that thinking leaves the answer its default.
        max_tokens = default_max_tokens + EFFORT_BUDGET.get(effort or "", 0)
        dropped.append(f"max_output_tokens not given: {max_tokens} sent")
    out["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stream = bool(body.get("stream"))
    if stream:
        out["stream"] = True

    tools = api.function_tools(body, dropped)
    if tools:
        out["tools"] = [_tool(i, api.chat_tool(t)) for i, t in enumerate(tools)]
    choice = _tool_choice(api.chat_tool_choice(body), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    schema = api.json_schema(body)
    if schema is not None:
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema["schema"]}}
    if effort is not None:
        add_thinking(out, effort, dropped)
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    include = body.get("include")
    encrypted = isinstance(include, list) and api.ENCRYPTED in include
    return api.ResponsesRequest(out, stream, api.request_echo(body), encrypted, dropped)


def _turns(items: list[JSON], dropped: list[str]) -> tuple[list[JSON], list[JSON]]:
    system: list[JSON] = []
    turns: list[JSON] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = api.item_type(item)
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                system.extend(_blocks(item.get("content"), where, dropped, text_only=True))
                continue
            if role not in ("user", "assistant"):
                raise TranslationError(f"{where}.role", f"{where}.role {role!r} is not supported")
            blocks = _blocks(item.get("content"), where, dropped)
        elif kind == "function_call":
            role = "assistant"
            args = api.arguments_object(item.get("arguments"), f"{where}.arguments")
            blocks = [
                {
                    "type": "tool_use",
                    "id": item.get("call_id"),
                    "name": item.get("name"),
                    "input": args,
                }
            ]
        elif kind == "function_call_output":
            role = "user"
            blocks = [_tool_result(item, where, dropped)]
        elif kind == "reasoning":
            role = "assistant"
            blocks = _unseal(item, where, dropped)
        else:
            raise TranslationError(f"{where}.type", f"{where}.type {kind!r} is not supported")
        if not blocks:
            continue
        # Anthropic alternates roles: consecutive items of one role are one turn (parallel
        # calls, their results, the user text after them), in their order.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _blocks(
    content: object, where: str, dropped: list[str], *, text_only: bool = False
) -> list[JSON]:
    out: list[JSON] = []
    for j, part in enumerate(api.content_parts(content, where)):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            if part.get("text"):
                out.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            dropped.append(f"{at}: refusal")
        elif text_only:
            raise TranslationError(f"{at}.type", f"{at} must be a text part")
        elif kind == "input_image":
            if part.get("detail") not in (None, "auto"):
                dropped.append(f"{at}.detail")
            out.append({"type": "image", "source": _source(api.image_url(part, at), at)})
        elif kind == "input_file":
            url = part.get("file_data") or part.get("file_url")
            if not isinstance(url, str):
                raise TranslationError(f"{at}.file_data", f"{at} needs file_data or file_url")
            if not url.startswith("data:") and not url.startswith(("https://", "http://")):
                # Responses sends file_data as bare base64 beside the filename.
                url = f"data:application/pdf;base64,{url}"
            out.append({"type": "document", "source": _source(url, at)})
        else:
            raise TranslationError(f"{at}.type", f"{at}.type {kind!r} is not supported")
    return out


def _tool_result(item: JSON, where: str, dropped: list[str]) -> JSON:
    output = item.get("output")
    result: JSON = {"type": "tool_result", "tool_use_id": item.get("call_id")}
    if isinstance(output, str):
        result["content"] = output
    else:
        result["content"] = _blocks(output, f"{where}.output", dropped)
    return result


def _seal(block: JSON) -> str:
    return _SEAL + base64.b64encode(orjson.dumps(block)).decode()


def _unseal(item: JSON, where: str, dropped: list[str]) -> list[JSON]:
    """The Anthropic block a reasoning item sealed, or nothing (noted)."""
    sealed = item.get("encrypted_content")
    if isinstance(sealed, str) and sealed.startswith(_SEAL):
        try:
            block = orjson.loads(base64.b64decode(sealed[len(_SEAL) :], validate=True))
        except (binascii.Error, orjson.JSONDecodeError):
            block = None
        if isinstance(block, dict) and block.get("type") in ("thinking", "redacted_thinking"):
            return [block]
    dropped.append(f"{where}: reasoning without an Anthropic signature")
    return []


# --- response -----------------------------------------------------------------------


def translate_response(body: JSON, request: api.ResponsesRequest) -> JSON:
    """The Response for an Anthropic Message ``body``; what it could not carry is
    appended to ``request.dropped``."""
    notes = request.dropped
    response_id = f"resp_{body.get('id')}"
    output: list[JSON] = []
    content = body.get("content")
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        item_id = f"_{response_id[5:]}_{len(output)}"
        if kind == "text":
            output.append(api.message_item("msg" + item_id, str(block.get("text", ""))))
            if block.get("citations"):
                notes.append("content: citations")
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input", {})).decode()
            output.append(
                api.call_item("fc" + item_id, block.get("id"), block.get("name"), arguments)
            )
        elif kind in ("thinking", "redacted_thinking"):
            text = block.get("thinking", "") if kind == "thinking" else ""
            sealed = _seal(block) if request.encrypted else None
            output.append(api.reasoning_item("rs" + item_id, str(text), sealed))
        else:
            notes.append(f"content: {kind} block")
    status, incomplete = api.status_of(_finish(body.get("stop_reason"), notes))
    usage = api.responses_usage(chat_usage(body.get("usage")))
    return api.response_object(
        request.echo, response_id, body.get("model"), status, output, usage, incomplete=incomplete
    )


# --- stream -------------------------------------------------------------------------

# Anthropic pings while the model thinks; a comment keeps idle client connections
# open and every SSE client ignores it.
_PING = b": ping\n\n"
_KINDS = {"text": "message", "thinking": "reasoning", "redacted_thinking": "reasoning"}


class StreamTranslator(AnthropicReader):
    """Anthropic Messages SSE bytes in, Responses events out.

    The upstream's bytes are read as :mod:`.chat_to_anthropic` reads them (its
    :meth:`feed`, which takes chunks split anywhere and holds only an unfinished event,
    and :meth:`finish`, which fails a stream that ended before ``message_stop``); what
    they become is written by :class:`~.responses_api.ResponsesWriter`. :meth:`error`
    ends the client's stream with ``response.failed`` (the upstream failed mid-stream)."""

    __slots__ = ("_request", "_signed", "_stop", "_writer")

    def __init__(self, request: api.ResponsesRequest) -> None:
        super().__init__(False, request.dropped)
        self._request = request
        self._writer = api.ResponsesWriter(request.echo)
        # Thinking blocks by index: the block sent back sealed (its signature comes last).
        self._signed: dict[int, JSON] = {}
        self._stop: object = None

    @property
    def done(self) -> bool:
        return self._done

    def error(self, message: str, kind: str = "api_error") -> bytes:
        """``response.failed`` with ``message``, which ends the client's stream (once)."""
        self._done = True
        return self._writer.fail(kind, message)

    def _event(self, name: str | None, data: bytes, out: list[bytes]) -> None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = {"type": "ping"} if name == "ping" else None
        if not isinstance(obj, dict):
            out.append(self.error("upstream sent an unreadable event"))
            return
        kind = obj.get("type")
        w = self._writer
        if kind == "ping":
            out.append(_PING)
        elif kind == "content_block_delta":
            self._add(_index(obj), _dict(obj.get("delta")), out)
        elif kind == "content_block_start":
            self._open_block(_index(obj), _dict(obj.get("content_block")), out)
        elif kind == "content_block_stop":
            index = _index(obj)
            block = self._signed.pop(index, None)
            if block is not None and block["type"] == "thinking" and w.is_open(index):
                block["thinking"] = w.text_of(index)
            sealed = _seal(block) if block is not None and self._request.encrypted else None
            out.append(w.close(index, sealed))
        elif kind == "message_start":
            start = _dict(obj.get("message"))
            self._usage.update(_dict(start.get("usage")))
            out.append(w.start(start.get("id"), start.get("model")))
        elif kind == "message_delta":
            # Cumulative: each figure given replaces the one before.
            self._usage.update(_dict(obj.get("usage")))
            self._stop = _dict(obj.get("delta")).get("stop_reason")
        elif kind == "message_stop":
            usage = api.responses_usage(chat_usage(self._usage))
            out.append(w.complete(_finish(self._stop, self.dropped), usage))
            self._done = True
        elif kind == "error":
            # Anthropic's in-band error: its message and type, as in an error answer.
            out.append(self.error(*_anthropic_error(data)))

    def _text_event(self, event: re.Match[bytes], out: list[bytes]) -> None:
        # The reader's fast path for a text delta: here it is written like any delta.
        self._event("content_block_delta", event[1], out)

    def _open_block(self, index: int, block: JSON, out: list[bytes]) -> None:
        kind = block.get("type")
        if not isinstance(kind, str):
            kind = repr(kind)
        w = self._writer
        if kind == "tool_use":
            out.append(w.open(index, "function_call", block.get("id"), block.get("name")))
        elif kind in _KINDS:
            out.append(w.open(index, _KINDS[kind]))
            if kind == "text":
                out.append(w.delta(index, str(block.get("text") or "")))
            elif kind == "thinking":
                out.append(w.delta(index, str(block.get("thinking") or "")))
                self._signed[index] = {"type": "thinking", "thinking": "", "signature": ""}
            else:
                self._signed[index] = {"type": "redacted_thinking", "data": block.get("data")}
        else:
            self._note(f"content: {kind} block")

    def _add(self, index: int, delta: JSON, out: list[bytes]) -> None:
        kind = delta.get("type")
        w = self._writer
        if kind == "text_delta":
            out.append(w.delta(index, str(delta.get("text") or "")))
        elif kind == "input_json_delta":
            out.append(w.delta(index, str(delta.get("partial_json") or "")))
        elif kind == "thinking_delta":
            out.append(w.delta(index, str(delta.get("thinking") or "")))
        elif kind == "signature_delta":
            block = self._signed.get(index)
            if block is not None:
                block["signature"] = str(delta.get("signature") or "")
        elif kind == "citations_delta":
            self._note("content: citations")
