"""A fake Visdom Trace server that behaves like the real one, for identity tests.

It keeps users with passwords and org memberships, issues ``tvs_`` + 64 hex
session tokens at login and stores only their SHA-256, and answers the three
calls tvgate makes. Tests can revoke a session (or every session of a user),
change a role, remove a user from an org, see the tokens it issued and the
credentials sent to it, count the calls, stop the server (connections
refused) and start it again on the same port. It also serves a JWKS document
at ``/jwks.json`` for the JWT tests.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import tornado.web

from tests.served import ServedApp


@dataclass
class FakeUser:
    user_id: str
    email: str
    password: str
    name: str | None
    #: org name -> role
    roles: dict[str, str] = field(default_factory=dict)


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

    def user(self) -> FakeUser | None:
        header = self.request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        digest = hashlib.sha256(header[7:].encode()).hexdigest()
        with self.fake.lock:
            self.fake.bearers.add(header[7:])
            user_id = self.fake.sessions.get(digest)
            return self.fake.users.get(user_id) if user_id else None

    def signed_in(self, call: str) -> FakeUser | None:
        """Count ``call``; the user of the request's session, or None once it is answered
        401 (a missing or unknown session, as Visdom Trace answers it)."""
        self.fake.count(call)
        user = self.user()
        if user is None:
            self.send(401, {"error": "unauthorized"})
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
        self.send(200, {"user_id": user.user_id, "email": user.email, "name": user.name})


class MyOrgsHandler(_Handler):
    def get(self) -> None:
        user = self.signed_in("orgs")
        if user is None:
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


class FakeVisdom:
    def __init__(self) -> None:
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
        self._served = ServedApp("fake-visdom")
        self.port = self._served.port
        self.url = self._served.url

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
            ],
            fake=self,
        )
        return self

    def stop(self) -> None:
        """Stop listening and drop connections: Visdom Trace is down until start()."""
        self._served.stop()
