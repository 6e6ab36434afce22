"""Test fixtures: a real tvgate process, over SQLite and over PostgreSQL.

The gateway runs as ``tvgate serve`` in a subprocess, exactly as deployed; the
fake provider (outside systems only) runs in a thread of the test process. Each
PostgreSQL run creates its own database and drops it at the end. PostgreSQL
is required: a missing server fails the suite rather than skipping a tier.
So is OpenBao (``bao``, tests/openbao.py): one dev server per session, set up
with tvgate's own ``vault setup``, for the vault keyring and its gateways.
The processes and databases themselves are started by tests/harness.py, whose
names are importable from here too (``__all__``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import orjson
import psycopg2
import pytest

from tests.fake_provider import FakeProvider
from tests.fake_visdom import FakeVisdom
from tests.harness import (
    MASTER_KEY,
    MAX_BODY_BYTES,
    PG_ADMIN_DSN,
    ROOT,
    GatewayProcess,
    RunningGateway,
    beside,
    free_port,
    gateway_env,
    gateway_process,
    launch_gateway,
    pg_execute,
    postgres_database,
    start_gateway,
    stop_gateway,
    visdom_env,
)
from tests.openbao import OpenBao

# The hooks that group the tests for pytest-xdist's workers (``make test``'s ``-n``).
from tests.parallel import pytest_collection_finish, pytest_collection_modifyitems
from tests.pg_private import PrivatePostgres
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.keyring import KeyContext, Keyring, vault_admin
from tvgate.keyring.local import LocalKeyring
from tvgate.keyring.vault import VaultKeyring
from tvgate.models import ProviderKey, User, database

__all__ = [
    "MAX_BODY_BYTES",
    "PG_ADMIN_DSN",
    "ROOT",
    "GatewayProcess",
    "RunningGateway",
    "beside",
    "free_port",
    "gateway_env",
    "gateway_process",
    "launch_gateway",
    "pg_execute",
    "pytest_collection_finish",
    "pytest_collection_modifyitems",
    "start_gateway",
    "stop_gateway",
    "visdom_env",
]

ANTHROPIC_SECRET = "sk-ant-api03-test-" + secrets.token_hex(16)
OPENAI_SECRET = "sk-proj-test-" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def fake_provider() -> Iterator[FakeProvider]:
    fake = FakeProvider(accepted_keys={ANTHROPIC_SECRET, OPENAI_SECRET}).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tvgate.db'}"
        return
    with own_postgres(tmp_path_factory.mktemp("unbind")) as url:
        yield url


@contextmanager
def own_postgres(tmp: Path) -> Iterator[str]:
    """``postgres_database``, failing the test (never skipping a tier) without PostgreSQL;
    this process's models let go of it (a SQLite file in ``tmp``) before it is dropped."""
    try:
        pg_execute("SELECT 1")
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for the test suite ({PG_ADMIN_DSN}): {exc}")
    with postgres_database() as url:
        yield url
        open_database(f"sqlite:///{tmp / 'unbind.db'}")


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


def tokens_of(response: httpx2.Response) -> int:
    """The tokens an Anthropic Messages answer says it used (what a token budget counts)."""
    usage = response.json()["usage"]
    return int(
        usage["input_tokens"]
        + usage["output_tokens"]
        + usage.get("cache_read_input_tokens", 0)
        + usage.get("cache_creation_input_tokens", 0)
    )


def post_message(
    gw: RunningGateway, body: dict[str, object], session: str, **headers: str
) -> httpx2.Response:
    """One Anthropic Messages call of dev@acme.test in ``session``, ``headers`` on top, on a
    connection of its own (so that the kernel spreads such calls over a gateway's workers)."""
    return httpx2.post(
        gw.url + "/v1/messages",
        content=orjson.dumps(body),
        headers={
            "x-api-key": gw.tokens["dev@acme.test"],
            "anthropic-version": "2023-06-01",
            "x-tvgate-session": session,
            **headers,
        },
        timeout=60,
    )


def seed(database_url: str, data_dir: Path, fake: FakeProvider) -> dict[str, str]:
    """Orgs, users, keys and routes the proxy tests use; returns tokens by user."""
    open_database(database_url)
    migrate(database.obj)
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
    add_test_key("fake-anthropic", "acme", fake.url)
    add_test_key("fake-openai", "acme", fake.openai_url, OPENAI_SECRET, provider="openai")
    add_test_key("other-anthropic", "other", fake.url)
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


def seeded_gateway(
    database_url: str, data_dir: Path, fake: FakeProvider, **extra_env: str
) -> GatewayProcess:
    """``seed`` the database, then ``launch_gateway`` over it (``with`` stops it)."""
    return launch_gateway(database_url, data_dir, seed(database_url, data_dir, fake), **extra_env)


@pytest.fixture
def seeded(
    fresh_database_url: str, fake_provider: FakeProvider, tmp_path: Path
) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A fresh database (SQLite, then PostgreSQL) ``seed``-ed in ``tmp_path`` (the data
    directory): its URL, the data directory and the tokens, for a test that starts its
    own gateways over it (the Visdom Trace push tests)."""
    tokens = seed(fresh_database_url, tmp_path, fake_provider)
    yield fresh_database_url, tmp_path, tokens
    database.close()


@pytest.fixture
def own_gateway(
    fresh_database_url: str, fake_provider: FakeProvider, tmp_path: Path
) -> Iterator[GatewayProcess]:
    """A gateway of this test's own over a fresh database (SQLite, then PostgreSQL), seeded as
    the suite's gateway is."""
    with seeded_gateway(fresh_database_url, tmp_path, fake_provider) as gw:
        yield gw
    database.close()


def add_test_key(
    name: str,
    org: str,
    base_url: str,
    secret: str = ANTHROPIC_SECRET,
    *,
    provider: str = "anthropic",
    **options: Any,
) -> None:
    """``services.add_key`` as the tests store keys: with the gateways' keyring (MASTER_KEY),
    private upstreams allowed (the fakes listen on 127.0.0.1); ``options`` go on to it."""
    services.add_key(
        name,
        provider,
        secret,
        LocalKeyring(MASTER_KEY),
        org_name=org,
        base_url=base_url,
        allow_private=True,
        **options,
    )


def add_fake_key(
    fake: FakeProvider,
    org: str,
    name: str,
    base_url: str,
    provider: str = "anthropic",
    *,
    secret: str = "",
    **options: Any,
) -> str:
    """A key of ``org`` on the fake provider with a secret of its own (so its calls can be
    told apart there; a random one unless given), which the fake provider accepts; returns
    the secret. ``options`` go on to ``services.add_key``."""
    prefix = "sk-ant-api03-" if provider == "anthropic" else "sk-proj-"
    secret = secret or prefix + secrets.token_hex(16)
    if fake.accepted_keys is not None:
        fake.accepted_keys.add(secret)
    add_test_key(name, org, base_url, secret, provider=provider, **options)
    return secret


@pytest.fixture(scope="session")
def gateway(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with seeded_gateway(database_url, tmp_path_factory.mktemp("gateway"), fake_provider) as gw:
        yield gw


@pytest.fixture(scope="module")
def visdom() -> Iterator[FakeVisdom]:
    """A fake Visdom Trace of the module's own: its users and orgs stay in the module (a
    module adds what it needs by overriding this fixture)."""
    fake = FakeVisdom().start()
    yield fake
    fake.stop()


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


@pytest.fixture
def db(tmp_path: Path) -> Iterator[None]:
    """A migrated SQLite database of the test's own, this process's models bound to it."""
    open_database(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(database.obj)
    yield
    database.close()


def own_openai_key(keyring: Keyring, name: str, owner: User, secret: str) -> ProviderKey:
    """``owner``'s own OpenAI key ``name`` as a row, its secret sealed by ``keyring`` to that
    row and owner: a user's key made without the services' checks, for the keyring tests."""
    row = ProviderKey.create(
        org=owner.org_id,
        name=name,
        provider="openai",
        base_url="https://api.openai.com/v1",
        ciphertext="",
        fingerprint=secret[-4:],
        owner=owner,
    )
    row.ciphertext = keyring.encrypt(secret, KeyContext(row.org_id, row.id, owner.id))
    row.save()
    return row


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the test's own (tests/pg_private.py), for outages: the test may
    stop and start it; it is destroyed at the end."""
    server = PrivatePostgres(free_port())
    server.start()
    server.create_database()
    yield server
    server.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own for one test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'own.db'}"
        return
    with own_postgres(tmp_path) as url:
        yield url


def seed_users(database_url: str) -> dict[str, str]:
    """Org acme (an admin and a member) and org other (a member); tokens by email."""
    open_database(database_url)
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
        gw_env = gateway_env(url, data_dir, 0, **(vault_env or vault).env())
        del gw_env["TVGATE_MASTER_KEY"]
        gw_env.update(env)
        gateway = gateway_process(gw_env, seed_users(url), data_dir / "tvgate.log")
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        stop_gateway(gateway.proc)
