"""Users and orgs from an outside identity (Visdom Trace, a JWT issuer), bound by outside id.

An outside org is found by its binding only: a Visdom Trace org by its org id
(``Org.external_id``), a JWT org by its issuer and org claim value
(``Org.jwt_issuer``, ``Org.jwt_org``). The first sight of an outside org that no
tvgate org is named like creates the org, bound to it. A tvgate org of that name
that is not bound to it is refused (:class:`NotLinked`), never taken: an operator
links the two with ``tvgate orgs link``. Only the operator's pinned org (a JWT
without an org claim on a pinned gateway) is found by its name.

A user is found by (org, outside user id). A user row bound to another outside id
is never rebound. A row made without one (``tvgate users add``) with the same email
is linked only when the operator turned ``link_users_by_email`` on and the email is
verified: a JWT's ``email_verified: true``; Visdom Trace's answer never says so.
Names, emails and roles are refreshed on every sight; the outside role is mapped to
tvgate's: owner and admin (and a single-tenant Visdom Trace's tracing-admin) → admin,
auditor → auditor, anything else (tracing, developer, …) → member.
Refusals are audited in the tvgate org they were refused from. Runs in the database pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import peewee

from tvgate import services
from tvgate.identity import AuthError, NotLinked, Principal, select_membership
from tvgate.models import ROLE_ADMIN, ROLE_AUDITOR, ROLE_MEMBER, Org, User, database


def map_role(external_role: str) -> str:
    role = external_role.strip().lower()
    if role in ("owner", "admin", "tracing-admin"):
        return ROLE_ADMIN
    if role == "auditor":
        return ROLE_AUDITOR
    return ROLE_MEMBER


@dataclass(frozen=True, slots=True)
class Membership:
    """One org a person belongs to, as the identity provider tells it."""

    org_name: str
    #: The outside org's id: Visdom Trace's org id, or the JWT's org claim value; None only
    #: for the operator's pinned org, which is found by its name.
    org_external_id: str | None
    display_name: str
    role: str
    #: The issuer of the JWT whose org claim ``org_external_id`` is; None for Visdom Trace.
    jwt_issuer: str | None = None

    @property
    def source(self) -> str:
        return "JWT issuer's org" if self.jwt_issuer is not None else "Visdom Trace org"

    @property
    def link_command(self) -> str:
        option = "--jwt-org" if self.jwt_issuer is not None else "--visdom-org-id"
        return f"tvgate orgs link {self.org_name} {option} {self.org_external_id}"

    @property
    def binding(self) -> dict[str, str | None]:
        """The Org columns that bind a tvgate org to this outside org."""
        if self.jwt_issuer is not None:
            return {"jwt_issuer": self.jwt_issuer, "jwt_org": self.org_external_id}
        return {"external_id": self.org_external_id}


@dataclass(frozen=True, slots=True)
class OutsideIdentity:
    user_external_id: str
    email: str
    name: str
    memberships: tuple[Membership, ...]
    #: The provider vouches the person owns the email (a JWT's ``email_verified: true``).
    email_verified: bool = False


class _Refused(Exception):
    """A binding rule refused the sign-in: audited in ``org``, then ``error`` is raised."""

    def __init__(self, org: Org, target: str, error: NotLinked, detail: dict[str, str]) -> None:
        super().__init__(str(error))
        self.org, self.target, self.error, self.detail = org, target, error, detail


def _bound_org(membership: Membership) -> Org | None:
    if membership.jwt_issuer is not None:
        return Org.get_or_none(
            (Org.jwt_issuer == membership.jwt_issuer) & (Org.jwt_org == membership.org_external_id)
        )
    return Org.get_or_none(Org.external_id == membership.org_external_id)


def _under_tvgate_names(memberships: Sequence[Membership]) -> list[Membership]:
    """Each membership named as the tvgate org bound to it (the name requests and pinning
    use), bound ones first so that an unbound namesake never shadows them."""
    bound, unbound = [], []
    for membership in memberships:
        org = _bound_org(membership) if membership.org_external_id is not None else None
        if org is None:
            unbound.append(membership)
        else:
            bound.append(dataclasses.replace(membership, org_name=org.name))
    return bound + unbound


def find_org(membership: Membership) -> Org | None:
    """The tvgate org a membership stands for, if there is one: the org bound to its outside
    org (the pinned org, which has no outside id, by its name). Never a namesake."""
    if membership.org_external_id is None:
        return Org.get_or_none(Org.name == membership.org_name)
    return _bound_org(membership)


def _org_for(membership: Membership) -> Org:
    if membership.org_external_id is None:
        org, _created = Org.get_or_create(
            name=membership.org_name, defaults={"display_name": membership.org_name}
        )
        return org
    org = _bound_org(membership)
    if org is not None:
        if membership.display_name and org.display_name != membership.display_name:
            org.display_name = membership.display_name
            org.save()
        return org
    namesake = Org.get_or_none(Org.name == membership.org_name)
    if namesake is not None:
        raise _org_clash(membership, namesake)
    return Org.create(
        name=membership.org_name,
        display_name=membership.display_name or membership.org_name,
        **membership.binding,
    )


def _org_clash(membership: Membership, namesake: Org) -> _Refused:
    linked_elsewhere = (
        namesake.jwt_org is not None
        if membership.jwt_issuer is not None
        else namesake.external_id is not None
    )
    if linked_elsewhere:
        # No command to suggest: moving a linked org to another outside org is the
        # takeover this refuses, unless the operator knowingly does it.
        message = f"org {namesake.name!r} in tvgate is linked to another {membership.source}"
    else:
        message = (
            f"org {namesake.name!r} exists in tvgate but is not linked to this "
            f"{membership.source}; an admin runs `{membership.link_command}`"
        )
    detail = {k: v or "" for k, v in membership.binding.items()}
    return _Refused(namesake, namesake.name, NotLinked(message), detail)


def _user_for(
    identity: OutsideIdentity, org: Org, email: str, role: str, link_by_email: bool
) -> User:
    user = User.get_or_none((User.org == org) & (User.external_id == identity.user_external_id))
    namesake = User.get_or_none((User.org == org) & (User.email == email))
    detail = {"user_external_id": identity.user_external_id}
    if user is None:
        if namesake is None:
            return User.create(
                org=org,
                email=email,
                name=identity.name,
                role=role,
                external_id=identity.user_external_id,
            )
        _check_email_link(identity, org, namesake, link_by_email)
        user = namesake
    elif namesake is not None and namesake.id != user.id:
        error = NotLinked(f"email {email} belongs to another user of org {org.name!r}")
        raise _Refused(org, email, error, detail)
    fresh = (email, identity.name, role, identity.user_external_id)
    if (user.email, user.name, user.role, user.external_id) != fresh:
        user.email, user.name, user.role, user.external_id = fresh
        user.save()
    return user


def _check_email_link(
    identity: OutsideIdentity, org: Org, namesake: User, link_by_email: bool
) -> None:
    """Refuse unless this identity may take over the row of its email (review finding 16.5)."""
    detail = {"user_external_id": identity.user_external_id}
    if namesake.external_id is not None:
        error = NotLinked(
            f"user {namesake.email} in org {org.name!r} is already linked to another identity"
        )
        raise _Refused(org, namesake.email, error, detail)
    if not (link_by_email and identity.email_verified):
        error = NotLinked(
            f"user {namesake.email} exists in org {org.name!r} but is not linked to this "
            "sign-in (tvgate links by email only a JWT with email_verified true, and only "
            "when the operator turned link_users_by_email on)"
        )
        raise _Refused(org, namesake.email, error, detail)


def _rows(
    identity: OutsideIdentity, requested_org: str | None, pinned_org: str, link_by_email: bool
) -> tuple[Org, User]:
    with database.atomic():
        memberships = _under_tvgate_names(identity.memberships)
        membership = select_membership(memberships, requested_org, pinned_org)
        org = _org_for(membership)
        email = identity.email.strip().lower()
        return org, _user_for(identity, org, email, map_role(membership.role), link_by_email)


def provision(
    identity: OutsideIdentity,
    requested_org: str | None,
    pinned_org: str,
    *,
    link_by_email: bool = False,
) -> Principal:
    """The tvgate principal for this person in the org the request acts in, creating or
    refreshing rows; raises NotLinked when a binding rule refuses, OrgSelectionError when
    the org is not one of theirs."""
    try:
        try:
            org, user = _rows(identity, requested_org, pinned_org, link_by_email)
        except peewee.IntegrityError:
            # Two first sights at once: the other one created the rows; read them again.
            org, user = _rows(identity, requested_org, pinned_org, link_by_email)
    except _Refused as refused:
        services.audit_refused_sign_in(
            refused.org.id, identity.email, refused.target, str(refused.error), refused.detail
        )
        raise refused.error from None
    if user.disabled:
        raise AuthError("user disabled in tvgate")
    return Principal.of(user, org)
