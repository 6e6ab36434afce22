"""Today's Visdom Trace login through the real proxy: a single-tenant server signing people
in at Keycloak, its ``tvk_`` org keys, its extractor's answers, and its own proxy path.

The stand-in is tests/fake_visdom.py in its single-tenant mode (no ``/api/v1/me/orgs``,
``role`` in ``/api/v1/auth/me``, a 403 without the tracing role, ``public-config`` naming
an OIDC issuer that the stand-in also plays, with discovery and a JWKS). The gateway is
given only ``TVGATE_VISDOM_URL`` and the org its users act in: the issuer, its keys and
the audience it learns from Visdom Trace.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import jwt
import openai
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.clients import Setup, claude_bash_session, run_claude
from tests.conftest import GatewayProcess, beside, visdom_env
from tests.fake_provider import FakeProvider
from tests.fake_visdom import FakeUser, FakeVisdom
from tvgate.models import Org, User

BODY = orjson.dumps(
    {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
)
CHAT_BODY = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def tenant() -> Iterator[FakeVisdom]:
    fake = FakeVisdom(single_tenant=True).start()
    yield fake
    fake.stop()


#: Seconds between two JWKS fetches of the module's gateway: long enough that the calls
#: after a fetch fall within it on a loaded machine.
REFETCH_INTERVAL = 5.0


def tenant_env(fake: FakeVisdom, refetch_interval: float = 1.0) -> dict[str, str]:
    """A gateway for a single-tenant Visdom Trace: its URL and the org its people act in,
    nothing of the issuer (it comes from Visdom Trace's public config)."""
    return {
        **visdom_env(fake.url),
        "TVGATE_PINNED_ORG": "acme",
        "TVGATE_JWT_JWKS_REFETCH_INTERVAL": str(refetch_interval),
    }


@pytest.fixture(scope="module")
def stgate(gateway: GatewayProcess, tenant: FakeVisdom) -> Iterator[GatewayProcess]:
    with beside(gateway, **tenant_env(tenant, REFETCH_INTERVAL)) as gw:
        yield gw


def unique_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@acme.test"


def call(
    gw: GatewayProcess, token: str, path: str = "/v1/messages", *, api_key: bool = False
) -> httpx2.Response:
    headers = {"x-api-key": token} if api_key else {"Authorization": f"Bearer {token}"}
    if "chat" in path:
        return httpx2.post(gw.url + path, content=CHAT_BODY, headers=headers, timeout=30)
    headers["anthropic-version"] = "2023-06-01"
    if path.endswith("/models"):
        return httpx2.get(gw.url + path, headers=headers, timeout=30)
    return httpx2.post(gw.url + path, content=BODY, headers=headers, timeout=30)


def tracing_user(
    tenant: FakeVisdom, prefix: str, *roles: str, name: str | None = "Ada"
) -> FakeUser:
    return tenant.add_tracing_user(unique_email(prefix), list(roles), name=name)


# --- single tenant: org and role ---


def test_single_tenant_org_is_pinned_and_role_comes_from_auth_me(
    stgate: GatewayProcess, tenant: FakeVisdom
) -> None:
    for realm_roles, expected in ((["tracing"], "member"), (["tracing", "tracing-admin"], "admin")):
        person = tracing_user(tenant, "st", *realm_roles)
        response = call(stgate, tenant.mint(person))
        assert response.status_code == 200, response.text
        stgate.bind()
        user = User.get(User.external_id == person.user_id)
        assert (user.role, user.email, user.name, user.org.name) == (
            expected,
            person.email,
            "Ada",
            "acme",
        )
    assert tenant.calls["orgs"] >= 1  # asked, answered 404, and the pinned org was taken


def test_without_a_pinned_org_the_one_org_connected_to_this_server_is_taken(
    gateway: GatewayProcess, tenant: FakeVisdom
) -> None:
    """No TVGATE_PINNED_ORG: the org whose ingestion is connected to the gateway's
    TVGATE_VISDOM_URL, when there is exactly one; none or two of them, the 403."""

    def connect(org: str) -> None:
        done = gw.cli(
            "visdom", "connect", "--org", org, "--url", tenant.url + "/", "--key-stdin",
            stdin="tvk_" + "k" * 32 + "\n",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    with beside(gateway, **visdom_env(tenant.url)) as gw:
        alone = call(gw, tenant.mint(tracing_user(tenant, "unpinned", "tracing")))
        assert alone.status_code == 403, alone.text
        assert "TVGATE_PINNED_ORG" in alone.json()["error"]["message"]
        try:
            connect("acme")
            person = tracing_user(tenant, "unpinned", "tracing")
            response = call(gw, tenant.mint(person))
            assert response.status_code == 200, response.text
            gw.bind()
            assert User.get(User.external_id == person.user_id).org.name == "acme"
            connect("other")
            two = call(gw, tenant.mint(tracing_user(tenant, "unpinned", "tracing")))
            assert two.status_code == 403, two.text
        finally:
            for org in ("acme", "other"):
                gw.cli("visdom", "disconnect", "--org", org)


def test_null_name_is_an_empty_name(stgate: GatewayProcess, tenant: FakeVisdom) -> None:
    person = tracing_user(tenant, "noname", "tracing", name=None)
    assert call(stgate, tenant.mint(person)).status_code == 200
    stgate.bind()
    assert User.get(User.external_id == person.user_id).name == ""


def test_no_tracing_role_is_403_with_visdom_traces_message(
    stgate: GatewayProcess, tenant: FakeVisdom
) -> None:
    person = tracing_user(tenant, "norole")
    token = tenant.mint(person)
    anthropic_answer = call(stgate, token)
    assert anthropic_answer.status_code == 403, anthropic_answer.text
    error = anthropic_answer.json()["error"]
    assert error["type"] == "permission_error"
    assert tenant.no_role_message in error["message"]
    openai_answer = call(stgate, token, "/v1/chat/completions")
    assert openai_answer.status_code == 403, openai_answer.text
    assert tenant.no_role_message in openai_answer.json()["error"]["message"]
    stgate.bind()
    assert User.get_or_none(User.external_id == person.user_id) is None


def test_the_issuer_is_learnt_once_from_public_config(
    stgate: GatewayProcess, tenant: FakeVisdom
) -> None:
    person = tracing_user(tenant, "cfg", "tracing")
    assert call(stgate, tenant.mint(person)).status_code == 200
    learnt = (tenant.calls["public-config"], tenant.calls["discovery"], tenant.calls["certs"])
    for _ in range(3):
        assert call(stgate, tenant.mint(tracing_user(tenant, "cfg", "tracing"))).status_code == 200
    after = (tenant.calls["public-config"], tenant.calls["discovery"], tenant.calls["certs"])
    assert after == learnt


# --- Keycloak tokens are checked against the issuer's keys ---


def _hmac_with_public_key(tenant: FakeVisdom, person: FakeUser) -> str:
    """HS256 keyed with the issuer's RSA public key, by hand (key confusion)."""
    public = tenant.signing_keys[tenant.signing_kid].public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": tenant.signing_kid})
    good = tenant.mint(person)
    claims = jwt.decode(good, options={"verify_signature": False})
    parts = [base64.urlsafe_b64encode(p).rstrip(b"=") for p in (head, orjson.dumps(claims))]
    signing_input = b".".join(parts)
    signature = base64.urlsafe_b64encode(hmac.new(pem, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature.rstrip(b"=")).decode()


def _forged(tenant: FakeVisdom, person: FakeUser) -> dict[str, str]:
    now = int(time.time())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = tenant.mint(person)
    head, payload, _signature = good.split(".")
    none_head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    claims = jwt.decode(good, options={"verify_signature": False})
    return {
        "expired": tenant.mint(person, exp=now - 120),
        "wrong issuer": tenant.mint(person, iss="https://evil.test/realms/tracevault"),
        "wrong audience": tenant.mint(person, aud="someone-else"),
        "no subject": tenant.mint(person, sub=None),
        "alg none": f"{none_head}.{payload}.",
        "hs256 with the public key": _hmac_with_public_key(tenant, person),
        "unknown signer, known kid": jwt.encode(
            claims, stranger, algorithm="RS256", headers={"kid": tenant.signing_kid}
        ),
        "tampered": head + "." + payload[:-4] + "AAAA." + _signature,
    }


def test_forged_keycloak_tokens_are_401_and_never_reach_visdom_or_the_provider(
    stgate: GatewayProcess, tenant: FakeVisdom, fake_provider: FakeProvider
) -> None:
    person = tracing_user(tenant, "forged", "tracing", "tracing-admin")
    assert call(stgate, tenant.mint(person)).status_code == 200  # the issuer is known
    for name, token in _forged(tenant, person).items():
        asked, sent = tenant.calls["me"], len(fake_provider.requests)
        response = call(stgate, token)
        assert response.status_code == 401, f"{name}: {response.status_code} {response.text}"
        assert response.json()["error"]["type"] == "authentication_error", name
        assert tenant.calls["me"] == asked, name
        assert len(fake_provider.requests) == sent, name
        assert token not in tenant.bearers, name


def test_a_rotated_key_is_fetched_on_its_unknown_kid_once(
    stgate: GatewayProcess, tenant: FakeVisdom
) -> None:
    person = tracing_user(tenant, "rotate", "tracing")
    assert call(stgate, tenant.mint(person)).status_code == 200
    tenant.rotate_key()
    token = tenant.mint(person)
    # Made before the fetch: a key takes a while to make on a busy machine, and the
    # unknown kids must arrive within the refetch interval.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(token, options={"verify_signature": False})
    strangers = [
        jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": f"kc-nope{i}"})
        for i in range(3)
    ]
    time.sleep(REFETCH_INTERVAL + 0.1)  # since the gateway's last fetch
    fetched = tenant.calls["certs"]
    response = call(stgate, token)
    assert (response.status_code, tenant.calls["certs"]) == (200, fetched + 1), response.text
    # Unknown kids right after a fetch do not make tvgate hammer the issuer.
    assert [call(stgate, unknown).status_code for unknown in strangers] == [401] * 3
    assert tenant.calls["certs"] == fetched + 1


def test_a_hostile_issuer_is_bounded_and_an_outage_is_503(
    gateway: GatewayProcess,
) -> None:
    """An issuer answering a JWKS of 8 MB, then one of 10,000 keys, then a discovery
    document naming another issuer: a 503 each time (never a 401, never a hang, the
    gateway serving on), and sign-in works once the issuer is sane again."""
    hostile = FakeVisdom(single_tenant=True).start()
    try:
        person = hostile.add_tracing_user(unique_email("hostile"), ["tracing"])
        with beside(gateway, **tenant_env(hostile)) as gw:
            hostile.certs_body = b'{"keys": [' + b" " * (8 << 20) + b"]}"
            huge = call(gw, hostile.mint(person))
            assert huge.status_code == 503, huge.text
            assert huge.json()["error"]["type"] == "api_error"
            jwk = hostile.issuer_jwks()[0]
            many = [{**jwk, "kid": f"k{i}"} for i in range(10_000)]
            hostile.certs_body = orjson.dumps({"keys": many})
            time.sleep(1.1)
            assert call(gw, hostile.mint(person)).status_code == 503
            assert httpx2.get(gw.url + "/healthz", timeout=10).status_code == 200
            hostile.certs_body = None
            time.sleep(1.1)
            assert call(gw, hostile.mint(person)).status_code == 200
            # The issuer was learnt once: only its JWKS was asked again.
            assert (hostile.calls["public-config"], hostile.calls["discovery"]) == (1, 1)
        hostile.discovery = {**hostile.discovery, "issuer": "https://evil.test/"}
        with beside(gateway, **tenant_env(hostile)) as gw:
            mismatch = call(gw, hostile.mint(person))
            assert mismatch.status_code == 503, mismatch.text
    finally:
        hostile.stop()


def test_multi_org_server_has_no_oidc_so_its_jwts_are_refused(
    gateway: GatewayProcess, visdom: FakeVisdom, tenant: FakeVisdom
) -> None:
    """A multi-org Visdom Trace answers public-config 404: a JWT is no Visdom Trace
    credential there (401), while its tvs_ sessions work as before."""
    org = "multi-" + uuid.uuid4().hex[:6]
    person = visdom.add_user(unique_email("multi"), "pw", {org: "developer"})
    with beside(gateway, **visdom_env(visdom.url)) as gw:
        someone = tracing_user(tenant, "elsewhere", "tracing")
        refused = call(gw, tenant.mint(someone))
        assert refused.status_code == 401, refused.text
        assert "OIDC" in refused.json()["error"]["message"]
        listed = call(gw, visdom.issue_session(person), "/v1/models")
        assert listed.status_code == 200, listed.text


# --- tvk_ org keys and the extractor's answers ---


def test_an_org_key_is_401_asking_for_a_personal_token(
    stgate: GatewayProcess, tenant: FakeVisdom
) -> None:
    key = tenant.add_org_key()
    asked = tenant.calls["me"]
    for api_key in (False, True):
        response = call(stgate, key, api_key=api_key)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert "personal" in error["message"] and key not in error["message"]
    assert tenant.calls["me"] == asked
    assert key not in tenant.bearers
    assert key not in stgate.log_text()


def test_the_extractors_text_plain_401_is_a_401(
    stgate: GatewayProcess, tenant: FakeVisdom, visdom: FakeVisdom, gateway: GatewayProcess
) -> None:
    # A token the issuer signed for an account Visdom Trace does not know (deleted).
    ghost = FakeUser(str(uuid.uuid4()), unique_email("ghost"), "", None)
    refused = call(stgate, tenant.mint(ghost))
    assert refused.status_code == 401, refused.text
    assert "Invalid or expired token" in refused.json()["error"]["message"]
    # The multi-org server's extractor answers text/plain too.
    with beside(gateway, **visdom_env(visdom.url)) as gw:
        unknown = call(gw, "tvs_" + "0" * 64)
        assert unknown.status_code == 401, unknown.text
        assert unknown.json()["error"]["type"] == "authentication_error"


def test_null_display_name_is_the_org_name(gateway: GatewayProcess, visdom: FakeVisdom) -> None:
    name = "nodisplay-" + uuid.uuid4().hex[:6]
    visdom.add_org(name, display_name=None)
    person = visdom.add_user(unique_email("nd"), "pw", {name: "developer"}, name=None)
    with beside(gateway, **visdom_env(visdom.url)) as gw:
        listed = call(gw, visdom.issue_session(person), "/v1/models")
        assert listed.status_code == 200, listed.text
        gw.bind()
        org = Org.get(Org.external_id == visdom.orgs[name].org_id)
        assert org.display_name == name
        assert User.get(User.external_id == person.user_id).name == ""


# --- Visdom Trace's own proxy path ---


def test_the_sdks_through_visdom_traces_proxy_path(
    stgate: GatewayProcess, tenant: FakeVisdom
) -> None:
    person = tracing_user(tenant, "sdk", "tracing")
    token = tenant.mint(person)
    client = anthropic.Anthropic(
        base_url=stgate.url + "/proxy/anthropic", api_key=token, max_retries=0
    )
    message = client.messages.create(
        model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    with client.messages.stream(
        model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert stream.get_final_message().usage.output_tokens > 0
    counted = client.messages.count_tokens(
        model="claude-test", messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.input_tokens > 0
    chat = openai.OpenAI(base_url=stgate.url + "/proxy/openai/v1", api_key=token, max_retries=0)
    answer = chat.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    models = httpx2.get(stgate.url + "/proxy/openai/v1/models", headers={"x-api-key": token})
    assert "gpt-test" in [m["id"] for m in models.json()["data"]]
    stgate.bind()
    user = User.get(User.external_id == person.user_id)
    # A call, a stream and a chat: each traced as any call is, for this user.
    assert [t.endpoint for t in stgate.wait_traces(1, user_id=user.id, stream=True)] == [
        "anthropic.messages"
    ]
    assert stgate.wait_traces(1, user_id=user.id, endpoint="openai.chat")
    assert stgate.wait_traces(2, user_id=user.id, endpoint="anthropic.messages")
    # An unknown path under the alias answers in Anthropic's envelope, as the tool expects.
    missing = httpx2.post(
        stgate.url + "/proxy/anthropic/v1/nothing", headers={"x-api-key": token}, content=b"{}"
    )
    assert missing.status_code == 404
    assert missing.json()["type"] == "error"


def test_claude_code_set_up_as_tracevault_proxy_info_prints(
    stgate: GatewayProcess, tenant: FakeVisdom, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    """``ANTHROPIC_BASE_URL=<server>/proxy/anthropic`` and the Visdom Trace token (a
    Keycloak access token) as ``ANTHROPIC_API_KEY``: a tool-using session, traced."""
    person = tracing_user(tenant, "claude", "tracing")
    token = tenant.mint(person, lifetime=900)
    marker = "tvgate-ok-" + uuid.uuid4().hex[:8]
    headers = {
        "x-fake-scenario": "agent",
        "x-fake-command": f"echo {marker} > out.txt && cat out.txt",
    }
    setup = Setup(stgate.url + "/proxy/anthropic", token, "claude-test", tmp_path, headers)
    run = run_claude(
        setup, "Write the marker file with the Bash tool.", credential_env="ANTHROPIC_API_KEY"
    )
    result, _ = claude_bash_session(run, setup, marker)
    sent = [r for r in fake_provider.requests if marker in r.headers.get("x-fake-command", "")]
    assert len(sent) == 2
    traces = stgate.wait_traces(2, session_id=result["session_id"])
    assert all(t.status_code == 200 and t.tool == "claude-code" for t in traces)
    stgate.bind()
    user = User.get(User.external_id == person.user_id)
    assert {t.user_id for t in traces} == {user.id}
    assert token not in stgate.log_text()
