"""The front door of identity: which authenticator a credential goes to, and the org it acts in.

``tvg_`` tokens are tvgate's own, ``tvs_`` tokens are Visdom Trace sessions,
and three dot-separated base64 parts are a JWT: the configured issuer's
(``TVGATE_JWT_ISSUER``) when its unverified ``iss`` says so, else a single-tenant
Visdom Trace's Keycloak token when a Visdom Trace server is configured. Each kind
is checked by its own authenticator; a kind that is not configured is refused
like an unknown token. A ``tvk_`` Visdom Trace org key is refused by its prefix
alone (no call to Visdom Trace, never logged): it acts for no person.

A caller whose ``Authorization`` carries a credential of none of these kinds (their own
Claude subscription's OAuth bearer) names themselves in ``x-tvgate-token`` instead
(``subscription_credentials``); that token goes through ``Authenticator.authenticate``
like any other, and the bearer is only ever passed on (tvgate.proxy.subscription).
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from tornado.httputil import HTTPHeaders

from tvgate.headers import header
from tvgate.identity import AuthError, OrgSelectionError, Principal
from tvgate.identity.jwt_issuer import JWTAuthenticator, looks_like_jwt
from tvgate.identity.tokens import TOKEN_PREFIX as PROXY_PREFIX
from tvgate.identity.tokens import ProxyTokenAuthenticator
from tvgate.identity.visdom import ORG_KEY_PREFIX, VisdomAuthenticator
from tvgate.identity.visdom import TOKEN_PREFIX as VISDOM_PREFIX

#: What a ``tvk_`` key sent as a proxy credential is told.
ORG_KEY_REFUSED = (
    "a Visdom Trace org API key (tvk_…) acts for no person, and tvgate needs one: send "
    "your personal Visdom Trace token (`tracevault login`, then `tracevault proxy info`) "
    "or a tvgate token (tvg_…)"
)


#: The header that names the caller when ``Authorization`` carries their own subscription.
IDENTITY_HEADER = "x-tvgate-token"


def is_tvgate_credential(token: str) -> bool:
    """Whether ``token`` is of a kind tvgate checks (not a provider's own credential)."""
    return token.startswith((PROXY_PREFIX, VISDOM_PREFIX, ORG_KEY_PREFIX)) or looks_like_jwt(token)


def subscription_credentials(headers: HTTPHeaders) -> tuple[str, str] | None:
    """(the caller's tvgate credential, the bearer of their own subscription) when the
    request names the caller in ``x-tvgate-token`` and its ``Authorization: Bearer`` is no
    credential of tvgate's; None otherwise (the request signs in as usual)."""
    # Every proxy request asks, and nearly none has the header: header() reads a missing
    # one without the KeyError HTTPHeaders.get raises and catches.
    named = header(headers, IDENTITY_HEADER).strip()
    if not named:
        return None
    scheme, _, bearer = header(headers, "Authorization").partition(" ")
    bearer = bearer.strip()
    if scheme.lower() != "bearer" or not bearer or is_tvgate_credential(bearer):
        return None
    return named, bearer


def _unverified_issuer(token: str) -> object:
    """The ``iss`` a JWT claims, unchecked: only which authenticator checks it."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None


@dataclass(eq=False)
class Authenticator:
    proxy_tokens: ProxyTokenAuthenticator
    visdom: VisdomAuthenticator | None
    jwt: JWTAuthenticator | None
    pinned_org: str

    async def authenticate(self, token: str, requested_org: str | None = None) -> Principal:
        """The principal for a credential, in the org the request asked for (if any)."""
        if token.startswith(PROXY_PREFIX):
            principal = await self.proxy_tokens.authenticate(token)
            wanted = self.pinned_org or requested_org
            if wanted and wanted != principal.org_name:
                # A proxy token belongs to one org; no header moves it to another.
                raise OrgSelectionError(
                    f"this token is for org {principal.org_name!r}, not {wanted!r}"
                )
            return principal
        if token.startswith(VISDOM_PREFIX):
            if self.visdom is None:
                raise AuthError("Visdom Trace sign-in is not configured on this gateway")
            return await self.visdom.authenticate(token, requested_org)
        if looks_like_jwt(token):
            if self.jwt is not None and (
                self.visdom is None or _unverified_issuer(token) == self.jwt.settings.jwt_issuer
            ):
                return await self.jwt.authenticate(token, requested_org)
            if self.visdom is not None:
                return await self.visdom.authenticate_jwt(token, requested_org)
            raise AuthError("JWT sign-in is not configured on this gateway")
        if token.startswith(ORG_KEY_PREFIX):
            raise AuthError(ORG_KEY_REFUSED)
        raise AuthError("unknown credential")

    def forget_all(self) -> None:
        """Drop every cached identity: a token, user or role changed in this process."""
        self.proxy_tokens.forget_all()
        if self.visdom is not None:
            self.visdom.forget_all()
        if self.jwt is not None:
            self.jwt.forget_all()
