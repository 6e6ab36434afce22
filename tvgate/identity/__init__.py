"""Who is calling: the Principal, the errors identity raises, and the token reader.

A request's credential comes as ``x-api-key`` (``api-key``) or ``Authorization: Bearer``,
whichever the tool sends. Each kind of credential has an authenticator that
turns it into a Principal or refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPHeaders

from tvgate.headers import header
from tvgate.models import ROLE_ADMIN

if TYPE_CHECKING:
    from tvgate.identity.provision import Membership
    from tvgate.models import Org, ProxyToken, User, WebSession

#: The header a person in several orgs uses to say which org a request is for.
ORG_HEADER = "X-Tvgate-Org"

#: How a principal proved who they are: what a credential they make inherits from.
VIA_TOKEN = "token"  # noqa: S105 - a kind of credential, not a secret
VIA_VISDOM = "visdom"
VIA_JWT = "jwt"
VIA_PASSWORD = "password"  # noqa: S105 - a kind of credential, not a secret


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user acting in one org, and what they authenticated with."""

    user_id: int
    org_id: int
    org_name: str
    email: str
    role: str
    #: One of the VIA_ kinds; empty for a principal tvgate made itself (a lookup).
    via: str = ""
    #: The ``tvg_`` token behind it: the one sent, or the one a web session was opened with.
    token_id: int | None = None
    #: The web session it came from, when it came from one.
    session_id: int | None = None
    #: When the credential stops proving anything (a JWT's ``exp``); None: no fixed end.
    expires_at: float | None = None

    @classmethod
    def of(cls, user: User, org: Org | None = None, **how: Any) -> Principal:
        """A user row acting in its org (``org`` when the caller has it, else the user's);
        ``how`` gives the fields after ``role``: what it authenticated with."""
        org = user.org if org is None else org
        return cls(user.id, org.id, org.name, user.email, user.role, **how)

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN


@dataclass(frozen=True, slots=True)
class SealedOrigin:
    """The Visdom Trace session a token or web session came from, as stored: sealed.

    ``kind`` is the keyring's SEALED_TOKEN_ORIGIN or SEALED_SESSION_ORIGIN: which table
    ``row_id`` is in. ``user_id`` is the tvgate user the row acts as.
    """

    kind: str
    row_id: int
    org_id: int
    user_id: int
    checked_at: float
    ciphertext: str = field(repr=False)

    @classmethod
    def of(cls, kind: str, row: ProxyToken | WebSession, org_id: int) -> SealedOrigin | None:
        """What a token or web session row keeps of the sign-in it was made from; None
        when it was not made from a Visdom Trace sign-in."""
        if not row.visdom_session:
            return None
        checked_at = row.visdom_checked_at or 0.0
        return cls(kind, row.id, org_id, row.user_id, checked_at, row.visdom_session)


class IdentityError(Exception):
    """Who sent a request is refused or cannot be checked. ``status`` is the HTTP status
    that says which, as ``services.ServiceError``'s does; ``public`` is what the client is
    told (each surface answers it in its own format: ``tvgate.web.refusal_of``)."""

    status = 401
    #: What the client is told, ``{}`` standing for the message.
    told = "{}"

    @property
    def public(self) -> str:
        return self.told.format(self)


class AuthError(IdentityError):
    """The credential is unknown, expired or revoked (401)."""

    told = "invalid credential: {}"


class NoAccess(AuthError):
    """The credential is good, but the identity provider refuses the account access (403):
    Visdom Trace's ``/auth/me`` answering 403 to a person without the ``tracing`` role.
    The provider's own message is told; what is made from such a sign-in ends with it."""

    status = 403
    told = "{}"


class MissingCredential(AuthError):
    """The request carries no credential at all (401)."""

    told = "{}"


class IdentityUnavailable(IdentityError):
    """The identity provider could not be asked (503: an outage is not a revoked login)."""

    status = 503
    # Not the message: its cause (a JWKS fetch, the database) is the operator's to read in
    # the log.
    told = "identity check unavailable; try again shortly"


class OrgSelectionError(IdentityError):
    """The credential is good but the org of the request is not one of the caller's (403)."""

    status = 403


class NotLinked(OrgSelectionError):
    """The outside identity is good, but its org or user is not the tvgate one of that name
    or email (403): binding is by outside id only, and a clash is refused, never merged."""


def select_membership(
    memberships: Sequence[Membership], requested: str | None, pinned: str
) -> Membership:
    """The org a request acts in: the pinned org, the one asked for, or the only one."""
    names = sorted(m.org_name for m in memberships)
    wanted = pinned or requested
    if wanted:
        for membership in memberships:
            if membership.org_name == wanted:
                return membership
        if pinned:
            raise OrgSelectionError(f"this gateway serves org {pinned!r}, which you are not in")
        raise OrgSelectionError(
            f"you are not a member of org {wanted!r}; yours: {', '.join(names)}"
        )
    if len(memberships) == 1:
        return memberships[0]
    if not memberships:
        raise OrgSelectionError("you are not a member of any org")
    raise OrgSelectionError(
        f"you are a member of several orgs ({', '.join(names)}); "
        f"pick one with the {ORG_HEADER} header"
    )


def credential_from_headers(headers: HTTPHeaders) -> str | None:
    """The token the client sent, from ``x-api-key``, ``api-key`` (as the ``openai`` SDK's
    ``AzureOpenAI`` client sends it) or a Bearer ``Authorization``."""
    token = header(headers, "x-api-key") or header(headers, "api-key")
    if token:
        return token.strip()
    authorization = header(headers, "Authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None
