"""Routes: the names clients ask for, the key and upstream model behind each, their
fallbacks and state, and what a user's request for a name would resolve to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import peewee

from tvgate.identity import Principal
from tvgate.models import (
    GOVERN_ROUTE,
    ROLE_ADMIN,
    ROLE_MEMBER,
    SCOPE_ORG,
    SCOPE_OWNED,
    SCOPE_USER,
    KeyGrant,
    Org,
    ProviderKey,
    Route,
    User,
    database,
)
from tvgate.rows import fields_of, from_row
from tvgate.services.access import (
    Forbidden,
    NotFound,
    ServiceError,
    _actor_org,
    _changes,
    _check_name,
    _deny,
    _missing,
    _require_admin,
    _require_reader,
    audit,
    get_key,
    get_user,
)
from tvgate.services.events import announce
from tvgate.services.governance import _drop_rules_of
from tvgate.services.keys import _own_user

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
    #: Clients of the other provider's API are served by translation.
    translate: bool = True

    @classmethod
    def of(cls, route: Route, org: Org) -> RouteView:
        return from_row(
            cls,
            route,
            key=route.key.name,
            provider=route.key.provider,
            user=route.user.email if route.user is not None else None,
            fallbacks=route_fallbacks(route),
            state=route_state(route, org),
        )

    def as_dict(self) -> dict[str, Any]:
        return fields_of(self, fallbacks=list(self.fallbacks))


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
    translate: bool = True,
    actor: Principal | None = None,
) -> RouteView:
    """A route: org-wide, made by an admin for one user (``for_user``), or a user's own
    (``owner``). ``fallbacks`` are route names tried in order when its provider fails;
    ``translate`` False refuses clients of the other provider's API instead of translating."""
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
            translate=translate,
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
                "translate": translate,
            },
        )
    announce(org.id)
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
        owner = route.org_id if route is not None else None
        raise _missing(actor, action, str(route_id), f"no route {route_id}", owner)
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
    """Change a route's name, model, key, enabled flag, description, fallbacks or
    translation switch."""
    allowed = {"name", "upstream_model", "key", "enabled", "description", "fallbacks", "translate"}
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
    for flag in ("enabled", "translate"):
        if flag in changes:
            if not isinstance(changes[flag], bool):
                raise ServiceError(f"{flag} must be true or false")
            setattr(route, flag, changes[flag])
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
            audit(actor, route.org_id, "update route", route.name, _changes(before, after))
    except peewee.IntegrityError:
        raise ServiceError(
            f"there is already a route named {route.name!r} in this scope", 409
        ) from None
    announce(route.org_id)
    return RouteView.of(route, org)


def delete_route(route_id: int, *, actor: Principal | None = None) -> None:
    route = _editable_route(route_id, actor, "delete route")
    with database.atomic():
        route.delete_instance()
        audit(actor, route.org_id, "delete route", route.name, {"scope": route.scope})
        _drop_rules_of(actor, route.org_id, GOVERN_ROUTE, route.name)
    announce(route.org_id)


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
    principal = Principal.of(user, org)
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
