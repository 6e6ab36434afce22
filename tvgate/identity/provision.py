"""Users and orgs from an outside identity (Visdom Trace, a JWT issuer), created on first sight.

The outside ids are the stable keys: an org is found by its external id, a
user by (org, external id); names and emails are refreshed on every sight.
The outside role is mapped to tvgate's: owner and admin → admin, auditor →
auditor, anything else → member. Runs in the database pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import peewee

from tvgate.identity import AuthError, Principal
from tvgate.models import ROLE_ADMIN, ROLE_AUDITOR, ROLE_MEMBER, Org, User, database


def map_role(external_role: str) -> str:
    role = external_role.strip().lower()
    if role in ("owner", "admin"):
        return ROLE_ADMIN
    if role == "auditor":
        return ROLE_AUDITOR
    return ROLE_MEMBER


@dataclass(frozen=True, slots=True)
class Membership:
    """One org a person belongs to, as the identity provider tells it."""

    org_name: str
    org_external_id: str | None
    display_name: str
    role: str


@dataclass(frozen=True, slots=True)
class OutsideIdentity:
    user_external_id: str
    email: str
    name: str
    memberships: tuple[Membership, ...]


def find_org(membership: Membership) -> Org | None:
    """The org a membership stands for, if tvgate has it: by outside id, else by name."""
    if membership.org_external_id:
        org = Org.get_or_none(Org.external_id == membership.org_external_id)
        if org is not None:
            return org
    # An org an operator created by name is linked to the outside org of that name.
    return Org.get_or_none(Org.name == membership.org_name)


def _org_for(membership: Membership) -> Org:
    org = None
    if membership.org_external_id:
        org = Org.get_or_none(Org.external_id == membership.org_external_id)
    if org is None:
        org = find_org(membership)
        if org is None:
            org = Org.create(
                name=membership.org_name,
                display_name=membership.display_name or membership.org_name,
                external_id=membership.org_external_id,
            )
        elif membership.org_external_id and org.external_id is None:
            org.external_id = membership.org_external_id
            org.save()
    elif membership.display_name and org.display_name != membership.display_name:
        org.display_name = membership.display_name
        org.save()
    return org


def _user_for(identity: OutsideIdentity, org: Org, email: str, role: str) -> User:
    user = User.get_or_none(
        (User.org == org) & (User.external_id == identity.user_external_id)
    ) or User.get_or_none((User.org == org) & (User.email == email))
    if user is None:
        return User.create(
            org=org,
            email=email,
            name=identity.name,
            role=role,
            external_id=identity.user_external_id,
        )
    fresh = (email, identity.name, role, identity.user_external_id)
    if (user.email, user.name, user.role, user.external_id) != fresh:
        user.email, user.name, user.role, user.external_id = fresh
        user.save()
    return user


def provision(identity: OutsideIdentity, membership: Membership) -> Principal:
    """The tvgate principal for this person in this org, creating or refreshing rows."""
    email = identity.email.strip().lower()
    role = map_role(membership.role)
    try:
        with database.atomic():
            org = _org_for(membership)
            user = _user_for(identity, org, email, role)
    except peewee.IntegrityError:
        # Two first sights at once: the other one created the rows; read them again.
        with database.atomic():
            org = _org_for(membership)
            user = _user_for(identity, org, email, role)
    if user.disabled:
        raise AuthError("user disabled in tvgate")
    return Principal(
        user_id=user.id, org_id=org.id, org_name=org.name, email=user.email, role=user.role
    )
