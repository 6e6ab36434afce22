"""A hung Vault, from outside (reliability issue 17.3): the trace writer never waits on
it, an org's provider keys are never stored unredacted while they cannot be read, and
calls that need a decrypt fail fast after the first timeout.

Each test runs a real ``tvgate serve`` with the vault keyring against an OpenBao of its
own, frozen with SIGSTOP (it accepts connections and never answers) for a few seconds,
with the fake provider behind the gateway.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import zstandard

from tests.conftest import GatewayFactory, GatewayProcess, VaultEnv, scrape, setup_vault
from tests.fake_provider import FakeProvider
from tests.openbao import OpenBao
from tests.test_vault_gateway import KEY_STORE_DOWN, add_key_and_route, get, wait_for
from tvgate.models import Blob, Trace, database
from tvgate.traces.redact import Redactor

#: How long the gateway waits for Vault (the test's timeout, far below the default 5 s).
VAULT_TIMEOUT = "2"
#: Calls made while Vault is frozen.
FROZEN_CALLS = 40


@pytest.fixture
def frozen_vault(tmp_path: Path) -> Iterator[VaultEnv]:
    """An OpenBao of this test's own (the session's must not be frozen), set up by tvgate."""
    workdir = tmp_path / "frozen-openbao"
    workdir.mkdir()
    server = OpenBao(workdir, dev=True).start()
    try:
        yield setup_vault(server)
    finally:
        server.stop()  # resumes it first if a test left it frozen


@pytest.fixture
def secrets_accepted(fake_provider: FakeProvider) -> Iterator[set[str]]:
    """Secrets the fake provider accepts for this test; removed afterwards."""
    added: set[str] = set()
    yield added
    assert fake_provider.accepted_keys is not None
    fake_provider.accepted_keys -= added


def org_secret(fake_provider: FakeProvider, accepted: set[str]) -> str:
    """A provider key no built-in pattern finds: only the org's own key list redacts it."""
    secret = "corp-" + secrets.token_hex(24)
    assert Redactor().redact(secret.encode()) == secret.encode()
    assert fake_provider.accepted_keys is not None
    fake_provider.accepted_keys.add(secret)
    accepted.add(secret)
    return secret


def ask(gateway: GatewayProcess, route: str, text: str) -> httpx2.Response:
    """One Anthropic call through the gateway whose prompt says ``text``."""
    return httpx2.post(
        gateway.url + "/v1/messages",
        json={
            "model": route,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": text}],
        },
        headers={
            "x-api-key": gateway.tokens["dev@acme.test"],
            "anthropic-version": "2023-06-01",
        },
        timeout=60,
    )


def dropped(gateway: GatewayProcess) -> dict[str, float]:
    return {
        name: value
        for name, value in scrape(gateway.url).items()
        if name.startswith("tvgate_traces_dropped_total")
    }


def stored_blobs(gateway: GatewayProcess) -> bytes:
    """Every body blob in the gateway's database, decompressed."""
    gateway.bind()
    try:
        decompress = zstandard.ZstdDecompressor().decompress
        return b"\n".join(decompress(bytes(blob.data)) for blob in Blob.select())
    finally:
        database.close()


def files_under(directory: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def bodiless(gateway: GatewayProcess, route: str) -> list[Trace]:
    return [t for t in gateway.traces(route_name=route) if not t.request_blob]


def test_frozen_vault_drops_no_trace_and_stores_no_key_unredacted(
    vault_gateways: GatewayFactory,
    frozen_vault: VaultEnv,
    fake_provider: FakeProvider,
    secrets_accepted: set[str],
) -> None:
    gateway = vault_gateways(
        "frozen-writer",
        vault_env=frozen_vault,
        TVGATE_VAULT_TIMEOUT=VAULT_TIMEOUT,
        TVGATE_KEY_CACHE_TTL="600",
        # A small queue: a writer that stalls for a few seconds drops traces at once.
        TVGATE_TRACE_QUEUE_SIZE="10",
    )
    used, pasted, fresh = (org_secret(fake_provider, secrets_accepted) for _ in range(3))
    add_key_and_route(gateway, fake_provider, "used", "route-used", used)
    add_key_and_route(gateway, fake_provider, "pasted", "route-pasted", pasted)
    # Both keys are decrypted by calls, so the gateway holds them in its key cache.
    assert ask(gateway, "route-used", "hello").status_code == 200
    assert ask(gateway, "route-pasted", "hello").status_code == 200
    gateway.wait_traces(2)
    # Their bodies stored, the writer has no reason to look at the org's keys again
    # before a call comes.
    wait_for(
        lambda: not bodiless(gateway, "route-used") and not bodiless(gateway, "route-pasted"),
        "the first bodies are stored",
    )
    # A key nobody has called yet: its plaintext is nowhere in the gateway's memory.
    add_key_and_route(gateway, fake_provider, "fresh", "route-fresh", fresh)

    frozen_vault.server.pause()
    try:
        prompt = f"my keys are {pasted} and {fresh}, please keep them safe"
        statuses = [ask(gateway, "route-used", prompt).status_code for _ in range(FROZEN_CALLS)]
        assert statuses == [200] * FROZEN_CALLS  # the used key is in the cache
        # Every call is traced while Vault is frozen: the writer did not wait on it.
        gateway.wait_traces(2 + FROZEN_CALLS, timeout=30)
        assert set(dropped(gateway).values()) == {0.0}, dropped(gateway)
        # The fresh key cannot be read now: the bodies are held, none is stored or spooled.
        assert scrape(gateway.url)["tvgate_trace_bodies_held"] == FROZEN_CALLS
        while_frozen = stored_blobs(gateway) + files_under(gateway.data_dir)
        for secret in (used, pasted, fresh):
            assert secret.encode() not in while_frozen
        ready = get(gateway, "/readyz")
        assert ready.status == 503
        assert ready.json()["checks"]["keyring"].startswith("unavailable")
        assert ready.json()["checks"]["database"] == "ok"
    finally:
        frozen_vault.server.resume()

    wait_for(lambda: get(gateway, "/readyz").status == 200, "readiness after SIGCONT")
    wait_for(lambda: not bodiless(gateway, "route-used"), "the held bodies are stored")
    blobs = stored_blobs(gateway)
    for secret in (used, pasted, fresh):
        assert secret.encode() not in blobs
        assert secret.encode() not in files_under(gateway.data_dir)
    assert blobs.count(b"and [REDACTED:provider-key], please keep them safe") >= 1
    assert len(gateway.traces(route_name="route-used")) == 1 + FROZEN_CALLS
    assert set(dropped(gateway).values()) == {0.0}
    assert scrape(gateway.url)["tvgate_trace_bodies_held"] == 0
    assert ask(gateway, "route-fresh", "hello").status_code == 200
    for secret in (used, pasted, fresh):
        assert secret not in gateway.log_text()


def test_frozen_vault_fails_fast_after_the_first_timeout_and_recovers(
    vault_gateways: GatewayFactory,
    frozen_vault: VaultEnv,
    fake_provider: FakeProvider,
    secrets_accepted: set[str],
) -> None:
    gateway = vault_gateways(
        "frozen-fast", vault_env=frozen_vault, TVGATE_VAULT_TIMEOUT=VAULT_TIMEOUT
    )
    cold = org_secret(fake_provider, secrets_accepted)
    add_key_and_route(gateway, fake_provider, "cold", "route-cold", cold)
    assert get(gateway, "/readyz").status == 200

    frozen_vault.server.pause()
    try:
        first = ask(gateway, "route-cold", "hello")  # waits for the timeout once
        assert first.status_code == 503
        assert first.json() == {
            "type": "error",
            "error": {"type": "api_error", "message": KEY_STORE_DOWN},
        }
        samples = scrape(gateway.url)
        timeouts = samples["tvgate_keyring_timeouts_total"]
        assert timeouts >= 1
        refused = samples["tvgate_keyring_refused_fast_total"]
        second = ask(gateway, "route-cold", "hello")
        assert second.status_code == 503
        assert second.json()["error"]["message"] == KEY_STORE_DOWN
        # The second call did not wait on Vault: it was refused without a request.
        samples = scrape(gateway.url)
        assert samples["tvgate_keyring_refused_fast_total"] > refused
        ready = get(gateway, "/readyz")
        assert ready.status == 503
        assert ready.json()["checks"]["keyring"].startswith("unavailable")
    finally:
        frozen_vault.server.resume()

    wait_for(lambda: get(gateway, "/readyz").status == 200, "readiness after SIGCONT")
    wait_for(lambda: ask(gateway, "route-cold", "hello").status_code == 200, "a decrypt again")
    log = gateway.log_text()
    assert "did not answer within 2 s" in log and "vault is available again" in log
    assert cold not in log
