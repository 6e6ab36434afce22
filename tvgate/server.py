"""The tvgate process: builds the services, the URL table and the listener; stops gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer

import admin_ui
from admin_ui import auth as ui_auth
from tvgate import ops
from tvgate.api import handlers as api_handlers
from tvgate.config import Settings
from tvgate.gateway import Gateway
from tvgate.keyring.local import load_or_create_key_file
from tvgate.proxy import handlers as proxy_handlers
from tvgate.web import NotFoundHandler

log = logging.getLogger("tvgate")


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
