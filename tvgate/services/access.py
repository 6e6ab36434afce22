"""Who may do what, and the record of it: the errors services raise, the audit log, the
role checks, and the lookups of an org, a user or a key every other module starts from.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from tvgate.identity import Principal
from tvgate.models import (
    ROLE_ADMIN,
    ROLE_MEMBER,
    AuditEvent,
    Org,
    ProviderKey,
    User,
)

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


OPERATOR = "operator (command line)"


def audit(
    actor: Principal | None,
    org_id: int,
    action: str,
    target: str = "",
    change: dict[str, Any] | None = None,
    *,
    allowed: bool = True,
    by: str = OPERATOR,
) -> None:
    """Record who did (or tried) what. ``change`` must never hold a secret. ``by`` names
    the actor when there is no principal (the operator, or tvgate itself)."""
    AuditEvent.create(
        org_id=org_id,
        actor_id=actor.user_id if actor else None,
        actor=actor.email if actor else by,
        action=action,
        target=target[:400],
        change=orjson.dumps(change or {}).decode(),
        allowed=allowed,
    )


def _changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """What an audit event records of an update: [before, after] of each field that moved."""
    return {k: [before[k], after[k]] for k in after if before[k] != after[k]}


def _deny(
    actor: Principal,
    action: str,
    target: str,
    error: ServiceError,
    *,
    owner_org_id: int | None = None,
) -> ServiceError:
    """Record a refused attempt in the actor's own org, and return the error to raise.

    When the object belongs to another org (``owner_org_id``), the attempt is recorded
    there too: that org's admins are the ones who need to know someone tried. The error
    the actor gets stays "not found" and names nothing of the other org.
    """
    change = {"refused": str(error)}
    audit(actor, actor.org_id, action, target, change, allowed=False)
    if owner_org_id is not None and owner_org_id != actor.org_id:
        audit(actor, owner_org_id, action, target, change, allowed=False)
    return error


def _missing(
    actor: Principal | None, action: str, target: str, message: str, owner_org_id: int | None
) -> ServiceError:
    """The NotFound to raise for a row that is not there, or is another org's (which looks
    the same to the actor, and is recorded as a refused attempt in their org)."""
    error = NotFound(message)
    if actor is None:
        return error
    return _deny(actor, action, target, error, owner_org_id=owner_org_id)


def _require_admin(actor: Principal | None, org: Org, action: str = "", target: str = "") -> None:
    if actor is None:
        return
    if actor.org_id != org.id:
        raise _deny(actor, action or "access", target, NotFound("no such org"), owner_org_id=org.id)
    if actor.role != ROLE_ADMIN:
        raise _deny(
            actor, action or "access", target, Forbidden("only an admin of this org may do that")
        )


def _require_reader(actor: Principal | None, org: Org) -> None:
    """Admins and auditors read the whole org; members only what is theirs."""
    if actor is not None and (actor.org_id != org.id or actor.role == ROLE_MEMBER):
        error = Forbidden("only admins and auditors may see this")
        raise _deny(actor, "read", org.name, error, owner_org_id=org.id)


def _actor_org(actor: Principal | None, org_name: str | None) -> Org:
    """The org an operation acts on: always the actor's own, whatever name was given."""
    if actor is None:
        return get_org(org_name)
    if org_name is not None and org_name != actor.org_name:
        named = Org.get_or_none(Org.name == org_name)
        error = NotFound(f"no org named {org_name!r}")
        raise _deny(actor, "access", org_name, error, owner_org_id=named.id if named else None)
    return Org.get_by_id(actor.org_id)


def _admin_org(actor: Principal | None, org_name: str | None, action: str, target: str) -> Org:
    """The org an admin's change acts on (as ``_actor_org``), refused to anyone else."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, action, target)
    return org


def _readable_org(actor: Principal | None, org_name: str | None) -> Org:
    """The org a read of all of it acts on (as ``_actor_org``), refused to members."""
    org = _actor_org(actor, org_name)
    _require_reader(actor, org)
    return org


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


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 200 or any(c.isspace() or ord(c) < 32 for c in name):
        raise ServiceError(f"{what} needs a name of 1 to 200 characters without spaces")


def get_key(name: str, org: Org) -> ProviderKey:
    key = ProviderKey.get_or_none((ProviderKey.org == org) & (ProviderKey.name == name))
    if key is None:
        raise NotFound(f"no key named {name!r} in org {org.name!r}")
    return key


def list_audit(
    org_name: str | None = None,
    *,
    before_id: int | None = None,
    limit: int = 100,
    actor: Principal | None = None,
) -> list[dict[str, Any]]:
    """Audit events, newest first, a page at a time (``before_id`` is the cursor)."""
    org = _readable_org(actor, org_name)
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
