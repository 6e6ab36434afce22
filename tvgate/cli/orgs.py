"""``tvgate orgs``: list orgs and link them to a Visdom Trace org or a JWT org."""

from __future__ import annotations

import argparse

from tvgate import services
from tvgate.cli.common import Commands, command, group
from tvgate.config import Settings


def cmd_orgs_list(settings: Settings, _args: argparse.Namespace) -> int:
    for org in services.list_orgs():
        visdom = org.visdom_org_id or "-"
        jwt = f"{org.jwt_issuer} {org.jwt_org}" if org.jwt_org else "-"
        print(f"{org.name}\tvisdom {visdom}\tjwt {jwt}")
    return 0


def cmd_orgs_link(settings: Settings, args: argparse.Namespace) -> int:
    org = services.link_org(
        args.name,
        visdom_org_id=args.visdom_org_id,
        jwt_org=args.jwt_org,
        jwt_issuer=args.jwt_issuer or settings.jwt_issuer,
    )
    if args.visdom_org_id is not None:
        print(f"org {org.name} is linked to Visdom Trace org {org.visdom_org_id}")
    else:
        print(f"org {org.name} is linked to JWT org {org.jwt_org!r} of issuer {org.jwt_issuer}")
    return 0


def register(commands: Commands) -> None:
    org_commands = group(commands, "orgs", "orgs and the outside orgs they are linked to")
    command(org_commands, "list", cmd_orgs_list, "list orgs and their links")
    p = command(
        org_commands, "link", cmd_orgs_link, "link an org to a Visdom Trace org or a JWT org"
    )
    p.add_argument("name", help="the tvgate org")
    outside = p.add_mutually_exclusive_group(required=True)
    outside.add_argument("--visdom-org-id", metavar="ID", help="the Visdom Trace org's id")
    outside.add_argument("--jwt-org", metavar="VALUE", help="the JWT org claim's value")
    p.add_argument(
        "--jwt-issuer", metavar="ISS", help="the JWT org's issuer (default: the jwt_issuer setting)"
    )
