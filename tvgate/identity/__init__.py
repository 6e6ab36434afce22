"""Who is calling: the Principal, the errors identity raises, and the token reader.

A request's credential comes as ``x-api-key`` or ``Authorization: Bearer``,
whichever the tool sends. Each kind of credential has an authenticator that
turns it into a Principal or refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tornado.httputil import HTTPHeaders


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user acting in one org."""

    user_id: int
    org_id: int
    org_name: str
    email: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class AuthError(Exception):
    """The credential is missing, unknown, expired or revoked (401)."""


class IdentityUnavailable(Exception):
    """The identity provider could not be asked (503: an outage is not a revoked login)."""


def credential_from_headers(headers: HTTPHeaders) -> str | None:
    """The token the client sent, from ``x-api-key`` or a Bearer ``Authorization``."""
    token = headers.get("x-api-key")
    if token:
        return token.strip()
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None
