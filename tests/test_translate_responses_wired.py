"""OpenAI Responses clients (what Codex speaks) on routes of another API, through the gateway.

The client is the official ``openai`` SDK with retries off, reading streams with its own
accumulator (``client.responses.stream(...).get_final_response()``); the provider is the
fake one, speaking each API's real wire format. Each test has an org of its own
(``tests.test_translate_wired``'s fixtures): the route ``claude`` goes to Anthropic; the
route ``local`` (the ``local_secret`` fixture) to a key marked ``chat_only``, an
OpenAI-compatible server without the Responses API (vLLM, Ollama), which gets Chat
Completions.
"""

# ruff: noqa: F811 - the fixtures imported below are the tests' parameters

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.responses import FunctionToolParam, Response, ResponseInputItemParam

from tests.conftest import add_fake_key
from tests.fake_provider import TOOL_INPUT, TOOL_PREAMBLE, FakeProvider
from tests.harness import RunningGateway, fake_scenario
from tests.test_translate_wired import TOOLS as MESSAGES_TOOLS

# The gateway and org fixtures are tests.test_translate_wired's, used by name.
from tests.test_translate_wired import (  # noqa: F401
    Org,
    anthropic_request,
    assert_anthropic_figures,
    chat_client,
    gateway,
    org,
    sent_with,
    trace_of,
)
from tvgate import services

TOOLS: list[FunctionToolParam] = [
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file",
        "parameters": dict(MESSAGES_TOOLS[0]["input_schema"]),
        "strict": False,
    }
]
#: The fake OpenAI provider's messages (Chat Completions) and Anthropic's, as the client
#: must get them: (route, in-band error mid-stream, 429 answer).
MESSAGES = {
    "claude": ("Overloaded", "would exceed the rate limit"),
    "local": (
        "The server had an error while processing your request. Sorry about that!",
        "Rate limit reached for requests",
    ),
}
#: What Codex sends beside its input: no stored state, reasoning sent back sealed.
CODEX_FIELDS: dict[str, Any] = {
    "store": False,
    "include": ["reasoning.encrypted_content"],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
}

#: A tool loop's second turn: the call, and its result.
TOOL_LOOP: list[ResponseInputItemParam] = [
    {"type": "message", "role": "user", "content": "read the readme"},
    {
        "type": "function_call",
        "call_id": "call_1",
        "name": "read_file",
        "arguments": json.dumps(TOOL_INPUT),
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "# tvgate"},
]


def streamed_tool_call(gateway: RunningGateway, org: Org, route: str, model: str) -> Response:
    """A Codex-like streamed call on ``route`` that the fake answers with text and a tool
    call, read by the SDK's accumulator; the final Response, checked."""
    with chat_client(gateway, org).responses.stream(
        model=route,
        instructions="be brief",
        input="read the readme",
        tools=TOOLS,
        max_output_tokens=200,
        **CODEX_FIELDS,
        **fake_scenario("tool_use"),
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        response = stream.get_final_response()
    assert response.status == "completed" and response.model == model
    message, call = response.output
    assert message.type == "message" and response.output_text == TOOL_PREAMBLE
    assert call.type == "function_call" and call.name == "read_file"
    assert json.loads(call.arguments) == TOOL_INPUT
    # The arguments came in pieces, as the upstream streamed them.
    assert len(deltas) > 1 and "".join(deltas) == call.arguments
    assert response.usage is not None and response.usage.output_tokens > 0
    return response


def test_responses_stream_with_a_tool_call_on_an_anthropic_route(
    gateway: RunningGateway,
    fake_provider: FakeProvider,
    org: Org,
) -> None:
    response = streamed_tool_call(gateway, org, "claude", "claude-upstream-9")

    body = anthropic_request(fake_provider, org)
    assert body["system"] == [{"type": "text", "text": "be brief"}]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "read the readme"}]}
    ]
    assert body["max_tokens"] == 200 and body["stream"] is True
    assert body["tools"][0]["name"] == "read_file"
    assert body["tools"][0]["input_schema"] == TOOLS[0]["parameters"]

    trace, detail = trace_of(gateway, org)
    assert (trace.provider, trace.endpoint) == ("anthropic", "openai.responses")
    assert (trace.route_name, trace.upstream_model) == ("claude", "claude-upstream-9")
    assert (trace.status_code, trace.outcome) == (200, "ok")
    assert response.usage is not None
    assert_anthropic_figures(trace, response.usage.input_tokens, response.usage.output_tokens)
    # The client's request as it sent it, the answer as it got it (a Response).
    assert detail["request"]["model"] == "claude"
    assert detail["request"]["input"] == "read the readme"
    answer = detail["response"]
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert [item["type"] for item in answer["output"]] == ["message", "function_call"]
    assert json.loads(answer["output"][1]["arguments"]) == TOOL_INPUT
    anomalies = json.loads(trace.anomalies)
    assert "translated: openai.responses on anthropic.messages" in anomalies
    assert "translation dropped: prompt_cache_key" not in anomalies


def test_responses_create_and_a_tool_result_turn_on_an_anthropic_route(
    gateway: RunningGateway,
    fake_provider: FakeProvider,
    org: Org,
) -> None:
    client = chat_client(gateway, org)
    response = client.responses.create(
        model="claude",
        input=TOOL_LOOP,
        tools=TOOLS,
        max_output_tokens=100,
        metadata={"run": "1"},
        **fake_scenario("agent"),
    )
    assert response.object == "response" and response.status == "completed"
    # The agent scenario answers a tool result with it: it reached Anthropic as one.
    assert response.output_text == "Tool said: # tvgate"
    assert response.usage is not None and response.usage.input_tokens > 0
    turns = anthropic_request(fake_provider, org)["messages"]
    assert [turn["role"] for turn in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "read_file", "input": TOOL_INPUT}
    ]
    assert turns[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "# tvgate"}
    ]
    trace, detail = trace_of(gateway, org)
    assert (trace.endpoint, trace.provider, trace.stream) == ("openai.responses", "anthropic", 0)
    assert trace.input_tokens > 0 and trace.output_tokens > 0
    assert detail["response"]["output"][0]["content"][0]["text"] == response.output_text
    assert "translation dropped: metadata" in json.loads(trace.anomalies)


@pytest.fixture
def local_secret(gateway: RunningGateway, fake_provider: FakeProvider, org: Org) -> str:
    """The org's route ``local``: a key on an upstream that serves Chat Completions only."""
    gateway.bind()
    secret = add_fake_key(
        fake_provider, org.name, "vllm", fake_provider.openai_url, "openai", chat_only=True
    )
    services.add_route("local", "vllm", model="qwen-upstream-9", org_name=org.name)
    return secret


def test_responses_stream_with_a_tool_call_on_a_chat_only_upstream(
    gateway: RunningGateway, fake_provider: FakeProvider, org: Org, local_secret: str
) -> None:
    response = streamed_tool_call(gateway, org, "local", "qwen-upstream-9")
    (sent,) = sent_with(fake_provider, local_secret)
    assert sent.path == "/v1/chat/completions"
    body = sent.json()
    assert body["model"] == "qwen-upstream-9"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "read the readme"},
    ]
    assert body["max_tokens"] == 200
    assert body["stream_options"] == {"include_usage": True}
    assert body["tools"][0]["function"]["name"] == "read_file"

    trace, detail = trace_of(gateway, org)
    assert (trace.provider, trace.endpoint) == ("openai", "openai.responses")
    assert (trace.route_name, trace.upstream_model) == ("local", "qwen-upstream-9")
    assert (trace.status_code, trace.outcome) == (200, "ok")
    # The upstream's own figures, which the client got as they came.
    assert response.usage is not None
    assert trace.input_tokens == response.usage.input_tokens
    assert trace.output_tokens == response.usage.output_tokens
    assert detail["request"]["input"] == "read the readme"
    answer = detail["response"]
    assert answer["object"] == "response"
    assert [item["type"] for item in answer["output"]] == ["message", "function_call"]
    anomalies = json.loads(trace.anomalies)
    assert "translated: openai.responses on openai.chat" in anomalies
    assert (
        "translation dropped: include: reasoning.encrypted_content (the upstream gives none)"
        in (anomalies)
    )


def test_responses_create_with_a_tool_result_on_a_chat_only_upstream(
    gateway: RunningGateway, fake_provider: FakeProvider, org: Org, local_secret: str
) -> None:
    response = chat_client(gateway, org).responses.create(
        model="local",
        input=TOOL_LOOP,
        tools=TOOLS,
        **fake_scenario("agent"),
    )
    assert response.status == "completed"
    assert response.output_text == "Tool said: # tvgate"
    (sent,) = sent_with(fake_provider, local_secret)
    messages = sent.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == "call_1"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "# tvgate"}
    trace, detail = trace_of(gateway, org)
    assert (trace.endpoint, trace.provider, trace.stream) == ("openai.responses", "openai", 0)
    assert trace.input_tokens > 0 and trace.output_tokens > 0
    assert detail["response"]["output"][0]["content"][0]["text"] == response.output_text


@pytest.mark.parametrize("route", ["claude", "local"])
def test_an_error_mid_stream_ends_the_stream_with_response_failed(
    gateway: RunningGateway, org: Org, local_secret: str, route: str
) -> None:
    with chat_client(gateway, org).responses.stream(
        model=route, input="read the readme", **fake_scenario("error_event")
    ) as stream:
        events = list(stream)
    # Responses' own in-band failure, which Codex reads the error off: the provider's kept.
    assert events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == MESSAGES[route][0]
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    trace, _ = trace_of(gateway, org)
    assert (trace.endpoint, trace.outcome) == ("openai.responses", "upstream_error")
    assert MESSAGES[route][0] in trace.error_message


@pytest.mark.parametrize("route", ["claude", "local"])
def test_a_provider_error_answer_is_in_openais_envelope_with_its_message(
    gateway: RunningGateway, org: Org, local_secret: str, route: str
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        chat_client(gateway, org).responses.create(
            model=route, input="hi", **fake_scenario("error_429")
        )
    assert MESSAGES[route][1] in caught.value.message
    trace, _ = trace_of(gateway, org)
    assert (trace.status_code, trace.endpoint) == (429, "openai.responses")


def test_an_anthropic_overload_keeps_its_status_message_and_type(
    gateway: RunningGateway, org: Org
) -> None:
    with pytest.raises(openai.APIStatusError) as overloaded:
        chat_client(gateway, org).responses.create(
            model="claude", input="hi", stream=True, **fake_scenario("error_529")
        )
    assert overloaded.value.status_code == 529
    assert overloaded.value.body == {  # OpenAI's envelope, Anthropic's message and type
        "message": "Overloaded",
        "type": "overloaded_error",
        "param": None,
        "code": "overloaded_error",
    }


@pytest.mark.parametrize("route", ["claude", "local"])
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0]"),
    ],
)
def test_a_field_the_route_cannot_express_is_a_400_naming_it(
    gateway: RunningGateway,
    fake_provider: FakeProvider,
    org: Org,
    local_secret: str,
    route: str,
    fields: dict[str, Any],
    named: str,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat_client(gateway, org).responses.create(model=route, input="hi", extra_body=fields)
    assert named in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    # Refused before any provider was called.
    assert sent_with(fake_provider, org.anthropic_secret) == []
    assert sent_with(fake_provider, local_secret) == []
    trace, _ = trace_of(gateway, org)
    assert (trace.status_code, trace.outcome) == (400, "rejected")


def test_chat_only_off_passes_responses_through_and_translation_off_refuses(
    gateway: RunningGateway, fake_provider: FakeProvider, org: Org, local_secret: str
) -> None:
    client = chat_client(gateway, org)
    done = gateway.cli("keys", "set", "vllm", "--org", org.name, "--chat-only", "off")
    assert done.returncode == 0, done.stderr
    assert "upstream APIs: all of openai's" in done.stdout
    response = client.responses.create(model="local", input="hi")
    assert response.output_text == "You said: hi"
    (sent,) = sent_with(fake_provider, local_secret)
    assert sent.path == "/v1/responses"  # passthrough: the client's own API

    done = gateway.cli("keys", "set", "vllm", "--org", org.name, "--chat-only", "on")
    assert done.returncode == 0, done.stderr
    assert "Chat Completions only" in done.stdout
    done = gateway.cli("routes", "update", "local", "--org", org.name, "--translate", "off")
    assert done.returncode == 0, done.stderr
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="local", input="hi")
    assert "serves only Chat Completions" in caught.value.message
    assert "translation is off" in caught.value.message
    # Chat Completions clients pass through as ever.
    completion = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "You said: hi"
    assert [r.path for r in sent_with(fake_provider, local_secret)] == [
        "/v1/responses",
        "/v1/chat/completions",
    ]
