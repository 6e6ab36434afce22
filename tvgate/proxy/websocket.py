"""Codex's Responses API over WebSocket: ``GET /v1/responses`` with ``Upgrade: websocket``.

Codex's built-in OpenAI provider, or a custom one with ``supports_websockets = true``,
opens one socket per session and sends a ``response.create`` event (the body of
``POST /v1/responses`` with ``type``, without ``stream``) for each turn; each event of the
answer comes back as one text message, the Responses streaming event's JSON.

``ResponsesSocket`` owns a connection: the caller is signed in once, at the upgrade, by the
one authenticator (a bad credential is refused with a 401 in OpenAI's envelope before the
upgrade is accepted). Each ``response.create`` is one ``ProxyCall`` (``tvgate.proxy.call``)
through the pipeline HTTP calls take (routing per frame, governance, fallbacks,
translation, one trace, recorded with ``transport = "websocket"``), its client side a
``SocketResponse`` that turns what the relay writes (the status, the SSE stream or an error
envelope) into WebSocket messages. The upstream is always the provider's HTTP streaming
Responses endpoint (or the translated route's API): the provider's own WebSocket endpoint
is not used.

Over WebSocket Codex sends only the new input items and the ``previous_response_id`` of the
last answer (``store: false``), so the connection remembers its conversation: the last
response's full input and its output items (``Conversation``, bounded by the body limit),
and sends the provider the whole input. An unknown id gets the API's
``previous_response_not_found`` error event. A warm-up (``generate: false``) is answered as
the API does, without a provider: ``response.created`` and ``response.completed`` with no
output, its input remembered for the next turn (no trace: nothing was called).

Per-frame errors are ``error`` events and the connection stays open: a frame that is not a
``response.create`` JSON object, a second one while a response runs (one at a time per
connection), an unknown previous response, and whatever the call itself refuses (401, 404,
429 over a budget, …, in the HTTP status the event's ``status`` carries). A frame larger
than the HTTP body limit closes the connection (1009, Tornado's own check). Back-pressure
is the relay's: the provider is paused while the last message's write future is pending;
and the client's next frame is not read while it is (a client that sends and never reads
is not answered into the gateway's memory).
The provider's silence past the idle timeout ends a response with the error event, as for
an HTTP stream; a connection with no response for ``IDLE_CONNECTION_TIMEOUT`` is closed, as
an idle keep-alive one is. The client leaving cancels the upstream transfer (trace
``client_cancelled``); a stop drains like HTTP: a running response finishes (or is cut at
the drain timeout with the error event), then the socket closes with 1001.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from asyncio import Future
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from tornado.httputil import HTTPHeaders
from tornado.ioloop import IOLoop
from tornado.routing import PathMatches
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from tvgate.httpserver import IDLE_CONNECTION_TIMEOUT
from tvgate.identity import IdentityError, Principal
from tvgate.models import OUTCOME_GATEWAY_SHUTDOWN, OUTCOME_UPSTREAM_ERROR
from tvgate.providers import ENDPOINTS, ProviderAPI
from tvgate.proxy.call import ProxyCall
from tvgate.web import BaseHandler

if TYPE_CHECKING:
    from tvgate.gateway import Gateway

log = logging.getLogger("tvgate.proxy")

#: The API a socket speaks: each ``response.create`` is a Responses call.
RESPONSES = ENDPOINTS["responses"]
#: The ``OpenAI-Beta`` value that asks for the WebSocket; not the HTTP upstream's business.
_WEBSOCKET_BETA = "responses_websockets"
#: The fields of a ``response.create`` that are the socket's, not ``POST /v1/responses``'s.
_ENVELOPE_FIELDS = ("type", "generate", "stream_id", "previous_response_id")
#: Where a server-sent event ends (a blank line, its line ends LF or CRLF).
_EVENT_END = re.compile(rb"\n\r?\n")
#: Events that end a response and carry its output items.
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete"})


class FrameError(Exception):
    """A frame the socket answers with an ``error`` event, not a call."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def event(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"type": kind, "code": self.code, "message": self.message, "param": self.param}
        return orjson.dumps({"type": "error", "status": self.status, "error": error})


class Conversation:
    """A connection's last response: its id, its full input and then its output items, as
    the input of the next turn begins; kept while it fits in ``limit`` bytes of JSON."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.response_id = ""
        self.items: list[Any] = []

    def continued(self, previous_id: Any, new_items: list[Any]) -> list[Any]:
        """The whole input of a turn that continues ``previous_id`` with ``new_items``."""
        if not isinstance(previous_id, str) or previous_id != self.response_id:
            raise FrameError(
                400,
                "previous_response_not_found",
                f"Previous response with id '{_quoted(previous_id)}' not found.",
                "previous_response_id",
            )
        return [*self.items, *new_items]

    def remember(self, response_id: str, items: list[Any], output: list[Any]) -> None:
        whole = [*items, *output]
        if len(orjson.dumps(whole)) > self.limit:
            # Past the body limit the next turn could not be sent whole anyway: forget it,
            # so that a previous_response_id to it is refused rather than sent in part.
            self.response_id, self.items = "", []
            return
        self.response_id, self.items = response_id, whole


def _quoted(value: object) -> str:
    """What the client sent, as an error message quotes it: its first 100 characters."""
    text = str(value)
    return text if len(text) <= 100 else text[:100] + "…"


def input_items(value: Any) -> list[Any]:
    """A ``response.create``'s ``input`` as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise FrameError(400, "invalid_type", "input must be a string or a list of items", "input")


def parse_frame(message: str | bytes) -> dict[str, Any]:
    """A client frame as a ``response.create`` event."""
    try:
        event = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise FrameError(400, "invalid_json", "the message is not valid JSON") from None
    if not isinstance(event, dict):
        raise FrameError(400, "invalid_json", "the message must be a JSON object")
    kind = event.get("type")
    if kind != "response.create":
        raise FrameError(
            400,
            "unknown_event_type",
            f"unsupported event type {_quoted(repr(kind))}: send response.create",
        )
    return event


def upstream_request_headers(upgrade: HTTPHeaders) -> HTTPHeaders:
    """The upgrade request's headers as the HTTP call's: without the WebSocket's own
    (``Sec-WebSocket-*``, the ``responses_websockets`` beta), with a JSON body's type."""
    headers = HTTPHeaders()
    for name, value in upgrade.get_all():
        lower = name.lower()
        if lower.startswith("sec-websocket-") or lower == "content-type":
            continue
        if lower == "openai-beta":
            value = ",".join(
                t for t in value.split(",") if not t.strip().startswith(_WEBSOCKET_BETA)
            )
            if not value.strip():
                continue
        headers.add(name, value)
    headers["Content-Type"] = "application/json"
    return headers


def _done() -> Future[None]:
    done: Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


async def _written(sent: Future[None]) -> None:
    """Once ``sent`` is written (or its connection closed: never raises)."""
    await asyncio.wait([sent])


def _ignore_closed(sent: Future[None]) -> None:
    if not sent.cancelled():
        sent.exception()


class SocketResponse:
    """The client side of one ``response.create`` (``tvgate.proxy.client.ClientSide``):
    what the relay writes for HTTP, sent as the socket's messages."""

    transport = "websocket"
    path_route = ""
    forwarded_query = ""
    # The Responses API takes no Claude subscription (tvgate.proxy.subscription).
    subscription = ""
    serves_subscriptions = False

    def __init__(self, socket: ResponsesSocket, headers: HTTPHeaders) -> None:
        self.socket = socket
        self.headers = headers
        self._finished = False
        self.status = 200
        self.streaming = False
        self.unparsed = b""
        #: What came of an event after ``unparsed`` while no event ended (joined when one does).
        self.unparsed_pieces: list[bytes] = []
        self.unparsed_size = 0
        self.oversized = False
        self.body: list[bytes] = []
        self.last_write: Future[None] | None = None
        #: The response's id and, once it completed, its output items.
        self.response_id = ""
        self.output: list[Any] | None = None

    @property
    def gateway(self) -> Gateway:
        return self.socket.gateway

    @property
    def client_headers(self) -> HTTPHeaders:
        return self.headers

    @property
    def request_path(self) -> str:
        return self.socket.request.path

    async def authenticate_token(self) -> Principal:
        return self.socket.principal  # signed in once, at the upgrade

    def client_body(self, decoded: bytes) -> bytes:
        return decoded

    def send_api_error(
        self, status: int, message: str, api: ProviderAPI | None = None, **headers: str
    ) -> None:
        if self._finished:
            return
        self.status = status
        self._send_error(status, (api or RESPONSES).error_body(status, message), headers)
        self._finished = True

    def _send_error(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """An error answer (tvgate's or the provider's JSON envelope) as an ``error`` event."""
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        error = document.get("error") if isinstance(document, dict) else None
        if not isinstance(error, dict):
            error = {"type": "server_error", "message": body[:500].decode("utf-8", "replace")}
        event: dict[str, Any] = {"type": "error", "status": status, "error": error}
        if headers:
            error["headers"] = {name.replace("_", "-"): value for name, value in headers.items()}
        self._message(orjson.dumps(event))

    def set_status(self, status_code: int, reason: str | None = None) -> None:
        self.status = status_code

    def set_header(self, name: str, value: Any) -> None:
        if name.lower() == "content-type":
            self.streaming = str(value).startswith("text/event-stream")

    def add_header(self, name: str, value: Any) -> None:
        return None  # a provider's header has no place in a WebSocket message

    def write(self, chunk: str | bytes | dict[str, Any]) -> None:
        data = chunk if isinstance(chunk, bytes) else orjson.dumps(chunk)
        if not self.streaming:
            self.body.append(data)
            return
        if self.oversized:
            return  # the rest of an event past the limit: the call is being cut
        # One message per server-sent event: its data lines, as the Responses API sends.
        # The part of an event not ended yet is kept in pieces and joined once its end
        # comes, so that a long event costs its length once, not once per chunk.
        if not _EVENT_END.search(self._tail() + data):
            self.unparsed_pieces.append(data)
            self.unparsed_size += len(data)
            if len(self.unparsed) + self.unparsed_size > self.socket.max_message_size:
                self._oversized()
            return
        whole = b"".join((self.unparsed, *self.unparsed_pieces, data))
        self.unparsed_pieces, self.unparsed_size = [], 0
        events = whole.replace(b"\r\n", b"\n").split(b"\n\n")
        self.unparsed = events.pop()
        for event in events:
            self._event(event)
        if len(self.unparsed) > self.socket.max_message_size:
            self._oversized()

    def _tail(self) -> bytes:
        """The last two bytes of what an event has sent so far (where its end may begin)."""
        tail = b""
        for piece in reversed(self.unparsed_pieces):
            tail = piece[-2:] + tail
            if len(tail) >= 2:
                return tail[-2:]
        return (self.unparsed[-2:] + tail)[-2:]

    def _oversized(self) -> None:
        """A provider's event longer than a message may be: no message is made of it; the
        call is cut with an error event (once the relay is out of this write)."""
        self.oversized = True
        self.unparsed, self.unparsed_pieces, self.unparsed_size = b"", [], 0
        IOLoop.current().add_callback(self._cut_off)

    def _oversized_message(self) -> str:
        return (
            f"the provider sent an event larger than {self.socket.max_message_size} bytes "
            "(the body limit), which is not passed on"
        )

    def _cut_off(self) -> None:
        call = self.socket.call
        self.oversized = False  # what comes now is tvgate's error event
        if call is not None and call.handler is self:
            call.cut_off(502, self._oversized_message(), OUTCOME_UPSTREAM_ERROR)

    def _event(self, block: bytes) -> None:
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
        )
        if not data or data == b"[DONE]":
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            event = None
        if isinstance(event, dict):
            response = event.get("response")
            if isinstance(response, dict):
                self.response_id = str(response.get("id") or self.response_id)
                if event.get("type") in _FINAL_EVENTS and isinstance(response.get("output"), list):
                    self.output = response["output"]
        self._message(data)

    def _message(self, data: bytes) -> None:
        self.last_write = self.socket.send(data)

    def flush(self, include_footers: bool = False) -> Future[None]:
        return self.last_write or _done()

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        if chunk is not None:
            self.write(chunk)
        if self.oversized and not self._finished:
            # The provider ended before the call could be cut: the client is told still.
            self.oversized = False
            self._event(RESPONSES.stream_error_event(self._oversized_message()).strip())
        elif self.streaming:
            last = b"".join((self.unparsed, *self.unparsed_pieces))
            if last.strip():
                self._event(last)
        elif not self.streaming and self.body and not self._finished:
            body = b"".join(self.body)
            if self.status >= 400:
                self._send_error(self.status, body, {})
            else:
                # A provider that answered a streamed request with one JSON document.
                completed = {"type": "response.completed", "response": orjson.Fragment(body)}
                self._message(orjson.dumps(completed))
        self.unparsed, self.unparsed_pieces, self.body = b"", [], []
        self._finished = True
        return self.flush()

    def pending_write(self) -> Future[None] | None:
        write = self.last_write
        return write if write is not None and not write.done() else None

    def cut(self) -> None:
        self.socket.close(1011, "the answer was cut")


class UpgradeMatches(PathMatches):
    """A path, when the request asks for a WebSocket (the same path's POST is HTTP's)."""

    def match(self, request: Any) -> dict[str, Any] | None:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return None
        return super().match(request)


class ResponsesSocket(WebSocketHandler, BaseHandler):
    """One Responses WebSocket: its caller, its conversation, its one running response."""

    def initialize(self) -> None:
        self.conversation = Conversation(self.gateway.settings.max_body_bytes)
        self.call: ProxyCall | None = None
        #: The running response's client side, and a frame that came once it had sent its
        #: last event but before its call was done (its trace queued): served next.
        self.response: SocketResponse | None = None
        self.queued: str | bytes | None = None
        self.busy = False
        self.task: Future[None] | None = None
        self.closed = False
        self.idle: object | None = None
        #: The last message's write: the next frame is read once it is done.
        self.last_sent: Future[None] | None = None

    @property
    def max_message_size(self) -> int:
        # A frame is a request body: the same limit (past it Tornado closes with 1009).
        return self.gateway.settings.max_body_bytes

    async def get(self, *args: Any, **kwargs: Any) -> None:
        try:
            await self.authenticate_token()
        except IdentityError as exc:
            # Refused before the upgrade is accepted: the client sees the HTTP answer.
            self.send_api_error(exc.status, exc.public, RESPONSES)
            return
        await super().get(*args, **kwargs)

    def open(self, *_args: str, **_kwargs: str) -> None:
        inflight = self.gateway.inflight
        if inflight.stopping:
            self.close(1001, "the gateway is shutting down")
            return
        inflight.sockets.add(self)
        self._idle_from_now()

    def _idle_from_now(self) -> None:
        """Close the connection if no response runs on it for the idle timeout, as an
        idle HTTP keep-alive connection is."""
        loop = IOLoop.current()
        if self.idle is not None:
            loop.remove_timeout(self.idle)
        self.idle = loop.call_later(IDLE_CONNECTION_TIMEOUT, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.idle = None
        if not self.busy:
            self.close(1000, "idle timeout")

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        self._take(message)
        # Tornado reads the next frame once what this returns is done: while the client
        # leaves our last message unread, its frames wait in its own socket, not their
        # answers in our memory.
        pending = self.last_sent
        return _written(pending) if pending is not None and not pending.done() else None

    def _take(self, message: str | bytes) -> None:
        response = self.response
        if self.busy and self.queued is None and response is not None and response._finished:
            self.queued = message  # the client has the whole answer: the next one is due
            return
        if self.busy:
            error = FrameError(
                400,
                "response_already_in_progress",
                "a response is already in progress on this connection; "
                "send response.create once it has ended",
            )
            self.send(error.event())
            return
        if self.gateway.inflight.stopping:
            self.close(1001, "the gateway is shutting down")
            return
        self.busy = True
        # Not awaited here: Tornado reads the next frame meanwhile (a second
        # response.create is refused, a closed connection is noticed at once).
        self.task = asyncio.ensure_future(self._respond(message))

    async def _respond(self, message: str | bytes) -> None:
        try:
            await self._create(parse_frame(message))
        except FrameError as exc:
            self.send(exc.event())
        except Exception:
            log.exception("websocket response failed")
            self.send(FrameError(500, "server_error", "internal error in tvgate").event())
        finally:
            self.busy = False
            queued, self.queued = self.queued, None
            if self.gateway.inflight.stopping:
                self.close(1001, "the gateway is shutting down")
            elif queued is not None and not self.closed:
                self.on_message(queued)
            elif not self.closed:
                self._idle_from_now()

    async def _create(self, event: dict[str, Any]) -> None:
        items = input_items(event.get("input"))
        previous = event.get("previous_response_id")
        if previous is not None:
            items = self.conversation.continued(previous, items)
        if event.get("generate") is False:
            self._warm_up(event, items)
            return
        body = {k: v for k, v in event.items() if k not in _ENVELOPE_FIELDS}
        body["input"] = items
        body["stream"] = True
        response = SocketResponse(self, upstream_request_headers(self.request.headers))
        call = ProxyCall(response, RESPONSES, time.perf_counter())
        if previous is not None:
            # The trace's request is the whole input: say which part the connection kept.
            kept = len(self.conversation.items)
            call.notes.append(f"websocket: continues {previous[:100]} ({kept} input items kept)")
        inflight = self.gateway.inflight
        self.call, self.response = call, response
        inflight.enter(call)
        try:
            await call.run(orjson.dumps(body))
            if response.last_write is not None:
                await asyncio.wait([response.last_write])
        finally:
            inflight.leave(call)
            self.call = self.response = None
        if response.output is not None and response.response_id:
            self.conversation.remember(response.response_id, items, response.output)
        if call.outcome == OUTCOME_GATEWAY_SHUTDOWN:
            self.close(1001, "the gateway is shutting down")

    def _warm_up(self, event: dict[str, Any], items: list[Any]) -> None:
        """``generate: false``: the request's state prepared, no output, no provider."""
        response_id = "resp_" + uuid.uuid4().hex
        response: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": event.get("model") or "",
            "output": [],
            "usage": None,
            "error": None,
            "incomplete_details": None,
        }
        self.send(
            orjson.dumps({"type": "response.created", "sequence_number": 0, "response": response})
        )
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        response = {**response, "status": "completed", "usage": usage}
        self.send(
            orjson.dumps({"type": "response.completed", "sequence_number": 1, "response": response})
        )
        self.conversation.remember(response_id, items, [])

    def send(self, data: bytes) -> Future[None] | None:
        """One text message; None once the connection is closed."""
        if self.closed:
            return None
        try:
            sent = self.write_message(data)  # bytes, sent as a text frame: the JSON is UTF-8
        except WebSocketClosedError:
            self.on_close()
            return None
        # A write to a connection that closes meanwhile fails its future; on_close says so.
        sent.add_done_callback(_ignore_closed)
        self.last_sent = sent
        return sent

    def close_if_idle(self) -> None:
        if not self.busy:
            self.close(1001, "the gateway is shutting down")

    def on_close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.gateway.inflight.sockets.discard(self)
        if self.idle is not None:
            IOLoop.current().remove_timeout(self.idle)
            self.idle = None
        if self.call is not None:
            self.call.on_client_gone()  # the upstream transfer stops; the trace says so
