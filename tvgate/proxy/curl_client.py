"""The HTTP client of provider calls: Tornado's ``CurlAsyncHTTPClient`` without its per-request toll.

This module owns the curl handles, the curl multi handle's timer and sockets,
and what a handle carries from one transfer to the next. Callers still go
through ``fetch(HTTPRequest)`` and get an ``HTTPResponse`` or a ``CurlError``
exactly as with the stock client; what changes is the work done per request:

* Options that are the same for every transfer (protocols, user agent, TLS
  checks, no signals, no verbose output) are set
  once, when a handle is created, instead of after a ``curl.reset()`` on every
  request. Per request only the URL, the method and body, the headers, the
  connect timeout and the caller's ``prepare_curl_callback`` are applied.
* After a transfer the handle is put back exactly as it was created: every
  option the ``prepare_curl_callback`` touched is restored (its callbacks are
  dropped, so the handle holds no reference to the caller), and so are the
  body and the headers (which carry the provider key). An option this module
  does not know how to restore makes it fall back to a full ``curl.reset()``.
* A failed transfer's ``CurlError`` also carries ``os_errno``, the system's
  error number of its last socket call (refused, unreachable, ...).
* The response is not buffered: the caller's ``prepare_curl_callback`` installs
  its own header and write functions (``UpstreamExchange`` does), so the
  ``HTTPResponse`` carries the status code only; no header parsing, no body
  buffer, no timing ``getinfo`` calls.
* libcurl's timer and socket functions are followed without the stock
  client's extra loop iterations and ``epoll_ctl`` calls (see the methods).

It serves the requests a provider call makes and refuses, with a ``ValueError``
as the stock client does for what it cannot do, anything else: a request
without a ``prepare_curl_callback``, a streaming or header callback, redirects,
decompression, a whole-transfer timeout, proxies, authentication, client
certificates, or a method other than GET and POST.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pycurl
from tornado import ioloop
from tornado.curl_httpclient import CurlAsyncHTTPClient, CurlError
from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders

log = logging.getLogger("tvgate.proxy")

#: What the stock client sends when the request names no user agent (a header
#: the caller passes replaces it); kept so that providers see the same requests.
USER_AGENT = "Mozilla/5.0 (compatible; pycurl)"

_IOLOOP_EVENTS = {
    pycurl.POLL_NONE: ioloop.IOLoop.NONE,
    pycurl.POLL_IN: ioloop.IOLoop.READ,
    pycurl.POLL_OUT: ioloop.IOLoop.WRITE,
    pycurl.POLL_INOUT: ioloop.IOLoop.READ | ioloop.IOLoop.WRITE,
}

#: The stock client removes and re-adds an fd on every change of what libcurl waits for,
#: because libcurl might close a socket and open another with the same number without a
#: POLL_REMOVE in between (epoll drops a closed fd, so updating the old registration
#: fails or, when the events are the same, leaves the new socket unwatched). libcurl
#: 7.30 and later call the socket function with POLL_REMOVE for every socket they told
#: it about before they close it ("Curl_multi_closed", now "Curl_multi_will_close"):
#: an fd in the client's map is then always the socket that was registered.
#: (A close-socket function would tell the same, but pycurl can only run it while the
#: handle that opened the connection is in a transfer; a pooled connection is often
#: closed later, from another handle's transfer or by the multi handle's close, and
#: pycurl then skips the function with a warning: the socket is never closed.)
_REMOVES_BEFORE_CLOSE = pycurl.version_info()[2] >= 0x071E00

# The unbound methods, so that the client's own per-request options skip the
# recording ``setopt`` of ``TransferHandle`` (they are always set, never restored).
_setopt = pycurl.Curl.setopt
_unsetopt = pycurl.Curl.unsetopt


#: Recorded when a ``prepare_curl_callback`` resets the handle (no curl option has this number).
_RESET = -1


def _discard(_data: bytes) -> None:
    """Header and write function of a handle between transfers: holds no reference to anyone."""


def _unset(curl: TransferHandle, option: int) -> None:
    _unsetopt(curl, option)


#: How to put back each option a ``prepare_curl_callback`` may change, as it was
#: when the handle was created (libcurl's default, or the baseline set here).
_RESTORE: dict[int, Callable[[TransferHandle, int], None]] = {
    pycurl.HEADERFUNCTION: lambda curl, option: _setopt(curl, option, _discard),
    pycurl.WRITEFUNCTION: lambda curl, option: _setopt(curl, option, _discard),
    pycurl.XFERINFOFUNCTION: _unset,
    pycurl.PROGRESSFUNCTION: _unset,
    pycurl.OPENSOCKETFUNCTION: _unset,
    pycurl.SOCKOPTFUNCTION: _unset,
    pycurl.NOPROGRESS: lambda curl, option: _setopt(curl, option, 1),
    pycurl.LOW_SPEED_LIMIT: lambda curl, option: _setopt(curl, option, 0),
    pycurl.LOW_SPEED_TIME: lambda curl, option: _setopt(curl, option, 0),
}


def _header_lines(headers: HTTPHeaders) -> list[bytes]:
    """The request's header lines for HTTPHEADER, as the stock client writes them: names
    in ASCII, values in Latin-1, no CR or LF anywhere (``ValueError`` otherwise)."""
    lines = [] if "Expect" in headers else [b"Expect: "]
    if "Pragma" not in headers:
        # libcurl adds "Pragma: no-cache" otherwise; "Expect:" off avoids 100-continue.
        lines.append(b"Pragma: ")
    fields = list(headers.get_all())
    if not fields:
        return lines
    # All lines written, checked and encoded at once when all are ASCII (the usual case);
    # else line by line, which says which line is wrong (or encodes Latin-1 values).
    text = "\n".join([f"{name}: {value}" for name, value in fields])
    if text.isascii() and "\r" not in text and text.count("\n") == len(fields) - 1:
        return lines + text.encode("ascii").split(b"\n")
    for name, value in fields:
        line = f"{name}: {value}".encode("latin-1")
        if not name.isascii() or b"\r" in line or b"\n" in line:
            raise ValueError(f"Illegal characters in header: {line!r}")
        lines.append(line)
    return lines


class TransferHandle(pycurl.Curl):
    """A curl easy handle that remembers which options were changed through ``setopt``.

    The client sets its own per-request options through the unbound ``pycurl.Curl``
    methods; what goes through ``setopt``/``unsetopt`` here is the caller's
    ``prepare_curl_callback``, whose changes must not outlive the transfer.
    """

    touched: set[int]

    def __init__(self) -> None:
        super().__init__()
        # Into the instance's __dict__ itself: pycurl's attribute setter keeps attributes
        # in a dict of its own, which every read then reaches only after a failed lookup
        # (an AttributeError raised and cleared, about 0.4 us, several times a request).
        self.__dict__["touched"] = set()

    def setopt(self, option: int, value: Any) -> None:
        self.touched.add(option)
        _setopt(self, option, value)

    def unsetopt(self, option: int) -> None:
        self.touched.add(option)
        _unsetopt(self, option)

    def reset(self) -> None:
        # Nothing in _RESTORE: the client sets the handle up afresh after the transfer.
        self.touched.add(_RESET)
        pycurl.Curl.reset(self)


class UpstreamCurlClient(CurlAsyncHTTPClient):
    """``CurlAsyncHTTPClient`` for streamed provider calls; see the module docstring."""

    _curls: list[TransferHandle]
    _free_list: list[TransferHandle]

    def initialize(  # type: ignore[override]
        self,
        max_clients: int = 10,
        defaults: dict[str, Any] | None = None,
        max_body_size: int = 104857600,
    ) -> None:
        self._full_resets = 0
        #: Each running transfer's (request, callback, start time), by handle: kept here
        #: rather than on the handle (the stock client's curl.info), for the same reason
        #: as TransferHandle.touched.
        self._running: dict[
            TransferHandle, tuple[HTTPRequest, Callable[[HTTPResponse], None], float]
        ] = {}
        # (Set before the base class's initialize, whose dummy handle calls the timer.)
        # Timers go straight to asyncio (the IOLoop is asyncio's), without the wrapper
        # Tornado's call_later adds (a functools.partial and a result check per call).
        self._loop: asyncio.AbstractEventLoop = ioloop.IOLoop.current().asyncio_loop  # type: ignore[attr-defined]
        super().initialize(max_clients=max_clients, defaults=defaults, max_body_size=max_body_size)

    # --- handles ---

    def _curl_create(self) -> TransferHandle:
        curl = TransferHandle()
        self._configure(curl)
        return curl

    def _configure(self, curl: TransferHandle) -> None:
        """The options every transfer shares, set when a handle is new (or was reset)."""
        # Tornado turns on VERBOSE when its logger is at DEBUG, and curl's verbose output
        # prints the request headers: the provider key. This client never does.
        _setopt(curl, pycurl.VERBOSE, 0)
        _setopt(curl, pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        _setopt(curl, pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        # The stock client sets NOSIGNAL whenever more than one thread runs, and a gateway
        # always runs its trace writer and database threads. DNS timeouts still work: this
        # libcurl resolves asynchronously (threaded resolver), without SIGALRM.
        _setopt(curl, pycurl.NOSIGNAL, 1)
        _setopt(curl, pycurl.USERAGENT, USER_AGENT)
        _setopt(curl, pycurl.SSL_VERIFYPEER, 1)
        _setopt(curl, pycurl.SSL_VERIFYHOST, 2)
        # No redirects, no decompression, no whole-transfer timeout: libcurl's defaults,
        # said out loud. PROXY stays unset, as the stock client leaves it (libcurl then
        # follows the *_proxy environment variables).
        _setopt(curl, pycurl.FOLLOWLOCATION, 0)
        _setopt(curl, pycurl.TIMEOUT_MS, 0)
        _setopt(curl, pycurl.HEADERFUNCTION, _discard)
        _setopt(curl, pycurl.WRITEFUNCTION, _discard)

    def _release(self, curl: TransferHandle) -> None:
        """Put a handle back as ``_configure`` left it, before anyone else may use it."""
        # The body and the headers (the provider key among them) are not kept around.
        _setopt(curl, pycurl.POSTFIELDS, b"")
        _unsetopt(curl, pycurl.HTTPHEADER)
        touched = curl.touched
        if not touched:
            return
        if touched.issubset(_RESTORE):
            for option in touched:
                _RESTORE[option](curl, option)
        else:
            # An option we cannot put back one by one: start the handle afresh.
            self._full_resets += 1
            if self._full_resets == 1:
                log.warning(
                    "curl options %s are restored by a full reset of the handle",
                    sorted(touched.difference(_RESTORE)),
                )
            pycurl.Curl.reset(curl)
            self._configure(curl)
        touched.clear()

    # --- requests ---

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        # The stock client also schedules _set_timeout(0) here, an extra pass through the
        # IOLoop per request: libcurl already asks for one through the timer function when
        # a handle is added (and nothing is to be done while the request waits for one).
        self._requests.append((request, callback, self.io_loop.time()))
        self._process_queue()

    def _process_queue(self) -> None:
        # As the stock client, less the per-request HTTPHeaders and BytesIO it never fills
        # here (the caller's header and write functions replace them).
        free, queue = self._free_list, self._requests
        while free and queue:
            curl = free.pop()
            request, callback, queued_at = queue.popleft()
            try:
                self._curl_setup_request(curl, request)
            except Exception as exc:  # noqa: BLE001 - any setup error is the caller's, as stock
                # As the stock client: the error goes to the caller, the handle back.
                self._release(curl)
                free.append(curl)
                callback(HTTPResponse(request=request, code=599, error=exc))
            else:
                self._running[curl] = (request, callback, queued_at)
                self._multi.add_handle(curl)

    def _curl_setup_request(
        self, curl: TransferHandle, request: HTTPRequest, *_unused: Any
    ) -> None:
        prepare = request.prepare_curl_callback
        if prepare is None:
            raise ValueError(
                "UpstreamCurlClient needs a prepare_curl_callback (the body goes there)"
            )
        if (
            request.streaming_callback is not None
            or request.header_callback is not None
            or request.follow_redirects
            or request.decompress_response
            or request.request_timeout
            or request.proxy_host is not None
            or request.auth_username is not None
            or request.client_cert is not None
            or request.client_key is not None
            or request.ca_certs is not None
            or request.ssl_options is not None
            or request.network_interface is not None
            or request.validate_cert is False
            or request.allow_ipv6 is False
            or request.user_agent is not None
        ):
            raise ValueError("UpstreamCurlClient does not support this request's options")
        _setopt(curl, pycurl.URL, request.url)
        _setopt(curl, pycurl.HTTPHEADER, _header_lines(request.headers))
        method, body = request.method, request.body
        if method == "POST":
            if body is None:
                raise ValueError("Body must not be None for method POST")
            # POSTFIELDS keeps a reference to the bytes (no copy, no read function) and
            # sets their length; libcurl can resend them on a retried connection.
            _setopt(curl, pycurl.POSTFIELDS, body)
        elif method == "GET":
            if body:
                raise ValueError("Body must be None for GET request")
            _setopt(curl, pycurl.HTTPGET, 1)
        else:
            raise ValueError(f"UpstreamCurlClient does not send {method} requests")
        assert request.connect_timeout is not None
        _setopt(curl, pycurl.CONNECTTIMEOUT_MS, int(1000 * request.connect_timeout))
        prepare(curl)

    def _finish(
        self,
        curl: TransferHandle,
        curl_error: int | None = None,
        curl_message: str | None = None,
    ) -> None:
        request, callback, started = self._running.pop(curl)
        self._multi.remove_handle(curl)
        if curl_error:
            error = CurlError(curl_error, curl_message or "")
            # Why the last socket call failed (ECONNREFUSED, EHOSTUNREACH, ...): curl's own
            # message no longer tells them apart. Read now: the handle is reused after this.
            error.os_errno = curl.getinfo(pycurl.OS_ERRNO)  # type: ignore[attr-defined]
            response = HTTPResponse(request, 599, error=error)
        else:
            # The caller's header and write functions had the headers and the body; what
            # fetch() needs is the status (raise_error=False returns error statuses).
            response = HTTPResponse(
                request,
                curl.getinfo(pycurl.RESPONSE_CODE),
                request_time=self.io_loop.time() - started,
            )
        self._release(curl)
        try:
            callback(response)
        except Exception:  # noqa: BLE001 - as the stock client: log it, keep the handle
            self.handle_callback_exception(callback)
        self._free_list.append(curl)

    # --- libcurl's timer and sockets ---

    def _set_timeout(self, msecs: int) -> None:
        """libcurl's timer function: run socket_action(TIMEOUT) in ``msecs`` ms; -1 cancels."""
        timeout = self._timeout
        if timeout is not None:
            # An asyncio handle (the base class's close() cancels it the same way).
            timeout.cancel()  # type: ignore[attr-defined]
            self._timeout = None
        if msecs < 0:
            # The stock client schedules a timeout at once for -1, a wasted socket_action.
            return
        if msecs == 0:
            # "As soon as possible": the next loop iteration, without a timer.
            self._timeout = self._loop.call_soon(self._handle_timeout)
        else:
            self._timeout = self._loop.call_later(msecs / 1000.0, self._handle_timeout)

    def _handle_timeout(self) -> None:
        self._timeout = None
        while True:
            try:
                ret, _running = self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
            except pycurl.error as exc:
                ret = exc.args[0]
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        self._finish_pending_requests()
        if self._timeout is None:
            # libcurl set no new timer while it ran; it may still want one (the loop can
            # fire a timer a little early, and libcurl only calls the timer function when
            # its deadline changes). The stock client asks every time.
            remaining = self._multi.timeout()
            if remaining >= 0:
                self._set_timeout(remaining)

    def _handle_socket(self, event: int, fd: int, multi: Any, data: Any) -> None:
        """libcurl's socket function: watch ``fd`` for what libcurl waits for."""
        fds = self._fds
        if event == pycurl.POLL_REMOVE:
            if fd in fds:
                self.io_loop.remove_handler(fd)
                del fds[fd]
            return
        events = _IOLOOP_EVENTS[event]
        current = fds.get(fd)
        if current is None:
            self.io_loop.add_handler(fd, self._handle_events, events)
        elif current != events:
            if _REMOVES_BEFORE_CLOSE:
                # An fd still in the map is the socket that was registered: update in place.
                self.io_loop.update_handler(fd, events)
            else:
                # The stock client's way (old libcurl might close an fd and reuse its
                # number without a POLL_REMOVE, and epoll forgets closed fds).
                self.io_loop.remove_handler(fd)
                self.io_loop.add_handler(fd, self._handle_events, events)
        fds[fd] = events
