"""``tvgate users``: add users, list an org's, change a role or disable one."""

from __future__ import annotations

import argparse
import sys

from tvgate import services
from tvgate.cli.common import Commands, command, group, on_off, print_listing
from tvgate.config import Settings
from tvgate.models import ROLES


def cmd_users_add(settings: Settings, args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    user = services.add_user(args.email, args.org, admin=args.admin, password=password)
    print(f"user {user.email} ({user.role}) in org {user.org.name}")
    return 0


def cmd_users_list(settings: Settings, args: argparse.Namespace) -> int:
    print_listing(
        services.list_users(args.org),
        ("EMAIL", "ROLE", "STATE"),
        lambda user: (user.email, user.role, "disabled" if user.disabled else "active"),
    )
    return 0


def cmd_users_set(settings: Settings, args: argparse.Namespace) -> int:
    user = services.update_user(
        args.email, role=args.role, disabled=on_off(args.disabled), org_name=args.org
    )
    print(f"user {user.email}: {user.role}, {'disabled' if user.disabled else 'active'}")
    return 0


def register(commands: Commands) -> None:
    users = group(commands, "users", "manage users")
    p = command(users, "add", cmd_users_add, "add a user (creates the org if missing)")
    p.add_argument("email")
    p.add_argument("--org", required=True)
    p.add_argument("--admin", action="store_true")
    p.add_argument(
        "--password-stdin", action="store_true", help="read a password for a local user from stdin"
    )
    p = command(users, "list", cmd_users_list, "list the users of an org")
    p.add_argument("--org")
    p = command(users, "set", cmd_users_set, "change a user's role, or disable them")
    p.add_argument("email")
    p.add_argument("--org")
    p.add_argument("--role", choices=ROLES)
    p.add_argument("--disabled", choices=["on", "off"])
