"""One transfer to a provider through ``CurlAsyncHTTPClient``, streamed as it arrives.

Tornado's curl client queues response chunks and header lines onto the IOLoop;
tvgate replaces curl's header and write functions in ``prepare_curl_callback``
so that headers and bytes reach the listener synchronously, in order, with no
extra hop per chunk. That also gives tvgate the controls Tornado does not offer:

* backpressure: when the client is slow the write function returns
  ``WRITEFUNC_PAUSE`` and the transfer is resumed once the client drains;
* abort: a client that goes away makes the write function return 0 and the
  progress function return 1, which ends the transfer at once even while the
  provider is silent (a Tornado future cannot be cancelled);
* an idle timeout instead of a whole-transfer timeout (``LOW_SPEED_*``), so a
  long stream lives as long as bytes keep coming;
* an address check on every connection, after DNS (``OPENSOCKETFUNCTION``).

A transfer that fails says where and why (``UpstreamResult.describe``): the
provider's host and a short cause (DNS, refused, TLS, timeout), which the
client, the trace and the log are told. Neither is a secret; the URL's path,
query and user info, and every header, are left out.

What goes out is built here too: the URL (``upstream_url``) and the client's headers
as the provider should see them (``upstream_headers``: credentials, hop-by-hop and
tvgate's own headers dropped, the provider key and the loop mark set).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import pycurl
from tornado.curl_httpclient import CurlAsyncHTTPClient, CurlError
from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders

from tvgate.headers import header
from tvgate.proxy.hops import HOP_HEADER
from tvgate.traces.attribution import ATTRIBUTION_PREFIXES

#: Request headers that never go upstream: hop-by-hop, the client's own credentials
#: and cookies, and what tvgate recomputes (length, encoding).
_DROPPED_REQUEST_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "expect",
        "x-api-key",
        "api-key",  # Azure OpenAI's, which its SDK sends the tvgate token in
        "authorization",
        "cookie",
        # A client's own AWS signature (a cloud key signs its calls itself).
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
    }
)

#: curl error codes tvgate tells apart.
CURLE_COULDNT_RESOLVE_HOST = 6
CURLE_COULDNT_CONNECT = 7
CURLE_OPERATION_TIMEDOUT = 28
CURLE_SSL_CONNECT_ERROR = 35
CURLE_ABORTED_BY_CALLBACK = 42
CURLE_PEER_FAILED_VERIFICATION = 60

#: What each curl error of the connection stage says went wrong, in a few words.
#: (51 is the verification failure of libcurl before 7.62, which merged it into 60.)
_CONNECT_CAUSES = {
    CURLE_COULDNT_RESOLVE_HOST: "DNS lookup failed: the host name does not resolve",
    CURLE_SSL_CONNECT_ERROR: "TLS handshake failed (is it an https server on that port?)",
    51: "TLS certificate not trusted (self-signed, expired, or for another host name)",
    53: "TLS setup failed in tvgate (crypto engine not found)",
    58: "TLS setup failed in tvgate (client certificate problem)",
    59: "TLS handshake failed: no cipher in common",
    CURLE_PEER_FAILED_VERIFICATION: (
        "TLS certificate not trusted (self-signed, expired, or for another host name)"
    ),
    77: "TLS setup failed in tvgate: its CA certificates cannot be read",
    83: "TLS certificate not trusted (issuer check failed)",
    90: "TLS certificate does not match the pinned public key",
    91: "TLS certificate status is invalid",
}
#: Failures once connected: the request went out, or was going out, and this came back.
_EXCHANGE_CAUSES = {
    1: "the URL's scheme is neither http nor https",
    8: "the provider's answer is not HTTP",
    52: "the provider closed the connection without answering",
    55: "sending the request failed (the connection was reset)",
    56: "the connection was reset while the answer was coming",
}
#: Why a connection attempt failed (curl's 7), by the system's error number.
_SOCKET_CAUSES = {
    errno.ECONNREFUSED: "connection refused (nothing listens on that port)",
    errno.EHOSTUNREACH: "the host is unreachable (no route to it)",
    errno.ENETUNREACH: "the network is unreachable",
    errno.ETIMEDOUT: "the connection attempt timed out",
}

log = logging.getLogger("tvgate.proxy")


class UpstreamListener(Protocol):
    def on_upstream_headers(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def on_upstream_chunk(self, chunk: bytes) -> bool:
        """Take a chunk; False means "not taken, pause until resume()"."""


@dataclass(slots=True)
class UpstreamResult:
    #: 0 when the transfer completed; else curl's error code.
    curl_error: int
    message: str
    #: Set when tvgate refused the connection (address check).
    refused: str = ""
    #: The provider sent nothing for longer than the idle timeout.
    timed_out: bool = False
    #: Set when the transfer failed: the provider's host (and port, if the URL has one).
    host: str = ""
    #: Set when the transfer failed: what went wrong, in a few words (``failure_cause``).
    cause: str = ""
    #: The failure happened before the provider was connected to (DNS, TCP, TLS).
    connecting: bool = False

    @property
    def failed(self) -> bool:
        """The transfer did not complete, or what came is not to be passed on (refused)."""
        return self.curl_error != 0 or bool(self.refused)

    def describe(self) -> str:
        """What the client, the trace and the log are told of a failed transfer."""
        if self.connecting:
            return f"could not connect to the provider at {self.host}: {self.cause}"
        if self.refused:
            return self.refused  # what came was refused (a redirect, a private address)
        if self.timed_out or self.curl_error == CURLE_OPERATION_TIMEDOUT:
            return f"timed out waiting for the provider at {self.host}: {self.cause}"
        return f"the connection to the provider failed at {self.host}: {self.cause}"


def url_host(url: str) -> str:
    """The host of ``url`` (with its port when the URL names one), without user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address, written as in a URL
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            return f"{host}:{parts.port}"
    return host


def failure_cause(
    curl_error: int,
    curl_message: str,
    os_errno: int,
    *,
    timed_out: bool,
    connect_timeout: float,
    idle_timeout: int,
) -> tuple[str, bool]:
    """(cause, while connecting) of a failed transfer, from curl's error code, its message
    and the system's error number of the last socket call."""
    if timed_out or "too slow" in curl_message.lower():
        # tvgate's idle timeout (the progress function), or curl's own low-speed check.
        return f"nothing received for {idle_timeout} s (TVGATE_IDLE_TIMEOUT)", False
    if curl_error == CURLE_OPERATION_TIMEDOUT:
        # CONNECTTIMEOUT covers the DNS lookup, the TCP connection and the TLS handshake.
        if "resolv" in curl_message.lower():
            return f"DNS lookup timed out after {connect_timeout:g} s", True
        return (
            f"no connection within {connect_timeout:g} s (TVGATE_CONNECT_TIMEOUT): "
            "the host does not answer, or the TLS handshake did not finish",
            True,
        )
    if curl_error == CURLE_COULDNT_CONNECT:
        return _SOCKET_CAUSES.get(os_errno, "the connection failed"), True
    if curl_error in _CONNECT_CAUSES:
        return _CONNECT_CAUSES[curl_error], True
    return _EXCHANGE_CAUSES.get(curl_error, f"curl error {curl_error}"), False


#: IPv6 ranges that are never a provider: site-local (deprecated), IPv4-compatible
#: (deprecated; ``::7f00:1`` is 127.0.0.1) and local-use NAT64, whose embedding depends on
#: a prefix length only the local network knows (RFC 8215).
_NEVER_PUBLIC_V6 = tuple(
    ipaddress.IPv6Network(net) for net in ("fec0::/10", "::/96", "64:ff9b:1::/48")
)
#: Ranges whose last 32 bits are an IPv4 address the packets end up at: IPv4-translated
#: (RFC 2765) and well-known NAT64 (RFC 6052).
_LOW_32_BITS_V4 = tuple(ipaddress.IPv6Network(net) for net in ("::ffff:0:0:0/96", "64:ff9b::/96"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, translated, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _LOW_32_BITS_V4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(host: str) -> bool:
    """False for loopback, private, link-local, multicast, reserved and unspecified addresses,
    also when written inside an IPv6 address (NAT64, 6to4, mapped, translated, compatible)."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            host.split("%", 1)[0]
        )
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NEVER_PUBLIC_V6):
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
        elif ip.is_reserved:
            # Python counts unassigned IPv6 space as global; nothing is routed there.
            return False
    return ip.is_global and not ip.is_multicast


class UpstreamExchange:
    """A single provider call. Create, ``await run()``; ``abort()``/``resume()`` from the IOLoop."""

    def __init__(
        self,
        client: CurlAsyncHTTPClient,
        url: str,
        headers: HTTPHeaders | dict[str, str],
        body: bytes | None,
        listener: UpstreamListener,
        *,
        method: str = "POST",
        connect_timeout: float,
        idle_timeout: int,
        allow_private: bool,
    ) -> None:
        self.client = client
        self.listener: UpstreamListener | None = listener
        self.allow_private = allow_private
        self.url = url
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.aborted = False
        self.paused = False
        self.refused = ""
        self.timed_out = False
        self.last_activity = time.monotonic()
        self.status = 0
        #: The field lines of the header block being received, as libcurl gave them.
        self._lines: list[bytes] = []
        self._curl: pycurl.Curl | None = None
        # The request refers back to this exchange (prepare_curl_callback); only run()
        # holds it, so that no reference cycle keeps a finished call for the collector.
        self._request: HTTPRequest | None = HTTPRequest(
            url,
            method=method,
            headers=headers,
            body=body,
            connect_timeout=connect_timeout,
            request_timeout=0,  # no whole-transfer limit: LOW_SPEED_* is the idle timeout
            follow_redirects=False,
            decompress_response=False,
            prepare_curl_callback=self._prepare,
        )

    def _prepare(self, curl: Any) -> None:
        self._curl = curl
        curl.setopt(pycurl.HEADERFUNCTION, self._on_header_line)
        curl.setopt(pycurl.WRITEFUNCTION, self._on_body)
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, self._on_progress)
        curl.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        curl.setopt(pycurl.LOW_SPEED_TIME, self.idle_timeout)
        if not self.allow_private:
            curl.setopt(pycurl.OPENSOCKETFUNCTION, self._open_socket)
        else:
            curl.unsetopt(pycurl.OPENSOCKETFUNCTION)

    # --- curl callbacks: run inside curl_multi_socket_action on the IOLoop thread ---

    def _on_header_line(self, raw: bytes) -> None:
        # Called once per line (libcurl hands over whole lines): a field line is only kept,
        # and the block is read at its blank line, decoded and split once.
        if raw == b"\r\n" or raw == b"\n":
            self.last_activity = time.monotonic()
            if self.status >= 200 and self.listener is not None:
                self.listener.on_upstream_headers(self.status, _header_fields(self._lines))
        elif raw.startswith(b"HTTP/"):
            # A new header block (after a 1xx, or the first one).
            self.last_activity = time.monotonic()
            parts = raw.decode("latin-1").rstrip("\r\n").split(" ", 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self._lines = []
        else:
            self._lines.append(raw)

    def _on_body(self, chunk: bytes) -> int | None:
        if self.aborted or self.listener is None:
            return 0
        self.last_activity = time.monotonic()
        try:
            taken = self.listener.on_upstream_chunk(chunk)
        except Exception:
            # Never let an exception unwind into libcurl; end the transfer instead.
            log.exception("relaying an upstream chunk failed")
            self.aborted = True
            return 0
        if not taken:
            self.paused = True
            return pycurl.WRITEFUNC_PAUSE
        return None

    def _on_progress(self, _dltotal: int, _dlnow: int, _ultotal: int, _ulnow: int) -> int:
        # curl calls this at least once a second while LOW_SPEED_* is set. curl's own low
        # speed check averages over seconds, so a stream that sends a little every few
        # seconds would never trip it: the idle timeout is measured here, exactly.
        if self.aborted:
            return 1
        if not self.paused and time.monotonic() - self.last_activity > self.idle_timeout:
            self.timed_out = True
            return 1
        return 0

    def _open_socket(self, _purpose: int, address: Any) -> Any:
        family, socktype, protocol, addr = address
        if family not in (socket.AF_INET, socket.AF_INET6) or not is_public_address(addr[0]):
            self.refused = f"upstream address {addr[0]} is not a public address"
            return pycurl.SOCKET_BAD
        return socket.socket(family, socktype, protocol)

    # --- control, from the IOLoop ---

    def abort(self) -> None:
        """Stop the transfer: the client is gone or tvgate gave up."""
        self.aborted = True
        if self.paused:
            # A paused transfer calls no write function; resume it so that it can fail now.
            self.resume()

    def resume(self) -> None:
        if self.paused and self._curl is not None:
            self.paused = False
            self.last_activity = time.monotonic()  # the wait was the client's, not the provider's
            # A pycurl.error here means the transfer already failed; run() reports it.
            with contextlib.suppress(pycurl.error):
                self._curl.pause(pycurl.PAUSE_CONT)

    async def run(self) -> UpstreamResult:
        request, self._request = self._request, None
        assert request is not None, "run() is called once"
        try:
            # raise_error=False returns HTTP error statuses; transport failures still raise.
            await self.client.fetch(request, raise_error=False)
        except CurlError as exc:
            return self._failure(int(exc.errno), exc.message or "", getattr(exc, "os_errno", 0))
        finally:
            # The curl handle goes back to Tornado's pool; keep it from holding our listener.
            self.listener = None
            self._curl = None
        return UpstreamResult(0, "", self.refused)

    def _failure(self, curl_error: int, message: str, os_errno: int) -> UpstreamResult:
        host = url_host(self.url)
        cause, connecting = failure_cause(
            curl_error,
            message,
            os_errno,
            timed_out=self.timed_out,
            connect_timeout=self.connect_timeout,
            idle_timeout=self.idle_timeout,
        )
        if self.refused:
            # The address check (OPENSOCKETFUNCTION) refused every address the host had.
            cause, connecting = self.refused, True
        return UpstreamResult(
            curl_error, message, self.refused, self.timed_out, host, cause, connecting
        )


def _header_fields(lines: list[bytes]) -> list[tuple[str, str]]:
    """(name, value) of each field line of a header block, as Latin-1 text, stripped; a
    line that is not ``name: value`` (an obsolete continuation, a stray line) is skipped.
    Every line ends in a newline (libcurl's header function is given whole lines)."""
    fields = []
    for line in b"".join(lines).decode("latin-1").split("\n"):
        name, sep, value = line.partition(":")
        if sep and name and not name[0].isspace():
            fields.append((name.strip(), value.strip()))
    return fields


def upstream_url(base_url: str, path: str, query: str) -> str:
    url = base_url.rstrip("/") + path
    return f"{url}?{query}" if query else url


def upstream_headers(
    client_headers: HTTPHeaders, auth: list[tuple[str, str]], hop_marks: str
) -> dict[str, str] | HTTPHeaders:
    """The client's headers as the provider should see them, with the provider key injected
    (``auth``: the headers its API carries it in) and the loop mark (``tvgate.proxy.hops``)
    set.

    A plain dict when no header name repeats (the usual case): the HTTP client copies it
    into its own ``HTTPHeaders`` anyway, and building one here too would validate and
    normalise every header twice more. Names are already normalised by Tornado's parser.
    """
    lines = _forwarded_lines(client_headers)
    headers: dict[str, str] | HTTPHeaders = dict(lines)
    if len(headers) < len(lines):
        # A name repeats: every line is kept, as the client sent it.
        headers = HTTPHeaders()
        for name, value in lines:
            headers.add(name, value)
    for name, value in auth:
        headers[name] = value
    headers[HOP_HEADER] = hop_marks
    return headers


def _forwarded_lines(client_headers: HTTPHeaders) -> list[tuple[str, str]]:
    """The client's header lines less hop-by-hop, credentials and tvgate's own."""
    connection_listed = {
        token.strip().lower() for token in header(client_headers, "Connection").split(",")
    }
    return [
        (name, value)
        for name, value in client_headers.get_all()
        if not (
            (lower := name.lower()) in _DROPPED_REQUEST_HEADERS
            or lower in connection_listed
            or lower.startswith(ATTRIBUTION_PREFIXES)
        )
    ]
