"""What a proxied call needs of its client's side: ``ClientSide``.

``ProxyCall`` (``tvgate.proxy.call``) and ``ClientRelay`` (``tvgate.proxy.relay``) talk to
the client through this interface, so the one pipeline serves a plain HTTP request
(``tvgate.proxy.handlers.ProxyHandler``) and one ``response.create`` of a Responses
WebSocket (``tvgate.proxy.websocket.SocketResponse``) alike: status, headers and body are
written as for HTTP, and the WebSocket side turns them into its events.
"""

from __future__ import annotations

from asyncio import Future
from typing import TYPE_CHECKING, Any, Protocol

from tornado.httputil import HTTPHeaders

if TYPE_CHECKING:
    from tvgate.gateway import Gateway
    from tvgate.identity import Principal
    from tvgate.providers import ProviderAPI


class ClientSide(Protocol):
    """The client of one call, as the call and its relay write to it."""

    #: ``""`` for HTTP, ``"websocket"`` for a Responses WebSocket: the trace's transport.
    transport: str
    #: The route a path names (Azure's deployment, Vertex AI's model), or "".
    path_route: str
    #: The bearer of the caller's own Claude subscription, or "" (tvgate.proxy.subscription).
    subscription: str
    #: Whether this path may carry a caller's own subscription (the Anthropic API's own).
    serves_subscriptions: bool
    _finished: bool

    @property
    def gateway(self) -> Gateway: ...

    @property
    def client_headers(self) -> HTTPHeaders:
        """The request's headers, as the call reads them and forwards them upstream."""

    @property
    def forwarded_query(self) -> str:
        """The client's query string as it goes upstream."""

    @property
    def request_path(self) -> str:
        """The path the client asked for, as errors name it."""

    async def authenticate_token(self) -> Principal: ...

    def client_body(self, decoded: bytes) -> bytes: ...

    def send_api_error(
        self, status: int, message: str, api: ProviderAPI | None = None, **headers: str
    ) -> None: ...

    def set_status(self, status_code: int, reason: str | None = None) -> None: ...

    def set_header(self, name: str, value: Any) -> None: ...

    def add_header(self, name: str, value: Any) -> None: ...

    def write(self, chunk: str | bytes | dict[str, Any]) -> None: ...

    def flush(self, include_footers: bool = False) -> Future[None]: ...

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]: ...

    def pending_write(self) -> Future[None] | None:
        """A future done once the client has taken what it was sent, or None when it has
        (the relay pauses the provider meanwhile); raises ``StreamClosedError``."""

    def cut(self) -> None:
        """End an answer that cannot be finished (a JSON body cut halfway) visibly."""
