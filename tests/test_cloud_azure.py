"""Azure OpenAI keys through a real ``tvgate serve`` (SQLite and PostgreSQL), against
tests/fake_azure.py (which checks ``api-key``, Entra ID tokens and ``api-version``).

* The fake itself refuses what Azure refuses: a wrong key, a missing or unsupported
  api-version, a token it did not mint, a wrong client secret.
* The ``openai`` SDK on tvgate's ``/v1`` reaches a deployments-style route (api key and
  Entra ID) and a v1-style route: Chat Completions and Responses, streamed and not; each
  call lands on the path Azure serves, with the key's api-version and credential and no
  tvgate token.
* The ``openai`` SDK's ``AzureOpenAI`` client pointed at tvgate as its Azure endpoint
  (tvgate token as its api key): ``/openai/deployments/{route}/chat/completions`` and
  ``/openai/responses``, to an Azure route and to a plain OpenAI one (whose provider
  sees no ``api-version`` and no ``api-key``).
* An Anthropic client on an Azure route is translated to Chat Completions.
* Traces: provider ``azure``, the model Azure reported, its usage and its price.
* Errors as Azure sends them: a content filter refusal, an unknown deployment; an Entra
  ID refusal is a 502 naming the AADSTS code.
* One Entra ID token per credential while it is valid; a new one once it nears expiry.
* Canary: the api key, the client secret and every minted token appear in no response,
  trace, database row, log or file of the gateway's data directory, even when the
  provider echoes the credential it was sent.
* ``tvgate keys add --provider azure`` and the API take the settings and refuse bad ones
  without quoting a secret.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx2
import openai
import orjson
import pytest

from tests.conftest import GatewayProcess, add_fake_key, add_test_key
from tests.fake_azure import DEFAULT_DEPLOYMENTS, FakeAzure
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.models import Org
from tvgate.traces.spans import span_attributes

API_VERSION = "2025-04-01-preview"
DEPLOYMENT = "gpt4o-prod"
MODEL = DEFAULT_DEPLOYMENTS[DEPLOYMENT]
TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "5f1c3e2a-9b7d-4c8e-a1f0-2b3c4d5e6f70"
SHORT_CLIENT_ID = "0a1b2c3d-0000-4000-8000-000000000001"
BURST_CLIENT_ID = "0a1b2c3d-0000-4000-8000-000000000002"
USER_TEXT = "hello from azure"


@dataclass(frozen=True)
class AzureOrg:
    name: str
    token: str
    api_key: str
    client_secret: str
    short_secret: str
    fake: FakeAzure

    @property
    def secrets(self) -> list[str]:
        minted = [token for token, _ in self.fake.minted]
        return [self.api_key, self.client_secret, self.short_secret, *minted]


@pytest.fixture(scope="module")
def azure() -> Iterator[FakeAzure]:
    fake = FakeAzure(set())
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def org(gateway: GatewayProcess, azure: FakeAzure, fake_provider: FakeProvider) -> AzureOrg:
    gateway.bind()
    name = "azure-" + secrets.token_hex(3)
    services.add_user(f"dev@{name}.test", name)
    token, _ = services.issue_token(f"dev@{name}.test", name)
    api_key = secrets.token_hex(16)
    client_secret = "Qx8~" + secrets.token_urlsafe(30)
    short_secret = "Zy7~" + secrets.token_urlsafe(30)
    azure.api_keys.add(api_key)
    azure.apps[(TENANT, CLIENT_ID)] = client_secret
    azure.apps[(TENANT, SHORT_CLIENT_ID)] = short_secret
    azure.apps[(TENANT, BURST_CLIENT_ID)] = short_secret
    entra = {"tenant_id": TENANT, "client_id": CLIENT_ID, "client_secret": client_secret}

    def key(key_name: str, secret: dict[str, str], **settings: str) -> None:
        add_test_key(
            key_name,
            name,
            azure.url,
            json.dumps(secret),
            provider="azure",
            settings={"authority": azure.url, **settings},
        )

    key("az", {"api_key": api_key}, api_version=API_VERSION)
    key("az-v1", {"api_key": api_key}, style="v1")
    key("az-entra", entra, api_version=API_VERSION)
    key("az-short", {**entra, "client_id": SHORT_CLIENT_ID, "client_secret": short_secret})
    key("az-wrong", {**entra, "client_secret": "not-the-" + client_secret})
    key("az-burst", {**entra, "client_id": BURST_CLIENT_ID, "client_secret": short_secret})
    for route, key_name in (
        ("gpt4o", "az"),
        ("gpt4o-v1", "az-v1"),
        ("gpt4o-entra", "az-entra"),
        ("gpt4o-short", "az-short"),
        ("gpt4o-wrong", "az-wrong"),
        ("gpt4o-burst", "az-burst"),
    ):
        services.add_route(route, key_name, model=DEPLOYMENT, org_name=name)
    services.add_route(
        "gpt4o-mended", "az-wrong", model=DEPLOYMENT, org_name=name, fallbacks=["gpt4o"]
    )
    services.add_route("gpt-missing", "az", model="no-such-deployment", org_name=name)
    add_fake_key(fake_provider, name, "plain", fake_provider.openai_url, provider="openai")
    services.add_route("plain-gpt", "plain", model="gpt-upstream-1", org_name=name)
    return AzureOrg(name, token, api_key, client_secret, short_secret, azure)


def client(gateway: GatewayProcess, org: AzureOrg) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=org.token, max_retries=0)


def azure_client(gateway: GatewayProcess, org: AzureOrg) -> openai.AzureOpenAI:
    """The SDK's Azure client, with tvgate as its Azure endpoint and its token as the key."""
    return openai.AzureOpenAI(
        azure_endpoint=gateway.url, api_key=org.token, api_version="2024-10-21", max_retries=0
    )


def last_azure_request(org: AzureOrg) -> dict[str, object]:
    record = [r for r in org.fake.requests if r.path.startswith("/openai/")][-1]
    return {
        "path": record.path,
        "query": record.query,
        "headers": record.headers,
        "body": json.loads(record.body),
    }


def assert_sent_as(org: AzureOrg, route: str, path: str) -> None:
    """The last call reached Azure on ``path`` with the key's credential, not the token."""
    sent = last_azure_request(org)
    headers = sent["headers"]
    assert isinstance(headers, dict)
    assert sent["path"] == path
    body = sent["body"]
    assert isinstance(body, dict)
    if route == "gpt4o-v1":
        assert sent["query"] == ""
        assert body["model"] == DEPLOYMENT
    else:
        assert sent["query"] == f"api-version={API_VERSION}"
    if route == "gpt4o-entra":
        minted = {token for token, _ in org.fake.minted}
        assert headers["authorization"].removeprefix("Bearer ") in minted
        assert "api-key" not in headers
    else:
        assert headers["api-key"] == org.api_key
        assert "authorization" not in headers
    assert org.token not in json.dumps(headers)


# --- the fake checks what Azure checks ------------------------------------------------------


def test_the_fake_refuses_what_azure_refuses(org: AzureOrg) -> None:
    url = org.fake.url + f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    ok = httpx2.post(
        url, params={"api-version": API_VERSION}, json=chat, headers={"api-key": org.api_key}
    )
    assert ok.status_code == 200 and ok.json()["model"] == MODEL
    assert ok.json()["prompt_filter_results"]
    wrong = httpx2.post(
        url, params={"api-version": API_VERSION}, json=chat, headers={"api-key": "x" * 32}
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "401"
    missing = httpx2.post(url, json=chat, headers={"api-key": org.api_key})
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "404", "message": "Resource not found"}}
    old = httpx2.post(
        url, params={"api-version": "2023-01-01"}, json=chat, headers={"api-key": org.api_key}
    )
    assert old.status_code == 400 and old.json()["error"]["message"] == "API version not supported"
    bearer = httpx2.post(
        url,
        params={"api-version": API_VERSION},
        json=chat,
        headers={"Authorization": "Bearer eyJ0eXAiOiJKV1QifQ.forged"},
    )
    assert bearer.status_code == 401
    token_url = f"{org.fake.url}/{TENANT}/oauth2/v2.0/token"
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": "wrong",
        "scope": "https://cognitiveservices.azure.com/.default",
    }
    refused = httpx2.post(token_url, data=form)
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    minted = httpx2.post(token_url, data={**form, "client_secret": org.client_secret})
    assert minted.status_code == 200
    token = minted.json()["access_token"]
    with_token = httpx2.post(
        url,
        params={"api-version": API_VERSION},
        json=chat,
        headers={"Authorization": "Bearer " + token},
    )
    assert with_token.status_code == 200


# --- the openai SDK on tvgate's /v1 -------------------------------------------------------


AZURE_ROUTES = ["gpt4o", "gpt4o-entra", "gpt4o-v1"]


def chat_path(route: str) -> str:
    if route == "gpt4o-v1":
        return "/openai/v1/chat/completions"
    return f"/openai/deployments/{DEPLOYMENT}/chat/completions"


def responses_path(route: str) -> str:
    return "/openai/v1/responses" if route == "gpt4o-v1" else "/openai/responses"


@pytest.mark.parametrize("route", AZURE_ROUTES)
def test_chat_completions_on_an_azure_route(
    gateway: GatewayProcess, org: AzureOrg, route: str
) -> None:
    sdk = client(gateway, org)
    answer = sdk.chat.completions.create(
        model=route, messages=[{"role": "user", "content": USER_TEXT}]
    )
    assert answer.choices[0].message.content == f"You said: {USER_TEXT}"
    assert answer.model == MODEL
    assert_sent_as(org, route, chat_path(route))
    stream = sdk.chat.completions.create(
        model=route,
        messages=[{"role": "user", "content": USER_TEXT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"You said: {USER_TEXT}"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert_sent_as(org, route, chat_path(route))
    traces = gateway.wait_traces(2, route_name=route)
    for trace in traces[-2:]:
        assert trace.provider == "azure"
        assert trace.upstream_model == DEPLOYMENT
        assert trace.response_model == MODEL
        assert trace.input_tokens > 0 and trace.output_tokens > 0
        assert trace.cost_usd > 0  # priced as gpt-4o, the model Azure reported


@pytest.mark.parametrize("route", AZURE_ROUTES)
def test_responses_on_an_azure_route(gateway: GatewayProcess, org: AzureOrg, route: str) -> None:
    sdk = client(gateway, org)
    answer = sdk.responses.create(model=route, input=USER_TEXT)
    assert answer.output_text == f"You said: {USER_TEXT}"
    assert_sent_as(org, route, responses_path(route))
    assert last_azure_request(org)["body"]["model"] == DEPLOYMENT  # type: ignore[index]
    with sdk.responses.stream(model=route, input=USER_TEXT) as stream:
        final = stream.get_final_response()
    assert final.output_text == f"You said: {USER_TEXT}"
    assert final.usage is not None and final.usage.output_tokens > 0
    assert_sent_as(org, route, responses_path(route))


def test_an_anthropic_client_on_an_azure_route(gateway: GatewayProcess, org: AzureOrg) -> None:
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=org.token, max_retries=0)
    message = sdk.messages.create(
        model="gpt4o", max_tokens=64, messages=[{"role": "user", "content": USER_TEXT}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == f"You said: {USER_TEXT}"
    assert_sent_as(org, "gpt4o", chat_path("gpt4o"))
    with sdk.messages.stream(
        model="gpt4o-entra", max_tokens=64, messages=[{"role": "user", "content": USER_TEXT}]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == f"You said: {USER_TEXT}"
    assert final.usage.output_tokens > 0
    assert_sent_as(org, "gpt4o-entra", chat_path("gpt4o-entra"))


# --- the AzureOpenAI client pointed at tvgate -----------------------------------------------


@pytest.mark.parametrize("route", ["gpt4o", "gpt4o-v1", "plain-gpt"])
def test_the_azure_openai_client_on_tvgate(
    gateway: GatewayProcess, org: AzureOrg, fake_provider: FakeProvider, route: str
) -> None:
    sdk = azure_client(gateway, org)
    answer = sdk.chat.completions.create(
        model=route, messages=[{"role": "user", "content": USER_TEXT}]
    )
    assert answer.choices[0].message.content == f"You said: {USER_TEXT}"
    stream = sdk.chat.completions.create(
        model=route, messages=[{"role": "user", "content": USER_TEXT}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == f"You said: {USER_TEXT}"
    response = sdk.responses.create(model=route, input=USER_TEXT)
    assert response.output_text == f"You said: {USER_TEXT}"
    if route == "plain-gpt":
        sent = fake_provider.requests[-1]
        assert sent.path == "/v1/responses" and sent.query == ""
        assert "api-key" not in sent.headers
        assert org.token not in json.dumps(sent.headers)
    else:
        assert_sent_as(org, route, responses_path(route))


def test_the_azure_openai_client_with_a_deployment_and_no_route(
    gateway: GatewayProcess, org: AzureOrg
) -> None:
    sdk = openai.AzureOpenAI(
        azure_endpoint=gateway.url,
        azure_deployment="gpt4o",
        api_key=org.token,
        api_version="2024-10-21",
        max_retries=0,
    )
    # The path names the route: the body's model is not what routes the call.
    answer = sdk.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": USER_TEXT}]
    )
    assert answer.model == MODEL
    missing = openai.AzureOpenAI(
        azure_endpoint=gateway.url, api_key=org.token, api_version="2024-10-21", max_retries=0
    )
    with pytest.raises(openai.NotFoundError) as raised:
        missing.chat.completions.create(
            model="no-such-route", messages=[{"role": "user", "content": "hi"}]
        )
    assert "no route named 'no-such-route'" in str(raised.value)


# --- Azure's errors --------------------------------------------------------------------------


def test_azure_errors_reach_the_client_in_its_envelope(
    gateway: GatewayProcess, org: AzureOrg
) -> None:
    sdk = client(gateway, org)
    with pytest.raises(openai.BadRequestError) as filtered:
        sdk.chat.completions.create(
            model="gpt4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-scenario": "content_filter"},
        )
    assert filtered.value.code == "content_filter"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(
            model="gpt-missing", messages=[{"role": "user", "content": "hi"}]
        )
    assert "DeploymentNotFound" in str(missing.value.body)
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=org.token, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as translated:
        claude.messages.create(
            model="gpt4o",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-scenario": "content_filter"},
        )
    assert "content management policy" in str(translated.value)


def test_an_entra_id_refusal_is_a_502_naming_its_code(
    gateway: GatewayProcess, org: AzureOrg
) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client(gateway, org).chat.completions.create(
            model="gpt4o-wrong", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == 502
    assert "AADSTS7000215" in str(raised.value) and "invalid_client" in str(raised.value)
    trace = gateway.wait_traces(1, route_name="gpt4o-wrong")[0]
    assert "AADSTS7000215" in trace.error_message


def test_one_token_per_credential_until_it_nears_expiry(
    gateway: GatewayProcess, org: AzureOrg
) -> None:
    sdk = client(gateway, org)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    minted_before = org.fake.token_requests
    bearers = set()
    for _ in range(3):
        sdk.chat.completions.create(model="gpt4o-entra", **chat)  # type: ignore[call-overload]
        bearers.add(last_azure_request(org)["headers"]["authorization"])  # type: ignore[index]
    assert len(bearers) == 1
    assert org.fake.token_requests - minted_before <= 1
    # A token of two seconds is minted again after one (halfway: nearing its expiry).
    org.fake.token_lifetime = 2
    try:
        sdk.chat.completions.create(model="gpt4o-short", **chat)  # type: ignore[call-overload]
        first = org.fake.minted[-1][0]
        time.sleep(1.2)
        sdk.chat.completions.create(model="gpt4o-short", **chat)  # type: ignore[call-overload]
        assert org.fake.minted[-1][0] != first
        assert last_azure_request(org)["headers"]["authorization"] == (  # type: ignore[index]
            "Bearer " + org.fake.minted[-1][0]
        )
    finally:
        org.fake.token_lifetime = 3599


def test_calls_at_once_on_a_new_credential_mint_one_token(
    gateway: GatewayProcess, org: AzureOrg
) -> None:
    sdk = client(gateway, org)
    seen = len(org.fake.requests)  # the fake also served the other database's gateway

    def call(_: int) -> str | None:
        answer = sdk.chat.completions.create(
            model="gpt4o-burst", messages=[{"role": "user", "content": USER_TEXT}]
        )
        return answer.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, range(6)))
    assert answers == [f"You said: {USER_TEXT}"] * 6
    mints = [r for r in org.fake.requests[seen:] if r.path.endswith("/token")]
    assert sum(1 for r in mints if BURST_CLIENT_ID.encode() in r.body) == 1


def test_a_refused_credential_falls_back_to_the_next_route(
    gateway: GatewayProcess, org: AzureOrg
) -> None:
    answer = client(gateway, org).chat.completions.create(
        model="gpt4o-mended", messages=[{"role": "user", "content": USER_TEXT}]
    )
    assert answer.choices[0].message.content == f"You said: {USER_TEXT}"
    deadline = time.monotonic() + 30
    while not (mended := [t for t in gateway.traces() if "gpt4o-mended" in (t.attempts or "")]):
        assert time.monotonic() < deadline, "no trace of the fallback"
        time.sleep(0.2)
    assert mended[-1].route_name == "gpt4o" and mended[-1].outcome == "ok"
    attempts = [a for a in json.loads(mended[-1].attempts) if a["route"] == "gpt4o-mended"]
    assert "AADSTS7000215" in attempts[0]["error"]
    assert org.client_secret not in mended[-1].attempts


# --- the canary ------------------------------------------------------------------------------


def test_no_azure_secret_reaches_any_surface(gateway: GatewayProcess, org: AzureOrg) -> None:
    gateway.bind()
    org_id = Org.get(Org.name == org.name).id
    before = len(gateway.traces(org_id=org_id))
    seen: list[str] = []
    echo = {"x-fake-echo-key": "1"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for route in ("gpt4o", "gpt4o-entra", "gpt4o-v1", "gpt4o-wrong"):
        for scenario in ("normal", "error_500", "content_filter"):
            for stream in (False, True):
                response = httpx2.post(
                    gateway.url + "/v1/chat/completions",
                    json={"model": route, "stream": stream, **chat},
                    headers={
                        "Authorization": "Bearer " + org.token,
                        "x-fake-scenario": scenario,
                        **echo,
                    },
                    timeout=60,
                )
                seen.append(str(response.headers) + response.text)
        response = httpx2.post(
            gateway.url + "/v1/messages",
            json={"model": route, "max_tokens": 16, "stream": True, **chat},
            headers={
                "x-api-key": org.token,
                "anthropic-version": "2023-06-01",
                "x-fake-scenario": "error_event",
                **echo,
            },
            timeout=60,
        )
        seen.append(str(response.headers) + response.text)
    assert org.fake.minted, "an Entra ID token was minted"
    # Every call's trace written (a trace of an earlier test may land meanwhile too).
    deadline = time.monotonic() + 30
    while len(gateway.traces(org_id=org_id)) < before + 4 * 7 and time.monotonic() < deadline:
        time.sleep(0.2)
    everything = "\n".join(seen)
    files = [
        p.read_bytes().decode("latin-1") for p in Path(gateway.data_dir).rglob("*") if p.is_file()
    ]
    surfaces = {
        "a response": everything,
        "the database (traces, keys, audit)": gateway.dump_database(),
        "the log": gateway.log_text(),
        "a file of the data directory (spool, blobs)": "\n".join(files),
    }
    for secret in org.secrets:
        for where, text in surfaces.items():
            assert secret not in text, f"an Azure secret reached {where}"


# --- keys: the CLI and the API ------------------------------------------------------------


def test_the_cli_adds_an_azure_key(gateway: GatewayProcess, org: AzureOrg) -> None:
    api_key = secrets.token_hex(16)
    added = gateway.cli(
        "keys", "add", "az-cli", "--provider", "azure", "--org", org.name,
        "--base-url", "https://contoso.openai.azure.com/openai/",
        "--api-version", "2024-10-21", "--json",
        stdin=json.dumps({"api_key": api_key}, indent=2) + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    view = json.loads(added.stdout)
    assert view["provider"] == "azure"
    assert view["base_url"] == "https://contoso.openai.azure.com"
    assert view["settings"] == {"style": "deployments", "api_version": "2024-10-21"}
    assert view["fingerprint"] == "…" + api_key[-4:]
    assert api_key not in added.stdout + added.stderr
    for args, stdin, said in (
        (["--style", "v2"], {"api_key": api_key}, "invalid choice: 'v2'"),
        (["--api-version", "yesterday"], {"api_key": api_key}, "api_version must be"),
        ([], {"tenant_id": TENANT, "client_id": CLIENT_ID}, "'client_secret' is missing"),
        ([], {"api_key": api_key, "extra": "x"}, "no field 'extra'"),
    ):
        refused = gateway.cli(
            "keys", "add", "az-bad", "--provider", "azure", "--org", org.name,
            "--base-url", "https://contoso.openai.azure.com", *args,
            stdin=json.dumps(stdin) + "\n",
        )  # fmt: skip
        assert refused.returncode != 0
        assert said in refused.stderr, refused.stderr
        assert api_key not in refused.stdout + refused.stderr
    no_endpoint = gateway.cli(
        "keys", "add", "az-bad", "--provider", "azure", "--org", org.name,
        stdin=json.dumps({"api_key": api_key}) + "\n",
    )  # fmt: skip
    assert "needs its resource's endpoint" in no_endpoint.stderr


def test_the_api_adds_an_azure_key(gateway: GatewayProcess, org: AzureOrg) -> None:
    gateway.bind()
    admin = f"admin@{org.name}.test"
    services.add_user(admin, org.name, admin=True)
    token, _ = services.issue_token(admin, org.name)
    secret = {"tenant_id": TENANT, "client_id": CLIENT_ID, "client_secret": org.client_secret}
    added = httpx2.post(
        gateway.url + "/api/v1/keys",
        content=orjson.dumps(
            {
                "name": "az-api",
                "provider": "azure",
                "secret": json.dumps(secret),
                "base_url": "https://contoso.openai.azure.com",
                "settings": {"style": "v1"},
            }
        ),
        headers={"Authorization": "Bearer " + token},
    )
    assert added.status_code == 201, added.text
    assert added.json()["settings"] == {"style": "v1"}
    assert org.client_secret not in added.text
    for settings, said in (
        (["v1"], "settings must be an object"),
        ({"style": "v2"}, "style must be one of deployments, v1"),
        ({"region": "x"}, "no setting 'region'"),
        ({"style": "deployments", "api_version": "latest"}, "needs a dated api_version"),
    ):
        bad = httpx2.post(
            gateway.url + "/api/v1/keys",
            json={
                "name": "az-api2",
                "provider": "azure",
                "secret": json.dumps(secret),
                "base_url": "https://contoso.openai.azure.com",
                "settings": settings,
            },
            headers={"Authorization": "Bearer " + token},
        )
        assert bad.status_code == 400 and said in bad.json()["error"]["message"], bad.text
        assert org.client_secret not in bad.text


def test_an_azure_call_is_named_as_the_genai_conventions_name_it() -> None:
    row: dict[str, object] = {"provider": "azure", "endpoint": "openai.chat"}
    attributes = span_attributes(row)
    assert attributes["gen_ai.provider.name"] == "azure.ai.openai"
