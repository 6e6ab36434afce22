"""``POST /v1/messages/count_tokens`` on a route whose provider is not Anthropic.

tvgate answers its own estimate (``tvgate.proxy.estimate``): ``{"input_tokens": N}`` in
Anthropic's format, N the bytes of the request as the route's API would get it over 4,
rounded up, marked by the ``x-tvgate-token-estimate`` header, and never a provider call.
Through the gateway of ``test_translate_wired`` (its fixtures: an org per test with an
Anthropic route ``claude`` and an OpenAI Chat route ``gpt``, both on the fake provider),
with the official ``anthropic`` SDK as the client.
"""

from __future__ import annotations

import json
import math
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.types import MessageParam

from tests.fake_provider import FakeProvider
from tests.harness import RunningGateway
from tests.test_translate_wired import (  # noqa: F401 (the fixtures gateway and org)
    PROMPT,
    TOOLS,
    Org,
    gateway,
    messages_client,
    org,
    sent_with,
    trace_of,
)
from tvgate.proxy.estimate import ESTIMATE_NOTE
from tvgate.translate.anthropic_to_chat import translate_request

ESTIMATE = "x-tvgate-token-estimate"


def _estimate_of(request: dict[str, Any]) -> int:
    """The rule the README documents: the Chat Completions body the request becomes for
    the route's model, in bytes, over 4, rounded up."""
    body = translate_request(request, model="gpt-upstream-9").body
    return math.ceil(len(orjson.dumps(body)) / 4)


def test_count_tokens_on_an_openai_route_is_an_estimate(
    gateway: RunningGateway,  # noqa: F811
    fake_provider: FakeProvider,
    org: Org,  # noqa: F811
) -> None:
    client = messages_client(gateway, org)
    request: dict[str, Any] = {
        "model": "gpt",
        "system": "be brief",
        "messages": PROMPT,
        "tools": TOOLS,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    }
    raw = client.messages.with_raw_response.count_tokens(**request)
    assert raw.http_response.status_code == 200
    assert raw.headers[ESTIMATE] == "bytes/4"
    counted = raw.parse()
    assert counted.input_tokens == _estimate_of(request)
    # Deterministic, and it grows with the request.
    assert client.messages.count_tokens(**request).input_tokens == counted.input_tokens
    longer: list[MessageParam] = [{"role": "user", "content": "read the readme " * 200}]
    assert client.messages.count_tokens(model="gpt", messages=longer).input_tokens > (
        counted.input_tokens + 700
    )
    # Never a provider call.
    assert sent_with(fake_provider, org.openai_secret) == []

    traces = gateway.wait_traces(3, user_id=org.user_id)
    assert {
        (t.endpoint, t.provider, t.route_name, t.upstream_model, t.status_code, t.outcome)
        for t in traces
    } == {("anthropic.count_tokens", "openai", "gpt", "gpt-upstream-9", 200, "ok")}
    assert all(ESTIMATE_NOTE in json.loads(t.anomalies) for t in traces)
    assert all(t.input_tokens == 0 and t.cost_usd == 0 for t in traces)


def test_count_tokens_as_claude_code_sends_it(
    gateway: RunningGateway,  # noqa: F811
    org: Org,  # noqa: F811
) -> None:
    # Claude Code: ?beta=true, the token as a bearer, beta headers.
    request = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx2.post(
        gateway.url + "/v1/messages/count_tokens?beta=true",
        headers={
            "authorization": f"Bearer {org.token}",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,token-counting-2024-11-01",
        },
        json=request,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers[ESTIMATE] == "bytes/4"
    assert answer.json() == {"input_tokens": _estimate_of(request)}


def test_count_tokens_on_an_anthropic_route_is_the_providers(
    gateway: RunningGateway,  # noqa: F811
    fake_provider: FakeProvider,
    org: Org,  # noqa: F811
) -> None:
    raw = messages_client(gateway, org).messages.with_raw_response.count_tokens(
        model="claude", messages=PROMPT
    )
    assert ESTIMATE not in raw.headers
    # The fake provider's own count: the words of the messages' strings, role included.
    assert raw.parse().input_tokens == 4
    (sent,) = sent_with(fake_provider, org.anthropic_secret)
    assert sent.path == "/v1/messages/count_tokens"
    trace, _ = trace_of(gateway, org)
    assert ESTIMATE_NOTE not in json.loads(trace.anomalies or "[]")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": "gpt", "messages": "hi"}, "messages: must be a list"),
        ({"model": "gpt", "messages": PROMPT, "container": "c1"}, "container"),
        ({"model": "gpt", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ],
)
def test_bad_input_is_a_400_in_anthropics_envelope(
    gateway: RunningGateway,  # noqa: F811
    fake_provider: FakeProvider,
    org: Org,  # noqa: F811
    body: dict[str, Any],
    named: str,
) -> None:
    answer = httpx2.post(
        gateway.url + "/v1/messages/count_tokens",
        headers={"x-api-key": org.token, "anthropic-version": "2023-06-01"},
        json=body,
    )
    assert answer.status_code == 400
    assert ESTIMATE not in answer.headers
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"]
    assert sent_with(fake_provider, org.openai_secret) == []
    trace, _ = trace_of(gateway, org)
    assert (trace.status_code, trace.outcome) == (400, "rejected")


def test_translation_off_is_a_400(
    gateway: RunningGateway,  # noqa: F811
    org: Org,  # noqa: F811
) -> None:
    done = gateway.cli("routes", "update", "gpt", "--org", org.name, "--translate", "off")
    assert done.returncode == 0, done.stderr
    with pytest.raises(anthropic.BadRequestError) as refused:
        messages_client(gateway, org).messages.count_tokens(model="gpt", messages=PROMPT)
    assert "translation is off" in refused.value.message
