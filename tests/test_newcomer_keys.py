"""Issue 22.3, 22.5 and 22.6 against the real gateway: a key's base URL changes in place,
write endpoints refuse fields they do not take, and a key's "Last used" is written.

22.3: a key's base URL could only be changed by deleting the key and every route on it.
``tvgate keys set NAME --base-url``, ``PATCH /api/v1/keys/{name}`` and the key's page
now change it, with the checks of ``keys add`` (refusals audited too), and the proxy of
the process that made the change calls the new URL at once. The delete refusal names
``--force``. 22.5: ``PUT /api/v1/prices/{model}`` with misspelt or missing fields stored
$0; every write endpoint of the OpenAPI document now answers 400 naming the field.
22.6: ``ProviderKey.last_used_at`` was never written.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from tests.conftest import (
    GatewayProcess,
    add_fake_key,
    beside,
)
from tests.fake_provider import FakeProvider
from tests.harness import PRIVATE_UPSTREAMS_OFF
from tvgate import services
from tvgate.models import AuditEvent, ModelPrice, Org, ProviderKey

ADMIN = "admin@acme.test"
MEMBER = "dev@acme.test"
PASSWORD = "correct horse battery staple"
UNKNOWN = "zz_not_a_field"


def _hex() -> str:
    return uuid.uuid4().hex[:8]


def _api(gw: GatewayProcess, email: str = ADMIN) -> httpx2.Client:
    return httpx2.Client(
        base_url=gw.url + "/api/v1",
        headers={"Authorization": f"Bearer {gw.tokens[email]}"},
        timeout=30,
    )


def _cli(gw: GatewayProcess, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``tvgate`` on the gateway's database, with ``env`` over the gateway's settings."""
    return subprocess.run(
        [sys.executable, "-m", "tvgate.cli", *args],
        capture_output=True,
        text=True,
        env={**gw.env, **env},
        timeout=60,
        check=False,
    )


def _key_with_route(gw: GatewayProcess, fake: FakeProvider, base_url: str) -> tuple[str, str, str]:
    """A new acme key on ``base_url`` with a route of its own: (key, route, secret)."""
    gw.bind()
    key, route = f"nk-{_hex()}", f"nk-route-{_hex()}"
    secret = add_fake_key(fake, "acme", key, base_url)
    services.add_route(route, key, model="claude-upstream-1", org_name="acme")
    # Made in this process: the gateway has it once its route snapshot is refreshed.
    for _ in range(80):
        models = httpx2.get(
            gw.url + "/v1/models", headers={"x-api-key": gw.tokens[ADMIN]}, timeout=30
        )
        if route in models.text:
            break
        time.sleep(0.25)
    return key, route, secret


#: What the fake provider answers under each base URL of these tests (its
#: ``/scenario/<name>`` prefixes), as the answer's content block types: which base URL a
#: call went to shows in the answer.
NORMAL, THINKING, TOOL_USE = ["text"], ["thinking", "text"], ["text", "tool_use"]


def _call(gw: GatewayProcess, route: str) -> list[str]:
    """One call through the gateway with the official SDK: the answer's block types."""
    with anthropic.Anthropic(base_url=gw.url, api_key=gw.tokens[ADMIN], max_retries=0) as client:
        answer = client.messages.create(
            model=route, max_tokens=20, messages=[{"role": "user", "content": "hello"}]
        )
    return [block.type for block in answer.content]


def _sent_with(fake: FakeProvider, secret: str) -> int:
    """How many requests reached the fake provider with ``secret``."""
    return sum(
        1
        for r in list(fake.requests)
        if secret in (r.headers.get("x-api-key"), r.headers.get("authorization", "")[7:])
    )


def _stored_base_url(gw: GatewayProcess, key: str) -> str:
    gw.bind()
    return str(ProviderKey.get(ProviderKey.name == key).base_url)


def _key_audit(gw: GatewayProcess, key: str) -> list[AuditEvent]:
    """The audit events of changes (and refused changes) of ``key``, oldest first."""
    gw.bind()
    acme = Org.get(Org.name == "acme")
    return list(
        AuditEvent.select()
        .where(
            (AuditEvent.org_id == acme.id)
            & AuditEvent.action.in_(["update key", "change key"])
            & (AuditEvent.target == key)
        )
        .order_by(AuditEvent.id)
    )


def _always_refused(gw: GatewayProcess) -> dict[str, str]:
    """Base URLs refused even with private upstreams allowed: what the refusal says."""
    return {
        gw.url: "this gateway itself",
        "http://localhost:" + gw.url.rsplit(":", 1)[1] + "/v1": "this gateway itself",
        "https://api.example.com/v1?x=1": "query or fragment",
        "https://api.example.com/#frag": "query or fragment",
        "https://user:hunter2-secret@api.example.com": "credentials",
        "ftp://api.example.com": "http(s)",
    }


#: Refused while private upstreams are not allowed (the settings' default).
PRIVATE_REFUSED = {
    "https://10.1.2.3/v1": "private address",
    "https://localhost/v1": "private address",
    "http://api.example.com": "must be https",
}


@pytest.fixture(autouse=True)
def no_keys_left(gateway: GatewayProcess) -> Iterator[None]:
    """The keys a test adds to acme on the shared gateway go with it, with their routes:
    other modules assert the exact list of acme's routes."""
    yield
    gateway.bind()
    added = (
        ProviderKey.select(ProviderKey.name)
        .join(Org)
        .where((Org.name == "acme") & ProviderKey.name.startswith("nk-"))
    )
    for key in list(added):
        services.delete_key(key.name, org_name="acme", force=True)


@pytest.fixture(scope="module")
def strict(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """A second gateway on the same database with private upstreams refused (the default)."""
    with beside(gateway, **PRIVATE_UPSTREAMS_OFF) as gw:
        yield gw


# --- 22.3: a key's base URL ---


def test_cli_keys_set_base_url_moves_the_calls_and_is_audited(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    old, new = fake_provider.url + "/scenario/normal", fake_provider.url + "/scenario/thinking"
    key, route, secret = _key_with_route(gateway, fake_provider, old)
    assert _call(gateway, route) == NORMAL

    done = _cli(gateway, "keys", "set", key, "--org", "acme", "--base-url", new + "/")
    assert done.returncode == 0, done.stderr
    assert f"calls go to {new}" in done.stdout
    assert _stored_base_url(gateway, key) == new
    # Another process (the CLI) changed it: the gateway's route snapshot is refreshed
    # within its cache TTL (1 s here); the route and its name stay.
    blocks = NORMAL
    for _ in range(40):
        blocks = _call(gateway, route)
        if blocks != NORMAL:
            break
        time.sleep(0.25)
    assert blocks == THINKING
    assert _sent_with(fake_provider, secret) >= 2
    changes = [json.loads(e.change) for e in _key_audit(gateway, key) if e.allowed]
    assert changes == [{"base_url": [old, new]}]
    assert all(e.actor == "operator (command line)" for e in _key_audit(gateway, key))


def test_cli_keys_set_base_url_refuses_what_keys_add_refuses(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    old = fake_provider.url + "/scenario/normal"
    key, _route, _secret = _key_with_route(gateway, fake_provider, old)
    # The gateway's settings allow private upstreams; with the operator's switch off (its
    # default), private and plain-http upstreams are refused too.
    strict_env = {"TVGATE_ALLOW_PRIVATE_UPSTREAMS": "false"}
    cases: list[tuple[str, str, dict[str, str]]] = [
        (url, reason, {}) for url, reason in _always_refused(gateway).items()
    ]
    cases += [(url, reason, strict_env) for url, reason in PRIVATE_REFUSED.items()]
    for url, reason, env in cases:
        done = _cli(gateway, "keys", "set", key, "--org", "acme", "--base-url", url, **env)
        assert done.returncode == 1, (url, done.stdout, done.stderr)
        assert reason in done.stderr, (url, done.stderr)
        assert "Traceback" not in done.stderr
    assert _stored_base_url(gateway, key) == old
    events = _key_audit(gateway, key)
    assert len(events) == len(cases) and not any(e.allowed for e in events)
    assert all(json.loads(e.change)["refused"] for e in events)
    assert "hunter2-secret" not in "".join(e.change for e in events)


def test_api_patch_base_url_is_in_force_at_once_and_checked(
    gateway: GatewayProcess, strict: GatewayProcess, fake_provider: FakeProvider
) -> None:
    old, new = fake_provider.url + "/scenario/normal", fake_provider.url + "/scenario/tool_use"
    key, route, secret = _key_with_route(gateway, fake_provider, old)
    assert _call(gateway, route) == NORMAL
    with _api(gateway) as admin, _api(gateway, MEMBER) as member, _api(strict) as strict_admin:
        changed = admin.patch(f"/keys/{key}", json={"base_url": new})
        assert changed.status_code == 200, changed.text
        assert changed.json()["base_url"] == new
        assert "fingerprint" in changed.json() and secret not in changed.text
        # The process that made the change calls the new URL with its very next call.
        assert _call(gateway, route) == TOOL_USE
        assert _sent_with(fake_provider, secret) == 2
        refused = _always_refused(gateway) | {new + "?q=1": "query or fragment"}
        cases = [(url, reason, admin) for url, reason in refused.items()]
        cases += [(url, reason, strict_admin) for url, reason in PRIVATE_REFUSED.items()]
        for url, reason, client in cases:
            answer = client.patch(f"/keys/{key}", json={"base_url": url})
            assert answer.status_code == 400, (url, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "invalid_request" and reason in error["message"], url
        denied = member.patch(f"/keys/{key}", json={"base_url": old})
        assert denied.status_code == 403, denied.text
        assert admin.patch(f"/keys/{key}", json={"base_url": 5}).status_code == 400
    assert _stored_base_url(gateway, key) == new
    events = _key_audit(gateway, key)
    assert [json.loads(e.change) for e in events if e.allowed] == [{"base_url": [old, new]}]
    refusals = [e for e in events if not e.allowed]
    assert len(refusals) == len(cases) + 1
    assert {e.actor for e in refusals} == {ADMIN, MEMBER}
    assert "hunter2-secret" not in "".join(e.change for e in events)


def test_a_users_own_key_is_only_redirected_by_its_owner(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    """The owner's secret goes wherever the base URL points: an admin may switch a
    member's key off or delete it, not send it elsewhere."""
    org = f"nk-{_hex()}"
    gateway.bind()
    services.add_user(f"admin@{org}.test", org, admin=True)
    services.add_user(f"dev@{org}.test", org)
    services.set_policy(org, allow_user_keys=True)
    tokens = {
        who: services.issue_token(f"{who}@{org}.test", org, name="tests")[0]
        for who in ("admin", "dev")
    }

    def client(who: str) -> httpx2.Client:
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        return httpx2.Client(base_url=gateway.url + "/api/v1", headers=headers, timeout=30)

    old, new = fake_provider.url, fake_provider.url + "/scenario/normal"
    mine = f"mine-{_hex()}"
    with client("admin") as admin, client("dev") as dev:
        added = dev.post(
            "/keys",
            json={
                "name": mine,
                "provider": "anthropic",
                "secret": "sk-ant-api03-" + _hex(),
                "base_url": old,
            },
        )
        assert added.status_code == 201, added.text
        refused = admin.patch(f"/keys/{mine}", json={"base_url": "https://collector.example.com"})
        assert refused.status_code == 403, refused.text
        assert "owner" in refused.json()["error"]["message"]
        assert _stored_base_url(gateway, mine) == old
        changed = dev.patch(f"/keys/{mine}", json={"base_url": new})
        assert changed.status_code == 200, changed.text
        assert changed.json()["base_url"] == new
    gateway.bind()
    events = AuditEvent.select().where(
        (AuditEvent.org_id == Org.get(Org.name == org).id) & (AuditEvent.target == mine)
    )
    assert {(e.actor, e.action, e.allowed) for e in events} >= {
        (f"admin@{org}.test", "update key", False),
        (f"dev@{org}.test", "update key", True),
    }


@contextlib.contextmanager
def _sign_in(gw: GatewayProcess) -> Iterator[httpx2.Client]:
    """A browser signed in as a new local admin of acme."""
    gw.bind()
    email = f"web-{_hex()}@acme.test"
    services.add_user(email, "acme", admin=True, password=PASSWORD)
    with httpx2.Client(base_url=gw.url, follow_redirects=False, timeout=30) as client:
        page = client.get("/ui/login")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        assert xsrf is not None
        signed = client.post(
            "/ui/login", data={"_xsrf": xsrf.group(1), "email": email, "password": PASSWORD}
        )
        assert signed.status_code == 302, signed.text
        yield client


def _form_xsrf(page: str, form_id: str) -> str:
    form = re.search(rf'<form[^>]*id="{form_id}".*?</form>', page, re.S)
    assert form is not None, f"no form {form_id} on the page"
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.group(0))
    assert xsrf is not None
    return xsrf.group(1)


def test_ui_key_page_changes_the_base_url(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    old, new = fake_provider.url + "/scenario/normal", fake_provider.url + "/scenario/thinking"
    key, route, secret = _key_with_route(gateway, fake_provider, old)
    with _sign_in(gateway) as browser:
        page = browser.get(f"/ui/keys/{key}")
        assert page.status_code == 200
        xsrf = _form_xsrf(page.text, "key-base-url")
        form = {"_xsrf": xsrf, "action": "base_url"}
        bad = browser.post(f"/ui/keys/{key}", data={**form, "base_url": gateway.url})
        assert bad.status_code == 400 and "this gateway itself" in bad.text
        # A form without its XSRF token changes nothing.
        forged = browser.post(f"/ui/keys/{key}", data={"action": "base_url", "base_url": new})
        assert forged.status_code == 403
        assert _stored_base_url(gateway, key) == old
        saved = browser.post(f"/ui/keys/{key}", data={**form, "base_url": new})
        assert saved.status_code == 302, saved.text
        assert new in browser.get(f"/ui/keys/{key}").text
    assert _stored_base_url(gateway, key) == new
    assert _call(gateway, route) == THINKING
    assert _sent_with(fake_provider, secret) == 1
    assert [json.loads(e.change) for e in _key_audit(gateway, key) if e.allowed] == [
        {"base_url": [old, new]}
    ]


def test_chat_only_is_set_by_the_api_and_the_ui_and_only_for_openai(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    """A key on a Chat Completions-only upstream (vLLM, Ollama): what the proxy does with
    it is tests/test_translate_responses_wired.py's."""
    key = f"nk-{_hex()}"
    body = {"provider": "openai", "secret": "sk-proj-" + _hex(), "chat_only": True}
    with _api(gateway) as admin:
        refused = admin.post("/keys", json={**body, "name": key, "provider": "anthropic"})
        assert refused.status_code == 400 and "chat_only" in refused.text, refused.text
        added = admin.post(
            "/keys", json={**body, "name": key, "base_url": fake_provider.openai_url}
        )
        assert added.status_code == 201, added.text
        assert added.json()["chat_only"] is True
        changed = admin.patch(f"/keys/{key}", json={"chat_only": False})
        assert changed.status_code == 200 and changed.json()["chat_only"] is False
    assert [json.loads(e.change) for e in _key_audit(gateway, key) if e.allowed] == [
        {"chat_only": [True, False]}
    ]
    other = f"nk-{_hex()}"
    with _sign_in(gateway) as browser:
        form = {
            "_xsrf": _form_xsrf(browser.get("/ui/keys").text, "add-key"),
            "name": other,
            "provider": "openai",
            "base_url": fake_provider.openai_url,
            "secret": "sk-proj-" + _hex(),
            "available_to_all": "on",
            "chat_only": "on",
        }
        assert browser.post("/ui/keys", data=form).status_code == 302
        assert "Chat Completions only" in browser.get(f"/ui/keys/{other}").text
        assert "Chat Completions only" not in browser.get(f"/ui/keys/{key}").text
    listed = _cli(gateway, "keys", "list", "--org", "acme", "--json")
    shown = {k["name"]: k["chat_only"] for k in json.loads(listed.stdout)}
    assert (shown[key], shown[other]) == (False, True)


def test_an_azure_key_is_added_from_the_ui(gateway: GatewayProcess) -> None:
    """The add-key form takes an Azure OpenAI key's settings; what the proxy does with it is
    tests/test_cloud_azure.py's."""
    key, api_key = f"nk-{_hex()}", _hex()
    with _sign_in(gateway) as browser:
        form = {
            "_xsrf": _form_xsrf(browser.get("/ui/keys").text, "add-key"),
            "name": key,
            "provider": "azure",
            "base_url": "https://contoso.openai.azure.com",
            "secret": json.dumps({"api_key": api_key}),
            "available_to_all": "on",
            "style": "v1",
            "api_version": "",
        }
        assert browser.post("/ui/keys", data=form).status_code == 302
        page = browser.get(f"/ui/keys/{key}").text
        assert "Settings" in page and "v1" in page
        assert api_key not in page and api_key not in browser.get("/ui/keys").text
        refused = browser.post("/ui/keys", data={**form, "name": key + "-2", "style": "v2"})
        assert "style must be one of" in refused.text


def test_key_delete_refusal_names_the_force_flag(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    key, route, _secret = _key_with_route(gateway, fake_provider, fake_provider.url)
    done = _cli(gateway, "keys", "delete", key, "--org", "acme")
    assert done.returncode == 1
    assert route in done.stderr and "--force" in done.stderr
    assert "(force)" not in done.stderr
    forced = _cli(gateway, "keys", "delete", key, "--org", "acme", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"deleted key {key} and routes {route}" in forced.stdout


# --- 22.5: unknown and missing fields ---


def _org_prices(gw: GatewayProcess, model: str) -> list[ModelPrice]:
    gw.bind()
    return list(ModelPrice.select().where(ModelPrice.model == model))


def test_put_price_with_wrong_or_missing_fields_stores_nothing(gateway: GatewayProcess) -> None:
    model = f"nk-model-{_hex()}"
    with _api(gateway) as admin:
        # Half a price would charge $0 for every output token.
        half = admin.put(f"/prices/{model}", json={"input_per_mtok": 3})
        assert half.status_code == 400, half.text
        assert "missing required fields: output_per_mtok" in half.json()["error"]["message"]
        wrong = admin.put(f"/prices/{model}", json={"input": 3, "output": 15})
        assert wrong.status_code == 400, wrong.text
        message = wrong.json()["error"]["message"]
        assert "unknown fields: input, output" in message and "input_per_mtok" in message
        assert _org_prices(gateway, model) == []
        assert model not in admin.get("/prices").text
        good = admin.put(f"/prices/{model}", json={"input_per_mtok": 3, "output_per_mtok": 15})
        assert good.status_code == 200, good.text
    [stored] = _org_prices(gateway, model)
    assert (stored.input_per_mtok, stored.output_per_mtok) == (3.0, 15.0)


def _write_operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("post", "put", "patch")
    ]


def _valid_bodies(gw: GatewayProcess, fake: FakeProvider) -> dict[tuple[str, str], Any]:
    """A body each write endpoint accepts, with the path it is sent to."""
    gw.bind()
    key, route, _secret = _key_with_route(gw, fake, fake.url)
    route_id = next(r.id for r in services.list_routes("acme") if r.name == route)
    retention = services.get_policy("acme").retention_days
    return {
        ("post", "/api/v1/routes"): ("/routes", {"name": f"nk-{_hex()}", "key": key}),
        ("patch", "/api/v1/routes/{route_id}"): (f"/routes/{route_id}", {"description": "d"}),
        ("post", "/api/v1/keys"): (
            "/keys",
            {
                "name": f"nk-{_hex()}",
                "provider": "anthropic",
                "secret": "sk-ant-api03-" + uuid.uuid4().hex,
                "base_url": fake.url,
            },
        ),
        ("patch", "/api/v1/keys/{name}"): (f"/keys/{key}", {"max_concurrent": 0}),
        ("post", "/api/v1/keys/{name}/grants"): (f"/keys/{key}/grants", {"users": [MEMBER]}),
        ("patch", "/api/v1/users/{email}"): (f"/users/{MEMBER}", {"role": "member"}),
        ("patch", "/api/v1/policy"): ("/policy", {"retention_days": retention}),
        ("post", "/api/v1/budgets"): (
            "/budgets",
            {
                "scope": "route",
                "subject": route,
                "metric": "tokens",
                "period": "day",
                "amount": 1e9,
            },
        ),
        ("post", "/api/v1/limits"): (
            "/limits",
            {"scope": "route", "subject": route, "rpm": 1_000_000},
        ),
        ("post", "/api/v1/tokens"): ("/tokens", {"name": f"nk-{_hex()}"}),
        ("put", "/api/v1/prices/{model}"): (
            f"/prices/nk-model-{_hex()}",
            {"input_per_mtok": 1, "output_per_mtok": 2},
        ),
        # Refused for its unknown field before any connection is tried.
        ("put", "/api/v1/visdom"): (
            "/visdom",
            {"url": "http://127.0.0.1:9", "key": "tvk_" + uuid.uuid4().hex},
        ),
    }


def test_every_write_endpoint_refuses_an_unknown_field(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    valid = _valid_bodies(gateway, fake_provider)
    with _api(gateway) as admin:
        document = httpx2.get(gateway.url + "/api/v1/openapi.json", timeout=30).json()
        operations = _write_operations(document)
        # A write endpoint added later without a body here fails this test.
        assert {(m, p) for m, p, _ in operations} == set(valid)
        for method, path, operation in operations:
            url, body = valid[(method, path)]
            refused = admin.request(method.upper(), url, json={**body, UNKNOWN: 1})
            assert refused.status_code == 400, (method, path, refused.text)
            error = refused.json()["error"]
            assert error["type"] == "invalid_request"
            assert f"unknown fields: {UNKNOWN}" in error["message"], (method, path)
            # The document says so too, and knows every field the endpoint takes.
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert schema.get("additionalProperties") is False, (method, path)
            assert set(body) <= set(schema["properties"]), (method, path)
            # The same body without the stray field is accepted: the field was the fault.
            accepted = admin.request(method.upper(), url, json=body)
            assert accepted.status_code in (200, 201), (method, path, accepted.text)
            for name in schema.get("required", []):
                missing = admin.request(
                    method.upper(), url, json={k: v for k, v in body.items() if k != name}
                )
                assert missing.status_code == 400, (method, path, name, missing.text)
                assert name in missing.json()["error"]["message"], (method, path, name)


# --- 22.6: last used ---


def _api_last_used(admin: httpx2.Client, key: str) -> float | None:
    keys = {k["name"]: k for k in admin.get("/keys").json()["keys"]}
    value = keys[key]["last_used_at"]
    return float(value) if value is not None else None


def _cli_row(gw: GatewayProcess, key: str) -> str:
    done = _cli(gw, "keys", "list", "--org", "acme")
    assert done.returncode == 0, done.stderr
    assert "LAST USED (UTC)" in done.stdout.splitlines()[0]
    [row] = [line for line in done.stdout.splitlines() if line.split()[:1] == [key]]
    return row


def test_last_used_is_written_after_a_call_and_shown_everywhere(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    key, route, _secret = _key_with_route(gateway, fake_provider, fake_provider.url)
    with _api(gateway) as admin, _sign_in(gateway) as browser:
        assert _api_last_used(admin, key) is None
        assert "<dt>Last used</dt><dd>never</dd>" in browser.get(f"/ui/keys/{key}").text
        before = time.time()
        _call(gateway, route)
        after = time.time()
        # Written in batches off the request path: wait for the flush (every few seconds).
        used = None
        for _ in range(120):
            used = _api_last_used(admin, key)
            if used is not None:
                break
            time.sleep(0.25)
        assert used is not None, "last_used_at was never written"
        assert before - 1 <= used <= after + 1
        shown = time.strftime("%Y-%m-%d %H:%M", time.gmtime(used))
        unused, _route, _secret = _key_with_route(gateway, fake_provider, fake_provider.url)
        assert " never " in _cli_row(gateway, unused)
        row = _cli_row(gateway, key)
        assert shown in row and " never " not in row
        listed = _cli(gateway, "keys", "list", "--org", "acme", "--json")
        [entry] = [k for k in json.loads(listed.stdout) if k["name"] == key]
        assert entry["last_used_at"] == pytest.approx(used)
        page = browser.get(f"/ui/keys/{key}").text
        exact = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(used))
        assert f"<dt>Last used</dt><dd>{exact}</dd>" in page
        assert shown in browser.get("/ui/keys").text
