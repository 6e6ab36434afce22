"""The ``tvgate`` command: serve, migrate, and manage users, tokens, keys and routes.

Management commands work on the database directly, as an operator, through
the same services as the API. Their output is meant for people, except where
a script needs one value (``tokens issue`` prints the token and nothing else).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tvgate import __version__, services
from tvgate.config import ConfigError, Settings, load_settings, validate
from tvgate.db import migrate, open_database
from tvgate.keyring import build_keyring


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Messages never carry secrets or prompt bodies."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python warnings would otherwise be printed as plain text, breaking one-JSON-per-line.
    logging.captureWarnings(True)
    # At debug, Tornado turns on curl's verbose trace, which logs the upstream request
    # headers (the provider key) and body (the prompt). Never let it: pin that logger.
    logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)


def _open(settings: Settings) -> None:
    db = open_database(settings.resolved_database_url)
    migrate(db)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from tvgate.models import database
    from tvgate.server import run

    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
        settings = dataclasses.replace(settings, **overrides)
        validate(settings)
    _open(settings)
    # Before any fork: a keyring that cannot be built fails here once, not in every worker,
    # and the local keyring's master key file is created by one process only.
    build_keyring(settings)
    first = services.bootstrap_if_empty()
    if first is not None:
        print(
            f"tvgate: first start, created org {first.org!r} and admin {first.email}\n"
            f"  base URL: {settings.base_url}\n"
            f"  admin proxy token (shown once, keep it): {first.token}",
            flush=True,
        )
    # Workers are forked from this process: none may inherit its database connection.
    database.close()
    return run(settings, args.config, overrides)


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    db = open_database(settings.resolved_database_url)
    applied = migrate(db)
    print(f"applied migrations: {applied}" if applied else "database is up to date")
    return 0


def cmd_users_add(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    user = services.add_user(args.email, args.org, admin=args.admin)
    print(f"user {user.email} ({user.role}) in org {user.org.name}")
    return 0


def cmd_tokens_issue(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    token, _row = services.issue_token(
        args.email, args.org, name=args.name or "", expires_days=args.expires_days
    )
    print(token)
    return 0


def cmd_keys_add(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    secret = sys.stdin.readline().strip()
    if not secret:
        raise services.ServiceError("give the key's secret on standard input")
    view = services.add_key(
        args.name,
        args.provider,
        secret,
        build_keyring(settings),
        org_name=args.org,
        base_url=args.base_url,
        allow_private=settings.allow_private_upstreams,
    )
    print(json.dumps(view.as_dict(), indent=2))
    return 0


def cmd_routes_add(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    route = services.add_route(
        args.name, args.key, model=args.model or "", org_name=args.org, description=args.description
    )
    target = route.upstream_model or "(the requested name)"
    print(f"route {route.name} -> {route.key.provider} {target} with key {route.key.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvgate", description="tvgate, the LLM gateway")
    parser.add_argument("--config", help="TOML settings file (default: $TVGATE_CONFIG)")
    parser.add_argument("--version", action="version", version=f"tvgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        parent: Any, name: str, handler: Callable[[Settings, argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_)
        sub.set_defaults(handler=handler)
        return sub

    p = command(commands, "serve", cmd_serve, "run the gateway")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes on the one port (default: the workers setting; 0: one per core)",
    )
    command(commands, "migrate", cmd_migrate, "bring the database schema up to date")

    users = commands.add_parser("users", help="manage users").add_subparsers(required=True)
    p = command(users, "add", cmd_users_add, "add a user (creates the org if missing)")
    p.add_argument("email")
    p.add_argument("--org", required=True)
    p.add_argument("--admin", action="store_true")

    tokens = commands.add_parser("tokens", help="manage proxy tokens").add_subparsers(required=True)
    p = command(tokens, "issue", cmd_tokens_issue, "mint a proxy token and print it")
    p.add_argument("email")
    p.add_argument("--org")
    p.add_argument("--name")
    p.add_argument("--expires-days", type=float)

    keys = commands.add_parser("keys", help="manage provider keys").add_subparsers(required=True)
    p = command(keys, "add", cmd_keys_add, "add a key; the secret is read from standard input")
    p.add_argument("name")
    p.add_argument("--provider", required=True, choices=["anthropic", "openai"])
    p.add_argument("--base-url")
    p.add_argument("--org")

    routes = commands.add_parser("routes", help="manage routes").add_subparsers(required=True)
    p = command(routes, "add", cmd_routes_add, "add an org route")
    p.add_argument("name")
    p.add_argument("--key", required=True)
    p.add_argument("--model", help="upstream model (default: the requested name)")
    p.add_argument("--org")
    p.add_argument("--description", default="")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        setup_logging(settings.log_level)
        started = time.monotonic()
        code: int = args.handler(settings, args)
        logging.getLogger("tvgate").debug("%s took %.3fs", args.command, time.monotonic() - started)
        return code
    except ConfigError as exc:
        print(f"tvgate: configuration: {exc}", file=sys.stderr)
        return 2
    except services.ServiceError as exc:
        print(f"tvgate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
