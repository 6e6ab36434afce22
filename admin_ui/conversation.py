"""A trace's request and answer as a readable conversation, whichever API carried it.

``get_trace`` returns the provider's own JSON: an Anthropic Messages request and
Message, an OpenAI chat request and ChatCompletion, or a Responses request and
Response. This module turns each into one shape — turns of a role, each a list
of parts (text, thinking, tool call, tool result, image, other) — so one template
shows them all. Nothing here produces markup: the template escapes every string.
Unknown shapes are shown as their JSON rather than dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Part:
    kind: str  # text | thinking | tool_call | tool_result | image | other
    text: str
    label: str = ""


@dataclass(slots=True)
class Turn:
    role: str  # system | user | assistant | tool | answer
    parts: list[Part] = field(default_factory=list)


@dataclass(slots=True)
class Conversation:
    turns: list[Turn]
    tools: list[str]
    answer: Turn | None
    stop_reason: str = ""


def _json(value: Any) -> str:
    """Pretty JSON for tool inputs and unknown blocks (a string stays as it is)."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_of(item) for item in content)
    if isinstance(content, dict):
        for name in ("text", "output_text", "content"):
            if isinstance(content.get(name), str):
                return str(content[name])
    return _json(content)


# --- Anthropic Messages ---


def _anthropic_block(block: Any) -> Part:
    if isinstance(block, str):
        return Part("text", block)
    if not isinstance(block, dict):
        return Part("other", _json(block))
    kind = block.get("type")
    if kind == "text":
        return Part("text", str(block.get("text", "")))
    if kind == "thinking":
        return Part("thinking", str(block.get("thinking", "")))
    if kind == "redacted_thinking":
        return Part("thinking", "(redacted by the provider)")
    if kind in ("tool_use", "server_tool_use"):
        return Part("tool_call", _json(block.get("input", {})), str(block.get("name", "")))
    if kind == "tool_result":
        label = str(block.get("tool_use_id", ""))
        if block.get("is_error"):
            label += " (error)"
        return Part("tool_result", _text_of(block.get("content", "")), label)
    if kind in ("image", "document"):
        source = block.get("source", {})
        media = source.get("media_type", "") if isinstance(source, dict) else ""
        return Part("image", f"{kind} {media}".strip())
    return Part("other", _json(block), str(kind or ""))


def _anthropic_content(content: Any) -> list[Part]:
    if isinstance(content, list):
        return [_anthropic_block(b) for b in content]
    return [_anthropic_block(content)]


def anthropic(request: Any, response: Any) -> Conversation:
    turns: list[Turn] = []
    request = request if isinstance(request, dict) else {}
    system = request.get("system")
    if system:
        turns.append(Turn("system", _anthropic_content(system)))
    for message in request.get("messages") or []:
        if isinstance(message, dict):
            turns.append(
                Turn(str(message.get("role", "?")), _anthropic_content(message.get("content")))
            )
    tools = [str(t.get("name", "")) for t in request.get("tools") or [] if isinstance(t, dict)]
    answer = None
    stop = ""
    if isinstance(response, dict) and "content" in response:
        answer = Turn("answer", _anthropic_content(response.get("content")))
        stop = str(response.get("stop_reason") or "")
    return Conversation(turns, tools, answer, stop)


# --- OpenAI Chat Completions ---


def _chat_message(message: dict[str, Any]) -> Turn:
    role = str(message.get("role", "?"))
    parts: list[Part] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        parts.append(Part("thinking", reasoning))
    content = message.get("content")
    if isinstance(content, list):
        for item in content:
            if isinstance(item, dict) and item.get("type") in ("image_url", "input_audio"):
                parts.append(Part("image", str(item.get("type"))))
            else:
                parts.append(Part("text", _text_of(item)))
    elif content:
        kind = "tool_result" if role == "tool" else "text"
        parts.append(Part(kind, _text_of(content), str(message.get("tool_call_id", ""))))
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        parts.append(
            Part("tool_call", _json(function.get("arguments", "")), str(function.get("name", "")))
        )
    if message.get("refusal"):
        parts.append(Part("text", f"Refused: {message['refusal']}"))
    return Turn(role, parts)


def chat(request: Any, response: Any) -> Conversation:
    request = request if isinstance(request, dict) else {}
    turns = [_chat_message(m) for m in request.get("messages") or [] if isinstance(m, dict)]
    tools = [
        str((t.get("function") or {}).get("name", ""))
        for t in request.get("tools") or []
        if isinstance(t, dict)
    ]
    answer = None
    stop = ""
    if isinstance(response, dict) and response.get("choices"):
        choice = response["choices"][0]
        if isinstance(choice, dict):
            message = choice.get("message") or {"content": choice.get("text", "")}
            answer = _chat_message(message)
            answer.role = "answer"
            stop = str(choice.get("finish_reason") or "")
    return Conversation(turns, tools, answer, stop)


# --- OpenAI Responses ---


def _responses_item(item: Any) -> Turn:
    if isinstance(item, str):
        return Turn("user", [Part("text", item)])
    if not isinstance(item, dict):
        return Turn("?", [Part("other", _json(item))])
    kind = item.get("type", "message")
    if kind == "message":
        return Turn(str(item.get("role", "?")), [Part("text", _text_of(item.get("content", "")))])
    if kind in ("function_call", "custom_tool_call"):
        args = item.get("arguments", item.get("input", ""))
        return Turn("assistant", [Part("tool_call", _json(args), str(item.get("name", "")))])
    if kind in ("function_call_output", "custom_tool_call_output"):
        return Turn(
            "tool",
            [Part("tool_result", _text_of(item.get("output", "")), str(item.get("call_id", "")))],
        )
    if kind == "reasoning":
        summary = "\n".join(_text_of(s) for s in item.get("summary") or [])
        return Turn("assistant", [Part("thinking", summary or "(reasoning not shown)")])
    return Turn("?", [Part("other", _json(item), str(kind))])


def responses(request: Any, response: Any) -> Conversation:
    request = request if isinstance(request, dict) else {}
    turns: list[Turn] = []
    if request.get("instructions"):
        turns.append(Turn("system", [Part("text", _text_of(request["instructions"]))]))
    items = request.get("input")
    for item in items if isinstance(items, list) else [items] if items else []:
        turns.append(_responses_item(item))
    tools = [
        str(t.get("name") or t.get("type", ""))
        for t in request.get("tools") or []
        if isinstance(t, dict)
    ]
    answer = None
    stop = ""
    if isinstance(response, dict) and isinstance(response.get("output"), list):
        answer = Turn("answer")
        for item in response["output"]:
            answer.parts.extend(_responses_item(item).parts)
        stop = str(response.get("status") or "")
    return Conversation(turns, tools, answer, stop)


def conversation(endpoint: str, provider: str, request: Any, response: Any) -> Conversation:
    """The conversation of a trace, by the API its endpoint names."""
    if "responses" in endpoint:
        return responses(request, response)
    if "chat" in endpoint or "completions" in endpoint:
        return chat(request, response)
    if "messages" in endpoint or provider == "anthropic":
        return anthropic(request, response)
    # Embeddings and the like: no conversation; the raw JSON says everything.
    return Conversation([], [], None)
