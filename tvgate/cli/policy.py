"""``tvgate policy``: an org's switches (user keys, user routes, body capture, redaction,
Claude subscriptions)."""

from __future__ import annotations

import argparse
import json

from tvgate import services
from tvgate.cli.common import Commands, command, group, on_off
from tvgate.config import Settings


def cmd_policy_set(settings: Settings, args: argparse.Namespace) -> int:
    policy = services.set_policy(
        args.org,
        allow_user_keys=on_off(args.user_keys),
        allow_user_routes=on_off(args.user_routes),
        capture_bodies=on_off(args.capture_bodies),
        span_content=on_off(args.span_content),
        subscription_passthrough=on_off(args.subscription_passthrough),
        redaction_patterns=args.redaction_patterns,
    )
    print(json.dumps(policy.as_dict(), indent=2))
    return 0


def register(commands: Commands) -> None:
    policy = group(commands, "policy", "org switches")
    p = command(
        policy,
        "set",
        cmd_policy_set,
        "turn user keys, user routes, body capture on or off; set redaction patterns",
    )
    p.add_argument("--org", required=True)
    p.add_argument("--user-keys", choices=["on", "off"])
    p.add_argument("--user-routes", choices=["on", "off"])
    p.add_argument("--capture-bodies", choices=["on", "off"])
    p.add_argument(
        "--span-content",
        choices=["on", "off"],
        help="put the redacted prompt and answer in the calls' OpenTelemetry spans",
    )
    p.add_argument(
        "--subscription-passthrough",
        choices=["on", "off"],
        help="let members' own Claude subscriptions (Pro/Max) pass through to Anthropic",
    )
    p.add_argument(
        "--redaction-pattern",
        action="append",
        dest="redaction_patterns",
        metavar="RE2",
        help="replace the org's redaction patterns (repeat for several; RE2 syntax)",
    )
