"""A gateway worker: its application (the URL table), its servers, reload and graceful stop.

``run`` serves on the sockets ``tvgate.listeners`` bound: with one worker this
process serves on them itself; with more, ``tvgate.supervisor`` forks the workers
(each a full gateway: its own database pool, caches, trace writer and metrics, all
built after the fork) and supervises them.

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
import dataclasses
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer

import admin_ui
from admin_ui import auth as ui_auth
from admin_ui import base as ui_base
from admin_ui import charts as ui_charts
from admin_ui import governance as ui_governance
from admin_ui import manage as ui_manage
from admin_ui import me as ui_me
from admin_ui import overview as ui_overview
from admin_ui import traces as ui_traces
from admin_ui import visdom as ui_visdom
from tvgate import ops
from tvgate.api import handlers as api_handlers
from tvgate.config import ConfigError, Settings, load_settings
from tvgate.gateway import Gateway
from tvgate.httpserver import IDLE_CONNECTION_TIMEOUT, GatewayHTTPServer
from tvgate.keyring.local import load_or_create_key_file
from tvgate.lifecycle import reload
from tvgate.proxy import bedrock_mode, vertex_mode
from tvgate.proxy import handlers as proxy_handlers
from tvgate.supervisor import Supervisor
from tvgate.web import NotFoundHandler

log = logging.getLogger("tvgate")

#: At the drain timeout, how long the calls cut get to send their error to their client.
_CUT_GRACE = 2.0
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
        *vertex_mode.default_handlers,
        *bedrock_mode.default_handlers,
        *ui_auth.default_handlers,
        *ui_overview.default_handlers,
        *ui_me.default_handlers,
        *ui_traces.default_handlers,
        *ui_manage.default_handlers,
        *ui_visdom.default_handlers,
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
    restart = reload(gateway, new)
    if restart:
        log.warning("reload: changed settings need a restart to apply: %s", ", ".join(restart))
    log.info("settings reloaded")


async def drain(server: HTTPServer, gateway: Gateway) -> None:
    """Stop accepting, let open calls finish (up to drain_timeout), then close what is left."""
    server.stop()
    # Every request read from now on is answered with "Connection: close", so keep-alive
    # clients (nginx included) reconnect, and land on a worker that is not stopping.
    server.conn_params.no_keep_alive = True
    gateway.inflight.stop_sockets()  # and Responses WebSockets are closed (going away)
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
        idle_connection_timeout=IDLE_CONNECTION_TIMEOUT,
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


def run(
    settings: Settings,
    listeners: list[list[socket.socket]],
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> int:
    """Serve on ``listeners`` (from bind_listeners) until SIGTERM or SIGINT with
    ``settings.worker_count`` workers; the exit code."""
    kept = dict(overrides or {})

    def work(index: int) -> None:
        asyncio.run(serve_worker(settings, listeners[index], index, config_file, kept))

    if len(listeners) == 1:
        work(0)
        for sock in listeners[0]:
            sock.close()
        return 0
    log.info("tvgate supervisor (pid %d) starting %d workers", os.getpid(), len(listeners))
    return Supervisor(settings, listeners, config_file, work).run()
