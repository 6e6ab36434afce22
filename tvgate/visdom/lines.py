"""A stored call read as Claude Code transcript content, whatever API it spoke.

This module owns the mapping from a call's request and answer documents (Anthropic
Messages, OpenAI Chat Completions, OpenAI Responses; as stored, so already redacted)
to what a Claude Code transcript holds: the user turn(s) the call added (the trailing
run of user-side messages: a prompt, or the tool results of the last answer) and the
assistant's answer, each as a list of Claude content blocks (``text``, ``thinking``,
``tool_use``, ``tool_result``). Pure functions, bounded by the input's size: every
loop is over a list the document holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from tvgate.providers.base import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES

__all__ = ["Answer", "Call", "answer_of", "cwd_of", "user_turns"]

Block = dict[str, Any]


@dataclass(slots=True)
class Answer:
    """The assistant's answer as Claude content blocks."""

    content: list[Block] = field(default_factory=list)
    stop_reason: str | None = None


@dataclass(slots=True)
class Call:
    """What a stored call gives the transcript: its new user turns and its answer."""

    turns: list[list[Block]]
    answer: Answer | None


def _text(text: object) -> Block:
    return {"type": "text", "text": text if isinstance(text, str) else ""}


def _arguments(raw: object) -> Any:
    """A tool call's arguments as the object the model meant, the raw text if not JSON."""
    if not isinstance(raw, str):
        return raw if isinstance(raw, dict) else {}
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"arguments": raw}
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}


def _anthropic_blocks(content: object) -> list[Block]:
    if isinstance(content, str):
        return [_text(content)]
    blocks: list[Block] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            blocks.append(_text(block.get("text")))
        elif kind == "thinking":
            blocks.append({"type": "thinking", "thinking": block.get("thinking") or ""})
        elif kind == "tool_use":
            blocks.append(
                {
                    "type": "tool_use",
                    "id": block.get("id") or "",
                    "name": block.get("name") or "",
                    "input": block.get("input") if isinstance(block.get("input"), dict) else {},
                }
            )
        elif kind == "tool_result":
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": block.get("tool_use_id") or "",
                    "content": _result_content(block.get("content")),
                    "is_error": bool(block.get("is_error")),
                }
            )
        elif isinstance(kind, str):
            # Images, documents, redacted thinking: their kind, not their bytes.
            blocks.append({"type": kind})
    return blocks


def _result_content(content: object) -> Any:
    """A tool result's content: a string, or its text blocks (media named, not copied)."""
    if isinstance(content, str) or content is None:
        return content or ""
    if isinstance(content, list):
        return [
            _text(item.get("text")) if item.get("type") == "text" else {"type": item.get("type")}
            for item in content
            if isinstance(item, dict)
        ]
    return str(content)


def _trailing(items: list[Any], is_user_side: Any) -> list[Any]:
    """The run of items at the end of a conversation that the user side sent."""
    start = len(items)
    while start > 0 and is_user_side(items[start - 1]):
        start -= 1
    return items[start:]


# --- requests ---------------------------------------------------------------------


def _anthropic_turns(request: dict[str, Any]) -> list[list[Block]]:
    messages = [m for m in request.get("messages") or () if isinstance(m, dict)]
    run = _trailing(messages, lambda m: m.get("role") == "user")
    return [_anthropic_blocks(m.get("content")) for m in run]


def _chat_part(part: object) -> Block | None:
    if isinstance(part, str):
        return _text(part)
    if not isinstance(part, dict):
        return None
    if part.get("type") in ("text", "input_text"):
        return _text(part.get("text"))
    return {"type": "image" if "image" in str(part.get("type")) else str(part.get("type"))}


def _chat_turns(request: dict[str, Any]) -> list[list[Block]]:
    messages = [m for m in request.get("messages") or () if isinstance(m, dict)]
    run = _trailing(messages, lambda m: m.get("role") in ("user", "tool", "system", "developer"))
    turns: list[list[Block]] = []
    for message in run:
        role, content = message.get("role"), message.get("content")
        if role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id") or "",
                "content": _result_content(content),
                "is_error": False,
            }
            turns.append([result])
        elif role == "user":
            parts = content if isinstance(content, list) else [content]
            turns.append([b for b in map(_chat_part, parts) if b is not None])
    return turns


_RESPONSES_ANSWER_ITEMS = frozenset(
    {"function_call", "custom_tool_call", "local_shell_call", "reasoning", "web_search_call"}
)


def _responses_user_side(item: object) -> bool:
    if not isinstance(item, dict):
        return False
    if item.get("type") in _RESPONSES_ANSWER_ITEMS:
        return False
    return item.get("role") != "assistant"


def _responses_turns(request: dict[str, Any]) -> list[list[Block]]:
    items = request.get("input")
    if isinstance(items, str):
        return [[_text(items)]]
    run = _trailing([i for i in items or () if isinstance(i, dict)], _responses_user_side)
    turns: list[list[Block]] = []
    for item in run:
        kind = item.get("type")
        if kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            turns.append(
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": item.get("call_id") or "",
                        "content": _result_content(output if isinstance(output, str) else ""),
                        "is_error": False,
                    }
                ]
            )
        elif item.get("role") == "user":
            content = item.get("content")
            parts = content if isinstance(content, list) else [content]
            turns.append([b for b in map(_chat_part, parts) if b is not None])
    return turns


def user_turns(endpoint: str, request: object) -> list[list[Block]]:
    """The user turns a call added to its conversation, as Claude content block lists."""
    if not isinstance(request, dict):
        return []
    if endpoint == ANTHROPIC_MESSAGES:
        return _anthropic_turns(request)
    if endpoint == OPENAI_CHAT:
        return _chat_turns(request)
    if endpoint == OPENAI_RESPONSES:
        return _responses_turns(request)
    return []


# --- answers ------------------------------------------------------------------------


def _chat_answer(document: dict[str, Any]) -> Answer:
    choices = document.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    found = choice.get("message")
    message: dict[str, Any] = found if isinstance(found, dict) else {}
    blocks: list[Block] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning})
    if isinstance(message.get("content"), str) and message["content"]:
        blocks.append(_text(message["content"]))
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            blocks.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or "",
                    "name": function.get("name") or "",
                    "input": _arguments(function.get("arguments")),
                }
            )
    return Answer(blocks, choice.get("finish_reason"))


def _responses_answer(document: dict[str, Any]) -> Answer:
    blocks: list[Block] = []
    stop = "end_turn"
    for item in document.get("output") or ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or ():
                if isinstance(part, dict) and part.get("type") == "output_text":
                    blocks.append(_text(part.get("text")))
        elif kind == "reasoning":
            summary = " ".join(
                s.get("text") or "" for s in item.get("summary") or () if isinstance(s, dict)
            )
            blocks.append({"type": "thinking", "thinking": summary})
        elif kind in ("function_call", "custom_tool_call", "local_shell_call"):
            raw = item.get("arguments", item.get("input", item.get("action")))
            blocks.append(
                {
                    "type": "tool_use",
                    "id": item.get("call_id") or item.get("id") or "",
                    "name": item.get("name") or ("shell" if kind == "local_shell_call" else ""),
                    "input": _arguments(raw) if kind != "custom_tool_call" else {"input": raw},
                }
            )
            stop = "tool_use"
    return Answer(blocks, stop)


def answer_of(document: object) -> Answer | None:
    """The answer a stored response holds, by its shape (a translated call may store
    another API's answer than the client's)."""
    if not isinstance(document, dict):
        return None
    if isinstance(document.get("choices"), list):
        return _chat_answer(document)
    if isinstance(document.get("output"), list):
        return _responses_answer(document)
    if isinstance(document.get("content"), list):
        return Answer(_anthropic_blocks(document["content"]), document.get("stop_reason"))
    return None


# Where the clients say their working directory: Claude Code's system prompt, Codex's
# environment context message. Bounded: a path of at most 1000 characters.
# The request is JSON text: a path ends at a quote, an escape (``\n``) or whitespace; an
# escaped backslash (``\\``, a Windows path) is part of it.
_CWD = re.compile(r'(?:(?i:working directory): |<cwd>)((?:[^\s<"\\]|\\\\){1,1000})')
#: Characters of a request searched for the working directory.
_CWD_SCAN = 200_000


def cwd_of(raw_request: bytes) -> str:
    """The client's working directory when its request says it; empty otherwise."""
    match = _CWD.search(raw_request[:_CWD_SCAN].decode("utf-8", errors="replace"))
    return match.group(1).replace("\\\\", "\\") if match else ""
