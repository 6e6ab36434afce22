"""tvgate.translate.chat_to_anthropic: an OpenAI Chat client on an Anthropic route.

Requests are what the ``openai`` SDK itself puts on the wire (captured through an
``httpx2.MockTransport``) or Chat bodies as Cursor/Aider send them; upstream answers
are Anthropic's documented shapes (those ``tests/fake_provider.py`` serves). The
translated stream is parsed by the ``openai`` SDK's own accumulator, the SDK being
the client here; the upstream is the fake.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import ANTHROPIC_SECRET
from tests.fake_provider import FakeProvider
from tests.sdks import canned_openai as sdk_client
from tests.sdks import openai_sent
from tests.shapes import JSON, chat_tool_call, text_block, tool_result, tool_use
from tvgate.providers.assemble import OPENAI_CHAT, stream_assembler
from tvgate.translate.chat_to_anthropic import (
    DEFAULT_MAX_TOKENS,
    StreamTranslator,
    TranslationError,
    translate_error,
    translate_request,
    translate_response,
)

MODEL = "claude-sonnet-4-6"
IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYAAAAAMAASsJTYQAAAAASUVORK5CYII="
#: A question with a data: image, an image by URL and a PDF, as Anthropic content: what the
#: attachments tests of the Chat and the Responses translators both send, each in its API's parts.
ATTACHED: list[JSON] = [
    {"type": "text", "text": "What is this?"},
    {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": IMAGE.split(",")[1]},
    },
    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
    {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
    },
]
TOOLS: list[JSON] = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        },
    },
    {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}},
]


def sdk_request(**kwargs: Any) -> JSON:
    """The body the openai SDK sends for ``chat.completions.create(**kwargs)``."""
    return openai_sent(lambda client: client.chat.completions.create(**kwargs))


# --- request ------------------------------------------------------------------------


def test_request_system_multipart_images_and_sampling() -> None:
    body = sdk_request(
        model="claude-route",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": IMAGE}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://x.test/a.png", "detail": "high"},
                    },
                    {
                        "type": "file",
                        "file": {
                            "file_data": "data:application/pdf;base64,JVBERi0=",
                            "filename": "a.pdf",
                        },
                    },
                ],
            },
        ],
        max_completion_tokens=300,
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        stop="END",
    )
    req = translate_request(body, MODEL)
    assert req.body == {
        "model": MODEL,
        "system": [text_block("You are terse."), text_block("Use tools.")],
        "messages": [{"role": "user", "content": ATTACHED}],
        # max_completion_tokens wins over the deprecated max_tokens, as at OpenAI.
        "max_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
    }
    assert req.dropped == ["messages[2].content[2].image_url.detail"]
    assert not req.stream


def test_request_max_tokens_default_is_noted() -> None:
    req = translate_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, MODEL)
    assert req.body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert req.dropped == [f"max_tokens not given: {DEFAULT_MAX_TOKENS} sent"]
    legacy = {
        "model": "m",
        "max_tokens": 77,
        "stop": ["a", "b"],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert translate_request(legacy, MODEL).body["max_tokens"] == 77
    assert translate_request(legacy, MODEL).body["stop_sequences"] == ["a", "b"]


def test_request_tools_calls_and_parallel_results() -> None:
    body = sdk_request(
        model="claude-route",
        stream=True,
        stream_options={"include_usage": True},
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        messages=[
            {"role": "user", "content": "list and read"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    chat_tool_call("call_1", "bash", '{"command":"ls"}'),
                    chat_tool_call("call_2", "read_file", ""),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "hello"}],
            },
            {"role": "user", "content": "thanks"},
        ],
    )
    req = translate_request(body, MODEL)
    assert req.stream and req.include_usage
    assert req.body["stream"] is True
    assert req.body["tools"] == [
        {
            "name": "bash",
            "description": "Run a shell command",
            "input_schema": TOOLS[0]["function"]["parameters"],
        },
        {"name": "read_file", "input_schema": {"type": "object"}},
    ]
    assert req.body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert req.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                tool_use("call_1", "bash", {"command": "ls"}),
                tool_use("call_2", "read_file", {}),
            ],
        },
        # Both results in one user turn, before the text that follows them.
        {
            "role": "user",
            "content": [
                tool_result("call_1", "a.txt"),
                tool_result("call_2", [text_block("hello")]),
                text_block("thanks"),
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "bash"}},
            None,
            {"type": "tool", "name": "bash"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, True, None),
    ],
)
def test_request_tool_choice(choice: object, parallel: object, expected: JSON | None) -> None:
    body: JSON = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "tools": TOOLS,
    }
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate_request(body, MODEL).body.get("tool_choice") == expected


def test_request_structured_output_and_strict_tools() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    body = sdk_request(
        model="m",
        max_tokens=10,
        messages=[{"role": "user", "content": "json"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        },
        tools=[
            {"type": "function", "function": {"name": "f", "parameters": schema, "strict": True}}
        ],
    )
    out = translate_request(body, MODEL).body
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert out["tools"] == [{"name": "f", "input_schema": schema, "strict": True}]
    text = {**body, "response_format": {"type": "text"}}
    assert "output_config" not in translate_request(text, MODEL).body


@pytest.mark.parametrize(
    ("effort", "max_tokens", "thinking", "note"),
    [
        ("low", 8000, {"type": "enabled", "budget_tokens": 1024}, None),
        ("medium", 8000, {"type": "enabled", "budget_tokens": 4096}, None),
        # The budget stays below max_tokens, which includes the thinking on both APIs.
        ("high", 8000, {"type": "enabled", "budget_tokens": 7999}, None),
        ("high", 1000, None, "reasoning_effort: max_tokens 1000 leaves no thinking budget"),
        ("minimal", 8000, None, "reasoning_effort=minimal: thinking off"),
        ("none", 8000, None, None),
    ],
)
def test_request_reasoning_effort(
    effort: str, max_tokens: int, thinking: JSON | None, note: str | None
) -> None:
    body = sdk_request(
        model="m",
        max_completion_tokens=max_tokens,
        reasoning_effort=effort,
        messages=[{"role": "user", "content": "think"}],
    )
    req = translate_request(body, MODEL)
    assert req.body.get("thinking") == thinking
    assert req.dropped == ([note] if note else [])


def test_request_thinking_off_where_anthropic_would_refuse_it() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}
    signed = {"type": "thinking", "thinking": "t", "signature": "EqQBCkYIBRgCIkD"}
    loop: list[JSON] = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Running.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    base = {"model": "m", "max_tokens": 8000, "reasoning_effort": "low", "tools": TOOLS}
    # A tool loop whose last call came without its thinking block.
    req = translate_request({**base, "messages": loop}, MODEL)
    assert "thinking" not in req.body
    assert req.dropped == [
        "reasoning_effort: thinking off, the last tool call has no thinking block"
    ]
    # With the signed block sent back, thinking stays on.
    loop[1] = {**loop[1], "thinking_blocks": [signed]}
    assert (
        translate_request({**base, "messages": loop}, MODEL).body["thinking"]["type"] == "enabled"
    )
    # Forced tool use.
    forced = translate_request({**base, "messages": loop, "tool_choice": "required"}, MODEL)
    assert "thinking" not in forced.body
    assert forced.dropped == ["reasoning_effort: thinking off, a tool is forced"]


def test_request_thinking_drops_the_sampling_anthropic_forbids_with_it() -> None:
    body = {"model": "m", "max_tokens": 8000, "reasoning_effort": "low", "messages": USER}
    req = translate_request({**body, "temperature": 0, "top_p": 0.5}, MODEL)
    assert req.body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert "temperature" not in req.body and "top_p" not in req.body
    assert req.dropped == ["temperature=0: thinking is on", "top_p=0.5: thinking is on"]
    allowed = translate_request({**body, "temperature": 1, "top_p": 0.95}, MODEL)
    assert (allowed.body["temperature"], allowed.body["top_p"], allowed.dropped) == (1, 0.95, [])
    # Without thinking, they go as given.
    plain = translate_request({**body, "reasoning_effort": "none", "temperature": 0}, MODEL)
    assert plain.body["temperature"] == 0


def test_request_thinking_blocks_keep_their_signature_and_none_is_made_up() -> None:
    signed = {"type": "thinking", "thinking": "let me see", "signature": "EqQBCkYIBRgCIkD"}
    body = {
        "model": "m",
        "max_tokens": 5000,
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "a",
                "reasoning_content": "let me see",
                "thinking_blocks": [signed, {"type": "redacted_thinking", "data": "EmwKAhgB"}],
            },
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "b", "reasoning_content": "unsigned"},
            {"role": "user", "content": "q3"},
        ],
    }
    req = translate_request(body, MODEL)
    assert req.body["messages"][1]["content"] == [
        signed,
        {"type": "redacted_thinking", "data": "EmwKAhgB"},
        {"type": "text", "text": "a"},
    ]
    assert req.body["messages"][3]["content"] == [{"type": "text", "text": "b"}]
    assert req.dropped == ["messages[3].reasoning_content: no signature"]


def test_request_harmless_fields_dropped_and_noted() -> None:
    body = sdk_request(
        model="m",
        max_tokens=5,
        messages=[{"role": "user", "content": "x", "name": "alice"}],
        user="u-42",
        metadata={"k": "v"},
        store=False,
        seed=7,
        n=1,
        presence_penalty=0,
        logprobs=False,
        stream=True,
        stream_options={"include_usage": False, "include_obfuscation": False},
    )
    req = translate_request(body, MODEL)
    assert req.body["metadata"] == {"user_id": "u-42"}
    assert not req.include_usage
    assert sorted(req.dropped) == sorted(
        [
            "messages[0].name",
            "metadata",
            "store",
            "seed",
            "n",
            "presence_penalty",
            "logprobs",
            "stream_options.include_obfuscation",
        ]
    )


USER = [{"role": "user", "content": "x"}]
CHAT_USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"some_vendor_field": 1}, "some_vendor_field"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"stop": 5}, "stop"),
        ({"reasoning_effort": ["high"]}, "reasoning_effort"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}
                ]
            },
            "messages[0].content[0].file",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [chat_tool_call("c", "f", "[1]")],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_request_refuses_what_anthropic_cannot_express(body: JSON, param: str) -> None:
    with pytest.raises(TranslationError) as caught:
        translate_request({"model": "m", "messages": USER, **body}, MODEL)
    err = caught.value
    assert err.status == 400 and err.param == param
    assert param.split("[")[0].split(".")[0] in err.message
    # The refusal reaches the client in its own envelope: the SDK names the param.
    client = sdk_client(err.status, err.client_body())
    with pytest.raises(openai.BadRequestError) as sdk_err:
        client.chat.completions.create(model="m", messages=CHAT_USER)
    assert sdk_err.value.param == param
    assert sdk_err.value.message.endswith(err.message)


# --- response -----------------------------------------------------------------------

SIGNATURE = "EqQBCkYIBRgCIkDSxT1hvYrFyA5D"
USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 2000,
    "output_tokens": 40,
    "service_tier": "standard",
}
CHAT_USAGE = {
    "prompt_tokens": 2112,
    "completion_tokens": 40,
    "total_tokens": 2152,
    "prompt_tokens_details": {"cached_tokens": 2000, "cache_write_tokens": 100},
}


def anthropic_message(content: list[JSON], stop_reason: str = "end_turn") -> JSON:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": USAGE,
    }


def test_response_text_thinking_and_parallel_tool_calls() -> None:
    message = anthropic_message(
        [
            {"type": "thinking", "thinking": "Two calls.", "signature": SIGNATURE},
            {"type": "text", "text": "Running "},
            {"type": "text", "text": "both."},
            tool_use("toolu_01A", "bash", {"command": "ls"}),
            tool_use("toolu_01B", "read_file", {}),
        ],
        "tool_use",
    )
    dropped: list[str] = []
    out = translate_response(message, dropped)
    assert out["id"] == message["id"] and out["model"] == MODEL
    assert out["object"] == "chat.completion" and isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": "Running both.",
        "refusal": None,
        "tool_calls": [
            chat_tool_call("toolu_01A", "bash", '{"command":"ls"}'),
            chat_tool_call("toolu_01B", "read_file", "{}"),
        ],
        "reasoning_content": "Two calls.",
        "thinking_blocks": [{"type": "thinking", "thinking": "Two calls.", "signature": SIGNATURE}],
    }
    # Usage from Anthropic's own figures: OpenAI's prompt_tokens include the cached ones.
    assert out["usage"] == CHAT_USAGE
    assert dropped == []

    # The SDK reads it as a ChatCompletion, tool calls and all.
    client = sdk_client(200, orjson.dumps(out))
    completion = client.chat.completions.create(model="m", messages=CHAT_USER)
    calls = completion.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("toolu_01A", "bash", {"command": "ls"}),
        ("toolu_01B", "read_file", {}),
    ]
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 2000

    # A signed thinking block goes back to Anthropic as it came.
    history = {"model": "m", "max_tokens": 9, "messages": [*USER, choice["message"]]}
    sent = translate_request(history, MODEL).body["messages"][1]["content"][0]
    assert sent == message["content"][0]


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("model_context_window_exceeded", "length"),
        ("pause_turn", "stop"),
    ],
)
def test_response_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    dropped: list[str] = []
    out = translate_response(
        anthropic_message([{"type": "text", "text": "x"}], stop_reason), dropped
    )
    assert out["choices"][0]["finish_reason"] == finish_reason
    assert dropped == (["stop_reason: pause_turn"] if stop_reason == "pause_turn" else [])


def test_response_what_chat_cannot_carry_is_noted() -> None:
    message = anthropic_message(
        [
            {"type": "redacted_thinking", "data": "EmwKAhgB"},
            {
                "type": "server_tool_use",
                "id": "srvtoolu_1",
                "name": "web_search",
                "input": {"query": "q"},
            },
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {
                "type": "text",
                "text": "Found.",
                "citations": [{"type": "web_search_result_location", "url": "https://x.test"}],
            },
        ]
    )
    dropped: list[str] = []
    out = translate_response(message, dropped)
    assert out["choices"][0]["message"]["content"] == "Found."
    assert out["choices"][0]["message"]["thinking_blocks"] == [
        {"type": "redacted_thinking", "data": "EmwKAhgB"}
    ]
    assert dropped == [
        "content: server_tool_use block",
        "content: web_search_tool_result block",
        "content: citations",
    ]
    empty = translate_response(anthropic_message([], "end_turn"))
    assert empty["choices"][0]["message"]["content"] is None


# --- stream -------------------------------------------------------------------------


def sse(events: Iterable[JSON]) -> bytes:
    """Anthropic's wire format: ``event: <type>`` then the JSON."""
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


def block(index: int, content_block: JSON, deltas: Iterable[JSON]) -> list[JSON]:
    return [
        {"type": "content_block_start", "index": index, "content_block": content_block},
        *({"type": "content_block_delta", "index": index, "delta": d} for d in deltas),
        {"type": "content_block_stop", "index": index},
    ]


START = {
    "type": "message_start",
    "message": {
        **anthropic_message([], "end_turn"),
        "stop_reason": None,
        "usage": {**USAGE, "output_tokens": 1},
    },
}
THINKING = block(
    0,
    {"type": "thinking", "thinking": "", "signature": ""},
    [
        {"type": "thinking_delta", "thinking": "Two "},
        {"type": "thinking_delta", "thinking": "calls."},
        {"type": "signature_delta", "signature": SIGNATURE},
    ],
)
TEXT = block(
    1,
    {"type": "text", "text": ""},
    [{"type": "text_delta", "text": "Running "}, {"type": "text_delta", "text": "both ✓."}],
)
TOOLS_USED = block(
    2,
    tool_use("toolu_01A", "bash", {}),
    [
        {"type": "input_json_delta", "partial_json": ""},
        {"type": "input_json_delta", "partial_json": '{"comm'},
        {"type": "input_json_delta", "partial_json": 'and": "ls -l"}'},
    ],
) + block(
    3,
    tool_use("toolu_01B", "read_file", {}),
    [{"type": "input_json_delta", "partial_json": '{"path": "a.txt"}'}],
)
END: list[JSON] = [
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {**USAGE, "output_tokens": 40},
    },
    {"type": "message_stop"},
]
PING = {"type": "ping"}
TOOL_STREAM = sse([START, *THINKING[:1], PING, *THINKING[1:], *TEXT, *TOOLS_USED, *END])


CREATED = re.compile(rb'"created":\d+,')


def translate_stream(
    body: bytes, chunk_size: int | None = None, include_usage: bool = True
) -> tuple[bytes, list[str]]:
    """The translated stream, its ``created`` clock reading set to 0 so that two
    translations compare equal even across a second's turn."""
    tr = StreamTranslator(include_usage=include_usage)
    step = chunk_size or len(body) or 1
    out = b"".join(tr.feed(body[i : i + step]) for i in range(0, len(body), step))
    return CREATED.sub(b'"created":0,', out + tr.finish()), tr.dropped


def assert_assembles_tool_stream(api: str, out: bytes, stop_reason: str) -> None:
    """tvgate's trace assembler for the client's ``api`` reads ``out`` (``TOOL_STREAM``
    translated) as complete, with Anthropic's figures: what the trace of such a call holds."""
    asm = stream_assembler(api)
    asm.feed(out)
    assembled = asm.finish()
    assert assembled.complete and assembled.stop_reason == stop_reason
    assert (assembled.usage.input_tokens, assembled.usage.output_tokens) == (2112, 40)
    assert (assembled.usage.cache_read_tokens, assembled.usage.cache_write_tokens) == (2000, 100)


def sdk_stream(body: bytes) -> Any:
    client = sdk_client(200, body, "text/event-stream")
    with client.chat.completions.stream(model="m", messages=USER) as stream:  # type: ignore[arg-type]
        return stream.get_final_completion()


def test_stream_tool_calls_parsed_by_the_sdk_accumulator() -> None:
    out, dropped = translate_stream(TOOL_STREAM)
    # Split anywhere (inside "✓" too), the stream translates to the same bytes.
    assert translate_stream(TOOL_STREAM, 1)[0] == out
    assert translate_stream(TOOL_STREAM, 7)[0] == out
    assert dropped == ["thinking signature (stream)"]
    assert out.endswith(b"data: [DONE]\n\n")
    assert b": ping\n\n" in out

    completion = sdk_stream(out)
    assert completion.id == "msg_01XFDUDYJgAACzvnptvVoYEL" and completion.model == MODEL
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Running both ✓."
    calls = choice.message.tool_calls
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("toolu_01A", "bash", {"command": "ls -l"}),
        ("toolu_01B", "read_file", {"path": "a.txt"}),
    ]
    # The usage chunk carries Anthropic's final figures, cache reads and writes.
    assert completion.usage.model_dump(exclude_none=True) == CHAT_USAGE

    # create(stream=True) chunk by chunk through the SDK's own state.
    state = ChatCompletionStreamState()
    reasoning = []
    client = sdk_client(200, out, "text/event-stream")
    stream = client.chat.completions.create(model="m", messages=CHAT_USER, stream=True)
    for chunk in stream:
        state.handle_chunk(chunk)
        for c in chunk.choices:
            reasoning.append((c.delta.model_extra or {}).get("reasoning_content", ""))
    assert "".join(reasoning) == "Two calls."
    final = state.get_final_completion()
    assert final.choices[0].message.tool_calls == calls

    # tvgate's own trace assembler reads the client's stream with the same figures.
    assert_assembles_tool_stream(OPENAI_CHAT, out, "tool_calls")


def test_stream_is_incremental() -> None:
    """Each event is sent on as soon as it is complete; a partial one is held."""
    tr = StreamTranslator()
    head = sse([START, *TEXT[:2]])
    first = tr.feed(head[:-5])
    assert b'"role":"assistant"' in first and b"Running" not in first
    assert tr.feed(head[-5:]).startswith(b'data: {"id":"msg_01')
    assert b'"content":"both \xe2\x9c\x93."' in tr.feed(sse(TEXT[2:3]))


def test_stream_line_endings_and_splits_do_not_change_or_delay_events() -> None:
    expected = translate_stream(TOOL_STREAM)[0]
    for line_end in (b"\r\n", b"\r"):
        body = TOOL_STREAM.replace(b"\n", line_end)
        for size in (None, 1, 3, 64):
            assert translate_stream(body, size)[0] == expected
    # An event is sent on as soon as its blank line arrives, whatever ends its lines.
    for line_end in (b"\n", b"\r\n"):
        first = sse([START]).replace(b"\n", line_end)
        cut = len(first) - len(line_end)
        tr = StreamTranslator()
        assert tr.feed(first[:cut]) == b""
        assert b'"role":"assistant"' in tr.feed(first[cut:] + b"event: ping\n")


def test_stream_usage_only_when_asked() -> None:
    out, _ = translate_stream(TOOL_STREAM, include_usage=False)
    assert b'"usage"' not in out
    assert sdk_stream(out).usage is None
    lines = [line for line in translate_stream(TOOL_STREAM)[0].split(b"\n\n") if b'"usage"' in line]
    assert len(lines) == 1 and b'"choices":[]' in lines[0]


def test_stream_anthropic_error_event_mid_stream_reaches_the_sdk() -> None:
    error = {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }
    body = sse([START, *TEXT[:2], error, *TEXT[2:], *END])
    out, _ = translate_stream(body, 5)
    assert b"[DONE]" not in out and b"both" not in out
    assert out.endswith(
        b'data: {"error":{"message":"Overloaded","type":"overloaded_error","param":null,'
        b'"code":"overloaded_error"}}\n\n'
    )
    with pytest.raises(openai.APIError, match="Overloaded"):
        sdk_stream(out)


def test_stream_upstream_failure_and_early_end_are_in_band_errors() -> None:
    tr = StreamTranslator()
    partial = tr.feed(sse([START, *TEXT[:2]]))
    failed = tr.error("upstream connection reset")
    assert tr.error("again") == b"" and tr.feed(sse(TEXT[2:])) == b"" and tr.finish() == b""
    with pytest.raises(openai.APIError, match="upstream connection reset"):
        sdk_stream(partial + failed)

    cut = StreamTranslator()
    out = cut.feed(sse([START, *TEXT])[:-3]) + cut.finish()
    with pytest.raises(openai.APIError, match="ended before message_stop"):
        sdk_stream(out)


def test_stream_finish_reasons_and_skipped_blocks() -> None:
    server_tool = block(
        0,
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        [{"type": "input_json_delta", "partial_json": '{"query": "q"}'}],
    )
    end = [{**END[0], "delta": {"stop_reason": "max_tokens", "stop_sequence": None}}, END[1]]
    out, dropped = translate_stream(sse([START, *server_tool, *TEXT, *end]))
    # The SDK's stream helper refuses a cut-off answer, and keeps it on the error.
    with pytest.raises(openai.LengthFinishReasonError) as cut:
        sdk_stream(out)
    completion = cut.value.completion
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "Running both ✓."
    assert not completion.choices[0].message.tool_calls
    assert dropped == ["content: server_tool_use block"]


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "message", "sdk_error"),
    [
        (
            400,
            "invalid_request_error",
            "messages.1: tool_use ids must be unique",
            openai.BadRequestError,
        ),
        (401, "authentication_error", "invalid x-api-key", openai.AuthenticationError),
        (
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your rate limit",
            openai.RateLimitError,
        ),
        (529, "overloaded_error", "Overloaded", openai.InternalServerError),
    ],
)
def test_error_envelope_keeps_the_provider_message(
    status: int, kind: str, message: str, sdk_error: type[openai.APIStatusError]
) -> None:
    upstream = orjson.dumps(
        {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011CS"}
    )
    out_status, out = translate_error(status, upstream)
    assert out_status == status
    assert orjson.loads(out) == {
        "error": {"message": message, "type": kind, "param": None, "code": kind}
    }
    with pytest.raises(sdk_error) as caught:
        sdk_client(out_status, out).chat.completions.create(model="m", messages=CHAT_USER)
    assert caught.value.status_code == status and caught.value.code == kind
    assert caught.value.message.endswith(message)


def test_error_that_is_not_anthropics_envelope_keeps_its_text() -> None:
    status, out = translate_error(502, b"<html><body>502 Bad Gateway</body></html>\n")
    assert status == 502
    assert orjson.loads(out)["error"] == {
        "message": "<html><body>502 Bad Gateway</body></html>",
        "type": "api_error",
        "param": None,
        "code": "api_error",
    }
    assert orjson.loads(translate_error(500, b"")[1])["error"]["message"] == "upstream error"


# --- there and back -----------------------------------------------------------------


def chat_from_anthropic(body: JSON) -> JSON:
    """The reverse mapping (Messages to Chat) of every field both APIs have."""
    messages: list[JSON] = [
        {"role": "system", "content": b["text"]} for b in body.get("system", ())
    ]
    for turn in body["messages"]:
        blocks = turn["content"]
        if turn["role"] == "assistant":
            text = "".join(b["text"] for b in blocks if b["type"] == "text")
            msg: JSON = {"role": "assistant", "content": text or None}
            calls = [
                chat_tool_call(b["id"], b["name"], orjson.dumps(b["input"]).decode())
                for b in blocks
                if b["type"] == "tool_use"
            ]
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
            continue
        parts: list[JSON] = []
        for b in blocks:
            if b["type"] == "tool_result":
                messages.append(
                    {"role": "tool", "tool_call_id": b["tool_use_id"], "content": b["content"]}
                )
            elif b["type"] == "text":
                parts.append({"type": "text", "text": b["text"]})
            else:
                src = b["source"]
                url = (
                    src["url"]
                    if src["type"] == "url"
                    else f"data:{src['media_type']};base64,{src['data']}"
                )
                parts.append({"type": "image_url", "image_url": {"url": url}})
        if parts:
            messages.append({"role": "user", "content": parts})
    out: JSON = {"messages": messages, "max_completion_tokens": body["max_tokens"]}
    for key in ("temperature", "top_p", "stream"):
        if key in body:
            out[key] = body[key]
    if "stop_sequences" in body:
        out["stop"] = body["stop_sequences"]
    if "tools" in body:
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    **({"description": t["description"]} if "description" in t else {}),
                    "parameters": t["input_schema"],
                },
            }
            for t in body["tools"]
        ]
    choice = dict(body.get("tool_choice", {}))
    if choice.pop("disable_parallel_tool_use", False):
        out["parallel_tool_calls"] = False
    if choice:
        kind = choice["type"]
        out["tool_choice"] = (
            {"type": "function", "function": {"name": choice["name"]}}
            if kind == "tool"
            else {"any": "required"}.get(kind, kind)
        )
    return out


texts = st.text(min_size=1, max_size=12)
names = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=6,
)
image_parts = st.builds(
    lambda url: {"type": "image_url", "image_url": {"url": url}},
    st.sampled_from(["https://x.test/a.png", IMAGE, "data:image/jpeg;base64,/9j/4AAQ"]),
)
user_content = st.lists(
    st.builds(lambda t: {"type": "text", "text": t}, texts) | image_parts, min_size=1, max_size=3
)


@st.composite
def chat_requests(draw: st.DrawFn) -> JSON:
    messages: list[JSON] = [
        {"role": "system", "content": t} for t in draw(st.lists(texts, max_size=2))
    ]
    pending: list[str] = []
    for turn in range(draw(st.integers(1, 4))):
        for call_id in pending:
            messages.append({"role": "tool", "tool_call_id": call_id, "content": draw(texts)})
        if not pending or draw(st.booleans()):
            messages.append({"role": "user", "content": draw(user_content)})
        calls: list[JSON] = [
            {
                "id": f"call_{turn}_{k}",
                "type": "function",
                "function": {
                    "name": draw(names),
                    "arguments": orjson.dumps(
                        draw(st.dictionaries(names, json_values, max_size=3))
                    ).decode(),
                },
            }
            for k in range(draw(st.integers(0, 2)))
        ]
        assistant: JSON = {
            "role": "assistant",
            "content": draw(texts) if not calls or draw(st.booleans()) else None,
        }
        if calls:
            assistant["tool_calls"] = calls
        messages.append(assistant)
        pending = [c["id"] for c in calls]
    for call_id in pending:
        messages.append({"role": "tool", "tool_call_id": call_id, "content": draw(texts)})
    body: JSON = {"messages": messages, "max_completion_tokens": draw(st.integers(1, 64000))}
    optional = {
        "temperature": st.floats(0, 1),
        "top_p": st.floats(0, 1),
        "stop": st.lists(texts, min_size=1, max_size=3),
        "stream": st.just(True),
        "parallel_tool_calls": st.just(False),
        "tool_choice": st.sampled_from(
            ["auto", "none", "required", {"type": "function", "function": {"name": "tool_a"}}]
        ),
        "tools": st.lists(
            st.builds(
                lambda name, desc, props: {
                    "type": "function",
                    "function": {
                        "name": name,
                        **({"description": desc} if desc else {}),
                        "parameters": {"type": "object", "properties": props},
                    },
                },
                names,
                st.text(max_size=10),
                st.dictionaries(names, st.just({"type": "string"}), max_size=2),
            ),
            min_size=1,
            max_size=3,
        ),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if body.get("tool_choice") == "none":
        body.pop("parallel_tool_calls", None)
    return body


def canonical(body: JSON) -> JSON:
    """Tool call arguments compared as JSON values, not as their spelling; "auto" is
    the tool_choice of a request that names none, on both APIs."""
    out = orjson.loads(orjson.dumps(body))
    if out.get("tool_choice") == "auto":
        del out["tool_choice"]
    for msg in out["messages"]:
        for call in msg.get("tool_calls", ()):
            call["function"]["arguments"] = orjson.loads(call["function"]["arguments"])
    return out


@settings(max_examples=300, deadline=None)
@given(chat_requests())
def test_request_there_and_back_keeps_every_shared_field(body: JSON) -> None:
    req = translate_request({"model": "gpt-route", **body}, MODEL)
    assert req.body["model"] == MODEL
    assert req.dropped == []
    assert canonical(chat_from_anthropic(req.body)) == canonical(body)


# --- what a member's own server (or client) may send ----------------------------------

EVENT_TYPES = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
]
anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["type", "index", "delta", "text", "partial_json", "message", "usage", "error"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=10,
)
events = st.lists(
    st.builds(
        lambda kind, rest: {**rest, "type": kind},
        st.sampled_from(EVENT_TYPES),
        st.dictionaries(
            st.sampled_from(["index", "delta", "content_block", "message", "usage", "error"]),
            anything,
            max_size=3,
        ),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(1, 40), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_stream_of_any_shape_never_raises_and_stays_sse(
    evs: list[JSON], chunk_size: int, line_end: bytes
) -> None:
    body = sse([START, *evs]).replace(b"\n", line_end)
    out, _ = translate_stream(body, chunk_size)
    assert out == translate_stream(body)[0]
    assert out.endswith(b"\n\n")
    for event in out[:-2].split(b"\n\n"):
        assert event.startswith((b"data: ", b": ping"))
        if event.startswith(b"data: {"):
            orjson.loads(event[6:])


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["content", "usage", "stop_reason", "id", "model"]), anything)
)
def test_response_of_any_shape_never_raises(body: JSON) -> None:
    out = translate_response(body)
    assert out["object"] == "chat.completion"
    orjson.dumps(out)


any_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])},
    optional={
        "content": anything
        | st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url", "file", "refusal", "x"])},
                optional={"text": anything, "image_url": anything, "file": anything},
            ),
            max_size=3,
        ),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries(
                        {}, optional={"name": anything, "arguments": anything | st.just('{"a": 1}')}
                    ),
                },
                optional={"id": anything},
            ),
            max_size=2,
        )
        | anything,
        "tool_call_id": anything,
        "thinking_blocks": anything,
        "reasoning_content": anything,
    },
)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "tools",
                "tool_choice",
                "max_tokens",
                "reasoning_effort",
                "response_format",
                "stop",
                "parallel_tool_calls",
                "stream_options",
                "user",
            ]
        ),
        anything,
        max_size=2,
    ),
    st.lists(any_message, min_size=1, max_size=4),
)
def test_request_of_any_shape_is_translated_or_refused(body: JSON, messages: object) -> None:
    try:
        orjson.dumps(translate_request({**body, "messages": messages}, MODEL).body)
    except TranslationError as err:
        assert err.param and err.message


def test_stream_translator_for_request_shares_the_request_notes() -> None:
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 1,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": IMAGE}]}],
    }
    req = translate_request(body, MODEL)
    # The URL alone, as some clients send it, is an image too.
    assert req.body["messages"][0]["content"][0]["source"]["type"] == "base64"
    tr = StreamTranslator.for_request(req)
    out = tr.feed(TOOL_STREAM) + tr.finish()
    assert out.count(b'"usage"') == 1
    assert req.dropped == [
        "seed",
        f"max_tokens not given: {DEFAULT_MAX_TOKENS} sent",
        "thinking signature (stream)",
    ]


# --- against the fake Anthropic provider --------------------------------------------


@contextmanager
def upstream(fake: FakeProvider, scenario: str, body: JSON) -> Iterator[httpx2.Response]:
    """The translated request sent to the fake provider, its answer unread."""
    headers = {
        "x-api-key": ANTHROPIC_SECRET,
        "anthropic-version": "2023-06-01",
        "x-fake-scenario": scenario,
    }
    with (
        httpx2.Client(base_url=fake.url, timeout=10) as client,
        client.stream("POST", "/v1/messages", json=body, headers=headers) as answer,
    ):
        yield answer


def chat_body(stream: bool) -> JSON:
    return sdk_request(
        model="claude-route",
        messages=[{"role": "user", "content": "read the readme"}],
        max_completion_tokens=2000,
        tools=TOOLS[1:],
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )


@pytest.mark.parametrize("scenario", ["normal", "tool_use", "thinking"])
def test_fake_provider_stream_through_the_translator_to_the_sdk(
    fake_provider: FakeProvider, scenario: str
) -> None:
    req = translate_request(chat_body(stream=True), MODEL)
    tr = StreamTranslator.for_request(req)
    with upstream(fake_provider, scenario, req.body) as answer:
        assert answer.status_code == 200
        # As the proxy gets them: each flushed event, split where the socket split it.
        out = b"".join(tr.feed(chunk) for chunk in answer.iter_raw()) + tr.finish()
    with upstream(fake_provider, scenario, {**req.body, "stream": False}) as whole:
        message = orjson.loads(whole.read())
    completion = sdk_stream(out)
    expected = translate_response(message)
    # The stream and the JSON answer agree, as they do at OpenAI.
    assert completion.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert completion.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert completion.usage.model_dump(exclude_none=True) == expected["usage"]
    assert completion.usage.prompt_tokens_details.cached_tokens > 0
    calls = completion.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
        for c in expected["choices"][0]["message"].get("tool_calls", ())
    ]
    assert bool(calls) == (scenario == "tool_use")
    if scenario == "thinking":
        assert expected["choices"][0]["message"]["thinking_blocks"][0]["signature"]
        assert req.dropped == ["thinking signature (stream)"]
        reasoning = expected["choices"][0]["message"]["reasoning_content"]
        assert (completion.choices[0].message.model_extra or {}).get(
            "reasoning_content"
        ) == reasoning


def test_fake_provider_error_event_and_error_answer(fake_provider: FakeProvider) -> None:
    req = translate_request(chat_body(stream=True), MODEL)
    tr = StreamTranslator.for_request(req)
    with upstream(fake_provider, "error_event", req.body) as answer:
        out = b"".join(tr.feed(chunk) for chunk in answer.iter_raw()) + tr.finish()
    with pytest.raises(openai.APIError, match="Overloaded"):
        sdk_stream(out)

    with upstream(fake_provider, "error_529", req.body) as answer:
        status, body = translate_error(answer.status_code, answer.read())
    with pytest.raises(openai.InternalServerError) as caught:
        sdk_client(status, body).chat.completions.create(model="m", messages=CHAT_USER)
    assert caught.value.status_code == 529 and caught.value.code == "overloaded_error"
