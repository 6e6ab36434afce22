"""Proxy tokens (issue, list, revoke) and where tokens and sessions came from: the sealed
Visdom Trace origin that ``tvgate.identity.origin`` re-checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tvgate.identity import (
    VIA_JWT,
    AuthError,
    IdentityUnavailable,
    OrgSelectionError,
    Principal,
    SealedOrigin,
)
from tvgate.identity.provision import Membership, OutsideIdentity, find_org, provision
from tvgate.identity.tokens import mint_token
from tvgate.keyring import (
    SEALED_SESSION_ORIGIN,
    SEALED_TOKEN_ORIGIN,
    KeyContext,
    Keyring,
    KeyringError,
    KeyringUnavailable,
)
from tvgate.models import (
    ROLE_ADMIN,
    Org,
    ProxyToken,
    User,
    WebSession,
    database,
)
from tvgate.rows import fields_of, from_row
from tvgate.services.access import (
    DEFAULT_ORG,
    Forbidden,
    ServiceError,
    _missing,
    _require_admin,
    audit,
    get_org,
    get_user,
)
from tvgate.services.accounts import add_user
from tvgate.services.events import announce


def issue_token(
    email: str,
    org_name: str | None = None,
    *,
    name: str = "",
    expires_days: float | None = None,
    actor: Principal | None = None,
    keyring: Keyring | None = None,
    visdom_session: str | None = None,
    jwt_max_age: float | None = None,
) -> tuple[str, ProxyToken]:
    """Mint a ``tvg_`` token for a user; the plaintext is returned once and never stored.

    A token is worth no more than what the actor proved (issue 16.4): it lasts no longer
    than the token the actor authenticated with, at most ``jwt_max_age`` seconds when the
    actor signed in with a JWT, and it keeps the Visdom Trace session behind the actor
    (``visdom_session``, or the one sealed in their token or web session), sealed by
    ``keyring``, so it ends when that session stops vouching (``tvgate.identity.origin``).
    """
    org = get_org(org_name)
    user = get_user(email, org)
    if actor is not None and actor.user_id != user.id:
        _require_admin(actor, org)
    if user.disabled:
        raise ServiceError(f"user {email!r} is disabled")
    if expires_days is not None and expires_days <= 0:
        raise ServiceError("expiry must be a positive number of days")
    expires_at = time.time() + expires_days * 86400 if expires_days else None
    origin: SealedOrigin | None = None
    if actor is not None:
        expires_at, origin = _inherited(actor, expires_at, jwt_max_age)
    if origin is not None:
        if keyring is None:
            raise ServiceError("a keyring is needed to keep where this token came from", 500)
        try:
            visdom_session = open_origin(origin, keyring)
        except AuthError as exc:
            raise Forbidden(str(exc)) from None
        except IdentityUnavailable as exc:
            raise ServiceError(str(exc), 503) from None
    if visdom_session and keyring is None:
        raise ServiceError("a keyring is needed to keep where this token came from", 500)
    token, token_hash, prefix = mint_token()
    with database.atomic():
        row = ProxyToken.create(
            user=user,
            name=name[:200],
            token_hash=token_hash,
            prefix=prefix,
            expires_at=expires_at,
        )
        if keyring is not None and visdom_session:
            row.visdom_session = seal_origin(
                visdom_session, keyring, SEALED_TOKEN_ORIGIN, org.id, row.id, user.id
            )
            # Inherited: when the actor's origin was last confirmed; fresh: never, so the
            # first use asks Visdom Trace (through its cache).
            row.visdom_checked_at = origin.checked_at if origin is not None else 0.0
            row.save()
    return token, row


def _inherited(
    actor: Principal, expires_at: float | None, jwt_max_age: float | None
) -> tuple[float | None, SealedOrigin | None]:
    """The latest expiry a token the actor mints may have, and the origin it inherits."""
    ends = [expires_at]
    if actor.via == VIA_JWT and jwt_max_age:
        ends.append(time.time() + jwt_max_age)
    origin = None
    if actor.token_id is not None:
        parent = ProxyToken.get_or_none(ProxyToken.id == actor.token_id)
        if parent is None or parent.revoked_at is not None:
            raise Forbidden("the token you signed in with is no longer valid")
        ends.append(parent.expires_at)
        origin = token_origin(parent, actor.org_id)
    if actor.session_id is not None:
        session = WebSession.get_or_none(WebSession.id == actor.session_id)
        if session is None:
            raise Forbidden("your session has ended; sign in again")
        origin = origin or session_origin(session, actor.org_id)
    known = [end for end in ends if end is not None]
    return (min(known) if known else None), origin


ORIGIN_CHECK = "tvgate (Visdom Trace re-check)"


def seal_origin(
    visdom_session: str, keyring: Keyring, kind: str, org_id: int, row_id: int, user_id: int
) -> str:
    """The ciphertext of a Visdom Trace session, bound to the row that keeps it."""
    return keyring.encrypt(visdom_session, KeyContext(org_id, row_id, user_id, kind=kind))


def token_origin(token: ProxyToken, org_id: int) -> SealedOrigin | None:
    return SealedOrigin.of(SEALED_TOKEN_ORIGIN, token, org_id)


def session_origin(session: WebSession, org_id: int) -> SealedOrigin | None:
    return SealedOrigin.of(SEALED_SESSION_ORIGIN, session, org_id)


def open_origin(origin: SealedOrigin, keyring: Keyring) -> str:
    """The Visdom Trace session a row keeps (runs in the pool; never stored or logged)."""
    context = KeyContext(origin.org_id, origin.row_id, origin.user_id, kind=origin.kind)
    try:
        return keyring.decrypt(origin.ciphertext, context)
    except KeyringError:
        # Tampered or copied from another row: it proves nothing, so it admits nobody.
        raise AuthError("where this credential came from cannot be read") from None
    except KeyringUnavailable:
        raise IdentityUnavailable("the keyring is unavailable") from None


def end_origin(origin: SealedOrigin, reason: str) -> str:
    """End a row whose Visdom Trace origin no longer holds; returns why, for the 401."""
    if origin.kind == SEALED_TOKEN_ORIGIN:
        ended = (
            ProxyToken.update(revoked_at=time.time())
            .where((ProxyToken.id == origin.row_id) & ProxyToken.revoked_at.is_null())
            .execute()
        )
        action, target = "revoke token", f"token {origin.row_id}"
    else:
        ended = WebSession.delete().where(WebSession.id == origin.row_id).execute()
        action, target = "end session", f"session of user {origin.user_id}"
    if ended:
        audit(None, origin.org_id, action, target, {"reason": reason}, by=ORIGIN_CHECK)
    return reason


def settle_origin(origin: SealedOrigin, identity: OutsideIdentity, seen_at: float) -> str:
    """Hold a row to what Visdom Trace says of its origin now: record the confirmation, or
    end the row and say why (runs in the pool). The person's role is refreshed, so a
    token they minted for themselves acts with the role they have now."""
    # The membership that stands for the row's org, matched as a sign-in matches it.
    membership = next((m for m in identity.memberships if _stands_for(m, origin.org_id)), None)
    if membership is None:
        return end_origin(origin, "its Visdom Trace user is no longer in this org")
    try:
        # The bound membership is chosen by its tvgate org's name (provision names each
        # membership after the org bound to it).
        minter = provision(identity, Org.get_by_id(origin.org_id).name, "")
    except (AuthError, OrgSelectionError) as exc:
        return end_origin(origin, str(exc))
    if minter.user_id != origin.user_id and minter.role != ROLE_ADMIN:
        return end_origin(origin, "it was minted by an admin who no longer is one")
    model = ProxyToken if origin.kind == SEALED_TOKEN_ORIGIN else WebSession
    model.update(visdom_checked_at=seen_at).where(model.id == origin.row_id).execute()
    return ""


def _stands_for(membership: Membership, org_id: int) -> bool:
    org = find_org(membership)
    return org is not None and org.id == org_id


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
        return from_row(cls, token, user=token.user.email)

    def as_dict(self) -> dict[str, Any]:
        return fields_of(self)


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
        owner = token.user.org_id if token is not None else None
        raise _missing(actor, "revoke token", str(token_id), f"no token {token_id}", owner)
    if actor is not None and token.user_id != actor.user_id:
        _require_admin(actor, token.user.org, "revoke token", str(token_id))
    if token.revoked_at is None:
        token.revoked_at = time.time()
        token.save()
        announce(token.user.org_id, identities=True)
    return TokenView.of(token)


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
