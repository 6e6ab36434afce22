"""Provider keys: add, grant, change, rotate, switch off and delete, each audited; the
secret is encrypted by the keyring before it is stored and never returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
import peewee

from tvgate.config import UpstreamRules
from tvgate.identity import Principal
from tvgate.keyring import (
    KeyContext,
    Keyring,
    fingerprint,
)
from tvgate.models import (
    GOVERN_KEY,
    GOVERN_ROUTE,
    PROVIDERS,
    ROLE_ADMIN,
    ROLE_AUDITOR,
    ROLE_MEMBER,
    KeyGrant,
    Org,
    ProviderKey,
    Route,
    User,
    database,
)
from tvgate.providers.clouds import credentials_for
from tvgate.rows import fields_of, from_row
from tvgate.services.access import (
    Forbidden,
    NotFound,
    ServiceError,
    _actor_org,
    _admin_org,
    _check_name,
    _deny,
    _require_admin,
    audit,
    get_key,
    get_user,
)
from tvgate.services.events import announce
from tvgate.services.governance import _drop_rules_of
from tvgate.services.key_checks import (
    check_chat_only,
    check_max_concurrent,
    check_secret_urls,
    checked_key,
    default_base_url,
    merged_settings,
    url_checker,
)

log = logging.getLogger("tvgate.services")


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
    max_concurrent: int = 0
    chat_only: bool = False
    #: A cloud key's settings (an API version, a project, a region ...): none of them secret.
    settings: dict[str, Any] | None = None

    @classmethod
    def of(cls, key: ProviderKey) -> KeyView:
        owner = key.owner.email if key.owner is not None else None
        return from_row(cls, key, owner=owner, settings=orjson.loads(key.settings or "{}"))

    def as_dict(self) -> dict[str, Any]:
        return fields_of(self, fingerprint="…" + self.fingerprint, settings=self.settings or {})


def add_key(
    name: str,
    provider: str,
    secret: str,
    keyring: Keyring,
    *,
    org_name: str | None = None,
    base_url: str | None = None,
    allow_private: bool = False,
    allow_private_user: bool = False,
    owner_email: str | None = None,
    available_to_all: bool = True,
    max_concurrent: int = 0,
    chat_only: bool = False,
    settings: dict[str, Any] | None = None,
    gateway_urls: Collection[str] = (),
    actor: Principal | None = None,
) -> KeyView:
    """Store a provider key encrypted; only ciphertext and fingerprint reach the database.

    A cloud key (Azure OpenAI, Vertex AI) has ``settings`` of its own (none secret: an API
    version, an endpoint style, a project and region), its endpoint as the base URL (Vertex
    AI's region's by default) and a JSON object as its secret (Vertex AI's: a service
    account's key file), each checked by the cloud's credential module
    (``tvgate.providers.clouds``).

    An admin adds org keys; a user adds a private key of their own when the org allows it.
    ``max_concurrent`` caps the calls open on the key at once, across every gateway
    process (0: no cap). ``chat_only``: an OpenAI-compatible upstream without the
    Responses API (vLLM, Ollama), whose Responses clients are translated to Chat Completions.
    ``allow_private`` lets an org key, ``allow_private_user`` a
    user's own key, reach http and private upstreams (the two settings of that name).
    ``gateway_urls``: where this gateway answers (``Settings``), refused as base URLs.
    ``settings``: a cloud key's (``tvgate.providers.clouds``), which its cloud checks, as it
    does its secret (a JSON object); its default base URL is the cloud's for them.
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
    _check_name(name, "a key")
    max_concurrent = check_max_concurrent(max_concurrent)
    chat_only = check_chat_only(chat_only, provider)
    checked = checked_key(provider, settings, secret, base_url)
    checked_url = url_checker(
        actor, org.id, "add key", name, owner is not None,
        allow_private, allow_private_user, gateway_urls,
    )  # fmt: skip
    url = checked_url(checked.base_url, "base URL")
    check_secret_urls(checked, checked_url)
    with database.atomic():
        if ProviderKey.get_or_none((ProviderKey.org == org) & (ProviderKey.name == name)):
            raise ServiceError(f"a key named {name!r} already exists in org {org.name!r}", 409)
        key = ProviderKey.create(
            org=org,
            name=name,
            provider=provider,
            base_url=url,
            ciphertext="",
            fingerprint=fingerprint(checked.shown),
            owner=owner,
            available_to_all=available_to_all if owner is None else False,
            created_by=actor.user_id if actor else None,
            max_concurrent=max_concurrent,
            chat_only=chat_only,
            settings=orjson.dumps(checked.settings).decode(),
        )
        # The id (and owner) are part of the encryption context, so encrypt once the row exists.
        key.ciphertext = keyring.encrypt(secret, KeyContext(org.id, key.id, key.owner_id))
        key.save()
        audit(
            actor,
            org.id,
            "add key",
            name,
            {
                "provider": provider,
                "base_url": url,
                "owner": owner_email,
                "max_concurrent": max_concurrent,
                "chat_only": chat_only,
                **({"settings": checked.settings} if checked.settings else {}),
            },
        )
    announce(org.id)
    return KeyView.of(key)


def _own_user(actor: Principal, email: str | None, action: str, target: str) -> User:
    """The actor's own user row; naming someone else is refused, and auditors change nothing."""
    if actor.role == ROLE_AUDITOR:
        raise _deny(actor, action, target, Forbidden("auditors read; they change nothing"))
    if email is not None and email.strip().lower() != actor.email:
        raise _deny(actor, action, target, Forbidden("users may only act for themselves"))
    return User.get_by_id(actor.user_id)


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
    org = _admin_org(actor, org_name, "revoke key" if revoke else "grant key", name)
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
    announce(org.id)
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
    org = _admin_org(actor, org_name, "update key", name)
    key = get_key(name, org)
    if key.owner_id is not None:
        raise ServiceError("a user's own key is only ever available to its owner")
    if key.available_to_all != available_to_all:
        key.available_to_all = available_to_all
        key.updated_at = time.time()
        key.save()
        audit(actor, org.id, "update key", name, {"available_to_all": available_to_all})
        announce(org.id)
    return KeyView.of(key)


#: The highest concurrency cap a key may have (0 means no cap at all).
def update_key(
    name: str,
    *,
    available_to_all: bool | None = None,
    max_concurrent: int | None = None,
    base_url: str | None = None,
    chat_only: bool | None = None,
    allow_private: bool = False,
    allow_private_user: bool = False,
    gateway_urls: Collection[str] = (),
    org_name: str | None = None,
    actor: Principal | None = None,
) -> KeyView:
    """Change who may use an org key, the cap on calls open on a key at once, across
    every gateway process (0: no cap), where the key's calls go, and whether that
    upstream serves only Chat Completions (``chat_only``, as in ``add_key``). An org key is an
    admin's to change; a user's own key its owner's (or an admin's), and it is only ever
    available to its owner. A new base URL passes the checks of ``add_key`` (the three
    settings of that name); a user's own key's only by its owner, since the owner's
    secret goes wherever it points."""
    key = _key_for(name, org_name, actor)
    if actor is not None and actor.role == ROLE_AUDITOR:
        raise _deny(actor, "update key", name, Forbidden("auditors read; they change nothing"))
    changes: dict[str, Any] = {}
    if base_url is not None:
        if actor is not None and key.owner_id not in (None, actor.user_id):
            error = Forbidden("only the owner of this key may change where its calls go")
            raise _deny(actor, "update key", name, error)
        if not isinstance(base_url, str):
            raise ServiceError("base_url must be a string")
        url = url_checker(
            actor, key.org_id, "update key", name, key.owner_id is not None,
            allow_private, allow_private_user, gateway_urls,
        )(base_url, "base URL")  # fmt: skip
        if key.base_url != url:
            changes["base_url"] = url
    if available_to_all is not None:
        if not isinstance(available_to_all, bool):
            raise ServiceError("available_to_all must be true or false")
        if key.owner_id is not None:
            raise ServiceError("a user's own key is only ever available to its owner")
        if key.available_to_all != available_to_all:
            changes["available_to_all"] = available_to_all
    if max_concurrent is not None:
        max_concurrent = check_max_concurrent(max_concurrent)
        if key.max_concurrent != max_concurrent:
            changes["max_concurrent"] = max_concurrent
    if chat_only is not None and key.chat_only != check_chat_only(chat_only, key.provider):
        changes["chat_only"] = chat_only
    if changes:
        before = {field: getattr(key, field) for field in changes}
        with database.atomic():
            ProviderKey.update(**changes, updated_at=time.time()).where(
                ProviderKey.id == key.id
            ).execute()
            audit(
                actor,
                key.org_id,
                "update key",
                key.name,
                {field: [before[field], value] for field, value in changes.items()},
            )
        key = ProviderKey.get_by_id(key.id)
        if "base_url" in changes:
            log.info("key %s of org %d: base URL changed", key.name, key.org_id)
        announce(key.org_id, key_id=key.id if "base_url" in changes else None)
    return KeyView.of(key)


def record_key_uses(used: dict[int, float]) -> None:
    """Write when keys were last sent upstream (key id -> time), in one statement for the
    whole batch; a time is never moved back (another process may have written a later one),
    and never put on a key made after it (SQLite gives a deleted key's id to the next one)."""
    if not used:
        return
    at = peewee.Case(ProviderKey.id, list(used.items()))
    ProviderKey.update(last_used_at=at).where(
        ProviderKey.id.in_(list(used))
        & (ProviderKey.created_at <= at)
        & (ProviderKey.last_used_at.is_null() | (ProviderKey.last_used_at < at))
    ).execute()


#: The most a cloud key's settings object may hold, as JSON text.
def _key_for(
    name: str, org_name: str | None, actor: Principal | None, *, owner_only: bool = False
) -> ProviderKey:
    """The key ``actor`` may manage: an org key needs an org admin; a user's own key its
    owner, or an org admin unless ``owner_only`` (an admin may switch a member's private
    key off or remove it, but not replace its secret)."""
    org = _actor_org(actor, org_name)
    key = get_key(name, org)
    if actor is None:
        return key
    if key.owner_id is not None and key.owner_id == actor.user_id:
        return key
    if key.owner_id is not None and owner_only:
        raise _deny(
            actor,
            "change key",
            name,
            Forbidden("only the owner of this key may replace its secret"),
        )
    if actor.role != ROLE_ADMIN:
        if key.owner_id is not None:
            raise _deny(
                actor, "change key", name, NotFound(f"no key named {name!r} in org {org.name!r}")
            )
        raise _deny(actor, "change key", name, Forbidden("only an admin of this org may do that"))
    return key


def change_key(
    name: str,
    secret: str | None,
    keyring: Keyring,
    *,
    settings: dict[str, Any] | None = None,
    changes: dict[str, Any],
    rules: UpstreamRules,
    actor: Principal | None = None,
) -> KeyView:
    """A new secret (``rotate_key``, with a cloud key's ``settings``) and ``update_key``'s
    ``changes`` (its keywords; None leaves one as it is) as one change, under the
    private-upstream ``rules``: stored together or, when either is refused, none of it,
    the refusal audited."""
    wanted = {field: value for field, value in changes.items() if value is not None}
    with database.atomic() as transaction:
        if secret is not None:
            try:
                view = rotate_key(name, secret, keyring, settings=settings, **rules, actor=actor)
            except Exception:
                transaction.commit()  # nothing changed; its refusal's audit event stays
                raise
            if not wanted:
                return view
        try:
            return update_key(name, **wanted, **rules, actor=actor)
        except Exception as exc:
            if secret is not None:
                transaction.rollback()  # the secret and settings as they were
                if actor is not None and isinstance(exc, ServiceError):
                    refused = {"refused": str(exc)}
                    audit(actor, actor.org_id, "update key", name, refused, allowed=False)
            transaction.commit()  # the refusal kept, as update_key alone keeps it
            raise


def rotate_key(
    name: str,
    secret: str,
    keyring: Keyring,
    *,
    settings: dict[str, Any] | None = None,
    org_name: str | None = None,
    allow_private: bool = False,
    allow_private_user: bool = False,
    gateway_urls: Collection[str] = (),
    actor: Principal | None = None,
) -> KeyView:
    """Replace a key's secret, and a cloud key's ``settings`` with it (those given over the
    stored ones; a null removes one). The row (and so its id and routes) stays; requests
    already under way finish with the old secret and settings, later ones get the new. A
    cloud key's new secret and settings are checked by its cloud together, as when it was
    added (the private-upstream settings as ``add_key`` has them): the settings are given
    with the secret because its cloud checks them against it, and because a changed
    endpoint (an STS endpoint, an authority) is sent it. A base URL that was the old
    region's default follows the new region."""
    key = _key_for(name, org_name, actor, owner_only=True)
    stored = orjson.loads(key.settings or "{}")
    if settings is not None:
        if not isinstance(settings, dict):
            raise ServiceError("settings must be an object")
        if credentials_for(key.provider) is None:
            raise ServiceError(f"a key of provider {key.provider} has no settings")
    wanted = merged_settings(stored, settings)
    base_url: str | None = key.base_url
    if wanted != stored and base_url == default_base_url(key.provider, stored, secret):
        base_url = None  # the old settings' default: the new settings' default now
    checked = checked_key(key.provider, wanted, secret, base_url)
    checked_url = url_checker(
        actor, key.org_id, "rotate key", name, key.owner_id is not None,
        allow_private, allow_private_user, gateway_urls,
    )  # fmt: skip
    url = checked.base_url
    if url != key.base_url:
        url = checked_url(url, "base URL")
    check_secret_urls(checked, checked_url)
    ciphertext = keyring.encrypt(checked.secret, KeyContext(key.org_id, key.id, key.owner_id))
    changes: dict[str, Any] = {"fingerprint": fingerprint(checked.shown)}
    if checked.settings != stored:
        changes["settings"] = orjson.dumps(checked.settings).decode()
    if url != key.base_url:
        changes["base_url"] = url
    updated = (
        ProviderKey.update(ciphertext=ciphertext, updated_at=time.time(), **changes)
        .where(ProviderKey.id == key.id)
        .execute()
    )
    if not updated:
        raise NotFound(f"key {name!r} was deleted meanwhile")
    key = ProviderKey.get_by_id(key.id)
    told: dict[str, Any] = {"fingerprint": key.fingerprint}
    if "settings" in changes:
        told["settings"] = [stored, checked.settings]
    if "base_url" in changes:
        told["base_url"] = url
    audit(actor, key.org_id, "rotate key", key.name, told)
    log.info(
        "key %s of org %d: secret replaced%s",
        key.name,
        key.org_id,
        ", settings changed" if "settings" in changes else "",
    )
    announce(key.org_id, key_id=key.id)
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
        audit(actor, key.org_id, "disable key" if disabled else "enable key", key.name)
        log.info(
            "key %s of org %d: %s", key.name, key.org_id, "disabled" if disabled else "enabled"
        )
        announce(key.org_id, key_id=key.id)
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
                "first, or delete the key with its routes (tvgate keys delete --force, or "
                "'also delete its routes' on the key's page)",
                409,
            )
        Route.delete().where(Route.key == key.id).execute()
        ProviderKey.delete().where(ProviderKey.id == key.id).execute()
        audit(actor, key.org_id, "delete key", key.name, {"routes": sorted(routes)})
        _drop_rules_of(actor, key.org_id, GOVERN_KEY, key.name)
        for route_name in set(routes):
            _drop_rules_of(actor, key.org_id, GOVERN_ROUTE, route_name)
    log.info("key %s of org %d deleted with %d routes", key.name, key.org_id, len(routes))
    announce(key.org_id, key_id=key.id)
    return sorted(routes)
