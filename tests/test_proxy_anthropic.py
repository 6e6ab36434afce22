"""The official anthropic SDK through tvgate gets what it gets from the provider directly."""

from __future__ import annotations

import uuid
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam

from tests.conftest import ANTHROPIC_SECRET, GatewayProcess
from tests.fake_provider import FakeProvider
from tests.harness import fake_scenario as scenario

PROMPT: list[MessageParam] = [{"role": "user", "content": "Read the README and summarise it"}]
TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]


def via_gateway(gateway: GatewayProcess, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=token, max_retries=0)


def direct(fake: FakeProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.url, api_key=ANTHROPIC_SECRET, max_retries=0)


def call_kwargs(name: str) -> dict[str, Any]:
    """What both sides are asked: the prompt, with tools, in the fake's scenario ``name``."""
    return {"max_tokens": 256, "messages": PROMPT, "tools": TOOLS, **scenario(name)}


@pytest.mark.parametrize("name", ["normal", "tool_use", "thinking"])
def test_create_equals_direct(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str, name: str
) -> None:
    kwargs = call_kwargs(name)
    through = via_gateway(gateway, member_token).messages.create(model="claude-test", **kwargs)
    expected = direct(fake_provider).messages.create(model="claude-upstream-1", **kwargs)
    assert through.model_dump() == expected.model_dump()
    assert through.model == "claude-upstream-1"
    if name == "tool_use":
        tool = next(block for block in through.content if block.type == "tool_use")
        assert tool.input == {"path": "README.md", "limit": 10}


@pytest.mark.parametrize("name", ["normal", "tool_use", "thinking"])
def test_stream_final_message_equals_direct(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str, name: str
) -> None:
    kwargs = call_kwargs(name)
    with via_gateway(gateway, member_token).messages.stream(model="claude-test", **kwargs) as s:
        through = s.get_final_message()
    with direct(fake_provider).messages.stream(model="claude-upstream-1", **kwargs) as s:
        expected = s.get_final_message()
    assert through.model_dump() == expected.model_dump()
    assert through.usage.output_tokens > 0 and through.usage.input_tokens > 0


async def test_async_stream_and_create(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=member_token, max_retries=0)
    reference = anthropic.AsyncAnthropic(
        base_url=fake_provider.url, api_key=ANTHROPIC_SECRET, max_retries=0
    )
    kwargs: dict[str, Any] = {"max_tokens": 64, "messages": PROMPT, **scenario("tool_use")}
    async with client.messages.stream(model="claude-test", **kwargs) as s:
        through = await s.get_final_message()
    async with reference.messages.stream(model="claude-upstream-1", **kwargs) as s:
        expected = await s.get_final_message()
    assert through.model_dump() == expected.model_dump()
    created = await client.messages.create(model="claude-test", **kwargs)
    assert (
        created.model_dump()
        == (await reference.messages.create(model="claude-upstream-1", **kwargs)).model_dump()
    )
    await client.close()
    await reference.close()


def test_ping_and_slow_drip_stream(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    headers = {"x-fake-scenario": "drip", "x-fake-interval": "0.05", "x-fake-events": "8"}
    kwargs: dict[str, Any] = {"max_tokens": 64, "messages": PROMPT, "extra_headers": headers}
    events: list[str] = []
    with via_gateway(gateway, member_token).messages.stream(model="claude-test", **kwargs) as s:
        for event in s:
            events.append(event.type)
        through = s.get_final_message()
    with direct(fake_provider).messages.stream(model="claude-upstream-1", **kwargs) as s:
        expected = s.get_final_message()
    assert through.model_dump() == expected.model_dump()
    assert events.count("content_block_delta") + events.count("text") >= 8


def test_count_tokens_and_models(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    client = via_gateway(gateway, member_token)
    counted = client.messages.count_tokens(model="claude-test", messages=PROMPT)
    expected = direct(fake_provider).messages.count_tokens(
        model="claude-upstream-1", messages=PROMPT
    )
    assert counted.input_tokens == expected.input_tokens
    names = [m.id for m in client.models.list()]
    assert names == sorted(
        ["claude-pass", "claude-sonnet", "claude-test", "embed-test", "gpt-test"]
    )


def test_529_passes_through_unchanged(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 64, "messages": PROMPT, **scenario("error_529")}
    with pytest.raises(anthropic.APIStatusError) as through:
        via_gateway(gateway, member_token).messages.create(model="claude-test", **kwargs)
    with pytest.raises(anthropic.APIStatusError) as expected:
        direct(fake_provider).messages.create(model="claude-upstream-1", **kwargs)
    assert through.value.status_code == expected.value.status_code == 529
    body, expected_body = dict(through.value.body), dict(expected.value.body)  # type: ignore[call-overload]
    # The provider's request id is per request; it must be the provider's, passed through.
    assert body.pop("request_id") == through.value.response.headers["request-id"]
    expected_body.pop("request_id")
    assert body == expected_body
    assert through.value.response.headers["retry-after"] == "1"
    assert (
        through.value.response.headers["retry-after"]
        == expected.value.response.headers["retry-after"]
    )


def test_429_keeps_retry_after(gateway: GatewayProcess, member_token: str) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        via_gateway(gateway, member_token).messages.create(
            model="claude-test", max_tokens=8, messages=PROMPT, **scenario("error_429")
        )
    assert caught.value.response.headers["retry-after"] == "2"


def test_error_event_after_200_reaches_the_sdk(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    session = uuid.uuid4().hex
    kwargs: dict[str, Any] = {"max_tokens": 64, "messages": PROMPT, **scenario("error_event")}
    with pytest.raises(anthropic.APIStatusError) as through:
        with via_gateway(gateway, member_token).messages.stream(
            model="claude-test", max_tokens=64, messages=PROMPT, **scenario("error_event", session)
        ) as s:
            s.get_final_message()
    with pytest.raises(anthropic.APIStatusError) as expected:
        with direct(fake_provider).messages.stream(model="claude-upstream-1", **kwargs) as s:
            s.get_final_message()
    assert type(through.value) is type(expected.value)
    assert through.value.body == expected.value.body
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "upstream_error" and trace.status_code == 200
    assert trace.error_type == "overloaded_error"


def test_reset_mid_stream_ends_with_in_band_error(
    gateway: GatewayProcess, member_token: str
) -> None:
    session = uuid.uuid4().hex
    with pytest.raises(anthropic.APIStatusError) as caught:
        with via_gateway(gateway, member_token).messages.stream(
            model="claude-test", max_tokens=64, messages=PROMPT, **scenario("reset", session)
        ) as s:
            s.get_final_message()
    assert "connection to the provider failed" in str(caught.value)
    assert ANTHROPIC_SECRET not in str(caught.value.body)
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "upstream_error" and trace.bytes_out > 0
