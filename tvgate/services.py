"""Every operation on orgs, users, tokens, keys and routes, with the rules that govern it.

The CLI, the JSON API and the admin UI all call these functions, so they
cannot disagree. Functions are synchronous (Peewee); web callers run them in
the database pool. ``actor`` is the principal asking, or None for an operator
at the command line with direct access to the database.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import peewee

from tvgate.identity import Principal
from tvgate.identity.tokens import mint_token
from tvgate.keyring import KeyContext, Keyring, KeyringError, Rewrapper, backend_of, fingerprint
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

log = logging.getLogger("tvgate.services")


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
    secret = _check_secret(secret)
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


def _check_secret(secret: str) -> str:
    secret = secret.strip()
    if not secret or any(c.isspace() for c in secret) or len(secret) > 4096:
        raise ServiceError("the key must be one line without spaces")
    return secret


#: Called with (org_id, key_id) after a key's secret, state or existence changed in this
#: process, so the gateway drops the plaintext and the route snapshot at once. Listeners
#: run on the caller's thread (a database pool thread or the CLI).
KeyListener = Callable[[int, int], None]
_key_listeners: list[KeyListener] = []


def on_key_change(listener: KeyListener) -> Callable[[], None]:
    """Register ``listener``; returns the function that unregisters it."""
    _key_listeners.append(listener)
    return lambda: _key_listeners.remove(listener)


def _key_changed(key: ProviderKey) -> None:
    for listener in list(_key_listeners):
        try:
            listener(key.org_id, key.id)
        except Exception:  # a listener's failure must not undo a committed change
            log.exception("key change listener failed")


def _org_for(actor: Principal | None, org_name: str | None) -> Org:
    """The org named, or the actor's own org when none is named."""
    if org_name is None and actor is not None:
        return Org.get_by_id(actor.org_id)
    return get_org(org_name)


def _key_for(
    name: str, org_name: str | None, actor: Principal | None, *, owner_only: bool = False
) -> ProviderKey:
    """The key ``actor`` may manage: an org key needs an org admin; a user's own key its
    owner, or an org admin unless ``owner_only`` (an admin may switch a member's private
    key off or remove it, but not replace its secret)."""
    org = _org_for(actor, org_name)
    if actor is not None and actor.org_id != org.id:
        raise NotFound("no such org")
    key = get_key(name, org)
    if actor is None:
        return key
    if key.owner_id is not None and key.owner_id == actor.user_id:
        return key
    if key.owner_id is not None and owner_only:
        raise Forbidden("only the owner of this key may replace its secret")
    if actor.role != ROLE_ADMIN:
        if key.owner_id is not None:
            raise NotFound(f"no key named {name!r} in org {org.name!r}")
        raise Forbidden("only an admin of this org may do that")
    return key


def list_keys(org_name: str | None = None, *, actor: Principal | None = None) -> list[KeyView]:
    """Metadata of the org's keys: all of them for an admin, a member's own for a member."""
    org = _org_for(actor, org_name)
    if actor is not None and actor.org_id != org.id:
        raise NotFound("no such org")
    query = ProviderKey.select().where(ProviderKey.org == org).order_by(ProviderKey.name)
    if actor is not None and actor.role != ROLE_ADMIN:
        query = query.where(ProviderKey.owner == actor.user_id)
    return [KeyView.of(key) for key in query]


def rotate_key(
    name: str,
    secret: str,
    keyring: Keyring,
    *,
    org_name: str | None = None,
    actor: Principal | None = None,
) -> KeyView:
    """Replace a key's secret. The row (and so its id and routes) stays; requests already
    under way finish with the old secret, later ones get the new one."""
    key = _key_for(name, org_name, actor, owner_only=True)
    secret = _check_secret(secret)
    ciphertext = keyring.encrypt(secret, KeyContext(key.org_id, key.id, key.owner_id))
    updated = (
        ProviderKey.update(
            ciphertext=ciphertext, fingerprint=fingerprint(secret), updated_at=time.time()
        )
        .where(ProviderKey.id == key.id)
        .execute()
    )
    if not updated:
        raise NotFound(f"key {name!r} was deleted meanwhile")
    key = ProviderKey.get_by_id(key.id)
    log.info("key %s of org %d: secret replaced", key.name, key.org_id)
    _key_changed(key)
    return KeyView.of(key)


def set_key_disabled(
    name: str, disabled: bool, *, org_name: str | None = None, actor: Principal | None = None
) -> KeyView:
    """Switch a key off (its routes stop resolving) or on again; the secret stays stored."""
    key = _key_for(name, org_name, actor)
    if key.disabled != disabled:
        ProviderKey.update(disabled=disabled, updated_at=time.time()).where(
            ProviderKey.id == key.id
        ).execute()
        key = ProviderKey.get_by_id(key.id)
        log.info(
            "key %s of org %d: %s", key.name, key.org_id, "disabled" if disabled else "enabled"
        )
        _key_changed(key)
    return KeyView.of(key)


def delete_key(
    name: str, *, org_name: str | None = None, force: bool = False, actor: Principal | None = None
) -> list[str]:
    """Delete a key and its ciphertext; returns the names of the routes that went with it.
    A key that routes use is only deleted with ``force`` (the routes are deleted too)."""
    key = _key_for(name, org_name, actor)
    with database.atomic():
        routes = [r.name for r in Route.select(Route.name).where(Route.key == key.id)]
        if routes and not force:
            raise ServiceError(
                f"key {name!r} is used by routes {', '.join(sorted(routes))}; delete them "
                "first, or delete the key with its routes (force)",
                409,
            )
        Route.delete().where(Route.key == key.id).execute()
        ProviderKey.delete().where(ProviderKey.id == key.id).execute()
    log.info("key %s of org %d deleted with %d routes", key.name, key.org_id, len(routes))
    _key_changed(key)
    return sorted(routes)


# --- moving ciphertexts: rewrap after a Vault key rotation, migrate between backends ---


def update_ciphertext_if_unchanged(key_id: int, old: str, new: str) -> bool:
    """Store ``new`` only if the row still holds ``old`` (nobody rotated it meanwhile)."""
    updated = (
        ProviderKey.update(ciphertext=new)
        .where((ProviderKey.id == key_id) & (ProviderKey.ciphertext == old))
        .execute()
    )
    return bool(updated)


@dataclass
class CiphertextReport:
    """What a rewrap or migration did, row by row counted (names only, never secrets)."""

    updated: int = 0
    unchanged: int = 0
    conflicts: int = 0
    failed: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.conflicts


def _key_batches(batch_size: int) -> Iterator[list[tuple[int, str, KeyContext, str]]]:
    """Every key row as (id, name, context, ciphertext), ``batch_size`` rows at a time,
    by id, each batch read fresh (rows may change between batches)."""
    last = 0
    while True:
        rows = list(
            ProviderKey.select(
                ProviderKey.id,
                ProviderKey.org,
                ProviderKey.owner,
                ProviderKey.name,
                ProviderKey.ciphertext,
            )
            .where(ProviderKey.id > last)
            .order_by(ProviderKey.id)
            .limit(batch_size)
        )
        if not rows:
            return
        last = rows[-1].id
        yield [(r.id, r.name, KeyContext(r.org_id, r.id, r.owner_id), r.ciphertext) for r in rows]


def _store(
    report: CiphertextReport, changes: list[tuple[int, str, str, str]]
) -> list[tuple[int, str, str, str]]:
    """Write (id, name, old, new) changes in one transaction; returns the conflicting ones."""
    conflicts = []
    with database.atomic():
        for key_id, name, old, new in changes:
            if update_ciphertext_if_unchanged(key_id, old, new):
                report.updated += 1
            else:
                conflicts.append((key_id, name, old, new))
    return conflicts


def rewrap_keys(
    vault: Rewrapper,
    *,
    batch_size: int = 100,
    progress: Callable[[CiphertextReport], None] | None = None,
) -> CiphertextReport:
    """Move every vault ciphertext to the newest transit key version, while gateways serve.

    Vault rewraps without returning plaintext. Each batch is one Vault request and one
    transaction; a row is updated only if it still holds what was read, so a secret
    replaced meanwhile is never overwritten (it was encrypted under the newest version
    anyway). Rows of another backend are left alone.
    """
    if batch_size <= 0:
        raise ServiceError("batch size must be positive")
    report = CiphertextReport()
    for batch in _key_batches(batch_size):
        rows = [row for row in batch if backend_of(row[3]) == "vault"]
        report.unchanged += len(batch) - len(rows)
        results = vault.rewrap_batch([(ct, ctx) for _id, _name, ctx, ct in rows])
        changes = []
        for (key_id, name, _ctx, old), new in zip(rows, results, strict=True):
            if new is None:
                report.failed.append(name)
                continue
            version = new.split(":", 2)[1] if new.count(":") >= 2 else "?"
            report.versions[version] = report.versions.get(version, 0) + 1
            if new.split(":", 2)[:2] == old.split(":", 2)[:2]:
                report.unchanged += 1  # already under the newest version: no write needed
            else:
                changes.append((key_id, name, old, new))
        report.conflicts += len(_store(report, changes))
        if progress is not None:
            progress(report)
    return report


def migrate_keys(
    keyring: Keyring,
    target: Keyring,
    *,
    batch_size: int = 100,
    progress: Callable[[CiphertextReport], None] | None = None,
) -> CiphertextReport:
    """Re-encrypt every key with ``target`` (decrypting with ``keyring``, which reads every
    configured backend), while gateways serve: a gateway configured with both backends
    decrypts either form, so a row may switch at any moment. Rows changed meanwhile are
    retried once; the plaintexts never leave this process's memory."""
    if batch_size <= 0:
        raise ServiceError("batch size must be positive")
    report = CiphertextReport()

    def convert(
        row_id: int, name: str, ctx: KeyContext, old: str
    ) -> tuple[int, str, str, str] | None:
        try:
            new = target.encrypt(keyring.decrypt(old, ctx), ctx)
        except KeyringError:
            report.failed.append(name)
            return None
        return (row_id, name, old, new)

    for batch in _key_batches(batch_size):
        changes = []
        for row_id, name, ctx, old in batch:
            if backend_of(old) == target.name:
                report.unchanged += 1
                continue
            change = convert(row_id, name, ctx, old)
            if change is not None:
                changes.append(change)
        for key_id, name, _old, _new in _store(report, changes):
            # Rotated or migrated by someone else between our read and write: read it again.
            current = ProviderKey.get_or_none(ProviderKey.id == key_id)
            if current is None:
                continue  # deleted meanwhile: nothing left to migrate
            if backend_of(current.ciphertext) == target.name:
                report.unchanged += 1
                continue
            ctx = KeyContext(current.org_id, current.id, current.owner_id)
            retry = convert(key_id, name, ctx, current.ciphertext)
            if retry is not None and _store(report, [retry]):
                report.conflicts += 1  # changing under us again: left for the next run
        if progress is not None:
            progress(report)
    report.versions = _backend_counts()
    return report


def _backend_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in ProviderKey.select(ProviderKey.ciphertext):
        backend = backend_of(key.ciphertext)
        counts[backend] = counts.get(backend, 0) + 1
    return counts


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
