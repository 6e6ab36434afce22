"""tvgate.translate.responses_to_anthropic: a Responses client (Codex) on an Anthropic route.

Requests are what Codex sends (``/work/shared/wire``: instructions, a developer message,
function tools, ``store: false``, ``include: ["reasoning.encrypted_content"]``) and
what the ``openai`` SDK puts on the wire; upstream answers are Anthropic's documented
shapes (the Messages streams of ``tests/test_translate_chat_anthropic.py`` and of
``tests/fake_provider.py``). The translated answers are parsed by the ``openai`` SDK's
own Responses parser and stream accumulator (``responses.stream(...)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fake_provider import FakeProvider
from tests.sdks import canned_openai as sdk_client
from tests.sdks import openai_sent
from tests.shapes import responses_usage, text_block, tool_result
from tests.test_translate_chat_anthropic import (
    ATTACHED,
    END,
    IMAGE,
    MODEL,
    SIGNATURE,
    START,
    TEXT,
    TOOL_STREAM,
    anthropic_message,
    anything,
    assert_assembles_tool_stream,
    block,
    events,
    sse,
    upstream,
)
from tvgate.providers import OPENAI_RESPONSES
from tvgate.translate.chat_to_anthropic import DEFAULT_MAX_TOKENS
from tvgate.translate.responses_api import ResponsesRequest
from tvgate.translate.responses_to_anthropic import (
    StreamTranslator,
    TranslationError,
    translate_error,
    translate_request,
    translate_response,
)

JSON = dict[str, Any]
SHELL = {
    "type": "function",
    "name": "shell",
    "description": "Runs a shell command",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {"command": {"type": "array", "items": {"type": "string"}}},
        "required": ["command"],
    },
}
# What Codex 0.171 sent (wire/real-client-requests.json), with its lists filled in.
CODEX: JSON = {
    "model": "gpt-4o",
    "instructions": "You are Codex.",
    "input": [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "sandbox: read-only"}],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ls"}]},
    ],
    "tools": [SHELL],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a21b73-7e81-7d52-8148-e8091268df91",
    "client_metadata": {"x": "y"},
}
ANTHROPIC_SHELL = {
    "name": "shell",
    "description": "Runs a shell command",
    "input_schema": SHELL["parameters"],
}

#: Sampling, one forced tool, one call at a time and a JSON schema: the options that both
#: Responses translators' request tests send (each maps them to its upstream's fields).
OPTIONS: JSON = {
    "max_output_tokens": 300,
    "temperature": 0.2,
    "top_p": 0.9,
    "tools": [SHELL],
    "tool_choice": {"type": "function", "name": "shell"},
    "parallel_tool_calls": False,
    "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}},
}


def sdk_request(**kwargs: Any) -> JSON:
    """The body the openai SDK sends for ``responses.create(**kwargs)``."""
    return openai_sent(lambda client: client.responses.create(**kwargs))


def refusal(
    translate: Callable[[JSON, str], object], body: JSON, model: str
) -> tuple[str | None, openai.BadRequestError]:
    """The field ``translate`` names in refusing ``body``, and the ``openai`` SDK's error for
    that refusal sent on as the gateway sends it."""
    with pytest.raises(TranslationError) as caught:
        translate(body, model)
    with pytest.raises(openai.BadRequestError) as sdk:
        sdk_client(400, caught.value.client_body()).responses.create(model="m", input="x")
    return caught.value.param, sdk.value


# --- request ------------------------------------------------------------------------


def test_codex_request_maps_every_field() -> None:
    req = translate_request(CODEX, MODEL)
    assert req.body == {
        "model": MODEL,
        "system": [text_block("You are Codex."), text_block("sandbox: read-only")],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "ls"}]}],
        # Not given (Codex never does): medium's thinking budget on top of the default.
        "max_tokens": DEFAULT_MAX_TOKENS + 4096,
        "stream": True,
        "tools": [ANTHROPIC_SHELL],
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 4096},
    }
    assert req.stream and req.encrypted
    assert req.dropped == [
        "store",
        "prompt_cache_key",
        "client_metadata",
        f"max_output_tokens not given: {DEFAULT_MAX_TOKENS + 4096} sent",
    ]
    assert req.echo["reasoning"] == {"effort": "medium", "summary": "auto"}


def test_request_sampling_images_files_format_and_tool_choice() -> None:
    body = sdk_request(
        model="claude-route",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": IMAGE, "detail": "auto"},
                    {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "high"},
                    {"type": "input_file", "file_data": "JVBERi0=", "filename": "a.pdf"},
                ],
            }
        ],
        **OPTIONS,
        user="u-1",
    )
    req = translate_request(body, MODEL)
    assert req.body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": ATTACHED}],
        "max_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "tools": [ANTHROPIC_SHELL],
        "tool_choice": {"type": "tool", "name": "shell", "disable_parallel_tool_use": True},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        "metadata": {"user_id": "u-1"},
    }
    assert req.dropped == ["input[0].content[2].detail"]
    assert not req.stream and not req.encrypted


def test_tool_loop_items_become_one_turn_each_with_thinking_unsealed() -> None:
    thinking: JSON = {"type": "thinking", "thinking": "Two calls.", "signature": SIGNATURE}
    content: list[JSON] = [
        thinking,
        {"type": "tool_use", "id": "toolu_A", "name": "shell", "input": {"command": ["ls"]}},
        {"type": "tool_use", "id": "toolu_B", "name": "shell", "input": {"command": ["pwd"]}},
    ]
    answer = translate_response(
        anthropic_message(
            content,
            "tool_use",
        ),
        translate_request(CODEX, MODEL),
    )
    # Codex sends the output items back as they came, then the call outputs.
    history = [
        *CODEX["input"],
        *answer["output"],
        {"type": "function_call_output", "call_id": "toolu_A", "output": "a.txt"},
        {
            "type": "function_call_output",
            "call_id": "toolu_B",
            "output": [{"type": "input_text", "text": "/home"}],
        },
        {"type": "message", "role": "user", "content": "and now?"},
        # A reasoning item OpenAI made: nothing Anthropic could check.
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAAAB-openai"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "ok"}],
        },
    ]
    req = translate_request({**CODEX, "input": history}, MODEL)
    assert req.body["messages"][1:] == [
        {
            "role": "assistant",
            # The signed block first, exactly as Anthropic gave it.
            "content": content,
        },
        {
            "role": "user",
            "content": [
                tool_result("toolu_A", "a.txt"),
                tool_result("toolu_B", [text_block("/home")]),
                text_block("and now?"),
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ]
    assert "input[8]: reasoning without an Anthropic signature" in req.dropped
    # Without the sealed block, thinking stays off in a tool loop (Anthropic refuses it).
    unsealed = [i for i in history if i.get("type") != "reasoning"]
    req = translate_request({**CODEX, "input": unsealed[:-3]}, MODEL)
    assert "thinking" not in req.body
    assert "reasoning_effort: thinking off, the last tool call has no thinking block" in req.dropped


def test_the_tools_codex_offers_beside_its_shell_are_dropped_and_noted() -> None:
    # Codex 0.171 sends these with every request; it works with its shell alone.
    optional = [
        {"type": "web_search", "external_web_access": True},
        {"type": "namespace", "name": "multi_agent_v1", "tools": [SHELL]},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
    ]
    req = translate_request({**CODEX, "tools": [SHELL, *optional]}, MODEL)
    assert req.body["tools"] == [ANTHROPIC_SHELL]
    assert req.dropped[-3:] == [
        "tools[1]: web_search tool",
        "tools[2]: namespace tool multi_agent_v1",
        "tools[3]: custom tool apply_patch",
    ]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"tools": [SHELL, {"type": "file_search", "vector_store_ids": []}]}, "tools[1].type"),
        ({"tools": [{"type": "local_shell"}]}, "tools[0].type"),
        ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format.type"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "n", "arguments": "[1]"}]},
            "input[0].arguments",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ],
)
def test_request_refuses_what_anthropic_cannot_express(change: JSON, param: str) -> None:
    named, sdk = refusal(translate_request, {**CODEX, **change}, MODEL)
    assert named == param
    # The refusal reaches the client as OpenAI's own 400, naming the field.
    assert sdk.param == param and sdk.type == "invalid_request_error"


# --- response -----------------------------------------------------------------------

CONTENT: list[JSON] = [
    {"type": "thinking", "thinking": "Two calls.", "signature": SIGNATURE},
    {"type": "text", "text": "Running both."},
    {"type": "tool_use", "id": "toolu_A", "name": "shell", "input": {"command": ["ls"]}},
    {"type": "tool_use", "id": "toolu_B", "name": "read_file", "input": {"path": "a.txt"}},
]
RESPONSES_USAGE = responses_usage(2112, 40, 2152, cached=2000, cache_written=100, reasoning=0)

#: The output items of an answer that thought, said something and called two tools.
THOUGHT_TEXT_TWO_CALLS = ["reasoning", "message", "function_call", "function_call"]


def calls_of(response: Any) -> list[tuple[str, str, JSON]]:
    return [
        (item.call_id, item.name, orjson.loads(item.arguments))
        for item in response.output
        if item.type == "function_call"
    ]


def test_response_parsed_by_the_sdk() -> None:
    req = translate_request(CODEX, MODEL)
    answer = translate_response(anthropic_message(CONTENT, "tool_use"), req)
    response = sdk_client(200, orjson.dumps(answer)).responses.create(model="m", input="x")
    assert response.id == "resp_msg_01XFDUDYJgAACzvnptvVoYEL" and response.model == MODEL
    assert response.status == "completed"
    assert [item.type for item in response.output] == THOUGHT_TEXT_TWO_CALLS
    assert response.output_text == "Running both."
    assert calls_of(response) == [
        ("toolu_A", "shell", {"command": ["ls"]}),
        ("toolu_B", "read_file", {"path": "a.txt"}),
    ]
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Two calls."
    assert reasoning.encrypted_content and SIGNATURE not in reasoning.encrypted_content
    assert response.usage is not None
    assert response.usage.model_dump(exclude_none=True) == RESPONSES_USAGE
    assert response.tools[0].to_dict()["name"] == "shell" and response.parallel_tool_calls
    # Not asked for (no include): no encrypted content.
    plain = translate_response(
        anthropic_message(CONTENT), translate_request({**CODEX, "include": []}, MODEL)
    )
    assert "encrypted_content" not in plain["output"][0]


@pytest.mark.parametrize(
    ("stop_reason", "status", "reason"),
    [
        ("end_turn", "completed", None),
        ("stop_sequence", "completed", None),
        ("tool_use", "completed", None),
        ("max_tokens", "incomplete", "max_output_tokens"),
        ("model_context_window_exceeded", "incomplete", "max_output_tokens"),
        ("refusal", "incomplete", "content_filter"),
    ],
)
def test_response_status(stop_reason: str, status: str, reason: str | None) -> None:
    answer = translate_response(
        anthropic_message(CONTENT[1:2], stop_reason), translate_request(CODEX, MODEL)
    )
    assert answer["status"] == status
    assert answer["incomplete_details"] == ({"reason": reason} if reason else None)


def test_response_what_responses_cannot_carry_is_noted() -> None:
    req = translate_request(CODEX, MODEL)
    content: list[JSON] = [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        {"type": "text", "text": "cited", "citations": [{"type": "char_location"}]},
    ]
    answer = translate_response(anthropic_message(content, "pause_turn"), req)
    assert [item["type"] for item in answer["output"]] == ["message"]
    assert req.dropped[-3:] == [
        "content: server_tool_use block",
        "content: citations",
        "stop_reason: pause_turn",
    ]


# --- stream -------------------------------------------------------------------------

CREATED_AT = re.compile(rb'"created_at":\d+,')


def translate_stream(body: bytes, request: ResponsesRequest | None = None, step: int = 0) -> bytes:
    """The translated stream, its ``created_at`` clock readings set to 0."""
    tr = StreamTranslator(request or translate_request(CODEX, MODEL))
    step = step or len(body) or 1
    out = b"".join(tr.feed(body[i : i + step]) for i in range(0, len(body), step))
    return CREATED_AT.sub(b'"created_at":0,', out + tr.finish())


def sdk_stream(body: bytes) -> tuple[Any, list[Any]]:
    """The SDK's accumulated final Response and the events it saw."""
    client = sdk_client(200, body, "text/event-stream")
    with client.responses.stream(model="m", input="x") as stream:
        events = list(stream)
        return stream.get_final_response(), events


def sdk_failed_stream(body: bytes) -> list[Any]:
    """The events the SDK saw of a stream that ended without ``response.completed`` (which
    its accumulator refuses to make a final Response of)."""
    client = sdk_client(200, body, "text/event-stream")
    with client.responses.stream(model="m", input="x") as stream:
        events = list(stream)
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            stream.get_final_response()
    return events


def test_stream_tool_calls_and_reasoning_parsed_by_the_sdk_accumulator() -> None:
    req = translate_request(CODEX, MODEL)
    out = translate_stream(TOOL_STREAM, req)
    # Split anywhere (inside "✓" too), the stream translates to the same bytes.
    assert translate_stream(TOOL_STREAM, step=1) == out
    assert translate_stream(TOOL_STREAM, step=7) == out
    assert b": ping\n\n" in out
    response, events = sdk_stream(out)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    # The empty first fragment Anthropic sends is not an event.
    assert kinds.count("response.function_call_arguments.delta") == 3
    assert kinds.count("response.reasoning_summary_text.delta") == 2
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert response.id == "resp_msg_01XFDUDYJgAACzvnptvVoYEL" and response.status == "completed"
    assert response.output_text == "Running both ✓."
    assert calls_of(response) == [
        ("toolu_01A", "bash", {"command": "ls -l"}),
        ("toolu_01B", "read_file", {"path": "a.txt"}),
    ]
    assert response.usage.model_dump(exclude_none=True) == RESPONSES_USAGE
    reasoning = response.output[0]
    assert reasoning.summary[0].text == "Two calls."
    assert req.dropped == [
        "store",
        "prompt_cache_key",
        "client_metadata",
        f"max_output_tokens not given: {DEFAULT_MAX_TOKENS + 4096} sent",
    ]
    # The streamed reasoning item, sent back, is the thinking block Anthropic signed.
    again = translate_request(
        {**CODEX, "input": [*CODEX["input"], *(i.to_dict() for i in response.output)]}, MODEL
    )
    assert again.body["messages"][1]["content"][0] == {
        "type": "thinking",
        "thinking": "Two calls.",
        "signature": SIGNATURE,
    }

    # tvgate's own trace assembler reads the client's stream with the same figures.
    assert_assembles_tool_stream(OPENAI_RESPONSES, out, "completed")


def test_stream_is_incremental() -> None:
    tr = StreamTranslator(translate_request(CODEX, MODEL))
    first = tr.feed(sse([START, *TEXT[:2]]))
    assert b"response.created" in first and b'"delta":"Running "' in first
    delta = tr.feed(sse(TEXT[2:3]))
    assert delta.startswith(b"event: response.output_text.delta\n") and b"both" in delta
    # The block's end is the item's: text, part and item done, nothing else.
    done = tr.feed(sse(TEXT[3:4]))
    assert re.findall(rb"event: (\S+)", done) == [
        b"response.output_text.done",
        b"response.content_part.done",
        b"response.output_item.done",
    ]
    assert not tr.done


def test_stream_max_tokens_is_incomplete() -> None:
    end = {**END[0], "delta": {"stop_reason": "max_tokens", "stop_sequence": None}}
    out = translate_stream(sse([START, *TEXT, end, END[1]]))
    events = [orjson.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Running both ✓."


def test_stream_anthropic_error_mid_stream_reaches_the_sdk() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    out = translate_stream(sse([START, *TEXT[:3], error, *TEXT[3:]]))
    events = sdk_failed_stream(out)
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "overloaded_error"
    assert failed.response.error.message == "Overloaded"
    # Nothing after the failure, and the text so far is not lost to the client.
    assert [e.type for e in events].count("response.output_text.delta") == 2


def test_stream_cut_short_and_gateway_failure_are_response_failed() -> None:
    out = translate_stream(sse([START, *TEXT[:3]]))
    assert out.count(b"event: response.failed\n") == 1
    assert b"upstream stream ended before message_stop" in out
    tr = StreamTranslator(translate_request(CODEX, MODEL))
    tr.feed(sse([START]))
    failed = tr.error("upstream timed out", "timeout")
    assert b'"code":"timeout"' in failed and tr.done
    assert tr.error("again") == b"" and tr.finish() == b""


def test_redacted_thinking_is_sealed_and_other_blocks_noted() -> None:
    req = translate_request(CODEX, MODEL)
    redacted = block(0, {"type": "redacted_thinking", "data": "EmwKAhgBEgy"}, [])
    search = block(1, {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search"}, [])
    text = block(2, {"type": "text", "text": "Hi"}, [{"type": "text_delta", "text": "!"}])
    response, _ = sdk_stream(translate_stream(sse([START, *redacted, *search, *text, *END]), req))
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == "Hi!"
    assert req.dropped[-1] == "content: server_tool_use block"
    back = translate_request(
        {**CODEX, "input": [*CODEX["input"], response.output[0].to_dict()]}, MODEL
    )
    assert back.body["messages"][1]["content"] == [
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy"}
    ]


# --- errors -------------------------------------------------------------------------


def test_error_envelope_keeps_the_provider_message() -> None:
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}'
    status, translated = translate_error(429, body)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk_client(status, translated).responses.create(model="m", input="x")
    assert caught.value.body == {
        "message": "Slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_error",
    }
    assert caught.value.code == "rate_limit_error"


# --- against the fake Anthropic provider --------------------------------------------


@pytest.mark.parametrize("scenario", ["normal", "tool_use", "thinking"])
def test_fake_provider_stream_and_answer_agree_through_the_sdk(
    fake_provider: FakeProvider, scenario: str
) -> None:
    options = {k: CODEX[k] for k in ("reasoning", "store", "include", "stream")}
    body = sdk_request(model="claude-route", input="read the readme", tools=[SHELL], **options)
    req = translate_request(body, MODEL)
    tr = StreamTranslator(req)
    with upstream(fake_provider, scenario, req.body) as answer:
        assert answer.status_code == 200
        out = b"".join(tr.feed(chunk) for chunk in answer.iter_raw()) + tr.finish()
    with upstream(fake_provider, scenario, {**req.body, "stream": False}) as whole:
        expected = translate_response(orjson.loads(whole.read()), translate_request(body, MODEL))
    response, _ = sdk_stream(out)
    assert response.output_text and response.output_text == "".join(
        part["text"]
        for item in expected["output"]
        if item["type"] == "message"
        for part in item["content"]
    )
    assert response.usage.model_dump(exclude_none=True) == expected["usage"]
    assert response.usage.input_tokens_details.cached_tokens > 0
    assert calls_of(response) == [
        (i["call_id"], i["name"], orjson.loads(i["arguments"]))
        for i in expected["output"]
        if i["type"] == "function_call"
    ]
    assert bool(calls_of(response)) == (scenario == "tool_use")
    reasoning = [i for i in response.output if i.type == "reasoning"]
    assert bool(reasoning) == (scenario == "thinking")
    if reasoning:
        assert reasoning[0].summary[0].text == expected["output"][0]["summary"][0]["text"]
        assert reasoning[0].encrypted_content == expected["output"][0]["encrypted_content"]


def test_fake_provider_error_event_and_error_answer(fake_provider: FakeProvider) -> None:
    req = translate_request(CODEX, MODEL)
    tr = StreamTranslator(req)
    with upstream(fake_provider, "error_event", req.body) as answer:
        out = b"".join(tr.feed(chunk) for chunk in answer.iter_raw()) + tr.finish()
    events = [orjson.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "overloaded_error", "message": "Overloaded"}
    with upstream(fake_provider, "error_529", req.body) as answer:
        status, body = translate_error(answer.status_code, answer.read())
    with pytest.raises(openai.InternalServerError) as caught:
        sdk_client(status, body).responses.create(model="m", input="x")
    assert caught.value.status_code == 529 and caught.value.code == "overloaded_error"


# --- what a member's own server may send ----------------------------------------------

TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")


def assert_responses_sse(out: bytes) -> None:
    """Responses events (or pings), each JSON, ending with one terminal event."""
    kinds = []
    for event in out[:-2].split(b"\n\n"):
        if event == b": ping":
            continue
        head, _, data = event.partition(b"\ndata: ")
        assert head.startswith(b"event: response.")
        assert orjson.loads(data)["type"].encode() == head[7:]
        kinds.append(head[7:])
    assert [k for k in kinds if k in TERMINAL] == [kinds[-1]]


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 40))
def test_stream_of_any_shape_never_raises_and_stays_responses_sse(
    evs: list[JSON], chunk_size: int
) -> None:
    body = sse([START, *evs])
    out = translate_stream(body, step=chunk_size)
    assert out == translate_stream(body)
    assert_responses_sse(out)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["content", "usage", "stop_reason", "id", "model"]), anything)
)
def test_response_of_any_shape_never_raises(body: JSON) -> None:
    out = translate_response(body, translate_request(CODEX, MODEL))
    assert out["object"] == "response"
    orjson.dumps(out)


def test_a_block_started_twice_ends_its_first_item() -> None:
    again = block(0, {"type": "text", "text": ""}, [{"type": "text_delta", "text": "b"}])
    first = [
        e for e in block(0, {"type": "text", "text": "a"}, []) if e["type"] != "content_block_stop"
    ]
    response, _ = sdk_stream(translate_stream(sse([START, *first, *again, *END])))
    assert [item.type for item in response.output] == ["message", "message"]
    assert response.output_text == "ab"
