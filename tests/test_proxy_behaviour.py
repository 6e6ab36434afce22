"""How the proxy treats connections, headers and bad input, seen from outside over real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
import uuid

import httpx2
import orjson
import pytest
import zstandard

from tests.conftest import ANTHROPIC_SECRET, MAX_BODY_BYTES, GatewayProcess
from tests.fake_provider import FakeProvider, RecordedRequest

MESSAGE_BODY = {
    "model": "claude-test",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello"}],
}


def recorded(fake: FakeProvider, test_id: str, timeout: float = 5.0) -> RecordedRequest:
    """The request the fake received carrying our ``x-test-id`` header."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in list(fake.requests):
            if request.headers.get("x-test-id") == test_id:
                return request
        time.sleep(0.01)
    raise AssertionError(f"the provider never saw request {test_id}")


def raw_stream_request(
    gateway: GatewayProcess, token: str, headers: dict[str, str]
) -> socket.socket:
    """Open a streaming /v1/messages call on a raw socket, so the test controls the close."""
    body = orjson.dumps({**MESSAGE_BODY, "stream": True})
    host, port = gateway.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = [
        "POST /v1/messages HTTP/1.1",
        f"Host: {host}",
        f"x-api-key: {token}",
        "anthropic-version: 2023-06-01",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def tagged_stream(
    gateway: GatewayProcess, token: str, scenario: str, **params: str
) -> tuple[socket.socket, str, str]:
    """``raw_stream_request`` in the fake's ``scenario`` (``params``: its x-fake-* headers),
    with an x-test-id and a session of its own: the socket, the test id, the session."""
    test_id, session = uuid.uuid4().hex, uuid.uuid4().hex
    headers = {f"x-fake-{name}": value for name, value in params.items()}
    headers.update({"x-fake-scenario": scenario, "x-test-id": test_id, "x-tvgate-session": session})
    return raw_stream_request(gateway, token, headers), test_id, session


def test_client_disconnect_mid_stream_aborts_upstream(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    # 50 events 0.1 s apart: the provider would be busy for 5 s if nobody stopped it.
    sock, test_id, session = tagged_stream(
        gateway, member_token, "drip", interval="0.1", events="50"
    )
    received = b""
    while b"content_block_delta" not in received:
        chunk = sock.recv(65536)
        assert chunk, "stream ended before the first delta"
        received += chunk
    sock.close()
    closed_by_client = time.monotonic()
    upstream = recorded(fake_provider, test_id)
    noticed = fake_provider.wait_closed(upstream.id, timeout=5)
    assert noticed is not None, "the provider's connection stayed open"
    assert noticed - closed_by_client < 1.0
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "client_cancelled"


def test_client_that_hangs_up_after_the_last_event_got_an_ok_call(
    gateway: GatewayProcess, member_token: str
) -> None:
    session = uuid.uuid4().hex
    for _ in range(5):
        sock = raw_stream_request(gateway, member_token, {"x-tvgate-session": session})
        received = b""
        while b"message_stop" not in received:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        sock.close()  # before the chunked body's end, as SDKs do once they have the last event
    traces = gateway.wait_traces(5, session_id=session)
    assert {t.outcome for t in traces} == {"ok"}


def test_client_disconnect_before_upstream_answers(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    sock, test_id, session = tagged_stream(gateway, member_token, "hang", hang="10")
    upstream = recorded(fake_provider, test_id)
    sock.close()
    closed_by_client = time.monotonic()
    noticed = fake_provider.wait_closed(upstream.id, timeout=5)
    assert noticed is not None and noticed - closed_by_client < 2.0
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.outcome == "client_cancelled" and trace.status_code == 0


async def test_fifty_concurrent_streams_progress_together(
    gateway: GatewayProcess, member_token: str
) -> None:
    """No stream waits for another to finish (curl's max_clients is not the default 10)."""
    headers = {
        "x-api-key": member_token,
        "anthropic-version": "2023-06-01",
        "x-fake-scenario": "drip",
        "x-fake-interval": "0.1",
        "x-fake-events": "10",
    }
    body = {**MESSAGE_BODY, "stream": True}
    first_delta: list[float] = []
    finished: list[float] = []

    async def one(client: httpx2.AsyncClient) -> None:
        async with client.stream("POST", "/v1/messages", json=body, headers=headers) as response:
            assert response.status_code == 200
            seen = False
            async for line in response.aiter_lines():
                if not seen and line.startswith("event: content_block_delta"):
                    first_delta.append(time.monotonic())
                    seen = True
            finished.append(time.monotonic())

    limits = httpx2.Limits(max_connections=100)
    async with httpx2.AsyncClient(base_url=gateway.url, limits=limits, timeout=60) as client:
        await asyncio.gather(*(one(client) for _ in range(50)))
    assert len(first_delta) == len(finished) == 50
    # Every stream had started delivering before the first one ended.
    assert max(first_delta) < min(finished)


def test_headers_query_and_body_reach_the_provider_as_sent(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    test_id = uuid.uuid4().hex
    body = {**MESSAGE_BODY, "unknown_field": {"kept": [1, 2.5, "x"]}, "metadata": {"user_id": "u1"}}
    response = httpx2.post(
        gateway.url + "/v1/messages?beta=true",
        content=orjson.dumps(body),
        headers={
            "Authorization": f"Bearer {member_token}",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
            "Content-Type": "application/json",
            "X-Claude-Code-Session-Id": "8f91d5c2-ae4e-411a-b178-477b32eaa22e",
            "x-tvgate-repo": "acme/secret-project",
            "x-tracevault-branch": "main",
            "x-test-id": test_id,
            "User-Agent": "claude-cli/2.1.197 (external, sdk-cli)",
        },
    )
    assert response.status_code == 200
    assert float(response.headers["x-tvgate-overhead-ms"]) >= 0
    upstream = recorded(fake_provider, test_id)
    assert upstream.query == "beta=true"
    assert upstream.headers["x-api-key"] == ANTHROPIC_SECRET
    assert "authorization" not in upstream.headers
    assert (
        upstream.headers["anthropic-beta"] == "claude-code-20250219,interleaved-thinking-2025-05-14"
    )
    assert upstream.headers["x-claude-code-session-id"] == "8f91d5c2-ae4e-411a-b178-477b32eaa22e"
    assert "x-tvgate-repo" not in upstream.headers and "x-tracevault-branch" not in upstream.headers
    sent = orjson.loads(upstream.body)
    assert sent == {**body, "model": "claude-upstream-1"}
    (trace,) = gateway.wait_traces(1, session_id="8f91d5c2-ae4e-411a-b178-477b32eaa22e")
    assert (trace.tool, trace.tool_version) == ("claude-code", "2.1.197")
    assert trace.upstream_request_id == response.headers["request-id"]


def test_passthrough_route_sends_the_bytes_unchanged(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    test_id = uuid.uuid4().hex
    raw = (
        b'{"model": "claude-pass",  "max_tokens": 5, "messages": [{"role":"user","content":"hi"}]}'
    )
    response = httpx2.post(
        gateway.url + "/v1/messages",
        content=raw,
        headers={
            "x-api-key": member_token,
            "x-test-id": test_id,
            "content-type": "application/json",
        },
    )
    assert response.status_code == 200
    assert recorded(fake_provider, test_id).body == raw


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_compressed_request_bodies(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str, encoding: str
) -> None:
    test_id = uuid.uuid4().hex
    plain = orjson.dumps({"model": "gpt-test", "input": "compressed hello", "stream": True})
    packed = (
        gzip.compress(plain) if encoding == "gzip" else zstandard.ZstdCompressor().compress(plain)
    )
    response = httpx2.post(
        gateway.openai_url + "/responses",
        content=packed,
        headers={
            "Authorization": f"Bearer {member_token}",
            "Content-Encoding": encoding,
            "Content-Type": "application/json",
            "x-test-id": test_id,
        },
    )
    assert response.status_code == 200
    assert "response.completed" in response.text
    upstream = recorded(fake_provider, test_id)
    assert "content-encoding" not in upstream.headers
    assert orjson.loads(upstream.body)["input"] == "compressed hello"


def _post(gateway: GatewayProcess, path: str, content: bytes, **headers: str) -> httpx2.Response:
    return httpx2.post(gateway.url + path, content=content, headers=headers, timeout=30)


def test_missing_and_bad_credentials_are_401_in_each_envelope(gateway: GatewayProcess) -> None:
    body = orjson.dumps(MESSAGE_BODY)
    anthropic_error = _post(gateway, "/v1/messages", body)
    assert anthropic_error.status_code == 401
    assert anthropic_error.json()["type"] == "error"
    assert anthropic_error.json()["error"]["type"] == "authentication_error"
    openai_error = _post(gateway, "/v1/chat/completions", body, authorization="Bearer tvg_nope")
    assert openai_error.status_code == 401
    assert openai_error.json()["error"]["code"] == "invalid_api_key"
    assert "tvg_nope" not in openai_error.text


@pytest.mark.parametrize(
    ("content", "headers", "status", "words"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (b'{"messages": []}', {}, 400, "no 'model'"),
        (b'{"model": 42}', {}, 400, "no 'model'"),
        (b"", {}, 400, "empty"),
        (
            b'{"model":"nope-model"}',
            {},
            404,
            "claude-pass, claude-sonnet, claude-test, embed-test, gpt-test",
        ),
        (b'{"model":"other-claude"}', {}, 404, "no route named 'other-claude'"),
        (
            b'{"model":"claude-test"}',
            {"Content-Encoding": "br"},
            415,
            "unsupported Content-Encoding",
        ),
        (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, "does not decode"),
    ],
)
def test_bad_input_gets_a_4xx_in_the_anthropic_envelope(
    gateway: GatewayProcess,
    member_token: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    words: str,
) -> None:
    response = _post(gateway, "/v1/messages", content, **{"x-api-key": member_token, **headers})
    assert response.status_code == status, response.text
    envelope = response.json()
    assert envelope["type"] == "error"
    assert words in envelope["error"]["message"]


def test_body_over_the_limit_is_413(gateway: GatewayProcess, member_token: str) -> None:
    big = b'{"model":"claude-test","pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
    response = _post(gateway, "/v1/messages", big, **{"x-api-key": member_token})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


def test_compression_bomb_is_413(gateway: GatewayProcess, member_token: str) -> None:
    bomb = gzip.compress(b'{"model":"claude-test","pad":"' + b"0" * (64 * MAX_BODY_BYTES) + b'"}')
    assert len(bomb) < MAX_BODY_BYTES // 4
    response = _post(
        gateway, "/v1/messages", bomb, **{"x-api-key": member_token, "Content-Encoding": "gzip"}
    )
    assert response.status_code == 413


def test_route_of_the_other_provider_is_400_in_the_endpoints_envelope(
    gateway: GatewayProcess, member_token: str
) -> None:
    # Embeddings on an Anthropic route: a pair no translator serves (the translate_wired
    # and translate_responses_wired tests have the pairs one does).
    response = _post(
        gateway,
        "/v1/embeddings",
        orjson.dumps({"model": "claude-test", "input": "hi"}),
        authorization=f"Bearer {member_token}",
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message == (
        "route 'claude-test' goes to anthropic, which does not serve this openai.embeddings "
        "endpoint"
    )


def test_websocket_upgrade_of_an_http_only_endpoint_gets_426(
    gateway: GatewayProcess, member_token: str
) -> None:
    # Responses is served over WebSocket (test_websocket_responses); the others fall back.
    response = httpx2.get(
        gateway.url + "/v1/chat/completions",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Authorization": f"Bearer {member_token}",
        },
    )
    assert response.status_code == 426
    assert response.json()["error"]["message"]


def test_root_probe_and_unknown_paths(gateway: GatewayProcess) -> None:
    assert httpx2.head(gateway.url + "/").status_code == 200
    root = httpx2.get(gateway.url + "/")
    assert root.status_code == 200 and 'href="/ui/"' in root.text
    missing = httpx2.get(gateway.url + "/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx2.get(gateway.url + "/anthropic/v1/chat/completions").status_code == 404


def test_provider_prefixed_paths(gateway: GatewayProcess, member_token: str) -> None:
    response = _post(
        gateway,
        "/anthropic/v1/messages",
        orjson.dumps(MESSAGE_BODY),
        **{"x-api-key": member_token},
    )
    assert response.status_code == 200 and response.json()["type"] == "message"
    models = httpx2.get(
        gateway.url + "/openai/v1/models", headers={"authorization": f"Bearer {member_token}"}
    )
    assert models.json()["object"] == "list"


def test_every_routed_request_leaves_one_trace(gateway: GatewayProcess, member_token: str) -> None:
    session = uuid.uuid4().hex
    headers = {"x-api-key": member_token, "x-tvgate-session": session}
    bodies = [
        orjson.dumps(MESSAGE_BODY),
        orjson.dumps({**MESSAGE_BODY, "stream": True}),
        orjson.dumps({**MESSAGE_BODY, "model": "no-such-route"}),
        b"{broken",
    ]
    statuses = [_post(gateway, "/v1/messages", body, **headers).status_code for body in bodies]
    assert statuses == [200, 200, 404, 400]
    traces = gateway.wait_traces(4, session_id=session)
    assert sorted(t.outcome for t in traces) == ["ok", "ok", "rejected", "rejected"]
    ok = [t for t in traces if t.outcome == "ok"]
    assert all(t.input_tokens > 0 and t.output_tokens > 0 for t in ok)
    assert all(t.first_byte_at and t.finished_at and t.finished_at >= t.received_at for t in ok)
    assert {t.stream for t in ok} == {True, False}
    assert json.dumps([t.error_message for t in traces]).count(ANTHROPIC_SECRET) == 0
