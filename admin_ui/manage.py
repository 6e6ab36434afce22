"""The org's admin pages: routes (and "who gets what"), keys, users, policy and prices,
and the audit log. Admins change; auditors read; members get 403. Every action goes
through tvgate.services, which checks the role again and writes the audit log."""

from __future__ import annotations

from typing import Any

from tornado.escape import url_escape
from tornado.web import authenticated

from admin_ui.base import READERS, PageError, UIHandler
from admin_ui.traces import when
from tvgate import services
from tvgate.identity import Principal
from tvgate.models import ROLE_ADMIN, ROLE_AUDITOR, ROLE_MEMBER
from tvgate.providers.clouds import CLOUD_SETTINGS

#: Every cloud key setting a form may carry (a key's own cloud checks them).
_CLOUD_FORM_FIELDS = tuple(dict.fromkeys(f for fields in CLOUD_SETTINGS.values() for f in fields))

ADMIN = (ROLE_ADMIN,)
#: The role pickers' order: from the one that may do most.
ROLE_CHOICES = (ROLE_ADMIN, ROLE_AUDITOR, ROLE_MEMBER)


def _form_bool(handler: UIHandler, name: str) -> bool:
    return handler.get_body_argument(name, "") in ("on", "true", "1")


def _form_names(handler: UIHandler, name: str) -> list[str]:
    """Names typed into one field, separated by commas or spaces."""
    return handler.get_body_argument(name, "").replace(",", " ").split()


def _form_int(handler: UIHandler, name: str, what: str, default: int = 0) -> int:
    text = handler.get_body_argument(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise PageError(400, f"{what} must be a whole number.") from None


async def add_key_from_form(
    handler: UIHandler,
    user: Principal,
    *,
    owner_email: str | None = None,
    available_to_all: bool = True,
    max_concurrent: int = 0,
) -> None:
    """Add the key the form names (name, provider, secret, base URL, Chat-only) with this gateway's
    keyring and upstream rules: an org key (shared or granted, with a cap) or, with
    ``owner_email``, a user's own (the org key page and My gateway)."""
    gateway = handler.gateway
    settings = gateway.settings
    name = handler.get_body_argument("name", "").strip()
    provider = handler.get_body_argument("provider", "")
    secret = handler.get_body_argument("secret", "")
    base_url = handler.get_body_argument("base_url", "").strip() or None
    chat_only = _form_bool(handler, "chat_only")
    # A cloud key's settings (Azure OpenAI's, Vertex AI's, Bedrock's), those the form was given.
    cloud = {
        field: value
        for field in _CLOUD_FORM_FIELDS
        if (value := handler.get_body_argument(field, "").strip())
    }
    await handler.run_service(
        lambda: services.add_key(
            name,
            provider,
            secret,
            gateway.keyring,
            base_url=base_url,
            **settings.upstream_rules,
            owner_email=owner_email,
            available_to_all=available_to_all,
            max_concurrent=max_concurrent,
            chat_only=chat_only,
            settings=cloud or None,
            actor=user,
        )
    )


def _back(handler: UIHandler, default: str) -> str:
    back = handler.get_body_argument("back", default)
    return back if back.startswith("/ui/") and "//" not in back else default


# --- routes ---


class RoutesHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        self.require(*READERS)
        user = self.user
        name = self.get_query_argument("name", "").strip()
        email = self.get_query_argument("user", "").strip()

        def load() -> dict[str, Any]:
            return {
                "routes": services.list_routes(actor=user),
                "keys": services.list_keys(actor=user),
                "users": services.list_users(actor=user),
                "resolution": services.resolve_route(name, email, actor=user)
                if name and email
                else None,
            }

        data = await self.run_service(load)
        self.render("routes.html", q_name=name, q_user=email, **data)

    @authenticated
    async def post(self) -> None:
        self.require(*ADMIN)
        user = self.user
        name = self.get_body_argument("name", "").strip()
        key = self.get_body_argument("key", "")
        model = self.get_body_argument("model", "").strip()
        description = self.get_body_argument("description", "").strip()
        for_user = self.get_body_argument("for_user", "").strip() or None
        fallbacks = _form_names(self, "fallbacks")
        await self.run_service(
            lambda: services.add_route(
                name,
                key,
                model=model,
                description=description,
                for_user=for_user,
                fallbacks=fallbacks,
                actor=user,
            )
        )
        self.done("/ui/routes", "route-added")


def _find_route(user: Principal, route_id: int) -> dict[str, Any]:
    routes = services.list_routes(actor=user)
    route = next((r for r in routes if r.id == route_id), None)
    if route is None:
        raise services.NotFound(f"no route {route_id}")
    return {"route": route, "keys": services.list_keys(actor=user)}


class RouteHandler(UIHandler):
    @authenticated
    async def get(self, route_id: str) -> None:
        self.require(*READERS)
        user = self.user
        data = await self.run_service(lambda: _find_route(user, int(route_id)))
        self.render("route.html", **data)

    @authenticated
    async def post(self, route_id: str) -> None:
        self.require(*ADMIN)
        user = self.user
        changes = {
            "name": self.get_body_argument("name", "").strip(),
            "upstream_model": self.get_body_argument("model", "").strip(),
            "key": self.get_body_argument("key", ""),
            "description": self.get_body_argument("description", "").strip(),
            "enabled": _form_bool(self, "enabled"),
            "translate": _form_bool(self, "translate"),
            "fallbacks": _form_names(self, "fallbacks"),
        }
        await self.run_service(lambda: services.update_route(int(route_id), changes, actor=user))
        self.done("/ui/routes")


class RouteToggleHandler(UIHandler):
    @authenticated
    async def post(self, route_id: str) -> None:
        user = self.user
        enabled = _form_bool(self, "enabled")
        await self.run_service(
            lambda: services.update_route(int(route_id), {"enabled": enabled}, actor=user)
        )
        self.done(_back(self, "/ui/routes"))


class RouteDeleteHandler(UIHandler):
    @authenticated
    async def post(self, route_id: str) -> None:
        user = self.user
        await self.run_service(lambda: services.delete_route(int(route_id), actor=user))
        self.done(_back(self, "/ui/routes"), "deleted")


# --- keys ---


class KeysHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        self.require(*READERS)
        user = self.user
        keys = await self.run_service(lambda: services.list_keys(actor=user))
        self.render("keys.html", keys=keys, when=when)

    @authenticated
    async def post(self) -> None:
        self.require(*ADMIN)
        user = self.user
        available = _form_bool(self, "available_to_all")
        max_concurrent = _form_int(self, "max_concurrent", "Max concurrent calls")
        await add_key_from_form(
            self, user, available_to_all=available, max_concurrent=max_concurrent
        )
        # Post/redirect/get: the secret leaves in no page, and a reload does not resend it.
        self.done("/ui/keys", "key-added")


class KeyHandler(UIHandler):
    """One key: rotate its secret, change its cap or base URL, switch it, share it, grant
    it, delete it."""

    @authenticated
    async def get(self, name: str) -> None:
        self.require(*READERS)
        await self.show(name)

    async def show(self, name: str, holders: list[str] | None = None) -> None:
        user = self.user
        keys = await self.run_service(lambda: services.list_keys(actor=user))
        key = next((k for k in keys if k.name == name), None)
        if key is None:
            raise PageError(404, f"No key named {name!r}.")
        routes = await self.run_service(lambda: services.list_routes(actor=user))
        self.render(
            "key.html",
            key=key,
            routes=[r for r in routes if r.key == name],
            cloud_fields=CLOUD_SETTINGS.get(key.provider, ()),
            holders=holders,
            when=when,
        )

    @authenticated
    async def post(self, name: str) -> None:
        self.require(*ADMIN)
        user = self.user
        gateway = self.gateway
        action = self.get_body_argument("action", "")
        if action == "rotate":
            secret = self.get_body_argument("secret", "")
            # A cloud key's settings as the form shows them (an emptied one is removed).
            given = {
                field: self.get_body_argument(field, "").strip() or None
                for field in _CLOUD_FORM_FIELDS
                if field in self.request.body_arguments
            }
            await self.run_service(
                lambda: services.rotate_key(
                    name,
                    secret,
                    gateway.keyring,
                    settings=given or None,
                    **gateway.settings.upstream_rules,
                    actor=user,
                )
            )
            self.done(f"/ui/keys/{url_escape(name, plus=False)}", "key-rotated")
        elif action in ("disable", "enable"):
            off = action == "disable"
            await self.run_service(lambda: services.set_key_disabled(name, off, actor=user))
            self.done(f"/ui/keys/{url_escape(name, plus=False)}")
        elif action == "availability":
            everyone = _form_bool(self, "available_to_all")
            await self.run_service(
                lambda: services.set_key_availability(name, everyone, actor=user)
            )
            self.done(f"/ui/keys/{url_escape(name, plus=False)}")
        elif action == "max_concurrent":
            cap = _form_int(self, "max_concurrent", "Max concurrent calls")
            await self.run_service(
                lambda: services.update_key(name, max_concurrent=cap, actor=user)
            )
            self.done(f"/ui/keys/{url_escape(name, plus=False)}")
        elif action == "base_url":
            url = self.get_body_argument("base_url", "").strip()
            if not url:
                raise PageError(400, "Give the base URL the key's calls go to.")
            settings = gateway.settings
            await self.run_service(
                lambda: services.update_key(
                    name,
                    base_url=url,
                    **settings.upstream_rules,
                    actor=user,
                )
            )
            self.done(f"/ui/keys/{url_escape(name, plus=False)}")
        elif action in ("grant", "revoke"):
            emails = [
                e.strip() for e in self.get_body_argument("users", "").replace(",", " ").split()
            ]
            if not emails:
                raise PageError(400, "Name at least one user by email.")
            revoke = action == "revoke"
            holders = await self.run_service(
                lambda: services.grant_key(name, emails, revoke=revoke, actor=user)
            )
            await self.show(name, holders)
        elif action == "delete":
            force = _form_bool(self, "force")
            await self.run_service(lambda: services.delete_key(name, force=force, actor=user))
            self.done("/ui/keys", "deleted")
        else:
            raise PageError(400, "Unknown action.")


# --- users ---


class UsersHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        self.require(*READERS)
        user = self.user
        users = await self.run_service(lambda: services.list_users(actor=user))
        self.render("users.html", users=users, roles=ROLE_CHOICES, when=when)


class UserHandler(UIHandler):
    @authenticated
    async def get(self, email: str) -> None:
        self.require(*READERS)
        user = self.user

        def load() -> dict[str, Any]:
            users = services.list_users(actor=user)
            subject = next((u for u in users if u.email == email.lower()), None)
            if subject is None:
                raise services.NotFound(f"no user {email!r}")
            traces, _next = services.list_traces({"user": subject.email}, limit=10, actor=user)
            return {
                "subject": subject,
                "routes": [r for r in services.list_routes(actor=user) if r.user == subject.email],
                "keys": [k for k in services.list_keys(actor=user) if k.owner == subject.email],
                "tokens": services.list_tokens(subject.email, actor=user)
                if user.role == ROLE_ADMIN
                else [],
                "usage": services.usage_overview("30d", user_email=subject.email, actor=user),
                "traces": traces,
            }

        data = await self.run_service(load)
        self.render("user.html", roles=ROLE_CHOICES, when=when, **data)

    @authenticated
    async def post(self, email: str) -> None:
        self.require(*ADMIN)
        user = self.user
        role = self.get_body_argument("role", "") or None
        disabled_arg = self.get_body_argument("disabled", "")
        disabled = None if disabled_arg == "" else disabled_arg == "true"
        await self.run_service(
            lambda: services.update_user(email, role=role, disabled=disabled, actor=user)
        )
        self.done(_back(self, "/ui/users"))


# --- org policy and prices ---


class PolicyHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        self.require(*READERS)
        user = self.user
        policy = await self.run_service(lambda: services.get_policy(actor=user))
        prices = await self.run_service(lambda: services.list_prices(actor=user))
        self.render("policy.html", policy=policy, prices=prices)

    @authenticated
    async def post(self) -> None:
        self.require(*ADMIN)
        user = self.user
        retention_text = self.get_body_argument("retention_days", "").strip()
        try:
            retention = int(retention_text)
        except ValueError:
            raise PageError(400, "Retention must be a whole number of days.") from None
        patterns = [
            line.strip()
            for line in self.get_body_argument("redaction_patterns", "").splitlines()
            if line.strip()
        ]
        await self.run_service(
            lambda: services.set_policy(
                allow_user_keys=_form_bool(self, "allow_user_keys"),
                allow_user_routes=_form_bool(self, "allow_user_routes"),
                capture_bodies=_form_bool(self, "capture_bodies"),
                subscription_passthrough=_form_bool(self, "subscription_passthrough"),
                retention_days=retention,
                redaction_patterns=patterns,
                actor=user,
            )
        )
        self.done("/ui/policy")


class PriceHandler(UIHandler):
    @authenticated
    async def post(self) -> None:
        self.require(*ADMIN)
        user = self.user
        model = self.get_body_argument("model", "").strip()
        prices: dict[str, float] = {}
        for name in services.PRICE_FIELDS:
            text = self.get_body_argument(name, "").strip() or "0"
            try:
                prices[name] = float(text)
            except ValueError:
                raise PageError(400, f"{name} must be a number.") from None
        await self.run_service(lambda: services.set_price(model, prices, actor=user))
        self.done("/ui/policy")


# --- audit log ---


class AuditHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        self.require(*READERS)
        user = self.user
        before = self.get_query_argument("before", "")
        before_id = int(before) if before.isdigit() else None
        events = await self.run_service(
            lambda: services.list_audit(before_id=before_id, limit=100, actor=user)
        )
        self.render(
            "audit.html",
            events=events,
            older=events[-1]["id"] if len(events) == 100 else None,
            when=when,
        )


default_handlers = [
    (r"/ui/routes", RoutesHandler),
    (r"/ui/routes/([0-9]+)", RouteHandler),
    (r"/ui/routes/([0-9]+)/toggle", RouteToggleHandler),
    (r"/ui/routes/([0-9]+)/delete", RouteDeleteHandler),
    (r"/ui/keys", KeysHandler),
    (r"/ui/keys/([^/]+)", KeyHandler),
    (r"/ui/users", UsersHandler),
    (r"/ui/users/([^/]+)", UserHandler),
    (r"/ui/policy", PolicyHandler),
    (r"/ui/prices", PriceHandler),
    (r"/ui/audit", AuditHandler),
]
