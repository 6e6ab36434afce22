"""Cloud keys whose credential endpoint is hostile, against a real ``tvgate serve``.

A Vertex key's service account names its ``token_uri``, an Azure key its Entra ID
``authority``, a Bedrock key its ``sts_endpoint``: each is sent a secret (a signed JWT,
a client secret, a signed AssumeRole), and whatever answers there may answer anything
(tests/fake_hostile_token.py): too much, a byte at a time, broken JSON or XML, a redirect,
an HTML page, a token with no expiry or an absurd one. For each, the client gets a clear
error in its API's envelope (Anthropic's for Vertex and Bedrock, OpenAI's for Azure), a 502
(a 503 for an endpoint too slow, past ``TVGATE_TOKEN_TIMEOUT``); neither the key's secret
nor what the endpoint said reaches the answer or the gateway's log; a redirect is never
followed; and while one key's endpoint drips, calls on other keys (whose tokens are minted
meanwhile) are served.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote_plus

import httpx2
import pytest

from tests.conftest import ANTHROPIC_SECRET, GatewayProcess, add_test_key, launch_gateway
from tests.fake_azure import FakeAzure
from tests.fake_bedrock import FakeBedrock
from tests.fake_hostile_token import MODES, HostileTokenEndpoint
from tests.fake_provider import FakeProvider
from tests.fake_vertex import FakeVertex
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.models import database
from tvgate.providers.clouds.vertex import secret_strings

CLOUDS = ("vertex", "azure", "bedrock")
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
AZURE_DEPLOYMENT = "gpt4o-prod"
AZURE_VERSION = "2025-04-01-preview"
TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "5f1c3e2a-9b7d-4c8e-a1f0-2b3c4d5e6f70"
ROLE = "arn:aws:iam::123456789012:role/tvgate-hostile"
#: TVGATE_TOKEN_TIMEOUT of the gateway under test.
TOKEN_TIMEOUT = 2

#: What the client is told, by mode (the same for every cloud unless ``_STS_SAYS`` differs).
_SAYS = {
    "big": "answered with over 64 KiB",
    "drip": f"did not answer within {TOKEN_TIMEOUT} s (TVGATE_TOKEN_TIMEOUT)",
    "badjson": "with something not JSON (application/json)",
    "redirect": "answered with a redirect (HTTP 302), not followed",
    "html": "with something not JSON (text/html)",
    "noexpiry": "minted a token with no expiry",
    "absurd": "minted a token said to live",
    "echo": "invalid_grant",
}
_STS_SAYS = {
    "echo": "refused to assume the key's role (InvalidGrant)",
    "badjson": "answered AssumeRole without credentials",
    "html": "answered AssumeRole without credentials",
    "noexpiry": "answered AssumeRole without credentials",
}


@dataclass
class Hostile:
    gw: GatewayProcess
    endpoint: HostileTokenEndpoint
    token: str
    #: Every secret of the org's keys, in each form it is sent in.
    secrets: list[str] = field(default_factory=list)


def _vertex_keys(org: str, fake: FakeVertex, hostile: HostileTokenEndpoint) -> list[str]:
    said: list[str] = []
    for mode in (*MODES, "good"):
        account = fake.service_account(f"h{mode}")
        if mode != "good":
            account["token_uri"] = f"{hostile.url}/{mode}/token"
        add_test_key(
            f"vx-{mode}",
            org,
            fake.url,
            json.dumps(account),
            provider="vertex",
            settings={"project": fake.project, "region": fake.region},
        )
        services.add_route(f"vertex-{mode}", f"vx-{mode}", model=VERTEX_MODEL, org_name=org)
        said += [*secret_strings(account), account["private_key"].splitlines()[1]]
    return said


def _azure_keys(org: str, fake: FakeAzure, hostile: HostileTokenEndpoint) -> list[str]:
    said: list[str] = []
    for mode in (*MODES, "good"):
        secret = "Qx8~" + secrets.token_urlsafe(30)
        client_id = CLIENT_ID[:-2] + f"{len(said):02d}"
        fake.apps[(TENANT, client_id)] = secret
        authority = fake.url if mode == "good" else f"{hostile.url}/{mode}"
        add_test_key(
            f"az-{mode}",
            org,
            fake.url,
            json.dumps({"tenant_id": TENANT, "client_id": client_id, "client_secret": secret}),
            provider="azure",
            settings={"authority": authority, "api_version": AZURE_VERSION},
        )
        services.add_route(f"azure-{mode}", f"az-{mode}", model=AZURE_DEPLOYMENT, org_name=org)
        said += [secret, quote_plus(secret)]
    return said


def _bedrock_keys(org: str, fake: FakeBedrock, hostile: HostileTokenEndpoint) -> list[str]:
    said: list[str] = []
    fake.roles[ROLE] = ""
    for mode in (*MODES, "good"):
        key_id, secret = fake.add_key()
        sts = f"{fake.url}/sts/" if mode == "good" else f"{hostile.url}/{mode}/sts/"
        add_test_key(
            f"br-{mode}",
            org,
            fake.url,
            json.dumps({"access_key_id": key_id, "secret_access_key": secret}),
            provider="bedrock",
            settings={"region": "us-east-1", "role_arn": ROLE, "sts_endpoint": sts},
        )
        services.add_route(f"bedrock-{mode}", f"br-{mode}", model=BEDROCK_MODEL, org_name=org)
        said.append(secret)
    return said


@pytest.fixture(scope="module")
def hostile(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    with (
        HostileTokenEndpoint() as endpoint,
        FakeBedrock(fake_provider.url, ANTHROPIC_SECRET) as bedrock,
    ):
        vertex, azure = FakeVertex(), FakeAzure(set())
        vertex.start()
        azure.start()
        try:
            open_database(database_url)
            migrate(database.obj)
            org = "hostile-" + secrets.token_hex(3)
            services.add_user(f"dev@{org}.test", org)
            token, _ = services.issue_token(f"dev@{org}.test", org)
            said = [
                *_vertex_keys(org, vertex, endpoint),
                *_azure_keys(org, azure, endpoint),
                *_bedrock_keys(org, bedrock, endpoint),
            ]
            database.close()
            with launch_gateway(
                database_url,
                tmp_path_factory.mktemp("hostile"),
                {"dev": token},
                TVGATE_TOKEN_TIMEOUT=str(TOKEN_TIMEOUT),
            ) as gw:
                yield Hostile(gw, endpoint, token, said)
        finally:
            vertex.stop()
            azure.stop()


def call(hostile: Hostile, cloud: str, mode: str) -> httpx2.Response:
    """A call on the cloud's route of ``mode``, as the client of the cloud's API makes it."""
    if cloud == "azure":
        return httpx2.post(
            hostile.gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {hostile.token}"},
            json={"model": f"azure-{mode}", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
    return httpx2.post(
        hostile.gw.url + "/v1/messages",
        headers={"x-api-key": hostile.token, "anthropic-version": "2023-06-01"},
        json={
            "model": f"{cloud}-{mode}",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=60,
    )


def error_message(cloud: str, answer: httpx2.Response) -> str:
    """The error's message, from the envelope of the cloud's API (failing on another)."""
    document: Any = answer.json()
    if cloud == "azure":
        assert set(document) == {"error"}, document
    else:
        assert document["type"] == "error", document
    message = document["error"]["message"]
    assert isinstance(message, str)
    return message


def assert_nothing_leaked(hostile: Hostile, text: str) -> None:
    assert hostile.endpoint.raw not in text
    for secret in hostile.secrets:
        assert secret not in text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cloud", CLOUDS)
def test_a_hostile_credential_endpoint_is_a_clear_error(
    hostile: Hostile, cloud: str, mode: str
) -> None:
    asked = len(hostile.endpoint.sent)
    answer = call(hostile, cloud, mode)
    # A signed JWT (Vertex) is a credential too: the endpoint quoting it back changes nothing.
    for sent in hostile.endpoint.sent[asked:]:
        for assertion in parse_qs(sent).get("assertion", []):
            hostile.secrets.append(assertion.rsplit(".", 1)[-1][:40])  # its signature's start
    assert answer.status_code == (503 if mode == "drip" else 502), answer.text
    message = error_message(cloud, answer)
    says = _STS_SAYS.get(mode, _SAYS[mode]) if cloud == "bedrock" else _SAYS[mode]
    assert says in message
    assert f"127.0.0.1:{hostile.endpoint.url.rsplit(':', 1)[1]}" in message
    assert_nothing_leaked(hostile, answer.text)
    assert_nothing_leaked(hostile, hostile.gw.log_text())
    assert "ok" not in hostile.endpoint.hits  # no redirect was followed


@pytest.mark.parametrize("cloud", CLOUDS)
def test_a_dripping_endpoint_holds_up_no_other_keys_calls(hostile: Hostile, cloud: str) -> None:
    hostile.endpoint.dripping.clear()
    hung_up = hostile.endpoint.hung_up
    held: list[int] = []
    # More calls on the dripping key than the gateway has token threads: they wait for one.
    callers = [
        threading.Thread(target=lambda: held.append(call(hostile, cloud, "drip").status_code))
        for _ in range(6)
    ]
    for caller in callers:
        caller.start()
    assert hostile.endpoint.dripping.wait(30)
    served = call(hostile, cloud, "good")
    assert served.status_code == 200, served.text
    for caller in callers:
        caller.join(60)
    assert held == [503] * 6
    # The dripping answer was hung up on, not left to run.
    for _ in range(100):
        if hostile.endpoint.hung_up > hung_up:
            break
        time.sleep(0.1)
    assert hostile.endpoint.hung_up > hung_up
