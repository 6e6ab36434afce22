"""Translation wired into the proxy: a client of one API on a route of the other provider.

The clients are the official SDKs with retries off (so whatever they get is what tvgate
sent), parsing through their own accumulators; the provider is the fake one, speaking
each API's real wire format. Each test has an org of its own with an Anthropic route
(``claude``) and an OpenAI Chat route (``gpt``), both keys on the fake provider.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import MessageParam, ToolParam
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.conftest import add_fake_key
from tests.fake_provider import (
    ANTHROPIC_CACHE_CREATION_TOKENS,
    ANTHROPIC_CACHE_READ_TOKENS,
    CHAT_REASONING,
    TOOL_INPUT,
    TOOL_PREAMBLE,
    TOOL_SCHEMA,
    FakeProvider,
    RecordedRequest,
)
from tests.harness import RunningGateway, fake_scenario
from tests.inprocess import start_in_process
from tvgate import services
from tvgate.models import Trace, User

_orgs = itertools.count(1)

CHAT_PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "read the readme"},
]
PROMPT: list[MessageParam] = [{"role": "user", "content": "read the readme"}]
CHAT_TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": TOOL_SCHEMA,
        },
    }
]
TOOLS: list[ToolParam] = [
    {
        "name": "read_file",
        "description": "Read a file",
        "input_schema": TOOL_SCHEMA,
    }
]


@dataclass(frozen=True)
class Org:
    name: str
    token: str
    user_id: int
    anthropic_secret: str
    openai_secret: str


@pytest.fixture(scope="module")
def gateway(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    data_dir: Path = tmp_path_factory.mktemp("translate-wired")
    with start_in_process(database_url, data_dir, {}) as gw:
        yield gw


@pytest.fixture
def org(gateway: RunningGateway, fake_provider: FakeProvider) -> Org:
    gateway.bind()
    name = f"tr{next(_orgs)}-{secrets.token_hex(3)}"
    email = f"dev@{name}.test"
    services.add_user(email, name)
    token, _ = services.issue_token(email, name)
    anthropic_secret = add_fake_key(fake_provider, name, "ant", fake_provider.url, "anthropic")
    openai_secret = add_fake_key(fake_provider, name, "oai", fake_provider.openai_url, "openai")
    services.add_route("claude", "ant", model="claude-upstream-9", org_name=name)
    services.add_route("gpt", "oai", model="gpt-upstream-9", org_name=name)
    return Org(name, token, User.get(User.email == email).id, anthropic_secret, openai_secret)


def chat_client(gateway: RunningGateway, org: Org) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_url, api_key=org.token, max_retries=0)


def messages_client(gateway: RunningGateway, org: Org) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=org.token, max_retries=0)


def sent_with(fake: FakeProvider, secret: str) -> list[RecordedRequest]:
    """The requests the fake provider got with ``secret`` (a key of the test's own org)."""
    return [
        r
        for r in fake.requests
        if r.headers.get("x-api-key") == secret
        or r.headers.get("authorization") == f"Bearer {secret}"
    ]


def upstream_request(fake: FakeProvider, secret: str) -> RecordedRequest:
    (request,) = sent_with(fake, secret)
    return request


def anthropic_request(fake: FakeProvider, org: Org) -> dict[str, Any]:
    """The body of the org's one request to its Anthropic route (``claude``), which went
    to Messages as the route says, with the API version Anthropic requires."""
    sent = upstream_request(fake, org.anthropic_secret)
    assert sent.path == "/v1/messages"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    body: dict[str, Any] = sent.json()
    assert body["model"] == "claude-upstream-9"
    return body


def trace_of(gateway: RunningGateway, org: Org) -> tuple[Trace, dict[str, Any]]:
    """The org's one trace, and its detail (the captured request and answer)."""
    (trace,) = gateway.wait_traces(1, user_id=org.user_id)
    return trace, services.get_trace(trace.id, org_name=org.name)


def assert_anthropic_figures(trace: Trace, client_input: int, client_output: int) -> None:
    """The trace has the fake Anthropic provider's own usage figures, which the client got
    as OpenAI counts them: Anthropic's input_tokens leaves out the cached ones."""
    assert trace.cache_read_tokens == ANTHROPIC_CACHE_READ_TOKENS
    assert trace.cache_write_tokens == ANTHROPIC_CACHE_CREATION_TOKENS
    assert (
        client_input
        == trace.input_tokens + ANTHROPIC_CACHE_READ_TOKENS + ANTHROPIC_CACHE_CREATION_TOKENS
    )
    assert trace.output_tokens == client_output


def test_openai_chat_stream_with_tools_on_an_anthropic_route(
    gateway: RunningGateway, fake_provider: FakeProvider, org: Org
) -> None:
    client = chat_client(gateway, org)
    with client.chat.completions.stream(
        model="claude",
        messages=CHAT_PROMPT,
        tools=CHAT_TOOLS,
        max_tokens=200,
        stream_options={"include_usage": True},
        **fake_scenario("tool_use"),
    ) as stream:
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TOOL_PREAMBLE
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "read_file"
    assert json.loads(call.function.arguments) == TOOL_INPUT
    assert completion.model == "claude-upstream-9"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    body = anthropic_request(fake_provider, org)
    assert body["system"] == [{"type": "text", "text": "be brief"}]
    assert body["tools"][0]["name"] == "read_file"
    assert body["stream"] is True

    trace, detail = trace_of(gateway, org)
    assert (trace.provider, trace.endpoint) == ("anthropic", "openai.chat")
    assert (trace.route_name, trace.upstream_model) == ("claude", "claude-upstream-9")
    assert_anthropic_figures(
        trace, completion.usage.prompt_tokens, completion.usage.completion_tokens
    )
    # The client's request as it sent it, the answer as it got it (OpenAI's format).
    assert detail["request"]["model"] == "claude"
    assert detail["request"]["messages"][0] == {"role": "system", "content": "be brief"}
    answer = detail["response"]
    assert answer["object"] == "chat.completion"
    tool_calls = answer["choices"][0]["message"]["tool_calls"]
    assert json.loads(tool_calls[0]["function"]["arguments"]) == TOOL_INPUT
    assert "translated: openai.chat on anthropic.messages" in json.loads(trace.anomalies)


def test_anthropic_stream_with_tool_use_on_an_openai_chat_route(
    gateway: RunningGateway, fake_provider: FakeProvider, org: Org
) -> None:
    client = messages_client(gateway, org)
    with client.messages.stream(
        model="gpt",
        max_tokens=200,
        system="be brief",
        messages=PROMPT,
        tools=TOOLS,
        metadata={"user_id": "someone"},
        **fake_scenario("tool_use"),
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    text, tool = message.content
    assert text.type == "text" and text.text == TOOL_PREAMBLE
    assert tool.type == "tool_use"
    assert (tool.name, tool.input) == ("read_file", TOOL_INPUT)
    assert message.usage.output_tokens > 0
    sent = upstream_request(fake_provider, org.openai_secret)
    assert sent.path == "/v1/chat/completions"
    body = sent.json()
    assert body["model"] == "gpt-upstream-9"
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["max_completion_tokens"] == 200
    assert body["stream_options"] == {"include_usage": True}

    trace, detail = trace_of(gateway, org)
    assert (trace.provider, trace.endpoint) == ("openai", "anthropic.messages")
    assert trace.upstream_model == "gpt-upstream-9"
    assert trace.input_tokens > 0
    assert trace.output_tokens == message.usage.output_tokens
    assert detail["response"]["type"] == "message"
    assert detail["response"]["content"][1]["input"] == TOOL_INPUT
    anomalies = json.loads(trace.anomalies)
    assert "translated: anthropic.messages on openai.chat" in anomalies
    assert "translation dropped: metadata" in anomalies


def test_non_streaming_both_ways(gateway: RunningGateway, org: Org) -> None:
    completion = chat_client(gateway, org).chat.completions.create(
        model="claude", messages=CHAT_PROMPT, max_completion_tokens=100
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "You said: read the readme"
    assert completion.choices[0].finish_reason == "stop"
    message = messages_client(gateway, org).messages.create(
        model="gpt", max_tokens=100, messages=PROMPT
    )
    assert message.type == "message"
    assert message.content[0].type == "text"
    assert message.content[0].text == "You said: read the readme"
    assert message.stop_reason == "end_turn"
    traces = gateway.wait_traces(2, user_id=org.user_id)
    assert sorted((t.endpoint, t.provider, t.status_code) for t in traces) == [
        ("anthropic.messages", "openai", 200),
        ("openai.chat", "anthropic", 200),
    ]
    assert all(t.input_tokens > 0 and t.output_tokens > 0 for t in traces)


def test_a_translated_json_answer_has_its_length_not_chunks(
    gateway: RunningGateway, org: Org
) -> None:
    """A translated JSON answer is whole before it is sent: it goes with its
    Content-Length, as a passthrough answer does, not chunked (an answer, an error
    answer, both ways)."""
    chat = chat_client(gateway, org).chat.completions.with_raw_response
    messages = messages_client(gateway, org).messages.with_raw_response
    responses = [
        chat.create(model="claude", messages=CHAT_PROMPT, max_completion_tokens=100).http_response,
        messages.create(model="gpt", max_tokens=100, messages=PROMPT).http_response,
    ]
    with pytest.raises(openai.RateLimitError) as chat_error:
        chat.create(model="claude", messages=CHAT_PROMPT, **fake_scenario("error_429"))
    with pytest.raises(anthropic.RateLimitError) as messages_error:
        messages.create(model="gpt", max_tokens=100, messages=PROMPT, **fake_scenario("error_429"))
    responses += [chat_error.value.response, messages_error.value.response]
    assert [r.status_code for r in responses] == [200, 200, 429, 429]
    for response in responses:
        assert "transfer-encoding" not in response.headers
        assert response.headers["content-length"] == str(len(response.content))


def test_an_upstream_error_mid_stream_arrives_as_the_clients_error(
    gateway: RunningGateway, org: Org
) -> None:
    with (
        pytest.raises(openai.APIError) as chat_error,
        chat_client(gateway, org).chat.completions.stream(
            model="claude", messages=CHAT_PROMPT, **fake_scenario("error_event")
        ) as stream,
    ):
        stream.get_final_completion()
    assert "Overloaded" in chat_error.value.message
    with (
        pytest.raises(anthropic.APIStatusError) as messages_error,
        messages_client(gateway, org).messages.stream(
            model="gpt", max_tokens=100, messages=PROMPT, **fake_scenario("error_event")
        ) as mstream,
    ):
        mstream.get_final_message()
    assert "The server had an error while processing your request" in str(messages_error.value)
    traces = gateway.wait_traces(2, user_id=org.user_id)
    assert sorted((t.endpoint, t.outcome) for t in traces) == [
        ("anthropic.messages", "upstream_error"),
        ("openai.chat", "upstream_error"),
    ]
    assert all(t.error_message for t in traces)


def test_an_upstream_error_answer_is_in_the_clients_envelope(
    gateway: RunningGateway, org: Org
) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        messages_client(gateway, org).messages.create(
            model="gpt", max_tokens=100, messages=PROMPT, **fake_scenario("error_429")
        )
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert "Rate limit reached for requests" in caught.value.message
    with pytest.raises(openai.RateLimitError) as chat_caught:
        chat_client(gateway, org).chat.completions.create(
            model="claude", messages=CHAT_PROMPT, **fake_scenario("error_429")
        )
    assert "would exceed the rate limit" in chat_caught.value.message


def test_a_field_the_route_cannot_express_is_a_400_naming_it(
    gateway: RunningGateway, fake_provider: FakeProvider, org: Org
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat_client(gateway, org).chat.completions.create(
            model="claude", messages=CHAT_PROMPT, extra_body={"modalities": ["audio"]}
        )
    assert "modalities" in caught.value.message
    with pytest.raises(anthropic.BadRequestError) as refused:
        messages_client(gateway, org).messages.create(
            model="gpt", max_tokens=100, messages=PROMPT, extra_body={"container": "c1"}
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "container" in refused.value.message
    # Refused before any provider was called.
    assert sent_with(fake_provider, org.anthropic_secret) == []
    assert sent_with(fake_provider, org.openai_secret) == []


def test_translation_off_is_a_400_and_the_route_is_not_listed(
    gateway: RunningGateway, org: Org
) -> None:
    for route in ("claude", "gpt"):
        done = gateway.cli("routes", "update", route, "--org", org.name, "--translate", "off")
        assert done.returncode == 0, done.stderr
        assert "translation off" in done.stdout
    with pytest.raises(openai.BadRequestError) as caught:
        chat_client(gateway, org).chat.completions.create(model="claude", messages=CHAT_PROMPT)
    assert "translation is off" in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as refused:
        messages_client(gateway, org).messages.create(model="gpt", max_tokens=10, messages=PROMPT)
    assert "translation is off" in refused.value.message
    assert [m.id for m in chat_client(gateway, org).models.list()] == ["gpt"]
    assert [m.id for m in messages_client(gateway, org).models.list()] == ["claude"]


def test_models_lists_every_route_in_the_clients_format(gateway: RunningGateway, org: Org) -> None:
    chat_models = chat_client(gateway, org).models.list()
    assert sorted((m.id, m.owned_by) for m in chat_models) == [
        ("claude", "anthropic"),
        ("gpt", "openai"),
    ]
    listed = httpx2.get(
        gateway.url + "/v1/models",
        headers={"x-api-key": org.token, "anthropic-version": "2023-06-01"},
    ).json()
    assert sorted(m["id"] for m in listed["data"]) == ["claude", "gpt"]
    assert {m["type"] for m in listed["data"]} == {"model"}


def test_anthropic_stream_with_thinking_on_an_openai_chat_route(
    gateway: RunningGateway, org: Org
) -> None:
    """An upstream's reasoning (vLLM's ``reasoning_content``) reaches an Anthropic client as
    a thinking block its SDK assembles, before the text, with no signature made up."""
    client = messages_client(gateway, org)
    with client.messages.stream(
        model="gpt",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=PROMPT,
        **fake_scenario("thinking"),
    ) as stream:
        message = stream.get_final_message()
    thinking, text = message.content
    assert thinking.type == "thinking"
    assert thinking.thinking == CHAT_REASONING
    assert thinking.signature == ""
    assert text.type == "text" and text.text
    assert message.stop_reason == "end_turn"
    created = client.messages.create(
        model="gpt",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=PROMPT,
        **fake_scenario("thinking"),
    )
    assert [block.type for block in created.content] == ["thinking", "text"]
    assert created.content[0].thinking == CHAT_REASONING
    traces = gateway.wait_traces(2, user_id=org.user_id)
    assert sorted(t.output_tokens for t in traces) == sorted(
        (message.usage.output_tokens, created.usage.output_tokens)
    )
