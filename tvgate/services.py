"""Every operation on orgs, users, tokens, keys and routes, with the rules that govern it.

The CLI, the JSON API and the admin UI all call these functions, so they
cannot disagree. Functions are synchronous (Peewee); web callers run them in
the database pool. ``actor`` is the principal asking, or None for an operator
at the command line with direct access to the database.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import peewee

from tvgate.identity import Principal
from tvgate.identity.tokens import mint_token
from tvgate.keyring import KeyContext, Keyring, fingerprint
from tvgate.models import (
    PROVIDERS,
    ROLE_ADMIN,
    ROLE_MEMBER,
    SCOPE_ORG,
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


def _require_admin(actor: Principal | None, org: Org) -> None:
    if actor is None:
        return
    if actor.org_id != org.id:
        raise NotFound("no such org")
    if actor.role != ROLE_ADMIN:
        raise Forbidden("only an admin of this org may do that")


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


def add_user(email: str, org_name: str, *, admin: bool = False) -> User:
    """Add a user to an org, creating the org when it does not exist yet."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise ServiceError(f"{email!r} is not an email address")
    with database.atomic():
        org = ensure_org(org_name)
        if User.get_or_none((User.email == email) & (User.org == org)) is not None:
            raise ServiceError(f"user {email!r} already exists in org {org.name!r}", 409)
        return User.create(org=org, email=email, role=ROLE_ADMIN if admin else ROLE_MEMBER)


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
    actor: Principal | None = None,
) -> KeyView:
    """Store a provider key encrypted; only ciphertext and fingerprint reach the database."""
    org = get_org(org_name)
    _require_admin(actor, org)
    if provider not in PROVIDERS:
        raise ServiceError(f"provider must be one of {', '.join(PROVIDERS)}")
    secret = secret.strip()
    if not secret or any(c.isspace() for c in secret) or len(secret) > 4096:
        raise ServiceError("the key must be one line without spaces")
    if not name or len(name) > 200:
        raise ServiceError("a key needs a name of at most 200 characters")
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
            created_by=actor.user_id if actor else None,
        )
        # The id is part of the encryption context, so encrypt once the row exists.
        key.ciphertext = keyring.encrypt(secret, KeyContext(org.id, key.id, None))
        key.save()
    return KeyView.of(key)


def get_key(name: str, org: Org) -> ProviderKey:
    key = ProviderKey.get_or_none((ProviderKey.org == org) & (ProviderKey.name == name))
    if key is None:
        raise NotFound(f"no key named {name!r} in org {org.name!r}")
    return key


# --- routes ---


def add_route(
    name: str,
    key_name: str,
    *,
    model: str = "",
    org_name: str | None = None,
    description: str = "",
    actor: Principal | None = None,
) -> Route:
    """An org route: every user of the org may call ``name`` and reach ``key_name``."""
    org = get_org(org_name)
    _require_admin(actor, org)
    if not name or len(name) > 200 or any(c.isspace() for c in name):
        raise ServiceError("a route name is 1 to 200 characters without spaces")
    key = get_key(key_name, org)
    if key.owner_id is not None:
        raise ServiceError("an org route needs an org key, not a user's own key")
    try:
        with database.atomic():
            return Route.create(
                org=org,
                name=name,
                upstream_model=model,
                key=key,
                scope=SCOPE_ORG,
                description=description,
            )
    except peewee.IntegrityError:
        raise ServiceError(f"org {org.name!r} already has a route named {name!r}", 409) from None


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
