"""Identity through the real proxy: Visdom Trace sessions, JWT issuers, proxy tokens, orgs."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.conftest import (
    GatewayProcess,
    beside,
    visdom_env,
)
from tests.fake_provider import FakeProvider
from tests.fake_visdom import FakeVisdom
from tvgate.gateway import CHANGE_POLL_INTERVAL
from tvgate.models import Org, User

ISSUER = "https://issuer.example.test"
AUDIENCE = "tvgate"
HMAC_SECRET = "shared-hmac-secret-" + uuid.uuid4().hex
BODY = orjson.dumps(
    {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
)


class Keys:
    """Signing keys of the test issuer, published as a JWKS by the fake Visdom Trace."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def jwks(self) -> list[dict[str, Any]]:
        keys = []
        # Any: each algorithm takes its own kind of key, which the tuple's type cannot say.
        pairs: tuple[tuple[str, Any, Any], ...] = (
            ("rsa-1", jwt.algorithms.RSAAlgorithm, self.rsa),
            ("ec-1", jwt.algorithms.ECAlgorithm, self.ec),
            ("ed-1", jwt.algorithms.OKPAlgorithm, self.ed),
        )
        for kid, algorithm, key in pairs:
            jwk = orjson.loads(algorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid})
        return keys


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def visdom(visdom: FakeVisdom, keys: Keys) -> FakeVisdom:
    """conftest's, with the module's signing keys and orgs acme and other."""
    visdom.jwks = keys.jwks()
    for name in ("acme", "other"):
        visdom.add_org(name)
    return visdom


@pytest.fixture(scope="module")
def idgate(gateway: GatewayProcess, visdom: FakeVisdom) -> Iterator[GatewayProcess]:
    """A second gateway on the same database, with Visdom Trace and a JWT issuer configured."""
    with beside(
        gateway,
        **visdom_env(visdom.url),
        TVGATE_JWT_ISSUER=ISSUER,
        TVGATE_JWT_AUDIENCE=AUDIENCE,
        TVGATE_JWT_ALGORITHMS="RS256,ES256,EdDSA,HS256",
        TVGATE_JWT_JWKS_URL=visdom.url + "/jwks.json",
        TVGATE_JWT_SECRET=HMAC_SECRET,
        TVGATE_JWT_LEEWAY="0",
        TVGATE_JWT_JWKS_REFETCH_INTERVAL="1",
    ) as gw:
        # acme and other were made in tvgate: only an operator's link lets outside orgs in.
        links = [("acme", "--jwt-org", "acme")] + [
            (name, "--visdom-org-id", visdom.orgs[name].org_id) for name in ("acme", "other")
        ]
        for name, option, value in links:
            linked = gw.cli("orgs", "link", name, option, value)
            assert linked.returncode == 0, linked.stderr
        # Each link is an identity change the gateway hears at its next change-count poll,
        # when it forgets every cached identity: let those polls pass before a test caches
        # one (test_cache_hit_does_not_ask_visdom_trace saw an extra Visdom Trace call).
        time.sleep(4 * CHANGE_POLL_INTERVAL)
        yield gw


def call(
    gw: GatewayProcess, token: str, org: str | None = None, path: str = "/v1/messages"
) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"}
    if org:
        headers["X-Tvgate-Org"] = org
    if path.endswith("/models"):
        return httpx2.get(gw.url + path, headers=headers, timeout=30)
    return httpx2.post(gw.url + path, content=BODY, headers=headers, timeout=30)


def unique_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@acme.test"


# --- Visdom Trace ---


def test_first_sight_creates_the_user_with_the_mapped_role(
    idgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    for tv_role, expected in (
        ("owner", "admin"),
        ("admin", "admin"),
        ("policy_admin", "member"),
        ("developer", "member"),
        ("auditor", "auditor"),
    ):
        email = unique_email(tv_role)
        person = visdom.add_user(email, "pw", {"acme": tv_role}, name="Ada")
        response = call(idgate, visdom.issue_session(person))
        assert response.status_code == 200, response.text
        idgate.bind()
        user = User.get(User.email == email)
        assert (user.role, user.external_id, user.name) == (expected, person.user_id, "Ada")
        assert user.org.name == "acme"
    assert Org.get(Org.name == "acme").external_id == visdom.orgs["acme"].org_id


def known_developer(idgate: GatewayProcess, visdom: FakeVisdom, prefix: str) -> str:
    """The session token of a new developer of acme at Visdom Trace, which the gateway has
    taken once (and so knows who it is)."""
    person = visdom.add_user(unique_email(prefix), "pw", {"acme": "developer"})
    token = visdom.issue_session(person)
    assert call(idgate, token).status_code == 200
    return token


@pytest.mark.usefixtures("idgate")
def test_cache_hit_does_not_ask_visdom_trace(gateway: GatewayProcess, visdom: FakeVisdom) -> None:
    # A gateway beside idgate (whose org links it reads before it serves) that keeps an
    # identity a minute: idgate's 1 s lifetime ran out within these six calls on a loaded
    # machine, and the call after it rightly asked Visdom Trace again.
    settings = visdom_env(visdom.url) | {"TVGATE_VISDOM_CACHE_TTL": "60"}
    with beside(gateway, **settings) as patient:
        token = known_developer(patient, visdom, "cache")
        asked = visdom.calls["me"]
        for _ in range(5):
            assert call(patient, token).status_code == 200
        assert visdom.calls["me"] == asked


def test_several_orgs_need_a_choice(idgate: GatewayProcess, visdom: FakeVisdom) -> None:
    person = visdom.add_user(
        unique_email("multi"), "pw", {"acme": "developer", "other": "developer"}
    )
    token = visdom.issue_session(person)
    ambiguous = call(idgate, token)
    assert ambiguous.status_code == 403
    assert "X-Tvgate-Org" in ambiguous.json()["error"]["message"]
    assert call(idgate, token, org="acme").status_code == 200
    other = httpx2.post(
        idgate.url + "/v1/messages",
        content=BODY.replace(b"claude-test", b"other-claude"),
        headers={"Authorization": f"Bearer {token}", "X-Tvgate-Org": "other"},
    )
    assert other.status_code == 200, other.text
    assert call(idgate, token, org="nope").status_code == 403
    listed = call(idgate, token, org="acme", path="/v1/models").json()
    assert "other-claude" not in [m["id"] for m in listed["data"]]


def test_visdom_down_serves_cached_then_503_then_recovers(
    idgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    token = known_developer(idgate, visdom, "outage")
    visdom.stop()
    try:
        assert call(idgate, token).status_code == 200  # within the 1 s TTL
        time.sleep(1.2)
        down = call(idgate, token)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["type"] == "api_error"
    finally:
        visdom.start()
    assert call(idgate, token).status_code == 200


def test_revoked_session_stops_working_after_the_ttl(
    idgate: GatewayProcess, visdom: FakeVisdom
) -> None:
    token = known_developer(idgate, visdom, "revoke")
    visdom.revoke(token)
    time.sleep(1.2)
    refused = call(idgate, token)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"


def test_unknown_tvs_token_is_401(idgate: GatewayProcess, gateway: GatewayProcess) -> None:
    assert call(idgate, "tvs_" + "0" * 64).status_code == 401
    # Without a Visdom Trace server configured, such a token is refused outright.
    assert call(gateway, "tvs_" + "0" * 64).status_code == 401


# --- JWT ---


def jwt_claims(**overrides: Any) -> dict[str, Any]:
    """A developer of acme's claims, valid for 5 minutes; an override of None leaves one out."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "jwt-user-1",
        "email": "jwt.user@acme.test",
        "org": "acme",
        "role": "developer",
        "iat": now,
        "exp": now + 300,
        **overrides,
    }
    return {k: v for k, v in claims.items() if v is not None}


def make_jwt(key: Any, algorithm: str, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(jwt_claims(**overrides), key, algorithm=algorithm, headers=headers)


@pytest.mark.parametrize(
    ("algorithm", "kid"), [("RS256", "rsa-1"), ("ES256", "ec-1"), ("EdDSA", "ed-1")]
)
def test_valid_jwts_are_accepted(
    idgate: GatewayProcess, keys: Keys, algorithm: str, kid: str
) -> None:
    key = {"rsa-1": keys.rsa, "ec-1": keys.ec, "ed-1": keys.ed}[kid]
    response = call(idgate, make_jwt(key, algorithm, kid))
    assert response.status_code == 200, response.text
    hmac_token = make_jwt(HMAC_SECRET, "HS256", None, sub="hmac-user", email="hmac@acme.test")
    assert call(idgate, hmac_token).status_code == 200


def _forged(keys: Keys) -> dict[str, str]:
    now = int(time.time())
    good = make_jwt(keys.rsa, "RS256", "rsa-1")
    head, payload, signature = good.split(".")
    tampered_payload = (
        base64.urlsafe_b64encode(
            orjson.dumps({**jwt.decode(good, options={"verify_signature": False}), "role": "owner"})
        )
        .rstrip(b"=")
        .decode()
    )
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": make_jwt(keys.rsa, "RS256", "rsa-1", exp=now - 60),
        "not yet valid": make_jwt(keys.rsa, "RS256", "rsa-1", nbf=now + 600),
        "wrong issuer": make_jwt(keys.rsa, "RS256", "rsa-1", iss="https://evil.test"),
        "wrong audience": make_jwt(keys.rsa, "RS256", "rsa-1", aud="someone-else"),
        "tampered": f"{head}.{tampered_payload}.{signature}",
        "alg none": f"{none_header}.{payload}.",
        "hs256 with the rsa public key": _hmac_with_raw_key(public_pem),
        "unknown signer": make_jwt(stranger, "RS256", "rsa-1"),
        "no expiry": make_jwt(keys.rsa, "RS256", "rsa-1", exp=None),
        "truncated": good[: len(good) // 2],
    }


def _hmac_with_raw_key(key: bytes) -> str:
    # pyjwt refuses to sign with a PEM as an HMAC key; an attacker does it by hand.
    import hashlib
    import hmac

    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"rsa-1"}').rstrip(b"=")
    claims = jwt_claims(sub="x", email="x@acme.test", role=None, iat=None)
    payload = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=")
    signature = base64.urlsafe_b64encode(
        hmac.new(key, header + b"." + payload, hashlib.sha256).digest()
    ).rstrip(b"=")
    return (header + b"." + payload + b"." + signature).decode()


def test_bad_jwts_are_401_and_never_reach_the_provider(
    idgate: GatewayProcess, keys: Keys, fake_provider: FakeProvider
) -> None:
    for name, token in _forged(keys).items():
        before = len(fake_provider.requests)
        response = call(idgate, token)
        assert response.status_code == 401, f"{name}: {response.status_code} {response.text}"
        assert response.json()["error"]["type"] == "authentication_error", name
        assert len(fake_provider.requests) == before, name


def test_unknown_kid_refetches_the_rotated_jwks(
    idgate: GatewayProcess, visdom: FakeVisdom, keys: Keys
) -> None:
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rotated.public_key()))
    kid = "rsa-" + uuid.uuid4().hex[:8]
    visdom.jwks = [*keys.jwks(), {**jwk, "kid": kid}]
    time.sleep(1.1)  # the test gateway refetches at most once a second
    token = make_jwt(rotated, "RS256", kid, sub="rotated-user", email="rotated@acme.test")
    # Made before the fetch: generating a key takes a while on a busy machine, and the
    # unknown kids must arrive within the refetch interval.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    strangers = [make_jwt(stranger, "RS256", "rsa-9") for _ in range(3)]
    fetched = visdom.calls["jwks"]
    response = call(idgate, token)
    fetched_at = time.monotonic()
    assert response.status_code == 200, response.text
    assert visdom.calls["jwks"] == fetched + 1
    # Unknown kids right after a fetch do not make tvgate hammer the issuer: at most one
    # fetch per refetch interval (1 s here) since the last. Counted against the time the
    # calls took, so a busy machine that makes them slower than the interval is not an error.
    for unknown in strangers:
        assert call(idgate, unknown).status_code == 401
    intervals = int(time.monotonic() - fetched_at)
    assert visdom.calls["jwks"] <= fetched + 1 + intervals, (visdom.calls["jwks"], intervals)


# --- proxy tokens and orgs ---


def test_proxy_token_is_bound_to_its_org(gateway: GatewayProcess) -> None:
    other = gateway.tokens["dev@other.test"]
    assert call(gateway, other, org="acme").status_code == 403
    moved = httpx2.post(
        gateway.url + "/v1/messages",
        content=BODY,
        headers={"x-api-key": other, "anthropic-version": "2023-06-01"},
    )
    assert moved.status_code == 404
    assert moved.json()["error"]["message"].endswith("routes you may use: other-claude")
    listed = call(gateway, other, path="/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["other-claude"]


def test_revoked_and_expired_proxy_tokens(gateway: GatewayProcess) -> None:
    issued = gateway.cli("tokens", "issue", "dev@acme.test", "--org", "acme", "--name", "short")
    token = issued.stdout.strip()
    assert call(gateway, token).status_code == 200
    listed = gateway.cli("tokens", "list", "dev@acme.test", "--org", "acme")
    assert "short" in listed.stdout and token not in listed.stdout
    token_id = next(
        line.split("\t")[0] for line in listed.stdout.splitlines() if "\tshort\t" in line
    )
    assert gateway.cli("tokens", "revoke", token_id).returncode == 0
    time.sleep(1.2)  # the gateway's token cache TTL is 1 s in the tests
    assert call(gateway, token).status_code == 401
    expired = gateway.cli(
        "tokens", "issue", "dev@acme.test", "--org", "acme", "--expires-days", "0.00001"
    ).stdout.strip()
    time.sleep(1.0)
    assert call(gateway, expired).status_code == 401
