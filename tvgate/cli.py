"""The ``tvgate`` command: serve, migrate, and manage orgs, users, tokens, keys, routes and prices.

Management commands work on the database directly, as an operator, through
the same services as the API. Their output is meant for people, except where
a script needs one value (``tokens issue`` prints the token and nothing else)
or asks for ``--json``. They never create a database (only ``serve`` and
``migrate`` do), and log warnings only, as plain text; ``serve`` logs JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hvac
import orjson

from tvgate import __version__, services
from tvgate.config import ConfigError, Settings, load_settings, unknown_environment, validate
from tvgate.db import DatabaseMissing, migrate, open_database
from tvgate.keyring import Keyring, KeyringError, KeyringUnavailable, build_keyring, vault_admin
from tvgate.keyring.local import LocalKeyring
from tvgate.keyring.vault import VaultKeyring
from tvgate.logformat import JsonFormatter


def setup_logging(level: str, *, serving: bool) -> None:
    """JSON lines at ``level`` for ``serve``; plain text for the other commands, whose
    output a person reads: warnings and errors only, unless debug is asked for."""
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    if serving:
        handler.setFormatter(JsonFormatter())
        root.setLevel(level.upper())
    else:
        handler.setFormatter(logging.Formatter("tvgate: %(levelname)s: %(message)s"))
        root.setLevel(
            logging.DEBUG if level.lower() == "debug" else max(logging.WARNING, _level(level))
        )
    root.handlers[:] = [handler]
    # Python warnings would otherwise be printed as plain text, breaking one-JSON-per-line.
    logging.captureWarnings(True)
    # At debug, Tornado turns on curl's verbose trace, which logs the upstream request
    # headers (the provider key) and body (the prompt). Never let it: pin that logger.
    logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.INFO


def _open(settings: Settings, *, create: bool = False) -> None:
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


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from tvgate.models import database
    from tvgate.server import ListenError, bind_listeners, cookie_secret, run

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
    _open(settings, create=True)
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


def cmd_users_add(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    user = services.add_user(args.email, args.org, admin=args.admin, password=password)
    print(f"user {user.email} ({user.role}) in org {user.org.name}")
    return 0


def cmd_orgs_list(settings: Settings, _args: argparse.Namespace) -> int:
    _open(settings)
    for org in services.list_orgs():
        visdom = org.visdom_org_id or "-"
        jwt = f"{org.jwt_issuer} {org.jwt_org}" if org.jwt_org else "-"
        print(f"{org.name}\tvisdom {visdom}\tjwt {jwt}")
    return 0


def cmd_orgs_link(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    org = services.link_org(
        args.name,
        visdom_org_id=args.visdom_org_id,
        jwt_org=args.jwt_org,
        jwt_issuer=args.jwt_issuer or settings.jwt_issuer,
    )
    if args.visdom_org_id is not None:
        print(f"org {org.name} is linked to Visdom Trace org {org.visdom_org_id}")
    else:
        print(f"org {org.name} is linked to JWT org {org.jwt_org!r} of issuer {org.jwt_issuer}")
    return 0


def cmd_tokens_issue(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    token, _row = services.issue_token(
        args.email, args.org, name=args.name or "", expires_days=args.expires_days
    )
    print(token)
    return 0


def cmd_tokens_list(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
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
    _open(settings)
    token = services.revoke_token(args.token_id)
    print(f"revoked token {token.id} ({token.prefix}…) of {token.user}")
    return 0


def cmd_traces_export(settings: Settings, args: argparse.Namespace) -> int:
    """Stream traces as JSON lines to stdout, oldest first, a page at a time."""
    _open(settings)
    since = services.parse_time(args.since)
    until = services.parse_time(args.until) if args.until else None
    out = sys.stdout.buffer
    for document in services.export_traces(args.org, since, until, bodies=args.bodies):
        out.write(orjson.dumps(document) + b"\n")
    out.flush()
    return 0


def cmd_traces_purge(settings: Settings, _args: argparse.Namespace) -> int:
    from tvgate.traces.retention import purge_all

    _open(settings)
    for org, purged in purge_all().items():
        print(f"{org}: {purged.traces} traces and {purged.blobs} blobs past retention deleted")
    return 0


def cmd_keys_add(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    secret = _read_secret()
    view = services.add_key(
        args.name,
        args.provider,
        secret,
        build_keyring(settings),
        org_name=args.org,
        base_url=args.base_url,
        owner_email=args.owner,
        available_to_all=not args.granted_only,
        max_concurrent=args.max_concurrent,
        allow_private=settings.allow_private_upstreams,
        allow_private_user=settings.allow_private_user_upstreams,
        gateway_urls=settings.gateway_urls,
    )
    _print_key(view, "added", as_json=args.json)
    return 0


def _print_key(view: services.KeyView, done: str, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(view.as_dict(), indent=2, ensure_ascii=False))
        return
    shown = view.as_dict()
    print(f"{done} key {view.name} ({view.provider})")
    _table(
        [
            ("  base URL", view.base_url),
            ("  secret ends in", shown["fingerprint"]),
            ("  owner", view.owner or "the org"),
            ("  state", "disabled" if view.disabled else "enabled"),
            ("  max calls at once", str(view.max_concurrent or "no cap")),
            ("  created (UTC)", _when(view.created_at)),
        ]
    )


def cmd_keys_set(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    if args.max_concurrent is None and args.base_url is None:
        raise services.ServiceError("nothing to change: give --max-concurrent or --base-url")
    view = services.update_key(
        args.name,
        max_concurrent=args.max_concurrent,
        base_url=args.base_url,
        allow_private=settings.allow_private_upstreams,
        allow_private_user=settings.allow_private_user_upstreams,
        gateway_urls=settings.gateway_urls,
        org_name=args.org,
    )
    if args.max_concurrent is not None:
        cap = f"at most {view.max_concurrent}" if view.max_concurrent else "no cap on"
        print(f"key {view.name}: {cap} calls at once")
    if args.base_url is not None:
        print(f"key {view.name}: calls go to {view.base_url}")
    return 0


def _read_secret() -> str:
    secret = sys.stdin.readline().strip()
    if not secret:
        raise services.ServiceError("give the key's secret on standard input")
    return secret


def cmd_keys_list(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    views = services.list_keys(args.org)
    if args.json:
        print(json.dumps([view.as_dict() for view in views], indent=2))
        return 0
    rows = [
        ("NAME", "PROVIDER", "KEY", "OWNER", "STATE", "MAX CALLS", "LAST USED (UTC)", "BASE URL")
    ]
    for view in views:
        shown = view.as_dict()
        state = "disabled" if view.disabled else "enabled"
        rows.append(
            (
                view.name,
                view.provider,
                shown["fingerprint"],
                view.owner or "-",
                state,
                str(view.max_concurrent or "-"),
                _when(view.last_used_at) if view.last_used_at is not None else "never",
                view.base_url,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )
    return 0


def cmd_keys_rotate(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    view = services.rotate_key(
        args.name, _read_secret(), build_keyring(settings), org_name=args.org
    )
    _print_key(view, "rotated", as_json=args.json)
    return 0


def cmd_keys_disable(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    view = services.set_key_disabled(args.name, args.disabled, org_name=args.org)
    print(f"key {view.name} is {'disabled' if view.disabled else 'enabled'}")
    return 0


def cmd_keys_delete(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    routes = services.delete_key(args.name, org_name=args.org, force=args.force)
    print(f"deleted key {args.name}" + (f" and routes {', '.join(routes)}" if routes else ""))
    return 0


def _print_progress(report: services.CiphertextReport) -> None:
    print(
        f"  updated {report.updated}, unchanged {report.unchanged}, "
        f"failed {len(report.failed)}, changed meanwhile {report.conflicts}",
        file=sys.stderr,
    )


def _finish_report(report: services.CiphertextReport, what: str) -> int:
    print(f"{what}: updated {report.updated}, unchanged {report.unchanged}")
    if report.versions:
        print("ciphertexts: " + ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items())))
    if report.failed:
        print(f"keys that do not decrypt: {', '.join(report.failed)}", file=sys.stderr)
    if report.conflicts:
        print(f"{report.conflicts} keys changed meanwhile; run it again", file=sys.stderr)
    return 0 if report.complete else 1


def cmd_keys_rewrap(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    vault = build_keyring(settings).readers.get("vault")
    if not isinstance(vault, VaultKeyring):
        raise services.ServiceError("keys rewrap needs vault_addr and the gateway's credentials")
    report = services.rewrap_keys(vault, batch_size=args.batch_size, progress=_print_progress)
    code = _finish_report(report, "rewrapped to the newest transit key version")
    if code == 0 and len(report.versions) == 1:
        newest = next(iter(report.versions)).lstrip("v")
        print(
            f"every vault ciphertext is at v{newest}; older versions may be retired with: "
            f"tvgate vault retire {newest}"
        )
    return code


def cmd_keys_migrate(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    target: Keyring
    if args.to == "vault":
        target = VaultKeyring.from_settings(settings)
    else:
        target = LocalKeyring.from_settings(settings)
    report = services.migrate_keys(
        build_keyring(settings), target, batch_size=args.batch_size, progress=_print_progress
    )
    code = _finish_report(report, f"re-encrypted with the {args.to} keyring")
    if code == 0:
        print(f"now set TVGATE_KEYRING={args.to} on every gateway (they read both meanwhile)")
    return code


def _operator(settings: Settings, args: argparse.Namespace) -> hvac.Client:
    return vault_admin.operator_client(
        args.addr or settings.vault_addr or os.environ.get("VAULT_ADDR", ""),
        args.token or os.environ.get("VAULT_TOKEN", ""),
        args.ca_cert or settings.vault_ca_cert or os.environ.get("VAULT_CACERT", ""),
    )


def cmd_vault_setup(settings: Settings, args: argparse.Namespace) -> int:
    client = _operator(settings, args)
    result = vault_admin.setup(
        client,
        mount=settings.vault_transit_mount,
        key=settings.vault_transit_key,
        ttl=args.ttl,
        max_ttl=args.max_ttl,
    )
    for step in result.steps:
        print(f"  {step}", file=sys.stderr)
    lines = [f"TVGATE_VAULT_ROLE_ID={result.role_id}", f"TVGATE_VAULT_SECRET_ID={result.secret_id}"]
    if not args.output:
        print("\n".join(lines))
        return 0
    env = [
        "TVGATE_KEYRING=vault",
        f"TVGATE_VAULT_ADDR={client.url}",
        *lines,
    ]
    if settings.vault_transit_mount != "transit":
        env.append(f"TVGATE_VAULT_TRANSIT_MOUNT={settings.vault_transit_mount}")
    if settings.vault_transit_key != "tvgate":
        env.append(f"TVGATE_VAULT_TRANSIT_KEY={settings.vault_transit_key}")
    write_private_file(Path(args.output), "\n".join(env) + "\n")
    print(f"TVGATE_VAULT_ROLE_ID={result.role_id}")
    print(f"secret_id written to {args.output} (mode 0600)")
    return 0


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, also when it existed before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def _print_status(status: vault_admin.KeyStatus) -> None:
    print(
        f"transit key {status.name}: latest version {status.latest_version}, "
        f"min decryption version {status.min_decryption_version}, "
        f"versions {', '.join(map(str, status.versions))}, "
        f"derived {'yes' if status.derived else 'NO'}"
    )


def cmd_vault_status(settings: Settings, args: argparse.Namespace) -> int:
    _print_status(
        vault_admin.key_status(
            _operator(settings, args),
            mount=settings.vault_transit_mount,
            key=settings.vault_transit_key,
        )
    )
    return 0


def cmd_vault_rotate(settings: Settings, args: argparse.Namespace) -> int:
    status = vault_admin.rotate(
        _operator(settings, args),
        mount=settings.vault_transit_mount,
        key=settings.vault_transit_key,
    )
    _print_status(status)
    print("new keys use the new version now; move stored ones with: tvgate keys rewrap")
    return 0


def cmd_vault_retire(settings: Settings, args: argparse.Namespace) -> int:
    status = vault_admin.retire(
        _operator(settings, args),
        args.version,
        mount=settings.vault_transit_mount,
        key=settings.vault_transit_key,
    )
    _print_status(status)
    return 0


def cmd_vault_policy(settings: Settings, args: argparse.Namespace) -> int:
    print(
        vault_admin.render_policy(
            args.kind, settings.vault_transit_mount, settings.vault_transit_key
        ),
        end="",
    )
    return 0


def cmd_keys_grant(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    holders = services.grant_key(args.name, args.emails, args.org, revoke=args.revoke)
    print(f"key {args.name} is granted to: {', '.join(holders) or 'nobody'}")
    return 0


def cmd_policy_set(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    policy = services.set_policy(
        args.org,
        allow_user_keys=_on_off(args.user_keys),
        allow_user_routes=_on_off(args.user_routes),
        capture_bodies=_on_off(args.capture_bodies),
        redaction_patterns=args.redaction_patterns,
    )
    print(json.dumps(policy.as_dict(), indent=2))
    return 0


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def cmd_users_list(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    rows: list[tuple[str, ...]] = [("EMAIL", "ROLE", "STATE")]
    for user in services.list_users(args.org):
        rows.append((user.email, user.role, "disabled" if user.disabled else "active"))
    _table(rows)
    return 0


def cmd_users_set(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    user = services.update_user(
        args.email, role=args.role, disabled=_on_off(args.disabled), org_name=args.org
    )
    print(f"user {user.email}: {user.role}, {'disabled' if user.disabled else 'active'}")
    return 0


def cmd_routes_list(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    routes = services.list_routes(args.org)
    if not routes:
        print("no routes")
        return 0
    # The ID column is what ``routes update`` takes when a name is not unique.
    rows: list[tuple[str, ...]] = [
        ("ID", "NAME", "SCOPE", "USER", "KEY", "MODEL", "STATE", "FALLBACKS")
    ]
    for route in routes:
        rows.append(
            (
                str(route.id),
                route.name,
                route.scope,
                route.user or "-",
                route.key,
                route.upstream_model or "(as requested)",
                route.state,
                ", ".join(route.fallbacks) or "-",
            )
        )
    _table(rows)
    return 0


def cmd_routes_resolve(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    found = services.resolve_route(args.name, args.user, args.org)
    if found.route is None:
        print(f"{found.user} gets no route for {found.name!r}: {found.reason}")
        print(f"routes {found.user} may use: {', '.join(found.available) or 'none'}")
        return 1
    route = found.route
    who = f" for {route.user}" if route.user else ""
    print(
        f"{found.user} asking for {found.name!r} gets the {route.scope} route {route.name!r}{who}: "
        f"{route.provider} model {found.upstream_model} with key {route.key}"
    )
    return 0


def cmd_routes_add(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    route = services.add_route(
        args.name,
        args.key,
        model=args.model or "",
        org_name=args.org,
        description=args.description,
        for_user=args.for_user,
        owner=args.owner,
        fallbacks=args.fallback,
    )
    _print_route(route)
    return 0


def _print_route(route: services.RouteView) -> None:
    target = route.upstream_model or "(the requested name)"
    who = f" for {route.user}" if route.user else ""
    fallbacks = f", then {', '.join(route.fallbacks)}" if route.fallbacks else ""
    state = "" if route.state == services.ROUTE_ENABLED else f" ({route.state})"
    print(
        f"{route.scope} route {route.name}{who} -> {route.provider} {target} with key "
        f"{route.key}{fallbacks}{state}"
    )


def cmd_routes_update(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    org = services.get_org(args.org)
    routes = [r for r in services.list_routes(org.name) if str(r.id) == args.route]
    if not routes:
        routes = [r for r in services.list_routes(org.name) if r.name == args.route]
    if not routes:
        raise services.NotFound(f"no route {args.route!r} in org {org.name!r}")
    if len(routes) > 1:
        ids = ", ".join(f"{r.id} ({r.scope}{' of ' + r.user if r.user else ''})" for r in routes)
        raise services.ServiceError(
            f"{len(routes)} routes are named {args.route!r}: give the id of one ({ids})"
        )
    changes: dict[str, Any] = {}
    if args.no_fallbacks:
        changes["fallbacks"] = []
    elif args.fallback is not None:
        changes["fallbacks"] = args.fallback
    if args.model is not None:
        changes["upstream_model"] = args.model
    if args.key is not None:
        changes["key"] = args.key
    if args.description is not None:
        changes["description"] = args.description
    if args.enabled is not None:
        changes["enabled"] = args.enabled == "on"
    if not changes:
        raise services.ServiceError(
            "nothing to change: give --fallback, --no-fallbacks, --model, --key, "
            "--description or --enabled"
        )
    _print_route(services.update_route(routes[0].id, changes))
    return 0


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
    _open(settings)
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


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_budgets_list(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    budgets = services.list_budgets(args.org)
    if args.json:
        print(json.dumps([b.as_dict() for b in budgets], indent=2))
        return 0
    if not budgets:
        print("no budgets")
        return 0
    rows: list[tuple[str, ...]] = [
        ("ID", "SCOPE", "SUBJECT", "PER", "AMOUNT", "USED", "USED %", "STATE", "RESETS (UTC)")
    ]
    for b in budgets:
        rows.append(
            (
                str(b.id),
                b.scope,
                b.subject or "-",
                b.period,
                _amount(b.amount, b.metric),
                _amount(b.used, b.metric),
                f"{b.percent:g}%",
                b.state,
                _when(b.resets_at),
            )
        )
    _table(rows)
    return 0


def cmd_budgets_delete(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    services.delete_budget(args.budget_id, org_name=args.org)
    print(f"deleted budget {args.budget_id}")
    return 0


def cmd_limits_set(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
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
    _open(settings)
    limits = services.list_rate_limits(args.org)
    if args.json:
        print(json.dumps([r.as_dict() for r in limits], indent=2))
        return 0
    if not limits:
        print("no rate limits")
        return 0
    rows: list[tuple[str, ...]] = [
        ("ID", "SCOPE", "SUBJECT", "RPM", "TPM", "REQUESTS THIS MINUTE", "TOKENS THIS MINUTE")
    ]
    for r in limits:
        rows.append(
            (
                str(r.id),
                r.scope,
                r.subject or "-",
                str(r.rpm) if r.rpm is not None else "-",
                str(r.tpm) if r.tpm is not None else "-",
                f"{int(r.used_requests):,}",
                f"{int(r.used_tokens):,}",
            )
        )
    _table(rows)
    return 0


def cmd_limits_delete(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    services.delete_rate_limit(args.limit_id, org_name=args.org)
    print(f"deleted rate limit {args.limit_id}")
    return 0


def cmd_prices_set(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
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
    _open(settings)
    prices = services.list_prices(args.org, default_table=args.org is None)
    if args.json:
        print(json.dumps(prices, indent=2))
        return 0
    rows: list[tuple[str, ...]] = [
        ("MODEL", "SET BY", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE")
    ]
    for p in prices:
        rows.append(
            (
                p["model"],
                p["org"] or "default",
                *(f"{p[name]:g}" for name in services.PRICE_FIELDS),
            )
        )
    _table(rows)
    return 0


def cmd_prices_delete(settings: Settings, args: argparse.Namespace) -> int:
    _open(settings)
    services.delete_price(args.model, org_name=args.org)
    print(f"deleted the price of {args.model} of org {args.org}; the default applies")
    return 0


DATA_DIR_HELP = (
    "the data directory (default: $TVGATE_DATA_DIR, the config file's data_dir, ./data, "
    "or data/ of the tvgate checkout the command runs in)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvgate", description="tvgate, the LLM gateway")
    parser.add_argument("--config", help="TOML settings file (default: $TVGATE_CONFIG)")
    parser.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    parser.add_argument("--version", action="version", version=f"tvgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        parent: Any, name: str, handler: Callable[[Settings, argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_)
        sub.set_defaults(handler=handler)
        # Also after the command (``tvgate routes list --data-dir DIR``); SUPPRESS keeps
        # the value given before the command when it is not repeated here.
        sub.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS, help=DATA_DIR_HELP)
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
    p.add_argument(
        "--password-stdin", action="store_true", help="read a password for a local user from stdin"
    )
    p = command(users, "list", cmd_users_list, "list the users of an org")
    p.add_argument("--org")
    p = command(users, "set", cmd_users_set, "change a user's role, or disable them")
    p.add_argument("email")
    p.add_argument("--org")
    p.add_argument("--role", choices=["admin", "member", "auditor"])
    p.add_argument("--disabled", choices=["on", "off"])

    orgs = commands.add_parser("orgs", help="orgs and the outside orgs they are linked to")
    org_commands = orgs.add_subparsers(required=True)
    command(org_commands, "list", cmd_orgs_list, "list orgs and their links")
    p = command(
        org_commands, "link", cmd_orgs_link, "link an org to a Visdom Trace org or a JWT org"
    )
    p.add_argument("name", help="the tvgate org")
    outside = p.add_mutually_exclusive_group(required=True)
    outside.add_argument("--visdom-org-id", metavar="ID", help="the Visdom Trace org's id")
    outside.add_argument("--jwt-org", metavar="VALUE", help="the JWT org claim's value")
    p.add_argument(
        "--jwt-issuer", metavar="ISS", help="the JWT org's issuer (default: the jwt_issuer setting)"
    )

    tokens = commands.add_parser("tokens", help="manage proxy tokens").add_subparsers(required=True)
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

    keys = commands.add_parser("keys", help="manage provider keys").add_subparsers(required=True)
    p = command(keys, "add", cmd_keys_add, "add a key; the secret is read from standard input")
    p.add_argument("name")
    p.add_argument("--provider", required=True, choices=["anthropic", "openai"])
    p.add_argument("--base-url")
    p.add_argument("--org")
    p.add_argument("--owner", help="a user's own key (when the org allows user keys)")
    p.add_argument(
        "--granted-only", action="store_true", help="only users granted the key may use it"
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        metavar="N",
        help="calls open on the key at once, across every gateway process (0: no cap)",
    )
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(keys, "set", cmd_keys_set, "change a key's concurrency cap or base URL")
    p.add_argument("name")
    p.add_argument("--org")
    p.add_argument(
        "--base-url",
        metavar="URL",
        help="where the key's calls go from now on (checked as in keys add); its routes stay",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="calls open on the key at once, across every gateway process (0: no cap)",
    )
    p = command(keys, "grant", cmd_keys_grant, "let users use an org key (or --revoke)")
    p.add_argument("name")
    p.add_argument("emails", nargs="+")
    p.add_argument("--org")
    p.add_argument("--revoke", action="store_true")

    p = command(keys, "list", cmd_keys_list, "list keys (metadata only, never a secret)")
    p.add_argument("--org")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(keys, "rotate", cmd_keys_rotate, "replace a key's secret (read from stdin)")
    p.add_argument("name")
    p.add_argument("--org")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(keys, "disable", cmd_keys_disable, "switch a key off; its routes stop working")
    p.add_argument("name")
    p.add_argument("--org")
    p.set_defaults(disabled=True)
    p = command(keys, "enable", cmd_keys_disable, "switch a disabled key on again")
    p.add_argument("name")
    p.add_argument("--org")
    p.set_defaults(disabled=False)
    p = command(keys, "delete", cmd_keys_delete, "delete a key and its ciphertext")
    p.add_argument("name")
    p.add_argument("--org")
    p.add_argument("--force", action="store_true", help="also delete the routes that use it")
    p = command(
        keys, "rewrap", cmd_keys_rewrap, "move vault ciphertexts to the newest transit version"
    )
    p.add_argument("--batch-size", type=int, default=100)
    p = command(keys, "migrate", cmd_keys_migrate, "re-encrypt every key with another keyring")
    p.add_argument("--to", required=True, choices=["vault", "local"])
    p.add_argument("--batch-size", type=int, default=100)

    vault = commands.add_parser(
        "vault", help="operator tasks in Vault (with an operator token)"
    ).add_subparsers(required=True)

    def operator_command(
        name: str, handler: Callable[[Settings, argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub = command(vault, name, handler, help_)
        sub.add_argument("--addr", help="Vault address (default: vault_addr, then $VAULT_ADDR)")
        sub.add_argument(
            "--token", help="operator token (default: $VAULT_TOKEN, which keeps it out of ps)"
        )
        sub.add_argument("--ca-cert", help="CA file (default: vault_ca_cert, then $VAULT_CACERT)")
        return sub

    p = operator_command(
        "setup", cmd_vault_setup, "transit, derived key, policies, AppRole; print credentials"
    )
    p.add_argument("--output", help="write the gateway's settings to this file (mode 0600)")
    p.add_argument("--ttl", default="1h", help="TTL of the gateway's tokens")
    p.add_argument("--max-ttl", default="24h", help="max TTL before the gateway logs in again")
    operator_command("status", cmd_vault_status, "show the transit key's versions")
    operator_command("rotate", cmd_vault_rotate, "add a new transit key version")
    p = operator_command(
        "retire", cmd_vault_retire, "refuse decryption below VERSION (after keys rewrap)"
    )
    p.add_argument("version", type=int)
    p = command(vault, "policy", cmd_vault_policy, "print a policy for the configured mount/key")
    p.add_argument("kind", choices=["gateway", "operator"])

    policy = commands.add_parser("policy", help="org switches").add_subparsers(required=True)
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
        "--redaction-pattern",
        action="append",
        dest="redaction_patterns",
        metavar="RE2",
        help="replace the org's redaction patterns (repeat for several; RE2 syntax)",
    )

    traces = commands.add_parser("traces", help="read and keep traces").add_subparsers(
        required=True
    )
    p = command(traces, "export", cmd_traces_export, "stream traces as JSON lines")
    p.add_argument("--since", required=True, help="epoch seconds or ISO 8601")
    p.add_argument("--until")
    p.add_argument("--org")
    p.add_argument("--bodies", action="store_true", help="include requests and answers")
    command(traces, "purge", cmd_traces_purge, "delete traces past each org's retention now")

    routes = commands.add_parser("routes", help="manage routes").add_subparsers(required=True)
    p = command(routes, "add", cmd_routes_add, "add a route (org-wide unless --for-user/--owner)")
    p.add_argument("name", help="the name tools ask for, or a glob such as claude-haiku-*")
    p.add_argument("--key", required=True)
    p.add_argument("--model", help="upstream model (default: the requested name)")
    p.add_argument("--org")
    p.add_argument("--description", default="")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--for-user", metavar="EMAIL", help="a route an admin makes for one user")
    scope.add_argument("--owner", metavar="EMAIL", help="a user's own route")
    p.add_argument(
        "--fallback",
        action="append",
        metavar="ROUTE",
        help="a route tried when this one's provider fails (repeat for more, in order)",
    )
    p = command(routes, "update", cmd_routes_update, "change a route (by id, or by name)")
    p.add_argument("route", help="the route's id (see routes list), or its name if unique")
    p.add_argument("--org")
    fallbacks = p.add_mutually_exclusive_group()
    fallbacks.add_argument(
        "--fallback",
        action="append",
        metavar="ROUTE",
        help="replace the fallbacks with these routes (repeat for more, in order)",
    )
    fallbacks.add_argument("--no-fallbacks", action="store_true", help="remove every fallback")
    p.add_argument("--model", help="upstream model (empty: the requested name)")
    p.add_argument("--key")
    p.add_argument("--description")
    p.add_argument("--enabled", choices=["on", "off"])
    p = command(routes, "list", cmd_routes_list, "list an org's routes")
    p.add_argument("--org")
    p = command(routes, "resolve", cmd_routes_resolve, "the route a user would get for a name")
    p.add_argument("name")
    p.add_argument("--user", required=True)
    p.add_argument("--org")

    budgets = commands.add_parser(
        "budgets", help="caps on tokens or cost per UTC day or month"
    ).add_subparsers(required=True)
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

    limits = commands.add_parser("limits", help="requests and tokens per minute").add_subparsers(
        required=True
    )
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

    prices = commands.add_parser(
        "prices", help="USD per million tokens: the default table, and orgs' own"
    ).add_subparsers(required=True)
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


if __name__ == "__main__":
    sys.exit(main())
