"""What the command groups share: opening the database (never creating it), the
subcommand helper, and printing tables and listings for people (or JSON for scripts)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tvgate import services
from tvgate.config import Settings
from tvgate.db import DatabaseMissing, migrate, open_database

T = TypeVar("T")

DATA_DIR_HELP = (
    "the data directory (default: $TVGATE_DATA_DIR, the config file's data_dir, ./data, "
    "or data/ of the tvgate checkout the command runs in)"
)


def open_db(settings: Settings, *, create: bool = False) -> None:
    """Open and migrate the database; one that is not there is refused, saying where it
    was looked for and how to name the right one (only serve and migrate create it)."""
    try:
        db = open_database(settings.resolved_database_url, create=create)
    except DatabaseMissing as exc:
        where = (
            "check database_url (TVGATE_DATABASE_URL)"
            if settings.database_url
            else "give the gateway's data directory with --data-dir DIR or TVGATE_DATA_DIR"
        )
        raise services.ServiceError(
            f"no database at {exc.path}; {where} (tvgate migrate creates a new one)"
        ) from None
    migrate(db)


def on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


#: The subparsers of a command group, which its ``register`` adds commands to.
Commands = argparse._SubParsersAction
#: A command's handler: the settings and the parsed arguments in, the exit code out.
Handler = Callable[[Settings, argparse.Namespace], int]


def group(commands: Commands, name: str, help_: str) -> Commands:
    """A command group (``tvgate NAME ...``), whose subcommands are added to what it returns."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_)
    return parser.add_subparsers(required=True)


def command(
    parent: Any, name: str, handler: Handler, help_: str, *, opens_database: bool = True
) -> argparse.ArgumentParser:
    """A subcommand of ``parent`` that runs ``handler``, after :func:`open_db` unless it
    does not work on the database (``opens_database=False``: Vault, or serve and
    migrate, which create it)."""
    sub: argparse.ArgumentParser = parent.add_parser(name, help=help_)
    sub.set_defaults(handler=handler, opens_database=opens_database)
    # Also after the command (``tvgate routes list --data-dir DIR``); SUPPRESS keeps
    # the value given before the command when it is not repeated here.
    sub.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS, help=DATA_DIR_HELP)
    return sub


def print_listing(
    items: Sequence[T],
    header: tuple[str, ...],
    row: Callable[[T], tuple[str, ...]],
    *,
    as_json: bool = False,
    json_of: Callable[[T], object] = lambda item: item,
    empty: str = "",
) -> None:
    """A list command's output: with ``as_json`` (``--json``), a JSON array of ``json_of``
    each item, for scripts; else ``empty`` when there are none (if set), or a table under
    ``header`` with a row per item (its ID column first where a later command takes it)."""
    if as_json:
        print(json.dumps([json_of(item) for item in items], indent=2))
    elif not items and empty:
        print(empty)
    else:
        table([header, *map(row, items)])
