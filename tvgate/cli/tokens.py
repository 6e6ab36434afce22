"""``tvgate tokens``: mint, list and revoke proxy tokens."""

from __future__ import annotations

import argparse
import time

from tvgate import services
from tvgate.cli.common import Commands, command, group
from tvgate.config import Settings


def cmd_tokens_issue(settings: Settings, args: argparse.Namespace) -> int:
    token, _row = services.issue_token(
        args.email, args.org, name=args.name or "", expires_days=args.expires_days
    )
    print(token)
    return 0


def cmd_tokens_list(settings: Settings, args: argparse.Namespace) -> int:
    for token in services.list_tokens(args.email, args.org):
        state = "revoked" if token.revoked_at else "active"
        expires = (
            time.strftime("%Y-%m-%d", time.gmtime(token.expires_at))
            if token.expires_at
            else "never"
        )
        print(f"{token.id}\t{token.prefix}…\t{token.name or '-'}\t{state}\texpires {expires}")
    return 0


def cmd_tokens_revoke(settings: Settings, args: argparse.Namespace) -> int:
    token = services.revoke_token(args.token_id)
    print(f"revoked token {token.id} ({token.prefix}…) of {token.user}")
    return 0


def register(commands: Commands) -> None:
    tokens = group(commands, "tokens", "manage proxy tokens")
    p = command(tokens, "issue", cmd_tokens_issue, "mint a proxy token and print it")
    p.add_argument("email")
    p.add_argument("--org")
    p.add_argument("--name")
    p.add_argument("--expires-days", type=float)
    p = command(
        tokens, "list", cmd_tokens_list, "list a user's tokens (never the tokens themselves)"
    )
    p.add_argument("email")
    p.add_argument("--org")
    p = command(tokens, "revoke", cmd_tokens_revoke, "revoke a token by its id")
    p.add_argument("token_id", type=int)
