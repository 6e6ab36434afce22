"""``tvgate budgets`` and ``tvgate limits``: caps on tokens or cost per UTC day or month,
and requests and tokens per minute, of the org, a user, a route or a key."""

from __future__ import annotations

import argparse

from tvgate import services
from tvgate.cli.common import Commands, command, group, print_listing, when
from tvgate.config import Settings


def _subject(args: argparse.Namespace) -> tuple[str, str | None]:
    """The scope and subject a budgets or limits command names (the org by default)."""
    for scope in ("user", "route", "key"):
        value = getattr(args, scope, None)
        if value is not None:
            return scope, value
    return "org", None


def _amount(value: float, metric: str) -> str:
    return f"${value:,.2f}" if metric == "usd" else f"{value:,.0f} tokens"


def cmd_budgets_set(settings: Settings, args: argparse.Namespace) -> int:
    scope, subject = _subject(args)
    metric, period, amount = next(
        (metric, period, value)
        for (metric, period), value in (
            (("tokens", "day"), args.tokens_per_day),
            (("tokens", "month"), args.tokens_per_month),
            (("usd", "day"), args.usd_per_day),
            (("usd", "month"), args.usd_per_month),
        )
        if value is not None
    )
    budget = services.set_budget(
        args.org,
        scope=scope,
        subject=subject,
        metric=metric,
        period=period,
        amount=amount,
        warn_percent=args.warn_percent,
    )
    who = f"{scope} {budget.subject}" if budget.subject else scope
    print(
        f"budget {budget.id}: {who}, {_amount(budget.amount, metric)} per {period} "
        f"(warn at {budget.warn_percent:g}%); used {_amount(budget.used, metric)} so far"
    )
    return 0


def cmd_budgets_list(settings: Settings, args: argparse.Namespace) -> int:
    print_listing(
        services.list_budgets(args.org),
        ("ID", "SCOPE", "SUBJECT", "PER", "AMOUNT", "USED", "USED %", "STATE", "RESETS (UTC)"),
        _budget_row,
        as_json=args.json,
        json_of=services.BudgetView.as_dict,
        empty="no budgets",
    )
    return 0


def _budget_row(b: services.BudgetView) -> tuple[str, ...]:
    return (
        str(b.id),
        b.scope,
        b.subject or "-",
        b.period,
        _amount(b.amount, b.metric),
        _amount(b.used, b.metric),
        f"{b.percent:g}%",
        b.state,
        when(b.resets_at),
    )


def cmd_budgets_delete(settings: Settings, args: argparse.Namespace) -> int:
    services.delete_budget(args.budget_id, org_name=args.org)
    print(f"deleted budget {args.budget_id}")
    return 0


def cmd_limits_set(settings: Settings, args: argparse.Namespace) -> int:
    if args.rpm is None and args.tpm is None:
        raise services.ServiceError(
            "give --rpm and/or --tpm (to remove a limit: tvgate limits delete)"
        )
    scope, subject = _subject(args)
    limit = services.set_rate_limit(
        args.org, scope=scope, subject=subject, rpm=args.rpm, tpm=args.tpm
    )
    assert limit is not None
    who = f"{scope} {limit.subject}" if limit.subject else scope
    rpm = f"{limit.rpm} requests" if limit.rpm is not None else "any number of requests"
    tpm = f"{limit.tpm} tokens" if limit.tpm is not None else "any number of tokens"
    print(f"limit {limit.id}: {who}, {rpm} and {tpm} per minute")
    return 0


def cmd_limits_list(settings: Settings, args: argparse.Namespace) -> int:
    print_listing(
        services.list_rate_limits(args.org),
        ("ID", "SCOPE", "SUBJECT", "RPM", "TPM", "REQUESTS THIS MINUTE", "TOKENS THIS MINUTE"),
        _limit_row,
        as_json=args.json,
        json_of=services.RateLimitView.as_dict,
        empty="no rate limits",
    )
    return 0


def _limit_row(r: services.RateLimitView) -> tuple[str, ...]:
    return (
        str(r.id),
        r.scope,
        r.subject or "-",
        str(r.rpm) if r.rpm is not None else "-",
        str(r.tpm) if r.tpm is not None else "-",
        f"{int(r.used_requests):,}",
        f"{int(r.used_tokens):,}",
    )


def cmd_limits_delete(settings: Settings, args: argparse.Namespace) -> int:
    services.delete_rate_limit(args.limit_id, org_name=args.org)
    print(f"deleted rate limit {args.limit_id}")
    return 0


def register(commands: Commands) -> None:
    budgets = group(commands, "budgets", "caps on tokens or cost per UTC day or month")
    p = command(
        budgets, "set", cmd_budgets_set, "set the budget of the org, a user, a route or a key"
    )
    p.add_argument("--org", required=True)
    subject = p.add_mutually_exclusive_group()
    subject.add_argument("--user", metavar="EMAIL")
    subject.add_argument("--route", metavar="NAME")
    subject.add_argument("--key", metavar="NAME")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--tokens-per-day", type=int, metavar="N")
    amount.add_argument("--tokens-per-month", type=int, metavar="N")
    amount.add_argument("--usd-per-day", type=float, metavar="X")
    amount.add_argument("--usd-per-month", type=float, metavar="X")
    p.add_argument(
        "--warn-percent",
        type=float,
        default=80.0,
        metavar="P",
        help="answers carry a warning header from this share of the budget (default 80)",
    )
    p = command(budgets, "list", cmd_budgets_list, "list budgets with this day's or month's use")
    p.add_argument("--org")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(budgets, "delete", cmd_budgets_delete, "delete a budget by its id")
    p.add_argument("--org")
    p.add_argument("budget_id", type=int)

    limits = group(commands, "limits", "requests and tokens per minute")
    p = command(limits, "set", cmd_limits_set, "set the rate limit of the org, a user or a route")
    p.add_argument("--org", required=True)
    subject = p.add_mutually_exclusive_group()
    subject.add_argument("--user", metavar="EMAIL")
    subject.add_argument("--route", metavar="NAME")
    p.add_argument("--rpm", type=int, metavar="N", help="requests per minute (unset: no limit)")
    p.add_argument("--tpm", type=int, metavar="N", help="tokens per minute (unset: no limit)")
    p = command(limits, "list", cmd_limits_list, "list rate limits with this minute's use")
    p.add_argument("--org")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(limits, "delete", cmd_limits_delete, "delete a rate limit by its id")
    p.add_argument("--org")
    p.add_argument("limit_id", type=int)
