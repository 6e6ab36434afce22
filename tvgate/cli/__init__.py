"""The ``tvgate`` command: serve, migrate, and manage orgs, users, tokens, keys, routes and prices.

Management commands work on the database directly, as an operator, through
the same services as the API. Their output is meant for people, except where
a script needs one value (``tokens issue`` prints the token and nothing else)
or asks for ``--json``. They never create a database (only ``serve`` and
``migrate`` do), and log warnings only, as plain text; ``serve`` logs JSON lines.

Each command group is a module of this package with its handlers and the
``register`` that adds its commands to the parser; this module builds the
parser from them and holds :func:`main`, the console script.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from tvgate import __version__, services
from tvgate.cli import (
    governance,
    keys,
    orgs,
    policy,
    prices,
    routes,
    serve,
    tokens,
    traces,
    users,
    vault,
    visdom,
)
from tvgate.cli.common import DATA_DIR_HELP, open_db
from tvgate.cli.logs import setup_logging
from tvgate.config import ConfigError, load_settings, unknown_environment, validate
from tvgate.keyring import KeyringError, KeyringUnavailable, vault_admin

#: The command groups in the order ``tvgate --help`` lists them.
GROUPS = (
    serve,
    users,
    orgs,
    tokens,
    keys,
    vault,
    policy,
    traces,
    visdom,
    routes,
    governance,
    prices,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvgate", description="tvgate, the LLM gateway")
    parser.add_argument("--config", help="TOML settings file (default: $TVGATE_CONFIG)")
    parser.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    parser.add_argument("--version", action="version", version=f"tvgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.data_dir is not None:
            settings = dataclasses.replace(settings, data_dir=args.data_dir)
            validate(settings)
        setup_logging(settings.log_level, serving=args.command == "serve")
        for warning in unknown_environment():
            logging.getLogger("tvgate").warning("%s", warning)
        started = time.monotonic()
        if args.opens_database:
            open_db(settings)
        code: int = args.handler(settings, args)
        logging.getLogger("tvgate").debug("%s took %.3fs", args.command, time.monotonic() - started)
        return code
    except BrokenPipeError:
        # The reader went away (``tvgate traces export | head``): stop quietly, as cat
        # does. Python would flush stdout once more at exit and print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ConfigError as exc:
        print(f"tvgate: configuration: {exc}", file=sys.stderr)
        return 2
    except services.ServiceError as exc:
        print(f"tvgate: {exc}", file=sys.stderr)
        return 1
    except (KeyringError, KeyringUnavailable, vault_admin.VaultAdminError) as exc:
        # Their messages never carry a secret or a token.
        print(f"tvgate: key store: {exc}", file=sys.stderr)
        return 1
