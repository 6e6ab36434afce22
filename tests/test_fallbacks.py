"""Fallback routes: tried in order when the provider fails before the client saw a byte.

The primary route's key points at the fake provider with a failing scenario fixed by
its base URL (``/scenario/<name>``), or at a port nobody listens on; the fallback's
key at the same fake provider answering normally. The client is the official SDK
with retries off, so whatever it receives is what tvgate sent.
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
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import add_fake_key, free_port
from tests.fake_provider import FakeProvider
from tests.harness import RunningGateway
from tests.inprocess import start_in_process
from tvgate import services
from tvgate.models import Trace, User

_orgs = itertools.count(1)


@dataclass(frozen=True)
class Caller:
    token: str
    user_id: int


PROMPT: list[MessageParam] = [{"role": "user", "content": "which route answered"}]
CHAT_PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "which route answered"}
]


@pytest.fixture(scope="module")
def gateway(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    data_dir: Path = tmp_path_factory.mktemp("fallbacks")
    # A short idle timeout: a provider silent before its first byte counts as failed soon.
    with start_in_process(database_url, data_dir, {}, TVGATE_IDLE_TIMEOUT="1") as gw:
        yield gw


def failing_url(fake: FakeProvider, failure: str, provider: str) -> str:
    if failure == "unreachable":
        return f"http://127.0.0.1:{free_port()}"
    base = fake.url if provider == "anthropic" else fake.openai_url.removesuffix("/v1")
    suffix = "" if provider == "anthropic" else "/v1"
    return f"{base}/scenario/{failure}{suffix}"


def org_with_fallback(
    gateway: RunningGateway,
    fake: FakeProvider,
    failure: str,
    *,
    provider: str = "anthropic",
    backup_scenario: str = "",
    backup_provider: str | None = None,
) -> Caller:
    """An org whose route ``primary`` fails with ``failure`` and falls back to ``backup``."""
    gateway.bind()
    org = f"fb{next(_orgs)}-{secrets.token_hex(3)}"
    email = f"dev@{org}.test"
    services.add_user(email, org)
    token, _ = services.issue_token(email, org)
    backup_provider = backup_provider or provider
    add_fake_key(fake, org, "failing", failing_url(fake, failure, provider), provider)
    healthy = fake.url if backup_provider == "anthropic" else fake.openai_url
    if backup_scenario:
        healthy = failing_url(fake, backup_scenario, backup_provider)
    add_fake_key(fake, org, "healthy", healthy, backup_provider)
    services.add_route("backup", "healthy", model="model-backup", org_name=org)
    services.add_route(
        "primary", "failing", model="model-primary", org_name=org, fallbacks=["backup"]
    )
    return Caller(token, User.get(User.email == email).id)


def trace_of(gateway: RunningGateway, caller: Caller) -> tuple[Trace, list[dict[str, Any]]]:
    """The caller's one trace and its attempts."""
    (trace,) = gateway.wait_traces(1, user_id=caller.user_id)
    return trace, json.loads(trace.attempts) if trace.attempts else []


FAILURES = {
    "error_529": (529, "upstream_error"),
    "error_429": (429, "upstream_error"),
    "error_500": (500, "upstream_error"),
    "unreachable": (502, "upstream_error"),
    "hang": (504, "timeout"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_fallback_answers_when_the_primary_fails(
    gateway: RunningGateway, fake_provider: FakeProvider, failure: str, stream: bool
) -> None:
    caller = org_with_fallback(gateway, fake_provider, failure)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=caller.token, max_retries=0)
    message: anthropic.types.Message
    if stream:
        with client.messages.stream(model="primary", max_tokens=64, messages=PROMPT) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(model="primary", max_tokens=64, messages=PROMPT)
    assert message.content[0].text == "You said: which route answered"  # type: ignore[union-attr]
    assert message.model == "model-backup"
    trace, attempts = trace_of(gateway, caller)
    assert trace.route_name == "backup" and trace.outcome == "ok" and trace.status_code == 200
    status, outcome = FAILURES[failure]
    assert [(a["route"], a["key"], a["upstream_model"]) for a in attempts] == [
        ("primary", "failing", "model-primary"),
        ("backup", "healthy", "model-backup"),
    ]
    assert attempts[0]["status"] == status and attempts[0]["outcome"] == outcome
    assert attempts[0]["error"]
    assert attempts[1]["status"] == 200 and attempts[1]["outcome"] == "ok"
    # The caller reads the same attempts through the API.
    shown = httpx2.get(
        f"{gateway.url}/api/v1/traces/{trace.id}",
        headers={"authorization": f"Bearer {caller.token}"},
    )
    assert shown.status_code == 200, shown.text
    assert [a["route"] for a in shown.json()["attempts"]] == ["primary", "backup"]


def test_the_last_failure_reaches_the_client_when_every_route_fails(
    gateway: RunningGateway, fake_provider: FakeProvider
) -> None:
    caller = org_with_fallback(gateway, fake_provider, "error_529", backup_scenario="error_500")
    client = anthropic.Anthropic(base_url=gateway.url, api_key=caller.token, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(model="primary", max_tokens=64, messages=PROMPT)
    assert caught.value.status_code == 500
    trace, attempts = trace_of(gateway, caller)
    assert trace.outcome == "upstream_error" and trace.route_name == "backup"
    assert [(a["route"], a["status"]) for a in attempts] == [("primary", 529), ("backup", 500)]


def test_no_fallback_once_the_first_byte_was_sent(
    gateway: RunningGateway, fake_provider: FakeProvider
) -> None:
    caller = org_with_fallback(gateway, fake_provider, "error_event")
    client = anthropic.Anthropic(base_url=gateway.url, api_key=caller.token, max_retries=0)
    with (
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(model="primary", max_tokens=64, messages=PROMPT) as events,
    ):
        events.get_final_message()
    trace, attempts = trace_of(gateway, caller)
    assert trace.route_name == "primary" and attempts == []


def test_a_fallback_on_another_provider_serves_through_translation(
    gateway: RunningGateway, fake_provider: FakeProvider
) -> None:
    caller = org_with_fallback(gateway, fake_provider, "error_529", backup_provider="openai")
    client = anthropic.Anthropic(base_url=gateway.url, api_key=caller.token, max_retries=0)
    message = client.messages.create(model="primary", max_tokens=64, messages=PROMPT)
    assert message.content[0].type == "text"
    assert message.content[0].text == "You said: which route answered"
    assert message.model == "model-backup"
    trace, attempts = trace_of(gateway, caller)
    assert [(a["route"], a["provider"], a["status"]) for a in attempts] == [
        ("primary", "anthropic", 529),
        ("backup", "openai", 200),
    ]
    assert (trace.endpoint, trace.provider) == ("anthropic.messages", "openai")


def test_openai_chat_falls_back(gateway: RunningGateway, fake_provider: FakeProvider) -> None:
    caller = org_with_fallback(gateway, fake_provider, "error_500", provider="openai")
    client = openai.OpenAI(base_url=gateway.openai_url, api_key=caller.token, max_retries=0)
    completion = client.chat.completions.create(model="primary", messages=CHAT_PROMPT)
    assert completion.choices[0].message.content == "You said: which route answered"
    assert completion.model == "model-backup"
    _trace, attempts = trace_of(gateway, caller)
    assert [a["status"] for a in attempts] == [500, 200]
