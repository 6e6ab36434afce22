"""``/api/v1`` resources: routes, keys, grants, users, org policy, audit, "who gets what".

Each handler parses, calls one service, and answers; the services decide who
may do what and write the audit log. After a change, this process's caches
are told at once (other processes see it within ``cache_ttl``).
"""

from __future__ import annotations

from typing import Any

from tvgate import services
from tvgate.api.base import APIError, APIHandler, check_fields, int_arg

#: The fields each write endpoint takes (and those it needs); anything else is a 400.
ROUTE_CREATE_FIELDS = {
    "name",
    "key",
    "upstream_model",
    "description",
    "for_user",
    "owner",
    "enabled",
    "fallbacks",
    "translate",
}
ROUTE_CHANGE_FIELDS = {
    "name",
    "key",
    "upstream_model",
    "description",
    "enabled",
    "fallbacks",
    "translate",
}
KEY_CREATE_FIELDS = {
    "name",
    "provider",
    "secret",
    "base_url",
    "owner",
    "available_to_all",
    "max_concurrent",
    "chat_only",
    "settings",
}
KEY_CHANGE_FIELDS = {
    "available_to_all",
    "max_concurrent",
    "base_url",
    "chat_only",
    "secret",
    "settings",
}
GRANT_FIELDS = {"users", "revoke"}
USER_CHANGE_FIELDS = {"role", "disabled"}
POLICY_FIELDS = {
    "allow_user_keys",
    "allow_user_routes",
    "capture_bodies",
    "span_content",
    "subscription_passthrough",
    "retention_days",
    "redaction_patterns",
}


def _str(body: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = body.get(name, default)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name} must be a string")
    return value


def _required_str(body: dict[str, Any], name: str) -> str:
    value = _str(body, name)
    if not value:
        raise APIError(400, f"{name} is required")
    return value


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false")
    return value


def _str_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(v, str) for v in value)
    ):
        raise APIError(400, f"{name} must be a list of strings")
    return value


def _int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise APIError(400, f"{name} must be an integer")
    return value


class MeHandler(APIHandler):
    async def get(self) -> None:
        p = self.principal
        policy = await self.run_service(lambda: services.get_policy(actor=p))
        self.send(
            {
                "email": p.email,
                "org": p.org_name,
                "role": p.role,
                "policy": policy.as_dict(),
            }
        )


class RoutesHandler(APIHandler):
    async def get(self) -> None:
        await self.send_list("routes", services.list_routes)

    async def post(self) -> None:
        body = self.body()
        check_fields(body, ROUTE_CREATE_FIELDS, required=("name", "key"))
        name, key = _required_str(body, "name"), _required_str(body, "key")
        model = _str(body, "upstream_model", "") or ""
        description = _str(body, "description", "") or ""
        for_user, owner = _str(body, "for_user"), _str(body, "owner")
        enabled = _bool(body, "enabled")
        translate = _bool(body, "translate")
        fallbacks = _str_list(body, "fallbacks")
        route = await self.run_service(
            lambda: services.add_route(
                name,
                key,
                model=model,
                description=description,
                for_user=for_user,
                owner=owner,
                enabled=True if enabled is None else enabled,
                fallbacks=fallbacks,
                translate=True if translate is None else translate,
                actor=self.principal,
            )
        )
        self.send(route.as_dict(), status=201)


class RouteHandler(APIHandler):
    async def get(self, route_id: str) -> None:
        ident = int_arg(route_id, "route id")
        routes = await self.run_service(lambda: services.list_routes(actor=self.principal))
        found = next((r for r in routes if r.id == ident), None)
        if found is None:
            raise APIError(404, f"no route {ident}")
        self.send(found.as_dict())

    async def patch(self, route_id: str) -> None:
        ident = int_arg(route_id, "route id")
        changes = self.body()
        check_fields(changes, ROUTE_CHANGE_FIELDS)
        route = await self.run_service(
            lambda: services.update_route(ident, changes, actor=self.principal)
        )
        self.send(route.as_dict())

    async def delete(self, route_id: str) -> None:
        await self.delete_row(route_id, "route", services.delete_route)


class ResolveHandler(APIHandler):
    async def get(self) -> None:
        name = self.get_query_argument("name", "")
        email = self.get_query_argument("user", self.principal.email)
        if not name:
            raise APIError(400, "name is required")
        resolution = await self.run_service(
            lambda: services.resolve_route(name, email, actor=self.principal)
        )
        self.send(resolution.as_dict())


class KeysHandler(APIHandler):
    async def get(self) -> None:
        await self.send_list("keys", services.list_keys)

    async def post(self) -> None:
        body = self.body()
        check_fields(body, KEY_CREATE_FIELDS, required=("name", "provider", "secret"))
        name = _required_str(body, "name")
        provider = _required_str(body, "provider")
        secret = _required_str(body, "secret")
        base_url, owner = _str(body, "base_url"), _str(body, "owner")
        available = _bool(body, "available_to_all")
        max_concurrent = _int(body, "max_concurrent")
        chat_only = _bool(body, "chat_only")
        settings = body.get("settings")
        if settings is not None and not isinstance(settings, dict):
            raise APIError(400, "settings must be an object (a cloud key's project, region ...)")
        gateway = self.gateway
        view = await self.run_service(
            lambda: services.add_key(
                name,
                provider,
                secret,
                gateway.keyring,
                base_url=base_url,
                owner_email=owner,
                available_to_all=True if available is None else available,
                max_concurrent=max_concurrent or 0,
                chat_only=bool(chat_only),
                settings=settings,
                **gateway.settings.upstream_rules,
                actor=self.principal,
            )
        )
        self.send(view.as_dict(), status=201)


class KeyHandler(APIHandler):
    async def patch(self, name: str) -> None:
        body = self.body()
        check_fields(body, KEY_CHANGE_FIELDS)
        available = _bool(body, "available_to_all")
        max_concurrent = _int(body, "max_concurrent")
        base_url = _str(body, "base_url")
        chat_only = _bool(body, "chat_only")
        secret, cloud_settings = _str(body, "secret"), body.get("settings")
        if cloud_settings is not None and not isinstance(cloud_settings, dict):
            raise APIError(400, "settings must be an object (a cloud key's project, region ...)")
        if cloud_settings is not None and secret is None:
            # Its cloud checks the settings against the secret, and a changed endpoint is
            # sent it: whoever changes them gives the secret (as keys rotate does).
            raise APIError(400, "settings are changed with the key's secret: give secret too")
        if secret is None and all(
            v is None for v in (available, max_concurrent, base_url, chat_only)
        ):
            raise APIError(
                400,
                "nothing to change: give available_to_all, max_concurrent, base_url, "
                "chat_only, or secret (with a cloud key's settings)",
            )
        changes = {
            "available_to_all": available,
            "max_concurrent": max_concurrent,
            "base_url": base_url,
            "chat_only": chat_only,
        }
        gateway, principal = self.gateway, self.principal
        view = await self.run_service(
            lambda: services.change_key(
                name,
                secret,
                gateway.keyring,
                settings=cloud_settings,
                changes=changes,
                rules=gateway.settings.upstream_rules,
                actor=principal,
            )
        )
        self.send(view.as_dict())


class KeyGrantsHandler(APIHandler):
    async def post(self, name: str) -> None:
        body = self.body()
        check_fields(body, GRANT_FIELDS, required=("users",))
        users = body.get("users")
        if not isinstance(users, list) or not users or not all(isinstance(u, str) for u in users):
            raise APIError(400, "users must be a non-empty list of emails")
        revoke = bool(_bool(body, "revoke"))
        holders = await self.run_service(
            lambda: services.grant_key(name, users, revoke=revoke, actor=self.principal)
        )
        self.send({"key": name, "granted_to": holders})


class UsersHandler(APIHandler):
    async def get(self) -> None:
        await self.send_list("users", services.list_users)


class UserHandler(APIHandler):
    async def patch(self, email: str) -> None:
        body = self.body()
        check_fields(body, USER_CHANGE_FIELDS)
        role, disabled = _str(body, "role"), _bool(body, "disabled")
        if role is None and disabled is None:
            raise APIError(400, "nothing to change: give role or disabled")
        view = await self.run_service(
            lambda: services.update_user(email, role=role, disabled=disabled, actor=self.principal)
        )
        self.send(view.as_dict())


class PolicyHandler(APIHandler):
    async def get(self) -> None:
        policy = await self.run_service(lambda: services.get_policy(actor=self.principal))
        self.send(policy.as_dict())

    async def patch(self) -> None:
        body = self.body()
        check_fields(body, POLICY_FIELDS)
        keys, routes, capture = (
            _bool(body, "allow_user_keys"),
            _bool(body, "allow_user_routes"),
            _bool(body, "capture_bodies"),
        )
        span_content = _bool(body, "span_content")
        subscription = _bool(body, "subscription_passthrough")
        retention = body.get("retention_days")
        if retention is not None and (
            isinstance(retention, bool) or not isinstance(retention, int)
        ):
            raise APIError(400, "retention_days must be an integer")
        patterns = body.get("redaction_patterns")
        if patterns is not None and (
            not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns)
        ):
            raise APIError(400, "redaction_patterns must be a list of strings")
        policy = await self.run_service(
            lambda: services.set_policy(
                allow_user_keys=keys,
                allow_user_routes=routes,
                capture_bodies=capture,
                span_content=span_content,
                subscription_passthrough=subscription,
                retention_days=retention,
                redaction_patterns=patterns,
                actor=self.principal,
            )
        )
        self.send(policy.as_dict())


class AuditHandler(APIHandler):
    async def get(self) -> None:
        before = self.get_query_argument("before", None)
        limit = int_arg(self.get_query_argument("limit", "100"), "limit")
        before_id = int_arg(before, "before") if before is not None else None
        events = await self.run_service(
            lambda: services.list_audit(before_id=before_id, limit=limit, actor=self.principal)
        )
        self.send(
            {
                "events": events,
                "next": str(events[-1]["id"]) if len(events) == max(1, min(limit, 500)) else None,
            }
        )


default_handlers = [
    (r"/api/v1/me", MeHandler),
    (r"/api/v1/routes", RoutesHandler),
    (r"/api/v1/routes/([^/]+)", RouteHandler),
    (r"/api/v1/resolve", ResolveHandler),
    (r"/api/v1/keys", KeysHandler),
    (r"/api/v1/keys/([^/]+)", KeyHandler),
    (r"/api/v1/keys/([^/]+)/grants", KeyGrantsHandler),
    (r"/api/v1/users", UsersHandler),
    (r"/api/v1/users/([^/]+)", UserHandler),
    (r"/api/v1/policy", PolicyHandler),
    (r"/api/v1/audit", AuditHandler),
]
