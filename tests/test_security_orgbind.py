"""Review findings 16.3 and 16.5 through the real gateway: outside orgs and users are bound
by their ids, never taken over by a name or an email.

16.3: an org that Visdom Trace (or a JWT issuer) names like a tvgate org, but whose id is
not the one that tvgate org is linked to, is refused; linking is an operator's explicit
``tvgate orgs link``. 16.5: a token with a new user id and someone's email never becomes
that someone; an unbound local user is linked by email only when the operator turned
``link_users_by_email`` on and the JWT says ``email_verified: true``.

The gateways run on a database of their own (SQLite and PostgreSQL), so the other
identity tests' Visdom Trace orgs do not meet these.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import jwt
import orjson
import peewee
import pytest

from tests.conftest import (
    GatewayProcess,
    launch_gateway,
    own_postgres,
    seed_users,
    stop_gateway,
    visdom_env,
)
from tests.fake_visdom import FakeVisdom
from tvgate.db import migrate, open_database
from tvgate.models import AuditEvent, Org, SchemaVersion, User

ISSUER = "https://issuer.orgbind.test"
HMAC_SECRET = "orgbind-hmac-" + secrets.token_hex(16)
PASSWORD = "correct horse battery staple"
BODY = orjson.dumps(
    {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def own_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A seeded database of this module's own: org acme (admin, member) and org other."""
    data_dir = tmp_path_factory.mktemp("orgbind")
    if request.param == "sqlite":
        url = f"sqlite:///{data_dir / 'tvgate.db'}"
        yield url, data_dir, seed_users(url)
        return
    with own_postgres(data_dir) as url:
        yield url, data_dir, seed_users(url)


def _identity_gateway(
    own_database: tuple[str, Path, dict[str, str]], visdom: FakeVisdom, **env: str
) -> GatewayProcess:
    url, data_dir, tokens = own_database
    return launch_gateway(
        url,
        data_dir,
        tokens,
        **visdom_env(visdom.url),
        TVGATE_JWT_ISSUER=ISSUER,
        TVGATE_JWT_ALGORITHMS="HS256",
        TVGATE_JWT_SECRET=HMAC_SECRET,
        TVGATE_LOGIN_ATTEMPTS="1000",
        **env,
    )


@pytest.fixture(scope="module")
def orggate(
    own_database: tuple[str, Path, dict[str, str]], visdom: FakeVisdom
) -> Iterator[GatewayProcess]:
    """Visdom Trace and a JWT issuer, every identity setting at its default."""
    gw = _identity_gateway(own_database, visdom)
    yield gw
    stop_gateway(gw.proc)


@pytest.fixture(scope="module")
def linking(
    own_database: tuple[str, Path, dict[str, str]], visdom: FakeVisdom
) -> Iterator[GatewayProcess]:
    """The same, with the operator's opt-in to link unbound local users by verified email."""
    gw = _identity_gateway(own_database, visdom, TVGATE_LINK_USERS_BY_EMAIL="true")
    yield gw
    stop_gateway(gw.proc)


def make_jwt(sub: str, email: str, org: str, role: str = "developer", **extra: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": sub, "email": email, "org": org, "role": role}
    return jwt.encode(
        {**claims, "iat": now, "exp": now + 300, **extra}, HMAC_SECRET, algorithm="HS256"
    )


def me(gw: GatewayProcess, token: str) -> httpx2.Response:
    return httpx2.get(
        gw.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def refusals(gw: GatewayProcess, org_name: str) -> list[AuditEvent]:
    gw.bind()
    org = Org.get(Org.name == org_name)
    return list(AuditEvent.select().where((AuditEvent.org_id == org.id) & ~AuditEvent.allowed))


def add_local_user(gw: GatewayProcess, email: str, org: str) -> None:
    added = gw.cli("users", "add", email, "--org", org, "--admin")
    assert added.returncode == 0, added.stderr


# --- 16.3: orgs are bound by the outside org's id ---


def test_visdom_org_named_like_a_tvgate_org_is_refused_until_an_operator_links_it(
    orggate: GatewayProcess, visdom: FakeVisdom
) -> None:
    name = unique("corp")
    add_local_user(orggate, f"boss@{name}.test", name)  # an org made in tvgate
    intruder = visdom.add_user(f"intruder@{name}.test", PASSWORD, {name: "owner"})
    visdom_org_id = visdom.orgs[name].org_id
    token = visdom.issue_session(intruder)

    refused = me(orggate, token)
    assert refused.status_code == 403, refused.text
    message = refused.json()["error"]["message"]
    assert f"org {name!r} exists in tvgate but is not linked to this Visdom Trace org" in message
    assert f"tvgate orgs link {name} --visdom-org-id {visdom_org_id}" in message
    # Each API answers in its own envelope.
    anthropic = httpx2.post(
        orggate.url + "/v1/messages",
        content=BODY,
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert anthropic.status_code == 403
    assert anthropic.json()["type"] == "error"
    assert "not linked" in anthropic.json()["error"]["message"]
    openai = httpx2.post(
        orggate.url + "/v1/chat/completions",
        content=BODY,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert openai.status_code == 403
    assert "not linked" in openai.json()["error"]["message"]

    orggate.bind()
    org = Org.get(Org.name == name)
    assert org.external_id is None
    assert not User.select().where(User.email == intruder.email).exists()
    refused_events = refusals(orggate, name)
    assert refused_events and refused_events[-1].actor == intruder.email
    assert visdom_org_id in refused_events[-1].change

    # The operator's explicit link is what lets Visdom Trace's org in.
    linked = orggate.cli("orgs", "link", name, "--visdom-org-id", visdom_org_id)
    assert linked.returncode == 0, linked.stderr
    accepted = me(orggate, token).json()
    assert (accepted["email"], accepted["org"], accepted["role"]) == (intruder.email, name, "admin")
    orggate.bind()
    assert Org.get(Org.name == name).external_id == visdom_org_id
    events = AuditEvent.select().where(
        (AuditEvent.org_id == org.id) & (AuditEvent.action == "link org")
    )
    assert [e.allowed for e in events] == [True]
    listed = orggate.cli("orgs", "list")
    assert listed.returncode == 0, listed.stderr
    assert any(name in line and visdom_org_id in line for line in listed.stdout.splitlines())


def test_visdom_org_with_a_linked_name_but_another_id_is_refused(
    orggate: GatewayProcess, visdom: FakeVisdom
) -> None:
    name = unique("globex")
    owner = visdom.add_user(f"owner@{name}.test", PASSWORD, {name: "owner"})
    first = me(orggate, visdom.issue_session(owner))
    # First sight of an outside org no tvgate org is named like: created, bound to its id.
    assert first.status_code == 200 and first.json()["role"] == "admin", first.text
    bound_id = visdom.orgs[name].org_id
    orggate.bind()
    assert Org.get(Org.name == name).external_id == bound_id

    # Another Visdom Trace org of the same name (renamed, or re-made after a deletion).
    impostor_org = visdom.add_org(name)
    intruder = visdom.add_user(f"intruder@{name}.test", PASSWORD, {name: "owner"})
    refused = me(orggate, visdom.issue_session(intruder))
    assert refused.status_code == 403, refused.text
    message = refused.json()["error"]["message"]
    assert f"org {name!r} in tvgate is linked to another Visdom Trace org" in message
    assert impostor_org.org_id != bound_id
    orggate.bind()
    assert Org.get(Org.name == name).external_id == bound_id
    assert not User.select().where(User.email == intruder.email).exists()


def test_jwt_org_is_bound_by_issuer_and_org_claim(
    orggate: GatewayProcess, visdom: FakeVisdom
) -> None:
    name = unique("corp")
    add_local_user(orggate, f"boss@{name}.test", name)
    token = make_jwt(unique("sub"), f"intruder@{name}.test", name, role="owner")
    refused = me(orggate, token)
    assert refused.status_code == 403, refused.text
    message = refused.json()["error"]["message"]
    assert f"org {name!r} exists in tvgate but is not linked to this JWT issuer's org" in message
    assert f"tvgate orgs link {name} --jwt-org {name}" in message

    linked = orggate.cli("orgs", "link", name, "--jwt-org", name)
    assert linked.returncode == 0, linked.stderr
    accepted = me(orggate, token)
    assert accepted.status_code == 200, accepted.text
    assert (accepted.json()["org"], accepted.json()["role"]) == (name, "admin")

    # A JWT org no tvgate org is named like is created on first sight, bound to the issuer
    # and the claim; Visdom Trace's org of that name is not let in by the name.
    fresh = unique("newco")
    created = me(orggate, make_jwt(unique("sub"), f"dev@{fresh}.test", fresh))
    assert created.status_code == 200, created.text
    orggate.bind()
    org = Org.get(Org.name == fresh)
    assert (org.jwt_issuer, org.jwt_org, org.external_id) == (ISSUER, fresh, None)
    person = visdom.add_user(f"visdom@{fresh}.test", PASSWORD, {fresh: "owner"})
    assert me(orggate, visdom.issue_session(person)).status_code == 403


def test_link_refuses_an_outside_org_already_linked_to_another_org(
    orggate: GatewayProcess,
) -> None:
    first, second = unique("one"), unique("two")
    add_local_user(orggate, f"a@{first}.test", first)
    add_local_user(orggate, f"a@{second}.test", second)
    outside = str(uuid.uuid4())
    assert orggate.cli("orgs", "link", first, "--visdom-org-id", outside).returncode == 0
    taken = orggate.cli("orgs", "link", second, "--visdom-org-id", outside)
    assert taken.returncode == 1
    assert f"already linked to tvgate org {first!r}" in taken.stderr
    assert orggate.cli("orgs", "link", first, "--jwt-org", "shared").returncode == 0
    taken = orggate.cli("orgs", "link", second, "--jwt-org", "shared")
    assert taken.returncode == 1 and f"already linked to tvgate org {first!r}" in taken.stderr
    missing = orggate.cli("orgs", "link", unique("nope"), "--visdom-org-id", str(uuid.uuid4()))
    assert missing.returncode == 1 and "no org named" in missing.stderr
    orggate.bind()
    second_org = Org.get(Org.name == second)
    assert (second_org.external_id, second_org.jwt_org) == (None, None)
    refused = AuditEvent.select().where(
        (AuditEvent.org_id == second_org.id) & (AuditEvent.action == "link org")
    )
    assert [e.allowed for e in refused] == [False, False]


def test_ui_sign_in_says_the_org_is_not_linked(orggate: GatewayProcess, visdom: FakeVisdom) -> None:
    name = unique("corp")
    add_local_user(orggate, f"boss@{name}.test", name)
    intruder = visdom.add_user(f"intruder@{name}.test", PASSWORD, {name: "owner"})
    with httpx2.Client(base_url=orggate.url, follow_redirects=False, timeout=30) as client:
        page = client.get("/ui/login")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        assert xsrf is not None
        answer = client.post(
            "/ui/login",
            data={"_xsrf": xsrf.group(1), "email": intruder.email, "password": PASSWORD},
        )
        assert answer.status_code == 403, answer.status_code
        assert "exists in tvgate but is not linked to this Visdom Trace org" in answer.text
        assert f"tvgate orgs link {name} --visdom-org-id {visdom.orgs[name].org_id}" in answer.text
        assert "tvgate_session" not in answer.headers.get("set-cookie", "")


# --- 16.5: users are bound by the outside user's id ---


def test_jwt_with_a_new_sub_and_a_bound_users_email_does_not_become_them(
    orggate: GatewayProcess,
) -> None:
    org = unique("jwtco")
    email = f"m2@{org}.test"
    m2_sub = unique("m2")
    m2 = make_jwt(m2_sub, email, org, role="owner")
    assert me(orggate, m2).json()["role"] == "admin"
    minted = httpx2.post(
        orggate.url + "/api/v1/tokens",
        json={"name": "m2-private"},
        headers={"Authorization": f"Bearer {m2}"},
        timeout=30,
    )
    assert minted.status_code == 201, minted.text

    intruder = make_jwt(unique("evil"), email, org, role="developer", email_verified=True)
    refused = me(orggate, intruder)
    assert refused.status_code == 403, refused.text
    assert "already linked to another identity" in refused.json()["error"]["message"]
    listed = httpx2.get(
        orggate.url + "/api/v1/tokens",
        headers={"Authorization": f"Bearer {intruder}"},
        timeout=30,
    )
    assert listed.status_code == 403 and "m2-private" not in listed.text

    orggate.bind()
    row = User.get(User.email == email)
    assert (row.external_id, row.role) == (m2_sub, "admin")
    assert me(orggate, m2).json()["role"] == "admin"
    assert refusals(orggate, org)[-1].target == email


def test_visdom_bound_admin_is_not_taken_over_by_a_jwt_with_their_email(
    orggate: GatewayProcess, visdom: FakeVisdom
) -> None:
    org = unique("vco")
    admin = visdom.add_user(f"m2@{org}.test", PASSWORD, {org: "owner"})
    assert me(orggate, visdom.issue_session(admin)).json()["role"] == "admin"
    intruder = make_jwt(unique("evil"), admin.email, org, role="developer", email_verified=True)
    assert me(orggate, intruder).status_code == 403
    # Even with the org linked to the issuer too, the user stays Visdom Trace's.
    linked = orggate.cli("orgs", "link", org, "--jwt-org", org)
    assert linked.returncode == 0, linked.stderr
    refused = me(orggate, intruder)
    assert refused.status_code == 403, refused.text
    assert "already linked to another identity" in refused.json()["error"]["message"]
    orggate.bind()
    row = User.get(User.email == admin.email)
    assert (row.external_id, row.role) == (admin.user_id, "admin")


def test_unbound_local_user_is_not_linked_by_email_by_default(orggate: GatewayProcess) -> None:
    org = unique("jwtco")
    assert me(orggate, make_jwt(unique("sub"), f"first@{org}.test", org)).status_code == 200
    email = f"local@{org}.test"
    add_local_user(orggate, email, org)
    intruder = make_jwt(unique("sub"), email, org, role="developer", email_verified=True)
    refused = me(orggate, intruder)
    assert refused.status_code == 403, refused.text
    assert "not linked" in refused.json()["error"]["message"]
    orggate.bind()
    row = User.get(User.email == email)
    assert (row.external_id, row.role) == (None, "admin")


def test_email_linking_opt_in_needs_a_verified_email(linking: GatewayProcess) -> None:
    org = unique("jwtco")
    assert me(linking, make_jwt(unique("sub"), f"first@{org}.test", org)).status_code == 200
    email = f"local@{org}.test"
    add_local_user(linking, email, org)
    for verified in (None, False, "true", 1):
        extra: dict[str, Any] = {} if verified is None else {"email_verified": verified}
        refused = me(linking, make_jwt(unique("sub"), email, org, **extra))
        assert refused.status_code == 403, (verified, refused.text)
    sub = unique("sub")
    accepted = me(linking, make_jwt(sub, email, org, role="admin", email_verified=True))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["email"] == email
    linking.bind()
    assert User.get(User.email == email).external_id == sub
    # Once linked, the user is that identity's: another verified sub is refused.
    again = me(linking, make_jwt(unique("sub"), email, org, email_verified=True))
    assert again.status_code == 403, again.text
    assert User.get(User.email == email).external_id == sub


def test_visdom_sign_in_is_never_linked_by_email(
    linking: GatewayProcess, visdom: FakeVisdom
) -> None:
    org = unique("vco")
    first = visdom.add_user(f"first@{org}.test", PASSWORD, {org: "developer"})
    assert me(linking, visdom.issue_session(first)).status_code == 200
    email = f"local@{org}.test"
    add_local_user(linking, email, org)
    # Visdom Trace's answer does not say the email was verified: never linked by it.
    person = visdom.add_user(email, PASSWORD, {org: "developer"})
    refused = me(linking, visdom.issue_session(person))
    assert refused.status_code == 403, refused.text
    linking.bind()
    row = User.get(User.email == email)
    assert (row.external_id, row.role) == (None, "admin")


def test_migration_8_binds_jwt_orgs_on_an_existing_database(fresh_database_url: str) -> None:
    db = open_database(fresh_database_url)
    migrate(db)
    # The org table as it was before migration 8.
    db.execute_sql("DROP INDEX org_jwt_issuer_jwt_org")
    for column in ("jwt_issuer", "jwt_org"):
        db.execute_sql(f"ALTER TABLE org DROP COLUMN {column}")
    SchemaVersion.delete().where(SchemaVersion.version == 8).execute()
    assert migrate(db) == [8]
    Org.create(name=unique("a"), jwt_issuer=ISSUER, jwt_org="x")
    for _ in range(2):
        Org.create(name=unique("unbound"))  # orgs bound to no JWT org never collide
    with pytest.raises(peewee.IntegrityError), db.atomic():
        Org.create(name=unique("b"), jwt_issuer=ISSUER, jwt_org="x")
    db.close()
