"""Real Claude Code and real Codex CLI run tool-using sessions through a real ``tvgate serve``.

The tools are the npm releases ``make clients`` installs (tests/clients.py runs them); the
provider is the fake one, whose ``agent`` scenario answers a turn that offers a shell tool
with a call of it and the turn that carries its result with ``Tool said: <result>``. So a
run passes only if the tool's own request went through tvgate, tvgate's answer made the
tool run the command on this machine, and the command's output came back through tvgate
in the next request. Passthrough (the route's provider speaks the tool's API), and Codex
translated: on an Anthropic route, and on a key of a Chat Completions-only upstream.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.clients import (
    ClientRun,
    Setup,
    claude_bash_session,
    codex_messages,
    run_claude,
    run_codex,
)
from tests.conftest import GatewayProcess, add_fake_key, add_test_key
from tests.fake_provider import FakeProvider
from tests.fake_vertex import ANTHROPIC_VERSION, FakeVertex
from tvgate import services
from tvgate.models import Trace

CLAUDE_VERSION = "2.1.332"
CODEX_VERSION = "0.171.0"


def _agent_setup(base_url: str, token: str, model: str, folder: Path) -> tuple[Setup, str]:
    """A run whose upstream answers as the fake's agent scenario, running a command that
    writes a marker of its own to ``out.txt``; the setup and the marker."""
    marker = "tvgate-ok-" + uuid.uuid4().hex[:8]
    headers = {
        "x-fake-scenario": "agent",
        "x-fake-command": f"echo {marker} > out.txt && cat out.txt",
    }
    return Setup(base_url, token, model, folder, headers), marker


def _session_traces(
    gateway: GatewayProcess, fake: FakeProvider, marker: str, session: str
) -> list[Trace]:
    """The gateway's traces of a session, once there is one per upstream call the session
    made (each carried its command); two: the tool call, then the answer to its result."""
    calls = sum(marker in record.headers.get("x-fake-command", "") for record in fake.requests)
    assert calls == 2
    traces = gateway.wait_traces(calls, session_id=session)
    assert all(trace.outcome == "ok" and trace.status_code == 200 for trace in traces)
    return traces


# Both ways Claude Code sends a gateway token: Authorization: Bearer, and x-api-key (as
# Visdom Trace's `tracevault proxy info` sets it up).
@pytest.mark.parametrize("credential_env", ["ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"])
def test_claude_code_bash_session_through_gateway(
    gateway: GatewayProcess,
    fake_provider: FakeProvider,
    member_token: str,
    tmp_path: Path,
    credential_env: str,
) -> None:
    setup, marker = _agent_setup(gateway.url, member_token, "claude-test", tmp_path)
    run = run_claude(
        setup, "Write the marker file with the Bash tool.", credential_env=credential_env
    )
    result, _ = claude_bash_session(run, setup, marker)
    traces = _session_traces(gateway, fake_provider, marker, result["session_id"])
    assert {(trace.tool, trace.tool_version) for trace in traces} == {
        ("claude-code", CLAUDE_VERSION)
    }
    assert {trace.endpoint for trace in traces} == {"anthropic.messages"}
    assert {trace.upstream_model for trace in traces} == {"claude-upstream-1"}


# With supports_websockets Codex opens GET /v1/responses + Upgrade: websocket and sends each
# turn as a response.create frame on it: the new items and the previous response's id.
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket-mode"])
def test_codex_exec_tool_call_through_gateway(
    gateway: GatewayProcess,
    fake_provider: FakeProvider,
    member_token: str,
    tmp_path: Path,
    websockets: bool,
) -> None:
    setup, marker = _agent_setup(gateway.openai_url, member_token, "gpt-test", tmp_path)
    run = run_codex(setup, "Write the marker file with a shell command.", websockets=websockets)
    traces = _codex_ran_the_command(gateway, fake_provider, setup, marker, run)
    assert {trace.endpoint for trace in traces} == {"openai.responses"}
    assert {trace.upstream_model for trace in traces} == {"gpt-upstream-1"}
    _check_transport(fake_provider, marker, traces, websockets)


def _check_transport(
    fake: FakeProvider, marker: str, traces: list[Trace], websockets: bool
) -> None:
    """The session's two calls came over WebSocket (or HTTP), and either way the provider
    got the whole input on the second: the shell call and its output after the first."""
    assert {trace.transport for trace in traces} == {"websocket" if websockets else ""}
    # Over WebSocket Codex sent only the new items with previous_response_id; tvgate
    # sent the conversation the connection kept, and the trace says so.
    continued = ["websocket: continues" in trace.anomalies for trace in traces]
    assert continued[1] is websockets
    sent = [r for r in fake.requests if marker in r.headers.get("x-fake-command", "")]
    body = sent[1].json()
    assert "previous_response_id" not in body
    if sent[1].path == "/v1/responses":
        first_input = sent[0].json()["input"]
        assert body["input"][: len(first_input)] == first_input
        kinds = [item.get("type") for item in body["input"][len(first_input) :]]
        assert "function_call" in kinds and kinds[-1] == "function_call_output", kinds
        assert marker in json.dumps(body["input"][-1])


@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket-mode"])
def test_codex_exec_tool_call_on_an_anthropic_route(
    gateway: GatewayProcess,
    fake_provider: FakeProvider,
    member_token: str,
    tmp_path: Path,
    websockets: bool,
) -> None:
    """Codex's Responses calls translated to Anthropic Messages: the fake answers the first
    with a tool_use of Codex's shell tool, the second (carrying its tool_result) with text."""
    setup, marker = _agent_setup(gateway.openai_url, member_token, "claude-test", tmp_path)
    run = run_codex(setup, "Write the marker file with a shell command.", websockets=websockets)
    traces = _codex_ran_the_command(gateway, fake_provider, setup, marker, run)
    _check_transport(fake_provider, marker, traces, websockets)
    assert {(t.endpoint, t.provider) for t in traces} == {("openai.responses", "anthropic")}
    assert {trace.upstream_model for trace in traces} == {"claude-upstream-1"}
    assert all(t.input_tokens > 0 and t.output_tokens > 0 for t in traces)
    sent = [r for r in fake_provider.requests if marker in r.headers.get("x-fake-command", "")]
    assert [r.path for r in sent] == ["/v1/messages", "/v1/messages"]
    # The command's output went back to Anthropic as the tool_use's result.
    call, result = sent[1].json()["messages"][-2:]
    (tool_use,) = [block for block in call["content"] if block["type"] == "tool_use"]
    (tool_result,) = result["content"]
    assert tool_result["type"] == "tool_result"
    assert tool_result["tool_use_id"] == tool_use["id"]
    assert marker in json.dumps(tool_result["content"])
    for trace in traces:
        anomalies = json.loads(trace.anomalies)
        assert "translated: openai.responses on anthropic.messages" in anomalies
        # Codex's web search, sub-agent tools (and apply_patch, for models that get it)
        # are dropped, noted; its shell is what it needs.
        assert any(a.endswith("web_search tool") for a in anomalies), anomalies


@pytest.fixture
def chat_only_route(gateway: GatewayProcess, fake_provider: FakeProvider) -> Iterator[str]:
    """A route of acme's on a key marked chat_only (the fake's OpenAI side, as a vLLM
    server would be), once the gateway serves it; deleted with its key afterwards."""
    name = "local-" + uuid.uuid4().hex[:8]
    gateway.bind()
    add_fake_key(fake_provider, "acme", name, fake_provider.openai_url, "openai", chat_only=True)
    services.add_route(name, name, model="qwen-upstream-1", org_name="acme")
    try:
        yield name
    finally:
        gateway.bind()
        services.delete_key(name, org_name="acme", force=True)


def test_codex_exec_tool_call_on_a_chat_only_upstream(
    gateway: GatewayProcess,
    fake_provider: FakeProvider,
    member_token: str,
    tmp_path: Path,
    chat_only_route: str,
) -> None:
    """Codex's Responses calls translated to Chat Completions for a vLLM/Ollama-like key."""
    _wait_for_route(gateway, member_token, chat_only_route)
    setup, marker = _agent_setup(gateway.openai_url, member_token, chat_only_route, tmp_path)
    run = run_codex(setup, "Write the marker file with a shell command.")
    traces = _codex_ran_the_command(gateway, fake_provider, setup, marker, run)
    assert {(t.endpoint, t.provider) for t in traces} == {("openai.responses", "openai")}
    assert {trace.upstream_model for trace in traces} == {"qwen-upstream-1"}
    sent = [r for r in fake_provider.requests if marker in r.headers.get("x-fake-command", "")]
    assert [r.path for r in sent] == ["/v1/chat/completions", "/v1/chat/completions"]
    # The command's output went back as the tool call's result.
    call, result = sent[1].json()["messages"][-2:]
    assert result["role"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert marker in json.dumps(result["content"])
    for trace in traces:
        assert "translated: openai.responses on openai.chat" in json.loads(trace.anomalies)


def _wait_for_route(gateway: GatewayProcess, token: str, route: str) -> None:
    """Until the gateway lists ``route`` (it hears of a new route from the database)."""
    deadline = time.monotonic() + 10
    while True:
        listed = httpx2.get(
            gateway.openai_url + "/models", headers={"Authorization": f"Bearer {token}"}
        ).json()
        if any(model["id"] == route for model in listed["data"]):
            return
        assert time.monotonic() < deadline, f"route {route} never served: {listed}"
        time.sleep(0.1)


def _codex_ran_the_command(
    gateway: GatewayProcess, fake: FakeProvider, setup: Setup, marker: str, run: ClientRun
) -> list[Trace]:
    """Check a ``codex exec`` run of the agent scenario: it ran the command once, wrote the
    marker, ended its turn with the answer to the command's output; its traces."""
    assert run.returncode == 0, run.describe()
    assert (setup.work / "out.txt").read_text() == marker + "\n"
    commands = [
        event["item"]
        for event in run.events
        if event.get("type") == "item.completed"
        and event["item"].get("type") == "command_execution"
    ]
    assert len(commands) == 1 and commands[0]["exit_code"] == 0, run.describe()
    # Codex wraps the command's output (exit code, wall time) before "Output: <marker>".
    messages = codex_messages(run)
    assert messages[-1].startswith("Tool said: ") and messages[-1].endswith(marker), run.describe()
    assert run.events[-1]["type"] == "turn.completed", run.describe()

    session = next(e["thread_id"] for e in run.events if e.get("type") == "thread.started")
    traces = _session_traces(gateway, fake, marker, session)
    assert {(trace.tool, trace.tool_version) for trace in traces} == {("codex", CODEX_VERSION)}
    return traces


@pytest.fixture
def vertex_route(gateway: GatewayProcess) -> Iterator[tuple[str, FakeVertex]]:
    """A route of acme's on a Vertex AI key (a service account of the fake Vertex AI's)."""
    fake = FakeVertex()
    fake.start()
    name = "vertex-" + uuid.uuid4().hex[:8]
    gateway.bind()
    secret = json.dumps(fake.service_account(), indent=2)
    settings = {"project": fake.project, "region": fake.region}
    add_test_key(name, "acme", fake.url, secret, provider="vertex", settings=settings)
    services.add_route(name, name, model="claude-sonnet-4-5@20250929", org_name="acme")
    try:
        yield name, fake
    finally:
        gateway.bind()
        services.delete_key(name, org_name="acme", force=True)
        fake.stop()


def test_claude_code_in_vertex_mode_through_gateway(
    gateway: GatewayProcess,
    vertex_route: tuple[str, FakeVertex],
    member_token: str,
    tmp_path: Path,
) -> None:
    """Claude Code in its Vertex AI mode, pointed at tvgate's /vertex (no Google credential:
    the tvgate token in ANTHROPIC_CUSTOM_HEADERS), on a route of a Vertex AI key."""
    route, fake = vertex_route
    _wait_for_route(gateway, member_token, route)
    setup, marker = _agent_setup(gateway.url, member_token, route, tmp_path)
    setup.headers["Authorization"] = f"Bearer {member_token}"
    setup.env.update(
        {
            "CLAUDE_CODE_USE_VERTEX": "1",
            "ANTHROPIC_VERTEX_BASE_URL": gateway.url + "/vertex",
            "CLAUDE_CODE_SKIP_VERTEX_AUTH": "1",
            "ANTHROPIC_VERTEX_PROJECT_ID": "any-project",
            "CLOUD_ML_REGION": "us-east5",
        }
    )
    run = run_claude(setup, "Write the marker file with the Bash tool.", credential_env="")
    result, _ = claude_bash_session(run, setup, marker)
    traces = _session_traces(gateway, fake, marker, result["session_id"])
    assert {(trace.tool, trace.tool_version) for trace in traces} == {
        ("claude-code", CLAUDE_VERSION)
    }
    assert {(t.endpoint, t.provider, t.route_name) for t in traces} == {
        ("anthropic.messages", "vertex", route)
    }
    assert {trace.upstream_model for trace in traces} == {"claude-sonnet-4-5@20250929"}
    assert all(t.input_tokens > 0 and t.output_tokens > 0 and t.cost_usd > 0 for t in traces)
    sent = [r for r in fake.requests if marker in r.headers.get("x-fake-command", "")]
    assert all(r.path.endswith("/models/claude-sonnet-4-5@20250929:streamRawPredict") for r in sent)
    for request in sent:
        body = request.json()
        assert "model" not in body and body["anthropic_version"] == ANTHROPIC_VERSION
        # Claude Code's betas (its anthropic-beta header) reach Vertex AI in the body.
        assert "claude-code-20250219" in body["anthropic_beta"]
