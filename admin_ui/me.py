""" "My gateway": every user's own page — models, keys and routes (where the org allows),
usage and traces, proxy tokens, and how to connect each tool to this server."""

from __future__ import annotations

from typing import Any

from tornado.web import authenticated

from admin_ui.base import PageError, UIHandler
from admin_ui.connect import tool_configs
from admin_ui.governance import template_helpers
from admin_ui.manage import add_key_from_form
from tvgate import services
from tvgate.identity import Principal
from tvgate.identity.sessions import hold_once, take_once
from tvgate.keyring import KeyringUnavailable


def _my_page(user: Principal) -> dict[str, Any]:
    """Everything the page shows, read in one trip to the database pool."""
    policy = services.get_policy(actor=user)
    routes = [
        r for r in services.list_routes(actor=user) if r.scope == "org" or r.user == user.email
    ]
    # The names a request may use right now, by the code the proxy itself runs.
    available = services.resolve_route("", user.email, actor=user).available
    keys = [k for k in services.list_keys(actor=user) if k.owner == user.email]
    # A member's own route may use their own keys, or an org key they can already reach
    # through an org route (services.add_route checks again).
    usable_keys = sorted({k.name for k in keys} | {r.key for r in routes if r.scope == "org"})
    tokens = services.list_tokens(user.email, actor=user)
    usage = services.usage_overview("30d", user_email=user.email, actor=user)
    traces, _next = services.list_traces({"user": user.email}, limit=10, actor=user)
    governance = services.my_budgets(user)
    return {
        "budgets": governance.budgets,
        "limits": governance.limits,
        "policy": policy,
        "routes": routes,
        "available": available,
        "keys": keys,
        "usable_keys": usable_keys,
        "tokens": tokens,
        "usage": usage["totals"],
        "traces": traces,
    }


class MeHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        new_token = ""
        if self.get_query_argument("ok", "") == "token-minted":
            user, keyring = self.user, self.gateway.keyring
            new_token = await self.run_service(lambda: take_once(user, keyring))
        await self.show(new_token=new_token)

    async def show(self, new_token: str = "", status: int = 200) -> None:
        user = self.user
        data = await self.run_service(lambda: _my_page(user))
        routes = data["routes"]
        claude_names = [r.name for r in routes if r.provider == "anthropic" and "*" not in r.name]
        claude = next(iter(claude_names), "ROUTE")
        # Claude Code also calls a small model in the background: a haiku route if there is
        # one, else the main route, so that those calls never ask for a route that is missing.
        claude_small = next((name for name in claude_names if "haiku" in name), claude)
        openai = next(
            (r.name for r in routes if r.provider == "openai" and "*" not in r.name), "ROUTE"
        )
        base_url = (
            self.gateway.settings.public_url.rstrip("/")
            or f"{self.request.protocol}://{self.request.host}"
        )
        self.set_status(status)
        self.render(
            "me.html",
            new_token=new_token,
            base_url=base_url,
            tools=tool_configs(base_url, claude, claude_small, openai),
            deletable=False,
            **template_helpers(),
            **data,
        )


class MintTokenHandler(MeHandler):
    @authenticated
    async def post(self) -> None:
        user = self.user
        name = self.get_body_argument("name", "").strip()
        days_text = self.get_body_argument("expires_days", "").strip()
        try:
            days = float(days_text) if days_text else None
        except ValueError:
            raise PageError(400, "Expiry must be a number of days.") from None
        gateway = self.gateway
        token, _row = await self.run_service(
            lambda: services.issue_token(
                user.email,
                user.org_name,
                name=name,
                expires_days=days,
                actor=user,
                keyring=gateway.keyring,
                jwt_max_age=gateway.settings.jwt_token_max_age,
            )
        )
        # Post/redirect/get: the token waits sealed in the web session (never in a URL or
        # a cookie) and the page after the redirect shows it once.
        try:
            await self.run_service(lambda: hold_once(user, token, gateway.keyring))
        except KeyringUnavailable:
            # The key store cannot seal it: shown on this answer instead, not lost.
            await self.show(new_token=token, status=201)
            return
        self.done("/ui/me", "token-minted")


class RevokeTokenHandler(UIHandler):
    @authenticated
    async def post(self, token_id: str) -> None:
        user = self.user
        await self.run_service(lambda: services.revoke_token(int(token_id), actor=user))
        back = self.get_body_argument("back", "/ui/me")
        self.done(back if back.startswith("/ui/") else "/ui/me", "token-revoked")


class MyKeyHandler(UIHandler):
    """A user's own key, where the org allows it."""

    @authenticated
    async def post(self) -> None:
        user = self.user
        await add_key_from_form(self, user, owner_email=user.email)
        self.done("/ui/me", "key-added")


class MyKeyDeleteHandler(UIHandler):
    @authenticated
    async def post(self, name: str) -> None:
        user = self.user
        await self.run_service(lambda: services.delete_key(name, force=True, actor=user))
        self.done("/ui/me", "deleted")


class MyRouteHandler(UIHandler):
    @authenticated
    async def post(self) -> None:
        user = self.user
        name = self.get_body_argument("name", "").strip()
        key = self.get_body_argument("key", "")
        model = self.get_body_argument("model", "").strip()
        fallbacks = self.get_body_argument("fallbacks", "").replace(",", " ").split()
        await self.run_service(
            lambda: services.add_route(
                name, key, model=model, owner=user.email, fallbacks=fallbacks, actor=user
            )
        )
        self.done("/ui/me", "route-added")


default_handlers = [
    (r"/ui/me", MeHandler),
    (r"/ui/me/tokens", MintTokenHandler),
    (r"/ui/me/tokens/([0-9]+)/revoke", RevokeTokenHandler),
    (r"/ui/me/keys", MyKeyHandler),
    (r"/ui/me/keys/([^/]+)/delete", MyKeyDeleteHandler),
    (r"/ui/me/routes", MyRouteHandler),
]
