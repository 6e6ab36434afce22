"""``/api/v1/tokens``: users mint and revoke their own tokens; admins see and revoke the org's."""

from __future__ import annotations

import time

import httpx2

from tests.conftest import GatewayProcess


def api(gw: GatewayProcess, token: str) -> httpx2.Client:
    return httpx2.Client(
        base_url=gw.url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def proxy_ok(gw: GatewayProcess, token: str) -> bool:
    response = httpx2.post(
        gw.url + "/v1/messages",
        json={
            "model": "claude-test",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={"x-api-key": token},
    )
    return response.status_code == 200


def test_mint_use_list_and_revoke_my_own_token(gateway: GatewayProcess, member_token: str) -> None:
    with api(gateway, member_token) as client:
        minted = client.post("/tokens", json={"name": "ci-runner", "expires_days": 30})
        assert minted.status_code == 201, minted.text
        token = minted.json()["token"]
        assert token.startswith("tvg_") and minted.json()["expires_at"] > time.time()
        assert proxy_ok(gateway, token)
        listed = client.get("/tokens").json()["tokens"]
        mine = [t for t in listed if t["id"] == minted.json()["id"]]
        assert mine and "token" not in mine[0] and all(t["user"] == "dev@acme.test" for t in listed)
        revoked = client.delete(f"/tokens/{minted.json()['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    # In force at once in the process that revoked it.
    assert not proxy_ok(gateway, token)


def test_members_cannot_touch_other_peoples_tokens(
    gateway: GatewayProcess, member_token: str
) -> None:
    admin = gateway.tokens["admin@acme.test"]
    with api(gateway, admin) as client:
        admin_token_id = client.post("/tokens", json={"name": "admin-laptop"}).json()["id"]
    with api(gateway, member_token) as client:
        assert client.get("/tokens", params={"user": "admin@acme.test"}).status_code == 403
        assert client.post("/tokens", json={"user": "admin@acme.test"}).status_code == 403
        assert client.delete(f"/tokens/{admin_token_id}").status_code == 403
    with api(gateway, gateway.tokens["dev@other.test"]) as client:
        # Another org's token id does not even exist for this caller.
        assert client.delete(f"/tokens/{admin_token_id}").status_code == 404
        assert client.get("/tokens", params={"user": "dev@acme.test"}).status_code == 404


def test_admin_sees_and_revokes_tokens_of_the_org(gateway: GatewayProcess) -> None:
    admin = gateway.tokens["admin@acme.test"]
    with api(gateway, gateway.tokens["dev@acme.test"]) as client:
        minted = client.post("/tokens", json={"name": "to-be-revoked"}).json()
    with api(gateway, admin) as client:
        everyone = client.get("/tokens", params={"all": "1"}).json()["tokens"]
        assert {t["user"] for t in everyone} >= {"admin@acme.test", "dev@acme.test"}
        assert "dev@other.test" not in {t["user"] for t in everyone}
        assert client.delete(f"/tokens/{minted['id']}").status_code == 200
    assert not proxy_ok(gateway, minted["token"])


def test_api_errors_share_one_envelope(gateway: GatewayProcess, member_token: str) -> None:
    assert httpx2.get(gateway.url + "/api/v1/tokens").json()["error"]["status"] == 401
    with api(gateway, member_token) as client:
        for response, status in (
            (client.get("/nothing-here"), 404),
            (client.post("/tokens", content=b"{oops"), 400),
            (client.post("/tokens", json=[1]), 400),
            (client.post("/tokens", json={"expires_days": "soon"}), 400),
            (client.post("/tokens", json={"expires_days": -1}), 400),
            (client.delete("/tokens/abc"), 400),
            (client.delete("/tokens/999999"), 404),
        ):
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["status"] == status and error["message"] and error["type"]
