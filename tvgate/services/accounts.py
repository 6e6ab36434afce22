"""Orgs and users: linking an org to Visdom Trace, adding and changing users, local
passwords, and the first start on an empty database.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import peewee

from tvgate.identity import Principal
from tvgate.models import (
    CLIENT_SUBSCRIPTION,
    ROLE_ADMIN,
    ROLE_MEMBER,
    ROLES,
    AuditEvent,
    Org,
    Trace,
    User,
    database,
)
from tvgate.rows import fields_of, from_row
from tvgate.services.access import (
    ServiceError,
    _admin_org,
    _changes,
    _readable_org,
    audit,
    ensure_org,
    get_org,
    get_user,
)
from tvgate.services.events import announce


def audit_refused_sign_in(
    org_id: int, who: str, target: str, reason: str, detail: dict[str, str]
) -> None:
    """Record an outside identity refused by a binding rule (there is no principal yet)."""
    AuditEvent.create(
        org_id=org_id,
        actor=who.strip().lower()[:320],
        action="sign in",
        target=target[:400],
        change=orjson.dumps({"refused": reason, **detail}).decode(),
        allowed=False,
    )


@dataclass(frozen=True, slots=True)
class OrgView:
    name: str
    visdom_org_id: str | None
    jwt_issuer: str | None
    jwt_org: str | None

    @classmethod
    def of(cls, org: Org) -> OrgView:
        return cls(org.name, org.external_id, org.jwt_issuer, org.jwt_org)


def list_orgs() -> list[OrgView]:
    """Every org and the outside orgs it is linked to (operator only: no API shows it)."""
    return [OrgView.of(org) for org in Org.select().order_by(Org.name)]


def link_org(
    name: str,
    *,
    visdom_org_id: str | None = None,
    jwt_org: str | None = None,
    jwt_issuer: str = "",
) -> OrgView:
    """Bind a tvgate org to a Visdom Trace org id, or to a JWT issuer's org claim value.

    The operator's explicit act, and the only way an org made in tvgate is joined to an
    outside org (sign-in never binds by name). Operator only: an org admin cannot pick
    which outside org's members become theirs. A binding an org already has is replaced
    (audited, before and after); an outside org bound to another tvgate org is refused.
    """
    org = get_org(name)
    if (visdom_org_id is None) == (jwt_org is None):
        raise ServiceError("link either a Visdom Trace org id or a JWT org claim value")
    if jwt_org is not None and not jwt_issuer:
        raise ServiceError("linking a JWT org needs the issuer: set jwt_issuer")
    binding: dict[str, str | None] = (
        {"external_id": visdom_org_id.strip()}
        if visdom_org_id is not None
        else {"jwt_issuer": jwt_issuer, "jwt_org": (jwt_org or "").strip()}
    )
    for column, value in binding.items():
        longest = Org._meta.fields[column].max_length
        if not value or len(value) > longest:
            raise ServiceError(f"{column} must be 1 to {longest} characters")
    where = [getattr(Org, column) == value for column, value in binding.items()]
    holder = Org.get_or_none(*where)
    if holder is not None and holder.id != org.id:
        error = ServiceError(
            f"that outside org is already linked to tvgate org {holder.name!r}", 409
        )
        audit(None, org.id, "link org", org.name, {"refused": str(error)}, allowed=False)
        raise error
    before = {column: getattr(org, column) for column in binding}
    with database.atomic():
        for column, value in binding.items():
            setattr(org, column, value)
        org.save()
        audit(
            None,
            org.id,
            "link org",
            org.name,
            {column: [before[column], value] for column, value in binding.items()},
        )
    announce(org.id, identities=True)
    return OrgView.of(org)


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
    """The local users (one per org) whose password this is; empty when none matches.

    An email with no local password is checked against a dummy hash, so that it costs
    the same scrypt as one with a password: the time taken does not tell which emails
    have one.
    """
    users = list(
        User.select().where(
            (User.email == email.strip().lower())
            & User.password_hash.is_null(False)
            & ~User.disabled
        )
    )
    if not users:
        check_password(password, _DUMMY_HASH)
        return []
    return [u for u in users if check_password(password, u.password_hash or "")]


_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1


# Passwords are for local users only; Visdom Trace users never give tvgate a password to keep.


def hash_password(password: str) -> str:
    """scrypt (memory-hard, 32 MiB per guess) with a random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=64 * 1024 * 1024
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


#: What an email without a local password is checked against: real parameters and a
#: random salt, so the check costs what a real one does, and a random digest that no
#: password produces.
_DUMMY_HASH = (
    f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${secrets.token_hex(16)}${secrets.token_hex(64)}"
)


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


@dataclass(frozen=True, slots=True)
class UserView:
    id: int
    email: str
    name: str
    role: str
    disabled: bool
    local: bool
    created_at: float
    #: Calls the user made with their own Claude subscription through tvgate, and when the
    #: last one came (None: never), from the traces kept.
    subscription_calls: int
    subscription_last_at: float | None

    @classmethod
    def of(cls, user: User, use: SubscriptionUse | None = None) -> UserView:
        """The view of ``user``, with their subscription ``use`` (else read for them)."""
        if use is None:
            use = subscription_use(user.org_id, user.id).get(user.id, (0, None))
        calls, last = use
        return from_row(
            cls,
            user,
            local=user.password_hash is not None,
            subscription_calls=calls,
            subscription_last_at=last,
        )

    def as_dict(self) -> dict[str, Any]:
        return fields_of(self)


#: (calls, when the last one came) of a user's own Claude subscription through tvgate.
SubscriptionUse = tuple[int, float | None]
#: The traces of subscription calls, as the partial index of migration 21 is defined: a
#: literal, so that SQLite's planner sees it implies the index's condition.
_SUBSCRIPTION_TRACES = peewee.SQL(f"client_credential = '{CLIENT_SUBSCRIPTION}'")


def subscription_use(org_id: int, user_id: int | None = None) -> dict[int, SubscriptionUse]:
    """Each user of the org (or only ``user_id``) who passed their own Claude subscription
    through tvgate: their calls and the last one's time, counted from the traces."""
    query = (
        Trace.select(Trace.user_id, peewee.fn.COUNT(Trace.id), peewee.fn.MAX(Trace.received_at))
        .where((Trace.org_id == org_id) & _SUBSCRIPTION_TRACES)
        .group_by(Trace.user_id)
    )
    if user_id is not None:
        query = query.where(Trace.user_id == user_id)
    rows = cast("Iterable[tuple[int | None, int, float]]", query.tuples())
    return {uid: (calls, last) for uid, calls, last in rows if uid is not None}


def list_users(org_name: str | None = None, *, actor: Principal | None = None) -> list[UserView]:
    org = _readable_org(actor, org_name)
    uses = subscription_use(org.id)
    return [
        UserView.of(u, uses.get(u.id, (0, None)))
        for u in User.select().where(User.org == org).order_by(User.email)
    ]


def update_user(
    email: str,
    *,
    role: str | None = None,
    disabled: bool | None = None,
    org_name: str | None = None,
    actor: Principal | None = None,
) -> UserView:
    """Change a user's role or disable them; the org always keeps one enabled admin."""
    org = _admin_org(actor, org_name, "update user", email)
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
        audit(actor, org.id, "update user", user.email, _changes(before, after))
    announce(org.id, identities=True)
    return UserView.of(user)
