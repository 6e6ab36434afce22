"""Issue 16.4: credentials derived from an outside identity end when that identity does.

A ``tvg_`` token or a web session made by a Visdom Trace user keeps the Visdom
Trace session it came from (sealed by the keyring) and stops working within
``TVGATE_VISDOM_CACHE_TTL`` of the user leaving the org, losing the session or
losing the role that minted it. A web session opened with a pasted ``tvg_``
token ends as soon as the token is revoked. Tokens JWT users mint for
themselves expire within ``TVGATE_JWT_TOKEN_MAX_AGE``. Everything runs
against a real ``tvgate serve`` with the fake Visdom Trace.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import jwt
import orjson
import pytest

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    beside,
    visdom_env,
)
from tests.fake_visdom import FakeUser, FakeVisdom
from tvgate.db import migrate, open_database
from tvgate.models import AuditEvent, ProviderKey, ProxyToken, SchemaVersion, User, WebSession

ISSUER = "https://issuer.revoke.test"
JWT_SECRET = "revoke-hmac-secret-" + uuid.uuid4().hex
PASSWORD = "correct horse battery staple"
#: Longer than TVGATE_VISDOM_CACHE_TTL (1 s) plus TVGATE_CACHE_TTL (1 s): every cached
#: answer about a credential has expired by then.
PAST_THE_TTL = 2.5
BODY = orjson.dumps(
    {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
)


@pytest.fixture(scope="module")
def revgate(gateway: GatewayProcess, visdom: FakeVisdom) -> Iterator[GatewayProcess]:
    """A gateway on the shared database with Visdom Trace and an HS256 JWT issuer."""
    with beside(
        gateway,
        **visdom_env(visdom.url),
        TVGATE_JWT_ISSUER=ISSUER,
        TVGATE_JWT_ALGORITHMS="HS256",
        TVGATE_JWT_SECRET=JWT_SECRET,
        TVGATE_LOGIN_ATTEMPTS="1000",
    ) as gw:
        # acme was made in tvgate: only an operator's link lets outside orgs in.
        links = [
            ("acme", "--jwt-org", "acme"),
            ("acme", "--visdom-org-id", visdom.add_org("acme").org_id),
        ]
        for name, option, value in links:
            linked = gw.cli("orgs", "link", name, option, value)
            assert linked.returncode == 0, linked.stderr
        yield gw


def proxy(gw: GatewayProcess, token: str) -> httpx2.Response:
    headers = {"x-api-key": token, "anthropic-version": "2023-06-01"}
    return httpx2.post(gw.url + "/v1/messages", content=BODY, headers=headers, timeout=30)


def api(gw: GatewayProcess, method: str, path: str, token: str, **body: Any) -> httpx2.Response:
    return httpx2.request(
        method,
        gw.url + "/api/v1" + path,
        headers={"Authorization": f"Bearer {token}"},
        content=orjson.dumps(body) if body else None,
        timeout=30,
    )


def mint(gw: GatewayProcess, credential: str, **body: Any) -> dict[str, Any]:
    response = api(gw, "POST", "/tokens", credential, name="revoke-test", **body)
    assert response.status_code == 201, response.text
    minted: dict[str, Any] = response.json()
    return minted


def visdom_person(visdom: FakeVisdom, role: str) -> FakeUser:
    return visdom.add_user(f"rv-{uuid.uuid4().hex[:8]}@acme.test", PASSWORD, {"acme": role})


def visdom_minted(
    gw: GatewayProcess, visdom: FakeVisdom, role: str, **body: Any
) -> tuple[FakeUser, str, str]:
    """A new person of acme with ``role`` at Visdom Trace, their session there, and a tvgate
    token minted with that session (``body``: more of the mint request)."""
    person = visdom_person(visdom, role)
    session = visdom.issue_session(person)
    return person, session, mint(gw, session, **body)["token"]


def browser(gw: GatewayProcess) -> httpx2.Client:
    return httpx2.Client(base_url=gw.url, follow_redirects=False, timeout=30)


def xsrf_of(page: httpx2.Response) -> str:
    found = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


def sign_in(client: httpx2.Client, **form: str) -> None:
    response = client.post("/ui/login", data={"_xsrf": xsrf_of(client.get("/ui/login")), **form})
    assert response.status_code == 302 and response.headers["location"] == "/ui/", response.text


def mint_in_ui(client: httpx2.Client) -> httpx2.Response:
    """The page that shows a token minted in the UI (the form redirects to it)."""
    form = {"_xsrf": xsrf_of(client.get("/ui/me")), "name": "from-the-ui"}
    posted = client.post("/ui/me/tokens", data=form)
    assert posted.status_code == 302, posted.text
    return client.get(posted.headers["location"])


def signed_in(client: httpx2.Client) -> bool:
    page = client.get("/ui/")
    assert page.status_code in (200, 302), page.text
    return page.status_code == 200


def sign_in_visdom_person(client: httpx2.Client, visdom: FakeVisdom, role: str) -> FakeUser:
    """A new person of acme with ``role`` at Visdom Trace, signed in with ``client`` by their
    email and password."""
    person = visdom_person(visdom, role)
    sign_in(client, email=person.email, password=PASSWORD)
    assert signed_in(client)
    return person


# --- Visdom Trace users: tokens ---


def test_token_minted_by_a_visdom_user_stops_when_they_leave_the_org(
    revgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    person, session, token = visdom_minted(revgate, visdom, "admin")
    # A token minted with that token inherits where it came from.
    child = mint(revgate, token)["token"]
    for credential in (token, child):
        assert proxy(revgate, credential).status_code == 200
        assert api(revgate, "GET", "/tokens?all=1", credential).status_code == 200
    visdom.remove_member(person, "acme")
    time.sleep(PAST_THE_TTL)
    for credential in (token, child):
        refused = proxy(revgate, credential)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "authentication_error"
        assert api(revgate, "GET", "/tokens?all=1", credential).status_code == 401
        assert api(revgate, "POST", "/tokens", credential, name="more").status_code == 401
    # Nor can the Visdom Trace session itself act in the org any more.
    assert api(revgate, "POST", "/tokens", session, name="more").status_code == 403
    revgate.bind()
    row = ProxyToken.get(ProxyToken.prefix == token[:10])
    assert row.revoked_at is not None
    ended = AuditEvent.get(
        (AuditEvent.action == "revoke token") & (AuditEvent.target == f"token {row.id}")
    )
    assert ended.actor == "tvgate (Visdom Trace re-check)" and "no longer" in ended.change
    assert session not in revgate.dump_database()
    assert session not in revgate.log_text()


#: What ends at Visdom Trace the authority a token was minted with.
AuthorityEnd = Callable[[FakeVisdom, FakeUser, str], None]


@pytest.mark.parametrize(
    ("role", "mint_body", "end"),
    [
        # The Visdom Trace session it was minted with ends.
        pytest.param(
            "developer", {}, lambda visdom, _, session: visdom.revoke(session), id="session-ended"
        ),
        # An admin minted it for someone else and is demoted: a member could not have
        # minted it.
        pytest.param(
            "admin",
            {"user": "dev@acme.test"},
            lambda visdom, admin, _: visdom.set_role(admin, "acme", "developer"),
            id="minting-admin-demoted",
        ),
    ],
)
def test_token_stops_when_the_authority_it_was_minted_with_is_gone(
    revgate: GatewayProcess,
    visdom: FakeVisdom,
    role: str,
    mint_body: dict[str, str],
    end: AuthorityEnd,
) -> None:
    person, session, token = visdom_minted(revgate, visdom, role, **mint_body)
    assert proxy(revgate, token).status_code == 200
    end(visdom, person, session)
    time.sleep(PAST_THE_TTL)
    assert proxy(revgate, token).status_code == 401


def test_token_of_a_demoted_admin_acts_with_the_current_role(
    revgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    person, _, token = visdom_minted(revgate, visdom, "owner")
    assert api(revgate, "GET", "/tokens?all=1", token).status_code == 200
    visdom.set_role(person, "acme", "developer")
    time.sleep(PAST_THE_TTL)
    demoted = api(revgate, "GET", "/tokens?user=admin@acme.test", token)
    assert demoted.status_code == 403, demoted.text
    assert proxy(revgate, token).status_code == 200


def test_visdom_outage_stops_derived_tokens_after_the_ttl_then_recovers(
    revgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    _, _, token = visdom_minted(revgate, visdom, "developer")
    assert proxy(revgate, token).status_code == 200
    visdom.stop()
    try:
        time.sleep(PAST_THE_TTL)
        down = proxy(revgate, token)
        # An outage is neither a silent allow nor a revocation.
        assert down.status_code == 503, down.text
    finally:
        visdom.start()
    assert proxy(revgate, token).status_code == 200


def test_sealed_visdom_session_opens_only_on_its_own_row(
    revgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    first = mint(revgate, visdom.issue_session(visdom_person(visdom, "developer")))
    second = mint(revgate, visdom.issue_session(visdom_person(visdom, "developer")))
    third = mint(revgate, visdom.issue_session(visdom_person(visdom, "developer")))
    revgate.bind()
    sealed = ProxyToken.get_by_id(first["id"]).visdom_session
    assert sealed and sealed.startswith("local:v1:")
    provider_key = ProviderKey.get(ProviderKey.name == "fake-anthropic").ciphertext
    # Someone who can write the database moves ciphertexts between rows: another token's,
    # and a provider key's (which must never be sent to Visdom Trace as a session).
    for target, ciphertext in ((second, sealed), (third, provider_key)):
        ProxyToken.update(visdom_session=ciphertext, visdom_checked_at=0).where(
            ProxyToken.id == target["id"]
        ).execute()
    time.sleep(PAST_THE_TTL)
    for target in (second, third):
        assert proxy(revgate, target["token"]).status_code == 401
    assert proxy(revgate, first["token"]).status_code == 200
    assert ANTHROPIC_SECRET not in visdom.bearers


# --- Visdom Trace users: web sessions ---


def test_ui_session_of_a_visdom_user_ends_when_they_leave_the_org(
    revgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    with browser(revgate) as client:
        person = sign_in_visdom_person(client, visdom, "admin")
        minted = mint_in_ui(client)
        assert minted.status_code == 200, minted.text
        found = re.search(r'id="token-value">(tvg_[^<]+)<', minted.text)
        assert found is not None
        ui_token = found.group(1)
        assert proxy(revgate, ui_token).status_code == 200
        visdom.remove_member(person, "acme")
        time.sleep(PAST_THE_TTL)
        assert not signed_in(client)
        form = {"_xsrf": xsrf_of(client.get("/ui/login")), "name": "more"}
        # Signed out: a form post is refused (tornado's @authenticated answers 403).
        assert client.post("/ui/me/tokens", data=form).status_code == 403
    assert proxy(revgate, ui_token).status_code == 401
    revgate.bind()
    assert not WebSession.select().join(User).where(User.email == person.email).exists()
    issued = visdom.issued[person.user_id]
    assert issued
    dump, log = revgate.dump_database(), revgate.log_text()
    for credential in issued:
        assert credential not in dump
        assert credential not in log


def test_ui_session_of_a_visdom_user_ends_with_their_visdom_session(
    revgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    with browser(revgate) as client:
        person = sign_in_visdom_person(client, visdom, "developer")
        visdom.revoke_user(person)
        time.sleep(PAST_THE_TTL)
        assert not signed_in(client)


# --- sessions opened with a pasted token ---


def test_session_opened_with_a_token_ends_when_the_token_is_revoked(
    revgate: GatewayProcess, gateway: GatewayProcess
) -> None:
    admin = gateway.tokens["admin@acme.test"]
    minted = mint(gateway, admin, user="dev@acme.test")
    with browser(revgate) as client:
        sign_in(client, token=minted["token"])
        assert signed_in(client)
        # Revoked in another process: the session sees it on its next page, no cache.
        revoked = api(gateway, "DELETE", f"/tokens/{minted['id']}", admin)
        assert revoked.status_code == 200, revoked.text
        assert not signed_in(client)


def test_session_opened_with_a_token_ends_when_the_token_expires(
    revgate: GatewayProcess, gateway: GatewayProcess
) -> None:
    minted = mint(gateway, gateway.tokens["admin@acme.test"], user="dev@acme.test")
    with browser(revgate) as client:
        sign_in(client, token=minted["token"])
        assert signed_in(client)
        gateway.bind()
        ProxyToken.update(expires_at=time.time() - 1).where(ProxyToken.id == minted["id"]).execute()
        assert not signed_in(client)


# --- JWT users ---


def make_jwt(email: str, role: str = "developer", lifetime: int = 600) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "sub-" + email, "email": email, "org": "acme", "role": role}
    return jwt.encode({**claims, "iat": now, "exp": now + lifetime}, JWT_SECRET, algorithm="HS256")


def test_session_opened_with_a_jwt_ends_when_the_jwt_expires(revgate: GatewayProcess) -> None:
    credential = make_jwt(f"jwt-{uuid.uuid4().hex[:8]}@acme.test", lifetime=3)
    expires = jwt.decode(credential, options={"verify_signature": False})["exp"]
    with browser(revgate) as client:
        sign_in(client, token=credential)
        assert signed_in(client)
        time.sleep(max(0.0, expires - time.time()) + 0.5)
        assert not signed_in(client)


def test_tokens_jwt_users_mint_expire_within_the_max_age(
    revgate: GatewayProcess, gateway: GatewayProcess
) -> None:
    email = f"jwt-{uuid.uuid4().hex[:8]}@acme.test"
    credential = make_jwt(email)
    day = time.time() + 86400 + 60
    unasked = mint(revgate, credential)
    assert unasked["expires_at"] is not None and unasked["expires_at"] <= day
    asked_for_a_month = mint(revgate, credential, expires_days=30)
    assert asked_for_a_month["expires_at"] is not None
    assert asked_for_a_month["expires_at"] <= day
    # A token minted with that token lives no longer than it.
    child = mint(revgate, unasked["token"])
    assert child["expires_at"] is not None and child["expires_at"] <= unasked["expires_at"]
    # An admin may mint a lasting token for the same user.
    by_admin = mint(revgate, gateway.tokens["admin@acme.test"], user=email)
    assert by_admin["expires_at"] is None


# --- the schema ---


def test_migration_9_adds_the_origin_columns_to_an_older_database(
    fresh_database_url: str,
) -> None:
    db = open_database(fresh_database_url)
    migrate(db)
    added = {
        "proxy_token": ["visdom_session", "visdom_checked_at"],
        "web_session": ["via", "token_id", "expires_at", "visdom_session", "visdom_checked_at"],
    }
    # The database as migration 6 left it: without the columns, and without version 9.
    for table, columns in added.items():
        for column in columns:
            db.execute_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    SchemaVersion.delete().where(SchemaVersion.version == 9).execute()
    assert migrate(db) == [9]
    for table, columns in added.items():
        assert set(columns) <= {c.name for c in db.get_columns(table)}
    assert migrate(db) == []
    db.close()
