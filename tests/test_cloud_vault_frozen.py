"""Cloud keys while Vault hangs (issue 20, as issue 17 did it for ordinary keys).

A real ``tvgate serve`` with the vault keyring against an OpenBao of its own, frozen with
SIGSTOP for a few seconds, with the fake Vertex AI, Azure OpenAI and Bedrock behind it.
A call on a Vertex, Azure or Bedrock key that is not in the key cache fails fast: the
first waits for the Vault timeout, later ones (any cloud's) are refused at once, each a
503 in its client's envelope; another org's call on a cloud key already decrypted is
served and traced meanwhile; once Vault answers, the cold keys serve again.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import httpx2
import pytest

from tests.conftest import ANTHROPIC_SECRET, GatewayFactory, GatewayProcess, VaultEnv, scrape
from tests.fake_azure import FakeAzure
from tests.fake_bedrock import FakeBedrock
from tests.fake_provider import FakeProvider
from tests.fake_vertex import FakeVertex
from tests.test_reliability_vault import VAULT_TIMEOUT, frozen_vault  # noqa: F401 - a fixture
from tests.test_vault_gateway import KEY_STORE_DOWN, cli, get, wait_for

VERTEX_MODEL = "claude-sonnet-4-5@20250929"
BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.fixture(scope="module")
def clouds(fake_provider: FakeProvider) -> Iterator[tuple[FakeVertex, FakeAzure, FakeBedrock]]:
    vertex, azure = FakeVertex(), FakeAzure(set())
    vertex.start()
    azure.start()
    with FakeBedrock(fake_provider.url, ANTHROPIC_SECRET) as bedrock:
        yield vertex, azure, bedrock
    vertex.stop()
    azure.stop()


def add_cloud_keys(
    gateway: GatewayProcess, org: str, clouds: tuple[FakeVertex, FakeAzure, FakeBedrock]
) -> None:
    """A Vertex, an Azure and a Bedrock key of ``org`` and a route on each (``ORG-vertex``
    …), added with ``tvgate keys add`` (the secret on standard input)."""
    vertex, azure, bedrock = clouds
    api_key = secrets.token_hex(16)
    azure.api_keys.add(api_key)
    key_id, secret = bedrock.add_key()
    for cloud, flags, stored, model in (
        (
            "vertex",
            ("--project", vertex.project, "--region", vertex.region, "--base-url", vertex.url),
            vertex.service_account(org),
            VERTEX_MODEL,
        ),
        (
            "azure",
            ("--api-version", "2025-04-01-preview", "--base-url", azure.url),
            {"api_key": api_key},
            "gpt4o-prod",
        ),
        (
            "bedrock",
            ("--region", "us-east-1", "--base-url", bedrock.url),
            {"access_key_id": key_id, "secret_access_key": secret},
            BEDROCK_MODEL,
        ),
    ):
        key = f"{org}-{cloud}"
        cli(
            gateway,
            *("keys", "add", key, "--org", org, "--provider", cloud, *flags),
            stdin=json.dumps(stored) + "\n",
        )
        cli(gateway, "routes", "add", key, "--key", key, "--org", org, "--model", model)


def ask(gateway: GatewayProcess, token: str, route: str) -> httpx2.Response:
    """A call on ``route`` as its cloud's client makes it (OpenAI's API for Azure)."""
    if route.endswith("-azure"):
        return httpx2.post(
            gateway.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {token}"},
            json={"model": route, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
    return httpx2.post(
        gateway.url + "/v1/messages",
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        json={"model": route, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )


def assert_key_store_down(route: str, answer: httpx2.Response) -> None:
    assert answer.status_code == 503, answer.text
    if route.endswith("-azure"):
        assert answer.json()["error"]["message"] == KEY_STORE_DOWN
    else:
        assert answer.json() == {
            "type": "error",
            "error": {"type": "api_error", "message": KEY_STORE_DOWN},
        }


def test_a_frozen_vault_fails_cloud_calls_fast_and_serves_cached_keys(
    vault_gateways: GatewayFactory,
    frozen_vault: VaultEnv,  # noqa: F811 - the fixture imported above
    clouds: tuple[FakeVertex, FakeAzure, FakeBedrock],
) -> None:
    gateway = vault_gateways(
        "cloud-frozen",
        vault_env=frozen_vault,
        TVGATE_VAULT_TIMEOUT=VAULT_TIMEOUT,
        TVGATE_KEY_CACHE_TTL="600",
    )
    add_cloud_keys(gateway, "acme", clouds)
    add_cloud_keys(gateway, "other", clouds)
    acme, other = gateway.tokens["dev@acme.test"], gateway.tokens["dev@other.test"]
    warm = ["other-vertex", "other-azure", "other-bedrock"]
    for route in warm:  # decrypted now: in the key cache while Vault is frozen
        assert ask(gateway, other, route).status_code == 200, route
    traced = len(gateway.wait_traces(len(warm)))
    cold = ["acme-vertex", "acme-azure", "acme-bedrock"]

    frozen_vault.server.pause()
    try:
        assert_key_store_down(cold[0], ask(gateway, acme, cold[0]))  # waits for the timeout
        assert scrape(gateway.url)["tvgate_keyring_timeouts_total"] >= 1
        for route in cold:
            refused = scrape(gateway.url)["tvgate_keyring_refused_fast_total"]
            assert_key_store_down(route, ask(gateway, acme, route))
            # Refused without asking Vault again.
            assert scrape(gateway.url)["tvgate_keyring_refused_fast_total"] > refused
        for route in warm:
            assert ask(gateway, other, route).status_code == 200, route
        # Every call was recorded meanwhile, the refused ones too.
        gateway.wait_traces(traced + 1 + len(cold) + len(warm), timeout=30)
    finally:
        frozen_vault.server.resume()

    wait_for(lambda: get(gateway, "/readyz").status == 200, "readiness after SIGCONT")
    wait_for(
        lambda: all(ask(gateway, acme, route).status_code == 200 for route in cold),
        "the cold keys serve again",
    )
