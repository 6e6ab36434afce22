"""``tvgate vault``: an operator's tasks in Vault with an operator token (setup, status,
rotate, retire, policies); the gateway's own credentials never come through here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hvac

from tvgate.cli.common import Commands, command, group
from tvgate.config import Settings
from tvgate.keyring import vault_admin


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


def register(commands: Commands) -> None:
    vault = group(commands, "vault", "operator tasks in Vault (with an operator token)")

    def operator_command(
        name: str, handler: Callable[[Settings, argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub = command(vault, name, handler, help_, opens_database=False)
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
    p = command(
        vault,
        "policy",
        cmd_vault_policy,
        "print a policy for the configured mount/key",
        opens_database=False,
    )
    p.add_argument("kind", choices=["gateway", "operator"])
