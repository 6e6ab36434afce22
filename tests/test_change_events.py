"""A change made anywhere is in force in every worker of a running gateway within about a
second, with ``TVGATE_CACHE_TTL`` left at its default.

Services announce each change after commit: in their own process to the Gateway, and to
every other process through the org's change counts, which each worker polls. Here the
changes come from the command line (a process of its own) and the gateway runs two
workers. Each test holds a kept-alive connection to each worker (``/metrics`` names the
worker that holds a connection) and waits, at most 2 s after the command, until every
worker answers with the change. Before this, a CLI change waited for the route refresh
(2.5 to 5 s at the default TTL of 5 s) and an identity for its cache TTL.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Callable, Iterator

import httpx2
import pytest

from tests.conftest import GatewayProcess, add_fake_key, launch_gateway, stop_gateway
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.db import migrate
from tvgate.models import database

#: Seconds a change made from the CLI may take to reach every worker.
DEADLINE = 2.0
WORKERS = 2
_orgs = itertools.count(1)


@pytest.fixture(scope="module")
def gateway(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("changes")
    # TVGATE_CACHE_TTL at its default: what a deployment runs with.
    gateway = launch_gateway(
        database_url, data_dir, {}, TVGATE_WORKERS=str(WORKERS), TVGATE_CACHE_TTL=""
    )
    gateway.bind()
    migrate(database.obj)
    yield gateway
    stop_gateway(gateway.proc)


def worker_of(client: httpx2.Client, gateway: GatewayProcess) -> str:
    """The index of the worker that holds the client's connection (its /metrics says)."""
    metrics = client.get(gateway.url + "/metrics").text
    found = re.search(r'^tvgate_worker_info\{worker="(\d+)"', metrics, re.MULTILINE)
    assert found is not None, metrics
    return found.group(1)


@pytest.fixture
def workers(gateway: GatewayProcess) -> Iterator[dict[str, httpx2.Client]]:
    """A kept-alive connection to each worker, by worker index: new connections until every
    worker has taken one."""
    clients: dict[str, httpx2.Client] = {}
    try:
        while len(clients) < WORKERS:
            client = httpx2.Client(timeout=30, limits=httpx2.Limits(max_connections=1))
            worker = worker_of(client, gateway)
            if worker in clients:
                client.close()
            else:
                clients[worker] = client
        yield clients
    finally:
        for client in clients.values():
            client.close()


Answer = Callable[[httpx2.Client], int]


def call(gateway: GatewayProcess, token: str, model: str) -> Answer:
    """The status of a proxy call for ``model``."""

    def answer(client: httpx2.Client) -> int:
        return client.post(
            gateway.url + "/v1/messages",
            headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
            json={"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        ).status_code

    return answer


def users_page(gateway: GatewayProcess, token: str) -> Answer:
    """The status of the admins' list of users in the JSON API."""
    return lambda client: (
        client.get(gateway.url + "/api/v1/users", headers={"x-api-key": token}).status_code
    )


def everywhere(
    gateway: GatewayProcess,
    workers: dict[str, httpx2.Client],
    answer: Answer,
    expected: int,
    deadline: float,
) -> None:
    """Every worker answers ``expected`` before ``deadline`` (a monotonic time)."""
    for worker, client in workers.items():
        statuses: list[int] = []
        while not statuses or statuses[-1] != expected:
            if time.monotonic() > deadline:
                pytest.fail(f"worker {worker} did not answer {expected} in time: {statuses}")
            statuses.append(answer(client))
        # Still the same connection, so it was this worker that answered.
        assert worker_of(client, gateway) == worker


def cli(gateway: GatewayProcess, *args: str) -> float:
    """Run a CLI command; returns the deadline for its change to be in force everywhere."""
    done = gateway.cli(*args)
    assert done.returncode == 0, done.stderr
    return time.monotonic() + DEADLINE


def soon() -> float:
    """The deadline for what the test process itself set up (no promise to check)."""
    return time.monotonic() + 30


@pytest.fixture
def org(
    gateway: GatewayProcess, workers: dict[str, httpx2.Client], fake_provider: FakeProvider
) -> dict[str, str]:
    """An org with two admins and a member, a key ``main`` and a route ``before`` on it,
    that every worker has read (its route snapshot and the tokens) before any change."""
    gateway.bind()
    name = f"changes{next(_orgs)}-{secrets.token_hex(3)}"
    tokens = {"name": name}
    for user, admin in (("boss", True), ("second", True), ("dev", False)):
        services.add_user(f"{user}@{name}.test", name, admin=admin)
        tokens[user], _ = services.issue_token(f"{user}@{name}.test", name, name="tests")
    add_fake_key(fake_provider, name, "main", fake_provider.url)
    services.add_route("before", "main", model="claude-upstream-1", org_name=name)
    everywhere(gateway, workers, call(gateway, tokens["dev"], "before"), 200, soon())
    return tokens


def test_cli_route_add_is_in_force_in_every_worker(
    gateway: GatewayProcess, workers: dict[str, httpx2.Client], org: dict[str, str]
) -> None:
    fresh = call(gateway, org["dev"], "fresh")
    everywhere(gateway, workers, fresh, 404, soon())
    deadline = cli(
        gateway,
        "routes",
        "add",
        "fresh",
        "--key",
        "main",
        "--model",
        "claude-upstream-1",
        "--org",
        org["name"],
    )
    everywhere(gateway, workers, fresh, 200, deadline)


def test_cli_key_disabled_and_deleted_are_in_force_in_every_worker(
    gateway: GatewayProcess,
    workers: dict[str, httpx2.Client],
    org: dict[str, str],
    fake_provider: FakeProvider,
) -> None:
    add_fake_key(fake_provider, org["name"], "spare", fake_provider.url)
    services.add_route("spared", "spare", model="claude-upstream-1", org_name=org["name"])
    spared = call(gateway, org["dev"], "spared")
    everywhere(gateway, workers, spared, 200, soon())
    deadline = cli(gateway, "keys", "disable", "spare", "--org", org["name"])
    everywhere(gateway, workers, spared, 404, deadline)
    deadline = cli(gateway, "keys", "delete", "main", "--force", "--org", org["name"])
    everywhere(gateway, workers, call(gateway, org["dev"], "before"), 404, deadline)


def test_cli_policy_change_is_in_force_in_every_worker(
    gateway: GatewayProcess,
    workers: dict[str, httpx2.Client],
    org: dict[str, str],
    fake_provider: FakeProvider,
) -> None:
    name, dev = org["name"], f"dev@{org['name']}.test"
    services.set_policy(name, allow_user_keys=True, allow_user_routes=True)
    add_fake_key(
        fake_provider, name, "mine", fake_provider.url, allow_private_user=True, owner_email=dev
    )
    services.add_route("own", "mine", model="claude-upstream-1", org_name=name, owner=dev)
    own = call(gateway, org["dev"], "own")
    everywhere(gateway, workers, own, 200, soon())
    deadline = cli(gateway, "policy", "set", "--org", name, "--user-keys", "off")
    everywhere(gateway, workers, own, 404, deadline)


def test_cli_user_demoted_is_in_force_in_every_worker(
    gateway: GatewayProcess, workers: dict[str, httpx2.Client], org: dict[str, str]
) -> None:
    users = users_page(gateway, org["boss"])
    everywhere(gateway, workers, users, 200, soon())
    deadline = cli(
        gateway,
        "users",
        "set",
        f"boss@{org['name']}.test",
        "--org",
        org["name"],
        "--role",
        "member",
    )
    everywhere(gateway, workers, users, 403, deadline)
