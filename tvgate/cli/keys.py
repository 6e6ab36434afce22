"""``tvgate keys``: provider keys (the secret read from standard input, never printed),
their grants, caps and state, and moving their ciphertexts to another keyring or version."""

from __future__ import annotations

import argparse
import json
import sys

from tvgate import services
from tvgate.cli.common import Commands, command, group, print_listing, table, when
from tvgate.config import Settings
from tvgate.keyring import Keyring, build_keyring
from tvgate.keyring.local import LocalKeyring
from tvgate.keyring.vault import VaultKeyring
from tvgate.models import PROVIDERS


def cmd_keys_add(settings: Settings, args: argparse.Namespace) -> int:
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
        chat_only=args.chat_only,
        settings=_cloud_settings(args),
        **settings.upstream_rules,
    )
    _print_key(view, "added", as_json=args.json)
    return 0


#: The flags of a cloud key's settings (``tvgate.providers.clouds``), each a setting.
_CLOUD_FLAGS = (
    "api_version",
    "style",
    "authority",
    "project",
    "region",
    "role_arn",
    "external_id",
    "sts_endpoint",
)


def _cloud_settings(args: argparse.Namespace) -> dict[str, str] | None:
    """The cloud settings given as flags (each cloud's, ``--region`` shared by those with
    regions), checked by the service."""
    given = {name: value for name in _CLOUD_FLAGS if (value := getattr(args, name)) is not None}
    return given or None


def _print_key(view: services.KeyView, done: str, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(view.as_dict(), indent=2, ensure_ascii=False))
        return
    shown = view.as_dict()
    print(f"{done} key {view.name} ({view.provider})")
    table(
        [
            ("  base URL", view.base_url),
            ("  secret ends in", shown["fingerprint"]),
            ("  owner", view.owner or "the org"),
            ("  state", "disabled" if view.disabled else "enabled"),
            ("  max calls at once", str(view.max_concurrent or "no cap")),
            ("  upstream APIs", _apis(view)),
            *((f"  {name}", str(value)) for name, value in (view.settings or {}).items()),
            ("  created (UTC)", when(view.created_at)),
        ]
    )


def _apis(view: services.KeyView) -> str:
    if view.chat_only:
        return "Chat Completions only (Responses clients translated)"
    return f"all of {view.provider}'s"


def cmd_keys_set(settings: Settings, args: argparse.Namespace) -> int:
    chat_only = None if args.chat_only is None else args.chat_only == "on"
    if args.max_concurrent is None and args.base_url is None and chat_only is None:
        raise services.ServiceError(
            "nothing to change: give --max-concurrent, --base-url or --chat-only"
        )
    view = services.update_key(
        args.name,
        max_concurrent=args.max_concurrent,
        base_url=args.base_url,
        chat_only=chat_only,
        **settings.upstream_rules,
        org_name=args.org,
    )
    if args.max_concurrent is not None:
        cap = f"at most {view.max_concurrent}" if view.max_concurrent else "no cap on"
        print(f"key {view.name}: {cap} calls at once")
    if args.base_url is not None:
        print(f"key {view.name}: calls go to {view.base_url}")
    if chat_only is not None:
        print(f"key {view.name}: upstream APIs: {_apis(view)}")
    return 0


def _read_secret() -> str:
    secret = sys.stdin.readline()
    if secret.lstrip().startswith("{") and not sys.stdin.isatty():
        # A cloud key's JSON object (a service account's key file) may span lines: all of it.
        secret += sys.stdin.read(64 * 1024)
    secret = secret.strip()
    if not secret:
        raise services.ServiceError("give the key's secret on standard input")
    return secret


def cmd_keys_grant(settings: Settings, args: argparse.Namespace) -> int:
    holders = services.grant_key(args.name, args.emails, args.org, revoke=args.revoke)
    print(f"key {args.name} is granted to: {', '.join(holders) or 'nobody'}")
    return 0


def cmd_keys_list(settings: Settings, args: argparse.Namespace) -> int:
    print_listing(
        services.list_keys(args.org),
        ("NAME", "PROVIDER", "KEY", "OWNER", "STATE", "MAX CALLS", "LAST USED (UTC)", "BASE URL"),
        _key_row,
        as_json=args.json,
        json_of=services.KeyView.as_dict,
    )
    return 0


def _key_row(view: services.KeyView) -> tuple[str, ...]:
    return (
        view.name,
        view.provider,
        view.as_dict()["fingerprint"],
        view.owner or "-",
        "disabled" if view.disabled else "enabled",
        str(view.max_concurrent or "-"),
        when(view.last_used_at) if view.last_used_at is not None else "never",
        view.base_url,
    )


def cmd_keys_rotate(settings: Settings, args: argparse.Namespace) -> int:
    given = _cloud_settings(args)
    view = services.rotate_key(
        args.name,
        _read_secret(),
        build_keyring(settings),
        # An empty value removes the setting (--role-arn "": no role to assume any more).
        settings={k: v or None for k, v in given.items()} if given else None,
        org_name=args.org,
        **settings.upstream_rules,
    )
    _print_key(view, "rotated", as_json=args.json)
    return 0


def cmd_keys_disable(settings: Settings, args: argparse.Namespace) -> int:
    view = services.set_key_disabled(args.name, args.disabled, org_name=args.org)
    print(f"key {view.name} is {'disabled' if view.disabled else 'enabled'}")
    return 0


def cmd_keys_delete(settings: Settings, args: argparse.Namespace) -> int:
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


_CHAT_ONLY_HELP = (
    "an OpenAI-compatible upstream without the Responses API (vLLM, Ollama): "
    "Responses clients (Codex) on its routes are translated to Chat Completions"
)


def _cloud_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a cloud key's settings, for ``keys add`` and ``keys rotate``."""
    azure = p.add_argument_group(
        'Azure OpenAI (--provider azure; the secret is {"api_key": …} or Entra ID\'s '
        '{"tenant_id", "client_id", "client_secret"})'
    )
    azure.add_argument(
        "--style",
        choices=["deployments", "v1"],
        help="/openai/deployments/{deployment}/… (default) or the v1 endpoint /openai/v1/…",
    )
    azure.add_argument(
        "--api-version", metavar="VERSION", help="default 2025-04-01-preview (deployments)"
    )
    azure.add_argument(
        "--authority",
        metavar="URL",
        help="the Entra ID authority tokens are minted at "
        "(default https://login.microsoftonline.com)",
    )
    vertex = p.add_argument_group(
        "Vertex AI (--provider vertex; the secret is the service account's JSON key file)"
    )
    vertex.add_argument("--project", help="the Google Cloud project id")
    bedrock = p.add_argument_group(
        'AWS Bedrock (--provider bedrock; the secret is {"access_key_id", '
        '"secret_access_key", "session_token" (optional)} or {"api_key": …})'
    )
    bedrock.add_argument(
        "--role-arn", help="an IAM role to assume with STS, the secret's access key as its base"
    )
    bedrock.add_argument("--external-id", help="the external id the role's trust policy asks for")
    bedrock.add_argument(
        "--sts-endpoint",
        metavar="URL",
        help="the STS endpoint (default https://sts.REGION.amazonaws.com/)",
    )
    clouds = p.add_argument_group("clouds with regions (Vertex AI, Bedrock), one --region for all")
    clouds.add_argument(
        "--region",
        help="the region whose endpoint serves the calls (us-east5, global; us-east-1)",
    )


def register(commands: Commands) -> None:
    keys = group(commands, "keys", "manage provider keys")
    p = command(keys, "add", cmd_keys_add, "add a key; the secret is read from standard input")
    p.add_argument("name")
    p.add_argument("--provider", required=True, choices=list(PROVIDERS))
    p.add_argument(
        "--base-url",
        help="where calls go (Azure OpenAI: https://RESOURCE.openai.azure.com; "
        "Vertex AI, Bedrock: the region's endpoint by default)",
    )
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
    p.add_argument("--chat-only", action="store_true", help=_CHAT_ONLY_HELP)
    _cloud_flags(p)
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(
        keys, "set", cmd_keys_set, "change a key's concurrency cap, base URL or --chat-only"
    )
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
    p.add_argument("--chat-only", choices=["on", "off"], help=_CHAT_ONLY_HELP)
    p = command(keys, "grant", cmd_keys_grant, "let users use an org key (or --revoke)")
    p.add_argument("name")
    p.add_argument("emails", nargs="+")
    p.add_argument("--org")
    p.add_argument("--revoke", action="store_true")

    p = command(keys, "list", cmd_keys_list, "list keys (metadata only, never a secret)")
    p.add_argument("--org")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = command(
        keys,
        "rotate",
        cmd_keys_rotate,
        "replace a key's secret (read from stdin), and a cloud key's settings with it "
        "(a setting given replaces the stored one, an empty value removes it)",
    )
    p.add_argument("name")
    p.add_argument("--org")
    _cloud_flags(p)
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
