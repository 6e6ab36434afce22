"""``tvgate traces``: export traces as JSON lines, purge those past retention."""

from __future__ import annotations

import argparse
import sys

import orjson

from tvgate import services
from tvgate.cli.common import Commands, command, group
from tvgate.config import Settings


def cmd_traces_export(settings: Settings, args: argparse.Namespace) -> int:
    """Stream traces as JSON lines to stdout, oldest first, a page at a time."""
    since = services.parse_time(args.since)
    until = services.parse_time(args.until) if args.until else None
    out = sys.stdout.buffer
    for document in services.export_traces(args.org, since, until, bodies=args.bodies):
        out.write(orjson.dumps(document) + b"\n")
    out.flush()
    return 0


def cmd_traces_purge(settings: Settings, _args: argparse.Namespace) -> int:
    from tvgate.traces.retention import purge_all

    for org, purged in purge_all().items():
        print(f"{org}: {purged.traces} traces and {purged.blobs} blobs past retention deleted")
    return 0


def register(commands: Commands) -> None:
    traces = group(commands, "traces", "read and keep traces")
    p = command(traces, "export", cmd_traces_export, "stream traces as JSON lines")
    p.add_argument("--since", required=True, help="epoch seconds or ISO 8601")
    p.add_argument("--until")
    p.add_argument("--org")
    p.add_argument("--bodies", action="store_true", help="include requests and answers")
    command(traces, "purge", cmd_traces_purge, "delete traces past each org's retention now")
