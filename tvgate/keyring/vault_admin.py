"""What an operator does to Vault for tvgate: the two policies, setup, key rotation, retirement.

These run with an operator's token (``tvgate vault …``), never with the gateway's.
``setup`` is idempotent: it enables the transit engine if missing, creates the
derived transit key (or checks an existing one is derived), writes the gateway
policy (and the operator policy, where the token may), enables AppRole and
writes role ``tvgate`` with the gateway policy only, then returns the role_id and
a new secret_id.

The policies are rendered from the tables below with the configured mount and
key name; ``vault_policies/*.hcl`` in the repository are these templates rendered
with the defaults (a test keeps them equal), for operators who apply policies by
other means (Terraform, Ansible).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import hvac
import hvac.exceptions
import requests

T = TypeVar("T")

GATEWAY_POLICY = "tvgate"
OPERATOR_POLICY = "tvgate-operator"
ROLE = "tvgate"
APPROLE_MOUNT = "approle"

#: A policy: its header comment, then its sections, each a comment and the paths it
#: grants with their capabilities. ``$mount`` and ``$key`` stand for the transit mount
#: and key name; :func:`render_policy` writes the HCL.
_Section = tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]

_UPDATE = ("update",)
_READ = ("read",)
_CREATE_READ_UPDATE = ("create", "read", "update")
_DENY = ("deny",)

_GATEWAY_HEADER = """\
tvgate.hcl: what a tvgate gateway may do in Vault (or OpenBao). Nothing else.
Rendered by `tvgate vault policy gateway` for mount "$mount" and transit key "$key";
`tvgate vault setup` writes it as policy "tvgate" and gives it to AppRole role "tvgate"."""

_GATEWAY_SECTIONS: tuple[_Section, ...] = (
    (
        """\
Encrypt and decrypt provider keys with its own derived transit key. Every request
carries the key's context (org, key id, owner), so a ciphertext copied onto another
key row, user or org does not decrypt.""",
        (("$mount/encrypt/$key", _UPDATE), ("$mount/decrypt/$key", _UPDATE)),
    ),
    (
        """\
Move stored ciphertexts to the newest key version after a rotation (tvgate keys
rewrap). Vault rewraps without ever returning the plaintext.""",
        (("$mount/rewrap/$key", _UPDATE),),
    ),
    (
        "Its own token only: look up its TTL, renew it before it expires.",
        (("auth/token/lookup-self", _READ), ("auth/token/renew-self", _UPDATE)),
    ),
    (
        """\
Never the key itself: no reading its configuration, no export, no backup, no
rotation, no other transit key. (Not granted is already denied; these rules keep it
denied even if a broader policy is ever attached to the same token.)""",
        (("$mount/keys/*", _DENY), ("$mount/export/*", _DENY), ("$mount/backup/*", _DENY)),
    ),
)

_OPERATOR_HEADER = """\
tvgate-operator.hcl: what an operator needs to set up tvgate in Vault and rotate its
transit key. It cannot encrypt or decrypt: an operator never sees a provider key.
Rendered by `tvgate vault policy operator` for mount "$mount" and transit key "$key".

Note: whoever may create secret_ids for role "tvgate" can log in as the gateway, and
whoever may write policy "tvgate" can widen it. Give this policy to the people who
run the gateway, not to every Vault user."""

_OPERATOR_SECTIONS: tuple[_Section, ...] = (
    (
        "Enable the transit engine (tvgate vault setup) and check that it is one.",
        (("sys/mounts/$mount", _CREATE_READ_UPDATE),),
    ),
    (
        """\
Create the derived key, read its versions, rotate it, retire old versions
(min_decryption_version) once `tvgate keys rewrap` has moved every ciphertext.""",
        (
            ("$mount/keys/$key", _CREATE_READ_UPDATE),
            ("$mount/keys/$key/rotate", _UPDATE),
            ("$mount/keys/$key/config", _UPDATE),
        ),
    ),
    (
        "Write the gateway's policy; read (not change) this one.",
        (
            ("sys/policies/acl/tvgate", _CREATE_READ_UPDATE),
            ("sys/policies/acl/tvgate-operator", _READ),
        ),
    ),
    (
        """\
Enable AppRole (enabling an auth method needs sudo), manage role "tvgate", read its
role_id, issue secret_ids, and destroy one that leaked.""",
        (
            ("sys/auth", _READ),
            ("sys/auth/approle", ("create", "read", "update", "sudo")),
            ("auth/approle/role/tvgate", _CREATE_READ_UPDATE),
            ("auth/approle/role/tvgate/role-id", _READ),
            ("auth/approle/role/tvgate/secret-id", _UPDATE),
            ("auth/approle/role/tvgate/secret-id-accessor/destroy", _UPDATE),
        ),
    ),
)

_POLICIES = {
    "gateway": (_GATEWAY_HEADER, _GATEWAY_SECTIONS),
    "operator": (_OPERATOR_HEADER, _OPERATOR_SECTIONS),
}


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in text.splitlines())


def _quoted(text: str) -> str:
    return f'"{text}"'


def _hcl(header: str, sections: tuple[_Section, ...]) -> str:
    """A policy's HCL: the header, then per section its comment and a one-line ``path``
    block per grant (a table of paths and capabilities), sections a blank line apart."""
    parts = [_comment(header)]
    for comment, grants in sections:
        blocks = [
            f'path "{path}" {{ capabilities = [{", ".join(_quoted(c) for c in caps)}] }}\n'
            for path, caps in grants
        ]
        parts.append(_comment(comment) + "".join(blocks))
    return "\n".join(parts)


def render_policy(kind: str, mount: str = "transit", key: str = "tvgate") -> str:
    """The HCL of the ``gateway`` or ``operator`` policy for this mount and key."""
    if kind not in _POLICIES:
        raise ValueError(f"no policy {kind!r}; choose gateway or operator")
    hcl = _hcl(*_POLICIES[kind])
    return string.Template(hcl).substitute(mount=mount.strip("/"), key=key)


class VaultAdminError(Exception):
    """An operator step failed; the message says which and why, never with a token."""


@dataclass
class SetupResult:
    role_id: str
    secret_id: str
    steps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class KeyStatus:
    name: str
    derived: bool
    latest_version: int
    min_decryption_version: int
    versions: list[int]


def operator_client(addr: str, token: str, ca_cert: str = "", timeout: float = 30.0) -> hvac.Client:
    if not addr:
        raise VaultAdminError("no Vault address: give --addr, TVGATE_VAULT_ADDR or VAULT_ADDR")
    if not token:
        raise VaultAdminError("no operator token: give --token or VAULT_TOKEN")
    return hvac.Client(url=addr.rstrip("/"), token=token, verify=ca_cert or True, timeout=timeout)


def _step(what: str, call: Callable[[], T]) -> T:
    """Run one operator request; say which step failed and why, without the token."""
    try:
        return call()
    except hvac.exceptions.Forbidden:
        raise VaultAdminError(f"{what}: permission denied for this token") from None
    except hvac.exceptions.VaultDown:
        raise VaultAdminError(f"{what}: vault is sealed") from None
    except hvac.exceptions.VaultError as exc:
        errors = "; ".join(str(e) for e in (exc.errors or [])) or type(exc).__name__
        raise VaultAdminError(f"{what}: {errors}") from None
    except requests.exceptions.RequestException:
        raise VaultAdminError(f"{what}: vault is unreachable") from None


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(quote(p.strip("/"), safe="/") for p in parts)


def setup(
    client: hvac.Client,
    *,
    mount: str = "transit",
    key: str = "tvgate",
    ttl: str = "1h",
    max_ttl: str = "24h",
) -> SetupResult:
    """Make Vault ready for tvgate (idempotent) and issue a new AppRole secret_id."""
    steps: list[str] = []
    adapter = client.adapter
    mount = mount.strip("/")

    # 1. the transit engine
    try:
        mounted = adapter.get(_path("sys/mounts", mount))
    except hvac.exceptions.InvalidRequest:
        mounted = None  # "no secret engine mount at …"
    except hvac.exceptions.Forbidden:
        raise VaultAdminError(f"read mount {mount!r}: permission denied for this token") from None
    if mounted is None:
        _step(
            f"enable transit at {mount!r}",
            lambda: adapter.post(_path("sys/mounts", mount), json={"type": "transit"}),
        )
        steps.append(f"enabled the transit engine at {mount}/")
    else:
        kind = (mounted.get("data") or mounted).get("type")
        if kind != "transit":
            raise VaultAdminError(f"mount {mount!r} is a {kind} engine, not transit")
        steps.append(f"transit engine at {mount}/ already enabled")

    # 2. the derived key
    try:
        existing = adapter.get(_path(mount, "keys", key))
    except hvac.exceptions.InvalidPath:
        existing = None
    except hvac.exceptions.Forbidden:
        raise VaultAdminError(f"read transit key {key!r}: permission denied") from None
    if existing is None:
        _step(
            f"create transit key {key!r}",
            lambda: adapter.post(
                _path(mount, "keys", key),
                json={"type": "aes256-gcm96", "derived": True, "exportable": False},
            ),
        )
        steps.append(f"created derived transit key {key}")
    else:
        data = existing.get("data") or {}
        if not data.get("derived"):
            raise VaultAdminError(
                f"transit key {key!r} exists but is not derived; tvgate needs a derived key "
                "(choose another vault_transit_key)"
            )
        if data.get("exportable"):
            raise VaultAdminError(f"transit key {key!r} is exportable; tvgate refuses it")
        steps.append(f"derived transit key {key} already exists")

    # 3. the policies
    gateway_hcl = render_policy("gateway", mount, key)
    _step(
        "write policy tvgate",
        lambda: client.sys.create_or_update_acl_policy(name=GATEWAY_POLICY, policy=gateway_hcl),
    )
    steps.append("wrote policy tvgate")
    operator_hcl = render_policy("operator", mount, key)
    current = _read_policy(client, OPERATOR_POLICY)
    if current is not None and current.strip() == operator_hcl.strip():
        steps.append("policy tvgate-operator is up to date")
    else:
        _step(
            "write policy tvgate-operator",
            lambda: client.sys.create_or_update_acl_policy(
                name=OPERATOR_POLICY, policy=operator_hcl
            ),
        )
        steps.append("wrote policy tvgate-operator")

    # 4. AppRole and role tvgate
    methods = _step("list auth methods", lambda: adapter.get("/v1/sys/auth"))
    listed = methods.get("data") or methods
    if f"{APPROLE_MOUNT}/" not in listed:
        _step(
            "enable AppRole",
            lambda: adapter.post(_path("sys/auth", APPROLE_MOUNT), json={"type": "approle"}),
        )
        steps.append("enabled AppRole")
    role_path = _path("auth", APPROLE_MOUNT, "role", ROLE)
    _step(
        "write role tvgate",
        lambda: adapter.post(
            role_path,
            json={
                "token_policies": [GATEWAY_POLICY],
                # No "default" policy: the gateway's token can do what tvgate.hcl says, only.
                "token_no_default_policy": True,
                "token_type": "service",
                "token_ttl": ttl,
                "token_max_ttl": max_ttl,
                "bind_secret_id": True,
                "secret_id_ttl": 0,
                "secret_id_num_uses": 0,
            },
        ),
    )
    steps.append(f"wrote AppRole role {ROLE} (policy tvgate, token TTL {ttl})")
    role = _step("read role_id", lambda: adapter.get(role_path + "/role-id"))
    issued = _step("issue a secret_id", lambda: adapter.post(role_path + "/secret-id", json={}))
    secret = issued.get("data") or {}
    steps.append("issued a new secret_id")
    return SetupResult(
        role_id=str((role.get("data") or {}).get("role_id", "")),
        secret_id=str(secret.get("secret_id", "")),
        steps=steps,
    )


def _read_policy(client: hvac.Client, name: str) -> str | None:
    try:
        response: Any = client.adapter.get(_path("sys/policies/acl", name))
    except (hvac.exceptions.InvalidPath, hvac.exceptions.Forbidden):
        return None
    data = response.get("data") or {}
    policy = data.get("policy")
    return policy if isinstance(policy, str) else None


def key_status(client: hvac.Client, *, mount: str = "transit", key: str = "tvgate") -> KeyStatus:
    response = _step(
        f"read transit key {key!r}", lambda: client.adapter.get(_path(mount, "keys", key))
    )
    data = response.get("data") or {}
    return KeyStatus(
        name=key,
        derived=bool(data.get("derived")),
        latest_version=int(data.get("latest_version") or 0),
        min_decryption_version=int(data.get("min_decryption_version") or 0),
        versions=sorted(int(v) for v in (data.get("keys") or {})),
    )


def rotate(client: hvac.Client, *, mount: str = "transit", key: str = "tvgate") -> KeyStatus:
    """Add a new key version; new encryptions use it, old ciphertexts still decrypt."""
    _step(
        f"rotate transit key {key!r}",
        lambda: client.adapter.post(_path(mount, "keys", key, "rotate"), json={}),
    )
    return key_status(client, mount=mount, key=key)


def retire(
    client: hvac.Client, min_version: int, *, mount: str = "transit", key: str = "tvgate"
) -> KeyStatus:
    """Refuse decryption under versions below ``min_version`` (after ``keys rewrap``)."""
    status = key_status(client, mount=mount, key=key)
    if not 1 <= min_version <= status.latest_version:
        raise VaultAdminError(
            f"version must be between 1 and the latest version {status.latest_version}"
        )
    _step(
        f"set min_decryption_version of {key!r}",
        lambda: client.adapter.post(
            _path(mount, "keys", key, "config"), json={"min_decryption_version": min_version}
        ),
    )
    return key_status(client, mount=mount, key=key)
