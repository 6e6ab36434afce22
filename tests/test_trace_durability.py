"""Traces are never lost: the database stops under load, a push sink's receiver fails."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
import uuid
from pathlib import Path

import httpx2
import orjson
import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from tests.conftest import (
    GatewayProcess,
    beside,
    free_port,
    launch_gateway,
    seed,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tests.outages import outage
from tests.pg_private import PrivatePostgres
from tvgate.db import open_database
from tvgate.models import Trace

OUTAGE_SECONDS = outage(60)
BODY = orjson.dumps(
    {"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
)


@pytest.mark.slow
def test_database_stopped_under_load_loses_no_trace(
    private_pg: PrivatePostgres, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    tokens = seed(private_pg.url, tmp_path, fake_provider)
    gateway = launch_gateway(private_pg.url, tmp_path, tokens)
    session = uuid.uuid4().hex
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx2.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.post(
                    gateway.url + "/v1/messages",
                    content=BODY,
                    headers={"x-api-key": tokens["dev@acme.test"], "x-tvgate-session": session},
                )
                statuses.append(response.status_code)
                time.sleep(0.05)

    worker = threading.Thread(target=load)
    try:
        worker.start()
        time.sleep(outage(1.5))
        private_pg.stop()
        down_from = len(statuses)
        # A minute, long past the gateway's 1 s caches: routes, tokens and keys are stale.
        time.sleep(OUTAGE_SECONDS)
        down_until = len(statuses)
        private_pg.start()
        time.sleep(outage(1.5))
        stop.set()
        worker.join(30)
        assert down_until - down_from > 20, (
            "no load reached the gateway while the database was down"
        )
        assert set(statuses) == {200}, f"the proxy did not keep serving: {sorted(set(statuses))}"
        open_database(private_pg.url)
        deadline = time.monotonic() + 30
        while True:
            written = Trace.select().where(Trace.session_id == session).count()
            if written == len(statuses) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ids = [t.id for t in Trace.select(Trace.id).where(Trace.session_id == session)]
        assert len(ids) == len(set(ids)) == len(statuses)
        assert not list(tmp_path.glob("traces.spool*")), "the spool was not replayed"
        assert "spooling" in gateway.log_text()
    finally:
        stop.set()
        stop_gateway(gateway.proc)


class Receiver:
    """A push sink receiver that checks signatures and fails on purpose at first."""

    def __init__(self, secret: str, failures: int) -> None:
        self.secret = secret
        self.failures = failures
        self.port = free_port()
        self.batches: list[list[dict[str, object]]] = []
        self.bad_signatures = 0
        self.loop: IOLoop | None = None
        receiver = self

        class Handler(tornado.web.RequestHandler):
            def post(self) -> None:
                timestamp = self.request.headers.get("X-Tvgate-Timestamp", "")
                expected = (
                    "sha256="
                    + hmac.new(
                        receiver.secret.encode(),
                        timestamp.encode() + b"." + self.request.body,
                        hashlib.sha256,
                    ).hexdigest()
                )
                if not hmac.compare_digest(
                    expected, self.request.headers.get("X-Tvgate-Signature", "")
                ):
                    receiver.bad_signatures += 1
                    self.set_status(401)
                    return
                if receiver.failures > 0:
                    receiver.failures -= 1
                    self.set_status(500)
                    return
                receiver.batches.append(orjson.loads(self.request.body)["traces"])

        def run() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self.loop = IOLoop.current()
            HTTPServer(tornado.web.Application([(r"/ingest", Handler)])).listen(
                self.port, "127.0.0.1"
            )
            self.loop.start()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)


def test_push_sink_delivers_every_trace_signed_despite_failures(gateway: GatewayProcess) -> None:
    secret = "sink-secret-" + uuid.uuid4().hex
    receiver = Receiver(secret, failures=2)
    pusher = beside(
        gateway,
        TVGATE_SINK_URL=receiver.url,
        TVGATE_SINK_SECRET=secret,
        TVGATE_SINK_INTERVAL="0.2",
        TVGATE_SINK_BATCH_SIZE="50",
    )
    try:
        session = uuid.uuid4().hex
        for _ in range(7):
            response = httpx2.post(
                pusher.url + "/v1/messages",
                content=BODY,
                headers={"x-api-key": gateway.tokens["dev@acme.test"], "x-tvgate-session": session},
            )
            assert response.status_code == 200
        deadline = time.monotonic() + 30
        while True:
            delivered = [
                t for batch in receiver.batches for t in batch if t["session_id"] == session
            ]
            if len(delivered) >= 7 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len({t["id"] for t in delivered}) == 7
        assert receiver.bad_signatures == 0 and receiver.failures == 0
        everything = [t for batch in receiver.batches for t in batch]
        assert len(everything) == len({t["id"] for t in everything}), "a trace was sent twice"
    finally:
        stop_gateway(pusher.proc)
        receiver.stop()
