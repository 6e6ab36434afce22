"""Trace capture end to end: what a trace holds, bodies, redaction, reading, export, retention."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
import zstandard

from tests.conftest import ANTHROPIC_SECRET, GatewayProcess
from tvgate import services
from tvgate.keyring import KeyContext
from tvgate.models import Blob, Org, Trace, database
from tvgate.traces.rows import Item
from tvgate.traces.writer import TraceWriter

SECRETS = {
    "anthropic": "sk-ant-api03-" + "A1b2C3d4E5f6" * 6,
    "openai": "sk-proj-" + "Zz9Yy8Xx7Ww6" * 4,
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "github": "ghp_" + "a1B2c3D4e5F6g7H8i9J0" + "k1L2m3N4o5P6q7R8",
    "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq\n-----END RSA PRIVATE KEY-----",
}


def client(gw: GatewayProcess, token: str, session: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.url,
        api_key=token,
        max_retries=0,
        default_headers={"x-tvgate-session": session, **headers},
    )


def api_get(gw: GatewayProcess, token: str, path: str, **params: Any) -> httpx2.Response:
    return httpx2.get(
        gw.url + "/api/v1" + path,
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_a_trace_holds_who_what_how_long_and_what_it_cost(
    gateway: GatewayProcess, member_token: str
) -> None:
    session = uuid.uuid4().hex
    sdk = client(
        gateway,
        member_token,
        session,
        **{"x-tvgate-repo": "acme/api", "x-tracevault-branch": "feature/x"},
    )
    with sdk.messages.stream(
        model="claude-sonnet", max_tokens=64, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        final = stream.get_final_message()
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert (trace.route_name, trace.key_name, trace.provider) == (
        "claude-sonnet",
        "fake-anthropic",
        "anthropic",
    )
    assert trace.requested_model == "claude-sonnet"
    assert trace.upstream_model == trace.response_model == "claude-sonnet-4-5-20250929"
    assert trace.stream and trace.outcome == "ok" and trace.status_code == 200
    assert (trace.repo, trace.branch) == ("acme/api", "feature/x")
    assert trace.tool == "anthropic-sdk" and trace.tool_version
    assert trace.message_id == final.id and trace.upstream_request_id.startswith("req_")
    usage = final.usage
    assert (trace.input_tokens, trace.output_tokens) == (usage.input_tokens, usage.output_tokens)
    assert trace.cache_read_tokens == usage.cache_read_input_tokens
    assert trace.cache_write_tokens == usage.cache_creation_input_tokens
    expected = (
        usage.input_tokens * 3.0
        + usage.output_tokens * 15.0
        + (usage.cache_read_input_tokens or 0) * 0.30
        + (usage.cache_creation_input_tokens or 0) * 3.75
    ) / 1_000_000
    assert trace.cost_usd == pytest.approx(expected)
    assert trace.first_byte_at is not None and trace.finished_at is not None
    assert trace.received_at <= trace.first_byte_at <= trace.finished_at
    assert trace.overhead_ms > 0 and trace.bytes_in > 0 and trace.bytes_out > 0


def test_the_trace_page_shows_the_request_and_the_answer(
    gateway: GatewayProcess, member_token: str
) -> None:
    session = uuid.uuid4().hex
    messages = [
        {"role": "user", "content": "Read the README"},
        {"role": "assistant", "content": [{"type": "text", "text": 'Sure ✓ — "quoted" \\ slash'}]},
        {"role": "user", "content": "Thanks <script>alert(1)</script>"},
    ]
    with client(gateway, member_token, session).messages.stream(
        model="claude-test",
        max_tokens=64,
        system="You are terse.",
        messages=messages,  # type: ignore[arg-type]
        extra_headers={"x-fake-scenario": "tool_use"},
    ) as stream:
        final = stream.get_final_message()
    (trace,) = gateway.wait_traces(1, session_id=session)
    document = api_get(gateway, member_token, f"/traces/{trace.id}").json()
    assert document["request"]["messages"] == messages
    assert document["request"]["system"] == "You are terse."
    assert (
        document["response"]["content"]
        == final.model_dump(mode="json", exclude_none=True)["content"]
    )
    assert document["response"]["usage"]["output_tokens"] == final.usage.output_tokens
    assert document["captured"] is True and document["truncated"] is False


def test_secrets_are_redacted_before_storage(gateway: GatewayProcess, member_token: str) -> None:
    session = uuid.uuid4().hex
    prompt = " and ".join(f"{kind}: {value}" for kind, value in SECRETS.items())
    prompt += f" and the org's own key {ANTHROPIC_SECRET}"
    client(gateway, member_token, session).messages.create(
        model="claude-test", max_tokens=16, messages=[{"role": "user", "content": prompt}]
    )
    (trace,) = gateway.wait_traces(1, session_id=session)
    document = api_get(gateway, member_token, f"/traces/{trace.id}")
    stored = document.text
    for kind, value in {**SECRETS, "org key": ANTHROPIC_SECRET}.items():
        assert value not in stored, kind
        assert value.replace("\n", "\\n") not in stored, kind
    assert "REDACTED" in document.json()["request"]["messages"][0]["content"]
    # The fake echoes the prompt back: the stored answer is redacted too.
    assert ANTHROPIC_SECRET not in orjson.dumps(document.json()["response"]).decode()
    assert ANTHROPIC_SECRET not in gateway.dump_database()


def test_body_capture_can_be_turned_off_per_org(gateway: GatewayProcess) -> None:
    admin = gateway.tokens["admin@acme.test"]
    headers = {"Authorization": f"Bearer {admin}"}
    assert (
        httpx2.patch(
            gateway.url + "/api/v1/policy", json={"capture_bodies": False}, headers=headers
        ).status_code
        == 200
    )
    try:
        time.sleep(0.2)
        session = uuid.uuid4().hex
        client(gateway, admin, session).messages.create(
            model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "private"}]
        )
        (trace,) = gateway.wait_traces(1, session_id=session)
        # The writer rereads org settings every cache TTL (1 s here); a trace right after the
        # switch may still be captured, but metadata and usage are always there.
        assert trace.input_tokens > 0 and trace.outcome == "ok"
        deadline = time.monotonic() + 5
        while True:
            session = uuid.uuid4().hex
            client(gateway, admin, session).messages.create(
                model="claude-test",
                max_tokens=16,
                messages=[{"role": "user", "content": "private"}],
            )
            (trace,) = gateway.wait_traces(1, session_id=session)
            if not trace.request_blob:
                break
            assert time.monotonic() < deadline, "capture was never turned off"
            time.sleep(1)
        document = api_get(gateway, admin, f"/traces/{trace.id}").json()
        assert document["request"] is None and document["usage"]["input_tokens"] > 0
    finally:
        httpx2.patch(gateway.url + "/api/v1/policy", json={"capture_bodies": True}, headers=headers)
        time.sleep(1.5)  # past the writer's 1 s settings cache, so later tests are captured


def test_listing_filters_pages_and_scopes(gateway: GatewayProcess, member_token: str) -> None:
    session = uuid.uuid4().hex
    sdk = client(gateway, member_token, session)
    for n in range(5):
        sdk.messages.create(
            model="claude-test", max_tokens=8, messages=[{"role": "user", "content": f"m{n}"}]
        )
    gateway.wait_traces(5, session_id=session)
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"session": session, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        body = api_get(gateway, member_token, "/traces", **params).json()
        pages.extend(body["traces"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(pages) == 5 and len({t["id"] for t in pages}) == 5
    assert [t["received_at"] for t in pages] == sorted(
        (t["received_at"] for t in pages), reverse=True
    )
    assert {t["user"] for t in pages} == {"dev@acme.test"}
    ordered = api_get(gateway, member_token, f"/sessions/{session}").json()["traces"]
    assert [t["id"] for t in ordered] == [t["id"] for t in reversed(pages)]
    assert api_get(
        gateway, member_token, "/traces", outcome="ok", tool="anthropic-sdk", limit=1
    ).json()["traces"]
    assert api_get(gateway, member_token, "/traces", since="2999-01-01").json()["traces"] == []
    # Another member of the org, and another org, see none of them.
    admin = gateway.tokens["admin@acme.test"]
    assert len(api_get(gateway, admin, "/traces", session=session).json()["traces"]) == 5
    stranger = gateway.tokens["dev@other.test"]
    assert api_get(gateway, stranger, "/traces", session=session).json()["traces"] == []
    assert api_get(gateway, stranger, f"/traces/{pages[0]['id']}").status_code == 404
    assert api_get(gateway, stranger, f"/sessions/{session}").status_code == 404
    assert api_get(gateway, member_token, "/traces", cursor="garbage!").status_code == 400


def test_export_streams_json_lines(gateway: GatewayProcess, member_token: str) -> None:
    session = uuid.uuid4().hex
    started = time.time() - 1
    sdk = client(gateway, member_token, session)
    for _ in range(3):
        sdk.messages.create(
            model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    gateway.wait_traces(3, session_id=session)
    result = gateway.cli("traces", "export", "--org", "acme", "--since", str(started), "--bodies")
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    mine = [line for line in lines if line["session_id"] == session]
    assert len(mine) == 3 and all(line["request"]["messages"] for line in mine)
    assert [line["received_at"] for line in lines] == sorted(line["received_at"] for line in lines)


def test_retention_deletes_old_traces_and_unreferenced_blobs(
    gateway: GatewayProcess, member_token: str
) -> None:
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    client(gateway, member_token, old).messages.create(
        model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "old-" + old}]
    )
    client(gateway, member_token, new).messages.create(
        model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "new-" + new}]
    )
    (old_trace,) = gateway.wait_traces(1, session_id=old)
    (new_trace,) = gateway.wait_traces(1, session_id=new)
    gateway.bind()
    org = Org.get(Org.name == "acme")
    long_ago = time.time() - (org.retention_days + 5) * 86400
    Trace.update(received_at=long_ago).where(Trace.id == old_trace.id).execute()
    unpack = zstandard.ZstdDecompressor().decompress
    unique_blobs = [b.id for b in Blob.select() if ("old-" + old).encode() in unpack(bytes(b.data))]
    assert unique_blobs
    Blob.update(referenced_at=long_ago).where(Blob.id.in_(unique_blobs)).execute()
    database.close()
    purged = gateway.cli("traces", "purge")
    assert purged.returncode == 0 and "acme:" in purged.stdout
    gateway.bind()
    assert Trace.get_or_none(Trace.id == old_trace.id) is None
    assert Blob.select().where(Blob.id.in_(unique_blobs)).count() == 0
    database.close()
    kept = api_get(gateway, member_token, f"/traces/{new_trace.id}").json()
    assert kept["request"]["messages"][0]["content"] == "new-" + new


class _Interval(threading.Event):
    """The writer's stop event, calling ``on_wait`` each time the writer waits on it."""

    def __init__(self, on_wait: Callable[[], None]) -> None:
        super().__init__()
        self.on_wait = on_wait

    def wait(self, timeout: float | None = None) -> bool:
        self.on_wait()
        return super().wait(timeout)


class _NoKeys:
    def at_hand(self, ciphertext: str, context: KeyContext) -> str | None:
        return None


def test_traces_that_come_while_a_batch_is_written_wait_for_the_next_interval(
    db: None, tmp_path: Path
) -> None:
    """Under load the writer writes a batch per interval: a trace that comes while a batch
    is written is not taken at once, alone, but with those of the interval after it (a
    batch pays a transaction, an ack and its org's key check; taken as they came, traces
    cost a writer with a core to spare up to twice the CPU each, bench/README.md)."""
    user = services.add_user("batches@example.test", "batches")
    writer = TraceWriter(
        database.obj,
        _NoKeys(),
        queue_size=100,
        batch_size=50,
        spool_dir=tmp_path / "spool",
        settings_ttl=60.0,
    )
    later: list[str] = []
    batches: list[list[str]] = []

    def submit(trace_id: str) -> None:
        row = {
            "id": trace_id,
            "org_id": user.org_id,
            "user_id": user.id,
            "provider": "anthropic",
            "endpoint": "anthropic.messages",
            "upstream_model": "claude-test",
            "response_model": "claude-test",
            # Every trace has it: the writer's watermark reads each queued trace's end.
            "received_at": time.time(),
            **dict.fromkeys(
                ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"), 1
            ),
        }
        writer.submit(row, None, len(batches) + len(later) + 1)

    def come_in_the_interval() -> None:
        while later:
            submit(later.pop(0))

    store = writer.batches.store

    def recording(batch: list[Item]) -> None:
        batches.append([item.row["id"] for item in batch])
        if len(batches) == 1:
            submit("while-written")
            later.extend(["after-0", "after-1"])
        store(batch)

    writer.batches.store = recording  # type: ignore[method-assign]
    writer._stopping = _Interval(come_in_the_interval)
    writer.start()
    submit("first")
    deadline = time.monotonic() + 30
    while sum(map(len, batches)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.stop()
    assert batches == [["first"], ["while-written", "after-0", "after-1"]]
    assert writer.stats.written == 4 and writer.stats.dropped == 0
