"""Real Claude Code runs a tool-using session through tvgate on an OpenAI Chat route.

Claude Code speaks Anthropic Messages; the route ``gpt-test`` goes to the fake provider's
OpenAI Chat Completions API, so every call is translated both ways, streamed both ways
(Claude Code streams, and the translated request asks the upstream to). The fake's
``agent`` scenario answers the first turn with a Chat Completions tool call of Claude
Code's Bash tool and the turn carrying its result with ``Tool said: <result>``: the run
passes only if Claude Code ran the command from a translated tool call and its result
went back up as an OpenAI ``tool`` message. Every model alias points at the route, so
side requests (the small model's) take it too.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.clients import claude_bash_session, run_claude
from tests.conftest import GatewayProcess
from tests.fake_provider import FakeProvider
from tests.test_real_clients import CLAUDE_VERSION, _agent_setup, _session_traces


def test_claude_code_bash_session_on_an_openai_chat_route(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str, tmp_path: Path
) -> None:
    setup, marker = _agent_setup(gateway.url, member_token, "gpt-test", tmp_path)
    run = run_claude(setup, "Write the marker file with the Bash tool.")
    result, tool_use = claude_bash_session(run, setup, marker)
    # The tool call came from the upstream in OpenAI's format, as Claude Code's Bash call.
    assert tool_use["input"]["command"] == f"echo {marker} > out.txt && cat out.txt"

    sent = [r for r in fake_provider.requests if marker in r.headers.get("x-fake-command", "")]
    assert [r.path for r in sent] == ["/v1/chat/completions"] * 2
    first, second = (r.json() for r in sent)
    for body in (first, second):
        assert body["model"] == "gpt-upstream-1"
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert any(t["function"]["name"] == "Bash" for t in body["tools"])
    # The second request carries the call and its result the OpenAI way: the assistant's
    # tool_calls, then a "tool" message answering that call's id.
    calls = [m for m in second["messages"] if m["role"] == "assistant" and m.get("tool_calls")]
    (call,) = calls[-1]["tool_calls"]
    assert call["id"] == tool_use["id"]
    assert call["function"]["name"] == "Bash"
    assert json.loads(call["function"]["arguments"])["command"] == tool_use["input"]["command"]
    tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
    assert tool_messages == [{"role": "tool", "tool_call_id": call["id"], "content": marker}]

    traces = _session_traces(gateway, fake_provider, marker, result["session_id"])
    assert {(trace.tool, trace.tool_version) for trace in traces} == {
        ("claude-code", CLAUDE_VERSION)
    }
    assert {(t.endpoint, t.provider, t.route_name) for t in traces} == {
        ("anthropic.messages", "openai", "gpt-test")
    }
    assert {trace.upstream_model for trace in traces} == {"gpt-upstream-1"}
    assert all(trace.stream and trace.input_tokens > 0 for trace in traces)
    assert all(
        "translated: anthropic.messages on openai.chat" in json.loads(trace.anomalies)
        for trace in traces
    )
