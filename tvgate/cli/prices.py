"""``tvgate prices``: USD per million tokens, the default table and orgs' own."""

from __future__ import annotations

import argparse
import json

from tvgate import services
from tvgate.cli.common import Commands, command, group, print_listing
from tvgate.config import Settings


def cmd_prices_set(settings: Settings, args: argparse.Namespace) -> int:
    price = services.set_price(
        args.model,
        {
            "input_per_mtok": args.input,
            "output_per_mtok": args.output,
            "cache_read_per_mtok": args.cache_read,
            "cache_write_per_mtok": args.cache_write,
        },
        org_name=args.org,
    )
    print(json.dumps(price, indent=2))
    return 0


def cmd_prices_list(settings: Settings, args: argparse.Namespace) -> int:
    print_listing(
        services.list_prices(args.org, default_table=args.org is None),
        ("MODEL", "SET BY", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE"),
        lambda p: (
            p["model"],
            p["org"] or "default",
            *(f"{p[name]:g}" for name in services.PRICE_FIELDS),
        ),
        as_json=args.json,
    )
    return 0


def cmd_prices_delete(settings: Settings, args: argparse.Namespace) -> int:
    services.delete_price(args.model, org_name=args.org)
    print(f"deleted the price of {args.model} of org {args.org}; the default applies")
    return 0


def register(commands: Commands) -> None:
    prices = group(commands, "prices", "USD per million tokens: the default table, and orgs' own")
    p = command(
        prices, "set", cmd_prices_set, "set a model's price (the default table without --org)"
    )
    p.add_argument("model", help="an exact model name or a glob such as claude-sonnet-4*")
    p.add_argument("--org", help="an org's own price, which wins over the default for it")
    p.add_argument("--input", type=float, required=True, metavar="USD")
    p.add_argument("--output", type=float, required=True, metavar="USD")
    p.add_argument("--cache-read", type=float, default=0.0, metavar="USD")
    p.add_argument("--cache-write", type=float, default=0.0, metavar="USD")
    p = command(prices, "list", cmd_prices_list, "the default table, or what an org pays (--org)")
    p.add_argument("--org")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(prices, "delete", cmd_prices_delete, "remove an org's own price of a model")
    p.add_argument("model")
    p.add_argument("--org", required=True)
