"""Checks that tests/fake_provider.py speaks the wire formats the official SDKs accept.

Every test talks to the fake with the real ``anthropic`` / ``openai`` clients (or raw
``http.client`` where the bytes themselves are the point), so a change that breaks SDK
parsing shows up here before it shows up as a confusing gateway test failure.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam
from openai.types.responses import FunctionToolParam

from tests.fake_provider import (
    AGENT_COMMAND,
    ANTHROPIC_CACHE_CREATION_TOKENS,
    ANTHROPIC_CACHE_READ_TOKENS,
    CREATED,
    OPENAI_REASONING_TOKENS,
    TOOL_INPUT,
    TOOL_SCHEMA,
    FakeProvider,
    RecordedRequest,
)

ANTHROPIC_KEY = "sk-ant-test-key-0001"
OPENAI_KEY = "sk-test-openai-key-1234"
MODEL = "claude-sonnet-4-6"
GPT = "gpt-4o"
PROMPT = "hello there, fake provider"
ANSWER = f"You said: {PROMPT}"
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]
READ_FILE_TOOL: dict[str, Any] = {
    "name": "read_file",
    "description": "Read a file",
    "input_schema": TOOL_SCHEMA,
}
CHAT_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file",
        "parameters": READ_FILE_TOOL["input_schema"],
    },
}
RESPONSES_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "read_file",
    "description": "Read a file",
    "parameters": READ_FILE_TOOL["input_schema"],
    "strict": False,
}


def scenario(name: str, **extra: str) -> dict[str, str]:
    return {"x-fake-scenario": name, **extra}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider({ANTHROPIC_KEY, OPENAI_KEY}).start()
    yield provider
    provider.stop()


@pytest.fixture
def claude(fake: FakeProvider) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake.url, api_key=ANTHROPIC_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def gpt(fake: FakeProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.openai_url, api_key=OPENAI_KEY, max_retries=0) as client:
        yield client


def raw_post(
    fake: FakeProvider, path: str, body: bytes | dict[str, Any], headers: dict[str, str]
) -> tuple[http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request(
        "POST", path, body=data, headers={"content-type": "application/json", **headers}
    )
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response, payload


def wait_for(predicate: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def record_of(fake: FakeProvider, request_id: str) -> RecordedRequest:
    return next(record for record in fake.requests if record.id == request_id)


# --------------------------------------------------------------------------- Anthropic


def test_messages_create(claude: anthropic.Anthropic, fake: FakeProvider) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert message.id.startswith("msg_01")
    assert message.model == MODEL
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text == ANSWER
    usage = message.usage
    assert usage.input_tokens > 0
    assert usage.output_tokens == len(ANSWER.split())
    assert usage.cache_read_input_tokens == ANTHROPIC_CACHE_READ_TOKENS
    assert usage.cache_creation_input_tokens == ANTHROPIC_CACHE_CREATION_TOKENS
    assert message._request_id is not None
    assert message._request_id.startswith("req_")
    record = fake.requests[-1]
    assert record.path == "/v1/messages"
    # anthropic>=2 sends the API key as a Bearer token, not as x-api-key.
    assert record.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert "anthropic-version" in record.headers
    assert record.json()["messages"] == MESSAGES


def test_messages_stream_matches_create(claude: anthropic.Anthropic) -> None:
    created = claude.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    with claude.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(texts) > 1
    assert "".join(texts) == ANSWER
    assert final.model_dump() == created.model_dump()
    again = claude.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert again.model_dump() == created.model_dump()


def test_messages_raw_stream_events(claude: anthropic.Anthropic) -> None:
    stream = claude.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES, stream=True)
    types = [event.type for event in stream]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert types.count("content_block_delta") == len(ANSWER.split())


def test_messages_wire_bytes(fake: FakeProvider) -> None:
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "max_tokens": 8, "messages": MESSAGES, "stream": True}
    response, payload = raw_post(fake, "/v1/messages?beta=true", body, headers)
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    assert response.getheader("cache-control") == "no-cache"
    assert response.getheader("transfer-encoding") == "chunked"
    assert (response.getheader("request-id") or "").startswith("req_")
    assert response.getheader("anthropic-organization-id")
    assert response.getheader("anthropic-ratelimit-requests-limit") == "4000"
    assert response.getheader("anthropic-ratelimit-requests-remaining") == "3999"
    assert response.getheader("anthropic-ratelimit-tokens-limit")
    text = payload.decode()
    assert text.startswith('event: message_start\ndata: {"type":"message_start","message":{')
    assert '\n\nevent: ping\ndata: {"type": "ping"}\n\n' in text
    assert text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    record = fake.requests[-1]
    assert record.query == "beta=true"
    assert record.id == response.getheader("x-fake-request-id")
    assert wait_for(lambda: record.finished_at is not None)
    assert record.closed_at is None


def test_messages_tool_use(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": MESSAGES,
        "tools": [READ_FILE_TOOL],
        "extra_headers": scenario("tool_use"),
    }
    with claude.messages.stream(**kwargs) as stream:
        json_pieces = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert len([piece for piece in json_pieces if piece]) > 1
    assert final.stop_reason == "tool_use"
    assert [block.type for block in final.content] == ["text", "tool_use"]
    tool = final.content[1]
    assert tool.type == "tool_use"
    assert tool.name == "read_file"
    assert tool.id.startswith("toolu_01")
    assert tool.input == TOOL_INPUT
    created = claude.messages.create(**kwargs)
    assert created.model_dump() == final.model_dump()


async def test_messages_thinking_async(fake: FakeProvider) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=fake.url, api_key=ANTHROPIC_KEY, max_retries=0
    ) as client:
        async with client.messages.stream(
            model=MODEL, max_tokens=64, messages=MESSAGES, extra_headers=scenario("thinking")
        ) as stream:
            final = await stream.get_final_message()
        created = await client.messages.create(
            model=MODEL, max_tokens=64, messages=MESSAGES, extra_headers=scenario("thinking")
        )
    assert [block.type for block in final.content] == ["thinking", "text"]
    thinking = final.content[0]
    assert thinking.type == "thinking"
    assert thinking.thinking
    assert thinking.signature
    assert final.content[1].type == "text"
    assert final.content[1].text == ANSWER
    assert created.model_dump() == final.model_dump()


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    count = claude.messages.count_tokens(model=MODEL, messages=MESSAGES)
    message = claude.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    assert count.input_tokens == message.usage.input_tokens > 0


def test_models_list_both_formats(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    claude_models = list(claude.models.list())
    assert claude_models
    assert all(model.type == "model" and model.display_name for model in claude_models)
    gpt_models = list(gpt.models.list())
    assert gpt_models
    assert all(model.object == "model" and model.owned_by for model in gpt_models)
    assert gpt.models.retrieve(GPT).id == GPT


@pytest.mark.parametrize(
    ("name", "status", "error_type"),
    [
        ("error_529", 529, anthropic.InternalServerError),
        ("error_429", 429, anthropic.RateLimitError),
        ("error_500", 500, anthropic.InternalServerError),
    ],
)
def test_anthropic_status_errors(
    claude: anthropic.Anthropic, name: str, status: int, error_type: type[Exception]
) -> None:
    with pytest.raises(error_type) as caught:
        claude.messages.create(
            model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers=scenario(name)
        )
    error = caught.value
    assert isinstance(error, anthropic.APIStatusError)
    assert error.status_code == status
    assert error.request_id is not None
    assert error.request_id.startswith("req_")
    body = error.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["request_id"] == error.request_id
    if status != 500:
        assert error.response.headers["retry-after"] == ("1" if status == 529 else "2")


def test_anthropic_error_event(claude: anthropic.Anthropic) -> None:
    seen: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        claude.messages.stream(
            model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers=scenario("error_event")
        ) as stream,
    ):
        seen.extend(event.type for event in stream)
    assert "content_block_delta" in seen
    error = caught.value
    # An in-band error keeps the HTTP status of the stream: 200, not 529.
    assert error.status_code == 200
    assert error.type == "overloaded_error"
    assert error.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


def test_anthropic_reset(claude: anthropic.Anthropic) -> None:
    # Mid-stream, the anthropic SDK does not wrap transport errors: the raw httpx2
    # ReadError ("Connection reset by peer") reaches the caller.
    seen: list[str] = []
    with (
        pytest.raises(httpx2.TransportError),
        claude.messages.stream(
            model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers=scenario("reset")
        ) as stream,
    ):
        seen.extend(event.type for event in stream)
    assert "content_block_delta" in seen


def test_anthropic_wrong_key(fake: FakeProvider) -> None:
    with (
        anthropic.Anthropic(base_url=fake.url, api_key="sk-ant-wrong", max_retries=0) as client,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        "request_id": caught.value.request_id,
    }


# --------------------------------------------------------------------------- OpenAI chat


def test_chat_create(gpt: openai.OpenAI) -> None:
    completion = gpt.chat.completions.create(model=GPT, messages=MESSAGES)
    assert completion.id.startswith("chatcmpl-")
    assert completion.created == CREATED
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == len(ANSWER.split()) + OPENAI_REASONING_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens // 2
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == OPENAI_REASONING_TOKENS
    again = gpt.chat.completions.create(model=GPT, messages=MESSAGES)
    assert again.model_dump() == completion.model_dump()


def test_chat_stream_usage_only_when_asked(gpt: openai.OpenAI) -> None:
    plain = list(gpt.chat.completions.create(model=GPT, messages=MESSAGES, stream=True))
    assert all(chunk.usage is None for chunk in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == ANSWER
    assert plain[-1].choices[0].finish_reason == "stop"
    with_usage = list(
        gpt.chat.completions.create(
            model=GPT, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    last = with_usage[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens is not None
    assert last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens_details.reasoning_tokens == OPENAI_REASONING_TOKENS
    assert all(chunk.usage is None for chunk in with_usage[:-1])


def test_chat_wire_bytes(fake: FakeProvider) -> None:
    headers = {"authorization": f"Bearer {OPENAI_KEY}"}
    body = {"model": GPT, "messages": MESSAGES, "stream": True}
    response, payload = raw_post(fake, "/v1/chat/completions", body, headers)
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    assert (response.getheader("x-request-id") or "").startswith("req_")
    text = payload.decode()
    assert text.startswith('data: {"id":"chatcmpl-')
    assert text.endswith("}\n\ndata: [DONE]\n\n")
    assert "event:" not in text


def test_chat_tool_calls(gpt: openai.OpenAI) -> None:
    with gpt.chat.completions.stream(
        model=GPT, messages=MESSAGES, tools=[CHAT_TOOL], extra_headers=scenario("tool_use")
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll read the file."
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "read_file"
    assert json.loads(call.function.arguments) == TOOL_INPUT
    created = gpt.chat.completions.create(
        model=GPT, messages=MESSAGES, tools=[CHAT_TOOL], extra_headers=scenario("tool_use")
    )
    created_calls = created.choices[0].message.tool_calls
    assert created_calls is not None
    assert created_calls[0].type == "function"
    assert created_calls[0].id == call.id
    assert created_calls[0].function.arguments == call.function.arguments


async def test_chat_async_stream(fake: FakeProvider) -> None:
    async with (
        openai.AsyncOpenAI(base_url=fake.openai_url, api_key=OPENAI_KEY, max_retries=0) as client,
        client.chat.completions.stream(
            model=GPT, messages=MESSAGES, stream_options={"include_usage": True}
        ) as stream,
    ):
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == ANSWER
    assert final.usage is not None
    assert final.usage.total_tokens > 0


def test_chat_error_event(gpt: openai.OpenAI) -> None:
    chunks: list[Any] = []
    stream = gpt.chat.completions.create(
        model=GPT, messages=MESSAGES, stream=True, extra_headers=scenario("error_event")
    )
    with pytest.raises(openai.APIError) as caught:
        chunks.extend(stream)
    assert chunks
    # A plain APIError: neither APIStatusError nor APIConnectionError.
    assert not isinstance(caught.value, openai.APIStatusError | openai.APIConnectionError)
    assert caught.value.type == "server_error"


def test_chat_reset(gpt: openai.OpenAI) -> None:
    chunks: list[Any] = []
    stream = gpt.chat.completions.create(
        model=GPT, messages=MESSAGES, stream=True, extra_headers=scenario("reset")
    )
    with pytest.raises(openai.APIConnectionError):
        chunks.extend(stream)
    assert chunks


@pytest.mark.parametrize(
    ("name", "status", "error_type"),
    [
        ("error_529", 503, openai.InternalServerError),
        ("error_429", 429, openai.RateLimitError),
        ("error_500", 500, openai.InternalServerError),
    ],
)
def test_openai_status_errors(
    gpt: openai.OpenAI, name: str, status: int, error_type: type[Exception]
) -> None:
    with pytest.raises(error_type) as caught:
        gpt.chat.completions.create(model=GPT, messages=MESSAGES, extra_headers=scenario(name))
    error = caught.value
    assert isinstance(error, openai.APIStatusError)
    assert error.status_code == status
    assert error.request_id is not None
    assert error.request_id.startswith("req_")
    if status == 429:
        assert error.code == "rate_limit_exceeded"
        assert error.response.headers["retry-after"] == "2"
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_openai_wrong_key_is_masked(fake: FakeProvider) -> None:
    wrong = "sk-wrong-secret-key-9876"
    with (
        openai.OpenAI(base_url=fake.openai_url, api_key=wrong, max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        client.chat.completions.create(model=GPT, messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"
    assert wrong not in str(caught.value)
    assert "sk-wr" in caught.value.message
    assert "9876" in caught.value.message


def test_invalid_json_is_rejected(fake: FakeProvider) -> None:
    response, payload = raw_post(
        fake, "/v1/chat/completions", b"{not json", {"authorization": f"Bearer {OPENAI_KEY}"}
    )
    assert response.status == 400
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    response, payload = raw_post(fake, "/v1/messages", b"[1, 2]", {"x-api-key": ANTHROPIC_KEY})
    assert response.status == 400
    error = json.loads(payload)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"


def test_unknown_scenario_is_rejected(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers=scenario("typo")
        )


# --------------------------------------------------------------------------- OpenAI Responses


def test_responses_create_and_stream(gpt: openai.OpenAI) -> None:
    created = gpt.responses.create(model=GPT, input=PROMPT)
    assert created.id.startswith("resp_")
    assert created.status == "completed"
    assert created.output_text == ANSWER
    usage = created.usage
    assert usage is not None
    assert usage.input_tokens_details.cached_tokens == usage.input_tokens // 2
    assert usage.output_tokens_details.reasoning_tokens == OPENAI_REASONING_TOKENS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    with gpt.responses.stream(model=GPT, input=PROMPT) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert final.output_text == ANSWER
    assert final.id == created.id
    assert final.usage == created.usage


def test_responses_tool_call(gpt: openai.OpenAI) -> None:
    with gpt.responses.stream(
        model=GPT, input=PROMPT, tools=[RESPONSES_TOOL], extra_headers=scenario("tool_use")
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 1
    assert calls[0].name == "read_file"
    assert calls[0].call_id.startswith("call_")
    assert json.loads(calls[0].arguments) == TOOL_INPUT
    assert final.output_text == "I'll read the file."


BASH_TOOL: dict[str, Any] = {
    "name": "Bash",
    "description": "Run a shell command",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
        "required": ["command"],
    },
}
EXEC_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "exec_command",
    "description": "Run a shell command",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    "strict": False,
}


def test_agent_anthropic_calls_bash_then_reports_its_result(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "tools": [READ_FILE_TOOL, BASH_TOOL],
    }
    command = "echo marker-1 > out.txt"
    headers = scenario("agent", **{"x-fake-command": command})
    with claude.messages.stream(messages=MESSAGES, extra_headers=headers, **kwargs) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.name == "Bash"
    assert call.input == {"command": command, "description": "Run the command"}
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "marker-1\n"}
    turns: list[Any] = [
        *MESSAGES,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [result]},
    ]
    second = claude.messages.create(messages=turns, extra_headers=headers, **kwargs)
    assert second.stop_reason == "end_turn"
    assert [block.type for block in second.content] == ["text"]
    assert second.content[0].type == "text" and second.content[0].text == "Tool said: marker-1"
    # No shell tool offered: a plain answer.
    plain = claude.messages.create(
        model=MODEL, max_tokens=64, messages=MESSAGES, extra_headers=scenario("agent")
    )
    assert plain.stop_reason == "end_turn" and plain.content[0].type == "text"


def test_agent_responses_calls_exec_command_then_reports_its_result(gpt: openai.OpenAI) -> None:
    with gpt.responses.stream(
        model=GPT, input=PROMPT, tools=[EXEC_TOOL], extra_headers=scenario("agent")
    ) as stream:
        first = stream.get_final_response()
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("exec_command", {"cmd": AGENT_COMMAND})
    ]
    output = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "tvgate-ok"}
    second = gpt.responses.create(
        model=GPT,
        input=[{"role": "user", "content": PROMPT}, calls[0].model_dump(), output],  # type: ignore[list-item]
        tools=[EXEC_TOOL],
        extra_headers=scenario("agent"),
    )
    assert [item.type for item in second.output] == ["message"]
    assert second.output_text == "Tool said: tvgate-ok"


async def test_responses_async(fake: FakeProvider) -> None:
    async with openai.AsyncOpenAI(
        base_url=fake.openai_url, api_key=OPENAI_KEY, max_retries=0
    ) as client:
        async with client.responses.stream(model=GPT, input=PROMPT) as stream:
            final = await stream.get_final_response()
        created = await client.responses.create(model=GPT, input=PROMPT)
    assert final.output_text == created.output_text == ANSWER


def test_responses_error_event_nested_raises(gpt: openai.OpenAI) -> None:
    seen: list[str] = []
    with (
        pytest.raises(openai.APIError) as caught,
        gpt.responses.stream(
            model=GPT, input=PROMPT, extra_headers=scenario("error_event")
        ) as stream,
    ):
        seen.extend(event.type for event in stream)
    assert "response.output_text.delta" in seen
    assert not isinstance(caught.value, openai.APIStatusError)
    assert caught.value.code == "server_error"


@pytest.mark.parametrize(("style", "last"), [("flat", "error"), ("failed", "response.failed")])
def test_responses_error_event_other_styles_do_not_raise(
    gpt: openai.OpenAI, style: str, last: str
) -> None:
    headers = scenario("error_event", **{"x-fake-error-style": style})
    with gpt.responses.stream(model=GPT, input=PROMPT, extra_headers=headers) as stream:
        events = list(stream)
        assert events[-1].type == last
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            stream.get_final_response()


# --------------------------------------------------------------------------- embeddings, legacy


def test_embeddings_default_base64_and_float(gpt: openai.OpenAI, fake: FakeProvider) -> None:
    default = gpt.embeddings.create(model="text-embedding-3-small", input=["one", "two words"])
    assert fake.requests[-1].json()["encoding_format"] == "base64"
    assert [len(item.embedding) for item in default.data] == [1536, 1536]
    assert all(isinstance(value, float) for value in default.data[0].embedding)
    floats = gpt.embeddings.create(
        model="text-embedding-3-small", input=["one", "two words"], encoding_format="float"
    )
    assert [item.embedding for item in floats.data] == [item.embedding for item in default.data]
    assert floats.usage.prompt_tokens == 3
    small = gpt.embeddings.create(model="text-embedding-3-small", input="x", dimensions=8)
    assert len(small.data[0].embedding) == 8
    raw = gpt.embeddings.create(
        model="text-embedding-3-small", input="x", dimensions=8, encoding_format="base64"
    )
    encoded = raw.data[0].embedding
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == small.data[0].embedding


def test_legacy_completions(gpt: openai.OpenAI) -> None:
    completion = gpt.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT)
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text == ANSWER
    assert completion.usage is not None
    chunks = list(
        gpt.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == ANSWER
    assert chunks[-1].usage == completion.usage
    assert {chunk.id for chunk in chunks} == {completion.id}


# --------------------------------------------------------------------------- timing scenarios


def test_wait_closed_when_client_leaves_mid_drip(fake: FakeProvider) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    body = {"model": MODEL, "max_tokens": 8, "messages": MESSAGES, "stream": True}
    headers = {
        "x-api-key": ANTHROPIC_KEY,
        "content-type": "application/json",
        **scenario("drip", **{"x-fake-interval": "0.1", "x-fake-events": "50"}),
    }
    connection.request("POST", "/v1/messages", body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    request_id = response.getheader("x-fake-request-id") or ""
    first = response.read1(65536)
    assert first.startswith(b"event: message_start")
    assert fake.wait_closed(request_id, 0.05) is None
    closed_by_client = time.monotonic()
    connection.close()
    closed_at = fake.wait_closed(request_id, 2)
    assert closed_at is not None
    assert closed_at >= closed_by_client
    record = record_of(fake, request_id)
    assert record.closed_at == closed_at
    assert record.finished_at is None


async def test_concurrent_drips(fake: FakeProvider) -> None:
    headers = scenario("drip", **{"x-fake-interval": "0.05", "x-fake-events": "6"})
    async with anthropic.AsyncAnthropic(
        base_url=fake.url, api_key=ANTHROPIC_KEY, max_retries=0
    ) as client:

        async def one() -> list[str]:
            async with client.messages.stream(
                model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers=headers
            ) as stream:
                return [text async for text in stream.text_stream]

        started = time.monotonic()
        results = await asyncio.gather(*(one() for _ in range(20)))
        elapsed = time.monotonic() - started
    assert all(result == [f"drip {i}/6 " for i in range(1, 7)] for result in results)
    assert 0.3 <= elapsed < 2.0


def test_hang_then_answer_and_client_timeout(fake: FakeProvider) -> None:
    headers = scenario("hang", **{"x-fake-hang": "0.3"})
    with anthropic.Anthropic(base_url=fake.url, api_key=ANTHROPIC_KEY, max_retries=0) as client:
        started = time.monotonic()
        message = client.messages.create(
            model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers=headers
        )
        assert time.monotonic() - started >= 0.3
        assert message.content[0].type == "text"
        assert message.content[0].text == ANSWER
        with pytest.raises(anthropic.APITimeoutError):
            client.messages.create(
                model=MODEL,
                max_tokens=8,
                messages=MESSAGES,
                extra_headers=scenario("hang", **{"x-fake-hang": "5"}),
                timeout=0.2,
            )
    request_id = fake.requests[-1].id
    assert fake.wait_closed(request_id, 2) is not None


def test_clear(fake: FakeProvider, claude: anthropic.Anthropic) -> None:
    claude.models.list()
    assert fake.requests
    fake.clear()
    assert fake.requests == []
