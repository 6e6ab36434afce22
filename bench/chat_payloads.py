"""The OpenAI Chat Completions side of the benchmark's bytes, for the translated workloads.

This module owns what an OpenAI Chat client sends and what an OpenAI upstream answers:
the Chat twins of :mod:`bench.payloads`' requests (a 200-byte one-turn request and a
190 KB mid-session coding-agent request with a system message, tool definitions,
assistant tool calls and tool results, each as a JSON call and as a streamed one with
``stream_options.include_usage``), a ``chat.completion`` JSON answer and a 50-event
``chat.completion.chunk`` stream ending in its usage chunk and ``data: [DONE]``, framed
as the API frames them (``data: JSON\\n\\n``), and the response headers OpenAI sends.
An Anthropic client on an OpenAI route is answered from these; a Chat client on an
Anthropic route from :mod:`bench.payloads`' Anthropic answers.
"""

from __future__ import annotations

from typing import Any

from bench.payloads import (
    LARGE_BODY_BYTES,
    SAMPLE_CODE,
    SEQUENCE_MARK,
    SMALL_BODY_BYTES,
    SSE_EVENTS,
    answer_words,
    coding_tools,
    compact,
    fill_session,
    read_note,
)

#: The OpenAI Chat routes the gateway is seeded with (upstream path prefixes
#: ``/chat-json`` and ``/chat-sse``).
ROUTE_CHAT_JSON = "bench-chat-json"
ROUTE_CHAT_SSE = "bench-chat-sse"
#: The model an OpenAI route sends upstream.
OPENAI_MODEL = "gpt-5.1-2025-11-13"

#: Response headers the OpenAI API sends with every answer (values as the fake provider
#: of the tests has them), so that header handling costs what it costs.
OPENAI_RESPONSE_HEADERS: dict[str, str] = {
    "openai-organization": "org-benchbenchbenchbench",
    "openai-processing-ms": "412",
    "openai-project": "proj_benchbenchbenchbench",
    "openai-version": "2020-10-01",
    "x-request-id": "req_0123456789abcdef0123456789abcdef",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "29999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "2ms",
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
    "cf-cache-status": "DYNAMIC",
    "x-content-type-options": "nosniff",
}

#: Headers the ``openai`` Python SDK sends (less the token, which the load generator
#: adds).
OPENAI_SDK_HEADERS: dict[str, str] = {
    "Accept": "application/json",
    "Content-Type": "application/json",
    "User-Agent": "OpenAI/Python 2.8.1",
    "X-Stainless-Arch": "x64",
    "X-Stainless-Async": "false",
    "X-Stainless-Lang": "python",
    "X-Stainless-Os": "Linux",
    "X-Stainless-Package-Version": "2.8.1",
    "X-Stainless-Read-Timeout": "600",
    "X-Stainless-Retry-Count": "0",
    "X-Stainless-Runtime": "CPython",
    "X-Stainless-Runtime-Version": "3.11.7",
}

_COMPLETION_ID = "chatcmpl-BenchBenchBenchBenchBenchBen"
_CREATED = 1764633600
_FINGERPRINT = "fp_bench0001"
_PROMPT_TOKENS = 48211


def _usage(completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": _PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": _PROMPT_TOKENS + completion,
        "prompt_tokens_details": {"cached_tokens": 45000, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _data(obj: Any) -> bytes:
    return b"data: " + compact(obj) + b"\n\n"


def chat_stream(events: int = SSE_EVENTS) -> bytes:
    """A text answer of exactly ``events`` events: role, deltas, finish, usage, ``[DONE]``."""
    deltas = events - 4
    if deltas < 1:
        raise ValueError("a stream needs at least 5 events")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": _COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": _CREATED,
            "model": OPENAI_MODEL,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    out = [_data(chunk({"role": "assistant", "content": "", "refusal": None}))]
    out += [_data(chunk({"content": word})) for word in answer_words(deltas)]
    out.append(_data(chunk({}, "stop")))
    last = chunk({})
    last["choices"] = []
    last["usage"] = _usage(deltas)
    out.append(_data(last))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def chat_completion(words: int = 44) -> bytes:
    """The non-streamed ``chat.completion`` the same answer would be."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(answer_words(words)),
        "refusal": None,
        "annotations": [],
    }
    return compact(
        {
            "id": _COMPLETION_ID,
            "object": "chat.completion",
            "created": _CREATED,
            "model": OPENAI_MODEL,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": _usage(words),
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
    )


def _streamed(doc: dict[str, Any], stream: bool) -> dict[str, Any]:
    if stream:
        doc["stream"] = True
        doc["stream_options"] = {"include_usage": True}
    return doc


def small_chat_request(route: str, stream: bool, size: int = SMALL_BODY_BYTES) -> bytes:
    """A short one-turn Chat request, padded to ``size`` bytes."""
    doc = _streamed(
        {"model": route, "max_completion_tokens": 1024, "messages": [{"role": "user"}]}, stream
    )
    doc["messages"][0]["content"] = ""
    base = len(compact(doc))
    text = (f"Request {SEQUENCE_MARK.decode()}. " + "Write a haiku about retries. " * 20)[
        : max(1, size - base)
    ]
    doc["messages"][0]["content"] = text
    return compact(doc)


def large_chat_request(route: str, stream: bool, size: int = LARGE_BODY_BYTES) -> bytes:
    """A mid-session coding-agent Chat request of ``size`` bytes (within a few bytes):
    what :func:`bench.payloads.large_request` is, as a Chat client sends it."""
    tools = [
        {
            "type": "function",
            "function": {"name": name, "description": description, "parameters": schema},
        }
        for name, description, schema in coding_tools()
    ]
    system = "You are a coding agent working in a git repository. " * 30
    doc = _streamed(
        {
            "model": route,
            "max_completion_tokens": 32000,
            "messages": [{"role": "system", "content": system}],
            "tools": tools,
        },
        stream,
    )

    def turn(n: int) -> list[dict[str, Any]]:
        call_id = f"call_Bench{n:014d}"
        arguments = compact({"path": f"src/module_{n}.py", "limit": 400}).decode()
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": "read_file", "arguments": arguments},
        }
        return [
            {"role": "assistant", "content": read_note(n), "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": SAMPLE_CODE * 3},
        ]

    return fill_session(doc, size, turn)
