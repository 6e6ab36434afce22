"""A translated answer tvgate cannot give the client as it came: an upstream 200 that is no
answer of the route's API, and a JSON answer over what tvgate holds to translate.

An Anthropic Messages client on an OpenAI Chat route (``gpt``), and for a 200 of the
wrong shape also an OpenAI Chat client on an Anthropic route (``claude``) and an OpenAI
Responses client on it and on a Chat Completions-only upstream (``local``), through the
gateway of ``test_translate_wired`` (its fixtures: an org per test with its own keys on the
fake provider, whose ``wrong_shape`` scenario answers 200 with a JSON list object,
``x-fake-mb`` MiB of it). Both are the provider's failure: a 502 in the client's envelope.
"""

from __future__ import annotations

import anthropic
import httpx2
import openai
import pytest

from tests import test_translate_wired as wired
from tests.fake_provider import FakeProvider
from tests.harness import RunningGateway
from tests.test_translate_responses_wired import local_secret  # noqa: F401 (a fixture)
from tests.test_translate_wired import Org, gateway, org  # noqa: F401 (the fixtures)
from tvgate.proxy.relay import TRANSLATED_LIMIT


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-asked"])
def test_a_200_that_is_no_chat_completion_is_a_502(
    gateway: RunningGateway,  # noqa: F811
    org: Org,  # noqa: F811
    stream: bool,
) -> None:
    # Asked to stream, the upstream answered JSON anyway: it is held whole and read as such.
    answer = httpx2.post(
        gateway.url + "/v1/messages",
        headers={
            "x-api-key": org.token,
            "anthropic-version": "2023-06-01",
            "x-fake-scenario": "wrong_shape",
        },
        json={"model": "gpt", "max_tokens": 50, "messages": wired.PROMPT, "stream": stream},
        timeout=30,
    )
    assert answer.status_code == 502, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    # The provider's body, as the message: what it said instead of an answer.
    assert error["error"]["message"].startswith('{"object": "list"')
    trace, _ = wired.trace_of(gateway, org)
    assert (trace.status_code, trace.outcome) == (502, "upstream_error")


def test_a_200_that_is_no_message_is_a_502_for_a_chat_client(
    gateway: RunningGateway,  # noqa: F811
    org: Org,  # noqa: F811
) -> None:
    # The reverse pair: an OpenAI Chat client on the Anthropic route ``claude``.
    with pytest.raises(openai.APIStatusError) as caught:
        wired.chat_client(gateway, org).chat.completions.create(
            model="claude",
            messages=wired.CHAT_PROMPT,
            extra_headers={"x-fake-scenario": "wrong_shape"},
        )
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict) and error["message"].startswith('{"object": "list"'), error
    trace, _ = wired.trace_of(gateway, org)
    assert (trace.status_code, trace.outcome) == (502, "upstream_error")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-asked"])
@pytest.mark.parametrize(
    ("route", "path"), [("claude", "/v1/messages"), ("local", "/v1/chat/completions")]
)
def test_a_200_that_is_no_answer_is_a_502_for_a_responses_client(
    gateway: RunningGateway,  # noqa: F811
    fake_provider: FakeProvider,
    org: Org,  # noqa: F811
    local_secret: str,  # noqa: F811
    route: str,
    path: str,
    stream: bool,
) -> None:
    # What Codex speaks, on an Anthropic route and on a key of a Chat Completions-only upstream.
    with pytest.raises(openai.APIStatusError) as caught:
        wired.chat_client(gateway, org).responses.create(
            model=route,
            input="hi",
            stream=stream,
            extra_headers={"x-fake-scenario": "wrong_shape"},
        )
    assert caught.value.status_code == 502
    assert caught.value.response.headers["content-type"] == "application/json"
    error = caught.value.body
    assert isinstance(error, dict) and error["message"].startswith('{"object": "list"'), error
    assert error["type"] == "api_error"
    secret = org.anthropic_secret if route == "claude" else local_secret
    assert [r.path for r in wired.sent_with(fake_provider, secret)] == [path]
    trace, _ = wired.trace_of(gateway, org)
    assert (trace.status_code, trace.outcome) == (502, "upstream_error")
    assert trace.endpoint == "openai.responses"


def test_a_json_answer_over_the_translation_limit_is_a_502(
    gateway: RunningGateway,  # noqa: F811
    fake_provider: FakeProvider,
    org: Org,  # noqa: F811
) -> None:
    megabytes = TRANSLATED_LIMIT // (1024 * 1024) + 1
    with pytest.raises(anthropic.APIStatusError) as caught:
        wired.messages_client(gateway, org).messages.create(
            model="gpt",
            max_tokens=50,
            messages=wired.PROMPT,
            extra_headers={"x-fake-scenario": "wrong_shape", "x-fake-mb": str(megabytes)},
            timeout=120,
        )
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert f"over {TRANSLATED_LIMIT} bytes, more than tvgate translates" in caught.value.message
    # One upstream call, not tried again.
    assert [r.path for r in wired.sent_with(fake_provider, org.openai_secret)] == [
        "/v1/chat/completions"
    ]
    trace, _ = wired.trace_of(gateway, org)
    assert (trace.status_code, trace.outcome) == (502, "upstream_error")
    assert "more than tvgate translates" in trace.error_message
