"""A Tornado application served on 127.0.0.1 from a daemon thread with its own IOLoop: how
the fakes of outside services (tests/fake_visdom.py, tests/fake_visdom_ingest.py,
tests/fake_bedrock.py) run."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from tests.harness import free_port


class ServedApp:
    """``start(handlers)`` serves them on ``port`` until ``stop()`` (which drops every
    connection); it may be started again on the same port."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop: IOLoop | None = None
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(
        self, handlers: list[Any], *, max_body_size: int | None = None, **settings: Any
    ) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self._loop = IOLoop.current()
            app = tornado.web.Application(handlers, log_function=lambda _h: None, **settings)
            self._server = HTTPServer(app, max_body_size=max_body_size)
            self._server.listen(self.port, "127.0.0.1")
            ready.set()
            self._loop.start()
            self._loop.close(all_fds=True)

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.stop()
            await server.close_all_connections()
            IOLoop.current().stop()

        loop.add_callback(shutdown)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._server = self._thread = None
