"""Test fixtures: a real tvgate process on a free port, over SQLite and over PostgreSQL.

The gateway runs as ``tvgate serve`` in a subprocess, exactly as deployed; the
fake provider (outside systems only) runs in a thread of the test process. Each
PostgreSQL run creates its own database and drops it at the end. PostgreSQL
is required: a missing server fails the suite rather than skipping a tier.
So is OpenBao (``bao``, tests/openbao.py): one dev server per session, set up
with tvgate's own ``vault setup``, for the vault keyring and its gateways.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import psycopg2
import pytest

from tests.fake_provider import FakeProvider
from tests.openbao import OpenBao
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.keyring import vault_admin
from tvgate.keyring.local import LocalKeyring
from tvgate.keyring.vault import VaultKeyring
from tvgate.models import Trace

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("TVGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ANTHROPIC_SECRET = "sk-ant-api03-test-" + secrets.token_hex(16)
OPENAI_SECRET = "sk-proj-test-" + secrets.token_hex(16)
MAX_BODY_BYTES = 2 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def fake_provider() -> Iterator[FakeProvider]:
    fake = FakeProvider(accepted_keys={ANTHROPIC_SECRET, OPENAI_SECRET}).start()
    yield fake
    fake.stop()


def _pg_execute(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tvgate.db'}"
        return
    name = "tvgate_test_" + secrets.token_hex(6)
    try:
        _pg_execute(f"CREATE DATABASE {name}")
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for the test suite ({PG_ADMIN_DSN}): {exc}")
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    # The name is ours (hex), not input: formatting it in is safe.
    _pg_execute(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"  # noqa: S608
    )
    _pg_execute(f"DROP DATABASE IF EXISTS {name}")


@dataclass
class GatewayProcess:
    """A running ``tvgate serve`` and what the tests set up in its database."""

    url: str
    database_url: str
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def bind(self) -> None:
        """Point this test process's models at the gateway's database."""
        open_database(self.database_url)

    def traces(self, **where: Any) -> list[Trace]:
        self.bind()
        query = Trace.select().order_by(Trace.received_at)
        for name, value in where.items():
            query = query.where(getattr(Trace, name) == value)
        return list(query)

    def dump_database(self) -> str:
        """Every row of every table, as text: what a stolen database dump would show."""
        self.bind()
        from tvgate.models import database

        rows = []
        for table in database.get_tables():
            # Table names come from the database itself, not from input.
            rows.extend(database.execute_sql(f"SELECT * FROM {table}").fetchall())  # noqa: S608
        return "\n".join(map(str, rows))

    def wait_traces(self, count: int, timeout: float = 10.0, **where: Any) -> list[Trace]:
        """The traces matching ``where`` once there are ``count`` of them (or fail)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.traces(**where)
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) == count, f"expected {count} traces for {where}, got {len(found)}"
                return found
            time.sleep(0.05)

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tvgate.cli", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {"name{labels}": value}."""
    response = httpx2.get(url + "/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def gateway_env(database_url: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVGATE_")}
    env.update(
        {
            "TVGATE_LISTEN": f"127.0.0.1:{port}",
            "TVGATE_DATA_DIR": str(data_dir),
            "TVGATE_DATABASE_URL": database_url,
            "TVGATE_MASTER_KEY": base64.b64encode(b"k" * 32).decode(),
            "TVGATE_ALLOW_PRIVATE_UPSTREAMS": "true",
            "TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS": "true",
            "TVGATE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "TVGATE_CACHE_TTL": "1",
            "TVGATE_LOG_LEVEL": "info",
            # One process, so that a test sees one cache and one set of metrics.
            "TVGATE_WORKERS": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    # A setting given as "" is left at its default (a test of what a deployment runs).
    return {k: v for k, v in env.items() if k not in extra or v}


def start_gateway(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tvgate.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = "http://" + env["TVGATE_LISTEN"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tvgate exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"tvgate did not come up:\n{log_path.read_text()}")


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def seed(database_url: str, data_dir: Path, fake: FakeProvider) -> dict[str, str]:
    """Orgs, users, keys and routes the proxy tests use; returns tokens by user."""
    open_database(database_url)
    from tvgate.models import database

    migrate(database.obj)
    keyring = LocalKeyring(b"k" * 32)
    tokens: dict[str, str] = {}
    services.add_user("admin@acme.test", "acme", admin=True)
    services.add_user("dev@acme.test", "acme")
    services.add_user("dev@other.test", "other")
    for email, org in (
        ("admin@acme.test", "acme"),
        ("dev@acme.test", "acme"),
        ("dev@other.test", "other"),
    ):
        tokens[email], _ = services.issue_token(email, org, name="tests")
    services.add_key(
        "fake-anthropic",
        "anthropic",
        ANTHROPIC_SECRET,
        keyring,
        org_name="acme",
        base_url=fake.url,
        allow_private=True,
    )
    services.add_key(
        "fake-openai",
        "openai",
        OPENAI_SECRET,
        keyring,
        org_name="acme",
        base_url=fake.openai_url,
        allow_private=True,
    )
    services.add_key(
        "other-anthropic",
        "anthropic",
        ANTHROPIC_SECRET,
        keyring,
        org_name="other",
        base_url=fake.url,
        allow_private=True,
    )
    services.add_route("claude-test", "fake-anthropic", model="claude-upstream-1", org_name="acme")
    services.add_route("claude-pass", "fake-anthropic", org_name="acme")
    services.add_route("gpt-test", "fake-openai", model="gpt-upstream-1", org_name="acme")
    services.add_route("embed-test", "fake-openai", model="text-embedding-3-small", org_name="acme")
    services.add_route("other-claude", "other-anthropic", model="claude-other", org_name="other")
    # A route to a model the price table knows, for cost tests.
    services.add_route(
        "claude-sonnet", "fake-anthropic", model="claude-sonnet-4-5-20250929", org_name="acme"
    )
    database.close()
    return tokens


def add_fake_key(
    fake: FakeProvider, org: str, name: str, base_url: str, provider: str = "anthropic"
) -> str:
    """A key of ``org`` on the fake provider with a secret of its own (so its calls can be
    told apart there), which the fake provider accepts; returns the secret."""
    prefix = "sk-ant-api03-" if provider == "anthropic" else "sk-proj-"
    secret = prefix + secrets.token_hex(16)
    if fake.accepted_keys is not None:
        fake.accepted_keys.add(secret)
    services.add_key(
        name,
        provider,
        secret,
        LocalKeyring(b"k" * 32),
        org_name=org,
        base_url=base_url,
        allow_private=True,
    )
    return secret


def launch_gateway(
    database_url: str, data_dir: Path, tokens: dict[str, str], **extra_env: str
) -> GatewayProcess:
    """Start ``tvgate serve`` on a free port over an already seeded database."""
    env = gateway_env(database_url, data_dir, free_port(), **extra_env)
    log_path = data_dir / f"tvgate-{env['TVGATE_LISTEN'].rsplit(':', 1)[1]}.log"
    proc = start_gateway(env, log_path)
    return GatewayProcess(
        url="http://" + env["TVGATE_LISTEN"],
        database_url=database_url,
        data_dir=data_dir,
        env=env,
        proc=proc,
        log_path=log_path,
        tokens=tokens,
    )


@pytest.fixture(scope="session")
def gateway(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("gateway")
    tokens = seed(database_url, data_dir, fake_provider)
    gw = launch_gateway(database_url, data_dir, tokens)
    yield gw
    stop_gateway(gw.proc)


@pytest.fixture
def member_token(gateway: GatewayProcess) -> str:
    return gateway.tokens["dev@acme.test"]


# --- Vault: a real OpenBao per session, set up by tvgate's own `vault setup` ---


@dataclass(frozen=True)
class VaultEnv:
    """The session's OpenBao, after ``vault_admin.setup``: the gateway's AppRole login."""

    server: OpenBao
    role_id: str
    secret_id: str

    @property
    def addr(self) -> str:
        return self.server.addr

    @property
    def root_token(self) -> str:
        return self.server.root_token

    def keyring(self, **kwargs: Any) -> VaultKeyring:
        """A vault keyring logged in the way a gateway is (AppRole, policy tvgate only)."""
        kwargs.setdefault("role_id", self.role_id)
        kwargs.setdefault("secret_id", self.secret_id)
        return VaultKeyring(self.addr, **kwargs)

    def env(self) -> dict[str, str]:
        return {
            "TVGATE_KEYRING": "vault",
            "TVGATE_VAULT_ADDR": self.addr,
            "TVGATE_VAULT_ROLE_ID": self.role_id,
            "TVGATE_VAULT_SECRET_ID": self.secret_id,
        }


def setup_vault(server: OpenBao) -> VaultEnv:
    result = vault_admin.setup(server.client())
    return VaultEnv(server=server, role_id=result.role_id, secret_id=result.secret_id)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    server = OpenBao(tmp_path_factory.mktemp("openbao"), dev=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vault(openbao: OpenBao) -> VaultEnv:
    return setup_vault(openbao)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own for one test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'own.db'}"
        return
    name = "tvgate_test_" + secrets.token_hex(6)
    try:
        _pg_execute(f"CREATE DATABASE {name}")
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for the test suite ({PG_ADMIN_DSN}): {exc}")
    yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    open_database(f"sqlite:///{tmp_path / 'unbind.db'}")  # let go of the dropped database
    _pg_execute(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"  # noqa: S608
    )
    _pg_execute(f"DROP DATABASE IF EXISTS {name}")


def seed_users(database_url: str) -> dict[str, str]:
    """Org acme (an admin and a member) and org other (a member); tokens by email."""
    open_database(database_url)
    from tvgate.models import database

    migrate(database.obj)
    tokens: dict[str, str] = {}
    for email, org, admin in (
        ("admin@acme.test", "acme", True),
        ("dev@acme.test", "acme", False),
        ("dev@other.test", "other", False),
    ):
        services.add_user(email, org, admin=admin)
        tokens[email], _ = services.issue_token(email, org, name="tests")
    database.close()
    return tokens


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def vault_gateways(vault: VaultEnv, tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways with TVGATE_KEYRING=vault (AppRole login): ``start(name, database_url=…,
    **env)``; each is stopped at the end of the test. Extra env overrides the defaults."""
    started: list[GatewayProcess] = []

    def start(
        name: str = "gateway",
        *,
        database_url: str = "",
        vault_env: VaultEnv | None = None,
        **env: str,
    ) -> GatewayProcess:
        data_dir = tmp_path / name
        data_dir.mkdir(parents=True, exist_ok=True)
        url = database_url or f"sqlite:///{data_dir / 'tvgate.db'}"
        tokens = seed_users(url)
        gw_env = gateway_env(url, data_dir, free_port(), **(vault_env or vault).env())
        del gw_env["TVGATE_MASTER_KEY"]
        gw_env.update(env)
        log_path = data_dir / "tvgate.log"
        proc = start_gateway(gw_env, log_path)
        gateway = GatewayProcess(
            url="http://" + gw_env["TVGATE_LISTEN"],
            database_url=url,
            data_dir=data_dir,
            env=gw_env,
            proc=proc,
            log_path=log_path,
            tokens=tokens,
        )
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        stop_gateway(gateway.proc)
