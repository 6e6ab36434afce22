"""UpstreamCurlClient: provider calls through UpstreamExchange against the fake provider.

The client runs in the test process (on the session's IOLoop) with one curl handle,
so that every call reuses the handle the previous one used: what a call leaves
behind on it is what the next one would inherit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import sys
import weakref
from collections.abc import AsyncIterator

import pytest
from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders

from tests.conftest import ANTHROPIC_SECRET, free_port
from tests.fake_provider import FakeProvider
from tests.shapes import messages_request
from tvgate.proxy.curl_client import USER_AGENT, UpstreamCurlClient, _header_lines
from tvgate.proxy.upstream import (
    CURLE_ABORTED_BY_CALLBACK,
    CURLE_COULDNT_CONNECT,
    UpstreamExchange,
    UpstreamResult,
)

BODY = messages_request("claude-sonnet-4-6", 64, "hi")


class Recorder:
    """The listener side of an exchange: keeps what the provider sent."""

    def __init__(self, pause_every: int = 0) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.pause_every = pause_every
        self.offered = 0
        self.pauses = 0
        self.exchange: UpstreamExchange | None = None

    def on_upstream_headers(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = {name.lower(): value for name, value in headers}

    def on_upstream_chunk(self, chunk: bytes) -> bool:
        self.offered += 1
        if self.pause_every and self.offered % self.pause_every == 0:
            # Not taken: the exchange pauses the transfer until resume().
            self.pauses += 1
            assert self.exchange is not None
            asyncio.get_running_loop().call_soon(self.exchange.resume)
            return False
        self.chunks.append(chunk)
        return True

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@pytest.fixture
async def client() -> AsyncIterator[UpstreamCurlClient]:
    http = UpstreamCurlClient(max_clients=1, force_instance=True)
    yield http
    http.close()


def exchange(
    client: UpstreamCurlClient,
    url: str,
    listener: Recorder,
    *,
    body: bytes | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    allow_private: bool = True,
    idle_timeout: int = 30,
) -> UpstreamExchange:
    sent = {"x-api-key": ANTHROPIC_SECRET, "anthropic-version": "2023-06-01"}
    if method == "POST":
        sent["content-type"] = "application/json"
    sent.update(headers or {})
    if body is None and method == "POST":
        body = json.dumps(BODY).encode()
    made = UpstreamExchange(
        client,
        url,
        sent,
        body,
        listener,
        method=method,
        connect_timeout=5,
        idle_timeout=idle_timeout,
        allow_private=allow_private,
    )
    listener.exchange = made
    return made


def scenario_exchange(
    client: UpstreamCurlClient, fake: FakeProvider, listener: Recorder, name: str, **params: str
) -> UpstreamExchange:
    """A Messages call to the fake provider in its scenario ``name``; ``params`` are the
    scenario's x-fake-* headers (``mb="2"``: ``x-fake-mb: 2``)."""
    headers = {"x-fake-scenario": name} | {f"x-fake-{k}": v for k, v in params.items()}
    return exchange(client, fake.url + "/v1/messages", listener, headers=headers)


async def call(
    client: UpstreamCurlClient, url: str, **kwargs: object
) -> tuple[UpstreamResult, Recorder]:
    listener = Recorder()
    result = await exchange(client, url, listener, **kwargs).run()  # type: ignore[arg-type]
    return result, listener


async def test_a_call_is_sent_as_given_and_streamed_back(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    body = json.dumps({**BODY, "stream": True}).encode()
    result, got = await call(
        client, fake_provider.url + "/v1/messages?beta=true", body=body, headers={"x-trace": "1"}
    )
    assert result == UpstreamResult(0, "")
    assert got.status == 200
    assert got.headers["content-type"].startswith("text/event-stream")
    assert got.body.startswith(b"event: message_start\n") and b"event: message_stop" in got.body
    sent = fake_provider.requests[-1]
    assert (sent.method, sent.path, sent.query, sent.body) == (
        "POST",
        "/v1/messages",
        "beta=true",
        body,
    )
    assert sent.headers["x-api-key"] == ANTHROPIC_SECRET
    assert sent.headers["x-trace"] == "1"
    assert sent.headers["content-length"] == str(len(body))
    # As the stock client sends it: its user agent, no "Expect: 100-continue", no Pragma,
    # no Accept-Encoding (the answer is relayed as the provider encoded it).
    assert sent.headers["user-agent"] == USER_AGENT
    assert "expect" not in sent.headers and "pragma" not in sent.headers
    assert "accept-encoding" not in sent.headers


async def test_header_lines_go_up_as_the_stock_client_writes_them(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    """Every line in order, a repeated name on lines of its own, a Latin-1 value as Latin-1."""
    headers = HTTPHeaders()
    for name, value in (("X-A", "1"), ("X-Note", "caf\xe9"), ("X-A", "2")):
        headers.add(name, value)
    assert _header_lines(headers) == [
        b"Expect: ",
        b"Pragma: ",
        b"X-A: 1",
        b"X-A: 2",
        b"X-Note: caf\xe9",
    ]
    del headers["X-Note"]
    assert _header_lines(headers) == [b"Expect: ", b"Pragma: ", b"X-A: 1", b"X-A: 2"]
    result, _ = await call(
        client, fake_provider.url + "/v1/messages", headers={"x-note": "caf\xe9"}
    )
    assert result.curl_error == 0 and fake_provider.requests[-1].headers["x-note"] == "caf\xe9"


async def test_a_reused_handle_carries_nothing_from_the_call_before(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    # A refused address (the check installs an open-socket function), a POST with a body
    # and headers, then a GET on the same handle: none of the earlier state shows.
    refused, _ = await call(client, fake_provider.url + "/v1/messages", allow_private=False)
    assert refused.refused.startswith("upstream address 127.0.0.1")
    assert refused.curl_error != 0
    posted, _ = await call(
        client, fake_provider.url + "/v1/messages", headers={"x-fake-scenario": "tool_use"}
    )
    assert posted.curl_error == 0 and posted.refused == ""
    listed, got = await call(client, fake_provider.url + "/v1/models", method="GET")
    assert listed.curl_error == 0 and got.status == 200
    assert json.loads(got.body)["data"][0]["type"] == "model"
    sent = fake_provider.requests[-1]
    assert (sent.method, sent.body) == ("GET", b"")
    assert "x-fake-scenario" not in sent.headers
    assert "content-length" not in sent.headers and "content-type" not in sent.headers
    again, _ = await call(client, fake_provider.url + "/v1/messages")
    assert again.curl_error == 0 and fake_provider.requests[-1].method == "POST"


async def test_a_finished_call_is_not_kept_alive_by_the_handle(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    body = json.dumps({**BODY, "metadata": {"user_id": "kept-alive"}}).encode()
    references = sys.getrefcount(body)
    listener = Recorder()
    made = exchange(client, fake_provider.url + "/v1/messages", listener, body=body)
    await made.run()
    calls, listeners = weakref.ref(made), weakref.ref(listener)
    del made, listener
    # The loop callback that resumed this test holds the fetch's future (and through the
    # response, the request) until it returns: let it return first.
    await asyncio.sleep(0)
    gc.collect()
    # Neither the exchange (its callbacks were on the handle) nor the body (curl sent it
    # from the handle) is held by the idle handle.
    assert calls() is None and listeners() is None
    assert sys.getrefcount(body) == references


async def test_error_statuses_are_answers_and_transport_failures_errors(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    result, got = await call(
        client, fake_provider.url + "/v1/messages", headers={"x-fake-scenario": "error_529"}
    )
    assert result.curl_error == 0 and got.status == 529
    assert json.loads(got.body)["error"]["type"] == "overloaded_error"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", free_port()))
        port = closed.getsockname()[1]
        failed, _ = await call(client, f"http://127.0.0.1:{port}/v1/messages")
    assert failed.curl_error == CURLE_COULDNT_CONNECT
    # A transfer cut by the provider (TCP RST) fails, and the handle serves the next call.
    cut, _ = await call(
        client,
        fake_provider.url + "/v1/messages",
        headers={"x-fake-scenario": "reset"},
        body=json.dumps({**BODY, "stream": True}).encode(),
    )
    assert cut.curl_error != 0
    after, got = await call(client, fake_provider.url + "/v1/messages")
    assert after.curl_error == 0 and got.status == 200


async def test_redirects_are_relayed_not_followed(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    fake_provider.clear()
    result, got = await call(
        client, fake_provider.url + "/v1/messages", headers={"x-fake-scenario": "redirect"}
    )
    assert result.curl_error == 0 and got.status == 307
    assert got.headers["location"].endswith("/v1/redirected")
    assert [r.path for r in fake_provider.requests] == ["/v1/messages"]


async def test_a_paused_transfer_resumes_and_loses_nothing(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    listener = Recorder(pause_every=3)
    made = scenario_exchange(client, fake_provider, listener, "bulk", mb="2")
    result = await made.run()
    assert result.curl_error == 0 and listener.pauses > 0
    # What the fake provider's bulk scenario sends for 2 MiB, every byte of it.
    event = b'event: ping\ndata: {"type": "ping", "pad": "' + b"x" * 1000 + b'"}\n\n'
    chunk = event * 64
    assert listener.body == chunk * (2 * 1024 * 1024 // len(chunk))


async def test_abort_ends_a_silent_transfer_and_a_paused_one(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    listener = Recorder()
    made = scenario_exchange(client, fake_provider, listener, "hang", hang="30")
    asyncio.get_running_loop().call_later(0.2, made.abort)
    result = await made.run()
    assert result.curl_error == CURLE_ABORTED_BY_CALLBACK and not result.timed_out
    closed = await asyncio.to_thread(fake_provider.wait_closed, fake_provider.requests[-1].id, 10)
    assert closed is not None

    class Stalled(Recorder):
        def on_upstream_chunk(self, chunk: bytes) -> bool:
            # Never takes anything: the transfer stays paused until aborted.
            assert self.exchange is not None
            if not self.pauses:
                self.pauses += 1
                asyncio.get_running_loop().call_soon(self.exchange.abort)
            return False

    stalled = Stalled()
    made = scenario_exchange(client, fake_provider, stalled, "bulk", mb="20")
    result = await made.run()
    assert result.curl_error != 0 and stalled.pauses == 1
    after, got = await call(client, fake_provider.url + "/v1/messages")
    assert after.curl_error == 0 and got.status == 200


async def test_a_silent_provider_times_out(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    body = json.dumps({**BODY, "stream": True}).encode()
    result, got = await call(
        client,
        fake_provider.url + "/v1/messages",
        body=body,
        headers={"x-fake-scenario": "drip", "x-fake-events": "3", "x-fake-interval": "4"},
        idle_timeout=1,
    )
    assert result.timed_out and result.curl_error == CURLE_ABORTED_BY_CALLBACK
    assert got.status == 200 and got.body.startswith(b"event: message_start")


async def test_requests_beyond_the_handles_wait_for_one(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    results = await asyncio.gather(
        *(
            call(client, fake_provider.url + "/v1/messages", headers={"x-n": str(n)})
            for n in range(6)
        )
    )
    assert [(r.curl_error, got.status) for r, got in results] == [(0, 200)] * 6
    assert sorted(r.headers["x-n"] for r in fake_provider.requests[-6:]) == list("012345")


async def test_closed_connections_and_reused_descriptors(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    # Each call closes its connection; the next socket usually gets the same number,
    # without libcurl having removed it first: the client must still watch it.
    for n in range(20):
        result, got = await call(
            client,
            fake_provider.url + "/v1/messages",
            headers={"Connection": "close", "x-n": str(n)},
        )
        assert (result.curl_error, got.status) == (0, 200)
    assert fake_provider.requests[-1].headers["x-n"] == "19"


def connections_to(port: int) -> set[str]:
    """This process's open sockets connected to ``port`` (client side), by inode."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] != "0":
                    inodes.add(f"socket:[{fields[9]}]")
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed since
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target in inodes:
                found.add(target)
    return found


async def test_close_releases_every_socket(fake_provider: FakeProvider) -> None:
    before = connections_to(fake_provider.port)
    http = UpstreamCurlClient(max_clients=3, force_instance=True)
    results = await asyncio.gather(
        *(call(http, fake_provider.url + "/v1/messages") for _ in range(3))
    )
    assert all(result.curl_error == 0 for result, _ in results)
    assert connections_to(fake_provider.port) - before  # kept alive for the next calls
    http.close()
    assert connections_to(fake_provider.port) - before == set()


async def test_requests_it_cannot_serve_are_refused(
    client: UpstreamCurlClient, fake_provider: FakeProvider
) -> None:
    url = fake_provider.url + "/v1/models"
    with pytest.raises(ValueError, match="prepare_curl_callback"):
        await client.fetch(HTTPRequest(url, request_timeout=0, follow_redirects=False))
    for unsupported in (
        {"follow_redirects": True},
        {"decompress_response": True},
        {"request_timeout": 20},
        {"streaming_callback": lambda _chunk: None},
        {"proxy_host": "127.0.0.1", "proxy_port": 3128},
    ):
        options: dict[str, object] = {
            "request_timeout": 0,
            "follow_redirects": False,
            "decompress_response": False,
            "prepare_curl_callback": lambda _curl: None,
            **unsupported,
        }
        with pytest.raises(ValueError, match="does not support"):
            await client.fetch(HTTPRequest(url, **options))  # type: ignore[arg-type]
    listener = Recorder()
    made = exchange(client, fake_provider.url + "/v1/messages", listener, method="PUT")
    with pytest.raises(ValueError, match="PUT"):
        await made.run()
    after, got = await call(client, fake_provider.url + "/v1/messages")
    assert after.curl_error == 0 and got.status == 200


async def test_curl_never_logs_the_provider_key(
    client: UpstreamCurlClient,
    fake_provider: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # Tornado's client turns on curl's verbose output when its logger is at DEBUG.
    logger = logging.getLogger("tornado.curl_httpclient")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG):
            result, _ = await call(client, fake_provider.url + "/v1/messages")
    finally:
        logger.setLevel(level)
    assert result.curl_error == 0
    out, err = capfd.readouterr()
    assert ANTHROPIC_SECRET not in caplog.text + out + err
