"""The tvgate process: builds the services, the URL table and the listener; stops gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer

from tvgate import ops
from tvgate.config import Settings
from tvgate.gateway import Gateway
from tvgate.proxy import handlers as proxy_handlers
from tvgate.web import NotFoundHandler

log = logging.getLogger("tvgate")


def make_app(gateway: Gateway) -> tornado.web.Application:
    handlers: list[Any] = [*ops.default_handlers, *proxy_handlers.default_handlers]
    return tornado.web.Application(
        handlers,
        gateway=gateway,
        default_handler_class=NotFoundHandler,
        # Tornado's own access log formats a line per request on the IOLoop; tvgate
        # records every call as a trace instead.
        log_function=lambda _handler: None,
        compress_response=False,
    )


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting, finish, flush traces."""
    gateway = Gateway.build(settings)
    gateway.start()
    app = make_app(gateway)
    server = HTTPServer(
        app,
        xheaders=False,
        # Proxy handlers stream their bodies and enforce the limit themselves.
        max_body_size=max(settings.max_body_bytes * 4, 64 * 1024 * 1024),
        idle_connection_timeout=3600,
    )
    server.listen(settings.port, settings.host)
    log.info("tvgate listening on %s", settings.base_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    server.stop()
    await server.close_all_connections()
    await loop.run_in_executor(None, gateway.stop)
