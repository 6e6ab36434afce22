"""Sessions pushed to Visdom Trace with their user's own Visdom Trace credential (issue 18):
a real ``tvgate serve`` signed into by Visdom Trace users (``tvs_`` sessions of the login
stand-in, tests/fake_visdom.py; Keycloak access tokens of its single-tenant mode) pushes
each user's sessions to the ingestion stand-in with that user's token, which the
stand-in checks as Visdom Trace does, and falls back to the org ingest key when the token
has expired or Visdom Trace refuses it. No token is ever at rest in plaintext, in a log
line or in an answer. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import VaultEnv, scrape
from tests.fake_visdom import FakeUser, FakeVisdom
from tests.fake_visdom_ingest import FakeVisdomIngest
from tests.harness import GatewayProcess, launch_gateway, visdom_env
from tests.test_visdom_login import tenant_env
from tests.test_visdom_sink import (
    INGEST_KEY,
    PUSH,
    REPO,
    _xsrf,
    assert_claude_session,
    assert_clean,
    claude_session,
    connect,
    ended,
    status,
    wait_for,
)
from tvgate.models import VisdomCredential


@pytest.fixture
def visdom() -> Iterator[FakeVisdom]:
    """A multi-org Visdom Trace whose org acme is tvgate's acme."""
    fake = FakeVisdom().start()
    fake.add_org("acme")
    yield fake
    fake.stop()


@pytest.fixture
def ingest(visdom: FakeVisdom) -> Iterator[FakeVisdomIngest]:
    fake = FakeVisdomIngest(INGEST_KEY, login=visdom).start()
    yield fake
    fake.stop()


@pytest.fixture
def gateway(
    seeded: tuple[str, Path, dict[str, str]], visdom: FakeVisdom, ingest: FakeVisdomIngest
) -> Iterator[GatewayProcess]:
    url, data_dir, tokens = seeded
    with launch_gateway(url, data_dir, tokens, **PUSH, **visdom_env(visdom.url)) as gw:
        linked = gw.cli("orgs", "link", "acme", "--visdom-org-id", visdom.orgs["acme"].org_id)
        assert linked.returncode == 0, linked.stderr
        connect(gw, ingest)
        yield gw


def developer(visdom: FakeVisdom, name: str) -> tuple[FakeUser, str]:
    """A developer of acme at Visdom Trace and a session token of theirs."""
    person = visdom.add_user(
        f"{name}-{uuid.uuid4().hex[:6]}@acme.test", "pw", {"acme": "developer"}
    )
    return person, visdom.issue_session(person)


def signed_in_session(gw: GatewayProcess, session: str, token: str) -> list[Any]:
    """A Claude Code-shaped session (tool call and result) signed in with ``token``."""
    return claude_session(
        gw, session, f"prompt of {session}", **{"x-api-key": token, "x-tracevault-repo": REPO}
    )


def credential_rows(gw: GatewayProcess) -> list[VisdomCredential]:
    gw.bind()
    return list(VisdomCredential.select())


def everything_stored(gw: GatewayProcess) -> bytes:
    """What is at rest: every file of the data directory (the SQLite database and its
    journal, the spool, the gateway's log) and, on PostgreSQL, every row of every table."""
    files = b"".join(p.read_bytes() for p in gw.data_dir.rglob("*") if p.is_file())
    rows = b"" if gw.database_url.startswith("sqlite") else gw.dump_database().encode()
    return files + rows


def answers_shown(gw: GatewayProcess) -> str:
    """What an admin is shown of the push: the CLI's status (text and JSON), the API's and
    the UI page's."""
    admin = gw.tokens["admin@acme.test"]
    text = gw.cli("visdom", "status", "--org", "acme").stdout
    api = httpx2.get(gw.url + "/api/v1/visdom", headers={"authorization": "Bearer " + admin})
    assert api.status_code == 200, api.text
    with httpx2.Client(base_url=gw.url, timeout=30) as browser:
        form = {"_xsrf": _xsrf(browser.get("/ui/login").text), "token": admin}
        assert browser.post("/ui/login", data=form).status_code == 302
        page = browser.get("/ui/visdom")
        assert page.status_code == 200
    return "\n".join((text, orjson.dumps(status(gw)).decode(), api.text, page.text))


def test_each_users_session_is_pushed_with_their_own_visdom_token(
    gateway: GatewayProcess, visdom: FakeVisdom, ingest: FakeVisdomIngest
) -> None:
    ada, ada_token = developer(visdom, "ada")
    bob, bob_token = developer(visdom, "bob")
    answers = {
        "cc-ada": signed_in_session(gateway, "cc-ada", ada_token),
        "cc-bob": signed_in_session(gateway, "cc-bob", bob_token),
        # A tvgate token: no Visdom Trace credential of the user's, the org key.
        "cc-dev": signed_in_session(gateway, "cc-dev", gateway.tokens["dev@acme.test"]),
    }
    wait_for(ended(ingest, *answers), 60, lambda: str(status(gateway)))
    assert_clean(ingest)
    for sid, answered in answers.items():
        assert_claude_session(ingest.session(sid), answered, f"prompt of {sid}")
    ada_events, bob_events = ingest.credentials("cc-ada"), ingest.credentials("cc-bob")
    assert set(ada_events) == {ada.user_id} and set(bob_events) == {bob.user_id}
    org_events = ingest.credentials("cc-dev")
    assert set(org_events) == {"org"}

    rows = credential_rows(gateway)
    assert len(rows) == 2 and all(row.ciphertext.startswith("local:v1:") for row in rows)
    # Good for Visdom Trace's 30 days from the push that last used it.
    assert all(row.kind == "tvs" and row.expires_at > time.time() + 29 * 86400 for row in rows)
    # Sealed once per user, not on each of their calls.
    assert gateway.log_text().count("kept the Visdom Trace credential of user") == 2
    shown = status(gateway)
    assert shown["sent_with_user_credential"] == len(ada_events) + len(bob_events)
    assert shown["sent_with_org_key"] == len(org_events)
    assert shown["user_credentials"] == 2
    metrics = scrape(gateway.url)
    assert metrics['tvgate_visdom_sent_total{credential="user"}'] == len(ada_events + bob_events)

    # Never at rest in plaintext, in a log line or in an answer.
    stored, seen = everything_stored(gateway), answers_shown(gateway)
    assert "with users' own credentials" in seen and 'id="sent-user">' in seen
    for token in (ada_token, bob_token):
        assert token.encode() not in stored
        assert token not in seen
        assert token[4:] not in gateway.log_text()


def test_a_token_visdom_trace_revoked_falls_back_to_the_org_key_at_once(
    gateway: GatewayProcess, visdom: FakeVisdom, ingest: FakeVisdomIngest
) -> None:
    """Refused (401) for the user's token, each event goes again with the org key in the
    same round: delivered once, nothing parked."""
    _carol, token = developer(visdom, "carol")
    ingest.stop()  # the events wait while the token is revoked
    answers = signed_in_session(gateway, "cc-revoked", token)
    wait_for(lambda: len(credential_rows(gateway)) == 1, 30, lambda: str(status(gateway)))
    visdom.revoke(token)
    ingest.start()
    wait_for(ended(ingest, "cc-revoked"), 90, lambda: str(status(gateway)))
    assert_clean(ingest)
    assert_claude_session(ingest.session("cc-revoked"), answers, "prompt of cc-revoked")
    delivered = ingest.credentials("cc-revoked")
    assert set(delivered) == {"org"}
    assert ingest.answers[401] == 1  # the first try with the token; none after the drop
    shown = status(gateway)
    assert shown["parked_count"] == 0 and shown["pending"] == 0
    assert shown["sent_with_org_key"] == len(delivered)
    assert shown["sent_with_user_credential"] == 0 and shown["user_credentials"] == 0
    (row,) = credential_rows(gateway)
    assert row.ciphertext == ""  # dropped; its fingerprint keeps the same token out


def test_a_keycloak_token_is_used_until_it_expires_then_the_org_key(
    seeded: tuple[str, Path, dict[str, str]],
) -> None:
    """A single-tenant Visdom Trace: each user's Keycloak access token (checked by tvgate)
    carries their session while it is good; one that expired before its events went is
    deleted, and its events go with the org key."""
    url, data_dir, tokens = seeded
    tenant = FakeVisdom(single_tenant=True).start()
    ingest = FakeVisdomIngest(INGEST_KEY, login=tenant).start()
    try:
        with launch_gateway(url, data_dir, tokens, **PUSH, **tenant_env(tenant)) as gw:
            connect(gw, ingest)
            lasting = tenant.add_tracing_user(f"kc-{uuid.uuid4().hex[:6]}@acme.test", ["tracing"])
            brief = tenant.add_tracing_user(f"kc-{uuid.uuid4().hex[:6]}@acme.test", ["tracing"])
            brief_token = tenant.mint(brief, lifetime=8)
            ingest.stop()
            answers = {
                "cc-lasting": signed_in_session(gw, "cc-lasting", tenant.mint(lasting)),
                "cc-brief": signed_in_session(gw, "cc-brief", brief_token),
            }
            wait_for(lambda: len(credential_rows(gw)) == 2, 30, lambda: str(status(gw)))
            expires = {row.user_id: row.expires_at for row in credential_rows(gw)}
            # Until the short token has expired, nothing is delivered.
            wait_for(
                lambda: tenant.user_of_jwt(brief_token) is None,
                30,
                lambda: f"the token of {brief.email} did not expire",
            )
            ingest.start()
            wait_for(ended(ingest, *answers), 90, lambda: str(status(gw)))
            assert_clean(ingest)
            for sid, answered in answers.items():
                assert_claude_session(ingest.session(sid), answered, f"prompt of {sid}")
            assert set(ingest.credentials("cc-lasting")) == {lasting.user_id}
            assert set(ingest.credentials("cc-brief")) == {"org"}
            assert ingest.answers[401] == 0  # the expired token was never sent
            (row,) = credential_rows(gw)
            assert row.kind == "jwt" and row.expires_at == max(expires.values())
            assert brief_token.encode() not in everything_stored(gw)
    finally:
        ingest.stop()
        tenant.stop()


def test_with_vault_the_credential_is_sealed_by_vault_transit(
    seeded: tuple[str, Path, dict[str, str]],
    visdom: FakeVisdom,
    ingest: FakeVisdomIngest,
    vault: VaultEnv,
) -> None:
    """On a Vault keyring the user's token is sealed by Vault's transit engine, as provider
    keys are, and opened there to push their session."""
    url, data_dir, tokens = seeded
    env = {**PUSH, **visdom_env(visdom.url), **vault.env()}
    with launch_gateway(url, data_dir, tokens, **env) as gw:
        linked = gw.cli("orgs", "link", "acme", "--visdom-org-id", visdom.orgs["acme"].org_id)
        assert linked.returncode == 0, linked.stderr
        connect(gw, ingest)
        person, token = developer(visdom, "vera")
        answers = signed_in_session(gw, "cc-vault", token)
        wait_for(ended(ingest, "cc-vault"), 60, lambda: str(status(gw)))
        assert_clean(ingest)
        assert_claude_session(ingest.session("cc-vault"), answers, "prompt of cc-vault")
        assert set(ingest.credentials("cc-vault")) == {person.user_id}
        (row,) = credential_rows(gw)
        assert row.ciphertext.startswith("vault:v")
        assert token.encode() not in everything_stored(gw)
