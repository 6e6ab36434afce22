"""Pieces of the providers' wire formats that the tests write out by hand, built in one place.

A Chat Completions tool call and an Anthropic ``tool_use`` block stand in many requests
and expected answers (the translator tests, the content store's); written out each time,
they bury what a test is about under the shape's keys. These build the documented shapes
only: what a test checks stays spelled out in the test.
"""

from __future__ import annotations

from typing import Any

#: A JSON object as the tests build and compare them.
JSON = dict[str, Any]


def chat_tool_call(call_id: str, name: str, arguments: str) -> JSON:
    """One entry of a Chat Completions message's ``tool_calls`` (``arguments``: JSON text, as
    the API sends it, valid or not)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_use(block_id: str, name: str, tool_input: JSON) -> JSON:
    """An Anthropic Messages ``tool_use`` content block."""
    return {"type": "tool_use", "id": block_id, "name": name, "input": tool_input}


def text_block(text: str) -> JSON:
    """A ``text`` content block of Anthropic Messages, or part of Chat Completions (the same
    shape)."""
    return {"type": "text", "text": text}


def tool_result(tool_use_id: str, content: str | list[JSON]) -> JSON:
    """An Anthropic Messages ``tool_result`` content block (``content``: text or blocks)."""
    return {"type": "tool_result", "tool_use_id": tool_use_id, "content": content}


def responses_usage(
    input_tokens: int,
    output_tokens: int,
    total_tokens: int,
    *,
    cached: int,
    reasoning: int,
    cache_written: int | None = None,
) -> JSON:
    """A Responses API ``usage`` object (``cache_written``: the ``cache_write_tokens`` that
    tvgate adds for an Anthropic upstream, which OpenAI itself does not send)."""
    details: JSON = {"cached_tokens": cached}
    if cache_written is not None:
        details["cache_write_tokens"] = cache_written
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": details,
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total_tokens,
    }


def messages_request(model: str, max_tokens: int, text: str, *, stream: bool = False) -> JSON:
    """An Anthropic Messages request of one user turn (``stream`` written only when true, as
    the SDKs do)."""
    body: JSON = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        body["stream"] = True
    return body
