"""``/api/v1/tokens``: a user's own proxy tokens; an admin's view of the org's."""

from __future__ import annotations

from typing import Any

from tvgate import services
from tvgate.api.base import APIError, APIHandler, check_fields, int_arg
from tvgate.identity import VIA_VISDOM

TOKEN_CREATE_FIELDS = {"name", "expires_days", "user"}


class TokensHandler(APIHandler):
    async def get(self) -> None:
        email = self.get_query_argument("user", None)
        if email is None and self.get_query_argument("all", "") == "":
            email = self.principal.email
        tokens = await self.run_service(lambda: services.list_tokens(email, actor=self.principal))
        self.send({"tokens": [t.as_dict() for t in tokens]})

    async def post(self) -> None:
        body = self.body()
        check_fields(body, TOKEN_CREATE_FIELDS)
        name = body.get("name", "")
        expires_days = body.get("expires_days")
        email = body.get("user", self.principal.email)
        if not isinstance(name, str) or not isinstance(email, str):
            raise APIError(400, "name and user must be strings")
        if expires_days is not None and (
            isinstance(expires_days, bool) or not isinstance(expires_days, int | float)
        ):
            raise APIError(400, "expires_days must be a number")
        principal, gateway = self.principal, self.gateway
        # A token minted with a Visdom Trace session is held to that session.
        visdom_session = self.credential if principal.via == VIA_VISDOM else None
        token, row = await self.run_service(
            lambda: services.issue_token(
                email,
                principal.org_name,
                name=name,
                expires_days=expires_days,
                actor=principal,
                keyring=gateway.keyring,
                visdom_session=visdom_session,
                jwt_max_age=gateway.settings.jwt_token_max_age,
            )
        )
        view: dict[str, Any] = services.TokenView.of(row).as_dict()
        # The only time the token is ever shown.
        self.send({**view, "token": token}, status=201)


class TokenHandler(APIHandler):
    async def delete(self, token_id: str) -> None:
        ident = int_arg(token_id, "token id")
        view = await self.run_service(lambda: services.revoke_token(ident, actor=self.principal))
        self.send(view.as_dict())


default_handlers = [
    (r"/api/v1/tokens", TokensHandler),
    (r"/api/v1/tokens/([^/]+)", TokenHandler),
]
