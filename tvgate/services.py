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
