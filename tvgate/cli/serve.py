"""``tvgate serve`` and ``tvgate migrate``: run the gateway, bring the schema up to date."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from tvgate import services
from tvgate.cli.common import Commands, command, open_db
from tvgate.config import Settings, validate
from tvgate.db import migrate, open_database
from tvgate.keyring import build_keyring


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from tvgate.listeners import ListenError, bind_listeners, bound_settings, write_port_file
    from tvgate.models import database
    from tvgate.server import cookie_secret, run

    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.data_dir is not None:
        # Workers and a SIGHUP reload read the settings again: the option must stay.
        overrides["data_dir"] = args.data_dir
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
        validate(settings)
    # First of all: a second serve on a taken address stops here, before it creates a
    # database or prints a first admin's token for it.
    try:
        listeners = bind_listeners(settings)
    except ListenError as exc:
        print(f"tvgate: {exc}", file=sys.stderr)
        return 1
    if not settings.port:
        # The workers and a reload read the settings again: they keep the bound port.
        settings = bound_settings(settings, listeners)
        overrides["listen"] = settings.listen
    if args.port_file:
        write_port_file(args.port_file, settings.port)
    open_db(settings, create=True)
    # Before any fork: a keyring that cannot be built fails here once, not in every worker,
    # and the master key and cookie secret files are created by one process only.
    build_keyring(settings)
    cookie_secret(settings)
    first = services.bootstrap_if_empty()
    if first is not None:
        print(
            f"tvgate: first start, created org {first.org!r} and admin {first.email}\n"
            f"  base URL: {settings.base_url}\n"
            f"  admin proxy token (shown once, keep it): {first.token}\n"
            f"  another token for this admin: tvgate tokens issue {first.email}",
            flush=True,
        )
    # Workers are forked from this process: none may inherit its database connection.
    database.close()
    return run(settings, listeners, args.config, overrides)


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    db = open_database(settings.resolved_database_url)
    applied = migrate(db)
    print(
        f"applied migrations {', '.join(map(str, applied))}"
        if applied
        else "database is up to date"
    )
    return 0


def register(commands: Commands) -> None:
    p = command(commands, "serve", cmd_serve, "run the gateway", opens_database=False)
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes on the one port (default: the workers setting; 0: one per core)",
    )
    p.add_argument(
        "--port-file",
        help="write the port listened on to this file once bound (for listen port 0)",
    )
    command(
        commands,
        "migrate",
        cmd_migrate,
        "bring the database schema up to date",
        opens_database=False,
    )
