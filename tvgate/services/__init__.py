"""Every operation on orgs, users, tokens, keys and routes, with the rules that govern it.

The CLI, the JSON API and the admin UI all call these functions, so they
cannot disagree. Functions are synchronous (Peewee); web callers run them in
the database pool. ``actor`` is the principal asking, or None for an operator
at the command line with direct access to the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import orjson
import peewee

from tvgate.governance.windows import (
    budget_counter,
    minute_counters,
)
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
    Rewrapper,
    backend_of,
    fingerprint,
)
from tvgate.models import (
    BUDGET_SCOPES,
    GOVERN_KEY,
    GOVERN_ORG,
    GOVERN_ROUTE,
    GOVERN_USER,
    LIMIT_SCOPES,
    METRIC_TOKENS,
    METRIC_USD,
    PERIOD_DAY,
    PERIOD_MONTH,
    PROVIDERS,
    ROLE_ADMIN,
    ROLE_AUDITOR,
    ROLE_MEMBER,
    ROLES,
    SCOPE_ORG,
    SCOPE_OWNED,
    SCOPE_USER,
    AuditEvent,
    Budget,
    KeyGrant,
    ModelPrice,
    Org,
    ProviderKey,
    ProxyToken,
    RateLimit,
    Route,
    Trace,
    UsageCounter,
    User,
    WebSession,
    database,
)
from tvgate.providers import DEFAULT_BASE_URLS
from tvgate.proxy.upstream import is_public_address
from tvgate.traces.redact import MAX_PATTERNS, Redactor, invalid_patterns

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


# --- audit ---

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
    return OrgView.of(org)


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


# --- passwords (local users only; Visdom Trace users never give tvgate a password to keep) ---

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1


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


# --- proxy tokens ---


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


# --- where tokens and sessions came from (tvgate.identity.origin) ---

ORIGIN_CHECK = "tvgate (Visdom Trace re-check)"


def seal_origin(
    visdom_session: str, keyring: Keyring, kind: str, org_id: int, row_id: int, user_id: int
) -> str:
    """The ciphertext of a Visdom Trace session, bound to the row that keeps it."""
    return keyring.encrypt(visdom_session, KeyContext(org_id, row_id, user_id, kind=kind))


def token_origin(token: ProxyToken, org_id: int) -> SealedOrigin | None:
    if not token.visdom_session:
        return None
    return SealedOrigin(
        SEALED_TOKEN_ORIGIN,
        token.id,
        org_id,
        token.user_id,
        token.visdom_checked_at or 0.0,
        token.visdom_session,
    )


def session_origin(session: WebSession, org_id: int) -> SealedOrigin | None:
    if not session.visdom_session:
        return None
    return SealedOrigin(
        SEALED_SESSION_ORIGIN,
        session.id,
        org_id,
        session.user_id,
        session.visdom_checked_at or 0.0,
        session.visdom_session,
    )


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
        error = NotFound(f"no token {token_id}")
        if actor is None:
            raise error
        owner = token.user.org_id if token is not None else None
        raise _deny(actor, "revoke token", str(token_id), error, owner_org_id=owner)
    if actor is not None and token.user_id != actor.user_id:
        _require_admin(actor, token.user.org, "revoke token", str(token_id))
    if token.revoked_at is None:
        token.revoked_at = time.time()
        token.save()
    return TokenView.of(token)


# --- provider keys ---


def check_base_url(
    url: str, *, allow_private: bool, switch: str = "TVGATE_ALLOW_PRIVATE_UPSTREAMS"
) -> str:
    """A provider base URL tvgate may call: http(s), and https to a public host unless
    ``allow_private`` (the setting named ``switch``, as the operator sets it) is on."""
    try:
        parsed = urlparse(url)
    except ValueError:  # a malformed bracketed host, say
        raise ServiceError("base URL is not a valid URL") from None
    # Credentials first: the other refusals quote the URL, and refusals are audited.
    if parsed.username or parsed.password or "@" in parsed.path.split("/", 1)[0]:
        raise ServiceError("base URL must not carry credentials")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ServiceError(f"base URL {url!r} must be an http(s) URL")
    _check_no_query_or_fragment(url)
    if not allow_private:
        _check_public_upstream(parsed.scheme, parsed.hostname, switch)
    return url.rstrip("/")


def _check_no_query_or_fragment(url: str) -> None:
    # The proxy appends the endpoint's path to the base URL: after a "?" or a "#" that path
    # is a query or a fragment, and the base URL alone picks any path on the host.
    if "?" in url or "#" in url:
        raise ServiceError("base URL must not have a query or fragment ('?' or '#')")


def _check_public_upstream(scheme: str, hostname: str, switch: str) -> None:
    if scheme != "https":
        raise ServiceError(f"base URL must be https ({switch} is off)")
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        # A name: it is checked after DNS, on every connection (tvgate/proxy/upstream.py).
        private = hostname == "localhost"
    else:
        private = not is_public_address(hostname)
    if private:
        raise ServiceError(f"base URL points at a private address ({switch} is off)")


#: Host names under which a gateway listening on a loopback or unspecified address (a
#: 0.0.0.0 bind answers on every local address) reaches itself.
_LOCAL_HOST_NAMES = frozenset({"localhost", "localhost.", "localhost.localdomain"})


def check_not_this_gateway(url: str, gateway_urls: Collection[str]) -> None:
    """Refuse a base URL that is this gateway itself (its listen address under any local
    name, or its public URL): a route there would call the gateway in a loop. Other
    names for it (DNS aliases, another VM) are caught per request by the loop mark."""
    host, port = _host_and_port(url)
    for own_url in gateway_urls:
        own_host, own_port = _host_and_port(own_url)
        if port == own_port and (host == own_host or (_is_local(host) and _is_local(own_host))):
            raise ServiceError(
                f"base URL {url!r} is this gateway itself: a route there would call tvgate "
                "in a loop"
            )


def _host_and_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        raise ServiceError(f"base URL {url!r} has a bad port") from None
    return (parsed.hostname or "").lower(), port or (443 if parsed.scheme == "https" else 80)


def _is_local(host: str) -> bool:
    """A loopback or unspecified address, or a name that always means this machine."""
    if host in _LOCAL_HOST_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


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
            max_concurrent=key.max_concurrent,
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
            "max_concurrent": self.max_concurrent,
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
    allow_private_user: bool = False,
    owner_email: str | None = None,
    available_to_all: bool = True,
    max_concurrent: int = 0,
    gateway_urls: Collection[str] = (),
    actor: Principal | None = None,
) -> KeyView:
    """Store a provider key encrypted; only ciphertext and fingerprint reach the database.

    An admin adds org keys; a user adds a private key of their own when the org allows it.
    ``max_concurrent`` caps the calls open on the key at once, across every gateway
    process (0: no cap). ``allow_private`` lets an org key, ``allow_private_user`` a
    user's own key, reach http and private upstreams (the two settings of that name).
    ``gateway_urls``: where this gateway answers (``Settings``), refused as base URLs.
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
    secret = _check_secret(secret)
    _check_name(name, "a key")
    max_concurrent = _check_max_concurrent(max_concurrent)
    url = _key_base_url(
        base_url or DEFAULT_BASE_URLS[provider],
        own=owner is not None,
        allow_private=allow_private,
        allow_private_user=allow_private_user,
        gateway_urls=gateway_urls,
        refused=lambda error: _refuse_base_url(actor, org.id, "add key", name, error),
    )
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
            owner=owner,
            available_to_all=available_to_all if owner is None else False,
            created_by=actor.user_id if actor else None,
            max_concurrent=max_concurrent,
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
            },
        )
    return KeyView.of(key)


def _key_base_url(
    url: str,
    *,
    own: bool,
    allow_private: bool,
    allow_private_user: bool,
    gateway_urls: Collection[str],
    refused: Callable[[ServiceError], ServiceError],
) -> str:
    """The base URL a key may call (the same checks for a new key and a changed one): http(s)
    without credentials, query or fragment; public https unless the setting of the key's
    kind allows private upstreams (``own``: a user's own key); never this gateway. A
    refusal goes through ``refused``, which audits it and returns the error to raise."""
    try:
        checked = check_base_url(
            url,
            allow_private=allow_private_user if own else allow_private,
            switch="TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS"
            if own
            else "TVGATE_ALLOW_PRIVATE_UPSTREAMS",
        )
        check_not_this_gateway(checked, gateway_urls)
    except ServiceError as error:
        raise refused(error) from None
    return checked


def _refuse_base_url(
    actor: Principal | None, org_id: int, action: str, target: str, error: ServiceError
) -> ServiceError:
    """Audit a refused base URL (where a key's secret would have been sent) in the org."""
    if actor is not None:
        return _deny(actor, action, target, error)
    audit(None, org_id, action, target, {"refused": str(error)}, allowed=False)
    return error


def _own_user(actor: Principal, email: str | None, action: str, target: str) -> User:
    """The actor's own user row; naming someone else is refused, and auditors change nothing."""
    if actor.role == ROLE_AUDITOR:
        raise _deny(actor, action, target, Forbidden("auditors read; they change nothing"))
    if email is not None and email.strip().lower() != actor.email:
        raise _deny(actor, action, target, Forbidden("users may only act for themselves"))
    return User.get_by_id(actor.user_id)


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 200 or any(c.isspace() or ord(c) < 32 for c in name):
        raise ServiceError(f"{what} needs a name of 1 to 200 characters without spaces")


def get_key(name: str, org: Org) -> ProviderKey:
    key = ProviderKey.get_or_none((ProviderKey.org == org) & (ProviderKey.name == name))
    if key is None:
        raise NotFound(f"no key named {name!r} in org {org.name!r}")
    return key


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
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "revoke key" if revoke else "grant key", name)
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
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "update key", name)
    key = get_key(name, org)
    if key.owner_id is not None:
        raise ServiceError("a user's own key is only ever available to its owner")
    if key.available_to_all != available_to_all:
        key.available_to_all = available_to_all
        key.updated_at = time.time()
        key.save()
        audit(actor, org.id, "update key", name, {"available_to_all": available_to_all})
    return KeyView.of(key)


#: The highest concurrency cap a key may have (0 means no cap at all).
MAX_CONCURRENT_LIMIT = 100_000


def _check_max_concurrent(value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_CONCURRENT_LIMIT
    ):
        raise ServiceError(
            f"max_concurrent must be a whole number from 0 (no cap) to {MAX_CONCURRENT_LIMIT}"
        )
    return value


def update_key(
    name: str,
    *,
    available_to_all: bool | None = None,
    max_concurrent: int | None = None,
    base_url: str | None = None,
    allow_private: bool = False,
    allow_private_user: bool = False,
    gateway_urls: Collection[str] = (),
    org_name: str | None = None,
    actor: Principal | None = None,
) -> KeyView:
    """Change who may use an org key, the cap on calls open on a key at once, across
    every gateway process (0: no cap), and where the key's calls go. An org key is an
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
        url = _key_base_url(
            base_url,
            own=key.owner_id is not None,
            allow_private=allow_private,
            allow_private_user=allow_private_user,
            gateway_urls=gateway_urls,
            refused=lambda error: _refuse_base_url(actor, key.org_id, "update key", name, error),
        )
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
        max_concurrent = _check_max_concurrent(max_concurrent)
        if key.max_concurrent != max_concurrent:
            changes["max_concurrent"] = max_concurrent
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
            # The route snapshot carries the base URL: this process calls the new one at once.
            _key_changed(key)
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
    audit(actor, key.org_id, "rotate key", key.name, {"fingerprint": key.fingerprint})
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
        audit(actor, key.org_id, "disable key" if disabled else "enable key", key.name)
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


#: A route's state in force (RouteView.state).
ROUTE_ENABLED = "enabled"
ROUTE_DISABLED = "disabled"
ROUTE_KEY_DISABLED = "key disabled"
ROUTE_DISABLED_BY_ORG = "disabled by org policy"


@dataclass(frozen=True, slots=True)
class RouteView:
    id: int
    name: str
    upstream_model: str
    key: str
    provider: str
    scope: str
    user: str | None
    #: The route's own switch; ``state`` is what is in force.
    enabled: bool
    description: str
    fallbacks: tuple[str, ...] = ()
    state: str = ROUTE_ENABLED

    @classmethod
    def of(cls, route: Route, org: Org) -> RouteView:
        return cls(
            id=route.id,
            name=route.name,
            upstream_model=route.upstream_model,
            key=route.key.name,
            provider=route.key.provider,
            scope=route.scope,
            user=route.user.email if route.user is not None else None,
            enabled=route.enabled,
            description=route.description,
            fallbacks=route_fallbacks(route),
            state=route_state(route, org),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "upstream_model": self.upstream_model,
            "key": self.key,
            "provider": self.provider,
            "scope": self.scope,
            "user": self.user,
            "enabled": self.enabled,
            "state": self.state,
            "description": self.description,
            "fallbacks": list(self.fallbacks),
        }


def route_state(route: Route, org: Org) -> str:
    """Whether the proxy uses the route now, by the same rules as RouteEntry.visible_to:
    a user's own route, or a route on a user's own key, is off while the org's switch
    for them is off, whatever the route's own switch says."""
    if not route.enabled:
        return ROUTE_DISABLED
    if route.key.disabled:
        return ROUTE_KEY_DISABLED
    if (route.scope == SCOPE_OWNED and not org.allow_user_routes) or (
        route.key.owner_id is not None and not org.allow_user_keys
    ):
        return ROUTE_DISABLED_BY_ORG
    return ROUTE_ENABLED


def route_fallbacks(route: Route) -> tuple[str, ...]:
    """A route's fallbacks as stored (a JSON list of route names); nothing if unreadable."""
    try:
        names = orjson.loads(route.fallbacks or "[]")
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(names, list):
        return ()
    return tuple(n for n in names if isinstance(n, str))


#: How many fallbacks a route may have: each is a whole extra upstream call when tried.
MAX_FALLBACKS = 5


def _check_fallbacks(
    fallbacks: Any, org: Org, name: str, scope: str, user: User | None
) -> list[str]:
    """Route names tried in order when this route's provider fails: each names a route of
    the org (for a user's own route, one that user can see), never the route itself, at
    most MAX_FALLBACKS, no name twice."""
    if not isinstance(fallbacks, list | tuple) or not all(isinstance(f, str) for f in fallbacks):
        raise ServiceError("fallbacks must be a list of route names")
    names = [f.strip() for f in fallbacks]
    if len(names) > MAX_FALLBACKS:
        raise ServiceError(f"a route may have at most {MAX_FALLBACKS} fallbacks")
    if len(set(names)) != len(names):
        raise ServiceError("fallbacks must not name a route twice")
    if name in names:
        raise ServiceError(f"route {name!r} cannot be its own fallback")
    if not names:
        return names
    query = Route.select(Route.name).where((Route.org == org) & Route.name.in_(names))
    if scope == SCOPE_OWNED:
        # A member's own route may only fall back to names that member can see.
        query = query.where((Route.scope == SCOPE_ORG) | (Route.user == user))
    known = {r.name for r in query}
    missing = [n for n in names if n not in known]
    if missing:
        raise ServiceError(f"no route named {', '.join(map(repr, missing))} to fall back to")
    return names


def _usable_key(key: ProviderKey, user: User) -> bool:
    """May this user's route point at this key? (Checked again at every resolution.)"""
    if key.owner_id is not None:
        return key.owner_id == user.id
    if key.available_to_all:
        return True
    return KeyGrant.select().where((KeyGrant.key == key) & (KeyGrant.user == user)).exists()


def add_route(
    name: str,
    key_name: str,
    *,
    model: str = "",
    org_name: str | None = None,
    description: str = "",
    for_user: str | None = None,
    owner: str | None = None,
    enabled: bool = True,
    fallbacks: list[str] | None = None,
    actor: Principal | None = None,
) -> RouteView:
    """A route: org-wide, made by an admin for one user (``for_user``), or a user's own
    (``owner``). ``fallbacks`` are route names tried in order when its provider fails."""
    org = _actor_org(actor, org_name)
    if for_user is not None and owner is not None:
        raise ServiceError("a route is for one user or owned by one user, not both")
    _check_name(name, "a route")
    if len(model) > 200 or len(description) > 2000:
        raise ServiceError("model is at most 200 characters, description at most 2000")
    user: User | None = None
    if owner is not None or (actor is not None and actor.role != ROLE_ADMIN):
        scope = SCOPE_OWNED
        user = (
            _own_user(actor, owner, "add route", name)
            if actor is not None
            else get_user(owner or "", org)
        )
        if not org.allow_user_routes:
            error = Forbidden("this org does not allow users to create their own routes")
            raise _deny(actor, "add route", name, error) if actor is not None else error
    elif for_user is not None:
        _require_admin(actor, org, "add route", name)
        scope, user = SCOPE_USER, get_user(for_user, org)
    else:
        _require_admin(actor, org, "add route", name)
        scope = SCOPE_ORG
    key = get_key(key_name, org)
    if scope == SCOPE_OWNED:
        assert user is not None
        if not _usable_key(key, user):
            error2 = NotFound(f"no key named {key_name!r} you may use")
            raise _deny(actor, "add route", name, error2) if actor is not None else error2
    elif key.owner_id is not None:
        raise ServiceError("an admin's route needs an org key, not a user's own key")
    fallback_names = _check_fallbacks(fallbacks or [], org, name, scope, user)
    with database.atomic():
        if (
            Route.select()
            .where(
                (Route.org == org)
                & (Route.name == name)
                & (Route.scope == scope)
                & (Route.user == user)
                if user is not None
                else (Route.org == org) & (Route.name == name) & (Route.scope == scope)
            )
            .exists()
        ):
            raise ServiceError(f"there is already a {scope} route named {name!r}", 409)
        route = Route.create(
            org=org,
            name=name,
            upstream_model=model,
            key=key,
            scope=scope,
            user=user,
            enabled=enabled,
            description=description,
            fallbacks=orjson.dumps(fallback_names).decode(),
        )
        audit(
            actor,
            org.id,
            "add route",
            name,
            {
                "scope": scope,
                "user": user.email if user else None,
                "key": key.name,
                "model": model,
                "fallbacks": fallback_names,
            },
        )
    return RouteView.of(route, org)


def _routes_query(org: Org) -> peewee.ModelSelect[Route]:
    return (
        Route.select(Route, ProviderKey)
        .join(ProviderKey)
        .switch(Route)
        .where(Route.org == org)
        .order_by(Route.name, Route.scope, Route.id)
    )


def list_routes(org_name: str | None = None, *, actor: Principal | None = None) -> list[RouteView]:
    """Admins and auditors: every route of the org. Members: org routes and their own."""
    org = _actor_org(actor, org_name)
    query = _routes_query(org)
    if actor is not None and actor.role == ROLE_MEMBER:
        query = query.where((Route.scope == SCOPE_ORG) | (Route.user == actor.user_id))
    return [RouteView.of(r, org) for r in query]


def _editable_route(route_id: int, actor: Principal | None, action: str) -> Route:
    route = Route.get_or_none(Route.id == route_id)
    if route is None or (actor is not None and route.org_id != actor.org_id):
        error = NotFound(f"no route {route_id}")
        if actor is None:
            raise error
        owner = route.org_id if route is not None else None
        raise _deny(actor, action, str(route_id), error, owner_org_id=owner)
    if actor is None or actor.role == ROLE_ADMIN:
        return route
    if route.scope == SCOPE_OWNED and route.user_id == actor.user_id:
        return route
    if route.scope == SCOPE_ORG:
        raise _deny(actor, action, route.name, Forbidden("only an admin may change an org route"))
    raise _deny(actor, action, str(route_id), NotFound(f"no route {route_id}"))


def update_route(
    route_id: int, changes: dict[str, Any], *, actor: Principal | None = None
) -> RouteView:
    """Change a route's name, model, key, enabled flag, description or fallbacks."""
    allowed = {"name", "upstream_model", "key", "enabled", "description", "fallbacks"}
    unknown = set(changes) - allowed
    if unknown:
        raise ServiceError(f"cannot change {', '.join(sorted(unknown))}")
    route = _editable_route(route_id, actor, "update route")
    org = route.org
    before = RouteView.of(route, org).as_dict()
    if "name" in changes:
        name = changes["name"]
        if not isinstance(name, str):
            raise ServiceError("name must be a string")
        _check_name(name, "a route")
        route.name = name
    if "upstream_model" in changes:
        if not isinstance(changes["upstream_model"], str) or len(changes["upstream_model"]) > 200:
            raise ServiceError("upstream_model must be a string of at most 200 characters")
        route.upstream_model = changes["upstream_model"]
    if "description" in changes:
        if not isinstance(changes["description"], str) or len(changes["description"]) > 2000:
            raise ServiceError("description must be a string of at most 2000 characters")
        route.description = changes["description"]
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ServiceError("enabled must be true or false")
        route.enabled = changes["enabled"]
    if "key" in changes:
        if not isinstance(changes["key"], str):
            raise ServiceError("key must be a key name")
        key = get_key(changes["key"], route.org)
        if route.scope == SCOPE_OWNED:
            if route.user is None or not _usable_key(key, route.user):
                raise NotFound(f"no key named {changes['key']!r} you may use")
        elif key.owner_id is not None:
            raise ServiceError("an admin's route needs an org key, not a user's own key")
        route.key = key
    if "fallbacks" in changes or ("name" in changes and route.name in route_fallbacks(route)):
        route.fallbacks = orjson.dumps(
            _check_fallbacks(
                changes.get("fallbacks", list(route_fallbacks(route))),
                route.org,
                route.name,
                route.scope,
                route.user,
            )
        ).decode()
    route.updated_at = time.time()
    try:
        with database.atomic():
            route.save()
            after = RouteView.of(route, org).as_dict()
            audit(
                actor,
                route.org_id,
                "update route",
                route.name,
                {k: [before[k], after[k]] for k in after if before[k] != after[k]},
            )
    except peewee.IntegrityError:
        raise ServiceError(
            f"there is already a route named {route.name!r} in this scope", 409
        ) from None
    return RouteView.of(route, org)


def delete_route(route_id: int, *, actor: Principal | None = None) -> None:
    route = _editable_route(route_id, actor, "delete route")
    with database.atomic():
        route.delete_instance()
        audit(actor, route.org_id, "delete route", route.name, {"scope": route.scope})
        _drop_rules_of(actor, route.org_id, GOVERN_ROUTE, route.name)


def _drop_rules_of(actor: Principal | None, org_id: int, scope: str, name: str) -> None:
    """Budgets and limits of a route name or key that no longer exists go with it (a route
    rule stays while another route of the org still has that name)."""
    if scope == GOVERN_ROUTE and (
        Route.select().where((Route.org == org_id) & (Route.name == name)).exists()
    ):
        return
    budgets = (
        Budget.delete()
        .where((Budget.org == org_id) & (Budget.scope == scope) & (Budget.subject == name))
        .execute()
    )
    limits = (
        RateLimit.delete()
        .where((RateLimit.org == org_id) & (RateLimit.scope == scope) & (RateLimit.subject == name))
        .execute()
    )
    if budgets or limits:
        audit(actor, org_id, f"delete {scope} rules", name, {"budgets": budgets, "limits": limits})


@dataclass(frozen=True, slots=True)
class Resolution:
    """Who gets what: the route a user's request for ``name`` would take, or why none."""

    name: str
    user: str
    route: RouteView | None
    upstream_model: str
    reason: str
    available: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "user": self.user,
            "route": self.route.as_dict() if self.route else None,
            "upstream_model": self.upstream_model,
            "reason": self.reason,
            "available": self.available,
        }


def resolve_route(
    name: str, email: str, org_name: str | None = None, *, actor: Principal | None = None
) -> Resolution:
    """The route ``email`` would get for ``name``, by the same code the proxy uses."""
    from tvgate.routing import load_snapshot

    org = _actor_org(actor, org_name)
    user = get_user(email, org)
    if actor is not None and actor.user_id != user.id:
        _require_reader(actor, org)
    principal = Principal(user.id, org.id, org.name, user.email, user.role)
    snapshot = load_snapshot(org.id)
    available = [r.name for r in snapshot.available(principal)]
    if user.disabled:
        return Resolution(name, user.email, None, "", "the user is disabled", available)
    entry = snapshot.resolve(principal, name)
    if entry is None:
        return Resolution(
            name, user.email, None, "", "no route of that name is usable by the user", available
        )
    route = Route.select(Route, ProviderKey).join(ProviderKey).where(Route.id == entry.id).get()
    return Resolution(
        name, user.email, RouteView.of(route, org), entry.upstream_model_for(name), "", available
    )


# --- users and org policy ---


@dataclass(frozen=True, slots=True)
class UserView:
    id: int
    email: str
    name: str
    role: str
    disabled: bool
    local: bool
    created_at: float

    @classmethod
    def of(cls, user: User) -> UserView:
        return cls(
            user.id,
            user.email,
            user.name,
            user.role,
            user.disabled,
            user.password_hash is not None,
            user.created_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "role": self.role,
            "disabled": self.disabled,
            "local": self.local,
            "created_at": self.created_at,
        }


def list_users(org_name: str | None = None, *, actor: Principal | None = None) -> list[UserView]:
    org = _actor_org(actor, org_name)
    _require_reader(actor, org)
    return [UserView.of(u) for u in User.select().where(User.org == org).order_by(User.email)]


def update_user(
    email: str,
    *,
    role: str | None = None,
    disabled: bool | None = None,
    org_name: str | None = None,
    actor: Principal | None = None,
) -> UserView:
    """Change a user's role or disable them; the org always keeps one enabled admin."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "update user", email)
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
        audit(
            actor,
            org.id,
            "update user",
            user.email,
            {k: [before[k], after[k]] for k in after if before[k] != after[k]},
        )
    return UserView.of(user)


@dataclass(frozen=True, slots=True)
class Policy:
    org: str
    allow_user_keys: bool
    allow_user_routes: bool
    capture_bodies: bool
    retention_days: int
    redaction_patterns: tuple[str, ...]
    #: Stored patterns the trace writer skips, each with why: saved by a tvgate that
    #: ran patterns on Python's ``re``, RE2 cannot run them (or they exceed its limits).
    invalid_redaction_patterns: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, org: Org) -> Policy:
        patterns = tuple(orjson.loads(org.redaction_patterns))
        return cls(
            org.name,
            org.allow_user_keys,
            org.allow_user_routes,
            org.capture_bodies,
            org.retention_days,
            patterns,
            tuple(invalid_patterns(patterns)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "allow_user_keys": self.allow_user_keys,
            "allow_user_routes": self.allow_user_routes,
            "capture_bodies": self.capture_bodies,
            "retention_days": self.retention_days,
            "redaction_patterns": list(self.redaction_patterns),
            "invalid_redaction_patterns": [
                {"pattern": pattern, "reason": reason}
                for pattern, reason in self.invalid_redaction_patterns
            ],
        }


def get_policy(org_name: str | None = None, *, actor: Principal | None = None) -> Policy:
    return Policy.of(_actor_org(actor, org_name))


def set_policy(
    org_name: str | None = None,
    *,
    allow_user_keys: bool | None = None,
    allow_user_routes: bool | None = None,
    capture_bodies: bool | None = None,
    retention_days: int | None = None,
    redaction_patterns: list[str] | None = None,
    actor: Principal | None = None,
) -> Policy:
    """Org switches. Turning one off disables what users made under it (resolution skips it)
    without deleting it; turning it on again restores it."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "set policy", org.name)
    before = Policy.of(org).as_dict()
    if allow_user_keys is not None:
        org.allow_user_keys = allow_user_keys
    if allow_user_routes is not None:
        org.allow_user_routes = allow_user_routes
    if capture_bodies is not None:
        org.capture_bodies = capture_bodies
    if retention_days is not None:
        if isinstance(retention_days, bool) or not 0 <= retention_days <= 36500:
            raise ServiceError("retention_days must be 0 (keep for ever) to 36500")
        org.retention_days = retention_days
    if redaction_patterns is not None:
        _check_redaction_patterns(actor, org, redaction_patterns)
        org.redaction_patterns = orjson.dumps(redaction_patterns).decode()
    with database.atomic():
        org.save()
        after = Policy.of(org).as_dict()
        audit(
            actor,
            org.id,
            "set policy",
            org.name,
            {k: [before[k], after[k]] for k in after if before[k] != after[k]},
        )
    return Policy.of(org)


def _check_redaction_patterns(actor: Principal | None, org: Org, patterns: list[str]) -> None:
    """Refuse (and audit) patterns the trace writer could not run in linear time: the
    Redactor compiles them with RE2, which names what it cannot run."""
    if len(patterns) > MAX_PATTERNS or not all(isinstance(p, str) for p in patterns):
        raise ServiceError(
            f"redaction_patterns must be a list of at most {MAX_PATTERNS} regular expressions"
        )
    try:
        Redactor(patterns=patterns)
    except ValueError as exc:
        audit(actor, org.id, "set policy", org.name, {"refused": str(exc)}, allowed=False)
        raise ServiceError(str(exc)) from None


def list_audit(
    org_name: str | None = None,
    *,
    before_id: int | None = None,
    limit: int = 100,
    actor: Principal | None = None,
) -> list[dict[str, Any]]:
    """Audit events, newest first, a page at a time (``before_id`` is the cursor)."""
    org = _actor_org(actor, org_name)
    _require_reader(actor, org)
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


# --- governance: budgets and rate limits ---

#: The metrics a budget counts and the periods it counts over (UTC days and months).
BUDGET_METRICS = (METRIC_TOKENS, METRIC_USD)
BUDGET_PERIODS = (PERIOD_DAY, PERIOD_MONTH)
#: The largest budget amount and per-minute limit accepted: far above any real one, and
#: small enough that a typo of many zeros is caught.
MAX_BUDGET_AMOUNT = 1e15
MAX_PER_MINUTE = 2**31 - 1


def _subject_row(org: Org, scope: str, subject: str | None) -> tuple[str, str]:
    """(stored subject, subject as shown) for a budget or a limit, checked to exist:
    "" for the org, the user's id for a user (shown as the email), a route's or key's name."""
    if scope == GOVERN_ORG:
        return "", ""
    if not subject or not subject.strip():
        what = {GOVERN_USER: "a user's email", GOVERN_ROUTE: "a route name"}.get(
            scope, "a key name"
        )
        raise ServiceError(f"a {scope} budget or limit needs {what}")
    subject = subject.strip()
    if scope == GOVERN_USER:
        user = get_user(subject, org)
        return str(user.id), user.email
    if scope == GOVERN_ROUTE:
        if not Route.select().where((Route.org == org) & (Route.name == subject)).exists():
            raise NotFound(f"no route named {subject!r} in org {org.name!r}")
        return subject, subject
    get_key(subject, org)
    return subject, subject


def _shown_subjects(org_id: int, rows: list[Any]) -> dict[str, str]:
    """Emails of the users that user-scoped rows name, by stored subject (the user id)."""
    ids = [int(r.subject) for r in rows if r.scope == GOVERN_USER and r.subject.isdigit()]
    if not ids:
        return {}
    users = User.select(User.id, User.email).where((User.org == org_id) & User.id.in_(ids))
    return {str(u.id): u.email for u in users}


def _shown(row: Budget | RateLimit, emails: dict[str, str]) -> str:
    if row.scope == GOVERN_USER:
        return emails.get(row.subject, f"(deleted user {row.subject})")
    return str(row.subject)


def _counters(keys: list[str]) -> dict[str, float]:
    """The shared counters of these names (a counter not yet written is 0)."""
    if not keys:
        return {}
    found = {c.key: c.value for c in UsageCounter.select().where(UsageCounter.key.in_(keys))}
    return {k: float(found.get(k, 0.0)) for k in keys}


@dataclass(frozen=True, slots=True)
class BudgetView:
    """A budget and what has been counted against it in the current window. ``used`` is
    what every gateway process has flushed so far (they flush about every second)."""

    id: int
    scope: str
    subject: str
    metric: str
    period: str
    amount: float
    warn_percent: float
    used: float
    resets_at: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.amount - self.used)

    @property
    def percent(self) -> float:
        """Used, in percent of the amount (100 when a budget of 0 has been touched)."""
        if self.amount > 0:
            return round(100.0 * self.used / self.amount, 1)
        return 100.0 if self.used > 0 else 0.0

    @property
    def state(self) -> str:
        """ok, warn (at or past warn_percent) or exceeded (nothing left)."""
        if self.used >= self.amount and (self.used > 0 or self.amount == 0):
            return "exceeded"
        return "warn" if self.percent >= self.warn_percent else "ok"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "subject": self.subject,
            "metric": self.metric,
            "period": self.period,
            "amount": self.amount,
            "warn_percent": self.warn_percent,
            "used": self.used,
            "remaining": self.remaining,
            "percent": self.percent,
            "state": self.state,
            "resets_at": self.resets_at,
        }


def _budget_views(org_id: int, rows: list[Budget], now: float | None = None) -> list[BudgetView]:
    at = time.time() if now is None else now
    counters = [budget_counter(org_id, b.scope, b.subject, b.metric, b.period, at) for b in rows]
    used = _counters([key for key, _counts, _end in counters])
    emails = _shown_subjects(org_id, rows)
    return [
        BudgetView(
            id=b.id,
            scope=b.scope,
            subject=_shown(b, emails),
            metric=b.metric,
            period=b.period,
            amount=b.amount,
            warn_percent=b.warn_percent,
            used=used[key],
            resets_at=end,
        )
        for b, (key, _counts, end) in zip(rows, counters, strict=True)
    ]


def _budget_order(query: peewee.ModelSelect[Budget]) -> list[Budget]:
    scope_rank = peewee.Case(
        Budget.scope, [(s, i) for i, s in enumerate(BUDGET_SCOPES)], len(BUDGET_SCOPES)
    )
    return list(query.order_by(scope_rank, Budget.subject, Budget.metric, Budget.period))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ServiceError(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ServiceError(f"{what} must be a finite number") from None
    if not math.isfinite(number):
        raise ServiceError(f"{what} must be a finite number")
    return number


def set_budget(
    org_name: str | None = None,
    *,
    scope: str,
    subject: str | None = None,
    metric: str,
    period: str,
    amount: float,
    warn_percent: float = 80.0,
    actor: Principal | None = None,
) -> BudgetView:
    """Set (create or replace) the budget of one subject for one metric and period: the
    org, a user (by email), a route or a key (by name). Tokens count input, output and
    cache tokens; usd the cost from the price table. Admins only."""
    org = _actor_org(actor, org_name)
    target = f"{scope} {subject or ''} {metric}/{period}".replace("  ", " ")
    _require_admin(actor, org, "set budget", target)
    if scope not in BUDGET_SCOPES:
        raise ServiceError(f"scope must be one of {', '.join(BUDGET_SCOPES)}")
    if metric not in BUDGET_METRICS:
        raise ServiceError(f"metric must be one of {', '.join(BUDGET_METRICS)}")
    if period not in BUDGET_PERIODS:
        raise ServiceError(f"period must be one of {', '.join(BUDGET_PERIODS)}")
    amount = _number(amount, "amount")
    if not 0 <= amount <= MAX_BUDGET_AMOUNT:
        raise ServiceError(f"amount must be from 0 to {MAX_BUDGET_AMOUNT:,.0f}")
    warn_percent = _number(warn_percent, "warn_percent")
    if not 0 <= warn_percent <= 100:
        raise ServiceError("warn_percent must be from 0 to 100")
    stored, shown = _subject_row(org, scope, subject)
    target = f"{scope} {shown} {metric}/{period}" if shown else f"{scope} {metric}/{period}"
    where = (
        (Budget.org == org)
        & (Budget.scope == scope)
        & (Budget.subject == stored)
        & (Budget.metric == metric)
        & (Budget.period == period)
    )
    try:
        with database.atomic():
            row = Budget.get_or_none(where)
            before = (row.amount, row.warn_percent) if row is not None else (None, None)
            if row is None:
                row = Budget.create(
                    org=org,
                    scope=scope,
                    subject=stored,
                    metric=metric,
                    period=period,
                    amount=amount,
                    warn_percent=warn_percent,
                )
            else:
                row.amount, row.warn_percent, row.updated_at = amount, warn_percent, time.time()
                row.save()
            audit(
                actor,
                org.id,
                "set budget",
                target,
                {"amount": [before[0], amount], "warn_percent": [before[1], warn_percent]},
            )
    except peewee.IntegrityError:
        raise ServiceError("that budget was changed meanwhile; try again", 409) from None
    return _budget_views(org.id, [row])[0]


def _governed_row(
    model: type[Budget] | type[RateLimit],
    row_id: int,
    org_name: str | None,
    actor: Principal | None,
    action: str,
) -> Budget | RateLimit:
    """The budget or limit ``row_id`` of the actor's org (of ``org_name`` for an operator)."""
    what = "budget" if model is Budget else "limit"
    org = _actor_org(actor, org_name) if (actor is not None or org_name is not None) else None
    if org is not None:
        _require_admin(actor, org, action, str(row_id))
    row = model.get_or_none(model.id == row_id)
    if row is None or (org is not None and row.org_id != org.id):
        error = NotFound(f"no {what} {row_id}")
        if actor is None:
            raise error
        owner = row.org_id if row is not None else None
        raise _deny(actor, action, str(row_id), error, owner_org_id=owner)
    return row


def delete_budget(
    budget_id: int, *, org_name: str | None = None, actor: Principal | None = None
) -> None:
    """Remove a budget (admins); what was counted against it stays until its window ends."""
    row = _governed_row(Budget, budget_id, org_name, actor, "delete budget")
    assert isinstance(row, Budget)
    emails = _shown_subjects(row.org_id, [row])
    with database.atomic():
        row.delete_instance()
        audit(
            actor,
            row.org_id,
            "delete budget",
            f"{row.scope} {_shown(row, emails)} {row.metric}/{row.period}".replace("  ", " "),
            {"amount": row.amount},
        )


def list_budgets(
    org_name: str | None = None, *, actor: Principal | None = None, now: float | None = None
) -> list[BudgetView]:
    """Every budget of the org with its use in the current window (admins and auditors)."""
    org = _actor_org(actor, org_name)
    _require_reader(actor, org)
    return _budget_views(org.id, _budget_order(Budget.select().where(Budget.org == org)), now)


@dataclass(frozen=True, slots=True)
class RateLimitView:
    """A rate limit and this UTC minute's requests and tokens counted against it."""

    id: int
    scope: str
    subject: str
    rpm: int | None
    tpm: int | None
    used_requests: float
    used_tokens: float
    resets_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "subject": self.subject,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "used_requests": int(self.used_requests),
            "used_tokens": int(self.used_tokens),
            "remaining_requests": None
            if self.rpm is None
            else max(0, self.rpm - int(self.used_requests)),
            "remaining_tokens": None
            if self.tpm is None
            else max(0, self.tpm - int(self.used_tokens)),
            "resets_at": self.resets_at,
        }


def _limit_views(
    org_id: int, rows: list[RateLimit], now: float | None = None
) -> list[RateLimitView]:
    at = time.time() if now is None else now
    counters = [minute_counters(org_id, r.scope, r.subject, at) for r in rows]
    used = _counters([k for requests, tokens, _end in counters for k in (requests, tokens)])
    emails = _shown_subjects(org_id, rows)
    return [
        RateLimitView(
            id=r.id,
            scope=r.scope,
            subject=_shown(r, emails),
            rpm=r.rpm,
            tpm=r.tpm,
            used_requests=used[requests],
            used_tokens=used[tokens],
            resets_at=end,
        )
        for r, (requests, tokens, end) in zip(rows, counters, strict=True)
    ]


def _limit_order(query: peewee.ModelSelect[RateLimit]) -> list[RateLimit]:
    scope_rank = peewee.Case(
        RateLimit.scope, [(s, i) for i, s in enumerate(LIMIT_SCOPES)], len(LIMIT_SCOPES)
    )
    return list(query.order_by(scope_rank, RateLimit.subject))


def _per_minute(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PER_MINUTE:
        raise ServiceError(f"{what} must be a whole number from 1 to {MAX_PER_MINUTE}, or none")
    return value


def set_rate_limit(
    org_name: str | None = None,
    *,
    scope: str,
    subject: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    actor: Principal | None = None,
) -> RateLimitView | None:
    """Set the requests and tokens per minute of the org, a user (by email) or a route (by
    name); None lifts that limit, and with both None the limit is removed (returns None).
    Admins only."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "set limit", f"{scope} {subject or ''}".strip())
    if scope not in LIMIT_SCOPES:
        raise ServiceError(f"scope must be one of {', '.join(LIMIT_SCOPES)}")
    rpm, tpm = _per_minute(rpm, "rpm"), _per_minute(tpm, "tpm")
    stored, shown = _subject_row(org, scope, subject)
    target = f"{scope} {shown}".strip()
    where = (RateLimit.org == org) & (RateLimit.scope == scope) & (RateLimit.subject == stored)
    try:
        with database.atomic():
            row = RateLimit.get_or_none(where)
            before = (row.rpm, row.tpm) if row is not None else (None, None)
            if rpm is None and tpm is None:
                if row is not None:
                    row.delete_instance()
                    audit(actor, org.id, "delete limit", target, {"rpm": row.rpm, "tpm": row.tpm})
                return None
            if row is None:
                row = RateLimit.create(org=org, scope=scope, subject=stored, rpm=rpm, tpm=tpm)
            else:
                row.rpm, row.tpm, row.updated_at = rpm, tpm, time.time()
                row.save()
            audit(
                actor,
                org.id,
                "set limit",
                target,
                {"rpm": [before[0], rpm], "tpm": [before[1], tpm]},
            )
    except peewee.IntegrityError:
        raise ServiceError("that limit was changed meanwhile; try again", 409) from None
    return _limit_views(org.id, [row])[0]


def delete_rate_limit(
    limit_id: int, *, org_name: str | None = None, actor: Principal | None = None
) -> None:
    row = _governed_row(RateLimit, limit_id, org_name, actor, "delete limit")
    assert isinstance(row, RateLimit)
    emails = _shown_subjects(row.org_id, [row])
    with database.atomic():
        row.delete_instance()
        audit(
            actor,
            row.org_id,
            "delete limit",
            f"{row.scope} {_shown(row, emails)}".strip(),
            {"rpm": row.rpm, "tpm": row.tpm},
        )


def list_rate_limits(
    org_name: str | None = None, *, actor: Principal | None = None, now: float | None = None
) -> list[RateLimitView]:
    """Every rate limit of the org with this minute's use (admins and auditors)."""
    org = _actor_org(actor, org_name)
    _require_reader(actor, org)
    return _limit_views(org.id, _limit_order(RateLimit.select().where(RateLimit.org == org)), now)


@dataclass(frozen=True, slots=True)
class MyGovernance:
    """The budgets and rate limits that apply to one user's requests."""

    budgets: list[BudgetView]
    limits: list[RateLimitView]

    def as_dict(self) -> dict[str, Any]:
        return {
            "budgets": [b.as_dict() for b in self.budgets],
            "limits": [r.as_dict() for r in self.limits],
        }


def my_budgets(actor: Principal, *, now: float | None = None) -> MyGovernance:
    """What caps the actor's requests: the org's budgets and limits, their own, and those
    of the routes they may use and of the keys behind those routes."""
    from tvgate.routing import load_snapshot

    org = Org.get_by_id(actor.org_id)
    usable = load_snapshot(org.id).available(actor)
    routes = sorted({r.name for r in usable})
    keys = sorted({r.key.name for r in usable})
    me = str(actor.user_id)

    def applies(model: type[Budget] | type[RateLimit]) -> Any:
        condition = (
            (model.scope == GOVERN_ORG)
            | ((model.scope == GOVERN_USER) & (model.subject == me))
            | ((model.scope == GOVERN_ROUTE) & model.subject.in_(routes or [""]))
        )
        if model is Budget:
            condition |= (model.scope == GOVERN_KEY) & model.subject.in_(keys or [""])
        return (model.org == org) & condition

    return MyGovernance(
        budgets=_budget_views(org.id, _budget_order(Budget.select().where(applies(Budget))), now),
        limits=_limit_views(
            org.id, _limit_order(RateLimit.select().where(applies(RateLimit))), now
        ),
    )


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


# --- traces ---

TRACE_FILTERS = ("user", "route", "tool", "session", "outcome", "since", "until")


def _trace_scope(actor: Principal | None, org: Org) -> peewee.ModelSelect[Trace]:
    """Traces the actor may read: their own, or the org's for admins and auditors."""
    query = Trace.select().where(Trace.org_id == org.id)
    if actor is not None and actor.role == ROLE_MEMBER:
        query = query.where(Trace.user_id == actor.user_id)
    return query


def parse_time(value: str) -> float:
    """Seconds since the epoch, from a number or an ISO 8601 date/time (UTC if no zone)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ServiceError(f"{value!r} is not a time (epoch seconds or ISO 8601)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _encode_cursor(trace: Trace) -> str:
    return base64.urlsafe_b64encode(f"{trace.received_at!r}|{trace.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        at, _, ident = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return float(at), ident
    except (ValueError, UnicodeDecodeError):
        raise ServiceError("cursor is not one tvgate gave out") from None


def list_traces(
    filters: dict[str, str],
    *,
    cursor: str | None = None,
    limit: int = 50,
    actor: Principal | None = None,
    org_name: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of traces, newest first, and the cursor of the next page (None at the end)."""
    org = _actor_org(actor, org_name)
    query = _trace_scope(actor, org)
    users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
    for name, value in filters.items():
        if name not in TRACE_FILTERS:
            raise ServiceError(f"unknown filter {name!r}; use {', '.join(TRACE_FILTERS)}")
        if name == "user":
            user_id = next((i for i, email in users.items() if email == value.lower()), -1)
            query = query.where(Trace.user_id == user_id)
        elif name == "route":
            query = query.where(Trace.route_name == value)
        elif name == "tool":
            query = query.where(Trace.tool == value)
        elif name == "session":
            query = query.where(Trace.session_id == value)
        elif name == "outcome":
            query = query.where(Trace.outcome == value)
        elif name == "since":
            query = query.where(Trace.received_at >= parse_time(value))
        elif name == "until":
            query = query.where(Trace.received_at < parse_time(value))
    if cursor:
        at, ident = _decode_cursor(cursor)
        query = query.where(
            (Trace.received_at < at) | ((Trace.received_at == at) & (Trace.id < ident))
        )
    limit = max(1, min(limit, 500))
    rows = list(query.order_by(Trace.received_at.desc(), Trace.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    page = [trace_summary(t, users.get(t.user_id or 0, "")) for t in rows]
    return page, (_encode_cursor(rows[-1]) if more else None)


def trace_summary(trace: Trace, email: str) -> dict[str, Any]:
    def after(moment: float | None) -> float | None:
        return round((moment - trace.received_at) * 1000, 3) if moment else None

    return {
        "id": trace.id,
        "user": email,
        "route": trace.route_name,
        "key": trace.key_name,
        "provider": trace.provider,
        "endpoint": trace.endpoint,
        "requested_model": trace.requested_model,
        "upstream_model": trace.upstream_model,
        "response_model": trace.response_model,
        "stream": trace.stream,
        "status": trace.status_code,
        "outcome": trace.outcome,
        "error_type": trace.error_type,
        "error_message": trace.error_message,
        "received_at": trace.received_at,
        "first_byte_ms": after(trace.first_byte_at),
        "total_ms": after(trace.finished_at),
        "overhead_ms": trace.overhead_ms,
        "usage": {
            "input_tokens": trace.input_tokens,
            "output_tokens": trace.output_tokens,
            "cache_read_tokens": trace.cache_read_tokens,
            "cache_write_tokens": trace.cache_write_tokens,
            "reasoning_tokens": trace.reasoning_tokens,
        },
        "cost_usd": trace.cost_usd,
        "tool": trace.tool,
        "tool_version": trace.tool_version,
        "session_id": trace.session_id,
        "repo": trace.repo,
        "branch": trace.branch,
        "upstream_request_id": trace.upstream_request_id,
        "message_id": trace.message_id,
        "bytes_in": trace.bytes_in,
        "bytes_out": trace.bytes_out,
        "truncated": trace.truncated,
        "captured": bool(trace.request_blob),
        # Every upstream attempt when fallbacks were tried; empty when the first route answered.
        "attempts": orjson.loads(trace.attempts) if trace.attempts else [],
        # What the writer found wrong with the call's figures and mended (an absurd
        # usage figure counted as 0, a provider's over-long value cut).
        "anomalies": orjson.loads(trace.anomalies) if trace.anomalies else [],
    }


def _body_document(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", errors="replace")


def get_trace(
    trace_id: str, *, actor: Principal | None = None, org_name: str | None = None
) -> dict[str, Any]:
    """One trace with its captured request (byte-exact, as JSON) and reassembled answer."""
    from tvgate.traces.content import load_request
    from tvgate.traces.store import BlobStore

    org = _actor_org(actor, org_name)
    trace = _trace_scope(actor, org).where(Trace.id == trace_id).first()
    if trace is None:
        error = NotFound(f"no trace {trace_id}")
        hidden = Trace.select(Trace.org_id).where(Trace.id == trace_id).first()
        if actor is None or hidden is None:
            raise error
        raise _deny(actor, "read trace", trace_id, error, owner_org_id=hidden.org_id)
    user = User.get_or_none(User.id == trace.user_id)
    document = trace_summary(trace, user.email if user else "")
    store = BlobStore(org.id)
    document["request"] = (
        _body_document(load_request(bytes.fromhex(trace.request_blob), store))
        if trace.request_blob
        else None
    )
    document["response"] = (
        _body_document(store.get(bytes.fromhex(trace.response_blob)))
        if trace.response_blob
        else None
    )
    return document


def session_traces(
    session: str, *, actor: Principal | None = None, org_name: str | None = None
) -> list[dict[str, Any]]:
    """A tool session's traces, oldest first."""
    org = _actor_org(actor, org_name)
    users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
    query = _trace_scope(actor, org).where(Trace.session_id == session)
    rows = list(query.order_by(Trace.received_at, Trace.id).limit(5000))
    if not rows:
        raise NotFound(f"no session {session}")
    return [trace_summary(t, users.get(t.user_id or 0, "")) for t in rows]


def export_traces(
    org_name: str | None, since: float, until: float | None = None, *, bodies: bool = False
) -> Iterator[dict[str, Any]]:
    """Every trace of an org from ``since`` on, oldest first, read a page at a time (CLI)."""
    org = get_org(org_name)
    after_at, after_id = since, ""
    while True:
        query = Trace.select().where(
            (Trace.org_id == org.id)
            & (
                (Trace.received_at > after_at)
                | ((Trace.received_at == after_at) & (Trace.id > after_id))
            )
        )
        if until is not None:
            query = query.where(Trace.received_at < until)
        rows = list(query.order_by(Trace.received_at, Trace.id).limit(500))
        if not rows:
            return
        users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
        for trace in rows:
            yield (
                get_trace(trace.id, org_name=org.name)
                if bodies
                else trace_summary(trace, users.get(trace.user_id or 0, ""))
            )
        after_at, after_id = rows[-1].received_at, rows[-1].id


# --- prices ---


#: A price's fields, USD per million tokens.
PRICE_FIELDS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok")
#: Those every price must give (the cache prices are 0 unless given).
REQUIRED_PRICE_FIELDS = PRICE_FIELDS[:2]


def _price_dict(price: ModelPrice, org: Org | None) -> dict[str, Any]:
    """A price as shown; ``org`` is None for the default table's."""
    return {
        "model": price.model,
        "org": org.name if org is not None and price.org_id == org.id else None,
        **{name: getattr(price, name) for name in PRICE_FIELDS},
    }


def list_prices(
    org_name: str | None = None, *, default_table: bool = False, actor: Principal | None = None
) -> list[dict[str, Any]]:
    """The prices an org's calls are charged: its own, then the default table's for the
    models it has no price of. ``default_table`` (operator): the default table alone."""
    if default_table and actor is None:
        return [_price_dict(p, None) for p in _default_prices()]
    org = _actor_org(actor, org_name)
    own = {p.model: p for p in ModelPrice.select().where(ModelPrice.org_id == org.id)}
    defaults = [p for p in _default_prices() if p.model not in own]
    return [_price_dict(p, org) for p in sorted([*own.values(), *defaults], key=lambda p: p.model)]


def _default_prices() -> list[ModelPrice]:
    return list(ModelPrice.select().where(ModelPrice.org_id.is_null()).order_by(ModelPrice.model))


def _check_prices(prices: dict[str, Any]) -> dict[str, float]:
    unknown = sorted(set(prices) - set(PRICE_FIELDS))
    if unknown:
        raise ServiceError(
            f"unknown price field(s): {', '.join(unknown)}; prices are set for your own org"
            f" (give {', '.join(PRICE_FIELDS)})"
        )
    # A price without its input or output figure would charge $0 for it, silently.
    missing = [name for name in REQUIRED_PRICE_FIELDS if name not in prices]
    if missing:
        raise ServiceError(f"missing price field(s): {', '.join(missing)} (USD per million tokens)")
    values = {}
    for name in PRICE_FIELDS:
        value = prices.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
            raise ServiceError(f"{name} must be a number of dollars per million tokens")
        values[name] = float(value)
    return values


def set_price(
    model: str,
    prices: dict[str, Any],
    *,
    org_name: str | None = None,
    actor: Principal | None = None,
) -> dict[str, Any]:
    """Set a model's prices (USD per million tokens) for one org: an admin for their own
    org, audited there. The operator (no actor) sets an org's with ``org_name``, and
    without it the default table, which every org without a price of its own pays."""
    if actor is not None and actor.role != ROLE_ADMIN:
        raise _deny(actor, "set price", model, Forbidden("only an admin may change prices"))
    _check_name(model, "a price")
    values = _check_prices(prices)
    if actor is None and org_name is None:
        return _set_default_price(model, values)
    org = _actor_org(actor, org_name)
    with database.atomic():
        ModelPrice.insert(model=model, org_id=org.id, updated_at=time.time(), **values).on_conflict(
            conflict_target=[ModelPrice.org_id, ModelPrice.model],
            update={**values, "updated_at": time.time()},
        ).execute()
        audit(actor, org.id, "set price", model, values)
    return {"model": model, "org": org.name, **values}


def _set_default_price(model: str, values: dict[str, float]) -> dict[str, Any]:
    """The operator's default price, audited in every org it changes: those without a price
    of their own for this pattern (one row each, in one statement)."""
    with database.atomic():
        ModelPrice.insert(model=model, org_id=None, updated_at=time.time(), **values).on_conflict(
            conflict_target=[ModelPrice.model],
            conflict_where=ModelPrice.org_id.is_null(),
            update={**values, "updated_at": time.time()},
        ).execute()
        overridden = ModelPrice.select(ModelPrice.org_id).where(
            (ModelPrice.model == model) & ModelPrice.org_id.is_null(False)
        )
        affected = Org.select(Org.id).where(Org.id.not_in(overridden))
        change = orjson.dumps(values).decode()
        AuditEvent.insert_from(
            affected.select_extend(
                peewee.Value(OPERATOR),
                peewee.Value("set default price"),
                peewee.Value(model[:400]),
                peewee.Value(change),
                peewee.Value(True),
                peewee.Value(time.time()),
            ),
            [
                AuditEvent.org_id,
                AuditEvent.actor,
                AuditEvent.action,
                AuditEvent.target,
                AuditEvent.change,
                AuditEvent.allowed,
                AuditEvent.at,
            ],
        ).execute()
    return {"model": model, "org": None, **values}


def delete_price(
    model: str, *, org_name: str | None = None, actor: Principal | None = None
) -> None:
    """Remove an org's own price of a model (it pays the default again): an admin for their
    own org, audited there. The default table's rows are kept (the operator resets them)."""
    if actor is not None and actor.role != ROLE_ADMIN:
        raise _deny(actor, "delete price", model, Forbidden("only an admin may change prices"))
    org = _actor_org(actor, org_name)
    with database.atomic():
        deleted = (
            ModelPrice.delete()
            .where((ModelPrice.org_id == org.id) & (ModelPrice.model == model))
            .execute()
        )
        if not deleted:
            raise NotFound(f"org {org.name!r} has no price of its own for {model!r}")
        audit(actor, org.id, "delete price", model)


# --- usage overview (the web UI's charts) ---

#: Overview ranges: name -> (bucket width in seconds, number of buckets).
OVERVIEW_RANGES = {"24h": (3600, 24), "30d": (86400, 30)}


def usage_overview(
    range_name: str = "24h",
    *,
    user_email: str | None = None,
    actor: Principal | None = None,
    org_name: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Requests, tokens, cost and errors over time and by user, route and tool, plus the
    slowest and most failing routes. Aggregated in the database (GROUP BY), never by
    loading traces. Admins and auditors see the org (or one user of it); members only
    themselves, whatever ``user_email`` says."""
    if range_name not in OVERVIEW_RANGES:
        raise ServiceError(f"range must be one of {', '.join(OVERVIEW_RANGES)}")
    width, count = OVERVIEW_RANGES[range_name]
    org = _actor_org(actor, org_name)
    query = _trace_scope(actor, org)
    if user_email is not None and (actor is None or actor.role != ROLE_MEMBER):
        query = query.where(Trace.user_id == get_user(user_email, org).id)
    # Whole buckets: the first starts at a multiple of the width (UTC hours or days).
    end = (int(now if now is not None else time.time()) // width + 1) * width
    start = end - width * count
    query = query.where(Trace.received_at >= start)
    tokens = Trace.input_tokens + Trace.output_tokens
    errors = peewee.Case(None, [(Trace.outcome != "ok", 1)], 0)
    duration = Trace.finished_at - Trace.received_at
    # CAST(... AS BIGINT) / width is integer division on SQLite and PostgreSQL alike
    # (PostgreSQL rounds the cast, which moves a bucket edge by half a second at most).
    bucket = peewee.Cast(Trace.received_at, "BIGINT") / width

    def aggregate(*group: Any) -> peewee.ModelSelect[Trace]:
        return query.select(
            *group,
            peewee.fn.COUNT(Trace.id).alias("requests"),
            peewee.fn.COALESCE(peewee.fn.SUM(tokens), 0).alias("tokens"),
            peewee.fn.COALESCE(peewee.fn.SUM(Trace.cost_usd), 0).alias("cost"),
            peewee.fn.COALESCE(peewee.fn.SUM(errors), 0).alias("errors"),
            peewee.fn.AVG(duration).alias("avg_s"),
            peewee.fn.MAX(duration).alias("max_s"),
        ).group_by(*group)

    def row(label: str, r: Any) -> dict[str, Any]:
        return {
            "label": label,
            "requests": int(r.requests),
            "tokens": int(r.tokens),
            "cost": float(r.cost),
            "errors": int(r.errors),
            "avg_ms": round(float(r.avg_s) * 1000, 1) if r.avg_s is not None else None,
            "max_ms": round(float(r.max_s) * 1000, 1) if r.max_s is not None else None,
        }

    by_bucket: dict[int, Any] = {
        int(getattr(r, "bucket")): r  # noqa: B009 (an aggregate column, not a field)
        for r in aggregate(bucket.alias("bucket"))
    }
    series = []
    for i in range(count):
        at = start + i * width
        found = by_bucket.get(at // width)
        series.append({"at": at, **(row("", found) if found is not None else row("", _EMPTY_ROW))})
    users = {u.id: u.email for u in User.select(User.id, User.email).where(User.org == org)}
    by_user = [
        row(users.get(r.user_id or 0, "(deleted user)"), r)
        for r in aggregate(Trace.user_id).order_by(peewee.SQL("requests").desc()).limit(20)
    ]
    by_route_rows = list(aggregate(Trace.route_name))
    by_route = [row(r.route_name or "(no route)", r) for r in by_route_rows]
    by_tool = [
        row(r.tool or "(unknown)", r)
        for r in aggregate(Trace.tool).order_by(peewee.SQL("requests").desc()).limit(20)
    ]
    totals = row("total", aggregate().get()) if series else row("total", _EMPTY_ROW)
    return {
        "range": range_name,
        "bucket_seconds": width,
        "start": start,
        "end": end,
        "totals": totals,
        "series": series,
        "by_user": by_user,
        "by_route": sorted(by_route, key=lambda r: -r["requests"])[:20],
        "by_tool": by_tool,
        "slowest_routes": sorted(
            (r for r in by_route if r["avg_ms"] is not None), key=lambda r: -r["avg_ms"]
        )[:10],
        "failing_routes": sorted(
            (r for r in by_route if r["errors"]), key=lambda r: (-r["errors"], r["label"])
        )[:10],
    }


class _Empty:
    requests = tokens = cost = errors = 0
    avg_s = max_s = None


_EMPTY_ROW: Any = _Empty()
