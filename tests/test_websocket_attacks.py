"""A hostile client against the Responses WebSocket (``tvgate.proxy.websocket``): what an
upgraded socket may hold of the gateway (connections per address, memory for a client that
sends and never reads)."""

from __future__ import annotations

import contextlib
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import httpx2

from tests.fake_provider import FakeProvider
from tests.test_reliability_misc import _closed_by_server
from tests.test_websocket_responses import own_gateway, raw_socket


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
