"""``tvgate routes``: add, change, list routes, and show the route a user would get."""

from __future__ import annotations

import argparse
from typing import Any

from tvgate import services
from tvgate.cli.common import Commands, command, group, print_listing
from tvgate.config import Settings


def cmd_routes_add(settings: Settings, args: argparse.Namespace) -> int:
    route = services.add_route(
        args.name,
        args.key,
        model=args.model or "",
        org_name=args.org,
        description=args.description,
        for_user=args.for_user,
        owner=args.owner,
        fallbacks=args.fallback,
        translate=not args.no_translate,
    )
    _print_route(route)
    return 0


def _print_route(route: services.RouteView) -> None:
    target = route.upstream_model or "(the requested name)"
    who = f" for {route.user}" if route.user else ""
    fallbacks = f", then {', '.join(route.fallbacks)}" if route.fallbacks else ""
    state = "" if route.state == services.ROUTE_ENABLED else f" ({route.state})"
    translate = "" if route.translate else ", translation off"
    print(
        f"{route.scope} route {route.name}{who} -> {route.provider} {target} with key "
        f"{route.key}{fallbacks}{translate}{state}"
    )


def cmd_routes_update(settings: Settings, args: argparse.Namespace) -> int:
    org = services.get_org(args.org)
    routes = [r for r in services.list_routes(org.name) if str(r.id) == args.route]
    if not routes:
        routes = [r for r in services.list_routes(org.name) if r.name == args.route]
    if not routes:
        raise services.NotFound(f"no route {args.route!r} in org {org.name!r}")
    if len(routes) > 1:
        ids = ", ".join(f"{r.id} ({r.scope}{' of ' + r.user if r.user else ''})" for r in routes)
        raise services.ServiceError(
            f"{len(routes)} routes are named {args.route!r}: give the id of one ({ids})"
        )
    changes: dict[str, Any] = {}
    if args.no_fallbacks:
        changes["fallbacks"] = []
    elif args.fallback is not None:
        changes["fallbacks"] = args.fallback
    if args.model is not None:
        changes["upstream_model"] = args.model
    if args.key is not None:
        changes["key"] = args.key
    if args.description is not None:
        changes["description"] = args.description
    if args.enabled is not None:
        changes["enabled"] = args.enabled == "on"
    if args.translate is not None:
        changes["translate"] = args.translate == "on"
    if not changes:
        raise services.ServiceError(
            "nothing to change: give --fallback, --no-fallbacks, --model, --key, "
            "--description, --enabled or --translate"
        )
    _print_route(services.update_route(routes[0].id, changes))
    return 0


def cmd_routes_list(settings: Settings, args: argparse.Namespace) -> int:
    # The ID column is what ``routes update`` takes when a name is not unique.
    print_listing(
        services.list_routes(args.org),
        ("ID", "NAME", "SCOPE", "USER", "KEY", "MODEL", "STATE", "FALLBACKS"),
        lambda route: (
            str(route.id),
            route.name,
            route.scope,
            route.user or "-",
            route.key,
            route.upstream_model or "(as requested)",
            route.state,
            ", ".join(route.fallbacks) or "-",
        ),
        empty="no routes",
    )
    return 0


def cmd_routes_resolve(settings: Settings, args: argparse.Namespace) -> int:
    found = services.resolve_route(args.name, args.user, args.org)
    if found.route is None:
        print(f"{found.user} gets no route for {found.name!r}: {found.reason}")
        print(f"routes {found.user} may use: {', '.join(found.available) or 'none'}")
        return 1
    route = found.route
    who = f" for {route.user}" if route.user else ""
    print(
        f"{found.user} asking for {found.name!r} gets the {route.scope} route {route.name!r}{who}: "
        f"{route.provider} model {found.upstream_model} with key {route.key}"
    )
    return 0


def register(commands: Commands) -> None:
    routes = group(commands, "routes", "manage routes")
    p = command(routes, "add", cmd_routes_add, "add a route (org-wide unless --for-user/--owner)")
    p.add_argument("name", help="the name tools ask for, or a glob such as claude-haiku-*")
    p.add_argument("--key", required=True)
    p.add_argument("--model", help="upstream model (default: the requested name)")
    p.add_argument("--org")
    p.add_argument("--description", default="")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--for-user", metavar="EMAIL", help="a route an admin makes for one user")
    scope.add_argument("--owner", metavar="EMAIL", help="a user's own route")
    p.add_argument(
        "--fallback",
        action="append",
        metavar="ROUTE",
        help="a route tried when this one's provider fails (repeat for more, in order)",
    )
    p.add_argument(
        "--no-translate",
        action="store_true",
        help="refuse clients of the other provider's API instead of translating their calls",
    )
    p = command(routes, "update", cmd_routes_update, "change a route (by id, or by name)")
    p.add_argument("route", help="the route's id (see routes list), or its name if unique")
    p.add_argument("--org")
    fallbacks = p.add_mutually_exclusive_group()
    fallbacks.add_argument(
        "--fallback",
        action="append",
        metavar="ROUTE",
        help="replace the fallbacks with these routes (repeat for more, in order)",
    )
    fallbacks.add_argument("--no-fallbacks", action="store_true", help="remove every fallback")
    p.add_argument("--model", help="upstream model (empty: the requested name)")
    p.add_argument("--key")
    p.add_argument("--description")
    p.add_argument("--enabled", choices=["on", "off"])
    p.add_argument(
        "--translate",
        choices=["on", "off"],
        help="serve clients of the other provider's API by translation, or refuse them",
    )
    p = command(routes, "list", cmd_routes_list, "list an org's routes")
    p.add_argument("--org")
    p = command(routes, "resolve", cmd_routes_resolve, "the route a user would get for a name")
    p.add_argument("name")
    p.add_argument("--user", required=True)
    p.add_argument("--org")
