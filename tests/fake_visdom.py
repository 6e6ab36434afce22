"""A fake Visdom Trace server that behaves like the real one, for identity tests.

Multi-org (the default, the public server of mid 2026): it keeps users with
passwords and org memberships, issues ``tvs_`` + 64 hex session tokens at login
and stores only their SHA-256, and answers the three calls tvgate makes. Tests
can revoke a session (or every session of a user), change a role, remove a user
from an org, see the tokens it issued and the credentials sent to it, count the
calls, stop the server (connections refused) and start it again on the same
port. It also serves a JWKS document at ``/jwks.json`` for the JWT tests.

Single tenant (``FakeVisdom(single_tenant=True)``, today's server as its CLI shows
it): no ``/api/v1/me/orgs`` (404); people sign in at a Keycloak-like OIDC issuer
this server also plays (``/realms/tracevault``: discovery and JWKS), whose RS256
access tokens the server checks itself; ``/api/v1/auth/me`` adds ``role`` and
answers 403 to an account without the ``tracing`` or ``tracing-admin`` realm role;
``/api/v1/auth/public-config`` says where the issuer is.

Both modes answer as the real extractor does: a text/plain 401 for a missing or
unknown credential, and a ``tvk_`` org key passes it but has no user (``/auth/me``
500, ``/me/orgs`` ``[]``).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import tornado.web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.served import ServedApp


@dataclass
class FakeUser:
    user_id: str
    email: str
    password: str
    name: str | None
    #: org name -> role
    roles: dict[str, str] = field(default_factory=dict)
    #: Keycloak realm roles (single tenant): ``tracing``, ``tracing-admin``.
    realm_roles: list[str] = field(default_factory=list)


@dataclass
class FakeOrg:
    org_id: str
    org_name: str
    display_name: str | None


class _Handler(tornado.web.RequestHandler):
    @property
    def fake(self) -> FakeVisdom:
        fake: FakeVisdom = self.application.settings["fake"]
        return fake

    def send(self, status: int, document: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(document))

    def plain(self, status: int, text: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(text)

    def bearer(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:]:
            return None
        with self.fake.lock:
            self.fake.bearers.add(header[7:])
        return header[7:]

    def user(self, token: str) -> FakeUser | None:
        return self.fake.person_of(token)

    def signed_in(self, call: str) -> FakeUser | str | None:
        """Count ``call``; the user of the request's credential, ``tvk_`` for an org key
        (it passes the extractor but is no person), or None once it is answered 401 as
        the extractor answers it: text/plain."""
        self.fake.count(call)
        token = self.bearer()
        if token is None:
            self.plain(401, "Missing or invalid Authorization header")
            return None
        if token in self.fake.org_keys:
            return "tvk_"
        user = self.user(token)
        if user is None:
            self.plain(401, "Invalid or expired token")
        return user


class LoginHandler(_Handler):
    def post(self) -> None:
        self.fake.count("login")
        try:
            body = orjson.loads(self.request.body)
            email, password = body["email"], body["password"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.send(400, {"error": "email and password required"})
            return
        with self.fake.lock:
            user = next((u for u in self.fake.users.values() if u.email == email), None)
            if user is None or not secrets.compare_digest(user.password, str(password)):
                self.send(401, {"error": "invalid credentials"})
                return
            token = "tvs_" + secrets.token_hex(32)
            self.fake.sessions[hashlib.sha256(token.encode()).hexdigest()] = user.user_id
            self.fake.issued.setdefault(user.user_id, []).append(token)
        self.send(200, {"token": token, "user_id": user.user_id, "email": user.email})


class MeHandler(_Handler):
    def get(self) -> None:
        user = self.signed_in("me")
        if user is None:
            return
        if isinstance(user, str):
            self.send(500, {"error": "Internal server error"})
            return
        me: dict[str, Any] = {"user_id": user.user_id, "email": user.email, "name": user.name}
        if self.fake.single_tenant:
            if "tracing-admin" in user.realm_roles:
                me["role"] = "tracing-admin"
            elif "tracing" in user.realm_roles:
                me["role"] = "tracing"
            else:
                self.send(403, {"error": self.fake.no_role_message})
                return
        self.send(200, me)


class MyOrgsHandler(_Handler):
    def get(self) -> None:
        if self.fake.single_tenant:
            self.fake.count("orgs")
            self.send(404, {"error": "Not found"})
            return
        user = self.signed_in("orgs")
        if user is None:
            return
        if isinstance(user, str):
            self.send(200, [])
            return
        with self.fake.lock:
            orgs = [
                {
                    "org_id": self.fake.orgs[name].org_id,
                    "org_name": name,
                    "display_name": self.fake.orgs[name].display_name,
                    "role": role,
                }
                for name, role in user.roles.items()
            ]
        self.send(200, orgs)


class JWKSHandler(_Handler):
    def get(self) -> None:
        self.fake.count("jwks")
        self.send(200, {"keys": list(self.fake.jwks)})


class PublicConfigHandler(_Handler):
    def get(self) -> None:
        self.fake.count("public-config")
        config = self.fake.public_config
        if config is None:
            self.send(404, {"error": "Not found"})
            return
        self.send(200, config)


class DiscoveryHandler(_Handler):
    def get(self) -> None:
        self.fake.count("discovery")
        self.send(200, self.fake.discovery)


class CertsHandler(_Handler):
    def get(self) -> None:
        self.fake.count("certs")
        raw = self.fake.certs_body
        if raw is not None:
            self.set_header("Content-Type", "application/json")
            self.finish(raw)
            return
        self.send(200, {"keys": self.fake.issuer_jwks()})


#: Where the fake's OIDC issuer lives (Keycloak's layout), and the audience it mints for.
REALM_PATH = "/realms/tracevault"
AUDIENCE = "tracevault-api"
CLI_CLIENT_ID = "tracevault-cli"


class FakeVisdom:
    def __init__(self, *, single_tenant: bool = False) -> None:
        self.single_tenant = single_tenant
        self.lock = threading.Lock()
        self.users: dict[str, FakeUser] = {}
        self.orgs: dict[str, FakeOrg] = {}
        self.sessions: dict[str, str] = {}
        #: user id -> the session tokens issued at login, so tests can look for them.
        self.issued: dict[str, list[str]] = {}
        #: Every Bearer credential sent to it, so tests can tell what tvgate sent where.
        self.bearers: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.jwks: list[dict[str, Any]] = []
        #: ``tvk_`` org API keys: they pass the extractor, but are no person.
        self.org_keys: set[str] = set()
        self.no_role_message = "Your account does not have the tracing role"
        self._served = ServedApp("fake-visdom")
        self.port = self._served.port
        self.url = self._served.url
        # The OIDC issuer (single tenant): its signing keys by kid, the one it signs with.
        self.issuer = self.url + REALM_PATH
        self.signing_keys: dict[str, rsa.RSAPrivateKey] = {}
        self.signing_kid = ""
        #: What ``/api/v1/auth/public-config`` answers (None: 404, as a multi-org server).
        self.public_config: dict[str, Any] | None = None
        #: The issuer's discovery document, which a test may replace with a hostile one.
        self.discovery: dict[str, Any] = {}
        #: A raw body the JWKS endpoint answers instead of the keys (a hostile issuer).
        self.certs_body: bytes | None = None
        if single_tenant:
            self.rotate_key()
            self.public_config = {
                "oidc_enabled": True,
                "issuer": self.issuer,
                "cli_client_id": CLI_CLIENT_ID,
                "audience": AUDIENCE,
            }
            self.discovery = {
                "issuer": self.issuer,
                "jwks_uri": self.issuer + "/protocol/openid-connect/certs",
                "token_endpoint": self.issuer + "/protocol/openid-connect/token",
                "device_authorization_endpoint": self.issuer
                + "/protocol/openid-connect/auth/device",
                "id_token_signing_alg_values_supported": ["RS256"],
            }

    # --- directory ---

    def add_org(self, name: str, display_name: str | None = None) -> FakeOrg:
        org = FakeOrg(str(uuid.uuid4()), name, display_name)
        with self.lock:
            self.orgs[name] = org
        return org

    def add_user(
        self, email: str, password: str, roles: dict[str, str], name: str | None = None
    ) -> FakeUser:
        for org in roles:
            if org not in self.orgs:
                self.add_org(org)
        user = FakeUser(str(uuid.uuid4()), email, password, name, dict(roles))
        with self.lock:
            self.users[user.user_id] = user
        return user

    def add_tracing_user(
        self, email: str, realm_roles: list[str], name: str | None = None
    ) -> FakeUser:
        """A single-tenant account with these Keycloak realm roles."""
        user = FakeUser(str(uuid.uuid4()), email, "", name, {}, list(realm_roles))
        with self.lock:
            self.users[user.user_id] = user
        return user

    def add_org_key(self) -> str:
        """A new ``tvk_`` org API key (automation credential, no user behind it)."""
        key = "tvk_" + secrets.token_hex(32)
        with self.lock:
            self.org_keys.add(key)
        return key

    # --- the OIDC issuer (single tenant) ---

    def rotate_key(self) -> str:
        """Sign with a new RSA key from now on (the old ones stay published); its kid."""
        kid = "kc-" + uuid.uuid4().hex[:8]
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with self.lock:
            self.signing_keys[kid] = key
            self.signing_kid = kid
        return kid

    def issuer_jwks(self) -> list[dict[str, Any]]:
        with self.lock:
            keys = list(self.signing_keys.items())
        published = []
        for kid, key in keys:
            jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            published.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return published

    def mint(self, user: FakeUser, *, lifetime: float = 300, **overrides: Any) -> str:
        """A Keycloak access token for ``user``, as the CLI's device flow gets one; an
        override of None leaves a claim out."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "azp": CLI_CLIENT_ID,
            "sub": user.user_id,
            "email": user.email,
            "name": user.name,
            "realm_access": {"roles": list(user.realm_roles)},
            "iat": now,
            "exp": now + int(lifetime),
            **overrides,
        }
        kid = self.signing_kid
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.signing_keys[kid], algorithm="RS256", headers={"kid": kid})

    def user_of_jwt(self, token: str) -> FakeUser | None:
        """The user of a valid access token, as Visdom Trace's server checks it."""
        try:
            kid = str(jwt.get_unverified_header(token).get("kid"))
            key = self.signing_keys[kid]
            claims = jwt.decode(
                token, key.public_key(), algorithms=["RS256"], issuer=self.issuer, audience=AUDIENCE
            )
        except (jwt.PyJWTError, KeyError):
            return None
        with self.lock:
            return self.users.get(claims["sub"])

    def person_of(self, token: str) -> FakeUser | None:
        """Whose credential ``token`` is, as the server's extractor finds it (a session of
        a multi-org server, an access token of a single-tenant one); None: a 401. The
        ingestion stand-in (tests/fake_visdom_ingest.py) asks this too."""
        if self.single_tenant:
            return self.user_of_jwt(token)
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.lock:
            user_id = self.sessions.get(digest)
            return self.users.get(user_id) if user_id else None

    def issue_session(self, user: FakeUser) -> str:
        token = "tvs_" + secrets.token_hex(32)
        with self.lock:
            self.sessions[hashlib.sha256(token.encode()).hexdigest()] = user.user_id
        return token

    def revoke(self, token: str) -> None:
        with self.lock:
            self.sessions.pop(hashlib.sha256(token.encode()).hexdigest(), None)

    def revoke_user(self, user: FakeUser) -> None:
        """End every session of a user (a sign-out everywhere, or an account locked)."""
        with self.lock:
            self.sessions = {h: u for h, u in self.sessions.items() if u != user.user_id}

    def set_role(self, user: FakeUser, org: str, role: str) -> None:
        with self.lock:
            user.roles[org] = role

    def remove_member(self, user: FakeUser, org: str) -> None:
        """Take a user out of an org: their sessions stay valid, ``/me/orgs`` no longer lists it."""
        with self.lock:
            user.roles.pop(org, None)

    def count(self, call: str) -> None:
        with self.lock:
            self.calls[call] += 1

    # --- lifecycle ---

    def start(self) -> FakeVisdom:
        self._served.start(
            [
                (r"/api/v1/auth/login", LoginHandler),
                (r"/api/v1/auth/me", MeHandler),
                (r"/api/v1/me/orgs", MyOrgsHandler),
                (r"/jwks.json", JWKSHandler),
                (r"/api/v1/auth/public-config", PublicConfigHandler),
                (REALM_PATH + r"/\.well-known/openid-configuration", DiscoveryHandler),
                (REALM_PATH + r"/protocol/openid-connect/certs", CertsHandler),
            ],
            fake=self,
        )
        return self

    def stop(self) -> None:
        """Stop listening and drop connections: Visdom Trace is down until start()."""
        self._served.stop()
