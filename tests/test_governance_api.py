"""``/api/v1`` budgets, limits, my budgets; route fallbacks and key caps through the API.

An org of its own (so that no budget or limit set here caps another test's requests):
an admin, an auditor and a member.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from tests.conftest import ANTHROPIC_SECRET, GatewayProcess, add_test_key
from tests.fake_provider import FakeProvider
from tests.inprocess import start_in_process
from tvgate import services
from tvgate.governance.windows import counter_key, window
from tvgate.models import Org, UsageCounter, User, database


@dataclass
class GovOrg:
    name: str
    tokens: dict[str, str]
    org_id: int
    member_id: int


@pytest.fixture(scope="module")
def gov(gateway: GatewayProcess, fake_provider: FakeProvider) -> GovOrg:
    org = "g-" + uuid.uuid4().hex[:6]
    gateway.bind()
    services.add_user(f"admin@{org}.test", org, admin=True)
    services.add_user(f"auditor@{org}.test", org)
    services.update_user(f"auditor@{org}.test", role="auditor", org_name=org)
    services.add_user(f"dev@{org}.test", org)
    add_test_key("g-key", org, fake_provider.url)
    services.add_route("g-main", "g-key", org_name=org)
    services.add_route("g-spare", "g-key", org_name=org)
    tokens = {
        who: services.issue_token(f"{who}@{org}.test", org)[0]
        for who in ("admin", "auditor", "dev")
    }
    found = GovOrg(
        org,
        tokens,
        Org.get(Org.name == org).id,
        User.get(User.email == f"dev@{org}.test").id,
    )
    database.close()
    return found


@pytest.fixture
def clients(gateway: GatewayProcess, gov: GovOrg) -> Iterator[dict[str, httpx2.Client]]:
    made = {
        who: httpx2.Client(
            base_url=gateway.url + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        for who, token in gov.tokens.items()
    }
    yield made
    for client in made.values():
        client.close()


def refused(response: httpx2.Response, status: int, text: str = "") -> None:
    """One error envelope, whatever went wrong."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["type"] and text in error["message"]


def test_budgets_through_the_api(
    clients: dict[str, httpx2.Client], gov: GovOrg, gateway: GatewayProcess
) -> None:
    admin, auditor, dev = clients["admin"], clients["auditor"], clients["dev"]
    body = {
        "scope": "user",
        "subject": f"dev@{gov.name}.test",
        "metric": "tokens",
        "period": "day",
        "amount": 1000,
    }
    created = admin.post("/budgets", json=body)
    assert created.status_code == 200, created.text
    budget = created.json()
    assert budget["subject"] == f"dev@{gov.name}.test" and budget["warn_percent"] == 80
    assert budget["used"] == 0 and budget["remaining"] == 1000 and budget["resets_at"] > time.time()
    replaced = admin.post("/budgets", json=body | {"amount": 500, "warn_percent": 50}).json()
    assert replaced["id"] == budget["id"] and replaced["amount"] == 500

    gateway.bind()
    start, end = window("day", time.time())
    UsageCounter.create(
        key=counter_key(gov.org_id, "tokens", "day", start, "user", str(gov.member_id)),
        value=300,
        expires_at=end,
    )
    database.close()
    listed = auditor.get("/budgets")
    assert listed.status_code == 200
    [shown] = listed.json()["budgets"]
    assert (shown["used"], shown["remaining"], shown["percent"], shown["state"]) == (
        300,
        200,
        60,
        "warn",
    )
    mine = dev.get("/me/budgets")
    assert mine.status_code == 200 and [b["id"] for b in mine.json()["budgets"]] == [budget["id"]]

    refused(dev.post("/budgets", json=body), 403)
    refused(auditor.post("/budgets", json=body), 403)
    refused(dev.get("/budgets"), 403)
    refused(dev.delete(f"/budgets/{budget['id']}"), 403)
    refused(admin.post("/budgets", json=body | {"subject": "nobody@x.test"}), 404, "no user")
    refused(admin.post("/budgets", json=body | {"amount": -1}), 400, "amount")
    refused(admin.post("/budgets", json=body | {"amount": "lots"}), 400, "amount")
    refused(admin.post("/budgets", json=body | {"warn_percent": 120}), 400, "warn_percent")
    refused(admin.post("/budgets", json=body | {"metric": "requests"}), 400, "metric")
    refused(admin.post("/budgets", json=body | {"colour": "red"}), 400, "unknown fields")
    refused(admin.post("/budgets", json={"scope": "org"}), 400, "required")
    refused(admin.post("/budgets", content=b"{nope"), 400)
    refused(admin.delete("/budgets/abc"), 400)
    with httpx2.Client(
        base_url=gateway.url + "/api/v1",
        headers={"Authorization": f"Bearer {gateway.tokens['admin@acme.test']}"},
    ) as other_admin:
        refused(other_admin.delete(f"/budgets/{budget['id']}"), 404)
    assert admin.delete(f"/budgets/{budget['id']}").json() == {"deleted": budget["id"]}
    refused(admin.delete(f"/budgets/{budget['id']}"), 404)
    assert admin.get("/budgets").json() == {"budgets": []}


def test_limits_through_the_api(clients: dict[str, httpx2.Client], gov: GovOrg) -> None:
    admin, auditor, dev = clients["admin"], clients["auditor"], clients["dev"]
    made = admin.post("/limits", json={"scope": "route", "subject": "g-main", "rpm": 60})
    assert made.status_code == 200, made.text
    limit = made.json()
    assert (limit["rpm"], limit["tpm"], limit["used_requests"]) == (60, None, 0)
    assert limit["remaining_requests"] == 60 and limit["remaining_tokens"] is None
    both = admin.post(
        "/limits", json={"scope": "route", "subject": "g-main", "rpm": 30, "tpm": 9000}
    ).json()
    assert both["id"] == limit["id"] and (both["rpm"], both["tpm"]) == (30, 9000)
    assert [r["id"] for r in auditor.get("/limits").json()["limits"]] == [limit["id"]]
    assert [r["subject"] for r in dev.get("/me/budgets").json()["limits"]] == ["g-main"]

    refused(dev.post("/limits", json={"rpm": 1}), 403)
    refused(auditor.post("/limits", json={"rpm": 1}), 403)
    refused(dev.get("/limits"), 403)
    refused(admin.post("/limits", json={"rpm": 0}), 400, "rpm")
    refused(admin.post("/limits", json={"tpm": 1.5}), 400, "tpm")
    refused(admin.post("/limits", json={"scope": "key", "subject": "g-key", "rpm": 1}), 400)
    refused(admin.post("/limits", json={"scope": "route", "subject": "none", "rpm": 1}), 404)
    refused(dev.delete(f"/limits/{limit['id']}"), 403)

    removed = admin.post("/limits", json={"scope": "route", "subject": "g-main"})
    assert removed.status_code == 200 and removed.json() == {"deleted": True}
    org_limit = admin.post("/limits", json={"tpm": 100000}).json()
    assert org_limit["scope"] == "org" and org_limit["subject"] == ""
    assert admin.delete(f"/limits/{org_limit['id']}").json() == {"deleted": org_limit["id"]}
    refused(admin.delete(f"/limits/{org_limit['id']}"), 404)


def test_route_fallbacks_and_key_caps_through_the_api(
    clients: dict[str, httpx2.Client], gov: GovOrg
) -> None:
    admin, dev = clients["admin"], clients["dev"]
    route = admin.post(
        "/routes", json={"name": "g-fb", "key": "g-key", "fallbacks": ["g-main", "g-spare"]}
    )
    assert route.status_code == 201, route.text
    assert route.json()["fallbacks"] == ["g-main", "g-spare"]
    route_id = route.json()["id"]
    assert admin.get(f"/routes/{route_id}").json()["fallbacks"] == ["g-main", "g-spare"]
    patched = admin.patch(f"/routes/{route_id}", json={"fallbacks": ["g-spare"]})
    assert patched.status_code == 200 and patched.json()["fallbacks"] == ["g-spare"]
    refused(admin.patch(f"/routes/{route_id}", json={"fallbacks": ["g-fb"]}), 400, "own fallback")
    refused(admin.patch(f"/routes/{route_id}", json={"fallbacks": ["nope"]}), 400, "nope")
    refused(admin.post("/routes", json={"name": "x", "key": "g-key", "fallbacks": "g-main"}), 400)
    refused(dev.patch(f"/routes/{route_id}", json={"fallbacks": []}), 403)

    key = admin.post(
        "/keys",
        json={
            "name": "g-capped",
            "provider": "anthropic",
            "secret": ANTHROPIC_SECRET,
            "max_concurrent": 3,
        },
    )
    assert key.status_code == 201, key.text
    assert key.json()["max_concurrent"] == 3
    assert {k["name"]: k["max_concurrent"] for k in admin.get("/keys").json()["keys"]} == {
        "g-key": 0,
        "g-capped": 3,
    }
    capped = admin.patch("/keys/g-capped", json={"max_concurrent": 8})
    assert capped.status_code == 200 and capped.json()["max_concurrent"] == 8
    both = admin.patch("/keys/g-capped", json={"max_concurrent": 0, "available_to_all": False})
    assert both.json()["max_concurrent"] == 0
    refused(admin.patch("/keys/g-capped", json={"max_concurrent": -1}), 400, "max_concurrent")
    refused(admin.patch("/keys/g-capped", json={"max_concurrent": "2"}), 400, "max_concurrent")
    refused(admin.patch("/keys/g-capped", json={"name": "renamed"}), 400, "unknown fields: name")
    refused(admin.patch("/keys/g-capped", json={}), 400, "nothing to change")
    refused(dev.patch("/keys/g-capped", json={"max_concurrent": 1}), 403)
    refused(
        admin.post(
            "/keys",
            json={"name": "k", "provider": "openai", "secret": "sk-x1234", "max_concurrent": -2},
        ),
        400,
        "max_concurrent",
    )


def test_openapi_documents_the_governance_paths(gateway: GatewayProcess) -> None:
    paths = httpx2.get(gateway.url + "/api/v1/openapi.json").json()["paths"]
    for path in (
        "/api/v1/budgets",
        "/api/v1/budgets/{budget_id}",
        "/api/v1/limits",
        "/api/v1/limits/{limit_id}",
        "/api/v1/me/budgets",
    ):
        assert path in paths
    route_fields = paths["/api/v1/routes"]["post"]["requestBody"]["content"]["application/json"]
    assert "fallbacks" in route_fields["schema"]["properties"]


def test_a_change_through_the_api_is_in_force_at_once_in_that_process(
    gateway: GatewayProcess, gov: GovOrg, tmp_path: Path
) -> None:
    """A gateway whose snapshots live five minutes: only the invalidation after each change
    can put a new budget (or its removal) in force before the next request."""
    with start_in_process(gateway.database_url, tmp_path, {}, TVGATE_CACHE_TTL="300") as slow:
        api = httpx2.Client(
            base_url=slow.url,
            headers={"Authorization": f"Bearer {gov.tokens['admin']}"},
            timeout=30,
        )

        def call() -> int:
            return api.post(
                "/v1/messages",
                json={
                    "model": "g-spare",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            ).status_code

        assert call() == 200  # the org's snapshot is now cached
        budget = api.post(
            "/api/v1/budgets",
            json={
                "scope": "route",
                "subject": "g-spare",
                "metric": "tokens",
                "period": "day",
                "amount": 0,
            },
        ).json()
        assert call() == 429
        assert api.delete(f"/api/v1/budgets/{budget['id']}").status_code == 200
        assert call() == 200
        api.close()
