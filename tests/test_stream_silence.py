"""A provider that goes silent mid-stream gets silence passed on, not keep-alives of ours.

Claude Code's idle watchdog gives up on a stream that sends nothing for a while and
retries; a gateway that filled the silence with pings, comments or whitespace would reset
it and keep a dead stream looking alive (issue 21.5). The fake provider's ``stall``
scenario sends the headers and one event, then nothing. The client here reads its socket
raw: after that event the next bytes to arrive must be the error event the gateway sends
when its idle timeout (``TVGATE_IDLE_TIMEOUT``) fires, then the stream's end, nothing
else. For Anthropic Messages, OpenAI Chat Completions and Responses streams.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import orjson
import pytest

from tests.conftest import GatewayProcess
from tests.fake_provider import FakeProvider
from tests.harness import beside
from tests.outages import outage, whole_seconds
from tvgate.providers import ENDPOINTS

#: The gateway's idle timeout here: short, so the stall outlasts it at once.
IDLE = whole_seconds(1)
STREAMS = {
    "messages": {"model": "claude-test", "max_tokens": 16, "stream": True},
    "chat/completions": {"model": "gpt-test", "stream": True},
    "responses": {"model": "gpt-test", "stream": True, "input": "hi"},
}


@pytest.fixture(scope="module")
def impatient(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    with beside(gateway, TVGATE_IDLE_TIMEOUT=str(IDLE)) as gw:
        yield gw


def _request(gw: GatewayProcess, path: str, body: dict[str, object], test_id: str) -> bytes:
    if path != "responses":
        body = {**body, "messages": [{"role": "user", "content": "hi"}]}
    content = orjson.dumps(body)
    host = gw.url.removeprefix("http://")
    lines = [
        f"POST /v1/{path} HTTP/1.1",
        f"Host: {host}",
        f"Authorization: Bearer {gw.tokens['dev@acme.test']}",
        "Content-Type: application/json",
        f"Content-Length: {len(content)}",
        "Connection: close",
        "x-fake-scenario: stall",
        f"x-fake-hang: {outage(30)}",
        f"x-test-id: {test_id}",
        f"x-tvgate-session: {test_id}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


class RawReader:
    """The client's socket, read as it arrives: each ``recv`` kept apart."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def until(self, marker: bytes) -> bytes:
        """Everything up to and including ``marker``, reading as much as it takes."""
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"the connection ended before {marker!r}: {self.buffer!r}"
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def rest(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.buffer += chunk
        rest, self.buffer = self.buffer, b""
        return rest


def _chunk(data: bytes) -> bytes:
    """``data`` as one chunk of HTTP/1.1 chunked framing."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


@pytest.mark.parametrize("path", list(STREAMS))
def test_no_byte_reaches_the_client_while_the_provider_is_silent(
    impatient: GatewayProcess, fake_provider: FakeProvider, path: str
) -> None:
    test_id = uuid.uuid4().hex
    host = fake_provider.url.removeprefix("http://")
    address, port = impatient.url.removeprefix("http://").split(":")
    with socket.create_connection((address, int(port))) as sock:
        sock.settimeout(outage(30))
        sock.sendall(_request(impatient, path, STREAMS[path], test_id))
        reader = RawReader(sock)
        head = reader.until(b"\r\n\r\n").lower()
        assert head.startswith(b"http/1.1 200") and b"transfer-encoding: chunked" in head
        assert b"text/event-stream" in head
        # The provider's one event, as it sent it: a chunk ending with the event's blank line.
        size = int(reader.until(b"\r\n"), 16)
        event = reader.until(b"\r\n")[:-2]
        assert len(event) == size and event.endswith(b"\n\n") and b"data: {" in event
        # Then the provider is silent; whatever arrives next on the socket, however late,
        # is all the rest of the response.
        after = reader.rest()
    message = (
        f"timed out waiting for the provider at {host}: nothing received for {IDLE} s"
        " (TVGATE_IDLE_TIMEOUT)"
    )
    error_event = ENDPOINTS[path].stream_error_event(message)
    assert after == _chunk(error_event) + b"0\r\n\r\n"
    (trace,) = impatient.wait_traces(1, session_id=test_id)
    assert trace.outcome == "timeout" and trace.truncated
    # The gateway gave up on the silent provider: its connection was dropped.
    upstream = next(r for r in fake_provider.requests if r.headers.get("x-test-id") == test_id)
    assert fake_provider.wait_closed(upstream.id, timeout=outage(10)) is not None
