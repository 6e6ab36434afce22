"""Claude through Google Vertex AI: a service account's key, against a real ``tvgate serve``.

The fake Vertex AI (tests/fake_vertex.py) takes only tokens its token endpoint minted for
the test's service accounts (a JWT bearer grant signed with the account's key), its project
and region, and Vertex's body (no ``model``, ``anthropic_version: vertex-2023-10-16``).
Clients are the SDKs with retries off: the ``anthropic`` client and the ``openai`` one on a
Vertex route (Chat translated to Messages), and ``AnthropicVertex`` on tvgate's ``/vertex``
paths, which reach any route. The canary: no secret of a key file, nor a token minted from
it, reaches a response, a trace, the database, the log or a file of the gateway's.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from tests.conftest import ANTHROPIC_SECRET, GatewayProcess, add_test_key, launch_gateway
from tests.fake_provider import FakeProvider
from tests.fake_vertex import ANTHROPIC_VERSION, UNAUTHENTICATED, FakeVertex
from tests.harness import run_cli
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.models import Org, Trace, database
from tvgate.providers.clouds.vertex import secret_strings
from tvgate.traces.pricing import Price, PriceTable

PROMPT: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello vertex"}]
VERTEX_MODEL = "claude-sonnet-4-5@20250929"


@dataclass(frozen=True)
class VertexOrg:
    name: str
    admin: str
    member: str
    #: Each key's service account file, by key name.
    accounts: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def vertex() -> Iterator[FakeVertex]:
    fake = FakeVertex()
    fake.start()
    yield fake
    fake.stop()


def add_vertex_key(org: str, name: str, account: dict[str, str], fake: FakeVertex) -> None:
    """A Vertex key of ``org`` on the fake, its key file as ``gcloud`` writes it (indented)."""
    add_test_key(
        name,
        org,
        fake.url,
        json.dumps(account, indent=2),
        provider="vertex",
        settings={"project": fake.project, "region": fake.region},
    )


@pytest.fixture(scope="module")
def seeded(
    database_url: str, fake_provider: FakeProvider, vertex: FakeVertex
) -> tuple[VertexOrg, dict[str, str]]:
    open_database(database_url)
    migrate(database.obj)
    org = "vx-" + secrets.token_hex(3)
    services.add_user(f"admin@{org}.test", org, admin=True)
    services.add_user(f"dev@{org}.test", org)
    admin, _ = services.issue_token(f"admin@{org}.test", org)
    member, _ = services.issue_token(f"dev@{org}.test", org)
    accounts = {}
    for key in ("gcp", "gcp-fresh", "gcp-short", "gcp-revoked"):
        accounts[key] = vertex.service_account(key)
        add_vertex_key(org, key, accounts[key], vertex)
    vertex.revoke(accounts["gcp-revoked"]["client_email"])
    add_test_key("direct", org, fake_provider.url, ANTHROPIC_SECRET)
    services.add_route("claude-vertex", "gcp", model=VERTEX_MODEL, org_name=org)
    services.add_route("claude-fresh", "gcp-fresh", model=VERTEX_MODEL, org_name=org)
    services.add_route("claude-short", "gcp-short", model=VERTEX_MODEL, org_name=org)
    services.add_route("claude-revoked", "gcp-revoked", model=VERTEX_MODEL, org_name=org)
    services.add_route("claude-direct", "direct", model="claude-upstream-1", org_name=org)
    services.add_route(
        "claude-mended",
        "gcp-revoked",
        model=VERTEX_MODEL,
        org_name=org,
        fallbacks=["claude-direct"],
    )
    # A model Vertex does not have: Google's 404, in its envelope.
    services.add_route("not-on-vertex", "gcp", model="gpt-4o", org_name=org)
    database.close()
    tokens = {"admin": admin, "member": member}
    return VertexOrg(org, admin, member, accounts), tokens


@pytest.fixture(scope="module")
def gateway(
    database_url: str,
    seeded: tuple[VertexOrg, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    with launch_gateway(database_url, tmp_path_factory.mktemp("vertex"), seeded[1]) as gw:
        yield gw


@pytest.fixture(scope="module")
def org(seeded: tuple[VertexOrg, dict[str, str]]) -> VertexOrg:
    return seeded[0]


def messages(gw: GatewayProcess, org: VertexOrg) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=org.member, max_retries=0)


def vertex_client(gw: GatewayProcess, org: VertexOrg, base: str = "/vertex") -> Any:
    """The SDK's own Vertex client, pointed at tvgate's Vertex paths with the tvgate token."""
    return anthropic.AnthropicVertex(
        region="us-east5",
        project_id="any-project",
        access_token=org.member,
        base_url=gw.url + base,
        max_retries=0,
    )


def sent_to_vertex(vertex: FakeVertex, marker: str) -> list[Any]:
    """What tvgate sent the fake Vertex for the calls whose prompt carries ``marker``."""
    return [r for r in vertex.requests if marker.encode() in r.body]


def test_an_anthropic_client_on_a_vertex_route(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    marker = "marker-" + secrets.token_hex(4)
    client = messages(gateway, org)
    answer = client.messages.create(
        model="claude-vertex",
        max_tokens=64,
        messages=[{"role": "user", "content": f"hello {marker}"}],
        extra_headers={"anthropic-beta": "context-1m-2025-08-07", "x-tvgate-session": marker},
    )
    assert (
        answer.content[0].type == "text" and answer.content[0].text == f"You said: hello {marker}"
    )
    with client.messages.stream(
        model="claude-vertex",
        max_tokens=64,
        messages=[{"role": "user", "content": f"again {marker}"}],
        extra_headers={"x-tvgate-session": marker},
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "text"
    assert streamed.content[0].text == f"You said: again {marker}"
    plain, streaming = sent_to_vertex(vertex, marker)
    base = f"/v1/projects/{vertex.project}/locations/{vertex.region}/publishers/anthropic/models/"
    assert plain.path == base + VERTEX_MODEL + ":rawPredict"
    assert streaming.path == base + VERTEX_MODEL + ":streamRawPredict"
    sent = plain.json()
    assert "model" not in sent and sent["anthropic_version"] == ANTHROPIC_VERSION
    assert sent["anthropic_beta"] == ["context-1m-2025-08-07"]
    assert plain.headers["authorization"].startswith("Bearer ya29.")
    assert "x-api-key" not in plain.headers
    traces = gateway.wait_traces(2, session_id=marker)
    for trace in traces:
        assert (trace.provider, trace.route_name, trace.key_name) == (
            "vertex",
            "claude-vertex",
            "gcp",
        )
        assert trace.upstream_model == VERTEX_MODEL and trace.outcome == "ok"
        assert trace.input_tokens > 0 and trace.output_tokens > 0
        assert trace.cache_read_tokens > 0
        # Priced as the Anthropic model it is (claude-sonnet-4*).
        assert trace.cost_usd > 0


def test_a_chat_client_on_a_vertex_route(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    marker = "chat-" + secrets.token_hex(4)
    client = openai.OpenAI(base_url=gateway.openai_url, api_key=org.member, max_retries=0)
    answer = client.chat.completions.create(
        model="claude-vertex", messages=[{"role": "user", "content": f"hi {marker}"}]
    )
    assert answer.choices[0].message.content == f"You said: hi {marker}"
    chunks = client.chat.completions.create(
        model="claude-vertex",
        messages=[{"role": "user", "content": f"yo {marker}"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"You said: yo {marker}"
    plain, streaming = sent_to_vertex(vertex, marker)
    assert plain.path.endswith(":rawPredict") and streaming.path.endswith(":streamRawPredict")
    assert all("model" not in r.json() for r in (plain, streaming))


def test_the_sdks_vertex_client_reaches_any_route_through_the_vertex_paths(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex, fake_provider: FakeProvider
) -> None:
    marker = "sdk-" + secrets.token_hex(4)
    for base in ("/vertex", "/vertex/v1"):
        client = vertex_client(gateway, org, base)
        for route in ("claude-vertex", "claude-direct"):
            prompt = f"{route} {base} {marker}"
            answer = client.messages.create(
                model=route, max_tokens=32, messages=[{"role": "user", "content": prompt}]
            )
            assert answer.content[0].type == "text"
            assert answer.content[0].text.startswith("You said: claude-")
            with client.messages.stream(
                model=route, max_tokens=32, messages=[{"role": "user", "content": prompt}]
            ) as stream:
                assert stream.get_final_message().content[0].type == "text"
    # On the Vertex route, Vertex's body; on the Anthropic one, the Anthropic API's.
    assert len(sent_to_vertex(vertex, marker)) == 4
    for request in sent_to_vertex(vertex, marker):
        assert request.json()["anthropic_version"] == ANTHROPIC_VERSION
    direct = [r for r in fake_provider.requests if marker.encode() in r.body]
    assert len(direct) == 4
    for request in direct:
        body = request.json()
        assert body["model"] == "claude-upstream-1"
        assert "anthropic_version" not in body and "anthropic_beta" not in body
        assert request.headers["anthropic-version"] == "2023-06-01"
    words: list[anthropic.types.MessageParam] = [{"role": "user", "content": "count these"}]
    count = vertex_client(gateway, org).messages.count_tokens(model="claude-vertex", messages=words)
    # As the Anthropic API counts it, through the Vertex AI route.
    direct_count = messages(gateway, org).messages.count_tokens(
        model="claude-direct", messages=words
    )
    assert count.input_tokens == direct_count.input_tokens > 0
    (counted,) = [r for r in vertex.requests if r.path.endswith("count-tokens:rawPredict")][-1:]
    assert counted.json()["model"] == VERTEX_MODEL


def test_the_vertex_paths_refuse_bad_input_in_anthropics_envelope(
    gateway: GatewayProcess, org: VertexOrg
) -> None:
    path = "/vertex/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
    body = {"anthropic_version": ANTHROPIC_VERSION, "max_tokens": 8, "messages": PROMPT}
    auth = {"authorization": f"Bearer {org.member}"}

    def post(model: str, sent: object, headers: dict[str, str]) -> tuple[int, Any]:
        response = httpx2.post(gateway.url + path + model, json=sent, headers=headers, timeout=60)
        return response.status_code, response.json()

    refusals = [
        (post("claude-vertex:rawPredict", body, {}), 401, "authentication_error"),
        (post("nope:rawPredict", body, auth), 404, "not_found_error"),
        (post("claude-vertex:rawPredict", [1], auth), 400, "invalid_request_error"),
        (
            post("claude-vertex:rawPredict", {**body, "anthropic_beta": "one"}, auth),
            400,
            "invalid_request_error",
        ),
        (post("count-tokens:rawPredict", body, auth), 400, "invalid_request_error"),
    ]
    for (status, answer), expected, kind in refusals:
        assert status == expected and answer["type"] == "error", answer
        assert answer["error"]["type"] == kind, answer
    assert "no route named 'nope'" in refusals[1][0][1]["error"]["message"]
    assert "anthropic_beta must be a list" in refusals[3][0][1]["error"]["message"]
    assert "no 'model'" in refusals[4][0][1]["error"]["message"]


def test_a_token_is_minted_once_for_many_calls_at_once(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    email = org.accounts["gcp-fresh"]["client_email"]
    assert vertex.mints.count(email) == 0
    client = messages(gateway, org)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.messages.create(model="claude-fresh", max_tokens=8, messages=PROMPT)
        except BaseException as exc:  # noqa: BLE001 - told below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    client.messages.create(model="claude-fresh", max_tokens=8, messages=PROMPT)
    assert vertex.mints.count(email) == 1


def test_a_token_near_its_expiry_is_minted_anew(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    email = org.accounts["gcp-short"]["client_email"]
    vertex.expires_in = 240  # under the 5 minutes tvgate keeps a token for
    try:
        client = messages(gateway, org)
        for _ in range(3):
            client.messages.create(model="claude-short", max_tokens=8, messages=PROMPT)
    finally:
        vertex.expires_in = 3600
    assert vertex.mints.count(email) == 3


def test_a_refused_grant_is_a_502_and_a_fallback_serves(
    gateway: GatewayProcess, org: VertexOrg
) -> None:
    client = messages(gateway, org)
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(model="claude-revoked", max_tokens=8, messages=PROMPT)
    assert refused.value.status_code == 502
    assert "access token could not be minted: invalid_grant: Invalid JWT Signature." in str(
        refused.value
    )
    answer = client.messages.create(model="claude-mended", max_tokens=8, messages=PROMPT)
    assert answer.content[0].type == "text"


def test_vertex_errors_come_in_the_clients_envelope(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    client = messages(gateway, org)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="not-on-vertex", max_tokens=8, messages=PROMPT)
    assert missing.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": f"Publisher Model `projects/{vertex.project}/locations/{vertex.region}"
            "/publishers/anthropic/models/gpt-4o` not found.",
        },
    }
    # The streaming method's error is a list of Google's envelopes.
    with pytest.raises(anthropic.NotFoundError) as streamed:
        with client.messages.stream(model="not-on-vertex", max_tokens=8, messages=PROMPT) as s:
            s.get_final_message()
    assert "gpt-4o` not found." in str(streamed.value)
    chat = openai.OpenAI(base_url=gateway.openai_url, api_key=org.member, max_retries=0)
    with pytest.raises(openai.NotFoundError) as chat_missing:
        chat.chat.completions.create(
            model="not-on-vertex", messages=[{"role": "user", "content": "hi"}]
        )
    assert "gpt-4o` not found." in str(chat_missing.value)
    # The model's own errors (Anthropic's envelope, which Vertex passes on) as they came.
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(
            model="claude-vertex",
            max_tokens=8,
            messages=PROMPT,
            extra_headers={"x-fake-scenario": "error_429"},
        )
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_a_token_vertex_refuses_is_minted_anew(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    email = org.accounts["gcp"]["client_email"]
    client = messages(gateway, org)
    client.messages.create(model="claude-vertex", max_tokens=8, messages=PROMPT)
    minted = vertex.mints.count(email)
    vertex.expire_tokens()  # before tvgate's clock says so (revoked, or the clocks differ)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model="claude-vertex", max_tokens=8, messages=PROMPT)
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": UNAUTHENTICATED},
    }
    client.messages.create(model="claude-vertex", max_tokens=8, messages=PROMPT)
    assert vertex.mints.count(email) == minted + 1


def add_by_cli(
    env: dict[str, str], org: VertexOrg, name: str, region: str, key_file: dict[str, str]
) -> Any:
    """``tvgate keys add NAME --provider vertex …`` with the key file on standard input."""
    project = key_file.get("project_id", "")
    return run_cli(
        env,
        *("keys", "add", name, "--org", org.name, "--provider", "vertex", "--json"),
        *("--project", project, "--region", region),
        stdin=json.dumps(key_file, indent=2) + "\n",
    )


def test_cli_and_api_take_a_vertex_key(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    account = vertex.service_account("cli")
    added = add_by_cli(gateway.env, org, "gcp-cli", "europe-west1", account)
    assert added.returncode == 0, added.stderr
    view = json.loads(added.stdout)
    assert view["base_url"] == "https://europe-west1-aiplatform.googleapis.com"
    assert view["settings"] == {"project": vertex.project, "region": "europe-west1"}
    assert view["fingerprint"] == "…" + account["private_key_id"][-4:]
    for secret in secret_strings(account):
        assert secret not in added.stdout + added.stderr
    broken = {k: v for k, v in account.items() if k != "private_key"}
    refused = add_by_cli(gateway.env, org, "gcp-broken", "us-east5", broken)
    assert refused.returncode != 0
    assert "the service account JSON has no 'private_key'" in refused.stderr
    assert account["private_key_id"] not in refused.stdout + refused.stderr
    # The token endpoint is a URL the key's secret goes to: checked as a base URL is.
    public = add_by_cli(
        {**gateway.env, "TVGATE_ALLOW_PRIVATE_UPSTREAMS": "false"},
        org,
        "gcp-private",
        "us-east5",
        vertex.service_account("private"),
    )
    assert public.returncode != 0 and "token endpoint is refused" in public.stderr
    api = httpx2.Client(base_url=gateway.url, headers={"authorization": f"Bearer {org.admin}"})

    def add_by_api(name: str, project: str, region: str) -> httpx2.Response:
        secret = json.dumps(vertex.service_account(name))
        settings = {"project": project, "region": region}
        body = {"name": name, "provider": "vertex", "secret": secret, "settings": settings}
        return api.post("/api/v1/keys", json=body)

    created = add_by_api("gcp-api", vertex.project, "global")
    assert created.status_code == 201, created.text
    assert created.json()["base_url"] == "https://aiplatform.googleapis.com"
    assert "private_key" not in created.text
    bad = add_by_api("gcp-bad", "Not A Project/..", "us-east5")
    assert bad.status_code == 400 and "project" in bad.json()["error"]["message"]


def _xsrf(page: httpx2.Response) -> str:
    found = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


@contextmanager
def signed_in(gateway: GatewayProcess, token: str) -> Iterator[httpx2.Client]:
    """A browser signed in to the web UI with an admin's tvgate token."""
    with httpx2.Client(base_url=gateway.url, follow_redirects=False, timeout=30) as browser:
        login = browser.get("/ui/login")
        answer = browser.post("/ui/login", data={"_xsrf": _xsrf(login), "token": token})
        assert answer.status_code == 302, answer.text
        yield browser


def test_the_web_ui_adds_a_vertex_key(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    account = vertex.service_account("ui")
    with signed_in(gateway, org.admin) as browser:
        form = {
            "_xsrf": _xsrf(browser.get("/ui/keys")),
            "name": "gcp-ui",
            "provider": "vertex",
            # Pasted into the password field, which keeps no line breaks: still the JSON.
            "secret": json.dumps(account),
            "project": vertex.project,
            "region": "europe-west4",
            "max_concurrent": "0",
            "available_to_all": "on",
        }
        added = browser.post("/ui/keys", data=form)
        assert added.status_code in (302, 303), added.text
        shown = browser.get("/ui/keys/gcp-ui").text
    assert "europe-west4-aiplatform.googleapis.com" in shown and vertex.project in shown
    assert "…" + account["private_key_id"][-4:] in shown
    for secret in secret_strings(account):
        assert secret not in shown


def _forms(secret: str) -> list[str]:
    """A secret and the encodings a leak could take (JSON-escaped, base64)."""
    return [secret, json.dumps(secret)[1:-1], base64.b64encode(secret.encode()).decode()]


def test_canary_no_key_file_secret_nor_minted_token_leaks(
    gateway: GatewayProcess, org: VertexOrg, vertex: FakeVertex
) -> None:
    """Every secret string of the key files and every token minted from them: never in an
    answer (a provider echoing the token it was sent included), a trace (its fields and its
    bodies), the database, the log or any file of the gateway's (spool, content)."""
    marker = "canary-" + secrets.token_hex(4)
    client = messages(gateway, org)
    headers = {"x-fake-echo-key": "1", "x-tvgate-session": marker}
    seen: list[str] = []
    answer = client.messages.with_raw_response.create(
        model="claude-vertex", max_tokens=8, messages=PROMPT, extra_headers=headers
    )
    seen += [answer.http_response.text, json.dumps(dict(answer.headers))]
    for scenario in ("error_500", "error_event"):
        response = httpx2.post(
            gateway.url + "/v1/messages",
            json={"model": "claude-vertex", "max_tokens": 8, "stream": True, "messages": PROMPT},
            headers={
                "x-api-key": org.member,
                "anthropic-version": "2023-06-01",
                "x-fake-scenario": scenario,
                **headers,
            },
            timeout=60,
        )
        seen += [response.text, json.dumps(dict(response.headers))]
    for route in ("claude-revoked", "not-on-vertex"):
        response = httpx2.post(
            gateway.url + "/v1/messages",
            json={"model": route, "max_tokens": 8, "messages": PROMPT},
            headers={"x-api-key": org.member, "x-tvgate-session": marker},
            timeout=60,
        )
        seen.append(response.text)
    # The fake did echo the token: the canary would see it if tvgate let it through.
    echoing = [r for r in vertex.requests if r.headers.get("x-fake-echo-key")]
    assert echoing and all(r.headers["authorization"].startswith("Bearer ya29.") for r in echoing)
    traces = gateway.wait_traces(5, session_id=marker)
    api = httpx2.Client(base_url=gateway.url, headers={"authorization": f"Bearer {org.admin}"})
    for trace in traces:
        seen.append(api.get(f"/api/v1/traces/{trace.id}").text)
    seen.append(api.get("/api/v1/keys").text)
    gateway.bind()
    seen.append(gateway.dump_database())
    seen.append(gateway.log_text())
    seen += [
        path.read_bytes().decode("latin-1")
        for path in Path(gateway.data_dir).rglob("*")
        if path.is_file()
    ]
    forbidden = [token for token in vertex.tokens]
    for account in org.accounts.values():
        # What the scrubber masks, and what no one is ever sent: the key as written, each
        # of its lines, the account's email and id.
        forbidden += secret_strings(account)
        forbidden += [account["private_key"], account["client_email"], account["client_id"]]
        forbidden += [line for line in account["private_key"].splitlines() if len(line) > 40]
    assert len(forbidden) > 10
    for text in seen:
        for secret in forbidden:
            for form in _forms(secret):
                assert form not in text
    org_id = Org.get(Org.name == org.name).id
    assert Trace.select().where(Trace.org_id == org_id).count() >= 5


def test_vertex_model_ids_are_priced_as_the_anthropic_models() -> None:
    sonnet = Price("claude-sonnet-4*", 3.0, 15.0, 0.3, 3.75)
    exact = Price("claude-sonnet-4-5-20250929", 2.0, 10.0, 0.2, 2.5)
    own_id = Price("claude-haiku-4-5@20251001", 0.5, 2.5, 0.05, 0.6)
    table = PriceTable([sonnet, exact, own_id])
    assert table.find(1, "claude-sonnet-4-5@20250929") == exact
    assert table.find(1, "claude-sonnet-4@20250514") == sonnet
    assert table.find(1, "claude-haiku-4-5@20251001") == own_id
    assert table.find(1, "claude-opus-4-5@20251101") is None
    # Counted as Anthropic counts (input_tokens leaves the cached ones out).
    assert table.cost(1, "vertex", "claude-sonnet-4-5@20250929", 1000, 100, 500, 0) == round(
        (1000 * 2.0 + 100 * 10.0 + 500 * 0.2) / 1_000_000, 8
    )
