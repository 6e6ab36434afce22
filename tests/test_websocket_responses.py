"""The Responses API over WebSocket (Codex's transport) through a real ``tvgate serve``.

The official ``openai`` SDK's own WebSocket client (``client.responses.connect()``) talks
to tvgate's ``/v1/responses`` socket; tvgate calls the fake provider's HTTP streaming
Responses endpoint for each ``response.create`` and sends its events back one a message.
What the provider received is checked: each turn's whole input, the conversation kept by
the connection from ``previous_response_id``. The raw ``websockets`` client covers what the
SDK hides: the refused upgrade, a client gone mid-stream, frames that are not a call.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from tests.conftest import OPENAI_SECRET, GatewayProcess, stop_gateway
from tests.fake_provider import FakeProvider, RecordedRequest
from tests.outages import outage
from tests.test_faults import _rss_kib
from tests.test_server import launch
from tvgate import services

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "read_file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]
FIRST_INPUT: list[Any] = [{"type": "message", "role": "user", "content": "Read the README"}]


def socket_url(gateway: GatewayProcess, path: str = "/v1/responses") -> str:
    return gateway.url.replace("http://", "ws://") + path


@contextmanager
def raw_socket(
    gateway: GatewayProcess, token: str, path: str = "/v1/responses", **headers: str
) -> Iterator[Connection]:
    """A WebSocket to tvgate as Codex opens it: its token, the beta header, ``headers``."""
    sent = {
        "Authorization": f"Bearer {token}",
        "OpenAI-Beta": "responses_websockets=2026-02-06",
        **headers,
    }
    with connect(socket_url(gateway, path), additional_headers=sent, open_timeout=10) as ws:
        yield ws


def create(ws: Connection, **fields: Any) -> None:
    ws.send(orjson.dumps({"type": "response.create", **fields}).decode())


def started(ws: Connection, text: str, until: str = "response.created") -> None:
    """A response of route gpt-test to ``text`` begun: its events read up to ``until``."""
    create(ws, model="gpt-test", input=text)
    while orjson.loads(ws.recv(timeout=10))["type"] != until:
        pass


def events_until_done(ws: Connection, timeout: float = 20) -> list[dict[str, Any]]:
    """The events of one response, up to the one that ends it (or an error event)."""
    events: list[dict[str, Any]] = []
    while True:
        event = orjson.loads(ws.recv(timeout=timeout))
        events.append(event)
        if event["type"] in ("response.completed", "response.failed", "error"):
            return events


def fake_requests(fake: FakeProvider, test_id: str) -> list[RecordedRequest]:
    return [r for r in list(fake.requests) if r.headers.get("x-test-id") == test_id]


def provider_requests(fake: FakeProvider, test_id: str, count: int) -> list[RecordedRequest]:
    """The requests the fake received carrying ``x-test-id``, once there are ``count``."""
    deadline = time.monotonic() + 10
    while True:
        found = fake_requests(fake, test_id)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count
            return found
        time.sleep(0.02)


def tagged(scenario: str = "tool_use", **knobs: str) -> tuple[dict[str, str], str, str]:
    """Upgrade headers that pick the fake's scenario, with a test id and a session."""
    test_id, session = uuid.uuid4().hex, uuid.uuid4().hex
    headers = {f"x-fake-{name}": value for name, value in knobs.items()}
    headers |= {"x-fake-scenario": scenario, "x-test-id": test_id, "x-tvgate-session": session}
    return headers, test_id, session


def sdk_turn(connection: Any) -> list[Any]:
    """The SDK's events of one response, up to the one that ends it."""
    events = []
    while True:
        event = connection.recv()
        events.append(event)
        if event.type in ("response.completed", "response.failed", "error"):
            return events


def test_sdk_multi_turn_with_a_function_call_sends_the_whole_input(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    headers, test_id, session = tagged()
    client = openai.OpenAI(base_url=gateway.openai_url, api_key=member_token, max_retries=0)
    with client.responses.connect(extra_headers=headers) as connection:
        connection.response.create(model="gpt-test", input=FIRST_INPUT, tools=TOOLS, store=False)
        first = sdk_turn(connection)
        done = first[-1]
        assert done.type == "response.completed"
        assert [e.type for e in first[:2]] == ["response.created", "response.in_progress"]
        call = next(item for item in done.response.output if item.type == "function_call")
        assert call.name == "read_file"
        result: Any = {
            "type": "function_call_output",
            "call_id": call.call_id,
            "output": "# tvgate",
        }
        # As Codex sends a turn over WebSocket: only the new items, and the previous id.
        connection.response.create(
            model="gpt-test",
            input=[result],
            tools=TOOLS,
            store=False,
            previous_response_id=done.response.id,
        )
        second = sdk_turn(connection)
        assert second[-1].type == "response.completed"
    one, two = provider_requests(fake_provider, test_id, 2)
    assert one.method == "POST" and one.path == "/v1/responses"
    assert one.json()["input"] == FIRST_INPUT and one.json()["stream"] is True
    assert one.json()["model"] == "gpt-upstream-1"
    body = two.json()
    # The whole conversation, not the delta; no state asked of the provider.
    output = [item.model_dump(exclude_none=True) for item in done.response.output]
    assert body["input"][: len(FIRST_INPUT)] == FIRST_INPUT
    assert [item["type"] for item in body["input"]] == [
        "message",
        *(item["type"] for item in output),
        "function_call_output",
    ]
    assert body["input"][len(FIRST_INPUT)]["id"] == output[0]["id"]
    assert body["input"][-1] == result
    assert "previous_response_id" not in body and "type" not in body and body["store"] is False
    # The WebSocket's own headers stay between the client and tvgate.
    assert not any(name.lower().startswith("sec-websocket") for name in two.headers)
    assert "responses_websockets" not in two.headers.get("openai-beta", "")
    traces = gateway.wait_traces(2, session_id=session)
    assert [t.transport for t in traces] == ["websocket", "websocket"]
    assert {t.outcome for t in traces} == {"ok"}
    assert {t.endpoint for t in traces} == {"openai.responses"} and all(t.stream for t in traces)
    assert all(t.input_tokens > 0 and t.output_tokens > 0 for t in traces)
    assert traces[1].message_id == second[-1].response.id
    assert f"websocket: continues {done.response.id} (3 input items kept)" in traces[1].anomalies
    assert "websocket: continues" not in traces[0].anomalies
    shown = httpx2.get(
        f"{gateway.url}/api/v1/traces/{traces[1].id}",
        headers={"Authorization": f"Bearer {member_token}"},
        timeout=10,
    ).json()
    assert shown["transport"] == "websocket"
    # The request recorded is the whole input that went upstream.
    assert [item["type"] for item in shown["request"]["input"]][-1] == "function_call_output"


def test_warm_up_answers_without_a_provider_and_starts_the_conversation(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    headers, test_id, session = tagged("normal")
    with raw_socket(gateway, member_token, **headers) as ws:
        # Codex's warm-up: the request's state, no model, no output wanted.
        create(ws, input=FIRST_INPUT, tools=TOOLS, generate=False)
        warm = events_until_done(ws)
        assert [e["type"] for e in warm] == ["response.created", "response.completed"]
        assert warm[-1]["response"]["output"] == [] and warm[-1]["response"]["id"]
        more = [{"type": "message", "role": "user", "content": "and the licence"}]
        create(
            ws,
            model="gpt-test",
            input=more,
            tools=TOOLS,
            previous_response_id=warm[-1]["response"]["id"],
        )
        assert events_until_done(ws)[-1]["type"] == "response.completed"
    (upstream,) = provider_requests(fake_provider, test_id, 1)
    assert upstream.json()["input"] == [*FIRST_INPUT, *more]
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.transport == "websocket" and trace.outcome == "ok"


def test_per_frame_errors_are_error_events_and_the_connection_stays_open(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    headers, test_id, session = tagged("normal")
    with raw_socket(gateway, member_token, **headers) as ws:
        create(ws, model="gpt-test", input="hi", previous_response_id="resp_nobody")
        (error,) = events_until_done(ws)
        assert error["type"] == "error" and error["status"] == 400
        assert error["error"]["code"] == "previous_response_not_found"
        assert error["error"]["param"] == "previous_response_id"
        ws.send("not json")
        assert events_until_done(ws)[0]["error"]["code"] == "invalid_json"
        ws.send(orjson.dumps({"type": "session.update"}).decode())
        assert events_until_done(ws)[0]["error"]["code"] == "unknown_event_type"
        create(ws, model="no-such-route", input="hi")
        (missing,) = events_until_done(ws)
        assert missing["status"] == 404 and "no-such-route" in missing["error"]["message"]
        create(ws, model="gpt-test", input="hi")
        assert events_until_done(ws)[-1]["type"] == "response.completed"
    (upstream,) = provider_requests(fake_provider, test_id, 1)
    assert upstream.json()["input"] == [{"type": "message", "role": "user", "content": "hi"}]
    # The refused route left its trace too, as an HTTP call would.
    traces = gateway.wait_traces(2, session_id=session)
    assert [(t.outcome, t.status_code) for t in traces] == [("rejected", 404), ("ok", 200)]


def test_one_response_at_a_time_per_connection(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    headers, test_id, session = tagged("drip", events="20", interval="0.05")
    with raw_socket(gateway, member_token, **headers) as ws:
        started(ws, "first")
        create(ws, model="gpt-test", input="second")
        # The refusal comes at once, between the first response's events, which go on.
        refused = events_until_done(ws)[-1]
        assert refused["type"] == "error" and refused["status"] == 400
        assert refused["error"]["code"] == "response_already_in_progress"
        assert events_until_done(ws)[-1]["type"] == "response.completed"
    provider_requests(fake_provider, test_id, 1)
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "ok"


def test_a_bad_credential_is_refused_before_the_upgrade(gateway: GatewayProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        with raw_socket(gateway, "tvg_not-a-token"):
            pass
    response = refused.value.response
    assert response.status_code == 401
    error = orjson.loads(response.body or b"")["error"]
    assert error["message"].startswith("invalid credential") and error["type"]
    with pytest.raises(InvalidStatus) as missing:
        with connect(socket_url(gateway), open_timeout=10):
            pass
    assert missing.value.response.status_code == 401


def test_the_proxy_alias_serves_the_socket(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    headers, test_id, _ = tagged("normal")
    with raw_socket(gateway, member_token, "/proxy/openai/v1/responses", **headers) as ws:
        create(ws, model="gpt-test", input="hi")
        assert events_until_done(ws)[-1]["type"] == "response.completed"
    provider_requests(fake_provider, test_id, 1)


def test_a_member_over_budget_gets_the_error_event(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    gateway.bind()
    email = f"ws-{uuid.uuid4().hex[:8]}@acme.test"
    services.add_user(email, "acme")
    token, _ = services.issue_token(email, "acme", name="tests")
    services.set_budget(
        "acme", scope="user", subject=email, metric="tokens", period="day", amount=1
    )
    headers, test_id, session = tagged("normal")
    with raw_socket(gateway, token, **headers) as ws:
        # The budget reaches the gateway within its change poll: until then, calls pass.
        deadline = time.monotonic() + 10
        while True:
            create(ws, model="gpt-test", input="count my tokens please")
            events = events_until_done(ws)
            if events[-1]["type"] == "error" or time.monotonic() > deadline:
                break
        refused = events[-1]
        assert refused["type"] == "error" and refused["status"] == 429
        assert "token budget per day of user" in refused["error"]["message"]
        assert refused["error"]["code"] == "rate_limit_exceeded"
        assert int(refused["error"]["headers"]["retry-after"]) > 0
        create(ws, model="gpt-test", input="again")
        assert events_until_done(ws)[-1]["status"] == 429  # the connection still answers
    traces = gateway.wait_traces(len(fake_requests(fake_provider, test_id)) + 2, session_id=session)
    assert [t.outcome for t in traces[-2:]] == ["rejected", "rejected"]
    assert {t.transport for t in traces} == {"websocket"}


def test_client_gone_mid_stream_cancels_the_upstream(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    # 50 events 0.1 s apart: the provider would be busy for 5 s if nobody stopped it.
    headers, test_id, session = tagged("drip", events="50", interval="0.1")
    with raw_socket(gateway, member_token, **headers) as ws:
        started(ws, "hi", until="response.output_text.delta")
        ws.socket.close()  # gone, without a closing handshake
    (upstream,) = provider_requests(fake_provider, test_id, 1)
    assert fake_provider.wait_closed(upstream.id, timeout=5) is not None
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "client_cancelled" and trace.transport == "websocket"


@contextmanager
def own_gateway(
    tmp_path: Path, fake: FakeProvider, **env: str
) -> Iterator[tuple[GatewayProcess, str]]:
    """A gateway of the test's own with ``env`` (the test may stop it), and a member's token."""
    gw = launch(tmp_path, fake, **env)
    try:
        yield gw, gw.tokens["dev@acme.test"]
    finally:
        stop_gateway(gw.proc)


def test_a_stop_closes_idle_sockets_and_cuts_a_running_response_at_the_drain_timeout(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    headers, _, session = tagged("drip", events="200", interval="0.25")
    with own_gateway(tmp_path, fake_provider, TVGATE_DRAIN_TIMEOUT="1") as (gw, token):
        with raw_socket(gw, token) as idle, raw_socket(gw, token, **headers) as busy:
            started(busy, "hi")
            gw.proc.send_signal(signal.SIGTERM)
            # The idle socket is closed at once, "going away", as keep-alive is refused.
            with pytest.raises(ConnectionClosed) as idle_closed:
                idle.recv(timeout=10)
            assert idle_closed.value.rcvd is not None and idle_closed.value.rcvd.code == 1001
            # The running response goes on until the drain timeout, then ends in band.
            events = events_until_done(busy)
            assert events[-1]["type"] == "error"
            assert "the gateway is shutting down" in orjson.dumps(events[-1]).decode()
            with pytest.raises(ConnectionClosed) as busy_closed:
                busy.recv(timeout=10)
            assert busy_closed.value.rcvd is not None and busy_closed.value.rcvd.code == 1001
        assert gw.proc.wait(30) == 0
    (trace,) = gw.traces(session_id=session)
    assert trace.outcome == "gateway_shutdown" and trace.transport == "websocket"


def test_a_client_that_stops_reading_pauses_the_provider(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    """The provider pushes 96 MiB of events as fast as it can; the client reads a few
    messages, then none: tvgate waits on its last message's write instead of reading on."""
    headers, test_id, _ = tagged("bulk", mb="96")
    with raw_socket(gateway, member_token, **headers) as ws:
        create(ws, model="gpt-test", input="hi")
        for _ in range(64):
            assert orjson.loads(ws.recv(timeout=10))["type"] == "ping"
        before = _rss_kib(gateway.proc.pid)
        (upstream,) = provider_requests(fake_provider, test_id, 1)
        # Unpaused, the gateway takes in over 100 MiB in this time (holding it for the client).
        time.sleep(outage(4.0))
        assert upstream.finished_at is None and upstream.closed_at is None
        grown = _rss_kib(gateway.proc.pid) - before
        assert grown < 48 * 1024, f"gateway grew {grown // 1024} MiB"
    assert fake_provider.wait_closed(upstream.id, timeout=5) is not None


@pytest.mark.parametrize("scenario", ["error_event", "error_500"])
def test_a_provider_that_echoes_its_key_never_shows_it_on_the_socket(
    gateway: GatewayProcess, member_token: str, scenario: str
) -> None:
    headers, _, session = tagged(scenario, **{"echo-key": "1"})
    with raw_socket(gateway, member_token, **headers) as ws:
        create(ws, model="gpt-test", input="hi")
        events = events_until_done(ws)
    sent = b"".join(orjson.dumps(event) for event in events)
    # The provider's echo reached the client, masked: all stars but its last four.
    assert events[-1]["type"] == "error" and b"****" + OPENAI_SECRET[-4:].encode() in sent
    assert OPENAI_SECRET.encode() not in sent and member_token.encode() not in sent
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "upstream_error" and trace.transport == "websocket"


def test_frames_and_the_kept_conversation_are_bounded_by_the_body_limit(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    with own_gateway(tmp_path, fake_provider, TVGATE_MAX_BODY_BYTES="65536") as (gw, token):
        with raw_socket(gw, token) as ws:
            # Each turn is under the limit; the conversation grows past it with the second,
            # which is served whole and then let go, not kept in part.
            previous = None
            for _ in range(2):
                create(ws, model="gpt-test", input="x" * 40_000, previous_response_id=previous)
                done = events_until_done(ws)[-1]
                assert done["type"] == "response.completed"
                previous = done["response"]["id"]
            create(ws, model="gpt-test", input="more", previous_response_id=previous)
            assert events_until_done(ws)[-1]["error"]["code"] == "previous_response_not_found"
            # A frame over the limit closes the connection: message too big.
            create(ws, model="gpt-test", input="x" * 70_000)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
