"""The tvgate process as an operator runs it: graceful stop, workers, reload, metrics, JSON logs.

Each test starts its own ``tvgate serve`` (SQLite, the fake provider behind it)
when it needs to signal or stop the process; the metrics test uses the shared
gateway of the suite and looks at differences only.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import re
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.types import MessageParam

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    free_port,
    gateway_env,
    gateway_process,
    scrape,
    seed,
    start_gateway,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tvgate.metrics import Histogram, Metrics

MESSAGE_BODY: dict[str, Any] = {
    "model": "claude-test",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello"}],
}


def launch(tmp_path: Path, fake: FakeProvider, **extra_env: str) -> GatewayProcess:
    """A seeded SQLite gateway of this test's own, so that the test may stop it."""
    data_dir = tmp_path / "data"
    database_url = f"sqlite:///{data_dir / 'tvgate.db'}"
    tokens = seed(database_url, data_dir, fake)
    env = gateway_env(database_url, data_dir, 0, **extra_env)
    return gateway_process(env, tokens, tmp_path / "tvgate.log")


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def open_streams(
    gw: GatewayProcess, count: int, headers: dict[str, str]
) -> tuple[list[asyncio.Task[list[str]]], httpx2.AsyncClient]:
    """Start ``count`` streaming calls; returns once every one has received its first delta."""
    started: set[int] = set()
    body = {**MESSAGE_BODY, "stream": True}
    request_headers = {
        "x-api-key": gw.tokens["dev@acme.test"],
        "anthropic-version": "2023-06-01",
        **headers,
    }
    client = httpx2.AsyncClient(
        base_url=gw.url, limits=httpx2.Limits(max_connections=count * 2), timeout=60
    )

    async def one(index: int) -> list[str]:
        lines: list[str] = []
        try:
            async with client.stream(
                "POST", "/v1/messages", json=body, headers=request_headers
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("event: content_block_delta"):
                        started.add(index)
                    lines.append(line)
        except httpx2.TransportError:
            lines.append("<transport error>")
        return lines

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    deadline = time.monotonic() + 20
    while len(started) < count:
        assert time.monotonic() < deadline, f"only {len(started)} of {count} streams started"
        await asyncio.sleep(0.02)
    return tasks, client


async def wait_exit(gw: GatewayProcess, timeout: float = 60) -> int:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, gw.proc.wait, timeout)


async def test_sigterm_lets_twenty_open_streams_finish_and_loses_no_trace(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    gw = launch(tmp_path, fake_provider)
    session = str(uuid.uuid4())
    events = 20
    headers = {
        "x-fake-scenario": "drip",
        "x-fake-interval": "0.15",
        "x-fake-events": str(events),
        "X-Claude-Code-Session-Id": session,
    }
    try:
        tasks, client = await open_streams(gw, 20, headers)
        gw.proc.send_signal(signal.SIGTERM)
        # The listener closes at once, while the streams go on.
        deadline = time.monotonic() + 5
        while not refuses_connections(gw.url):
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            await asyncio.sleep(0.02)
        assert not all(task.done() for task in tasks)
        results = await asyncio.gather(*tasks)
        await client.aclose()
        assert await wait_exit(gw) == 0
    finally:
        stop_gateway(gw.proc)
    for lines in results:
        assert lines.count("event: content_block_delta") == events
        assert "event: message_stop" in lines
    traces = gw.traces(session_id=session)
    assert len(traces) == 20
    assert {t.outcome for t in traces} == {"ok"}
    assert all(t.output_tokens == events for t in traces)
    log = gw.log_text()
    assert "stopping: 20 calls in flight" in log and "drained in" in log
    assert "worker 0 stopped: 20 traces written, 0 dropped" in log


async def test_drain_timeout_cuts_streams_and_still_writes_their_traces(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    gw = launch(tmp_path, fake_provider, TVGATE_DRAIN_TIMEOUT="1")
    session = str(uuid.uuid4())
    headers = {
        "x-fake-scenario": "drip",
        "x-fake-interval": "0.25",
        "x-fake-events": "200",
        "X-Claude-Code-Session-Id": session,
    }
    try:
        tasks, client = await open_streams(gw, 5, headers)
        gw.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(gw) == 0
        results = await asyncio.gather(*tasks)
        await client.aclose()
    finally:
        stop_gateway(gw.proc)
    for lines in results:
        assert "event: message_stop" not in lines
        # Told in band, in the Anthropic format (tests/test_reliability_writer2.py has both).
        assert "event: error" in lines
    traces = gw.traces(session_id=session)
    assert len(traces) == 5
    assert {t.outcome for t in traces} == {"gateway_shutdown"}
    assert "drain timeout: cutting 5 calls" in gw.log_text()


def _pair_of_free_ports() -> int:
    """A port p such that p and p + 1 are both free (per-worker metrics listeners)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no pair of free ports")


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_two_workers_serve_one_port_and_a_dead_worker_is_replaced(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    metrics_port = _pair_of_free_ports()
    gw = launch(
        tmp_path,
        fake_provider,
        TVGATE_WORKERS="2",
        TVGATE_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
    )
    try:
        workers: dict[int, int] = {}  # pid -> worker index
        for _ in range(200):
            # A new connection each time: the kernel spreads connections over the workers.
            health = httpx2.get(gw.url + "/healthz", timeout=5).json()
            workers[health["pid"]] = health["worker"]
            if len(workers) == 2:
                break
        assert sorted(workers.values()) == [0, 1]
        assert all(_parent_of(pid) == gw.proc.pid for pid in workers)

        # Each is a full gateway.
        client = anthropic.Anthropic(
            base_url=gw.url, api_key=gw.tokens["dev@acme.test"], max_retries=0
        )
        for _ in range(4):
            message = client.messages.create(**MESSAGE_BODY)
            assert message.content[0].text == "You said: hello"

        # Each worker has its own metrics port: worker k on metrics_port + k.
        for index in (0, 1):
            text = httpx2.get(f"http://127.0.0.1:{metrics_port + index}/metrics", timeout=5).text
            assert f'tvgate_worker_info{{worker="{index}"' in text

        # A worker that dies is replaced; the port keeps answering meanwhile.
        victim = next(pid for pid, index in workers.items() if index == 0)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        replacement = None
        while replacement is None:
            assert time.monotonic() < deadline, "worker 0 was not restarted"
            health = httpx2.get(gw.url + "/healthz", timeout=5).json()
            if health["worker"] == 0 and health["pid"] != victim:
                replacement = health["pid"]
        assert _parent_of(replacement) == gw.proc.pid

        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(30) == 0
    finally:
        stop_gateway(gw.proc)
    log = gw.log_text()
    assert "exited with -9; restarting" in log
    assert "tvgate stopped" in log


def test_logs_are_json_lines_without_secrets_or_prompts_and_sighup_reloads(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    config = tmp_path / "tvgate.toml"
    config.write_text('log_level = "debug"\nmax_clients = 1000\n')
    data_dir = tmp_path / "data"
    database_url = f"sqlite:///{data_dir / 'tvgate.db'}"
    tokens = seed(database_url, data_dir, fake_provider)
    env = gateway_env(database_url, data_dir, 0, TVGATE_CONFIG=str(config))
    del env["TVGATE_LOG_LEVEL"]  # from the file, so that a reload can change it
    log_path = tmp_path / "tvgate.log"
    proc = start_gateway(env, log_path)
    url = "http://" + env["TVGATE_LISTEN"]
    prompt = "PROMPT-CANARY-" + uuid.uuid4().hex
    token = tokens["dev@acme.test"]
    try:
        client = anthropic.Anthropic(base_url=url, api_key=token, max_retries=0)
        messages = [{"role": "user", "content": prompt}]
        # One request, sent as it is and with each failure the fake can make of it.
        ask: Any = {"model": "claude-test", "max_tokens": 16, "messages": messages}
        client.messages.create(**ask)
        with client.messages.stream(**ask) as stream:
            assert prompt[:20] in "".join(stream.text_stream)
        with pytest.raises(anthropic.InternalServerError):
            client.messages.create(**ask, extra_headers={"x-fake-scenario": "error_529"})
        with (
            pytest.raises(anthropic.APIError),
            client.messages.stream(
                **ask, extra_headers={"x-fake-scenario": "error_event"}
            ) as stream,
        ):
            stream.until_done()
        with pytest.raises(anthropic.APIConnectionError):
            client.messages.create(**ask, extra_headers={"x-fake-scenario": "reset"})
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(**{**ask, "model": "no-such-route"})
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key=token + "x", max_retries=0).messages.create(
                **ask
            )

        # SIGHUP: log_level is applied, max_clients needs a restart and the log says so.
        config.write_text('log_level = "info"\nmax_clients = 999\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "settings reloaded" not in log_path.read_text():
            assert time.monotonic() < deadline, "no reload"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_gateway(proc)
    text = log_path.read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert entries and all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    assert ANTHROPIC_SECRET not in text
    assert prompt not in text and prompt[:20] not in text
    assert token not in text
    messages_logged = [entry["msg"] for entry in entries]
    assert "reload: log_level changed" in messages_logged
    assert "reload: changed settings need a restart to apply: max_clients" in messages_logged


def test_metrics_count_each_call_from_its_trace(gateway: GatewayProcess, member_token: str) -> None:
    before = scrape(gateway.url)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=member_token, max_retries=0)
    client.messages.create(**MESSAGE_BODY)
    with client.messages.stream(**MESSAGE_BODY) as stream:
        stream.until_done()
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(**MESSAGE_BODY, extra_headers={"x-fake-scenario": "error_529"})
    after = scrape(gateway.url)

    def grew(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew('tvgate_requests_total{route="claude-test",status="200",outcome="ok"}') == 2
    assert (
        grew('tvgate_requests_total{route="claude-test",status="529",outcome="upstream_error"}')
        == 1
    )
    assert (
        grew(
            'tvgate_upstream_errors_total{route="claude-test",outcome="upstream_error",'
            'error_type="overloaded_error"}'
        )
        == 1
    )
    by_route = 'provider="anthropic",route="claude-test"'
    assert grew(f"tvgate_request_duration_seconds_count{{{by_route}}}") == 3
    assert grew(f"tvgate_time_to_first_byte_seconds_count{{{by_route}}}") == 3
    assert grew(f'tvgate_request_duration_seconds_bucket{{{by_route},le="+Inf"}}') == 3
    assert grew(f"tvgate_overhead_seconds_count{{{by_route}}}") == 3

    def tokens_grew(kind: str) -> float:
        # Labelled by org id and tool too, which this test does not pin.
        keys = {k for k in after if k.startswith("tvgate_tokens_total{")}
        keys = {k for k in keys if 'route="claude-test"' in k and f'type="{kind}"' in k}
        return sum(grew(key) for key in keys)

    assert tokens_grew("input") > 0
    assert tokens_grew("output") > 0
    assert after["tvgate_open_streams"] == 0
    assert after["tvgate_requests_in_flight"] == 0
    assert "tvgate_trace_queue_depth" in after
    assert all(
        f'tvgate_traces_dropped_total{{reason="{reason}"}}' in after
        for reason in ("queue_full", "dead_letter", "spool_error", "writer_error")
    )
    assert after["tvgate_traces_written_total"] >= before.get("tvgate_traces_written_total", 0)


def test_a_conversation_is_captured_from_what_each_turn_added(
    gateway: GatewayProcess, member_token: str
) -> None:
    before = scrape(gateway.url)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=member_token, max_retries=0)
    session = {"X-Claude-Code-Session-Id": "conversation-capture"}
    messages: list[MessageParam] = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"turn {turn}: " + "lorem ipsum " * 500})
        client.messages.create(
            model="claude-test", max_tokens=64, messages=messages, extra_headers=session
        )
        messages.append({"role": "assistant", "content": f"answer {turn}"})
    deadline = time.monotonic() + 10
    while True:
        after = scrape(gateway.url)
        written = after["tvgate_traces_written_total"] - before["tvgate_traces_written_total"]
        if written >= 4:
            break
        assert time.monotonic() < deadline, "traces not written"
        time.sleep(0.1)
    stored = after["tvgate_capture_body_bytes_total"] - before["tvgate_capture_body_bytes_total"]
    scanned = (
        after["tvgate_capture_scanned_bytes_total"] - before["tvgate_capture_scanned_bytes_total"]
    )
    # Four bodies of about 6, 12, 18 and 24 KB (61 KB) are stored in full; what is
    # scanned is each turn's new messages (24 KB): the first body whole, then each from
    # the last message it shares with the one before. Whole, it would be all 61 KB.
    assert stored > 55_000
    assert 20_000 < scanned < stored / 2


def test_metrics_text_format() -> None:
    metrics = Metrics(worker=3)
    row = {
        "org_id": 7,
        "provider": "anthropic",
        "tool": "claude-code",
        "response_model": "",
        "upstream_model": "claude-test",
        "route_name": 'we"ird\\route',
        "status_code": 200,
        "outcome": "ok",
        "received_at": 100.0,
        "first_byte_at": 100.2,
        "finished_at": 101.0,
        "overhead_ms": 1.5,
        "input_tokens": 10,
        "output_tokens": 5,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "error_type": "",
    }
    metrics.observe(row)
    metrics.observe({**row, "first_byte_at": None, "finished_at": 100.05})
    text = metrics.render().decode()
    label = 'route="we\\"ird\\\\route"'
    by_route = f'provider="anthropic",{label}'
    assert f'tvgate_requests_total{{{label},status="200",outcome="ok"}} 2' in text
    assert f"tvgate_time_to_first_byte_seconds_count{{{by_route}}} 1" in text
    assert f'tvgate_request_duration_seconds_bucket{{{by_route},le="0.05"}} 1' in text
    assert f'tvgate_request_duration_seconds_bucket{{{by_route},le="1"}} 2' in text
    assert f'tvgate_request_duration_seconds_bucket{{{by_route},le="+Inf"}} 2' in text
    assert f'tvgate_tokens_total{{org_id="7",{label},tool="claude-code",type="output"}} 10' in text
    assert 'tvgate_worker_info{worker="3"' in text
    assert re.search(rf"^tvgate_overhead_seconds_sum{{{re.escape(by_route)}}} 0\.003$", text, re.M)


def test_histogram_bounds_are_inclusive() -> None:
    histogram = Histogram("h", "help", (1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 3.0):
        histogram.observe(value)
    lines = list(histogram.render())
    assert 'h_bucket{le="1"} 2' in lines
    assert 'h_bucket{le="2"} 4' in lines
    assert 'h_bucket{le="+Inf"} 5' in lines
    assert "h_count 5" in lines


def test_healthz_names_the_worker(gateway: GatewayProcess) -> None:
    health = orjson.loads(httpx2.get(gateway.url + "/healthz", timeout=5).content)
    assert health["status"] == "ok" and health["worker"] == 0
    assert health["pid"] == gateway.proc.pid
    ready = httpx2.get(gateway.url + "/readyz", timeout=10).json()
    assert ready["ready"] is True
    assert ready["checks"] == {"database": "ok", "keyring": "ok", "identity": "ok"}


def test_every_answer_has_the_date_of_its_second_and_tornados_server_header(
    gateway: GatewayProcess,
) -> None:
    seen = set()
    for _ in range(3):
        for answer in (
            httpx2.get(gateway.url + "/", timeout=5),
            httpx2.post(gateway.url + "/v1/messages", json=MESSAGE_BODY, timeout=5),  # 401
        ):
            after = time.time()
            date = email.utils.parsedate_to_datetime(answer.headers["date"]).timestamp()
            assert after - 2 <= date <= after
            assert answer.headers["server"].startswith("TornadoServer/")
            seen.add(answer.headers["date"])
        time.sleep(1.05)
    assert len(seen) >= 3  # a new second, a new date


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_port_0_reports_the_port_it_bound_and_every_worker_serves_there(
    tmp_path: Path, fake_provider: FakeProvider, workers: int
) -> None:
    gw = launch(tmp_path, fake_provider, TVGATE_WORKERS=str(workers))
    try:
        assert gw.env["TVGATE_LISTEN"] != "127.0.0.1:0"
        port = int((tmp_path / "tvgate.log.port").read_text())
        assert port != 0 and gw.url == f"http://127.0.0.1:{port}"
        # Each worker logs its line once it listens; the gateway answers /healthz as soon as
        # one of them does, so the others' lines may come a moment later.
        lines = [
            re.compile(rf"tvgate worker {w} \(pid \d+\) listening on http://127\.0\.0\.1:{port}\b")
            for w in range(workers)
        ]
        deadline = time.monotonic() + 60
        while not all(line.search(gw.log_text()) for line in lines):
            assert time.monotonic() < deadline, gw.log_text()
            time.sleep(0.1)
        seen: set[int] = set()
        for _ in range(200):
            # A new connection each time: the kernel spreads connections over the workers.
            seen.add(httpx2.get(gw.url + "/healthz", timeout=5).json()["worker"])
            if len(seen) == workers:
                break
        assert seen == set(range(workers))
        client = anthropic.Anthropic(
            base_url=gw.url, api_key=gw.tokens["dev@acme.test"], max_retries=0
        )
        assert client.messages.create(**MESSAGE_BODY).content
    finally:
        stop_gateway(gw.proc)
