"""tvgate.translate.responses_to_chat: a Responses client (Codex) on a Chat-only upstream.

Requests are Codex's (see ``tests/test_translate_responses_anthropic.py``); upstream
answers are vLLM's and Ollama's Chat Completions shapes (``tests/fake_provider.py`` and
the chunks of ``tests/test_translate_anthropic_chat.py``). The translated answers are
parsed by the ``openai`` SDK's own Responses parser and stream accumulator.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fake_provider import TOOL_INPUT, FakeProvider
from tests.shapes import chat_tool_call, responses_usage, text_block
from tests.test_translate_anthropic_chat import (
    CHAT_UPSTREAM_ERRORS,
    VLLM_STREAM,
    VLLM_USAGE,
    call_delta,
    chat_completion,
    chunk,
    upstream,
)
from tests.test_translate_chat_anthropic import anything
from tests.test_translate_responses_anthropic import (
    CODEX,
    CREATED_AT,
    OPTIONS,
    SHELL,
    THOUGHT_TEXT_TWO_CALLS,
    assert_responses_sse,
    calls_of,
    refusal,
    sdk_client,
    sdk_failed_stream,
    sdk_request,
    sdk_stream,
)
from tvgate.providers import OPENAI_RESPONSES
from tvgate.providers.assemble import stream_assembler
from tvgate.translate.responses_api import ResponsesRequest
from tvgate.translate.responses_to_chat import (
    StreamTranslator,
    translate_error,
    translate_request,
    translate_response,
)

JSON = dict[str, Any]
MODEL = "Qwen/Qwen3-8B"
CHAT_SHELL = {
    "type": "function",
    "function": {
        "name": "shell",
        "parameters": SHELL["parameters"],
        "description": "Runs a shell command",
        "strict": False,
    },
}


# --- request ------------------------------------------------------------------------


def test_codex_request_maps_every_field() -> None:
    history = [
        *CODEX["input"],
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Listing."}],
        },
        {
            "type": "function_call",
            "call_id": "call_a",
            "name": "shell",
            "arguments": '{"command": ["ls"]}',
        },
        {"type": "function_call", "call_id": "call_b", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "a.txt"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "b"}],
        },
    ]
    req = translate_request({**CODEX, "input": history, "max_output_tokens": 500}, MODEL)
    assert req.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are Codex."},
            {"role": "system", "content": "sandbox: read-only"},
            {"role": "user", "content": "ls"},
            {
                "role": "assistant",
                "content": "Listing.",
                "tool_calls": [
                    chat_tool_call("call_a", "shell", '{"command":["ls"]}'),
                    chat_tool_call("call_b", "shell", "{}"),
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "a.txt"},
            {"role": "tool", "tool_call_id": "call_b", "content": "b"},
        ],
        "max_completion_tokens": 500,
        "tools": [CHAT_SHELL],
        "tool_choice": "auto",
        "reasoning_effort": "medium",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert req.stream and not req.encrypted
    assert req.dropped == [
        "store",
        "prompt_cache_key",
        "client_metadata",
        "input[2]: reasoning (a Chat upstream takes none back)",
        "include: reasoning.encrypted_content (the upstream gives none)",
    ]


def test_request_images_format_sampling_and_older_upstreams() -> None:
    body = sdk_request(
        model="qwen-route",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "high"},
                ],
            }
        ],
        **OPTIONS,
        reasoning={"effort": "low"},
    )
    req = translate_request(
        body, MODEL, max_tokens_field="max_tokens", reasoning_effort_field=False
    )
    assert req.body == {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    text_block("What is this?"),
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://x.test/a.png", "detail": "high"},
                    },
                ],
            }
        ],
        "max_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "tools": [CHAT_SHELL],
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "shell"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}},
        },
    }
    assert req.dropped == ["reasoning.effort: the upstream model takes no reasoning effort"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "image_generation"}]}, "tools[0].type"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": "https://x.test/a.png"}],
                    }
                ]
            },
            "input[0].output.content[0].type",
        ),
        (
            {
                "input": [
                    {"role": "assistant", "content": [{"type": "input_image", "image_url": "u"}]}
                ]
            },
            "input[0].content[0].type",
        ),
    ],
)
def test_request_refuses_what_chat_cannot_express(change: JSON, param: str) -> None:
    named, sdk = refusal(translate_request, {**CODEX, **change}, MODEL)
    assert named == param
    assert sdk.param == param


# --- response -----------------------------------------------------------------------

REQUEST = translate_request(CODEX, MODEL)


def test_vllm_reasoning_and_parallel_calls_parsed_by_the_sdk() -> None:
    answer = chat_completion(
        {
            "role": "assistant",
            "reasoning_content": "Two files.",
            "content": "Reading both.",
            "tool_calls": [
                chat_tool_call("call_a", "Read", '{"path": "a"}'),
                chat_tool_call("call_b", "Read", '{"path": "b"}'),
            ],
        },
        "tool_calls",
        usage=VLLM_USAGE,
    )
    response = sdk_client(200, orjson.dumps(translate_response(answer, REQUEST))).responses.create(
        model="m", input="x"
    )
    assert response.id == "resp_chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT" and response.model == MODEL
    assert [i.type for i in response.output] == THOUGHT_TEXT_TWO_CALLS
    assert response.output_text == "Reading both."
    assert calls_of(response) == [
        ("call_a", "Read", {"path": "a"}),
        ("call_b", "Read", {"path": "b"}),
    ]
    assert response.usage is not None
    assert response.usage.model_dump(exclude_none=True) == responses_usage(
        120, 40, 160, cached=64, reasoning=9
    )


@pytest.mark.parametrize(
    ("message", "finish", "status", "reason"),
    [
        ({"content": "hi"}, "stop", "completed", None),
        ({"content": "hi"}, "length", "incomplete", "max_output_tokens"),
        ({"content": "hi"}, "content_filter", "incomplete", "content_filter"),
        ({"content": None, "refusal": "I can't."}, "stop", "incomplete", "content_filter"),
    ],
)
def test_response_status(message: JSON, finish: str, status: str, reason: str | None) -> None:
    answer = translate_response(chat_completion({"role": "assistant", **message}, finish), REQUEST)
    assert answer["status"] == status
    assert answer["incomplete_details"] == ({"reason": reason} if reason else None)
    assert answer["output"][0]["content"][0]["text"] in ("hi", "I can't.")


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"message": {"tool_calls": [None]}}]},
        # Another endpoint's answer (a server whose path leads elsewhere): no choices at all.
        {"object": "list", "data": []},
    ],
    ids=["bad-tool-call", "no-choices"],
)
def test_an_answer_of_another_shape_is_a_value_error(body: JSON) -> None:
    with pytest.raises(ValueError, match="not a ChatCompletion"):
        translate_response(body, REQUEST)


# --- stream -------------------------------------------------------------------------


def translate_stream(body: bytes, step: int = 0) -> tuple[bytes, StreamTranslator]:
    request = translate_request(CODEX, MODEL)
    tr = StreamTranslator(request)
    step = step or len(body) or 1
    out = b"".join(tr.feed(body[i : i + step]) for i in range(0, len(body), step))
    return CREATED_AT.sub(b'"created_at":0,', out + tr.finish()), tr


def test_vllm_stream_parsed_by_the_sdk_accumulator() -> None:
    out, tr = translate_stream(VLLM_STREAM)
    assert translate_stream(VLLM_STREAM, 1)[0] == out
    response, events = sdk_stream(out)
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.function_call_arguments.delta") == 4
    assert [i.type for i in response.output] == THOUGHT_TEXT_TWO_CALLS
    assert response.output[0].summary[0].text == "The user wants two files."
    assert response.output_text == "Reading both."
    assert calls_of(response) == [
        ("chatcmpl-tool-a1", "Read", {"path": "a.txt"}),
        ("chatcmpl-tool-b2", "Read", {"path": "b.txt"}),
    ]
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens == 64
    assert response.usage.output_tokens_details.reasoning_tokens == 9
    assert tr.notes == REQUEST.dropped
    asm = stream_assembler(OPENAI_RESPONSES)
    asm.feed(out)
    assembled = asm.finish()
    assert assembled.complete and assembled.stop_reason == "completed"
    assert (assembled.usage.input_tokens, assembled.usage.cache_read_tokens) == (120, 64)


def test_interleaved_calls_named_late_and_ollama_reasoning() -> None:
    stream = b"".join(
        [
            chunk({"role": "assistant", "reasoning": "Hmm."}),
            # Ollama names a call after its first fragment; fragments of two calls interleave.
            chunk(
                {"tool_calls": [{"index": 0, "id": "call_0", "function": {"arguments": '{"a"'}}]}
            ),
            chunk(call_delta(1, "{", "call_1", "two")),
            chunk({"tool_calls": [{"index": 0, "function": {"name": "one", "arguments": ": 1}"}}]}),
            chunk(call_delta(1, "}")),
            chunk({}, "tool_calls"),
            b"data: [DONE]\n\n",
        ]
    )
    out, tr = translate_stream(stream)
    response, _ = sdk_stream(out)
    assert [i.type for i in response.output] == ["reasoning", "function_call", "function_call"]
    assert sorted(calls_of(response)) == [("call_0", "one", {"a": 1}), ("call_1", "two", {})]
    assert "usage: the upstream reported none" in tr.notes


def test_stream_length_is_incomplete() -> None:
    out, _ = translate_stream(chunk({"content": "cut"}) + chunk({}, "length") + b"data: [DONE]\n\n")
    events = [orjson.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_upstream_error_mid_stream_and_cut_stream_are_response_failed(
    fake_provider: FakeProvider,
) -> None:
    req = translate_request({**CODEX, "input": "hello there"}, MODEL)
    raw = upstream(fake_provider, req.body, "error_event").content
    tr = StreamTranslator(req)
    out = tr.feed(raw) + tr.finish()
    events = sdk_failed_stream(out)
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.error is not None
    assert "Sorry about that" in failed.response.error.message
    assert "response.output_text.delta" in [e.type for e in events]

    cut, tr = translate_stream(chunk({"content": "half"}))
    assert cut.count(b"event: response.failed\n") == 1 and tr.done
    assert b"ended before the answer was complete" in cut


# --- errors and the fake provider ---------------------------------------------------


@pytest.mark.parametrize(("status", "body", "kind", "message"), CHAT_UPSTREAM_ERRORS)
def test_error_shapes_of_other_upstreams(status: int, body: bytes, kind: str, message: str) -> None:
    translated_status, translated = translate_error(status, body)
    assert translated_status == status
    error = orjson.loads(translated)["error"]
    assert (error["type"], error["message"]) == (kind, message)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk_client(status, translated).responses.create(model="m", input="x")
    assert caught.value.status_code == status


@pytest.mark.parametrize("scenario", ["normal", "tool_use"])
def test_fake_provider_stream_and_answer_agree(fake_provider: FakeProvider, scenario: str) -> None:
    body = {**CODEX, "input": "read the readme", "tools": [{**SHELL, "name": "Read"}]}
    req = translate_request(body, MODEL)
    tr = StreamTranslator(req)
    out = b"".join(tr.feed(c) for c in upstream(fake_provider, req.body, scenario).iter_bytes(5))
    out += tr.finish()
    answer = upstream(fake_provider, {**req.body, "stream": False}, scenario).json()
    expected: ResponsesRequest = translate_request(body, MODEL)
    whole = translate_response(answer, expected)
    response, _ = sdk_stream(out)
    assert response.output_text == whole["output"][0]["content"][0]["text"]
    assert response.usage is not None
    assert response.usage.model_dump(exclude_none=True) == whole["usage"]
    assert calls_of(response) == [
        (i["call_id"], i["name"], orjson.loads(i["arguments"]))
        for i in whole["output"]
        if i["type"] == "function_call"
    ]
    assert bool(calls_of(response)) == (scenario == "tool_use")
    if scenario == "tool_use":
        assert calls_of(response)[0][1:] == ("Read", TOOL_INPUT)


# --- what a member's own server may send ----------------------------------------------

deltas = st.dictionaries(
    st.sampled_from(["content", "reasoning_content", "reasoning", "refusal", "tool_calls"]),
    anything | st.lists(st.fixed_dictionaries({}, optional={"index": anything, "id": anything,
        "function": st.dictionaries(st.sampled_from(["name", "arguments"]), anything)}), max_size=2),
    max_size=3,
)  # fmt: skip
chunks = st.lists(
    st.builds(
        lambda delta, finish, usage: chunk(delta, finish, usage=usage),
        deltas,
        st.none() | st.sampled_from(["stop", "length", "tool_calls"]) | anything,
        anything,
    )
    | st.sampled_from(
        [b"data: [DONE]\n\n", b'data: {"error": {"message": "x"}}\n\n', b"data: [1]\n\n"]
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(chunks, st.integers(1, 40))
def test_stream_of_any_shape_never_raises_and_stays_responses_sse(
    parts: list[bytes], step: int
) -> None:
    body = b"".join(parts)
    out, _ = translate_stream(body, step)
    assert out == translate_stream(body)[0]
    assert_responses_sse(out)
