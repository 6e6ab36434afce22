"""The official openai SDK through tvgate gets what it gets from the provider directly."""

from __future__ import annotations

import uuid
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import OPENAI_SECRET, GatewayProcess
from tests.fake_provider import FakeProvider
from tests.harness import fake_scenario as headers

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "List the files in this repository"}
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]
RESPONSE_TOOLS = [
    {
        "type": "function",
        "name": "read_file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]


def via_gateway(gateway: GatewayProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_url, api_key=token, max_retries=0)


def direct(fake: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_url, api_key=OPENAI_SECRET, max_retries=0)


@pytest.mark.parametrize("scenario", ["normal", "tool_use"])
def test_chat_create_equals_direct(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str, scenario: str
) -> None:
    kwargs: dict[str, Any] = {"messages": MESSAGES, "tools": TOOLS, **headers(scenario)}
    through = via_gateway(gateway, member_token).chat.completions.create(model="gpt-test", **kwargs)
    expected = direct(fake_provider).chat.completions.create(model="gpt-upstream-1", **kwargs)
    assert through.model_dump() == expected.model_dump()
    assert through.usage is not None and through.usage.total_tokens > 0


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("scenario", ["normal", "tool_use"])
def test_chat_stream_equals_direct(
    gateway: GatewayProcess,
    fake_provider: FakeProvider,
    member_token: str,
    scenario: str,
    include_usage: bool,
) -> None:
    session = uuid.uuid4().hex
    kwargs: dict[str, Any] = {"messages": MESSAGES, "tools": TOOLS}
    if include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    with via_gateway(gateway, member_token).chat.completions.stream(
        model="gpt-test", **kwargs, **headers(scenario, session)
    ) as stream:
        through = stream.get_final_completion()
    with direct(fake_provider).chat.completions.stream(
        model="gpt-upstream-1", **kwargs, **headers(scenario)
    ) as stream:
        expected = stream.get_final_completion()
    assert through.model_dump() == expected.model_dump()
    assert (through.usage is not None) == include_usage
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.stream and trace.outcome == "ok"
    assert trace.endpoint == "openai.chat" and trace.upstream_model == "gpt-upstream-1"
    if include_usage:
        assert through.usage is not None
        assert trace.input_tokens == through.usage.prompt_tokens
        assert trace.output_tokens == through.usage.completion_tokens
    else:
        assert trace.input_tokens == trace.output_tokens == 0


@pytest.mark.parametrize("scenario", ["normal", "tool_use"])
def test_responses_equal_direct(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str, scenario: str
) -> None:
    kwargs: dict[str, Any] = {"input": "Summarise the README", "tools": RESPONSE_TOOLS}
    client = via_gateway(gateway, member_token)
    reference = direct(fake_provider)
    through = client.responses.create(model="gpt-test", **kwargs, **headers(scenario))
    expected = reference.responses.create(model="gpt-upstream-1", **kwargs, **headers(scenario))
    assert through.model_dump() == expected.model_dump()
    with client.responses.stream(model="gpt-test", **kwargs, **headers(scenario)) as stream:
        streamed = stream.get_final_response()
    with reference.responses.stream(
        model="gpt-upstream-1", **kwargs, **headers(scenario)
    ) as stream:
        expected_streamed = stream.get_final_response()
    assert streamed.model_dump() == expected_streamed.model_dump()
    assert streamed.usage is not None and streamed.usage.output_tokens > 0


async def test_async_chat_and_responses(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.openai_url, api_key=member_token, max_retries=0)
    reference = openai.AsyncOpenAI(
        base_url=fake_provider.openai_url, api_key=OPENAI_SECRET, max_retries=0
    )
    async with client.chat.completions.stream(
        model="gpt-test", messages=MESSAGES, stream_options={"include_usage": True}
    ) as stream:
        through = await stream.get_final_completion()
    async with reference.chat.completions.stream(
        model="gpt-upstream-1", messages=MESSAGES, stream_options={"include_usage": True}
    ) as stream:
        expected = await stream.get_final_completion()
    assert through.model_dump() == expected.model_dump()
    response = await client.responses.create(model="gpt-test", input="hello")
    assert (
        response.model_dump()
        == (await reference.responses.create(model="gpt-upstream-1", input="hello")).model_dump()
    )
    await client.close()
    await reference.close()


def test_embeddings_equal_direct(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    through = via_gateway(gateway, member_token).embeddings.create(
        model="embed-test", input=["alpha", "beta"]
    )
    expected = direct(fake_provider).embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"]
    )
    assert through.model_dump() == expected.model_dump()
    assert len(through.data) == 2 and len(through.data[0].embedding) > 0


def test_legacy_completions(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    through = via_gateway(gateway, member_token).completions.create(
        model="gpt-test", prompt="Say hi"
    )
    expected = direct(fake_provider).completions.create(model="gpt-upstream-1", prompt="Say hi")
    assert through.model_dump() == expected.model_dump()


def test_models_list_in_openai_format(gateway: GatewayProcess, member_token: str) -> None:
    models = via_gateway(gateway, member_token).models.list()
    assert [m.id for m in models] == [
        "claude-pass",
        "claude-sonnet",
        "claude-test",
        "embed-test",
        "gpt-test",
    ]
    assert {m.owned_by for m in models} == {"anthropic", "openai"}


def test_429_and_500_pass_through(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    client = via_gateway(gateway, member_token)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, **headers("error_429"))
    assert limited.value.response.headers["retry-after"] == "2"
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, **headers("error_500"))
    with pytest.raises(openai.InternalServerError) as expected:
        direct(fake_provider).chat.completions.create(
            model="gpt-upstream-1", messages=MESSAGES, **headers("error_500")
        )
    assert failed.value.body == expected.value.body


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_reset_mid_stream_raises_in_the_sdk(
    gateway: GatewayProcess, member_token: str, api: str
) -> None:
    session = uuid.uuid4().hex
    client = via_gateway(gateway, member_token)
    with pytest.raises(openai.APIError) as caught:
        if api == "chat":
            with client.chat.completions.stream(
                model="gpt-test", messages=MESSAGES, **headers("reset", session)
            ) as stream:
                stream.get_final_completion()
        else:
            with client.responses.stream(
                model="gpt-test", input="hi", **headers("reset", session)
            ) as stream:
                stream.get_final_response()
    assert "connection to the provider failed" in str(caught.value)
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "upstream_error"


def test_error_event_after_200(gateway: GatewayProcess, member_token: str) -> None:
    with pytest.raises(openai.APIError):
        with via_gateway(gateway, member_token).chat.completions.stream(
            model="gpt-test", messages=MESSAGES, **headers("error_event")
        ) as stream:
            stream.get_final_completion()
