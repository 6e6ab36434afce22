"""The gateway's HTTP server: what it does to each connection before Tornado reads requests.

Nagle's algorithm off for good, a deadline for a new connection's first request headers,
and a cap on the connections open at once from one peer address, upgraded WebSockets
included (``GatewayHTTPServer``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from tvgate.forwarded import Network, is_trusted_peer
from tvgate.metrics import Counter

#: Seconds a client connection may stay open with no request (an HTTP keep-alive one, a
#: Responses WebSocket with no response running) before the gateway closes it.
IDLE_CONNECTION_TIMEOUT = 3600


class GatewayHTTPServer(HTTPServer):
    """Tornado's HTTP server with Nagle's algorithm off for good on every connection, a
    deadline for a new connection's first request headers, and a cap on the connections
    open at once from one peer address.

    Tornado turns ``TCP_NODELAY`` on when a response finishes and off again after it:
    two system calls per request, and Nagle on while a stream is relayed, so an event
    written while the previous one is unacknowledged waits (up to the peer's delayed
    ACK, tens of milliseconds). A proxy sends every byte as soon as it has it: the
    option is set once when the connection is accepted and Tornado's toggling skipped.

    Tornado has one timer for "waiting for request headers": its idle connection
    timeout, which must stay long for nginx's kept-alive upstream connections. A client
    that opens connections and never finishes a request (slowloris) would hold each for
    that long; so a connection's first request must have its headers within
    ``header_timeout``, and one address may hold only ``max_per_address`` connections.
    Trusted proxies are not capped: behind nginx every client shares nginx's address,
    and nginx's own ``limit_conn`` is the place for a per-client cap.
    """

    def initialize(
        self,
        *args: Any,
        header_timeout: float | None = None,
        max_per_address: int = 0,
        uncapped: tuple[Network, ...] = (),
        refused: Counter | None = None,
        **kwargs: Any,
    ) -> None:
        super().initialize(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_per_address = max_per_address
        self.uncapped = uncapped
        self.refused = refused
        #: Open connections by capped peer address, and the address of each.
        self._per_address: dict[str, int] = {}
        self._peer_of: dict[IOStream, str] = {}
        #: The deadline of each connection whose first request headers have not arrived.
        self._header_deadlines: dict[IOStream, object] = {}

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        sock = stream.socket
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # the client may be gone already
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.set_nodelay = _keep_nodelay  # type: ignore[method-assign,assignment]
            if not self._admit(stream, str(address[0])):
                return
        if self.header_timeout is not None:
            self._header_deadlines[stream] = IOLoop.current().call_later(
                self.header_timeout, self._headers_late, stream
            )
        super().handle_stream(stream, address)

    def _admit(self, stream: IOStream, peer: str) -> bool:
        """Count a new connection of ``peer``; False (and closed) past the cap."""
        if not self.max_per_address or is_trusted_peer(peer, self.uncapped):
            return True
        open_now = self._per_address.get(peer, 0)
        if open_now >= self.max_per_address:
            self._count_refusal("per_address_cap")
            stream.close()
            return False
        self._per_address[peer] = open_now + 1
        self._peer_of[stream] = peer
        return True

    def start_request(
        self, server_conn: object, request_conn: HTTPConnection
    ) -> HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(server_conn, "stream", None)
        if stream in self._header_deadlines:
            return _FirstHeaders(delegate, lambda: self._headers_arrived(stream))
        return delegate

    def _headers_arrived(self, stream: IOStream) -> None:
        deadline = self._header_deadlines.pop(stream, None)
        if deadline is not None:
            IOLoop.current().remove_timeout(deadline)

    def _headers_late(self, stream: IOStream) -> None:
        if self._header_deadlines.pop(stream, None) is not None:
            self._count_refusal("header_timeout")
            stream.close()  # Tornado's read of the headers ends, and so the connection

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        stream = getattr(server_conn, "stream", None)
        self._headers_arrived(stream)  # type: ignore[arg-type]
        if isinstance(stream, IOStream) and not stream.closed():
            # Tornado is done with a connection it handed over (a WebSocket upgrade
            # detaches the stream), but the connection is still open: it stays one of
            # its address's until it closes.
            stream.set_close_callback(lambda: self._release(stream))
            return
        self._release(stream)  # type: ignore[arg-type]

    def _release(self, stream: IOStream) -> None:
        peer = self._peer_of.pop(stream, None)
        if peer is not None:
            left = self._per_address[peer] - 1
            if left:
                self._per_address[peer] = left
            else:
                del self._per_address[peer]

    def _count_refusal(self, reason: str) -> None:
        if self.refused is not None:
            self.refused.inc((reason,))


class _FirstHeaders(HTTPMessageDelegate):
    """A request's delegate that also says when the request's headers have arrived."""

    def __init__(self, delegate: HTTPMessageDelegate, arrived: Callable[[], None]) -> None:
        self.delegate = delegate
        self.arrived = arrived

    def headers_received(
        self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders
    ) -> Any:
        self.arrived()
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


def _keep_nodelay(_value: bool) -> None:
    """``IOStream.set_nodelay`` on a connection whose Nagle is off for good: nothing to do."""
