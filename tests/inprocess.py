"""The real gateway inside the test process, for routing, governance and fallback logic.

``start_in_process`` starts tvgate's ``Gateway`` (``Gateway.build``, as a
worker does) and its Tornado application (``tvgate.server.make_app``) on a
real port of 127.0.0.1, with an IOLoop of its own in a thread, over the real
SQLite or PostgreSQL database and the real keyring: Tornado's
``AsyncHTTPTestCase``, for synchronous tests and the SDKs' clients. There is no
process to start (an interpreter, imports and migrations: about a second
each time) nor to stop.

What only a process shows stays with ``tvgate serve`` (tests/harness.py):
signals, workers, reload, the listener, logs, a kill and its spool, and
"another process" (a change reaching it by TTL: in this process the services'
key-change signal reaches the gateway at once).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import peewee
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.harness import RunningGateway, gateway_env
from tvgate import models
from tvgate.config import load_settings
from tvgate.gateway import Gateway
from tvgate.server import drain, make_app
from tvgate.traces import store as trace_store


@dataclass(kw_only=True)
class InProcessGateway(RunningGateway):
    """A gateway serving from a thread of this process."""

    db: peewee.Database
    loop: asyncio.AbstractEventLoop
    stopping: asyncio.Event
    thread: threading.Thread

    def bind(self) -> None:
        """The models on the gateway's own database object (its connections are per
        thread): opening the URL again would move the gateway's models too."""
        if models.database.obj is not self.db:
            models.database.initialize(self.db)

    def stop(self) -> None:
        """Drain and stop, as a worker does on SIGTERM."""
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the in-process gateway did not stop"


_Started = tuple[int, peewee.Database, asyncio.AbstractEventLoop, asyncio.Event]


async def _serve(settings_env: dict[str, str], started: Future[_Started]) -> None:
    try:
        settings = load_settings(environ=settings_env)
        gateway = Gateway.build(settings)
        gateway.start()
        # Proxy handlers stream their bodies and enforce the limit themselves (as in serve).
        server = HTTPServer(
            make_app(gateway), max_body_size=max(settings.max_body_bytes * 4, 64 * 1024 * 1024)
        )
        sockets = bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
    except BaseException as exc:
        started.set_exception(exc)
        raise
    stopping = asyncio.Event()
    port = sockets[0].getsockname()[1]
    started.set_result((port, models.database.obj, asyncio.get_running_loop(), stopping))
    await stopping.wait()
    await drain(server, gateway)
    await gateway.governor.close()
    await asyncio.get_running_loop().run_in_executor(None, gateway.stop)


def start_in_process(
    database_url: str, data_dir: Path, tokens: dict[str, str], **extra_env: str
) -> InProcessGateway:
    """A gateway in this process over an already seeded database, with the settings a
    ``launch_gateway`` gateway has (``extra_env`` on top)."""
    env = gateway_env(database_url, data_dir, 0, **extra_env)
    # The trace writer's memory of the blobs it stored is per process and keyed by org id,
    # as if a process had one database: an earlier gateway of this process on another
    # database (the SQLite tier before the PostgreSQL one) must not vouch for blobs here.
    trace_store._TOUCHED.clear()
    started: Future[_Started] = Future()
    thread = threading.Thread(
        target=lambda: asyncio.run(_serve(env, started)), name="in-process-gateway", daemon=True
    )
    thread.start()
    port, db, loop, stopping = started.result(timeout=60)
    env["TVGATE_LISTEN"] = f"127.0.0.1:{port}"
    return InProcessGateway(
        url=f"http://127.0.0.1:{port}",
        database_url=database_url,
        data_dir=data_dir,
        env=env,
        tokens=tokens,
        db=db,
        loop=loop,
        stopping=stopping,
        thread=thread,
    )
