"""The gateway with its keys in Vault, from outside: outage and recovery, rotation and
migration while it serves, and the canary that must never be seen again.

Each test starts real ``tvgate serve`` processes (``vault_gateways`` in conftest)
against a real OpenBao, with the fake provider behind them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import psycopg2
import pytest

from tests.conftest import GatewayFactory, GatewayProcess, VaultEnv, setup_vault
from tests.fake_provider import FakeProvider
from tests.openbao import OpenBao
from tests.shapes import messages_request
from tvgate.models import Org, ProviderKey, Route, database

KEY_STORE_DOWN = "the key store is unavailable; try again shortly"


# --- helpers ---


@dataclass
class Exchange:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def raw(self) -> bytes:
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"HTTP {self.status}\n{head}\n\n".encode() + self.body


@dataclass
class Recorder:
    """Every response a test received, headers and body, for the canary search."""

    exchanges: list[Exchange] = field(default_factory=list)
    cli_output: list[str] = field(default_factory=list)

    def text(self) -> bytes:
        return b"\n".join(e.raw() for e in self.exchanges) + "\n".join(self.cli_output).encode()


def call(
    gateway: GatewayProcess,
    route: str,
    *,
    token: str | None = None,
    stream: bool = False,
    scenario: str = "normal",
    recorder: Recorder | None = None,
    path: str = "/v1/messages",
    headers: dict[str, str] | None = None,
    on_first_chunk: Callable[[], None] | None = None,
) -> Exchange:
    """One Anthropic call through the gateway, read to the end (or to a broken connection)."""
    body = messages_request(route, 32, "hello from the vault tests", stream=stream)
    sent = {
        "x-api-key": token or gateway.tokens["dev@acme.test"],
        "anthropic-version": "2023-06-01",
        "x-fake-scenario": scenario,
        **(headers or {}),
    }
    chunks: list[bytes] = []
    with (
        httpx2.Client(timeout=60) as client,
        client.stream("POST", gateway.url + path, json=body, headers=sent) as response,
    ):
        try:
            for chunk in response.iter_raw():
                if not chunks and on_first_chunk is not None:
                    on_first_chunk()
                chunks.append(chunk)
        except httpx2.TransportError:
            chunks.append(b"<connection broken>")
        exchange = Exchange(
            response.status_code, list(response.headers.multi_items()), b"".join(chunks)
        )
    if recorder is not None:
        recorder.exchanges.append(exchange)
    return exchange


def get(
    gateway: GatewayProcess, path: str, recorder: Recorder | None = None, **headers: str
) -> Exchange:
    response = httpx2.get(gateway.url + path, headers=headers, timeout=30)
    exchange = Exchange(
        response.status_code, list(response.headers.multi_items()), response.content
    )
    if recorder is not None:
        recorder.exchanges.append(exchange)
    return exchange


def cli(
    gateway: GatewayProcess,
    *args: str,
    stdin: str = "",
    recorder: Recorder | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``tvgate`` against the gateway's settings; fail with its output if it fails."""
    saved = gateway.env
    if env:
        gateway.env = {**saved, **env}
    try:
        result = gateway.cli(*args, stdin=stdin)
    finally:
        gateway.env = saved
    output = result.stdout + result.stderr
    if recorder is not None:
        recorder.cli_output.append(output)
    assert result.returncode == 0, f"tvgate {' '.join(args)} failed:\n{output}"
    return output


def add_key_and_route(
    gateway: GatewayProcess, fake: FakeProvider, key: str, route: str, secret: str, **kw: Any
) -> None:
    recorder = kw.get("recorder")
    cli(
        gateway,
        "keys",
        "add",
        key,
        "--provider",
        "anthropic",
        "--base-url",
        fake.url,
        "--org",
        "acme",
        stdin=secret + "\n",
        recorder=recorder,
    )
    cli(gateway, "routes", "add", route, "--key", key, "--org", "acme", recorder=recorder)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def decrypt_lines(gateway: GatewayProcess, backend: str) -> int:
    """How many times the gateway has decrypted a key with ``backend`` (its debug log)."""
    return gateway.log_text().count(f"decrypted by the {backend} keyring")


def key_rows(gateway: GatewayProcess) -> dict[str, str]:
    gateway.bind()
    try:
        return {k.name: k.ciphertext for k in ProviderKey.select()}
    finally:
        database.close()


class Traffic(threading.Thread):
    """Calls a route over and over (streamed and not) until stopped; keeps every failure."""

    def __init__(self, gateway: GatewayProcess, route: str) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.route = route
        self.ok = 0
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        stream = False
        while not self._stop_event.is_set():
            try:
                exchange = call(self.gateway, self.route, stream=stream)
                if exchange.status == 200 and (not stream or b"message_stop" in exchange.body):
                    self.ok += 1
                else:
                    self.failures.append(f"{exchange.status} {exchange.body[:300]!r}")
            except Exception as exc:  # noqa: BLE001 - a failure to report, not to raise here
                self.failures.append(repr(exc))
            stream = not stream

    def wait_more(self, count: int = 5) -> None:
        target = self.ok + count
        wait_for(lambda: self.ok >= target or bool(self.failures), f"{count} more calls")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(60)


@pytest.fixture
def accept(fake_provider: FakeProvider) -> Iterator[Callable[..., None]]:
    """Let the fake provider accept more keys for this test; restored afterwards."""
    saved = set(fake_provider.accepted_keys or ())

    def add(*keys: str) -> None:
        assert fake_provider.accepted_keys is not None
        fake_provider.accepted_keys |= set(keys)

    yield add
    fake_provider.accepted_keys = saved


def unique_secret(tag: str) -> str:
    return f"sk-ant-api03-{tag}-{secrets.token_hex(20)}"


# --- a copied ciphertext ---


def test_a_ciphertext_copied_onto_another_key_is_refused(
    vault_gateways: GatewayFactory, fake_provider: FakeProvider, accept: Callable[..., None]
) -> None:
    gateway = vault_gateways("copy")
    first, second = unique_secret("first"), unique_secret("second")
    accept(first, second)
    add_key_and_route(gateway, fake_provider, "first", "route-first", first)
    add_key_and_route(gateway, fake_provider, "second", "route-second", second)
    assert call(gateway, "route-second").status == 200
    # Someone with database access points the second key at the first key's ciphertext.
    rows = key_rows(gateway)
    gateway.bind()
    ProviderKey.update(ciphertext=rows["first"]).where(ProviderKey.name == "second").execute()
    database.close()

    def refused() -> bool:
        return call(gateway, "route-second").status == 502

    wait_for(refused, "the copied ciphertext is refused")
    answer = call(gateway, "route-second").json()
    assert (
        answer["error"]["message"] == "the key of route 'route-second' cannot be used; ask an admin"
    )
    assert call(gateway, "route-first").status == 200

    # A route row in another org pointing at this org's key, written straight into the
    # database, does not lend the key out: the route does not exist for that org.
    gateway.bind()
    first_key = ProviderKey.get(ProviderKey.name == "first")
    other_org = Org.get(Org.name == "other")
    Route.create(org=other_org, name="borrowed", key=first_key, scope="org")
    database.close()
    outsider = gateway.tokens["dev@other.test"]
    borrowed = call(gateway, "borrowed", token=outsider)  # first call of org other: fresh load
    assert borrowed.status == 404
    assert borrowed.json()["error"]["message"].endswith("routes you may use: none")
    assert first not in gateway.log_text()


# --- Vault goes away, and comes back ---


@pytest.fixture
def disk_openbao(tmp_path: Path) -> Iterator[OpenBao]:
    """An OpenBao on disk (raft): it can be stopped, restarted (sealed) and unsealed."""
    workdir = tmp_path / "disk-openbao"
    workdir.mkdir()
    server = OpenBao(workdir, dev=False).start()
    yield server
    server.stop()


def test_vault_outage_cached_keys_then_503_then_recovery(
    vault_gateways: GatewayFactory,
    fake_provider: FakeProvider,
    accept: Callable[..., None],
    disk_openbao: OpenBao,
) -> None:
    env = setup_vault(disk_openbao)
    gateway = vault_gateways(
        "outage", vault_env=env, TVGATE_KEY_CACHE_TTL="4", TVGATE_VAULT_TIMEOUT="1"
    )
    used, unused = unique_secret("used"), unique_secret("unused")
    accept(used, unused)
    add_key_and_route(gateway, fake_provider, "used", "route-used", used)
    add_key_and_route(gateway, fake_provider, "unused", "route-unused", unused)
    assert get(gateway, "/readyz").status == 200
    assert call(gateway, "route-used").status == 200  # decrypted now, cached for 4 s

    # 1. Vault stops (connections refused).
    disk_openbao.stop()
    assert call(gateway, "route-used", stream=True).status == 200  # from the cache
    down = call(gateway, "route-unused")  # never decrypted: needs Vault
    assert down.status == 503
    assert down.json() == {
        "type": "error",
        "error": {"type": "api_error", "message": KEY_STORE_DOWN},
    }
    ready = get(gateway, "/readyz")
    assert ready.status == 503 and ready.json()["checks"]["keyring"].startswith("unavailable")
    assert ready.json()["checks"]["database"] == "ok"
    # Past the TTL the cached key is gone too: no stale plaintext, a clear 503 instead.
    wait_for(lambda: call(gateway, "route-used").status == 503, "the cached key expires")
    streamed = call(gateway, "route-used", stream=True)
    assert streamed.status == 503 and streamed.json()["error"]["message"] == KEY_STORE_DOWN

    # 2. Vault restarts sealed: still unavailable.
    disk_openbao.start(unseal=False)
    assert disk_openbao.health() == 503
    assert call(gateway, "route-used").status == 503
    assert get(gateway, "/readyz").status == 503

    # 3. Unsealed: the gateway recovers by itself, with the same token and key.
    disk_openbao.unseal()
    wait_for(lambda: call(gateway, "route-used").status == 200, "recovery after unseal")
    assert call(gateway, "route-unused", stream=True).status == 200
    assert get(gateway, "/readyz").status == 200

    # 4. Vault hangs (SIGSTOP): requests wait at most vault_timeout, then 503; then recovery.
    disk_openbao.pause()
    try:
        wait_for(lambda: call(gateway, "route-used").status == 503, "a 503 while Vault hangs")
        assert get(gateway, "/readyz").status == 503
    finally:
        disk_openbao.resume()
    wait_for(lambda: call(gateway, "route-used").status == 200, "recovery after SIGCONT")

    failed = [t for t in gateway.traces() if t.status_code == 503]
    assert failed and all(t.error_message == KEY_STORE_DOWN for t in failed)
    assert all(t.outcome == "upstream_error" and t.route_name for t in failed)
    log = gateway.log_text()
    assert "vault is unreachable" in log and "vault is sealed" in log
    assert "did not answer within 1 s" in log and "vault is available again" in log
    for secret in (used, unused, env.secret_id):
        assert secret not in log


# --- rotation and migration while serving ---


def test_transit_rotation_and_rewrap_while_serving(
    vault_gateways: GatewayFactory,
    fake_provider: FakeProvider,
    accept: Callable[..., None],
    tmp_path: Path,
) -> None:
    server = OpenBao(tmp_path / "rotation-openbao", dev=True)
    server.workdir.mkdir()
    server.start()
    try:
        env = setup_vault(server)
        gateway = vault_gateways("rotation", vault_env=env, TVGATE_LOG_LEVEL="debug")
        secret = unique_secret("rotation")
        accept(secret)
        add_key_and_route(gateway, fake_provider, "rot", "route-rot", secret)
        operator = {"VAULT_TOKEN": server.root_token}
        traffic = Traffic(gateway, "route-rot")
        traffic.start()
        try:
            traffic.wait_more()
            rotated = cli(gateway, "vault", "rotate", env=operator)
            assert "latest version 2" in rotated
            decrypted = decrypt_lines(gateway, "vault")
            rewrapped = cli(gateway, "keys", "rewrap", "--batch-size", "1")
            assert "updated 1" in rewrapped and "tvgate vault retire 2" in rewrapped
            assert key_rows(gateway)["rot"].startswith("vault:v2:")
            # The gateway picks up the new ciphertext and decrypts it (v2) while serving.
            wait_for(lambda: decrypt_lines(gateway, "vault") > decrypted, "a decrypt of v2")
            retired = cli(gateway, "vault", "retire", "2", env=operator)
            assert "min decryption version 2" in retired
            traffic.wait_more()
        finally:
            traffic.stop()
        assert traffic.failures == []
        status = cli(gateway, "vault", "status", env=operator)
        assert "latest version 2, min decryption version 2" in status
    finally:
        server.stop()


def test_migrate_local_to_vault_to_local_while_serving(
    vault_gateways: GatewayFactory,
    fake_provider: FakeProvider,
    accept: Callable[..., None],
    vault: VaultEnv,
    fresh_database_url: str,
) -> None:
    master = base64.b64encode(os.urandom(32)).decode()
    # A local gateway that also has the vault settings: it reads both forms.
    gateway = vault_gateways(
        "migrate",
        database_url=fresh_database_url,
        TVGATE_KEYRING="local",
        TVGATE_MASTER_KEY=master,
        TVGATE_LOG_LEVEL="debug",
    )
    secrets_ = {f"mig-{i}": unique_secret(f"mig{i}") for i in range(3)}
    accept(*secrets_.values())
    for i, (name, secret) in enumerate(secrets_.items()):
        add_key_and_route(gateway, fake_provider, name, f"route-mig-{i}", secret)
    assert all(ct.startswith("local:v1:") for ct in key_rows(gateway).values())
    traffic = [Traffic(gateway, f"route-mig-{i}") for i in range(3)]
    for t in traffic:
        t.start()
    try:
        for t in traffic:
            t.wait_more()
        out = cli(gateway, "keys", "migrate", "--to", "vault", "--batch-size", "2")
        assert "updated 3" in out and "TVGATE_KEYRING=vault" in out
        assert all(ct.startswith("vault:v") for ct in key_rows(gateway).values())
        wait_for(lambda: decrypt_lines(gateway, "vault") >= 3, "the gateway decrypts with vault")
        for t in traffic:
            t.wait_more()
        local_before = decrypt_lines(gateway, "local")
        out = cli(gateway, "keys", "migrate", "--to", "local")
        assert "updated 3" in out
        assert all(ct.startswith("local:v1:") for ct in key_rows(gateway).values())
        wait_for(
            lambda: decrypt_lines(gateway, "local") >= local_before + 3,
            "the gateway decrypts with local again",
        )
        for t in traffic:
            t.wait_more()
        again = cli(gateway, "keys", "migrate", "--to", "local")
        assert "updated 0, unchanged 3" in again
    finally:
        for t in traffic:
            t.stop()
    assert [f for t in traffic for f in t.failures] == []
    assert sum(t.ok for t in traffic) >= 45
    gateway.bind()
    try:
        traces = gateway.traces()
        assert traces and all(t.outcome == "ok" for t in traces)
    finally:
        database.close()


# --- the canary: a provider key nobody may ever see again ---


def dump_database(url: str) -> bytes:
    """Every row of every table, as text."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            return "\n".join(conn.iterdump()).encode()
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            tables = [row[0] for row in cur.fetchall()]
            out = []
            for table in tables:
                cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from the catalog
                out.append(f"-- {table}\n" + "\n".join(repr(row) for row in cur.fetchall()))
        return "\n".join(out).encode()
    finally:
        conn.close()


def files_under(directory: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def forms_of(secret: str) -> list[bytes]:
    """The secret as it could leak: plain, in base64 (what Vault is sent), its unique tail."""
    raw = secret.encode()
    return [
        raw,
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw),
        raw.split(b"-")[-1],  # the random part alone
        json.dumps(secret).encode(),
    ]


def test_canary_key_is_never_seen_again(
    vault_gateways: GatewayFactory,
    fake_provider: FakeProvider,
    accept: Callable[..., None],
    fresh_database_url: str,
) -> None:
    canary, replacement = unique_secret("CANARY"), unique_secret("CANARY2")
    recorder = Recorder()
    gateway = vault_gateways("canary", database_url=fresh_database_url, TVGATE_LOG_LEVEL="debug")
    accept(canary)
    add_key_and_route(gateway, fake_provider, "canary", "canary-route", canary, recorder=recorder)
    assert key_rows(gateway)["canary"].startswith("vault:v")

    # Calls that work, stream, and fail in every way the fake provider knows.
    for stream in (False, True):
        for scenario in (
            "normal",
            "tool_use",
            "thinking",
            "error_event",
            "error_529",
            "error_429",
            "error_500",
            "reset",
        ):
            call(gateway, "canary-route", stream=stream, scenario=scenario, recorder=recorder)
    call(gateway, "canary-route", path="/v1/messages/count_tokens", recorder=recorder)
    call(gateway, "no-such-route", recorder=recorder)
    get(
        gateway,
        "/v1/models",
        recorder,
        **{"x-api-key": gateway.tokens["dev@acme.test"], "anthropic-version": "2023-06-01"},
    )
    get(gateway, "/readyz", recorder)
    used = [r for r in fake_provider.requests if r.headers.get("x-api-key") == canary]
    assert len(used) >= 16

    # Rotation while a stream is in flight: that stream finishes with the old key.
    accept(replacement)
    test_id = uuid.uuid4().hex
    rotated = threading.Event()

    def rotate() -> None:
        cli(
            gateway,
            "keys",
            "rotate",
            "canary",
            "--org",
            "acme",
            stdin=replacement + "\n",
            recorder=recorder,
        )
        rotated.set()

    in_flight = call(
        gateway,
        "canary-route",
        stream=True,
        scenario="drip",
        recorder=recorder,
        headers={"x-fake-events": "10", "x-fake-interval": "0.3", "x-test-id": test_id},
        on_first_chunk=rotate,
    )
    assert rotated.is_set() and in_flight.status == 200 and b"message_stop" in in_flight.body
    flight = [r for r in fake_provider.requests if r.headers.get("x-test-id") == test_id]
    assert flight[0].headers["x-api-key"] == canary

    def replacement_used() -> bool:
        call(gateway, "canary-route", recorder=recorder)
        return fake_provider.requests[-1].headers.get("x-api-key") == replacement

    wait_for(replacement_used, "the rotated key is used")
    fake_provider.accepted_keys.discard(canary)  # type: ignore[union-attr]
    for scenario in ("normal", "error_event"):
        call(gateway, "canary-route", stream=True, scenario=scenario, recorder=recorder)
    # The provider refuses the key: its 401 passes through, and still shows no key.
    fake_provider.accepted_keys.discard(replacement)  # type: ignore[union-attr]
    refused = call(gateway, "canary-route", recorder=recorder)
    assert refused.status == 401
    accept(replacement)

    cli(gateway, "keys", "disable", "canary", "--org", "acme", recorder=recorder)
    wait_for(lambda: call(gateway, "canary-route", recorder=recorder).status == 404, "disabled")
    cli(gateway, "keys", "enable", "canary", "--org", "acme", recorder=recorder)
    wait_for(lambda: call(gateway, "canary-route", recorder=recorder).status == 200, "enabled")
    listed = cli(gateway, "keys", "list", "--org", "acme", recorder=recorder)
    assert "canary" in listed and "…" + replacement[-4:] in listed
    cli(gateway, "keys", "list", "--org", "acme", "--json", recorder=recorder)
    dump_with_key = dump_database(gateway.database_url)
    assert b"vault:v" in dump_with_key

    cli(gateway, "keys", "delete", "canary", "--org", "acme", "--force", recorder=recorder)
    wait_for(lambda: call(gateway, "canary-route", recorder=recorder).status == 404, "deleted")
    gateway.proc.terminate()
    gateway.proc.wait(30)

    traces = gateway.traces(route_name="canary-route")
    assert len(traces) >= 20 and {t.outcome for t in traces} >= {"ok", "upstream_error"}
    log = gateway.log_text()
    assert "decrypted by the vault keyring" in log  # the log did run at debug level
    searched = {
        "database with the key": dump_with_key,
        "database at the end": dump_database(gateway.database_url),
        "data directory": files_under(gateway.data_dir),
        "gateway log": log.encode(),
        "HTTP responses and CLI output": recorder.text(),
    }
    for where, content in searched.items():
        assert content, where
        for secret in (canary, replacement):
            for form in forms_of(secret):
                assert form not in content, f"the canary ({form[:12]!r}…) is in the {where}"
    assert re.search(rb"canary-route", searched["database at the end"])
