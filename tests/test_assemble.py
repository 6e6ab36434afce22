"""Tests of tvgate.providers.assemble against the official SDKs' own stream accumulators.

Each stream below is the event sequence the provider's API sends. The same
bytes are served to the SDK through ``httpx2.MockTransport`` (a fake provider;
the installed SDKs are built on ``httpx2``) and fed to our assembler whole, one
byte at a time and in 7-byte chunks; the rebuilt answer must equal what the
SDK's ``get_final_*()`` returns once both are reduced to JSON. That reduction
drops what only the SDK models add: a null for every optional field it knows
(``container``, ``stop_details``, ``caller``, ``citations``, usage details...),
the ``parsed*`` fields of its parse helpers (``SDK_ONLY``), and, for Chat
Completions, the ``index`` it leaves on each tool call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.shapes import chat_tool_call, responses_usage
from tvgate.providers.assemble import (
    Assembled,
    Usage,
    assemble_json,
    stream_assembler,
)

JSON = dict[str, Any]

ANTHROPIC_MODEL = "claude-sonnet-4-6"
CHAT_MODEL = "gpt-4o-2024-08-06"
RESPONSES_MODEL = "gpt-4.1-2025-04-14"

# Fields the SDKs' parse helpers add that no API response carries.
SDK_ONLY = frozenset(("parsed", "parsed_arguments", "parsed_output", "output_parsed"))


# --- wire formats ---------------------------------------------------------------


def named_sse(events: Iterable[JSON]) -> bytes:
    """Anthropic and Responses streams: ``event: <type>`` then the JSON."""
    return b"".join(
        b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n" for ev in events
    )


def data_sse(chunks: Iterable[JSON], done: bool = True) -> bytes:
    """Chat and legacy Completions streams: bare ``data:`` lines, then ``[DONE]``."""
    body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def assemble(api: str, body: bytes, chunk_size: int | None = None) -> Assembled:
    asm = stream_assembler(api)
    if chunk_size is None:
        asm.feed(body)
    else:
        for i in range(0, len(body), chunk_size):
            asm.feed(body[i : i + chunk_size])
    return asm.finish()


def assemble_both_ways(api: str, body: bytes) -> Assembled:
    whole = assemble(api, body)
    assert assemble(api, body, chunk_size=1) == whole
    assert assemble(api, body, chunk_size=7) == whole
    return whole


def normalise(value: Any) -> Any:
    """JSON without nulls or SDK-only fields."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if v is not None and k not in SDK_ONLY}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def http_client(body: bytes) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def sdk_anthropic(body: bytes) -> JSON:
    client = anthropic.Anthropic(
        base_url="http://provider.test", api_key="x", http_client=http_client(body)
    )
    with client.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=1024, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        message = stream.get_final_message()
    return normalise(message.model_dump(mode="json"))


def sdk_chat(body: bytes) -> JSON:
    client = openai.OpenAI(
        base_url="http://provider.test/v1", api_key="x", http_client=http_client(body)
    )
    with client.chat.completions.stream(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        completion = stream.get_final_completion()
    dumped = completion.model_dump(mode="json")
    # The SDK keeps each streamed tool call's "index"; a ChatCompletion has none.
    for choice in dumped["choices"]:
        for call in choice["message"].get("tool_calls") or ():
            assert "index" in call
            del call["index"]
    return normalise(dumped)


def sdk_responses(body: bytes) -> JSON:
    client = openai.OpenAI(
        base_url="http://provider.test/v1", api_key="x", http_client=http_client(body)
    )
    with client.responses.stream(model=RESPONSES_MODEL, input="hi") as stream:
        response = stream.get_final_response()
    return normalise(response.model_dump(mode="json"))


def ours(result: Assembled) -> JSON:
    assert result.response is not None
    return normalise(orjson.loads(orjson.dumps(result.response)))


# --- Anthropic Messages streams -----------------------------------------------------


def a_start(usage: JSON | None = None) -> JSON:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": ANTHROPIC_MODEL,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage
            or {
                "input_tokens": 472,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                "output_tokens": 2,
                "service_tier": "standard",
            },
        },
    }


def a_block(index: int, block: JSON) -> JSON:
    return {"type": "content_block_start", "index": index, "content_block": block}


def a_delta(index: int, delta: JSON) -> JSON:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def a_text(index: int, text: str) -> JSON:
    return a_delta(index, {"type": "text_delta", "text": text})


def a_stop(index: int) -> JSON:
    return {"type": "content_block_stop", "index": index}


def a_end(stop_reason: str, usage: JSON) -> list[JSON]:
    return [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": usage,
        },
        {"type": "message_stop"},
    ]


PING = {"type": "ping"}

ANTHROPIC_TEXT = [
    a_start(),
    a_block(0, {"type": "text", "text": ""}),
    PING,
    a_text(0, "Hello"),
    a_text(0, ", wörld 👋"),
    a_text(0, "\nSecond line."),
    a_stop(0),
    *a_end("end_turn", {"output_tokens": 15}),
]

TOOL_JSON_PIECES = [
    "",
    '{"location":',
    ' "San Fra',
    'ncisco, CA"',
    ', "unit": "fahr',
    'enheit", "days": [1, 2',
    "]}",
]
ANTHROPIC_TOOL_USE = [
    a_start(),
    a_block(0, {"type": "text", "text": ""}),
    a_text(0, "Okay, let me check"),
    a_text(0, " the weather."),
    a_stop(0),
    a_block(
        1,
        {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    ),
    *[a_delta(1, {"type": "input_json_delta", "partial_json": p}) for p in TOOL_JSON_PIECES],
    a_stop(1),
    *a_end("tool_use", {"output_tokens": 89}),
]

ANTHROPIC_THINKING = [
    a_start(),
    a_block(0, {"type": "thinking", "thinking": "", "signature": ""}),
    a_delta(0, {"type": "thinking_delta", "thinking": "I need to find the GCD of 1071 and 462"}),
    a_delta(
        0, {"type": "thinking_delta", "thinking": " using the Euclidean algorithm.\n\n1071 = 2"}
    ),
    a_delta(0, {"type": "thinking_delta", "thinking": " \u00d7 462 + 147"}),
    a_delta(
        0,
        {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pk"},
    ),
    a_stop(0),
    a_block(
        1, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIw"}
    ),
    a_stop(1),
    a_block(2, {"type": "text", "text": ""}),
    a_text(2, "The greatest common divisor"),
    a_text(2, " of 1071 and 462 is **21**."),
    a_stop(2),
    *a_end(
        "end_turn",
        {"output_tokens": 180, "output_tokens_details": {"thinking_tokens": 120}},
    ),
]


def char_citation(text: str, start: int, end: int) -> JSON:
    return {
        "type": "char_location",
        "cited_text": text,
        "document_index": 0,
        "document_title": "Nature facts",
        "start_char_index": start,
        "end_char_index": end,
        "file_id": None,
    }


ANTHROPIC_CITATIONS = [
    a_start(),
    a_block(0, {"type": "text", "text": ""}),
    a_text(0, "According to the document, "),
    a_stop(0),
    a_block(1, {"type": "text", "text": "", "citations": []}),
    a_delta(
        1, {"type": "citations_delta", "citation": char_citation("The grass is green. ", 0, 20)}
    ),
    a_delta(1, {"type": "citations_delta", "citation": char_citation("The sky is blue.", 20, 36)}),
    a_text(1, "the grass is green"),
    a_text(1, " and the sky is blue"),
    a_stop(1),
    a_block(2, {"type": "text", "text": ""}),
    a_text(2, "."),
    a_stop(2),
    *a_end("end_turn", {"output_tokens": 30}),
]

ANTHROPIC_WEB_SEARCH = [
    a_start(
        {
            "input_tokens": 2679,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 3,
        }
    ),
    a_block(0, {"type": "text", "text": ""}),
    a_text(0, "I'll search for the weather."),
    a_stop(0),
    a_block(
        1,
        {
            "type": "server_tool_use",
            "id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB",
            "name": "web_search",
            "input": {},
        },
    ),
    a_delta(1, {"type": "input_json_delta", "partial_json": ""}),
    a_delta(1, {"type": "input_json_delta", "partial_json": '{"query"'}),
    a_delta(1, {"type": "input_json_delta", "partial_json": ': "weather NYC today"}'}),
    a_stop(1),
    a_block(
        2,
        {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB",
            "content": [
                {
                    "type": "web_search_result",
                    "title": "Weather in New York City",
                    "url": "https://weather.example/nyc",
                    "encrypted_content": "Ev0DCioIAxgCIiQ3NmU4ZmI4OC1k",
                    "page_age": "January 1, 2026",
                }
            ],
        },
    ),
    a_stop(2),
    a_block(3, {"type": "text", "text": "", "citations": []}),
    a_delta(
        3,
        {
            "type": "citations_delta",
            "citation": {
                "type": "web_search_result_location",
                "cited_text": "Sunny, high of 75°F",
                "url": "https://weather.example/nyc",
                "title": "Weather in New York City",
                "encrypted_index": "Eo8BCioIAhgBIiQyYjQ0OWJmZi1lNm",
            },
        },
    ),
    a_text(3, "It is sunny with a high of 75°F."),
    a_stop(3),
    # Cumulative totals: each field given replaces the message_start value.
    *a_end(
        "end_turn",
        {
            "input_tokens": 10682,
            "cache_creation_input_tokens": 1200,
            "cache_read_input_tokens": 3400,
            "output_tokens": 510,
            "server_tool_use": {"web_search_requests": 1},
        },
    ),
]

# message_delta gives only output_tokens: the cache counts of message_start stay.
ANTHROPIC_USAGE_KEPT = [
    a_start(
        {
            "input_tokens": 12,
            "cache_creation_input_tokens": 2048,
            "cache_read_input_tokens": 4096,
            "output_tokens": 1,
        }
    ),
    a_block(0, {"type": "text", "text": ""}),
    a_text(0, "Cached."),
    a_stop(0),
    *a_end("max_tokens", {"output_tokens": 7}),
]

# A tool without parameters: one empty input_json_delta, the input stays {}.
ANTHROPIC_TOOL_NO_ARGS = [
    a_start(),
    a_block(0, {"type": "tool_use", "id": "toolu_01NoArgs", "name": "get_time", "input": {}}),
    a_delta(0, {"type": "input_json_delta", "partial_json": ""}),
    a_stop(0),
    *a_end("tool_use", {"output_tokens": 12}),
]

ANTHROPIC_STREAMS = {
    "text": ANTHROPIC_TEXT,
    "tool_use": ANTHROPIC_TOOL_USE,
    "thinking": ANTHROPIC_THINKING,
    "citations": ANTHROPIC_CITATIONS,
    "web_search": ANTHROPIC_WEB_SEARCH,
    "usage_kept": ANTHROPIC_USAGE_KEPT,
    "tool_no_args": ANTHROPIC_TOOL_NO_ARGS,
}


@pytest.mark.parametrize("name", ANTHROPIC_STREAMS)
def test_anthropic_matches_sdk(name: str) -> None:
    body = named_sse(ANTHROPIC_STREAMS[name])
    result = assemble_both_ways("anthropic.messages", body)
    assert ours(result) == sdk_anthropic(body)
    assert result.complete
    assert result.message_id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert result.model == ANTHROPIC_MODEL
    assert result.error_type is None
    assert not result.truncated


def test_anthropic_text_is_the_non_streaming_message() -> None:
    result = assemble_both_ways("anthropic.messages", named_sse(ANTHROPIC_TEXT))
    assert result.response == {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello, wörld 👋\nSecond line."}],
        "model": ANTHROPIC_MODEL,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 472,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 15,
            "service_tier": "standard",
        },
    }
    assert result.usage == Usage(input_tokens=472, output_tokens=15)
    assert result.stop_reason == "end_turn"


def test_anthropic_tool_use_input_is_parsed() -> None:
    result = assemble_both_ways("anthropic.messages", named_sse(ANTHROPIC_TOOL_USE))
    assert result.response is not None
    assert result.response["content"][1] == {
        "type": "tool_use",
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "name": "get_weather",
        "input": {"location": "San Francisco, CA", "unit": "fahrenheit", "days": [1, 2]},
    }
    assert result.stop_reason == "tool_use"


def test_anthropic_tool_input_that_does_not_parse_stays_raw() -> None:
    events = copy.deepcopy(ANTHROPIC_TOOL_USE)
    events = [
        e
        for e in events
        if not (e["type"] == "content_block_delta" and e["delta"].get("partial_json") == "]}")
    ]
    result = assemble("anthropic.messages", named_sse(events))
    assert result.response is not None
    assert result.response["content"][1]["input"] == "".join(TOOL_JSON_PIECES[:-1])


def test_anthropic_thinking_and_usage() -> None:
    result = assemble_both_ways("anthropic.messages", named_sse(ANTHROPIC_THINKING))
    assert result.response is not None
    thinking, redacted, text = result.response["content"]
    assert thinking["thinking"].endswith("\u00d7 462 + 147")
    assert thinking["signature"].startswith("EqQB")
    assert redacted["type"] == "redacted_thinking"
    assert text["text"] == "The greatest common divisor of 1071 and 462 is **21**."
    assert result.usage.reasoning_tokens == 120


def test_anthropic_citations_are_appended() -> None:
    result = assemble_both_ways("anthropic.messages", named_sse(ANTHROPIC_CITATIONS))
    assert result.response is not None
    block = result.response["content"][1]
    assert [c["cited_text"] for c in block["citations"]] == [
        "The grass is green. ",
        "The sky is blue.",
    ]
    assert block["text"] == "the grass is green and the sky is blue"


def test_anthropic_usage_overwritten_field_by_field() -> None:
    result = assemble_both_ways("anthropic.messages", named_sse(ANTHROPIC_WEB_SEARCH))
    assert result.usage == Usage(
        input_tokens=10682, output_tokens=510, cache_read_tokens=3400, cache_write_tokens=1200
    )
    assert result.response is not None
    assert result.response["content"][1]["input"] == {"query": "weather NYC today"}
    assert result.response["usage"]["server_tool_use"] == {"web_search_requests": 1}

    kept = assemble_both_ways("anthropic.messages", named_sse(ANTHROPIC_USAGE_KEPT))
    assert kept.usage == Usage(
        input_tokens=12, output_tokens=7, cache_read_tokens=4096, cache_write_tokens=2048
    )
    assert kept.stop_reason == "max_tokens"


def test_anthropic_cut_stream_keeps_what_arrived() -> None:
    events = ANTHROPIC_TOOL_USE
    # Cut inside the event after the third tool-input piece.
    upto = next(
        i for i, e in enumerate(events) if e.get("delta", {}).get("partial_json") == 'ncisco, CA"'
    )
    head = named_sse(events[: upto + 1])
    body = head + named_sse([events[upto + 1]])[:25]
    for chunk_size in (None, 1):
        result = assemble("anthropic.messages", body, chunk_size)
        assert not result.complete
        assert result.response is not None
        text, tool = result.response["content"]
        assert text["text"] == "Okay, let me check the weather."
        assert tool["input"] == '{"location": "San Francisco, CA"'
        assert result.stop_reason is None
        assert result.usage == Usage(input_tokens=472, output_tokens=2)
        assert result.message_id == "msg_01XFDUDYJgAACzvnptvVoYEL"


def test_anthropic_cut_mid_text() -> None:
    body = named_sse(ANTHROPIC_TEXT)
    cut = body.index(b"Second line.") + 3
    result = assemble("anthropic.messages", body[:cut], 1)
    assert not result.complete
    assert result.response is not None
    assert result.response["content"] == [{"type": "text", "text": "Hello, wörld 👋"}]


def test_anthropic_error_event() -> None:
    events = [
        *ANTHROPIC_TEXT[:5],
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    ]
    result = assemble_both_ways("anthropic.messages", named_sse(events))
    assert result.error_type == "overloaded_error"
    assert result.error_message == "Overloaded"
    assert not result.complete
    assert result.response is not None
    assert result.response["content"] == [{"type": "text", "text": "Hello, wörld 👋"}]


# --- OpenAI Chat Completions streams ------------------------------------------------


def c_chunk(choices: list[JSON], usage: JSON | None = None, with_usage: bool = True) -> JSON:
    chunk: JSON = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": CHAT_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_eb9dce56a8",
        "choices": choices,
    }
    if with_usage:
        chunk["usage"] = usage
    chunk["obfuscation"] = "x1Yz"
    return chunk


def c_choice(delta: JSON, finish_reason: str | None = None, index: int = 0) -> JSON:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


CHAT_USAGE = {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def chat_text(with_usage: bool) -> bytes:
    pieces = ["Hello", "!", " How can I", " assist you", " today? 😊"]
    chunks = [
        c_chunk(
            [c_choice({"role": "assistant", "content": "", "refusal": None})], with_usage=with_usage
        )
    ]
    chunks += [c_chunk([c_choice({"content": p})], with_usage=with_usage) for p in pieces]
    chunks.append(c_chunk([c_choice({}, "stop")], with_usage=with_usage))
    if with_usage:
        chunks.append(c_chunk([], CHAT_USAGE))
    return data_sse(chunks)


def chat_tool_calls() -> bytes:
    def call(index: int, delta: JSON) -> JSON:
        return c_chunk([c_choice({"tool_calls": [{"index": index, **delta}]})])

    chunks = [
        c_chunk(
            [
                c_choice(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ],
                        "refusal": None,
                    }
                )
            ]
        ),
        call(0, {"function": {"arguments": '{"lo'}}),
        call(0, {"function": {"arguments": 'cation": "Par'}}),
        call(0, {"function": {"arguments": 'is, France"}'}}),
        call(
            1,
            chat_tool_call("call_ABMmbnTLx0nVkBJNf6mDyjLb", "get_time", ""),
        ),
        call(1, {"function": {"arguments": '{"tz": '}}),
        call(1, {"function": {"arguments": '"Europe/Paris"}'}}),
        c_chunk([c_choice({}, "tool_calls")]),
        c_chunk([], CHAT_USAGE),
    ]
    return data_sse(chunks)


def chat_refusal() -> bytes:
    pieces = ["I'm", " sorry", ", I can't", " help with that."]
    chunks = [c_chunk([c_choice({"role": "assistant", "content": None, "refusal": ""})])]
    chunks += [c_chunk([c_choice({"refusal": p})]) for p in pieces]
    chunks.append(c_chunk([c_choice({}, "stop")]))
    chunks.append(c_chunk([], CHAT_USAGE))
    return data_sse(chunks)


def chat_two_choices() -> bytes:
    chunks = [
        c_chunk([c_choice({"role": "assistant", "content": ""}, index=0)]),
        c_chunk([c_choice({"role": "assistant", "content": ""}, index=1)]),
        c_chunk([c_choice({"content": "Heads"}, index=1)]),
        c_chunk([c_choice({"content": "Tails"}, index=0)]),
        c_chunk([c_choice({"content": "."}, index=0), c_choice({"content": "!"}, index=1)]),
        c_chunk([c_choice({}, "stop", index=1)]),
        c_chunk([c_choice({}, "stop", index=0)]),
        c_chunk([], CHAT_USAGE),
    ]
    return data_sse(chunks)


def chat_audio() -> bytes:
    audio_pieces = [
        {"id": "audio_6820f3b8d0d88191", "transcript": "Hel"},
        {"transcript": "lo!"},
        {"data": "UklGRiQAAABXQVZF"},
        {"data": "Zm10IBAAAAABAAEA"},
        {"expires_at": 1741574283},
    ]
    chunks = [c_chunk([c_choice({"role": "assistant", "content": None, "refusal": None})])]
    chunks += [c_chunk([c_choice({"audio": a})]) for a in audio_pieces]
    chunks.append(c_chunk([c_choice({}, "stop")]))
    chunks.append(c_chunk([], CHAT_USAGE))
    return data_sse(chunks)


def chat_reasoning_content() -> bytes:
    """An OpenAI-compatible server (DeepSeek, vLLM) streaming its reasoning apart."""
    chunks = [c_chunk([c_choice({"role": "assistant", "content": None, "reasoning_content": ""})])]
    chunks += [c_chunk([c_choice({"reasoning_content": p})]) for p in ["9.11 vs 9.9", ": compare"]]
    chunks += [c_chunk([c_choice({"content": p})]) for p in ["9.9 is", " larger."]]
    chunks.append(c_chunk([c_choice({}, "stop")]))
    chunks.append(c_chunk([], CHAT_USAGE))
    return data_sse(chunks)


CHAT_STREAMS: dict[str, Callable[[], bytes]] = {
    "text_with_usage": lambda: chat_text(True),
    "text_without_usage": lambda: chat_text(False),
    "tool_calls": chat_tool_calls,
    "refusal": chat_refusal,
    "two_choices": chat_two_choices,
    "audio": chat_audio,
    "reasoning_content": chat_reasoning_content,
}


@pytest.mark.parametrize("name", CHAT_STREAMS)
def test_chat_matches_sdk(name: str) -> None:
    body = CHAT_STREAMS[name]()
    result = assemble_both_ways("openai.chat", body)
    sdk = sdk_chat(body)
    mine = ours(result)
    assert [c["message"] for c in mine["choices"]] == [c["message"] for c in sdk["choices"]]
    assert mine.get("usage") == sdk.get("usage")
    # Beyond what was asked: the whole object agrees.
    assert mine == sdk
    assert result.complete
    assert result.message_id == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert result.model == CHAT_MODEL


def test_chat_text_is_the_non_streaming_completion() -> None:
    result = assemble_both_ways("openai.chat", chat_text(True))
    assert result.response == {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": CHAT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I assist you today? 😊",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": CHAT_USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_eb9dce56a8",
    }
    assert result.usage == Usage(input_tokens=1117, output_tokens=46, cache_read_tokens=1024)
    assert result.stop_reason == "stop"


def test_chat_without_usage_has_zero_usage() -> None:
    result = assemble_both_ways("openai.chat", chat_text(False))
    assert result.usage == Usage()
    assert result.response is not None
    assert result.response["usage"] is None
    assert result.complete


def test_chat_parallel_tool_calls() -> None:
    result = assemble_both_ways("openai.chat", chat_tool_calls())
    assert result.response is not None
    message = result.response["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        chat_tool_call(
            "call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", '{"location": "Paris, France"}'
        ),
        chat_tool_call("call_ABMmbnTLx0nVkBJNf6mDyjLb", "get_time", '{"tz": "Europe/Paris"}'),
    ]
    assert result.stop_reason == "tool_calls"


def test_chat_refusal() -> None:
    result = assemble_both_ways("openai.chat", chat_refusal())
    assert result.response is not None
    message = result.response["choices"][0]["message"]
    assert message["refusal"] == "I'm sorry, I can't help with that."
    assert message["content"] is None


def test_chat_error_with_numeric_code() -> None:
    # As OpenAI-compatible routers send it: an HTTP status for a code, no type.
    error = {"error": {"code": 502, "message": "Upstream error"}}
    result = assemble("openai.chat", data_sse([error], done=False))
    assert (result.error_type, result.error_message) == ("502", "Upstream error")
    assert result.response is None


def test_chat_audio_and_reasoning_content() -> None:
    audio = assemble_both_ways("openai.chat", chat_audio())
    assert audio.response is not None
    assert audio.response["choices"][0]["message"]["audio"] == {
        "id": "audio_6820f3b8d0d88191",
        "transcript": "Hello!",
        "data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA",
        "expires_at": 1741574283,
    }
    reasoning = assemble_both_ways("openai.chat", chat_reasoning_content())
    assert reasoning.response is not None
    message = reasoning.response["choices"][0]["message"]
    assert message["reasoning_content"] == "9.11 vs 9.9: compare"
    assert message["content"] == "9.9 is larger."


def test_chat_malformed_chunk_is_skipped() -> None:
    body = chat_text(True)
    cut = body.index(b"data: ", body.index(b" assist you"))
    bad = data_sse(
        [
            c_chunk([{"index": "x", "delta": {"content": "??"}}]),
            c_chunk([c_choice({"tool_calls": [{"index": [1], "function": {}}]})]),
        ],
        done=False,
    )
    result = assemble("openai.chat", body[:cut] + bad + body[cut:])
    assert result.complete
    assert result.response is not None
    message = result.response["choices"][0]["message"]
    assert message["content"] == "Hello! How can I assist you today? 😊"
    assert "tool_calls" not in message


def test_chat_complete_without_done_when_finished_with_usage() -> None:
    body = chat_text(True)
    result = assemble("openai.chat", body[: body.index(b"data: [DONE]")])
    assert result.complete
    no_usage = chat_text(False)
    result = assemble("openai.chat", no_usage[: no_usage.index(b"data: [DONE]")])
    assert not result.complete


def test_chat_cut_stream_keeps_what_arrived() -> None:
    body = chat_text(True)
    cut = body.index(b" assist you") + 4
    for chunk_size in (None, 1):
        result = assemble("openai.chat", body[:cut], chunk_size)
        assert not result.complete
        assert result.response is not None
        assert result.response["choices"][0]["message"]["content"] == "Hello! How can I"
        assert result.response["choices"][0]["finish_reason"] is None
        assert result.usage == Usage()
        assert result.stop_reason is None


def test_chat_in_stream_error() -> None:
    error = {
        "error": {
            "message": "The server had an error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    body = chat_text(True)
    # The error replaces the rest of the stream, right after the " assist you" chunk.
    cut = body.index(b"data: ", body.index(b" assist you"))
    result = assemble_both_ways("openai.chat", body[:cut] + data_sse([error], done=False))
    assert result.error_type == "server_error"
    assert result.error_message == "The server had an error"
    assert not result.complete
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Hello! How can I assist you"


# --- OpenAI Responses streams ---------------------------------------------------------


def r_response(status: str, output: list[JSON], usage: JSON | None) -> JSON:
    return {
        "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
        "object": "response",
        "created_at": 1741290958,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": RESPONSES_MODEL,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def r_events(events: list[JSON]) -> list[JSON]:
    return [{**ev, "sequence_number": i} for i, ev in enumerate(events)]


R_TEXT = "Hi there! How can I help you today?"
R_PIECES = ["Hi", " there", "!", " How can I", " help you", " today?"]
R_MESSAGE_DONE: JSON = {
    "id": "msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654",
    "type": "message",
    "status": "completed",
    "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": R_TEXT}],
    "role": "assistant",
}
R_USAGE = responses_usage(37, 11, 48, cached=5, reasoning=0)


R_EMPTY_PART = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}


def r_text_deltas(msg_id: str, output_index: int, pieces: list[str]) -> list[JSON]:
    """The events that open message ``msg_id`` as output item ``output_index`` and stream
    its text in ``pieces``."""
    where = {"item_id": msg_id, "output_index": output_index, "content_index": 0}
    return [
        {
            "type": "response.output_item.added",
            "output_index": output_index,
            "item": {
                "id": msg_id,
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            },
        },
        {"type": "response.content_part.added", **where, "part": R_EMPTY_PART},
        *[
            {"type": "response.output_text.delta", **where, "delta": p, "logprobs": []}
            for p in pieces
        ],
    ]


def responses_text_events() -> list[JSON]:
    msg_id = R_MESSAGE_DONE["id"]
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    done_part = {**R_EMPTY_PART, "text": R_TEXT}
    return r_events(
        [
            {"type": "response.created", "response": r_response("in_progress", [], None)},
            {"type": "response.in_progress", "response": r_response("in_progress", [], None)},
            *r_text_deltas(msg_id, 0, R_PIECES),
            {"type": "response.output_text.done", **where, "text": R_TEXT, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": done_part},
            {"type": "response.output_item.done", "output_index": 0, "item": R_MESSAGE_DONE},
            {
                "type": "response.completed",
                "response": r_response("completed", [R_MESSAGE_DONE], R_USAGE),
            },
        ]
    )


R_ARGS = '{"location":"Boston, MA","unit":"celsius"}'
R_REASONING = {
    "id": "rs_6820f383d7c08191846711c5df8233bc0ac5ba57aafcbac7",
    "type": "reasoning",
    "summary": [],
}
R_CALL_DONE = {
    "id": "fc_6820f3859d488191a3ff0e4b1bfb6dd30ac5ba57aafcbac7",
    "type": "function_call",
    "status": "completed",
    "arguments": R_ARGS,
    "call_id": "call_3LxPSnrMY6vlJpM9sYnkCDkE",
    "name": "get_weather",
}
R_CALL_USAGE = responses_usage(75, 86, 161, cached=0, cache_written=40, reasoning=64)


def responses_function_call_events() -> list[JSON]:
    call_added = {**R_CALL_DONE, "status": "in_progress", "arguments": ""}
    where = {"item_id": R_CALL_DONE["id"], "output_index": 1}
    pieces = ['{"', 'location":"', "Boston", ', MA","unit', '":"celsius"}']
    return r_events(
        [
            {"type": "response.created", "response": r_response("in_progress", [], None)},
            {"type": "response.in_progress", "response": r_response("in_progress", [], None)},
            {"type": "response.output_item.added", "output_index": 0, "item": R_REASONING},
            {"type": "response.output_item.done", "output_index": 0, "item": R_REASONING},
            {"type": "response.output_item.added", "output_index": 1, "item": call_added},
            *[
                {"type": "response.function_call_arguments.delta", **where, "delta": p}
                for p in pieces
            ],
            {"type": "response.function_call_arguments.done", **where, "arguments": R_ARGS},
            {"type": "response.output_item.done", "output_index": 1, "item": R_CALL_DONE},
            {
                "type": "response.completed",
                "response": r_response("completed", [R_REASONING, R_CALL_DONE], R_CALL_USAGE),
            },
        ]
    )


def responses_completed_without_output() -> list[JSON]:
    events = responses_text_events()
    final = events[-1]["response"]
    del final["output"]
    return events


R_ANNOTATION = {
    "type": "url_citation",
    "start_index": 0,
    "end_index": 12,
    "url": "https://news.example/article",
    "title": "Good news",
}
R_SUMMARY_TEXT = "**Searching**\n\nThe user wants good news."


def responses_summary_annotation_events() -> list[JSON]:
    reasoning_id = "rs_68af4030baa48193b0b43b4c2a176a1a02d48d1e8a8e0a32"
    msg_id = "msg_68af4033d4b08193a8dd25b1b4d5ab0402d48d1e8a8e0a32"
    reasoning_done = {
        "id": reasoning_id,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": R_SUMMARY_TEXT}],
    }
    text = "Good things happened today."
    message_done = {
        "id": msg_id,
        "type": "message",
        "status": "completed",
        "content": [
            {"type": "output_text", "annotations": [R_ANNOTATION], "logprobs": [], "text": text}
        ],
        "role": "assistant",
    }
    summary_where = {"item_id": reasoning_id, "output_index": 0, "summary_index": 0}
    text_where = {"item_id": msg_id, "output_index": 1, "content_index": 0}
    return r_events(
        [
            {"type": "response.created", "response": r_response("in_progress", [], None)},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {"id": reasoning_id, "type": "reasoning", "summary": []},
            },
            {
                "type": "response.reasoning_summary_part.added",
                **summary_where,
                "part": {"type": "summary_text", "text": ""},
            },
            *[
                {"type": "response.reasoning_summary_text.delta", **summary_where, "delta": p}
                for p in ["**Searching**", "\n\nThe user", " wants good news."]
            ],
            {
                "type": "response.reasoning_summary_text.done",
                **summary_where,
                "text": R_SUMMARY_TEXT,
            },
            {
                "type": "response.reasoning_summary_part.done",
                **summary_where,
                "part": {"type": "summary_text", "text": R_SUMMARY_TEXT},
            },
            {"type": "response.output_item.done", "output_index": 0, "item": reasoning_done},
            *r_text_deltas(msg_id, 1, ["Good things", " happened", " today."]),
            {
                "type": "response.output_text.annotation.added",
                **text_where,
                "annotation_index": 0,
                "annotation": R_ANNOTATION,
            },
            {"type": "response.output_text.done", **text_where, "text": text, "logprobs": []},
            {"type": "response.output_item.done", "output_index": 1, "item": message_done},
            {
                "type": "response.completed",
                "response": r_response("completed", [reasoning_done, message_done], R_USAGE),
            },
        ]
    )


RESPONSES_STREAMS: dict[str, Callable[[], list[JSON]]] = {
    "text": responses_text_events,
    "function_call": responses_function_call_events,
    "completed_without_output": responses_completed_without_output,
    "summary_annotation": responses_summary_annotation_events,
}


@pytest.mark.parametrize("name", RESPONSES_STREAMS)
def test_responses_matches_sdk(name: str) -> None:
    body = named_sse(RESPONSES_STREAMS[name]())
    result = assemble_both_ways("openai.responses", body)
    assert ours(result) == sdk_responses(body)
    assert result.complete
    assert result.stop_reason == "completed"
    assert result.message_id == "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654"
    assert result.model == RESPONSES_MODEL


def test_responses_usage() -> None:
    text = assemble_both_ways("openai.responses", named_sse(responses_text_events()))
    assert text.usage == Usage(input_tokens=37, output_tokens=11, cache_read_tokens=5)
    assert text.response is not None
    assert text.response["output"] == [R_MESSAGE_DONE]
    call = assemble_both_ways("openai.responses", named_sse(responses_function_call_events()))
    assert call.usage == Usage(
        input_tokens=75, output_tokens=86, cache_write_tokens=40, reasoning_tokens=64
    )
    assert call.response is not None
    assert call.response["output"][1]["arguments"] == R_ARGS


def test_responses_cut_stream_builds_from_deltas() -> None:
    events = responses_text_events()
    upto = next(i for i, e in enumerate(events) if e.get("delta") == " How can I")
    body = named_sse(events[: upto + 1]) + named_sse([events[upto + 1]])[:30]
    for chunk_size in (None, 1):
        result = assemble("openai.responses", body, chunk_size)
        assert not result.complete
        assert result.response is not None
        assert result.response["status"] == "in_progress"
        [item] = result.response["output"]
        assert item["content"][0]["text"] == "Hi there! How can I"
        assert result.stop_reason is None
        assert result.usage == Usage()


def test_responses_cut_function_call_keeps_finished_items() -> None:
    events = responses_function_call_events()
    upto = next(i for i, e in enumerate(events) if e.get("delta") == "Boston")
    result = assemble("openai.responses", named_sse(events[: upto + 1]), 1)
    assert not result.complete
    assert result.response is not None
    reasoning, call = result.response["output"]
    assert reasoning == R_REASONING
    assert call["arguments"] == '{"location":"Boston'
    assert call["status"] == "in_progress"


def test_responses_cut_builds_summary_and_annotations() -> None:
    events = responses_summary_annotation_events()
    # Cut before the reasoning item is done, then before the message is.
    upto = next(i for i, e in enumerate(events) if e.get("delta") == "\n\nThe user")
    result = assemble("openai.responses", named_sse(events[: upto + 1]), 1)
    assert result.response is not None
    assert result.response["output"][0]["summary"] == [
        {"type": "summary_text", "text": "**Searching**\n\nThe user"}
    ]
    upto = next(
        i for i, e in enumerate(events) if e["type"] == "response.output_text.annotation.added"
    )
    result = assemble("openai.responses", named_sse(events[: upto + 1]), 1)
    assert result.response is not None
    reasoning, message = result.response["output"]
    assert reasoning["summary"][0]["text"] == R_SUMMARY_TEXT
    assert message["content"] == [
        {
            "type": "output_text",
            "annotations": [R_ANNOTATION],
            "logprobs": [],
            "text": "Good things happened today.",
        }
    ]
    assert not result.complete


def test_responses_final_too_big_to_keep() -> None:
    body = named_sse(responses_text_events())
    asm = stream_assembler("openai.responses", max_retained=900)
    asm.feed(body)
    result = asm.finish()
    assert result.complete
    assert result.truncated
    assert result.usage == Usage(input_tokens=37, output_tokens=11, cache_read_tokens=5)
    assert result.response is not None
    assert result.response["status"] == "completed"
    # The 974-byte final response did not fit: its output is rebuilt from what was kept.
    [item] = result.response["output"]
    assert item["id"] == R_MESSAGE_DONE["id"]


def test_responses_failed_and_error_events() -> None:
    events = responses_text_events()[:6]
    failed = r_response("failed", [], None)
    failed["error"] = {"code": "server_error", "message": "The model produced invalid content."}
    result = assemble_both_ways(
        "openai.responses",
        named_sse([*events, {"type": "response.failed", "sequence_number": 6, "response": failed}]),
    )
    assert result.complete
    assert result.stop_reason == "failed"
    assert result.error_type == "server_error"
    assert result.error_message == "The model produced invalid content."

    error = {
        "type": "error",
        "code": "ERR_SOMETHING",
        "message": "Something went wrong",
        "param": None,
        "sequence_number": 6,
    }
    result = assemble_both_ways("openai.responses", named_sse([*events, error]))
    assert not result.complete
    assert result.error_type == "ERR_SOMETHING"
    assert result.error_message == "Something went wrong"
    assert result.response is not None
    assert result.response["output"][0]["content"][0]["text"] == "Hi there"


def test_responses_incomplete() -> None:
    events = responses_text_events()
    final = r_response("incomplete", [R_MESSAGE_DONE], R_USAGE)
    final["incomplete_details"] = {"reason": "max_output_tokens"}
    events[-1] = {
        "type": "response.incomplete",
        "sequence_number": events[-1]["sequence_number"],
        "response": final,
    }
    result = assemble_both_ways("openai.responses", named_sse(events))
    assert result.complete
    assert result.stop_reason == "max_output_tokens"
    assert result.response == final


# --- legacy Completions -----------------------------------------------------------------


def test_legacy_completions() -> None:
    def chunk(text: str, finish: str | None) -> JSON:
        return {
            "id": "cmpl-7iA7iJjj8V2zOkCGvWF2hAkDWBQZe",
            "object": "text_completion",
            "created": 1690759702,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "model": "gpt-3.5-turbo-instruct",
            "system_fingerprint": None,
        }

    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    chunks = [chunk(t, None) for t in ["\n\n", "This", " is", " a test."]]
    chunks.append(chunk("", "stop"))
    chunks.append({**chunk("", None), "choices": [], "usage": usage})
    result = assemble_both_ways("openai.completions", data_sse(chunks))
    assert result.response == {
        "id": "cmpl-7iA7iJjj8V2zOkCGvWF2hAkDWBQZe",
        "object": "text_completion",
        "created": 1690759702,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {"text": "\n\nThis is a test.", "index": 0, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": usage,
    }
    assert result.usage == Usage(input_tokens=5, output_tokens=7)
    assert result.complete
    assert result.stop_reason == "stop"


# --- memory bound, robustness, random splits ----------------------------------------------


def test_retained_text_is_bounded() -> None:
    events = [
        a_start(),
        a_block(0, {"type": "text", "text": ""}),
        *[a_text(0, "0123456789") for _ in range(300)],
        a_stop(0),
        *a_end("end_turn", {"output_tokens": 400}),
    ]
    asm = stream_assembler("anthropic.messages", max_retained=2000)
    asm.feed(named_sse(events))
    result = asm.finish()
    assert result.truncated
    assert result.complete
    assert result.response is not None
    text = result.response["content"][0]["text"]
    # The budget also paid for the message_start and block JSON it keeps.
    assert 1000 < len(text) < 2000
    assert text == ("0123456789" * 300)[: len(text)]
    assert result.usage.output_tokens == 400

    chat = stream_assembler("openai.chat", max_retained=10)
    chat.feed(chat_text(True))
    chat_result = chat.finish()
    assert chat_result.truncated
    assert chat_result.response is not None
    assert chat_result.response["choices"][0]["message"]["content"] == "Hello! How"


@pytest.mark.parametrize(
    "api", ["anthropic.messages", "openai.chat", "openai.responses", "openai.completions"]
)
def test_garbage_streams_do_not_raise(api: str) -> None:
    bodies = [
        b"",
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
        b"data: {}\n\n",
        b'data: {"type": "content_block_delta", "index": 5, "delta": {"type": "text_delta"}}\n\n',
        b'data: {"type": "message_delta", "delta": 3, "usage": []}\n\n',
        b'data: {"choices": [{"delta": {"content": 5, "tool_calls": [{"index": "x"}]}}]}\n\n',
        b'data: {"choices": "nope", "usage": 7}\n\n',
        b'data: {"type": "response.output_text.delta", "output_index": 9, "delta": null}\n\n',
        b'data: {"type": "response.completed", "response": {"output": 5, "usage": "x"}}\n\n',
        b"\xff\xfe\x00garbage\r\r\n",
    ]
    for body in bodies:
        asm = stream_assembler(api)
        asm.feed(body)
        result = asm.finish()
        assert isinstance(result, Assembled)
        assert asm.finish() is result


STREAM_BODIES = [
    ("anthropic.messages", named_sse(ANTHROPIC_WEB_SEARCH)),
    ("openai.chat", chat_tool_calls()),
    ("openai.responses", named_sse(responses_function_call_events())),
]


@settings(max_examples=40, deadline=None, database=None)
@given(st.sampled_from(STREAM_BODIES), st.lists(st.integers(min_value=0), max_size=20))
def test_random_splits_give_the_same_answer(case: tuple[str, bytes], cuts: list[int]) -> None:
    api, body = case
    points = sorted({c % (len(body) + 1) for c in cuts})
    asm = stream_assembler(api)
    prev = 0
    for p in [*points, len(body)]:
        asm.feed(body[prev:p])
        prev = p
    assert asm.finish() == assemble(api, body)


def test_unknown_api() -> None:
    with pytest.raises(ValueError):
        stream_assembler("openai.images")
    with pytest.raises(ValueError):
        assemble_json("openai.images", b"{}")


# --- non-streaming bodies ---------------------------------------------------------------


def test_json_anthropic_message() -> None:
    streamed = assemble("anthropic.messages", named_sse(ANTHROPIC_TOOL_USE))
    assert streamed.response is not None
    result = assemble_json("anthropic.messages", orjson.dumps(streamed.response))
    assert result == Assembled(
        streamed.response,
        Usage(input_tokens=472, output_tokens=89),
        "msg_01XFDUDYJgAACzvnptvVoYEL",
        ANTHROPIC_MODEL,
        "tool_use",
        complete=True,
    )


def test_json_chat_completion() -> None:
    streamed = assemble("openai.chat", chat_tool_calls())
    assert streamed.response is not None
    result = assemble_json("openai.chat", orjson.dumps(streamed.response))
    assert result.response == streamed.response
    assert result.usage == Usage(input_tokens=1117, output_tokens=46, cache_read_tokens=1024)
    assert result.stop_reason == "tool_calls"
    assert result.message_id == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert result.complete


def test_json_responses() -> None:
    final = r_response("completed", [R_REASONING, R_CALL_DONE], R_CALL_USAGE)
    result = assemble_json("openai.responses", orjson.dumps(final))
    assert result.response == final
    assert result.usage == Usage(
        input_tokens=75, output_tokens=86, cache_write_tokens=40, reasoning_tokens=64
    )
    assert result.stop_reason == "completed"
    assert result.error_type is None

    failed = r_response("failed", [], None)
    failed["error"] = {"code": "server_error", "message": "boom"}
    result = assemble_json("openai.responses", orjson.dumps(failed))
    assert result.response == failed
    assert (result.error_type, result.error_message) == ("server_error", "boom")


def test_json_usage_only_apis() -> None:
    result = assemble_json(
        "openai.embeddings",
        orjson.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            }
        ),
    )
    assert result == Assembled(
        None, Usage(input_tokens=8), model="text-embedding-3-small", complete=True
    )
    result = assemble_json("anthropic.count_tokens", b'{"input_tokens": 2095}')
    assert result == Assembled(None, Usage(input_tokens=2095), complete=True)


def test_json_error_envelopes() -> None:
    anthropic_error = b'{"type":"error","error":{"type":"not_found_error","message":"model: nope"},"request_id":"req_011"}'
    result = assemble_json("anthropic.messages", anthropic_error)
    assert (result.response, result.error_type, result.error_message) == (
        None,
        "not_found_error",
        "model: nope",
    )
    openai_error = b'{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'
    for api in ("openai.chat", "openai.responses", "openai.embeddings"):
        result = assemble_json(api, openai_error)
        assert (result.response, result.error_type, result.error_message) == (
            None,
            "invalid_request_error",
            "Incorrect API key provided",
        )


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1,2]", b"null", b'{"usage": "x", "choices": 5}', b"\xff"]
)
def test_json_unparseable_bodies(body: bytes) -> None:
    for api in (
        "anthropic.messages",
        "openai.chat",
        "openai.responses",
        "openai.embeddings",
        "anthropic.count_tokens",
    ):
        result = assemble_json(api, body)
        assert isinstance(result, Assembled)
        assert result.usage == Usage()
