"""Who gets which route, through the real proxy, for every kind of principal, route and switch."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    add_test_key,
    beside,
)
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.models import AuditEvent, Org, database


@dataclass
class Matrix:
    org: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def matrix(gateway: GatewayProcess, fake_provider: FakeProvider) -> Matrix:
    """Org "m-…": an admin, two members, an auditor, a disabled user; keys and routes of every kind."""
    org = "m-" + uuid.uuid4().hex[:6]
    gateway.bind()
    emails = {
        "admin": f"admin@{org}.test",
        "mia": f"mia@{org}.test",
        "max": f"max@{org}.test",
        "auditor": f"auditor@{org}.test",
        "gone": f"gone@{org}.test",
    }
    services.add_user(emails["admin"], org, admin=True)
    for who in ("mia", "max", "auditor", "gone"):
        services.add_user(emails[who], org)
    services.update_user(emails["auditor"], role="auditor", org_name=org)
    tokens = {who: services.issue_token(email, org)[0] for who, email in emails.items()}
    services.update_user(emails["gone"], disabled=True, org_name=org)
    services.set_policy(org, allow_user_keys=True, allow_user_routes=True)

    def key(name: str, **kwargs: Any) -> None:
        add_test_key(name, org, fake_provider.url, allow_private_user=True, **kwargs)

    key("all")
    key("granted", available_to_all=False)
    services.grant_key("granted", [emails["mia"]], org)
    key("mia-own", owner_email=emails["mia"])
    key("off")
    services.add_route("m-org", "all", model="up-org", org_name=org)
    services.add_route("m-pat-*", "all", model="up-pat", org_name=org)
    services.add_route("m-pat-long-*", "all", model="up-pat-long", org_name=org)
    services.add_route("m-granted", "granted", model="up-granted", org_name=org)
    services.add_route("m-shared", "all", model="up-shared-org", org_name=org)
    services.add_route(
        "m-shared", "all", model="up-shared-user", org_name=org, for_user=emails["mia"]
    )
    services.add_route(
        "m-shared", "mia-own", model="up-shared-owned", org_name=org, owner=emails["mia"]
    )
    services.add_route("m-mine", "all", model="up-mine", org_name=org, owner=emails["mia"])
    services.add_route("m-off", "all", model="up-off", org_name=org, enabled=False)
    services.add_route("m-keyoff", "off", model="up-keyoff", org_name=org)
    from tvgate.models import ProviderKey

    ProviderKey.update(disabled=True).where(ProviderKey.name == "off").execute()
    database.close()
    tokens["stranger"] = gateway.tokens["dev@other.test"]
    return Matrix(org, tokens)


def ask(gateway: GatewayProcess, token: str, name: str) -> str:
    """The upstream model the request reached, or the HTTP status when it did not."""
    response = httpx2.post(
        gateway.url + "/v1/messages",
        content=orjson.dumps(
            {"model": name, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
        ),
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    if response.status_code == 200:
        return str(response.json()["model"])
    return str(response.status_code)


NAMES = [
    "m-org",
    "m-pat-x",
    "m-pat-long-x",
    "m-granted",
    "m-shared",
    "m-mine",
    "m-off",
    "m-keyoff",
    "zzz",
]

# Expected answers: (user keys on, user routes on) -> principal -> one answer per NAMES entry.
_EVERYONE = ["up-org", "up-pat", "up-pat-long"]
EXPECTED: dict[tuple[bool, bool], dict[str, list[str]]] = {
    (True, True): {
        "admin": [*_EVERYONE, "404", "up-shared-org", "404", "404", "404", "404"],
        "mia": [*_EVERYONE, "up-granted", "up-shared-owned", "up-mine", "404", "404", "404"],
        "max": [*_EVERYONE, "404", "up-shared-org", "404", "404", "404", "404"],
        "auditor": [*_EVERYONE, "404", "up-shared-org", "404", "404", "404", "404"],
        "gone": ["401"] * 9,
        "stranger": ["404"] * 9,
    },
    # User keys off: Mia's owned route on her own key is out; the user route takes over.
    (False, True): {
        "mia": [*_EVERYONE, "up-granted", "up-shared-user", "up-mine", "404", "404", "404"],
        "max": [*_EVERYONE, "404", "up-shared-org", "404", "404", "404", "404"],
    },
    # User routes off: every owned route is out, whatever its key.
    (True, False): {
        "mia": [*_EVERYONE, "up-granted", "up-shared-user", "404", "404", "404", "404"],
    },
    (False, False): {
        "mia": [*_EVERYONE, "up-granted", "up-shared-user", "404", "404", "404", "404"],
        "admin": [*_EVERYONE, "404", "up-shared-org", "404", "404", "404", "404"],
    },
}


def set_switches(
    gateway: GatewayProcess, matrix: Matrix, user_keys: bool, user_routes: bool
) -> None:
    response = httpx2.patch(
        gateway.url + "/api/v1/policy",
        json={"allow_user_keys": user_keys, "allow_user_routes": user_routes},
        headers={"Authorization": f"Bearer {matrix.tokens['admin']}"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("user_keys", "user_routes"), list(EXPECTED))
def test_resolution_table(
    gateway: GatewayProcess, matrix: Matrix, user_keys: bool, user_routes: bool
) -> None:
    set_switches(gateway, matrix, user_keys, user_routes)
    try:
        for who, expected in EXPECTED[(user_keys, user_routes)].items():
            got = [ask(gateway, matrix.tokens[who], name) for name in NAMES]
            assert got == expected, f"{who} with user keys {user_keys}, user routes {user_routes}"
    finally:
        set_switches(gateway, matrix, True, True)


def test_models_list_is_what_the_principal_may_use(gateway: GatewayProcess, matrix: Matrix) -> None:
    def listed(who: str) -> list[str]:
        response = httpx2.get(
            gateway.url + "/v1/models", headers={"Authorization": f"Bearer {matrix.tokens[who]}"}
        )
        return [m["id"] for m in response.json()["data"]]

    assert listed("mia") == ["m-granted", "m-mine", "m-org", "m-shared"]
    assert listed("max") == ["m-org", "m-shared"]
    assert listed("stranger") == ["other-claude"]


def test_resolve_explains_who_gets_what(gateway: GatewayProcess, matrix: Matrix) -> None:
    found = gateway.cli(
        "routes", "resolve", "m-shared", "--user", f"mia@{matrix.org}.test", "--org", matrix.org
    )
    assert (
        found.returncode == 0
        and "owned route 'm-shared'" in found.stdout
        and "up-shared-owned" in found.stdout
    )
    none = gateway.cli(
        "routes", "resolve", "m-granted", "--user", f"max@{matrix.org}.test", "--org", matrix.org
    )
    assert none.returncode == 1 and "no route" in none.stdout and "m-org" in none.stdout
    api = httpx2.get(
        gateway.url + "/api/v1/resolve",
        params={"name": "m-pat-long-9", "user": f"max@{matrix.org}.test"},
        headers={"Authorization": f"Bearer {matrix.tokens['admin']}"},
    ).json()
    assert api["route"]["name"] == "m-pat-long-*" and api["upstream_model"] == "up-pat-long"


def api(gateway: GatewayProcess, token: str) -> httpx2.Client:
    return httpx2.Client(
        base_url=gateway.url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def refusals(gateway: GatewayProcess, org: str) -> int:
    gateway.bind()
    org_id = Org.get(Org.name == org).id
    count = AuditEvent.select().where((AuditEvent.org_id == org_id) & ~AuditEvent.allowed).count()
    database.close()
    return int(count)


def test_what_members_cannot_do(gateway: GatewayProcess, matrix: Matrix) -> None:
    mia, max_ = matrix.tokens["mia"], matrix.tokens["max"]
    with api(gateway, max_) as client:
        # Max sees org routes only, none of Mia's, and no key but his own (none).
        routes = client.get("/routes").json()["routes"]
        assert {r["scope"] for r in routes} == {"org"}
        assert client.get("/keys").json()["keys"] == []
        before = refusals(gateway, matrix.org)
        attempts = [
            client.post(
                "/routes", json={"name": "x", "key": "granted", "owner": f"max@{matrix.org}.test"}
            ),
            client.post("/routes", json={"name": "x", "key": "mia-own"}),
            client.post(
                "/routes", json={"name": "x", "key": "all", "owner": f"mia@{matrix.org}.test"}
            ),
            client.post(
                "/keys",
                json={
                    "name": "k",
                    "provider": "openai",
                    "secret": "sk-x-123456789",
                    "owner": f"mia@{matrix.org}.test",
                },
            ),
            client.patch(f"/routes/{routes[0]['id']}", json={"enabled": False}),
            client.patch("/policy", json={"allow_user_keys": False}),
            client.post("/keys/all/grants", json={"users": [f"max@{matrix.org}.test"]}),
            client.patch(f"/users/mia@{matrix.org}.test", json={"disabled": True}),
            client.get("/users"),
            client.get("/audit"),
        ]
        assert [a.status_code for a in attempts] == [
            404,
            404,
            403,
            403,
            403,
            403,
            403,
            403,
            403,
            403,
        ]
        assert refusals(gateway, matrix.org) == before + len(attempts)
    with api(gateway, mia) as client:
        mine = client.get("/keys").json()["keys"]
        assert [k["name"] for k in mine] == ["mia-own"]
        assert set(mine[0]) >= {"name", "provider", "fingerprint"} and "secret" not in mine[0]
        assert ANTHROPIC_SECRET not in client.get("/keys").text


def test_switch_off_forbids_new_user_routes_and_keys(
    gateway: GatewayProcess, matrix: Matrix
) -> None:
    set_switches(gateway, matrix, False, False)
    try:
        with api(gateway, matrix.tokens["mia"]) as client:
            assert client.post("/routes", json={"name": "new", "key": "all"}).status_code == 403
            assert (
                client.post(
                    "/keys", json={"name": "n", "provider": "openai", "secret": "sk-abc-123456"}
                ).status_code
                == 403
            )
    finally:
        set_switches(gateway, matrix, True, True)
    with api(gateway, matrix.tokens["mia"]) as client:
        made = client.post(
            "/routes", json={"name": "mia-new", "key": "all", "upstream_model": "up-new"}
        )
        assert made.status_code == 201 and made.json()["scope"] == "owned"
    assert ask(gateway, matrix.tokens["mia"], "mia-new") == "up-new"
    assert ask(gateway, matrix.tokens["max"], "mia-new") == "404"


def test_cross_org_through_the_api(gateway: GatewayProcess, matrix: Matrix) -> None:
    with api(gateway, matrix.tokens["stranger"]) as client:
        assert "m-org" not in client.get("/routes").text
        assert (
            client.get(
                "/resolve", params={"name": "m-org", "user": f"mia@{matrix.org}.test"}
            ).status_code
            == 404
        )
        assert client.post("/keys/all/grants", json={"users": ["dev@other.test"]}).status_code in (
            403,
            404,
        )
        routes = httpx2.get(
            gateway.url + "/api/v1/routes",
            headers={"Authorization": f"Bearer {matrix.tokens['admin']}"},
        ).json()["routes"]
        for route in routes:
            assert (
                client.patch(f"/routes/{route['id']}", json={"enabled": False}).status_code == 404
            )
            assert client.delete(f"/routes/{route['id']}").status_code == 404
        assert client.get("/routes", headers={"X-Tvgate-Org": matrix.org}).status_code == 403


def test_admin_changes_are_audited_without_secrets(gateway: GatewayProcess, matrix: Matrix) -> None:
    with api(gateway, matrix.tokens["admin"]) as client:
        made = client.post(
            "/keys",
            json={
                "name": "audited",
                "provider": "anthropic",
                "secret": ANTHROPIC_SECRET,
                "base_url": "https://api.anthropic.com",
            },
        )
        assert made.status_code == 201 and ANTHROPIC_SECRET not in made.text
        route = client.post("/routes", json={"name": "aud-route", "key": "audited"}).json()
        assert (
            client.patch(f"/routes/{route['id']}", json={"upstream_model": "claude-x"}).status_code
            == 200
        )
        assert client.delete(f"/routes/{route['id']}").status_code == 200
        events = client.get("/audit", params={"limit": 10}).json()["events"]
        actions = [e["action"] for e in events[:4]]
        assert actions == ["delete route", "update route", "add route", "add key"]
        assert events[1]["change"] == {"upstream_model": ["", "claude-x"]}
        assert all(e["actor"] == f"admin@{matrix.org}.test" for e in events[:4])
        assert ANTHROPIC_SECRET not in client.get("/audit", params={"limit": 500}).text
    # The auditor reads the audit log and users, and changes nothing.
    with api(gateway, matrix.tokens["auditor"]) as client:
        assert client.get("/audit").status_code == 200
        assert client.get("/users").status_code == 200
        assert client.post("/routes", json={"name": "a", "key": "all"}).status_code == 403


def test_disabling_a_user_takes_effect_at_once(gateway: GatewayProcess, matrix: Matrix) -> None:
    email = f"temp-{uuid.uuid4().hex[:6]}@{matrix.org}.test"
    gateway.bind()
    services.add_user(email, matrix.org)
    token, _ = services.issue_token(email, matrix.org)
    database.close()
    assert ask(gateway, token, "m-org") == "up-org"
    with api(gateway, matrix.tokens["admin"]) as client:
        assert client.patch(f"/users/{email}", json={"disabled": True}).status_code == 200
    assert ask(gateway, token, "m-org") == "401"
    with api(gateway, matrix.tokens["admin"]) as client:
        last_admin = client.patch(f"/users/admin@{matrix.org}.test", json={"role": "member"})
        assert last_admin.status_code == 409


@pytest.fixture(scope="module")
def second_gateway(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    with beside(gateway) as gw:
        yield gw


def test_a_change_in_one_process_reaches_another_within_the_ttl(
    gateway: GatewayProcess, second_gateway: GatewayProcess, matrix: Matrix
) -> None:
    name = "late-" + uuid.uuid4().hex[:6]
    mia = matrix.tokens["mia"]
    assert ask(second_gateway, mia, name) == "404"
    with api(gateway, matrix.tokens["admin"]) as client:
        made = client.post(
            "/routes", json={"name": name, "key": "all", "upstream_model": "up-late"}
        )
        assert made.status_code == 201, made.text
        route = made.json()
    assert ask(gateway, mia, name) == "up-late"  # at once where it was made
    changed = time.monotonic()
    while ask(second_gateway, mia, name) != "up-late":
        assert time.monotonic() - changed < 3.0, (
            "the other process never saw the route (TTL is 1 s)"
        )
        time.sleep(0.1)
    with api(gateway, matrix.tokens["admin"]) as client:
        client.patch(f"/routes/{route['id']}", json={"enabled": False})
    changed = time.monotonic()
    while ask(second_gateway, mia, name) != "404":
        assert time.monotonic() - changed < 3.0, "the other process kept a disabled route"
        time.sleep(0.1)
