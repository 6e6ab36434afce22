"""Faults: the upstream refuses, hangs, redirects or talks garbage; a client reads slowly;
the gateway is killed. Each time the gateway keeps serving, the client gets a clear answer
in its API's format, and every request leaves exactly one trace."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import orjson
import pytest

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    add_test_key,
    free_port,
    launch_gateway,
    post_message,
    seed,
    stop_gateway,
)
from tests.fake_provider import MALFORMED_BYTES, FakeProvider
from tests.outages import outage, whole_seconds
from tests.pg_private import PrivatePostgres
from tvgate import services
from tvgate.db import open_database
from tvgate.keyring import KeyContext
from tvgate.keyring.local import LocalKeyring
from tvgate.models import Org, ProviderKey, Route, Trace, database

KEYRING = LocalKeyring(b"k" * 32)
#: The fault gateways' TVGATE_IDLE_TIMEOUT and TVGATE_CONNECT_TIMEOUT.
SHORT_TIMEOUT = whole_seconds(2)
MESSAGE = {
    "model": "claude-test",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture(scope="module")
def fault_token(gateway: GatewayProcess, fake_provider: FakeProvider) -> str:
    """An org of its own (its odd routes must not show up in other tests' route lists):
    a route to the fake provider, a route to a port where nothing listens, and routes an
    attacker with database access pointed at private places."""
    gateway.bind()
    org_name = "faults-" + uuid.uuid4().hex[:6]
    services.add_user(f"dev@{org_name}.test", org_name)
    token, _ = services.issue_token(f"dev@{org_name}.test", org_name)
    for name, url in (("fake", fake_provider.url), ("dead", f"http://127.0.0.1:{free_port()}")):
        add_test_key(name, org_name, url)
    services.add_route("claude-test", "fake", model="claude-upstream-1", org_name=org_name)
    services.add_route("claude-pass", "fake", org_name=org_name)
    services.add_route("dead-upstream", "dead", org_name=org_name)
    org = Org.get(Org.name == org_name)
    port = fake_provider.url.rsplit(":", 1)[1]
    for name, url in (
        ("ssrf-http", fake_provider.url),
        ("ssrf-loopback", f"https://127.0.0.1:{port}"),
        ("ssrf-localhost", f"https://localhost:{port}"),
        ("ssrf-metadata", "https://169.254.169.254"),
        ("ssrf-private", "https://10.255.255.1"),
    ):
        # Written straight into the database: the services would refuse these URLs.
        key = ProviderKey.create(
            org=org, name=name, provider="anthropic", base_url=url, ciphertext="", fingerprint="…"
        )
        key.ciphertext = KEYRING.encrypt(ANTHROPIC_SECRET, KeyContext(org.id, key.id, None))
        key.save()
        Route.create(org=org, name=name, key=key, scope="org")
    database.close()
    return token


def fault_gateway(gateway: GatewayProcess, fault_token: str, **env: str) -> GatewayProcess:
    """Another gateway over the suite's database, with ``env``: its dev@acme.test is the
    faults org's member (``with`` stops it)."""
    tokens = {**gateway.tokens, "dev@acme.test": fault_token}
    return launch_gateway(gateway.database_url, gateway.data_dir, tokens, **env)


@pytest.fixture(scope="module")
def faulty(gateway: GatewayProcess, fault_token: str) -> Iterator[GatewayProcess]:
    """A gateway with short timeouts."""
    with fault_gateway(
        gateway,
        fault_token,
        TVGATE_IDLE_TIMEOUT=str(SHORT_TIMEOUT),
        TVGATE_CONNECT_TIMEOUT=str(SHORT_TIMEOUT),
    ) as gw:
        yield gw


def test_upstream_refusing_connections(faulty: GatewayProcess) -> None:
    session = uuid.uuid4().hex
    response = post_message(faulty, {**MESSAGE, "model": "dead-upstream"}, session)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert message.startswith("could not connect to the provider at 127.0.0.1:")
    assert message.endswith(": connection refused (nothing listens on that port)")
    (trace,) = faulty.wait_traces(1, session_id=session)
    assert trace.outcome == "upstream_error" and trace.status_code == 502
    assert post_message(faulty, MESSAGE, uuid.uuid4().hex).status_code == 200  # still serving


@pytest.mark.slow
def test_upstream_silent_before_the_first_byte_times_out(
    faulty: GatewayProcess, fake_provider: FakeProvider
) -> None:
    session, test_id = uuid.uuid4().hex, uuid.uuid4().hex
    response = post_message(
        faulty,
        MESSAGE,
        session,
        **{"x-fake-scenario": "hang", "x-fake-hang": str(outage(20)), "x-test-id": test_id},
    )
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "api_error"
    (trace,) = faulty.wait_traces(1, session_id=session)
    assert trace.outcome == "timeout"
    upstream = next(r for r in fake_provider.requests if r.headers.get("x-test-id") == test_id)
    assert fake_provider.wait_closed(upstream.id, timeout=5) is not None


@pytest.mark.slow
def test_upstream_silent_between_events_ends_the_stream_in_band(
    faulty: GatewayProcess, fake_provider: FakeProvider
) -> None:
    session = uuid.uuid4().hex
    host = fake_provider.url.removeprefix("http://")
    response = post_message(
        faulty,
        {**MESSAGE, "stream": True},
        session,
        **{"x-fake-scenario": "drip", "x-fake-interval": str(outage(5)), "x-fake-events": "3"},
    )
    assert response.status_code == 200
    assert response.text.rstrip().endswith(
        'data: {"type":"error","error":{"type":"api_error","message":"timed out waiting for the '
        f'provider at {host}: nothing received for {SHORT_TIMEOUT} s (TVGATE_IDLE_TIMEOUT)"}}}}'
    )
    assert "message_start" in response.text
    (trace,) = faulty.wait_traces(1, session_id=session)
    assert trace.outcome == "timeout" and trace.truncated


def test_malformed_sse_passes_through_and_is_traced(
    faulty: GatewayProcess, fake_provider: FakeProvider
) -> None:
    session = uuid.uuid4().hex
    body = {**MESSAGE, "model": "claude-pass", "stream": True}
    through = post_message(faulty, body, session, **{"x-fake-scenario": "malformed"})
    direct = httpx2.post(
        fake_provider.url + "/v1/messages",
        content=orjson.dumps(body),
        headers={"x-api-key": ANTHROPIC_SECRET, "x-fake-scenario": "malformed"},
    )
    assert through.status_code == direct.status_code == 200
    assert MALFORMED_BYTES in through.content
    assert through.content == direct.content  # unchanged, garbage and all
    (trace,) = faulty.wait_traces(1, session_id=session)
    assert trace.outcome == "ok" and trace.output_tokens > 0


def test_redirects_are_never_followed(faulty: GatewayProcess, fake_provider: FakeProvider) -> None:
    test_id = uuid.uuid4().hex
    response = post_message(
        faulty, MESSAGE, uuid.uuid4().hex, **{"x-fake-scenario": "redirect", "x-test-id": test_id}
    )
    # Nor relayed: the client gets a 502 in its API's envelope, without the Location.
    assert response.status_code == 502 and "location" not in response.headers
    assert response.json()["error"]["type"] == "api_error"
    assert not any(r.path == "/v1/redirected" for r in fake_provider.requests)
    assert len([r for r in fake_provider.requests if r.headers.get("x-test-id") == test_id]) == 1


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_reader_does_not_make_the_gateway_buffer_the_stream(faulty: GatewayProcess) -> None:
    """The provider pushes 96 MiB as fast as it can; the client reads 4 MiB: tvgate pauses
    the provider instead of holding the rest in memory."""
    import socket

    before = _rss_kib(faulty.proc.pid)
    host, port = faulty.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    body = orjson.dumps({**MESSAGE, "stream": True})
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: "
        + faulty.tokens["dev@acme.test"].encode()
        + b"\r\nx-fake-scenario: bulk\r\nx-fake-mb: 96\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = 0
    peak = before
    while received < 4 * 1024 * 1024:
        chunk = sock.recv(16 * 1024)
        assert chunk
        received += len(chunk)
        time.sleep(0.001)
        if received % (256 * 1024) < 16 * 1024:
            peak = max(peak, _rss_kib(faulty.proc.pid))
    time.sleep(outage(1.0))  # let the provider push all it can
    peak = max(peak, _rss_kib(faulty.proc.pid))
    sock.close()
    assert (peak - before) < 48 * 1024, f"gateway grew {(peak - before) // 1024} MiB"
    assert post_message(faulty, MESSAGE, uuid.uuid4().hex).status_code == 200


def test_logs_never_carry_secrets(faulty: GatewayProcess) -> None:
    text = faulty.log_text()
    for secret in (ANTHROPIC_SECRET, *faulty.tokens.values()):
        assert secret not in text
    for line in text.splitlines():
        if line.startswith("{"):
            orjson.loads(line)


# --- SSRF: upstreams on private addresses, with allow_private_upstreams off ---


@pytest.fixture(scope="module")
def strict(gateway: GatewayProcess, fault_token: str) -> Iterator[GatewayProcess]:
    """A gateway that allows only public https upstreams."""
    with fault_gateway(
        gateway,
        fault_token,
        TVGATE_ALLOW_PRIVATE_UPSTREAMS="false",
        TVGATE_CONNECT_TIMEOUT=str(SHORT_TIMEOUT),
    ) as gw:
        yield gw


@pytest.mark.parametrize(
    ("route", "words"),
    [
        ("ssrf-http", "non-https upstream"),
        ("ssrf-loopback", "not a public address"),
        ("ssrf-localhost", "not a public address"),
        ("ssrf-metadata", "not a public address"),
        ("ssrf-private", "not a public address"),
    ],
)
def test_private_upstreams_are_refused_on_every_connection(
    strict: GatewayProcess, fake_provider: FakeProvider, route: str, words: str
) -> None:
    before = len(fake_provider.requests)
    session = uuid.uuid4().hex
    response = post_message(strict, {**MESSAGE, "model": route}, session)
    assert response.status_code == 502, response.text
    assert words in response.json()["error"]["message"]
    assert len(fake_provider.requests) == before
    (trace,) = strict.wait_traces(1, session_id=session)
    assert trace.outcome in ("rejected", "upstream_error")


# --- the gateway itself: SIGKILL under load, then restart ---


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_trace(fake_provider: FakeProvider, tmp_path: Path) -> None:
    """With the database away, traces go to the spool; after SIGKILL and a restart, every
    trace the spool held is written."""
    pg = PrivatePostgres(free_port())
    try:
        pg.start()
        pg.create_database()
        tokens = seed(pg.url, tmp_path, fake_provider)
        gw = launch_gateway(pg.url, tmp_path, tokens, TVGATE_TRACE_BATCH_SIZE="5")
        session = uuid.uuid4().hex
        post_message(gw, MESSAGE, session)  # warm the caches while the database is up
        pg.stop()
        stop = threading.Event()

        def load() -> None:
            # The gateway is killed under this load: a refused or cut connection is the
            # expected end of a call, not an error of the thread.
            while not stop.is_set():
                try:
                    post_message(gw, MESSAGE, session)
                except httpx2.TransportError:
                    time.sleep(0.05)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        # The spool: the file appended to and the one renamed for replay (tvgate.traces.writer).
        deadline = time.monotonic() + outage(120)
        while len(_spooled_ids(tmp_path)) <= 10:
            assert time.monotonic() < deadline, "fewer than 11 traces spooled in the outage"
            time.sleep(0.1)
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
        stop.set()
        for worker in workers:
            worker.join(30)
        acknowledged = _spooled_ids(tmp_path)
        assert len(acknowledged) > 10
        pg.start()
        restarted = launch_gateway(pg.url, tmp_path, tokens)
        try:
            open_database(pg.url)
            deadline = time.monotonic() + 30
            while list(tmp_path.glob("traces.spool*")) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not list(tmp_path.glob("traces.spool*")), "the spool was not replayed"
            written = {t.id for t in Trace.select(Trace.id).where(Trace.session_id == session)}
            assert acknowledged <= written
        finally:
            stop_gateway(restarted.proc)
    finally:
        pg.destroy()


def _spooled_ids(data_dir: Path) -> set[str]:
    return {
        orjson.loads(line)["row"]["id"]
        for path in data_dir.glob("traces.spool*")
        for line in path.read_bytes().splitlines()
        if line.strip()
    }
