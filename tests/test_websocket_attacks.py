"""A hostile client against the Responses WebSocket (``tvgate.proxy.websocket``): what an
upgraded socket may hold of the gateway (connections per address, memory for a client that
sends and never reads)."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import time
from contextlib import ExitStack
from pathlib import Path

import httpx2
import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import GatewayProcess
from tests.fake_provider import FakeProvider
from tests.test_cloud_vertex import signed_in
from tests.test_faults import _rss_kib
from tests.test_reliability_misc import _closed_by_server
from tests.test_websocket_responses import (
    create,
    events_until_done,
    own_gateway,
    provider_requests,
    raw_socket,
    socket_url,
    tagged,
)


def test_upgraded_sockets_count_against_the_per_address_cap(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    """Issue 17's cap holds for WebSockets too: an upgrade hands the connection over to the
    socket, and it is still one of its address's until the socket closes."""
    cap = 4
    env = {"TVGATE_MAX_CONNECTIONS_PER_ADDRESS": str(cap)}
    with own_gateway(tmp_path, fake_provider, **env) as (gw, token), ExitStack() as held:
        sockets = [held.enter_context(raw_socket(gw, token)) for _ in range(cap)]
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as extra:
            extra.settimeout(5)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                extra.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert _closed_by_server(extra), f"connection {cap + 1} beside {cap} sockets was kept"
        # One socket goes: its address may open a connection again.
        sockets.pop().close()
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(gw.url + "/healthz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "no connection admitted after a socket closed"
            time.sleep(0.1)


def _upgraded(gateway: GatewayProcess, token: str) -> socket.socket:
    """A TCP connection upgraded to a Responses WebSocket, by hand: the test decides when
    (if ever) it reads."""
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    # A small receive window: what the client leaves unread waits in the gateway.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/responses HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(1)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


def _text_frame(payload: bytes) -> bytes:
    """A client's text frame (masked, as RFC 6455 has clients send them)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    # Masking a large payload byte by byte is slow: XOR it as one integer.
    whole = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(length, "big")
    return head + mask + masked


def test_a_client_that_sends_and_never_reads_is_not_buffered_for(
    gateway: GatewayProcess, member_token: str
) -> None:
    """A warm-up is answered with two events naming its model, as the API does (this one's
    is 1 MiB). A client that sends 128 of them and reads nothing must find the gateway
    stops reading its frames, rather than holding 256 MiB of answers for it."""
    warm_up = {"type": "response.create", "generate": False, "model": "x" * (1 << 20)}
    frame = _text_frame(orjson.dumps(warm_up))
    sock = _upgraded(gateway, member_token)
    with sock:
        before = _rss_kib(gateway.proc.pid)
        sock.settimeout(5)
        with contextlib.suppress(TimeoutError):
            for _ in range(128):
                sock.sendall(frame)
        grown = _rss_kib(gateway.proc.pid) - before
        assert grown < 48 * 1024, f"gateway grew {grown // 1024} MiB for a client not reading"
        # Reading again, the client gets its answers: the connection was only paused.
        sock.settimeout(10)
        assert sock.recv(2)[:1] == b"\x81"


def test_a_providers_endless_event_is_cut_at_the_body_limit(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    """A hostile provider's event that never ends (8 MiB, no blank line): the socket makes
    no message of it past the body limit (1 MiB here), tells the client in an error event,
    stops the provider and says so in the trace."""
    headers, test_id, session = tagged("bulk", mb="8", endless="1")
    limit = 1 << 20
    env = {"TVGATE_MAX_BODY_BYTES": str(limit)}
    with own_gateway(tmp_path, fake_provider, **env) as (gw, token):
        with raw_socket(gw, token, **headers) as ws:
            create(ws, model="gpt-test", input="hi")
            messages = []
            while True:
                message = ws.recv(timeout=20)
                messages.append(message)
                if orjson.loads(message)["type"] == "error":
                    break
        assert max(len(m) for m in messages) < limit
        error = orjson.loads(messages[-1])
        assert "larger than" in error["error"]["message"], error
        (upstream,) = provider_requests(fake_provider, test_id, 1)
        assert fake_provider.wait_closed(upstream.id, timeout=5) is not None
        (trace,) = gw.wait_traces(1, session_id=session)
        assert trace.outcome == "upstream_error" and trace.transport == "websocket"


def test_a_signed_in_browser_cannot_open_a_socket_for_another_site(
    gateway: GatewayProcess, member_token: str
) -> None:
    """Cross-site WebSocket hijacking: a page elsewhere opens the socket in the browser of
    someone signed in to the web UI. Its cookies are no credential at the upgrade (a
    browser cannot add a token header to a WebSocket), and a foreign Origin is refused."""
    with signed_in(gateway, member_token) as browser:
        cookies = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    assert cookies
    site = {"Origin": "https://evil.example"}
    for headers, status in (
        ({"Cookie": cookies, **site}, 401),
        ({"Cookie": cookies}, 401),
        ({"Authorization": f"Bearer {member_token}", **site}, 403),
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(socket_url(gateway), additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == status, headers


def test_a_credential_in_the_socket_urls_query_is_refused_and_never_logged(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    """Some clients put a key in a WebSocket URL (``?api_key=``): tvgate signs in by header
    only, and the URL, query and all, is in no log line, whatever the upgrade comes to."""
    with own_gateway(tmp_path, fake_provider, TVGATE_LOG_LEVEL="debug") as (gw, token):
        url = socket_url(gw) + f"?api_key={token}&access_token={token}"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=10)
        assert refused.value.response.status_code == 401
        # A malformed upgrade (Tornado's own refusals) and a foreign Origin.
        plain = gw.url + f"/v1/responses?api_key={token}"
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
        bad = httpx2.get(plain, headers={**upgrade, "Authorization": f"Bearer {token}"})
        assert bad.status_code in (400, 426)  # no key: refused, before any socket
        with pytest.raises(InvalidStatus):
            connect(url, additional_headers={"Origin": "https://evil.example"}, open_timeout=10)
        with raw_socket(gw, token, path=f"/v1/responses?api_key={token}") as ws:
            create(ws, model="no-such-route", input="hi")
            assert orjson.loads(ws.recv(timeout=10))["status"] == 404
        log = gw.log_text()
        assert token not in log and token[-12:] not in log


def test_a_response_id_of_another_connection_continues_nothing(
    gateway: GatewayProcess, fake_provider: FakeProvider, member_token: str
) -> None:
    """A conversation is its connection's: another user's socket, or the same user's next
    one, sending that response's id is refused, and nothing of its input goes upstream."""
    headers, test_id, _ = tagged("normal")
    with raw_socket(gateway, member_token, **headers) as first:
        create(first, model="gpt-test", input="the secret plan")
        done = events_until_done(first)[-1]
        assert done["type"] == "response.completed"
        kept = done["response"]["id"]
        for token in (gateway.tokens["admin@acme.test"], member_token):
            with raw_socket(gateway, token, **headers) as other:
                create(other, model="gpt-test", input="go on", previous_response_id=kept)
                (error,) = events_until_done(other)
                assert error["error"]["code"] == "previous_response_not_found"
    (upstream,) = provider_requests(fake_provider, test_id, 1)
    assert b"the secret plan" in upstream.body


def test_an_error_event_quotes_a_bounded_part_of_what_the_client_sent(
    gateway: GatewayProcess, member_token: str
) -> None:
    """An unknown event type or previous response id of 100,000 characters: the error event
    names its beginning, not the whole of it back."""
    with raw_socket(gateway, member_token) as ws:
        for code, event in (
            ("unknown_event_type", {"type": "t" * 100_000}),
            (
                "previous_response_not_found",
                {"type": "response.create", "previous_response_id": "p" * 100_000},
            ),
        ):
            ws.send(orjson.dumps(event).decode())
            (error,) = events_until_done(ws)
            assert error["error"]["code"] == code
            assert len(error["error"]["message"]) < 300, error["error"]["message"][:80]
