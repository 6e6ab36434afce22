"""Trace durability under faults (reliability review, issues 17.2, 17.4 and 17.7).

Every attack runs against a real ``tvgate serve`` over a private PostgreSQL that the
test stops and starts (``tests/pg_private.py``):

- the data directory is a small tmpfs the test fills up, or remounts read-only, while
  the database is away: the spool cannot be written either (17.2);
- two workers spool through an outage, the database comes back under load and goes
  again, the gateway stops, and one worker starts in their place (17.4);
- a stream still open at the drain timeout is cut (17.7).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import (
    GatewayProcess,
    gateway_env,
    gateway_process,
    launch_gateway,
    post_message,
    scrape,
    seed,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tests.outages import outage
from tests.pg_private import PrivatePostgres
from tests.shapes import messages_request
from tvgate.db import open_database
from tvgate.models import Trace

MESSAGE = messages_request("claude-test", 8, "hi")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as the gateway's data directory (the test fills it or makes it
    read-only); unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def launch(
    database_url: str, data_dir: Path, log_dir: Path, tokens: dict[str, str], **env: str
) -> GatewayProcess:
    """A gateway whose log is outside its data directory (which may be full)."""
    log_path = log_dir / f"tvgate-{uuid.uuid4().hex[:8]}.log"
    return gateway_process(gateway_env(database_url, data_dir, 0, **env), tokens, log_path)


def ask(gw: GatewayProcess, session: str) -> int:
    """One call on a connection of its own (so that the kernel spreads them over workers)."""
    return post_message(gw, MESSAGE, session).status_code


class Load:
    """Calls in one session from four threads, each on connections of its own, from
    ``start()`` until ``stop()``; ``answered`` counts the calls answered 200."""

    def __init__(self, gw: GatewayProcess, session: str) -> None:
        self.gw, self.session = gw, session
        self._answered: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(4)]

    @property
    def answered(self) -> int:
        return len(self._answered)

    def call(self) -> int:
        """One call, counted when answered; its status."""
        status = ask(self.gw, self.session)
        if status == 200:
            self._answered.append(1)
        return status

    def _run(self) -> None:
        while not self._stop.is_set():
            self.call()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def finish(self) -> None:
        """Stop, and wait for the calls under way."""
        self.stop()
        for thread in self._threads:
            thread.join(60)


def ready(gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    response = httpx2.get(gw.url + "/readyz", timeout=30)
    return response.status_code, response.json()


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.2)


def traces_of(database_url: str, session: str) -> list[str]:
    open_database(database_url)
    return [t.id for t in Trace.select(Trace.id).where(Trace.session_id == session)]


def wait_traces(database_url: str, session: str, count: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = traces_of(database_url, session)
        if len(ids) >= count or time.monotonic() > deadline:
            return ids
        time.sleep(0.3)


def fill(disk: Path) -> Path:
    """Fill the file system: the spool's next append fails with ENOSPC."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


# --- 17.2: a spool that cannot be written ---


@pytest.mark.slow
def test_a_full_disk_holds_traces_in_memory_and_recording_resumes_by_itself(
    private_pg: PrivatePostgres, fake_provider: FakeProvider, small_disk: Path, tmp_path: Path
) -> None:
    tokens = seed(private_pg.url, small_disk, fake_provider)
    gw = launch(private_pg.url, small_disk, tmp_path, tokens)
    session = uuid.uuid4().hex
    try:
        assert ask(gw, session) == 200  # the caches are warm while the database is up
        wait_traces(private_pg.url, session, 1)
        filler = fill(small_disk)
        private_pg.stop()
        calls = 40
        statuses = [ask(gw, session) for _ in range(calls)]
        assert statuses == [200] * calls
        time.sleep(outage(2))  # several tries of the database and of the spool
        status_in_outage, in_outage = ready(gw)
        filler.unlink()  # space is back: the spool takes what was held
        wait_for(lambda: ready(gw)[1]["trace_writer"].get("held", 0) == 0, "the spool to take them")
        spooled = ready(gw)[1]["trace_writer"]["spool"]
        private_pg.start()
        ids = wait_traces(private_pg.url, session, calls + 1)
        assert len(ids) == len(set(ids)) == calls + 1, f"{len(ids)} of {calls + 1} written"
        writer = in_outage["trace_writer"]
        assert status_in_outage == 503 and in_outage["ready"] is False
        assert writer["held"] == calls
        assert "No space left on device" in writer["spool_error"]
        assert spooled == calls
        assert sum(ready(gw)[1]["trace_writer"]["dropped"].values()) == 0
        metrics = scrape(gw.url)
        assert metrics["tvgate_trace_spool_errors_total"] >= 1
        assert metrics["tvgate_trace_held"] == 0
        wait_for(lambda: ready(gw)[0] == 200, "readiness once everything is written")
        assert ready(gw)[1]["trace_writer"]["spool_error"] is None
    finally:
        stop_gateway(gw.proc)


@pytest.mark.slow
def test_a_read_only_disk_keeps_up_to_the_queue_size_and_counts_the_rest(
    private_pg: PrivatePostgres, fake_provider: FakeProvider, small_disk: Path, tmp_path: Path
) -> None:
    tokens = seed(private_pg.url, small_disk, fake_provider)
    gw = launch(private_pg.url, small_disk, tmp_path, tokens, TVGATE_TRACE_QUEUE_SIZE="10")
    session = uuid.uuid4().hex
    try:
        assert ask(gw, session) == 200
        wait_traces(private_pg.url, session, 1)
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        private_pg.stop()
        calls = 15
        for _ in range(calls):
            assert ask(gw, session) == 200
            time.sleep(0.1)  # one at a time: the queue itself never fills
        time.sleep(outage(1))
        status_in_outage, in_outage = ready(gw)
        # The database comes back first, the disk stays read-only: the database takes them.
        private_pg.start()
        ids = wait_traces(private_pg.url, session, 1 + 10)
        assert len(ids) == 1 + 10, f"{len(ids) - 1} of the 10 held traces written"
        writer = in_outage["trace_writer"]
        assert status_in_outage == 503 and writer["held"] == 10
        assert "Read-only file system" in writer["spool_error"]
        assert writer["dropped"]["spool_error"] == calls - 10
        wait_for(lambda: ready(gw)[0] == 200, "readiness once the held traces are written")
        assert "neither the database nor the spool took it" in gw.log_text()
    finally:
        stop_gateway(gw.proc)
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)


# --- 17.4: a spool per worker ---


@pytest.mark.slow
def test_two_workers_spool_apart_and_every_trace_is_written_exactly_once(
    private_pg: PrivatePostgres, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    tokens = seed(private_pg.url, data_dir, fake_provider)
    gw = launch(private_pg.url, data_dir, tmp_path, tokens, TVGATE_WORKERS="2")
    session = uuid.uuid4().hex
    load = Load(gw, session)
    try:
        assert load.call() == 200
        private_pg.stop()
        load.start()
        wait_for(lambda: load.answered > 150, "calls in the outage")
        # The database comes back under load (both workers replay while the other spools),
        # and goes again: then the gateway stops with both spools on disk.
        private_pg.start()
        time.sleep(outage(3))
        private_pg.stop()
        mark = load.answered
        wait_for(lambda: load.answered > mark + 100, "calls in the second outage")
        load.finish()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(60) == 0
        lines_by_worker: dict[str, int] = {}
        for path in data_dir.glob("traces.spool*"):
            # traces.spool.<worker>, or traces.spool.<worker>.replay-<n> renamed for replay
            owner = path.name.removeprefix("traces.spool").lstrip(".").split(".")[0]
            lines = len(path.read_bytes().splitlines())
            lines_by_worker[owner] = lines_by_worker.get(owner, 0) + lines
        assert set(lines_by_worker) == {"0", "1"}, f"spools by worker: {lines_by_worker}"
        assert all(lines > 0 for lines in lines_by_worker.values()), lines_by_worker
    finally:
        load.stop()
        stop_gateway(gw.proc)
    # One worker in their place: it replays its own spool and adopts worker 1's.
    private_pg.start()
    alone = launch(private_pg.url, data_dir, tmp_path, tokens, TVGATE_WORKERS="1")
    try:
        ids = wait_traces(private_pg.url, session, load.answered)
        assert len(ids) == len(set(ids)) == load.answered, (
            f"{len(ids)} traces for {load.answered} calls"
        )
        wait_for(lambda: not list(data_dir.glob("traces.spool*")), "every spool replayed")
        assert "adopted" in alone.log_text() and "of worker 1" in alone.log_text()
        assert ready(alone)[1]["trace_writer"]["spool"] == 0
    finally:
        stop_gateway(alone.proc)


# --- 17.7: a stream cut at the drain timeout ---


def _stream_lines(
    gw: GatewayProcess, path: str, body: dict[str, Any], started: threading.Event, session: str
) -> list[str]:
    lines: list[str] = []
    headers = {
        "authorization": f"Bearer {gw.tokens['dev@acme.test']}",
        "anthropic-version": "2023-06-01",
        "x-tvgate-session": session,
        "x-fake-scenario": "drip",
        "x-fake-interval": "0.25",
        "x-fake-events": "200",
    }
    with contextlib.suppress(httpx2.TransportError):
        with httpx2.stream(
            "POST", gw.url + path, json=body, headers=headers, timeout=60
        ) as response:
            for line in response.iter_lines():
                lines.append(line)
                if "drip 1/" in line:
                    started.set()
    return lines


def test_a_stream_cut_at_the_drain_timeout_ends_with_an_error_event_and_is_gateway_shutdown(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    database_url = f"sqlite:///{data_dir / 'tvgate.db'}"
    tokens = seed(database_url, data_dir, fake_provider)
    gw = launch(database_url, data_dir, tmp_path, tokens, TVGATE_DRAIN_TIMEOUT="1")
    session = uuid.uuid4().hex
    calls = {
        "anthropic": ("/v1/messages", {**MESSAGE, "stream": True}),
        "openai": (
            "/v1/chat/completions",
            {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ),
    }
    results: dict[str, list[str]] = {}
    started = {name: threading.Event() for name in calls}

    def run(name: str) -> None:
        path, body = calls[name]
        results[name] = _stream_lines(gw, path, body, started[name], session)

    threads = [threading.Thread(target=run, args=(name,)) for name in calls]
    try:
        for thread in threads:
            thread.start()
        for name, event in started.items():
            assert event.wait(30), f"the {name} stream did not start"
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(60) == 0
        for thread in threads:
            thread.join(30)
    finally:
        stop_gateway(gw.proc)
    anthropic_lines = [line for line in results["anthropic"] if line]
    anthropic_data = [line for line in anthropic_lines if line.startswith("data: ")]
    assert anthropic_lines[-2:] == ["event: error", anthropic_data[-1]], anthropic_lines[-4:]
    assert orjson.loads(anthropic_data[-1].removeprefix("data: ")) == {
        "type": "error",
        "error": {"type": "api_error", "message": "the gateway is shutting down"},
    }
    openai_data = [line for line in results["openai"] if line.startswith("data: ")]
    assert orjson.loads(openai_data[-1].removeprefix("data: "))["error"] == {
        "message": "the gateway is shutting down",
        "type": "api_error",
        "param": None,
        "code": None,
    }
    open_database(database_url)
    traces = list(Trace.select().where(Trace.session_id == session))
    assert sorted(t.outcome for t in traces) == ["gateway_shutdown", "gateway_shutdown"]
    assert all(t.error_message == "the gateway is shutting down" for t in traces)


def test_a_second_gateway_on_the_same_data_directory_spools_apart_and_records(
    gateway: GatewayProcess,
) -> None:
    """A second ``tvgate serve`` on a data directory whose worker 0 runs in another process
    finds that spool taken: it uses the first free slot (1: the first gateway runs one
    worker) instead of waiting for the lock, and its calls are recorded."""
    second = launch_gateway(gateway.database_url, gateway.data_dir, gateway.tokens)
    try:
        session = uuid.uuid4().hex
        response = httpx2.post(
            second.url + "/v1/messages",
            headers={
                "x-api-key": gateway.tokens["dev@acme.test"],
                "anthropic-version": "2023-06-01",
                "x-claude-code-session-id": session,
            },
            json={
                "model": "claude-test",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}],
            },
            timeout=30,
        )
        assert response.status_code == 200
        (trace,) = second.wait_traces(1, timeout=30, session_id=session)
        assert trace.outcome == "ok"
        assert 'this one spools as 1"' in second.log_text()
    finally:
        stop_gateway(second.proc)
