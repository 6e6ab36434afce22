"""``tvgate visdom``: push an org's traces to Visdom Trace (connect, with the org ingest
key read from standard input and never printed), see the delivery, disconnect."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tvgate import services
from tvgate.cli.common import Commands, command, group, table, when
from tvgate.config import Settings
from tvgate.keyring import build_keyring


def cmd_visdom_connect(settings: Settings, args: argparse.Namespace) -> int:
    if not args.key_stdin:
        raise services.ServiceError("give the org ingest key on standard input (--key-stdin)")
    key = sys.stdin.readline().strip()
    if not key:
        raise services.ServiceError("give the org ingest key (tvk_…) on standard input")
    status = services.connect_visdom(
        args.url,
        key,
        build_keyring(settings),
        org_name=args.org,
        project=args.project or "",
        legacy_slug=args.legacy_org_slug or "",
        allow_private=settings.allow_private_upstreams,
    )
    print(f"org {status.org} sends its traces to Visdom Trace at {status.url}")
    _print_status(status, as_json=args.json)
    return 0


def cmd_visdom_status(settings: Settings, args: argparse.Namespace) -> int:
    status = services.visdom_status(org_name=args.org)
    _print_status(status, as_json=args.json)
    return 0 if not status.parked_count else 1


def _print_status(status: services.VisdomStatus, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status.as_dict(), indent=2, ensure_ascii=False))
        return
    if not status.connected:
        print(f"org {status.org} is not connected to Visdom Trace")
        return
    table(
        [
            ("  url", status.url),
            ("  project", status.project or "-"),
            ("  legacy org slug", status.legacy_slug or "-"),
            ("  ingest key ends in", status.key),
            ("  events sent", str(status.sent)),
            ("    with users' own credentials", str(status.sent_with_user_credential)),
            ("    with the org ingest key", str(status.sent_with_org_key)),
            ("  users' credentials held", str(status.user_credentials)),
            ("  last sent (UTC)", when(status.last_sent_at) if status.last_sent_at else "never"),
            ("  waiting", str(status.pending - status.parked_count)),
            ("  parked", str(status.parked_count)),
            ("  open sessions", str(status.open_sessions)),
            ("  last error", status.last_error or "-"),
        ]
    )
    print(f"  waits for calls ended before: {_waiting_for(status.waiting_for)}")
    for parked in status.parked:
        print(
            f"  parked event {parked['id']} ({parked['event_type']}, session "
            f"{parked['session_id']}): {parked['error']}"
        )
    if status.parked_count:
        print("  fix what Visdom Trace refused, then run visdom connect again to retry them")


def _waiting_for(marks: list[dict[str, object]]) -> str:
    """The lowest live watermark: how far behind, and whose (the order waits for it)."""
    if not marks:
        return "nothing (no trace writer is running)"
    first = marks[0]
    upto, writer = float(str(first["upto"])), first["writer"]
    behind = max(0.0, time.time() - upto)
    return f"{behind:.1f}s ago, trace writer {writer} ({len(marks)} live)"


def cmd_visdom_disconnect(settings: Settings, args: argparse.Namespace) -> int:
    dropped = services.disconnect_visdom(org_name=args.org)
    print(f"org {args.org or 'the org'} no longer sends traces to Visdom Trace")
    if dropped:
        print(f"{dropped} events not yet delivered were dropped", file=sys.stderr)
    return 0


def register(commands: Commands) -> None:
    visdom = group(commands, "visdom", "send an org's traces to Visdom Trace")
    p = command(
        visdom,
        "connect",
        cmd_visdom_connect,
        "push the org's traces to Visdom Trace; the org ingest key (tvk_…) from stdin",
    )
    p.add_argument("--org")
    p.add_argument("--url", required=True, help="the Visdom Trace server")
    p.add_argument("--project", help="project for sessions without a repo (x-tracevault-repo)")
    p.add_argument(
        "--legacy-org-slug",
        metavar="SLUG",
        help="a multi-org server: POST to /api/v1/orgs/SLUG/repos/{repo}/stream",
    )
    p.add_argument("--key-stdin", action="store_true", help="read the ingest key from stdin")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(visdom, "status", cmd_visdom_status, "what was sent, what waits, what is parked")
    p.add_argument("--org")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(visdom, "disconnect", cmd_visdom_disconnect, "stop sending the org's traces")
    p.add_argument("--org")
