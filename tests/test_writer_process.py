"""The trace writer as a process of its own (issue 25), from outside.

Each test runs a real ``tvgate serve`` (one worker: the serving process is the one the
test starts, its writer process a child of it) over a private PostgreSQL or OpenBao:

- the writer process is killed with SIGKILL under load while the database is away:
  readiness and the metrics say so, a new one is started, and every call answered has
  exactly one trace once the database is back (the spooled ones replayed);
- the writer (serving process and writer process) is killed while it adopts the spools
  of workers that do not run: the next start loses none of their traces;
- Vault is frozen (SIGSTOP) before any key is in the gateway's cache: every call is
  traced, the bodies are held, then stored, redacted, once the keys can be read.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from pathlib import Path

import orjson

from tests.conftest import (
    GatewayFactory,
    GatewayProcess,
    VaultEnv,
    launch_gateway,
    scrape,
    seed,
    seeded_gateway,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tests.pg_private import PrivatePostgres
from tests.test_reliability_vault import (
    VAULT_TIMEOUT,
    bodiless,
    dropped,
    files_under,
    frozen_vault,  # noqa: F401 - a fixture
    org_secret,
    secrets_accepted,  # noqa: F401 - a fixture
    stored_blobs,
)
from tests.test_reliability_vault import ask as vault_ask
from tests.test_reliability_writer2 import (
    Load,
    ask,
    ready,
    traces_of,
)
from tests.test_vault_gateway import add_key_and_route, get, wait_for
from tvgate.traces.child import _read_exactly


def writer_process(gw: GatewayProcess) -> int:
    """The pid of the serving process's trace writer process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == gw.proc.pid and b"tvgate.traces.child" in argv:
            return int(entry.name)
    raise AssertionError("the gateway has no trace writer process")


def test_a_killed_writer_process_is_reported_restarted_and_loses_no_trace(
    private_pg: PrivatePostgres,
    fake_provider: FakeProvider,
    tmp_path: Path,
) -> None:
    gw = seeded_gateway(private_pg.url, tmp_path, fake_provider, TVGATE_TRACE_BATCH_SIZE="5")
    session = uuid.uuid4().hex
    load = Load(gw, session)
    try:
        assert load.call() == 200
        first = writer_process(gw)
        # The database goes away: what the writer process took goes to its spool.
        private_pg.stop()
        load.start()
        wait_for(lambda: ready(gw)[1]["trace_writer"]["spool"] > 10, "traces spooled", 120)
        os.kill(first, signal.SIGKILL)
        # Until a new writer process reports, the gateway is not ready, and says why.
        status, state = ready(gw)
        while state["trace_writer"]["running"]:
            status, state = ready(gw)
        assert status == 503 and state["ready"] is False
        wait_for(lambda: ready(gw)[1]["trace_writer"]["running"], "a new writer process")
        assert writer_process(gw) != first
        samples = scrape(gw.url)
        assert samples["tvgate_trace_writer_restarts_total"] >= 1
        assert samples["tvgate_trace_writer_up"] == 1
        mark = load.answered
        wait_for(lambda: load.answered > mark + 20, "calls after the restart", 120)
        private_pg.start()
        load.finish()
        # Every call answered has one trace, no more: the spool replayed, the traces the
        # killed process had not acknowledged sent again, none twice.
        wait_for(
            lambda: len(traces_of(private_pg.url, session)) >= load.answered,
            "a trace for every call",
            120,
        )
        wait_for(lambda: ready(gw)[1]["trace_writer"]["spool"] == 0, "the spool replayed")
        ids = traces_of(private_pg.url, session)
        assert len(ids) == len(set(ids)) == load.answered
        assert set(dropped(gw).values()) == {0.0}, dropped(gw)
        assert "the trace writer process died" in gw.log_text()
    finally:
        load.stop()
        stop_gateway(gw.proc)


def test_a_writer_killed_while_adopting_spools_loses_none_of_their_traces(
    private_pg: PrivatePostgres,
    fake_provider: FakeProvider,
    tmp_path: Path,
) -> None:
    tokens = seed(private_pg.url, tmp_path, fake_provider)
    # Traces spooled in an outage, then the gateway stopped: its spool stays on disk.
    gw = launch_gateway(private_pg.url, tmp_path, tokens)
    session = uuid.uuid4().hex
    try:
        assert ask(gw, session) == 200
        wait_for(lambda: len(traces_of(private_pg.url, session)) == 1, "the first trace")
        private_pg.stop()
        for _ in range(120):
            assert ask(gw, session) == 200
    finally:
        stop_gateway(gw.proc)
    lines = [
        line
        for path in sorted(tmp_path.glob("traces.spool*"))
        for line in path.read_bytes().splitlines()
        if line.strip()
    ]
    for path in tmp_path.glob("traces.spool*"):
        path.unlink()
    spooled = {orjson.loads(line)["row"]["id"] for line in lines}
    assert len(spooled) == 120
    # As left by workers 3..102 of a bigger gateway, each with files renamed for replay
    # (20 each, every trace in many of them: replay is idempotent by id): the next start
    # adopts them one by one, under each one's lock, for long enough to be killed in it.
    for n in range(2000):
        slot, replay = 3 + n % 100, 1_000_000 + n
        path = tmp_path / f"traces.spool.{slot}.replay-{replay}"
        path.write_bytes(lines[n % len(lines)] + b"\n")
    private_pg.start()
    gw = launch_gateway(private_pg.url, tmp_path, tokens)
    try:
        while "adopted 1 spooled traces" not in gw.log_text():
            assert gw.proc.poll() is None
        writer = writer_process(gw)
        os.kill(writer, signal.SIGKILL)
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
    finally:
        stop_gateway(gw.proc)
    again = launch_gateway(private_pg.url, tmp_path, tokens)
    try:
        wait_for(lambda: len(traces_of(private_pg.url, session)) >= 121, "every trace replayed", 60)
        wait_for(lambda: not list(tmp_path.glob("traces.spool*")), "every spool replayed")
        ids = traces_of(private_pg.url, session)
        assert len(ids) == len(set(ids)) == 121
        assert spooled <= set(ids)
    finally:
        stop_gateway(again.proc)


def test_vault_frozen_before_any_key_is_cached_still_records_every_trace(
    vault_gateways: GatewayFactory,
    frozen_vault: VaultEnv,  # noqa: F811 - the fixture imported above
    fake_provider: FakeProvider,
    secrets_accepted: set[str],  # noqa: F811 - the fixture imported above
) -> None:
    gateway = vault_gateways(
        "frozen-start", vault_env=frozen_vault, TVGATE_VAULT_TIMEOUT=VAULT_TIMEOUT
    )
    secret = org_secret(fake_provider, secrets_accepted)
    add_key_and_route(gateway, fake_provider, "cold", "route-cold", secret)
    calls = 12
    frozen_vault.server.pause()
    try:
        prompt = f"my key is {secret}, please keep it safe"
        # No call has decrypted the key: each fails (the first after the timeout, the
        # others at once), and each is traced, its body held: the key is not known.
        statuses = [vault_ask(gateway, "route-cold", prompt).status_code for _ in range(calls)]
        assert statuses == [503] * calls
        gateway.wait_traces(calls, timeout=30, route_name="route-cold")
        assert set(dropped(gateway).values()) == {0.0}, dropped(gateway)
        wait_for(
            lambda: scrape(gateway.url)["tvgate_trace_bodies_held"] == calls, "the bodies held"
        )
        assert secret.encode() not in stored_blobs(gateway) + files_under(gateway.data_dir)
        assert get(gateway, "/readyz").status == 503
    finally:
        frozen_vault.server.resume()
    # Vault answers again: the gateway decrypts the key the held bodies wait for, and
    # they are stored, redacted, onto their traces.
    wait_for(lambda: not bodiless(gateway, "route-cold"), "the held bodies stored", 60)
    assert scrape(gateway.url)["tvgate_trace_bodies_held"] == 0
    blobs = stored_blobs(gateway)
    assert secret.encode() not in blobs + files_under(gateway.data_dir)
    assert blobs.count(b"my key is [REDACTED:provider-key], please keep it safe") >= 1
    assert len(gateway.traces(route_name="route-cold")) == calls
    assert set(dropped(gateway).values()) == {0.0}
    assert secret not in gateway.log_text()


def test_a_serving_process_gone_with_acknowledgements_unread_ends_the_frames() -> None:
    """A worker that exits (or dies) with the writer's acknowledgements unread in its
    buffer resets the socket: what it sent before is read, then the frames end, as at an
    end of the socket, rather than the writer process dying with a traceback in the log
    (seen in the deploy test's JSON log)."""
    serving, writer = socket.socketpair()
    with serving, writer:
        writer.sendall(b"ack")  # never read by the serving process
        serving.sendall(b"frame")
        serving.close()
        assert _read_exactly(writer, 5) == b"frame"
        assert _read_exactly(writer, 5) is None
