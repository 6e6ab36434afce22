"""A call's prompt and answer as span attributes, for an org that exports them (``span_content``).

Only the writer process calls this, with the request and the answer already redacted
with the org's keys and patterns (:mod:`tvgate.traces.batch`). They are written as the
OpenTelemetry GenAI conventions' ``gen_ai.system_instructions``,
``gen_ai.input.messages`` and ``gen_ai.output.messages``: JSON arrays of messages, each
a role and parts (``text``, ``tool_call``, ``tool_call_response``, ``reasoning``; a part
of another kind, an image, keeps only its type). Each attribute holds at most
``CONTENT_MAX`` characters: the latest messages that fit (a conversation's new turn is
at its end), a single message too long has its text cut, and
``tvgate.content_truncated`` says so.
"""

from __future__ import annotations

from typing import Any

import orjson

from tvgate.providers import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_COMPLETIONS, OPENAI_RESPONSES

#: Characters of one content attribute at most (collectors refuse requests of a few MB).
CONTENT_MAX = 64 * 1024

Part = dict[str, Any]
Message = dict[str, Any]


def content_attributes(endpoint: str, request: bytes, answer: bytes | None) -> dict[str, Any]:
    """The content attributes of a call to ``endpoint``; none for one whose body does not
    read as JSON or that carries no conversation (embeddings, count_tokens)."""
    try:
        body = orjson.loads(request)
        reply = orjson.loads(answer) if answer else None
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(body, dict):
        return {}
    reply = reply if isinstance(reply, dict) else {}
    if endpoint == ANTHROPIC_MESSAGES:
        system = _parts(body.get("system"))
        inputs = [_message(m.get("role"), m.get("content")) for m in _dicts(body.get("messages"))]
        outputs = [_output(reply.get("content"), reply.get("stop_reason"))] if reply else []
    elif endpoint == OPENAI_CHAT:
        system = []
        inputs = [_chat_message(m) for m in _dicts(body.get("messages"))]
        outputs = [
            {**_chat_message(c.get("message") or {}), "finish_reason": c.get("finish_reason")}
            for c in _dicts(reply.get("choices"))
        ]
    elif endpoint == OPENAI_RESPONSES:
        system = _parts(body.get("instructions"))
        inputs = _responses_items(body.get("input"))
        outputs = _responses_items(reply.get("output"))
    elif endpoint == OPENAI_COMPLETIONS:
        system = []
        inputs = [_message("user", body.get("prompt"))]
        outputs = [
            _output(c.get("text"), c.get("finish_reason")) for c in _dicts(reply.get("choices"))
        ]
    else:
        return {}
    attributes: dict[str, Any] = {}
    cut = False
    for name, items in (
        ("gen_ai.system_instructions", system),
        ("gen_ai.input.messages", inputs),
        ("gen_ai.output.messages", outputs),
    ):
        if items:
            attributes[name], shortened = _capped(items)
            cut = cut or shortened
    if cut:
        attributes["tvgate.content_truncated"] = True
    return attributes


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _text(value: Any) -> str:
    """What a tool result or a content list says, as text."""
    if isinstance(value, str):
        return value
    return "".join(
        str(block.get("text", "")) for block in _dicts(value) if isinstance(block.get("text"), str)
    )


def _part(block: dict[str, Any]) -> Part:
    """One content block of either provider as a part of the conventions."""
    kind = block.get("type")
    if kind in ("text", "input_text", "output_text"):
        return {"type": "text", "content": block.get("text", "")}
    if kind == "thinking":
        return {"type": "reasoning", "content": block.get("thinking", "")}
    if kind == "tool_use":
        return {
            "type": "tool_call",
            "id": block.get("id"),
            "name": block.get("name"),
            "arguments": block.get("input"),
        }
    if kind == "tool_result":
        return {
            "type": "tool_call_response",
            "id": block.get("tool_use_id"),
            "response": _text(block.get("content")),
        }
    return {"type": str(kind or "unknown")}


def _parts(content: Any) -> list[Part]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    return [_part(block) for block in _dicts(content)]


def _message(role: Any, content: Any) -> Message:
    return {"role": str(role or "user"), "parts": _parts(content)}


def _output(content: Any, finish_reason: Any) -> Message:
    return {"role": "assistant", "parts": _parts(content), "finish_reason": finish_reason}


def _chat_message(message: dict[str, Any]) -> Message:
    role = message.get("role")
    if role == "tool":
        response = {"type": "tool_call_response", "id": message.get("tool_call_id")}
        return {"role": "tool", "parts": [{**response, "response": _text(message.get("content"))}]}
    parts = _parts(message.get("content"))
    for call in _dicts(message.get("tool_calls")):
        function = call.get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": function.get("arguments"),
            }
        )
    return {"role": str(role or "user"), "parts": parts}


def _responses_items(items: Any) -> list[Message]:
    """A Responses API ``input`` or ``output``: a string, or items of messages and calls."""
    if isinstance(items, str):
        return [_message("user", items)]
    messages: list[Message] = []
    for item in _dicts(items):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item.get("role"), item.get("content")))
        elif kind == "function_call":
            call = {"type": "tool_call", "id": item.get("call_id"), "name": item.get("name")}
            messages.append(
                {"role": "assistant", "parts": [{**call, "arguments": item.get("arguments")}]}
            )
        elif kind == "function_call_output":
            response = {"type": "tool_call_response", "id": item.get("call_id")}
            messages.append(
                {"role": "tool", "parts": [{**response, "response": _text(item.get("output"))}]}
            )
        else:
            messages.append({"role": "assistant", "parts": [{"type": str(kind)}]})
    return messages


def _capped(items: list[Any]) -> tuple[str, bool]:
    """``items`` as a JSON array of at most ``CONTENT_MAX`` characters: the latest that
    fit, or the last one with its text cut; and whether anything was left out."""
    pieces = [orjson.dumps(item) for item in items]
    kept: list[bytes] = []
    size = 2
    for piece in reversed(pieces):
        if size + len(piece) + 1 > CONTENT_MAX:
            break
        kept.append(piece)
        size += len(piece) + 1
    if not kept:
        return orjson.dumps([_cut(items[-1])]).decode(errors="replace"), True
    kept.reverse()
    text = (b"[" + b",".join(kept) + b"]").decode(errors="replace")
    return text, len(kept) < len(pieces)


def _cut(item: Any) -> Any:
    """A message (or an instruction part) whose strings are cut to share ``CONTENT_MAX``."""
    parts = item.get("parts") if isinstance(item, dict) and "parts" in item else None
    share = CONTENT_MAX // 2 // max(1, len(parts) if parts else 1)
    if parts is None:
        return _cut_part(item, share)
    return {**item, "parts": [_cut_part(part, share) for part in parts]}


def _cut_part(part: Any, share: int) -> Any:
    if not isinstance(part, dict):
        return part
    return {
        key: (value[:share] if isinstance(value, str) else value)
        if key in ("content", "response", "arguments")
        else value
        for key, value in part.items()
    }
