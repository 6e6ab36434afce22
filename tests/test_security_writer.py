"""Hostile values cannot stop or bend trace recording (review issues 16.1, 16.8, 16.12, 17.1).

Every attack goes through a real ``tvgate serve``: a client sends a ``model`` with
control characters; a member's own provider (the fake one, told by
``x-fake-override`` what to answer) reports absurd or negative usage, a 300-character
model, a long request id, a NUL in its message id; the database is locked while
bodies carrying a provider key pass; a spool left by an outage holds rows that cannot
be written. Trace recording must go on for every org, budgets must not move the
wrong way, and the spool and the dead-letter file must hold only what the database
would.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    launch_gateway,
    scrape,
    seed,
    seeded_gateway,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.models import Trace

SECRET_TEXT = f"my key is {ANTHROPIC_SECRET} keep it safe"


def ask(
    gateway: GatewayProcess,
    session: str,
    *,
    user: str = "dev@acme.test",
    model: str = "claude-test",
    override: dict[str, Any] | None = None,
    text: str = "hello",
    stream: bool = False,
) -> httpx2.Response:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        body["stream"] = True
    headers = {"x-api-key": gateway.tokens[user], "x-tvgate-session": session}
    if override is not None:
        # json, not orjson: the override may hold integers past 64 bits.
        headers["x-fake-override"] = json.dumps(override)
    return httpx2.post(gateway.url + "/v1/messages", json=body, headers=headers, timeout=60)


def anomalies(trace: Trace) -> list[str]:
    return orjson.loads(trace.anomalies) if trace.anomalies else []


def dropped(gateway: GatewayProcess, reason: str) -> float:
    return scrape(gateway.url).get(f'tvgate_traces_dropped_total{{reason="{reason}"}}', -1.0)


# --- 16.1: control characters in `model` ---


@pytest.mark.parametrize("model", ["claude\u0000", "claude-test\n", "claude\x1b[31m"])
def test_control_characters_in_model_are_refused_and_recording_goes_on(
    own_gateway: GatewayProcess, model: str
) -> None:
    session = uuid.uuid4().hex
    hostile = ask(own_gateway, session, model=model)
    # Another org's call after it must still be recorded.
    assert ask(own_gateway, session, user="dev@other.test", model="other-claude").status_code == 200
    (recorded,) = own_gateway.wait_traces(1, session_id=session, route_name="other-claude")
    assert recorded.status_code == 200
    assert hostile.status_code == 400, hostile.text
    error = hostile.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "control characters" in error["error"]["message"]


# --- 16.1 / 17.1: hostile values from a member's own provider ---


HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"usage": {"input_tokens": 10**30}}, "usage.input_tokens out of range"),
    ({"usage": {"output_tokens": -(10**30)}}, "usage.output_tokens out of range"),
    ({"model": "models/" + "m" * 300}, "truncated: response_model"),
    ({"request_id": "req_" + "r" * 300}, "truncated: upstream_request_id"),
    ({"id": "msg_\u0000nul"}, "control characters removed: message_id"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_hostile_provider_values_are_recorded_with_anomalies_and_stop_nothing(
    own_gateway: GatewayProcess, stream: bool
) -> None:
    session = uuid.uuid4().hex
    for override, _ in HOSTILE:
        response = ask(own_gateway, session, override=override, text=str(override), stream=stream)
        assert response.status_code == 200, response.text
    assert ask(own_gateway, session, user="dev@other.test", model="other-claude").status_code == 200
    traces = own_gateway.wait_traces(len(HOSTILE) + 1, session_id=session)
    for trace, (_, anomaly) in zip(traces, HOSTILE, strict=False):
        assert anomaly in anomalies(trace), (anomaly, trace.anomalies)
    huge, negative, long_model, long_request_id, nul_id = traces[: len(HOSTILE)]
    assert huge.input_tokens == 0 and huge.output_tokens > 0
    assert negative.output_tokens == 0 and negative.input_tokens > 0
    assert long_model.response_model == ("models/" + "m" * 300)[:200]
    assert len(long_request_id.upstream_request_id) == 200
    assert nul_id.message_id == "msg_nul"
    assert traces[-1].anomalies == "" and traces[-1].route_name == "other-claude"
    # The trace API shows them.
    shown = httpx2.get(
        f"{own_gateway.url}/api/v1/traces/{huge.id}",
        headers={"authorization": f"Bearer {own_gateway.tokens['admin@acme.test']}"},
        timeout=10,
    ).json()
    assert "usage.input_tokens out of range" in shown["anomalies"]
    assert dropped(own_gateway, "queue_full") == 0 and dropped(own_gateway, "dead_letter") == 0


# --- 16.8: negative usage must not lift a budget ---


def _used(org: str) -> float:
    (budget,) = services.list_budgets(org)
    return budget.used


def test_negative_usage_does_not_lift_a_budget(own_gateway: GatewayProcess) -> None:
    own_gateway.bind()
    services.set_budget("acme", scope="org", metric="tokens", period="day", amount=1e12)
    session = uuid.uuid4().hex
    time.sleep(1.5)  # the gateway's caches (1 s) see the budget

    def settled_use(expected_traces: int) -> float:
        own_gateway.wait_traces(expected_traces, timeout=30, session_id=session)
        # Usage is flushed about every second; wait until it stops moving.
        last, deadline = -1.0, time.monotonic() + 30
        while time.monotonic() < deadline:
            used = _used("acme")
            if used == last:
                return used
            last = used
            time.sleep(1.5)
        return last

    assert ask(own_gateway, session).status_code == 200
    one_call = settled_use(1)
    assert one_call > 0
    hostile = ask(own_gateway, session, override={"usage": {"input_tokens": -1_000_000_000}})
    assert hostile.status_code == 200
    assert ask(own_gateway, session).status_code == 200
    after = settled_use(3)
    assert after >= 2 * one_call, f"the budget's use went from {one_call} to {after}"
    first, lowered, last = own_gateway.traces(session_id=session)
    assert lowered.input_tokens == 0
    assert "usage.input_tokens out of range" in anomalies(lowered)
    # The hostile call counts for its valid figures only, as its trace says.
    counted = sum(
        t.input_tokens + t.output_tokens + t.cache_read_tokens + t.cache_write_tokens
        for t in (first, lowered, last)
    )
    assert after == counted


# --- 16.12: the spool holds what the database would, nothing more ---


class SqliteLock:
    """Holds the SQLite database's write lock: the writer's inserts fail ("database is
    locked") after its busy timeout, as in an outage, while readers go on (WAL)."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def __enter__(self) -> SqliteLock:
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def _spool_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def _decoded_strings(entry: dict[str, Any]) -> bytes:
    """Every string of a spool entry, and every base64 one decoded."""
    out: list[bytes] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            out.append(value.encode())
            with contextlib.suppress(ValueError):
                out.append(base64.b64decode(value, validate=True))

    walk(entry)
    return b"\n".join(out)


def test_the_spool_holds_redacted_bodies_and_none_for_capture_off(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'tvgate.db'}"
    tokens = seed(url, tmp_path, fake_provider)
    services.set_policy("other", capture_bodies=False)
    gateway = launch_gateway(url, tmp_path, tokens)
    try:
        direct_session, spooled_session = uuid.uuid4().hex, uuid.uuid4().hex
        assert ask(gateway, direct_session, text=SECRET_TEXT).status_code == 200
        assert (
            ask(gateway, direct_session, user="dev@other.test", model="other-claude").status_code
            == 200
        )
        direct, _ = gateway.wait_traces(2, session_id=direct_session)
        with SqliteLock(str(tmp_path / "tvgate.db")):
            calls = [
                threading.Thread(target=ask, args=(gateway, spooled_session), kwargs=kwargs)
                for kwargs in (
                    {"text": SECRET_TEXT},
                    {"user": "dev@other.test", "model": "other-claude", "text": SECRET_TEXT},
                )
            ]
            for call in calls:
                call.start()
            for call in calls:
                call.join(60)
            deadline = time.monotonic() + 60
            # The file appended to and the one renamed for replay (tvgate.traces.writer).
            spools = list(tmp_path.glob("traces.spool*"))
            while sum(len(_spool_lines(path)) for path in spools) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
                spools = list(tmp_path.glob("traces.spool*"))
            lines = [line for path in spools for line in _spool_lines(path)]
            assert len(lines) == 2, "the writer did not spool while the database was locked"
            assert all(stat.S_IMODE(os.stat(path).st_mode) == 0o600 for path in spools)
            entries = [orjson.loads(line) for line in lines]
            for entry in entries:
                assert ANTHROPIC_SECRET.encode() not in _decoded_strings(entry), entry
            (other,) = [e for e in entries if e["row"]["route_name"] == "other-claude"]
            assert set(other) == {"row"}, f"a capture-off org's body was spooled: {set(other)}"
        spooled = gateway.wait_traces(2, timeout=60, session_id=spooled_session)
        assert not list(tmp_path.glob("traces.spool*"))
        (acme,) = [t for t in spooled if t.route_name == "claude-test"]
        (capture_off,) = [t for t in spooled if t.route_name == "other-claude"]
        # The same blobs as the direct path stored: content-addressed, so the same digests.
        assert (acme.request_blob, acme.response_blob) == (
            direct.request_blob,
            direct.response_blob,
        )
        assert acme.request_blob and capture_off.request_blob == ""
    finally:
        stop_gateway(gateway.proc)


# --- 17.1: a spool that cannot be written row for row ---


def _row(org_id: int, session: str, **values: Any) -> dict[str, Any]:
    """A trace row as the proxy queues it."""
    now = time.time()
    return {
        "id": uuid.uuid4().hex,
        "org_id": org_id,
        "user_id": None,
        "route_name": "claude-test",
        "key_name": "fake-anthropic",
        "provider": "anthropic",
        "endpoint": "anthropic.messages",
        "requested_model": "claude-test",
        "upstream_model": "claude-upstream-1",
        "response_model": "claude-upstream-1",
        "stream": False,
        "status_code": 200,
        "outcome": "ok",
        "error_type": "",
        "error_message": "",
        "received_at": now,
        "first_byte_at": now,
        "finished_at": now,
        "overhead_ms": 1.0,
        "input_tokens": 3,
        "output_tokens": 4,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "bytes_in": 10,
        "bytes_out": 20,
        "tool": "",
        "tool_version": "",
        "session_id": session,
        "upstream_request_id": "req_1",
        "message_id": "msg_1",
        "repo": "",
        "branch": "",
        "truncated": False,
        "attempts": "",
        "request_blob": "",
        "response_blob": "",
        "cost_usd": 0.0,
        **values,
    }


def _old_entry(row: dict[str, Any], request: bytes | None = None) -> bytes:
    """A spool line as the gateway wrote them before bodies were redacted first."""
    entry: dict[str, Any] = {"row": row}
    if request is not None:
        entry["request"] = base64.b64encode(request).decode()
        entry["response"] = {"type": "message", "content": [{"type": "text", "text": "ok"}]}
    return orjson.dumps(entry) + b"\n"


def test_a_poisoned_spool_is_replayed_row_by_row_and_dead_lettered(
    fresh_database_url: str, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    tokens = seed(fresh_database_url, tmp_path, fake_provider)
    acme = services.get_org("acme").id
    session = uuid.uuid4().hex
    body = orjson.dumps({"model": "claude-test", "messages": [{"content": SECRET_TEXT}]})
    good = _row(acme, session)
    hostile = _row(
        acme,
        session,
        requested_model="claude\u0000",
        input_tokens=2**40,
        response_model="r" * 300,
        error_type="e" * 150,
    )
    of_a_deleted_org = _row(987654, session)
    (tmp_path / "traces.spool.0").write_bytes(
        _old_entry(good, body)
        + _old_entry(hostile)
        + _old_entry(of_a_deleted_org, body)
        + b'{"row": {"id": "torn'
    )
    gateway = launch_gateway(fresh_database_url, tmp_path, tokens)
    try:
        assert ask(gateway, session, user="dev@other.test", model="other-claude").status_code == 200
        traces = gateway.wait_traces(3, timeout=30, session_id=session)
        by_id = {t.id: t for t in traces}
        assert {good["id"], hostile["id"]} <= set(by_id)
        stored = by_id[hostile["id"]]
        assert stored.requested_model == "claude" and stored.input_tokens == 0
        assert len(stored.response_model) == 200 and len(stored.error_type) == 100
        assert {
            "control characters removed: requested_model",
            "input_tokens out of range",
            "truncated: response_model",
            "truncated: error_type",
        } <= set(anomalies(stored))
        # A spool line of today's format (unredacted) still replays, redacted on the way.
        assert by_id[good["id"]].request_blob
        assert ANTHROPIC_SECRET not in gateway.dump_database()
        dead_letter = tmp_path / "traces.deadletter.0"
        lines = _spool_lines(dead_letter)
        assert len(lines) == 2
        assert stat.S_IMODE(os.stat(dead_letter).st_mode) == 0o600
        assert ANTHROPIC_SECRET.encode() not in dead_letter.read_bytes()
        assert not list(tmp_path.glob("traces.spool*"))
        assert dropped(gateway, "dead_letter") == 2
        assert scrape(gateway.url)["tvgate_trace_dead_letter_size"] == 2
        ready = httpx2.get(gateway.url + "/readyz", timeout=10).json()
        assert ready["ready"] is True
        assert ready["trace_writer"]["running"] is True
        assert ready["trace_writer"]["dead_letter"] == 2
    finally:
        stop_gateway(gateway.proc)
    # After a restart the dead letters are still reported; nothing is replayed twice.
    again = launch_gateway(fresh_database_url, tmp_path, tokens)
    try:
        ready = httpx2.get(again.url + "/readyz", timeout=10).json()
        assert ready["trace_writer"]["dead_letter"] == 2
        assert len(again.traces(session_id=session)) == 3
    finally:
        stop_gateway(again.proc)


def test_a_spool_that_cannot_be_written_holds_the_trace_and_the_writer_goes_on(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    session = uuid.uuid4().hex
    with seeded_gateway(f"sqlite:///{tmp_path / 'tvgate.db'}", tmp_path, fake_provider) as gateway:
        # Where the spool goes, something that is not a file (a full or broken disk).
        (tmp_path / "traces.spool.0").mkdir()
        with SqliteLock(str(tmp_path / "tvgate.db")):
            assert ask(gateway, session, text="held").status_code == 200
            deadline = time.monotonic() + 60
            while True:
                response = httpx2.get(gateway.url + "/readyz", timeout=30)
                if response.json()["trace_writer"]["held"] == 1:
                    break
                assert time.monotonic() < deadline, "the trace was not held"
                time.sleep(0.2)
            assert response.status_code == 503
            assert response.json()["trace_writer"]["spool_error"].startswith("IsADirectoryError")
        assert ask(gateway, session, text="kept").status_code == 200
        traces = gateway.wait_traces(2, timeout=30, session_id=session)
        assert all(trace.bytes_in > 0 for trace in traces)
        assert dropped(gateway, "spool_error") == 0
        ready = httpx2.get(gateway.url + "/readyz", timeout=10).json()
        assert ready["ready"] is True and ready["trace_writer"]["held"] == 0
        assert "the spool could not be written" in gateway.log_text()


def test_the_writer_is_restarted_after_a_failure_and_readiness_says_so(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    aside, loop = tmp_path / "spool.aside", tmp_path / "loop"
    session = uuid.uuid4().hex
    with seeded_gateway(f"sqlite:///{tmp_path / 'tvgate.db'}", tmp_path, fake_provider) as gateway:
        with SqliteLock(str(tmp_path / "tvgate.db")):
            assert ask(gateway, session).status_code == 200
            # The writer renames its spool for the first replay, which fails (locked); the
            # renamed file is not touched again until a replay succeeds.
            deadline = time.monotonic() + 60
            while not (frozen := list(tmp_path.glob("traces.spool.0.replay-*"))):
                assert time.monotonic() < deadline, "the spool was not renamed for replay"
                time.sleep(0.2)
            (spool,) = frozen
            # It turns into something that cannot be read (a link to a link to itself):
            # every replay fails with an error that is not the database's.
            spool.rename(aside)
            spool.symlink_to(loop.name)
            loop.symlink_to(loop.name)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if scrape(gateway.url).get("tvgate_trace_writer_restarts_total", 0) >= 1:
                    break
                time.sleep(0.2)
        ready = httpx2.get(gateway.url + "/readyz", timeout=10).json()
        assert ready["trace_writer"]["restarts"] >= 1
        assert ready["trace_writer"]["running"] is True and ready["ready"] is True
        assert scrape(gateway.url)["tvgate_trace_writer_up"] == 1
        assert "trace writer failed; starting it again" in gateway.log_text()
        aside.replace(loop)  # in one rename: the writer never finds the spool missing
        assert ask(gateway, session).status_code == 200
        gateway.wait_traces(2, timeout=30, session_id=session)
        assert not list(tmp_path.glob("traces.spool*"))
