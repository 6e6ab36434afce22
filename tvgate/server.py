"""The tvgate process: the URL table, the listeners, the worker processes, reload and graceful stop.

``bind_listeners`` binds the listening sockets before anything else at start
(before the database is opened or a first admin is created), and refuses an
address another process listens on. With one worker the process then serves
on its socket itself; with more, ``run`` forks the workers
(each a full gateway: its own database pool, caches, trace writer and
metrics, all built after the fork) and supervises them: a worker that dies is
restarted, SIGTERM/SIGINT and SIGHUP are forwarded.

With several workers the parent binds one SO_REUSEPORT socket per worker on
the same port and keeps them open. The kernel spreads new connections over
the sockets evenly (one shared socket would let whichever worker wakes first
take the whole accept queue: Tornado accepts in bursts). Because the parent
holds each socket, connections queued for a worker that crashed wait for its
replacement instead of being refused. SO_REUSEPORT would as gladly let a second
``tvgate serve`` (of the same user) join that group, and the kernel would then
spread connections over two gateways with different settings: a probe socket
without SO_REUSEPORT, which any listener on the address refuses, comes first.

A worker stops like this: stop accepting; answer every further request on an
open connection with ``Connection: close``; wait until the proxy calls in
flight have sent their last byte, up to ``drain_timeout``; close the
remaining calls, each with its API's error ("the gateway is shutting down", an
in-band error event in a stream; recorded ``gateway_shutdown``), then the
connections (which aborts their upstream transfers and queues their traces);
write every queued trace; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tornado.web
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
from tornado.netutil import bind_sockets

import admin_ui
from admin_ui import auth as ui_auth
from admin_ui import base as ui_base
from admin_ui import charts as ui_charts
from admin_ui import governance as ui_governance
from admin_ui import manage as ui_manage
from admin_ui import me as ui_me
from admin_ui import overview as ui_overview
from admin_ui import traces as ui_traces
from tvgate import ops
from tvgate.api import handlers as api_handlers
from tvgate.config import ConfigError, Settings, load_settings
from tvgate.forwarded import Network, is_trusted_peer
from tvgate.gateway import Gateway
from tvgate.keyring.local import load_or_create_key_file
from tvgate.metrics import Counter
from tvgate.proxy import handlers as proxy_handlers
from tvgate.web import NotFoundHandler

log = logging.getLogger("tvgate")

#: Signals the supervisor takes synchronously (blocked, then sigtimedwait).
_SUPERVISOR_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
#: After a stop is forwarded, how long past drain_timeout the supervisor waits before SIGKILL.
_STOP_GRACE = 15.0
#: At the drain timeout, how long the calls cut get to send their error to their client.
_CUT_GRACE = 2.0
#: Listen backlog (the kernel caps it at net.core.somaxconn).
_BACKLOG = 1024
#: A worker that lived less than this counts as crashing at start: its restart is delayed.
_QUICK_EXIT = 10.0
#: How long a worker waits for its trace writer process to report before it serves.
WRITER_START_TIMEOUT = 20.0


def cookie_secret(settings: Settings) -> bytes:
    """The key that signs UI session cookies: the setting, or a 0600 file in the data dir."""
    if settings.cookie_secret:
        return settings.cookie_secret.encode()
    return load_or_create_key_file(Path(settings.data_dir) / "cookie.secret")


def make_app(gateway: Gateway) -> tornado.web.Application:
    handlers: list[Any] = [
        *ops.default_handlers,
        *proxy_handlers.default_handlers,
        *ui_auth.default_handlers,
        *ui_overview.default_handlers,
        *ui_me.default_handlers,
        *ui_traces.default_handlers,
        *ui_manage.default_handlers,
        *ui_governance.default_handlers,
        *ui_base.not_found_handlers,
        *api_handlers.default_handlers,
    ]
    return tornado.web.Application(
        handlers,
        gateway=gateway,
        default_handler_class=NotFoundHandler,
        cookie_secret=cookie_secret(gateway.settings),
        xsrf_cookies=True,
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Strict", "path": "/ui/"},
        template_path=admin_ui.TEMPLATE_PATH,
        static_path=admin_ui.STATIC_PATH,
        static_url_prefix="/ui/static/",
        ui_modules={"Chart": ui_charts.ChartModule},
        # Tornado's own access log formats a line per request on the IOLoop; tvgate
        # records every call as a trace instead.
        log_function=lambda _handler: None,
        compress_response=False,
    )


def make_metrics_app(gateway: Gateway) -> tornado.web.Application:
    """The per-worker metrics listener: ``/metrics`` and ``/healthz`` only."""
    return tornado.web.Application(
        ops.metrics_handlers,
        gateway=gateway,
        default_handler_class=NotFoundHandler,
        log_function=lambda _handler: None,
    )


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


def reload_settings(
    gateway: Gateway, config_file: str | None, overrides: Mapping[str, Any]
) -> None:
    """SIGHUP: read the settings again and apply those that can change at run time."""
    try:
        new = dataclasses.replace(load_settings(config_file), **overrides)
    except ConfigError as exc:
        log.error("reload refused, settings unchanged: %s", exc)
        return
    restart = gateway.reload(new)
    if restart:
        log.warning("reload: changed settings need a restart to apply: %s", ", ".join(restart))
    log.info("settings reloaded")


async def drain(server: HTTPServer, gateway: Gateway) -> None:
    """Stop accepting, let open calls finish (up to drain_timeout), then close what is left."""
    server.stop()
    # Every request read from now on is answered with "Connection: close", so keep-alive
    # clients (nginx included) reconnect, and land on a worker that is not stopping.
    server.conn_params.no_keep_alive = True
    timeout = gateway.settings.drain_timeout
    log.info(
        "stopping: %d calls in flight, waiting up to %.0fs for them",
        gateway.inflight.count,
        timeout,
    )
    started = time.monotonic()
    if await gateway.inflight.wait_idle(timeout):
        log.info("drained in %.2fs", time.monotonic() - started)
    else:
        log.warning("drain timeout: cutting %d calls", gateway.inflight.count)
        # Each cut call ends with its API's error ("the gateway is shutting down", in band
        # in a stream) and is recorded as gateway_shutdown; a moment for those last bytes
        # to be sent before the connections close.
        gateway.inflight.shut_down()
        await gateway.inflight.wait_idle(_CUT_GRACE)
    await server.close_all_connections()
    # A cut call notices its closed connection at once, aborts its upstream transfer and
    # queues its trace; give those callbacks a moment before the trace writer stops.
    await gateway.inflight.wait_idle(5.0)


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
        peer = self._peer_of.pop(stream, None)  # type: ignore[arg-type]
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


def freeze_startup_objects() -> None:
    """Leave what start-up built (modules, classes, the app, caches) out of the collector.

    A proxy call's objects are freed by reference counting (no reference cycle holds
    them); what the cyclic collector's full passes walked was mostly this long-lived
    start-up state, all of it on every pass, with the event loop stopped (figures in
    bench/README.md).
    Frozen objects are never collected, which long-lived objects are not anyway.

    The youngest generation is collected every 7,000 allocations instead of 700: a
    190 KB body parses into thousands of containers, which at 700 were walked by
    several young collections each and promoted to the older generations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


async def serve_worker(
    settings: Settings,
    sockets: list[socket.socket],
    worker: int = 0,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> None:
    """One gateway on the given listening sockets, until SIGTERM or SIGINT."""
    gateway = Gateway.build(settings, worker)
    await gateway.read_change_counts()
    gateway.start()
    if not await gateway.traces.wait_up(WRITER_START_TIMEOUT):
        log.warning(
            "trace writer process not up after %.0f s; serving, readiness says so",
            WRITER_START_TIMEOUT,
        )
    server = GatewayHTTPServer(
        make_app(gateway),
        xheaders=False,
        # Proxy handlers stream their bodies and enforce the limit themselves.
        max_body_size=max(settings.max_body_bytes * 4, 64 * 1024 * 1024),
        idle_connection_timeout=3600,
        header_timeout=settings.header_timeout,
        max_per_address=settings.max_connections_per_address,
        uncapped=gateway.trusted_proxies,
        refused=gateway.metrics.connections_refused,
    )
    server.add_sockets(sockets)
    metrics_server: HTTPServer | None = None
    if settings.metrics_listen:
        host, port = _split(settings.metrics_listen)
        metrics_server = HTTPServer(make_metrics_app(gateway))
        metrics_server.listen(port + worker, host)
        log.info("worker %d serves /metrics on %s:%d", worker, host, port + worker)
    log.info("tvgate worker %d (pid %d) listening on %s", worker, os.getpid(), settings.base_url)
    freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, reload_settings, gateway, config_file, dict(overrides or {})
    )
    await stop.wait()
    if metrics_server is not None:
        metrics_server.stop()
    await drain(server, gateway)
    await gateway.governor.close()
    await loop.run_in_executor(None, gateway.stop)
    log.info(
        "worker %d stopped: %d traces written, %d dropped",
        worker,
        gateway.traces.stats.written,
        gateway.traces.stats.dropped,
    )


class Supervisor:
    """The parent of the workers: forks them, restarts them, forwards signals to them."""

    def __init__(
        self,
        settings: Settings,
        sockets: list[list[socket.socket]],
        config_file: str | None,
        overrides: Mapping[str, Any],
    ) -> None:
        self.settings = settings
        self.sockets = sockets  # by worker index
        self.config_file = config_file
        self.overrides = overrides
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> when it was last started
        self.delays: dict[int, float] = {}  # worker index -> restart delay after a quick exit
        self.due: dict[int, float] = {}  # worker index -> when to restart it

    def spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISOR_SIGNALS)
                # Keep only this worker's socket: a copy of another worker's would keep it
                # open (and queueing connections nobody accepts) after that worker stops.
                for other, group in enumerate(self.sockets):
                    if other != index:
                        for sock in group:
                            sock.close()
                asyncio.run(
                    serve_worker(
                        self.settings, self.sockets[index], index, self.config_file, self.overrides
                    )
                )
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        self.started[index] = time.monotonic()
        log.info("started worker %d (pid %d)", index, pid)

    def forward(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap(self, stopping: bool) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                log.info("worker %d (pid %d) stopped with %d", index, pid, code)
                continue
            lived = time.monotonic() - self.started.get(index, 0.0)
            delay = 0.5
            if lived < _QUICK_EXIT:
                # Crashing at start (say, the database is down): back off, up to 30 s.
                delay = min(self.delays.get(index, 0.5) * 2, 30.0)
            self.delays[index] = delay
            self.due[index] = time.monotonic() + delay
            log.error(
                "worker %d (pid %d) exited with %d; restarting in %.1fs", index, pid, code, delay
            )

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        for index in range(self.settings.worker_count):
            self.spawn(index)
        stopping = False
        kill_at = 0.0
        while self.children or (self.due and not stopping):
            info = signal.sigtimedwait(_SUPERVISOR_SIGNALS, 0.5)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    self.due.clear()
                    kill_at = time.monotonic() + self.settings.drain_timeout + _STOP_GRACE
                    log.info("stopping %d workers", len(self.children))
                    self.forward(signal.SIGTERM)
                    # Once the workers close theirs too, the port refuses connections at
                    # once (a load balancer tries the next VM) instead of queueing them.
                    self._close_sockets()
                elif info.si_signo == signal.SIGHUP:
                    self._reload_own_log_level()
                    self.forward(signal.SIGHUP)
            self.reap(stopping)
            now = time.monotonic()
            for index, at in list(self.due.items()):
                if at <= now and not stopping:
                    del self.due[index]
                    self.spawn(index)
            if stopping and self.children and now > kill_at:
                log.error("workers still running past the drain timeout; killing them")
                self.forward(signal.SIGKILL)
                kill_at = now + 5
        self._close_sockets()
        log.info("tvgate stopped")
        return 0

    def _close_sockets(self) -> None:
        for group in self.sockets:
            for sock in group:
                sock.close()

    def _reload_own_log_level(self) -> None:
        try:
            level = load_settings(self.config_file).log_level
        except ConfigError:
            return  # the workers log why
        logging.getLogger().setLevel(level.upper())


#: A listening socket's local address.
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: The LISTEN state in /proc/net/tcp.
_TCP_LISTEN = "0A"


class ListenError(Exception):
    """The gateway cannot listen on its address; the message is one line for the operator."""


def bind_listeners(settings: Settings) -> list[list[socket.socket]]:
    """Each worker's listening sockets, or ListenError when the address is taken. On port 0
    the kernel chooses a free port, which every worker shares (``bound_settings``).

    Two starts at the same moment could both pass the probe: after binding, any other
    process's listener on the address makes this start fail too (both fail, rather than
    share the port)."""
    try:
        if settings.worker_count == 1:
            return [bind_sockets(settings.port, settings.host, backlog=_BACKLOG)]
        port = settings.port
        if port:
            _probe(port, settings.host)
        groups: list[list[socket.socket]] = []
        for _ in range(settings.worker_count):
            groups.append(bind_sockets(port, settings.host, backlog=_BACKLOG, reuse_port=True))
            # Port 0: the first worker's port, chosen by the kernel, is every worker's.
            port = groups[0][0].getsockname()[1]
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(_in_use(settings, set(_listeners(settings.port)))) from None
        raise ListenError(f"cannot listen on {settings.listen}: {exc.strerror}") from None
    ours = [sock for group in groups for sock in group]
    addresses = {ipaddress.ip_address(sock.getsockname()[0]) for sock in ours}
    inodes = {os.fstat(sock.fileno()).st_ino for sock in ours}
    others = {
        inode
        for inode, address in _listeners(port).items()
        if inode not in inodes and _overlaps(address, addresses)
    }
    if others:
        for sock in ours:
            sock.close()
        raise ListenError(_in_use(settings, others))
    return groups


def bound_settings(settings: Settings, listeners: list[list[socket.socket]]) -> Settings:
    """``settings`` with the port ``listeners`` are bound to (the kernel's choice when
    ``listen`` has port 0)."""
    if settings.port:
        return settings
    port = listeners[0][0].getsockname()[1]
    return dataclasses.replace(settings, listen=f"{settings.host}:{port}")


def write_port_file(path: str, port: int) -> None:
    """The bound port, for whoever started ``serve`` on port 0; renamed into place, so that a
    reader never sees half of it."""
    partial = f"{path}.partial"
    Path(partial).write_text(f"{port}\n")
    os.replace(partial, path)


def _overlaps(address: _Address, ours: set[_Address]) -> bool:
    """Whether a listener on ``address`` would take connections meant for ``ours``."""
    return any(
        a.version == address.version
        and (a == address or a.is_unspecified or address.is_unspecified)
        for a in ours
    )


def _probe(port: int, host: str) -> None:
    """OSError (EADDRINUSE) when anything listens on host:port, SO_REUSEPORT or not.

    With SO_REUSEADDR and without SO_REUSEPORT a bind conflicts with every listening
    socket on the address, but not with the TIME_WAIT connections of a gateway that
    just stopped."""
    for family, kind, proto, _name, address in socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


def _listeners(port: int) -> dict[int, _Address]:
    """The sockets listening on ``port`` on this machine: inode -> local address (Linux's
    /proc/net/tcp and tcp6; empty where they cannot be read)."""
    found: dict[int, _Address] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_address, local_port = fields[1].split(":")
            if fields[3] == _TCP_LISTEN and int(local_port, 16) == port:
                found[int(fields[9])] = _kernel_address(local_address)
    return found


def _kernel_address(text: str) -> _Address:
    """An address as /proc/net/tcp writes it: hex, each 32-bit word in host (little-endian)
    byte order."""
    raw = bytes.fromhex(text)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _in_use(settings: Settings, inodes: set[int]) -> str:
    return f"{settings.listen} is already in use ({_holder(inodes)}); stop it or set TVGATE_LISTEN"


def _holder(inodes: set[int]) -> str:
    """Which process holds one of these sockets, as "pid 1234: tvgate serve"; best effort
    (another user's processes cannot be looked into): "another process"."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in targets for fd in (entry / "fd").iterdir()):
                holders.add(int(entry.name))
    # A supervisor and its workers all hold the sockets: name the supervisor.
    roots = {pid for pid in holders if _parent(pid) not in holders} or holders
    if not roots:
        return "another process"
    pid = min(roots)
    return f"pid {pid}: {_program(pid)}"


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _program(pid: int) -> str:
    """The holder's name: "tvgate serve", or its program's name; never its arguments,
    which may hold secrets."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve" in argv and any(b"tvgate" in arg for arg in argv[:3]):
            return "tvgate serve"
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "ended since"


def run(
    settings: Settings,
    listeners: list[list[socket.socket]],
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> int:
    """Serve on ``listeners`` (from bind_listeners) until SIGTERM or SIGINT with
    ``settings.worker_count`` workers; the exit code."""
    overrides = dict(overrides or {})
    if len(listeners) == 1:
        asyncio.run(serve_worker(settings, listeners[0], 0, config_file, overrides))
        for sock in listeners[0]:
            sock.close()
        return 0
    log.info("tvgate supervisor (pid %d) starting %d workers", os.getpid(), len(listeners))
    return Supervisor(settings, listeners, config_file, overrides).run()
