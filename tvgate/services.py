"""Every operation on orgs, users, tokens, keys and routes, with the rules that govern it.

The CLI, the JSON API and the admin UI all call these functions, so they
cannot disagree. Functions are synchronous (Peewee); web callers run them in
the database pool. ``actor`` is the principal asking, or None for an operator
at the command line with direct access to the database.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import orjson
import peewee

from tvgate.identity import Principal
from tvgate.identity.tokens import mint_token
from tvgate.keyring import KeyContext, Keyring, fingerprint
from tvgate.models import (
    PROVIDERS,
    ROLE_ADMIN,
    ROLE_AUDITOR,
    ROLE_MEMBER,
    ROLES,
    SCOPE_ORG,
    SCOPE_OWNED,
    SCOPE_USER,
    AuditEvent,
    KeyGrant,
    Org,
    ProviderKey,
    ProxyToken,
    Route,
    User,
    database,
)
from tvgate.providers import DEFAULT_BASE_URLS

DEFAULT_ORG = "default"


class ServiceError(Exception):
    """An operation was refused; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 404)


class Forbidden(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 403)


# --- audit ---

OPERATOR = "operator (command line)"


def audit(
    actor: Principal | None,
    org_id: int,
    action: str,
    target: str = "",
    change: dict[str, Any] | None = None,
    *,
    allowed: bool = True,
) -> None:
    """Record who did (or tried) what. ``change`` must never hold a secret."""
    AuditEvent.create(
        org_id=org_id,
        actor_id=actor.user_id if actor else None,
        actor=actor.email if actor else OPERATOR,
        action=action,
        target=target[:400],
        change=orjson.dumps(change or {}).decode(),
        allowed=allowed,
    )


def _deny(actor: Principal, action: str, target: str, error: ServiceError) -> ServiceError:
    """Record a refused attempt in the actor's own org, and return the error to raise."""
    audit(actor, actor.org_id, action, target, {"refused": str(error)}, allowed=False)
    return error


def _require_admin(actor: Principal | None, org: Org, action: str = "", target: str = "") -> None:
    if actor is None:
        return
    if actor.org_id != org.id:
        raise _deny(actor, action or "access", target, NotFound("no such org"))
    if actor.role != ROLE_ADMIN:
        raise _deny(
            actor, action or "access", target, Forbidden("only an admin of this org may do that")
        )


def _require_reader(actor: Principal | None, org: Org) -> None:
    """Admins and auditors read the whole org; members only what is theirs."""
    if actor is not None and (actor.org_id != org.id or actor.role == ROLE_MEMBER):
        raise _deny(actor, "read", org.name, Forbidden("only admins and auditors may see this"))


def _actor_org(actor: Principal | None, org_name: str | None) -> Org:
    """The org an operation acts on: always the actor's own, whatever name was given."""
    if actor is None:
        return get_org(org_name)
    if org_name is not None and org_name != actor.org_name:
        raise _deny(actor, "access", org_name, NotFound(f"no org named {org_name!r}"))
    return Org.get_by_id(actor.org_id)


# --- orgs and users ---


def get_org(name: str | None) -> Org:
    """The org of that name; without a name, the only org or ``default``."""
    if name is None:
        orgs = list(Org.select().limit(2))
        if len(orgs) == 1:
            return orgs[0]
        name = DEFAULT_ORG
    org = Org.get_or_none(Org.name == name)
    if org is None:
        raise NotFound(f"no org named {name!r}")
    return org


def ensure_org(name: str) -> Org:
    org, _created = Org.get_or_create(name=name, defaults={"display_name": name})
    return org


def get_user(email: str, org: Org) -> User:
    user = User.get_or_none((User.email == email.lower()) & (User.org == org))
    if user is None:
        raise NotFound(f"no user {email!r} in org {org.name!r}")
    return user


def add_user(
    email: str, org_name: str, *, admin: bool = False, password: str | None = None
) -> User:
    """Add a user to an org, creating the org when it does not exist yet.

    A password makes a local user, who signs in to the web UI without Visdom Trace.
    """
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise ServiceError(f"{email!r} is not an email address")
    if password is not None and len(password) < 12:
        raise ServiceError("a password needs at least 12 characters")
    with database.atomic():
        org = ensure_org(org_name)
        if User.get_or_none((User.email == email) & (User.org == org)) is not None:
            raise ServiceError(f"user {email!r} already exists in org {org.name!r}", 409)
        return User.create(
            org=org,
            email=email,
            role=ROLE_ADMIN if admin else ROLE_MEMBER,
            password_hash=hash_password(password) if password is not None else None,
        )


def verify_local_password(email: str, password: str) -> list[User]:
    """The local users (one per org) whose password this is; empty when none matches."""
    users = User.select().where(
        (User.email == email.strip().lower()) & User.password_hash.is_null(False) & ~User.disabled
    )
    return [u for u in users if check_password(password, u.password_hash or "")]


# --- passwords (local users only; Visdom Trace users never give tvgate a password to keep) ---

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1


def hash_password(password: str) -> str:
    """scrypt (memory-hard, 32 MiB per guess) with a random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=64 * 1024 * 1024
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=64 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)


# --- proxy tokens ---


def issue_token(
    email: str,
    org_name: str | None = None,
    *,
    name: str = "",
    expires_days: float | None = None,
    actor: Principal | None = None,
) -> tuple[str, ProxyToken]:
    """Mint a ``tvg_`` token for a user; the plaintext is returned once and never stored."""
    org = get_org(org_name)
    user = get_user(email, org)
    if actor is not None and actor.user_id != user.id:
        _require_admin(actor, org)
    if user.disabled:
        raise ServiceError(f"user {email!r} is disabled")
    if expires_days is not None and expires_days <= 0:
        raise ServiceError("expiry must be a positive number of days")
    token, token_hash, prefix = mint_token()
    row = ProxyToken.create(
        user=user,
        name=name[:200],
        token_hash=token_hash,
        prefix=prefix,
        expires_at=time.time() + expires_days * 86400 if expires_days else None,
    )
    return token, row


@dataclass(frozen=True, slots=True)
class TokenView:
    """What may be shown of a proxy token: never the token, which is not stored."""

    id: int
    user: str
    name: str
    prefix: str
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None

    @classmethod
    def of(cls, token: ProxyToken) -> TokenView:
        return cls(
            id=token.id,
            user=token.user.email,
            name=token.name,
            prefix=token.prefix,
            created_at=token.created_at,
            expires_at=token.expires_at,
            last_used_at=token.last_used_at,
            revoked_at=token.revoked_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "last_used_at": self.last_used_at,
            "revoked_at": self.revoked_at,
        }


def list_tokens(
    email: str | None = None, org_name: str | None = None, *, actor: Principal | None = None
) -> list[TokenView]:
    """Tokens of one user, or of the whole org for an admin."""
    if actor is not None:
        org = Org.get_by_id(actor.org_id)
        if email is None and actor.role != ROLE_ADMIN:
            email = actor.email
    else:
        org = get_org(org_name)
    query = ProxyToken.select(ProxyToken, User).join(User).where(User.org == org)
    if email is not None:
        user = get_user(email, org)
        if actor is not None and user.id != actor.user_id:
            _require_admin(actor, org)
        query = query.where(ProxyToken.user == user)
    return [TokenView.of(t) for t in query.order_by(ProxyToken.id)]


def revoke_token(token_id: int, *, actor: Principal | None = None) -> TokenView:
    """Revoke a token: its owner may, and an admin of its org may."""
    token = ProxyToken.select(ProxyToken, User).join(User).where(ProxyToken.id == token_id).first()
    if token is None or (actor is not None and token.user.org_id != actor.org_id):
        raise NotFound(f"no token {token_id}")
    if actor is not None and token.user_id != actor.user_id:
        _require_admin(actor, token.user.org)
    if token.revoked_at is None:
        token.revoked_at = time.time()
        token.save()
    return TokenView.of(token)


# --- provider keys ---


def check_base_url(url: str, *, allow_private: bool) -> str:
    """A provider base URL tvgate may call: http(s), and https to a public host unless allowed."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ServiceError(f"base URL {url!r} must be an http(s) URL")
    if parsed.username or parsed.password:
        raise ServiceError("base URL must not carry credentials")
    if not allow_private:
        if parsed.scheme != "https":
            raise ServiceError("base URL must be https (allow_private_upstreams is off)")
        try:
            ip = ipaddress.ip_address(parsed.hostname)
        except ValueError:
            ip = None
        if (ip is not None and not ip.is_global) or parsed.hostname == "localhost":
            raise ServiceError(
                "base URL points at a private address (allow_private_upstreams is off)"
            )
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class KeyView:
    """What may be shown of a key. There is deliberately no field for the secret."""

    id: int
    name: str
    provider: str
    base_url: str
    fingerprint: str
    owner: str | None
    disabled: bool
    created_at: float
    last_used_at: float | None

    @classmethod
    def of(cls, key: ProviderKey) -> KeyView:
        return cls(
            id=key.id,
            name=key.name,
            provider=key.provider,
            base_url=key.base_url,
            fingerprint=key.fingerprint,
            owner=key.owner.email if key.owner is not None else None,
            disabled=key.disabled,
            created_at=key.created_at,
            last_used_at=key.last_used_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "base_url": self.base_url,
            "fingerprint": "…" + self.fingerprint,
            "owner": self.owner,
            "disabled": self.disabled,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


def add_key(
    name: str,
    provider: str,
    secret: str,
    keyring: Keyring,
    *,
    org_name: str | None = None,
    base_url: str | None = None,
    allow_private: bool = False,
    owner_email: str | None = None,
    available_to_all: bool = True,
    actor: Principal | None = None,
) -> KeyView:
    """Store a provider key encrypted; only ciphertext and fingerprint reach the database.

    An admin adds org keys; a user adds a private key of their own when the org allows it.
    """
    org = _actor_org(actor, org_name)
    owner: User | None = None
    if owner_email is not None or (actor is not None and actor.role != ROLE_ADMIN):
        if actor is not None:
            owner = _own_user(actor, owner_email, "add key", name)
        else:
            owner = get_user(owner_email or "", org)
        if not org.allow_user_keys:
            error = Forbidden("this org does not allow users to add their own keys")
            raise _deny(actor, "add key", name, error) if actor is not None else error
    else:
        _require_admin(actor, org, "add key", name)
    if provider not in PROVIDERS:
        raise ServiceError(f"provider must be one of {', '.join(PROVIDERS)}")
    secret = secret.strip()
    if not secret or any(c.isspace() for c in secret) or len(secret) > 4096:
        raise ServiceError("the key must be one line without spaces")
    _check_name(name, "a key")
    url = check_base_url(base_url or DEFAULT_BASE_URLS[provider], allow_private=allow_private)
    with database.atomic():
        if ProviderKey.get_or_none((ProviderKey.org == org) & (ProviderKey.name == name)):
            raise ServiceError(f"a key named {name!r} already exists in org {org.name!r}", 409)
        key = ProviderKey.create(
            org=org,
            name=name,
            provider=provider,
            base_url=url,
            ciphertext="",
            fingerprint=fingerprint(secret),
            owner=owner,
            available_to_all=available_to_all if owner is None else False,
            created_by=actor.user_id if actor else None,
        )
        # The id (and owner) are part of the encryption context, so encrypt once the row exists.
        key.ciphertext = keyring.encrypt(secret, KeyContext(org.id, key.id, key.owner_id))
        key.save()
        audit(
            actor,
            org.id,
            "add key",
            name,
            {"provider": provider, "base_url": url, "owner": owner_email},
        )
    return KeyView.of(key)


def _own_user(actor: Principal, email: str | None, action: str, target: str) -> User:
    """The actor's own user row; naming someone else is refused, and auditors change nothing."""
    if actor.role == ROLE_AUDITOR:
        raise _deny(actor, action, target, Forbidden("auditors read; they change nothing"))
    if email is not None and email.strip().lower() != actor.email:
        raise _deny(actor, action, target, Forbidden("users may only act for themselves"))
    return User.get_by_id(actor.user_id)


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 200 or any(c.isspace() or ord(c) < 32 for c in name):
        raise ServiceError(f"{what} needs a name of 1 to 200 characters without spaces")


def get_key(name: str, org: Org) -> ProviderKey:
    key = ProviderKey.get_or_none((ProviderKey.org == org) & (ProviderKey.name == name))
    if key is None:
        raise NotFound(f"no key named {name!r} in org {org.name!r}")
    return key


def _visible_key(name: str, org: Org, actor: Principal | None) -> ProviderKey:
    """A key the actor may see: any in the org for admins and auditors, else only their own."""
    key = get_key(name, org)
    if actor is not None and actor.role == ROLE_MEMBER and key.owner_id != actor.user_id:
        # Someone else's key does not exist for this member.
        raise _deny(actor, "read key", name, NotFound(f"no key named {name!r} in org {org.name!r}"))
    return key


def list_keys(org_name: str | None = None, *, actor: Principal | None = None) -> list[KeyView]:
    org = _actor_org(actor, org_name)
    query = ProviderKey.select().where(ProviderKey.org == org).order_by(ProviderKey.name)
    if actor is not None and actor.role == ROLE_MEMBER:
        query = query.where(ProviderKey.owner == actor.user_id)
    return [KeyView.of(k) for k in query]


def grant_key(
    name: str,
    emails: list[str],
    org_name: str | None = None,
    *,
    revoke: bool = False,
    actor: Principal | None = None,
) -> list[str]:
    """Make an org key usable by (or take it from) listed users; returns who holds it now."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "revoke key" if revoke else "grant key", name)
    key = get_key(name, org)
    if key.owner_id is not None:
        raise ServiceError("a user's own key cannot be granted to others")
    users = [get_user(email, org) for email in emails]
    with database.atomic():
        for user in users:
            if revoke:
                KeyGrant.delete().where((KeyGrant.key == key) & (KeyGrant.user == user)).execute()
            else:
                KeyGrant.insert(key=key, user=user).on_conflict_ignore().execute()
        audit(
            actor,
            org.id,
            "revoke key" if revoke else "grant key",
            name,
            {"users": [u.email for u in users]},
        )
    return sorted(
        g.user.email for g in KeyGrant.select(KeyGrant, User).join(User).where(KeyGrant.key == key)
    )


def set_key_availability(
    name: str,
    available_to_all: bool,
    org_name: str | None = None,
    *,
    actor: Principal | None = None,
) -> KeyView:
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "update key", name)
    key = get_key(name, org)
    if key.owner_id is not None:
        raise ServiceError("a user's own key is only ever available to its owner")
    if key.available_to_all != available_to_all:
        key.available_to_all = available_to_all
        key.updated_at = time.time()
        key.save()
        audit(actor, org.id, "update key", name, {"available_to_all": available_to_all})
    return KeyView.of(key)


# --- routes ---


@dataclass(frozen=True, slots=True)
class RouteView:
    id: int
    name: str
    upstream_model: str
    key: str
    provider: str
    scope: str
    user: str | None
    enabled: bool
    description: str

    @classmethod
    def of(cls, route: Route) -> RouteView:
        return cls(
            id=route.id,
            name=route.name,
            upstream_model=route.upstream_model,
            key=route.key.name,
            provider=route.key.provider,
            scope=route.scope,
            user=route.user.email if route.user is not None else None,
            enabled=route.enabled,
            description=route.description,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "upstream_model": self.upstream_model,
            "key": self.key,
            "provider": self.provider,
            "scope": self.scope,
            "user": self.user,
            "enabled": self.enabled,
            "description": self.description,
        }


def _usable_key(key: ProviderKey, user: User) -> bool:
    """May this user's route point at this key? (Checked again at every resolution.)"""
    if key.owner_id is not None:
        return key.owner_id == user.id
    if key.available_to_all:
        return True
    return KeyGrant.select().where((KeyGrant.key == key) & (KeyGrant.user == user)).exists()


def add_route(
    name: str,
    key_name: str,
    *,
    model: str = "",
    org_name: str | None = None,
    description: str = "",
    for_user: str | None = None,
    owner: str | None = None,
    enabled: bool = True,
    actor: Principal | None = None,
) -> RouteView:
    """A route: org-wide, made by an admin for one user (``for_user``), or a user's own (``owner``)."""
    org = _actor_org(actor, org_name)
    if for_user is not None and owner is not None:
        raise ServiceError("a route is for one user or owned by one user, not both")
    _check_name(name, "a route")
    if len(model) > 200 or len(description) > 2000:
        raise ServiceError("model is at most 200 characters, description at most 2000")
    user: User | None = None
    if owner is not None or (actor is not None and actor.role != ROLE_ADMIN):
        scope = SCOPE_OWNED
        user = (
            _own_user(actor, owner, "add route", name)
            if actor is not None
            else get_user(owner or "", org)
        )
        if not org.allow_user_routes:
            error = Forbidden("this org does not allow users to create their own routes")
            raise _deny(actor, "add route", name, error) if actor is not None else error
    elif for_user is not None:
        _require_admin(actor, org, "add route", name)
        scope, user = SCOPE_USER, get_user(for_user, org)
    else:
        _require_admin(actor, org, "add route", name)
        scope = SCOPE_ORG
    key = get_key(key_name, org)
    if scope == SCOPE_OWNED:
        assert user is not None
        if not _usable_key(key, user):
            error2 = NotFound(f"no key named {key_name!r} you may use")
            raise _deny(actor, "add route", name, error2) if actor is not None else error2
    elif key.owner_id is not None:
        raise ServiceError("an admin's route needs an org key, not a user's own key")
    with database.atomic():
        if (
            Route.select()
            .where(
                (Route.org == org)
                & (Route.name == name)
                & (Route.scope == scope)
                & (Route.user == user)
                if user is not None
                else (Route.org == org) & (Route.name == name) & (Route.scope == scope)
            )
            .exists()
        ):
            raise ServiceError(f"there is already a {scope} route named {name!r}", 409)
        route = Route.create(
            org=org,
            name=name,
            upstream_model=model,
            key=key,
            scope=scope,
            user=user,
            enabled=enabled,
            description=description,
        )
        audit(
            actor,
            org.id,
            "add route",
            name,
            {"scope": scope, "user": user.email if user else None, "key": key.name, "model": model},
        )
    return RouteView.of(route)


def _routes_query(org: Org) -> peewee.ModelSelect[Route]:
    return (
        Route.select(Route, ProviderKey)
        .join(ProviderKey)
        .switch(Route)
        .where(Route.org == org)
        .order_by(Route.name, Route.scope, Route.id)
    )


def list_routes(org_name: str | None = None, *, actor: Principal | None = None) -> list[RouteView]:
    """Admins and auditors: every route of the org. Members: org routes and their own."""
    org = _actor_org(actor, org_name)
    query = _routes_query(org)
    if actor is not None and actor.role == ROLE_MEMBER:
        query = query.where((Route.scope == SCOPE_ORG) | (Route.user == actor.user_id))
    return [RouteView.of(r) for r in query]


def _editable_route(route_id: int, actor: Principal | None, action: str) -> Route:
    route = Route.get_or_none(Route.id == route_id)
    if route is None or (actor is not None and route.org_id != actor.org_id):
        if actor is not None:
            raise _deny(actor, action, str(route_id), NotFound(f"no route {route_id}"))
        raise NotFound(f"no route {route_id}")
    if actor is None or actor.role == ROLE_ADMIN:
        return route
    if route.scope == SCOPE_OWNED and route.user_id == actor.user_id:
        return route
    if route.scope == SCOPE_ORG:
        raise _deny(actor, action, route.name, Forbidden("only an admin may change an org route"))
    raise _deny(actor, action, str(route_id), NotFound(f"no route {route_id}"))


def update_route(
    route_id: int, changes: dict[str, Any], *, actor: Principal | None = None
) -> RouteView:
    """Change a route's name, model, key, enabled flag or description."""
    allowed = {"name", "upstream_model", "key", "enabled", "description"}
    unknown = set(changes) - allowed
    if unknown:
        raise ServiceError(f"cannot change {', '.join(sorted(unknown))}")
    route = _editable_route(route_id, actor, "update route")
    before = RouteView.of(route).as_dict()
    if "name" in changes:
        name = changes["name"]
        if not isinstance(name, str):
            raise ServiceError("name must be a string")
        _check_name(name, "a route")
        route.name = name
    if "upstream_model" in changes:
        if not isinstance(changes["upstream_model"], str) or len(changes["upstream_model"]) > 200:
            raise ServiceError("upstream_model must be a string of at most 200 characters")
        route.upstream_model = changes["upstream_model"]
    if "description" in changes:
        if not isinstance(changes["description"], str) or len(changes["description"]) > 2000:
            raise ServiceError("description must be a string of at most 2000 characters")
        route.description = changes["description"]
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ServiceError("enabled must be true or false")
        route.enabled = changes["enabled"]
    if "key" in changes:
        if not isinstance(changes["key"], str):
            raise ServiceError("key must be a key name")
        key = get_key(changes["key"], route.org)
        if route.scope == SCOPE_OWNED:
            if route.user is None or not _usable_key(key, route.user):
                raise NotFound(f"no key named {changes['key']!r} you may use")
        elif key.owner_id is not None:
            raise ServiceError("an admin's route needs an org key, not a user's own key")
        route.key = key
    route.updated_at = time.time()
    try:
        with database.atomic():
            route.save()
            after = RouteView.of(route).as_dict()
            audit(
                actor,
                route.org_id,
                "update route",
                route.name,
                {k: [before[k], after[k]] for k in after if before[k] != after[k]},
            )
    except peewee.IntegrityError:
        raise ServiceError(
            f"there is already a route named {route.name!r} in this scope", 409
        ) from None
    return RouteView.of(route)


def delete_route(route_id: int, *, actor: Principal | None = None) -> None:
    route = _editable_route(route_id, actor, "delete route")
    with database.atomic():
        route.delete_instance()
        audit(actor, route.org_id, "delete route", route.name, {"scope": route.scope})


@dataclass(frozen=True, slots=True)
class Resolution:
    """Who gets what: the route a user's request for ``name`` would take, or why none."""

    name: str
    user: str
    route: RouteView | None
    upstream_model: str
    reason: str
    available: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "user": self.user,
            "route": self.route.as_dict() if self.route else None,
            "upstream_model": self.upstream_model,
            "reason": self.reason,
            "available": self.available,
        }


def resolve_route(
    name: str, email: str, org_name: str | None = None, *, actor: Principal | None = None
) -> Resolution:
    """The route ``email`` would get for ``name``, by the same code the proxy uses."""
    from tvgate.routing import load_snapshot

    org = _actor_org(actor, org_name)
    user = get_user(email, org)
    if actor is not None and actor.user_id != user.id:
        _require_reader(actor, org)
    principal = Principal(user.id, org.id, org.name, user.email, user.role)
    snapshot = load_snapshot(org.id)
    available = [r.name for r in snapshot.available(principal)]
    if user.disabled:
        return Resolution(name, user.email, None, "", "the user is disabled", available)
    entry = snapshot.resolve(principal, name)
    if entry is None:
        return Resolution(
            name, user.email, None, "", "no route of that name is usable by the user", available
        )
    route = Route.select(Route, ProviderKey).join(ProviderKey).where(Route.id == entry.id).get()
    return Resolution(
        name, user.email, RouteView.of(route), entry.upstream_model_for(name), "", available
    )


# --- users and org policy ---


@dataclass(frozen=True, slots=True)
class UserView:
    id: int
    email: str
    name: str
    role: str
    disabled: bool
    local: bool
    created_at: float

    @classmethod
    def of(cls, user: User) -> UserView:
        return cls(
            user.id,
            user.email,
            user.name,
            user.role,
            user.disabled,
            user.password_hash is not None,
            user.created_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "role": self.role,
            "disabled": self.disabled,
            "local": self.local,
            "created_at": self.created_at,
        }


def list_users(org_name: str | None = None, *, actor: Principal | None = None) -> list[UserView]:
    org = _actor_org(actor, org_name)
    _require_reader(actor, org)
    return [UserView.of(u) for u in User.select().where(User.org == org).order_by(User.email)]


def update_user(
    email: str,
    *,
    role: str | None = None,
    disabled: bool | None = None,
    org_name: str | None = None,
    actor: Principal | None = None,
) -> UserView:
    """Change a user's role or disable them; the org always keeps one enabled admin."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "update user", email)
    user = get_user(email, org)
    if role is not None and role not in ROLES:
        raise ServiceError(f"role must be one of {', '.join(ROLES)}")
    before = UserView.of(user).as_dict()
    with database.atomic():
        if role is not None:
            user.role = role
        if disabled is not None:
            user.disabled = disabled
        still_admins = (
            User.select()
            .where(
                (User.org == org)
                & (User.role == ROLE_ADMIN)
                & ~User.disabled
                & (User.id != user.id)
            )
            .exists()
        )
        if (
            not still_admins
            and (user.role != ROLE_ADMIN or user.disabled)
            and before["role"] == ROLE_ADMIN
        ):
            raise ServiceError("the org must keep at least one enabled admin", 409)
        user.save()
        after = UserView.of(user).as_dict()
        audit(
            actor,
            org.id,
            "update user",
            user.email,
            {k: [before[k], after[k]] for k in after if before[k] != after[k]},
        )
    return UserView.of(user)


@dataclass(frozen=True, slots=True)
class Policy:
    org: str
    allow_user_keys: bool
    allow_user_routes: bool
    capture_bodies: bool

    @classmethod
    def of(cls, org: Org) -> Policy:
        return cls(org.name, org.allow_user_keys, org.allow_user_routes, org.capture_bodies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "allow_user_keys": self.allow_user_keys,
            "allow_user_routes": self.allow_user_routes,
            "capture_bodies": self.capture_bodies,
        }


def get_policy(org_name: str | None = None, *, actor: Principal | None = None) -> Policy:
    return Policy.of(_actor_org(actor, org_name))


def set_policy(
    org_name: str | None = None,
    *,
    allow_user_keys: bool | None = None,
    allow_user_routes: bool | None = None,
    capture_bodies: bool | None = None,
    actor: Principal | None = None,
) -> Policy:
    """Org switches. Turning one off disables what users made under it (resolution skips it)
    without deleting it; turning it on again restores it."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "set policy", org.name)
    before = Policy.of(org).as_dict()
    if allow_user_keys is not None:
        org.allow_user_keys = allow_user_keys
    if allow_user_routes is not None:
        org.allow_user_routes = allow_user_routes
    if capture_bodies is not None:
        org.capture_bodies = capture_bodies
    with database.atomic():
        org.save()
        after = Policy.of(org).as_dict()
        audit(
            actor,
            org.id,
            "set policy",
            org.name,
            {k: [before[k], after[k]] for k in after if before[k] != after[k]},
        )
    return Policy.of(org)


def list_audit(
    org_name: str | None = None,
    *,
    before_id: int | None = None,
    limit: int = 100,
    actor: Principal | None = None,
) -> list[dict[str, Any]]:
    """Audit events, newest first, a page at a time (``before_id`` is the cursor)."""
    org = _actor_org(actor, org_name)
    _require_reader(actor, org)
    query = AuditEvent.select().where(AuditEvent.org_id == org.id)
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    return [
        {
            "id": e.id,
            "at": e.at,
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "change": orjson.loads(e.change),
            "allowed": e.allowed,
        }
        for e in query.order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 500)))
    ]


# --- first start ---


@dataclass(frozen=True, slots=True)
class Bootstrap:
    org: str
    email: str
    token: str


def bootstrap_if_empty() -> Bootstrap | None:
    """On an empty database: org ``default``, admin ``admin@localhost`` and a token for them."""
    with database.atomic():
        if Org.select().exists():
            return None
        add_user("admin@localhost", DEFAULT_ORG, admin=True)
        token, _row = issue_token("admin@localhost", DEFAULT_ORG, name="bootstrap")
    return Bootstrap(org=DEFAULT_ORG, email="admin@localhost", token=token)
