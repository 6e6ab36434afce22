"""The vault keyring against a real OpenBao: encryption, isolation, policies, tokens, rotation.

Everything here talks to a real ``bao`` server (tests/openbao.py). The gateway's
side always logs in the way a deployed gateway does, with the AppRole that
``tvgate vault setup`` creates; the operator's side uses the root token or a
token holding only the operator policy.
"""

from __future__ import annotations

import base64
import http.server
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from tests.conftest import ROOT, VaultEnv, own_openai_key, setup_vault
from tests.openbao import OpenBao, free_port
from tests.test_cli import run
from tvgate import services
from tvgate.config import load_settings
from tvgate.keyring import (
    KeyContext,
    KeyringError,
    KeyringSet,
    KeyringUnavailable,
    build_keyring,
    vault_admin,
)
from tvgate.keyring.local import LocalKeyring
from tvgate.keyring.vault import VaultKeyring, context_b64
from tvgate.models import ProviderKey, User

SECRET = "sk-ant-api03-vault-roundtrip-" + "x" * 20


def ciphertext_version(ciphertext: str) -> int | None:
    """The transit key version of ``vault:v<N>:…``, or None for anything else."""
    if not ciphertext.startswith("vault:v"):
        return None
    number = ciphertext[len("vault:v") :].split(":", 1)[0]
    return int(number) if number.isdigit() else None


@pytest.fixture
def own_vault(tmp_path: Path) -> Iterator[VaultEnv]:
    """A dev OpenBao of this test's own, for tests that rotate or retire the transit key."""
    server = OpenBao(tmp_path / "own-openbao", dev=True)
    server.workdir.mkdir()
    server.start()
    try:
        yield setup_vault(server)
    finally:
        server.stop()


def short_role_keyring(
    vault: VaultEnv, name: str, ttl: str, max_ttl: str, **keyring_args: Any
) -> VaultKeyring:
    """A keyring (``keyring_args``: a clock, say) logged in by a new AppRole role ``name``
    like ``tvgate`` (same policy) whose tokens live ``ttl``, renewed up to ``max_ttl``."""
    root = vault.server.client()
    path = f"/v1/auth/approle/role/{name}"
    root.adapter.post(
        path,
        json={
            "token_policies": ["tvgate"],
            "token_no_default_policy": True,
            "token_ttl": ttl,
            "token_max_ttl": max_ttl,
        },
    )
    role_id = root.adapter.get(path + "/role-id")["data"]["role_id"]
    secret_id = root.adapter.post(path + "/secret-id", json={})["data"]["secret_id"]
    return vault.keyring(role_id=role_id, secret_id=secret_id, **keyring_args)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- encryption ---


def test_round_trip(vault: VaultEnv) -> None:
    keyring = vault.keyring()
    context = KeyContext(org_id=1, key_id=7, owner_id=None)
    first = keyring.encrypt(SECRET, context)
    second = keyring.encrypt(SECRET, context)
    assert first.startswith("vault:v") and ciphertext_version(first) is not None
    assert first != second  # a fresh nonce each time
    assert SECRET not in first and base64.b64encode(SECRET.encode()).decode() not in first
    assert keyring.decrypt(first, context) == SECRET
    assert keyring.decrypt(second, context) == SECRET
    # Unicode and the longest secret add_key accepts survive too.
    long_secret = "ключ-" + "z" * 4000
    assert keyring.decrypt(keyring.encrypt(long_secret, context), context) == long_secret
    keyring.check()


def test_ciphertext_only_decrypts_for_its_own_key_user_and_org(vault: VaultEnv, db: None) -> None:
    """The derived context binds a ciphertext to its row: copying it anywhere else fails."""
    keyring = vault.keyring()
    services.add_user("admin@a.test", "org-a", admin=True)
    alice = services.add_user("alice@a.test", "org-a")
    bob = services.add_user("bob@a.test", "org-a")
    services.add_user("admin@b.test", "org-b", admin=True)
    services.add_key("one", "openai", SECRET, keyring, org_name="org-a")
    services.add_key("two", "openai", SECRET + "2", keyring, org_name="org-a")
    services.add_key("b-one", "openai", SECRET + "b", keyring, org_name="org-b")
    rows = {k.name: k for k in ProviderKey.select()}
    # Two users' own keys: same org, owned by different people.
    for name, owner in (("alice-own", alice), ("bob-own", bob)):
        rows[name] = own_openai_key(keyring, name, owner, SECRET + name)

    def context(row: ProviderKey) -> KeyContext:
        return KeyContext(row.org_id, row.id, row.owner_id)

    for name, row in rows.items():
        assert keyring.decrypt(row.ciphertext, context(row)).startswith(SECRET), name
    pairs = [
        ("one", "two"),  # two keys of one org
        ("alice-own", "bob-own"),  # two users
        ("one", "b-one"),  # two orgs
        ("alice-own", "one"),  # a user's key onto an org key
    ]
    for source, target in pairs:
        for a, b in ((source, target), (target, source)):
            with pytest.raises(KeyringError) as raised:
                keyring.decrypt(rows[a].ciphertext, context(rows[b]))
            assert SECRET not in str(raised.value)
    # The same row id under another owner or org is another context as well.
    one = rows["one"]
    for other in (
        KeyContext(one.org_id, one.id, alice.id),
        KeyContext(one.org_id + 100, one.id, None),
    ):
        with pytest.raises(KeyringError):
            keyring.decrypt(one.ciphertext, other)
    assert User.select().count() == 4


# --- what the gateway's token may do ---


def test_gateway_policy_allows_its_key_and_denies_everything_else(vault: VaultEnv) -> None:
    root = vault.server.client()
    root.secrets.transit.create_key(name="someone-else", derived=True)
    root.secrets.kv.v2.create_or_update_secret(path="team/db", secret={"password": "hunter2"})
    token = root.auth.token.create(
        policies=["tvgate"], no_default_policy=True, ttl="1h", renewable=True
    )["auth"]["client_token"]
    gateway = vault.server.client(token)
    context = context_b64(KeyContext(1, 1, None))
    plaintext = base64.b64encode(b"sk-test").decode()

    # What it may do: its own key, its own token.
    sealed = gateway.adapter.post(
        "/v1/transit/encrypt/tvgate", json={"plaintext": plaintext, "context": context}
    )["data"]["ciphertext"]
    opened = gateway.adapter.post(
        "/v1/transit/decrypt/tvgate", json={"ciphertext": sealed, "context": context}
    )
    assert opened["data"]["plaintext"] == plaintext
    gateway.adapter.post(
        "/v1/transit/rewrap/tvgate", json={"ciphertext": sealed, "context": context}
    )
    assert gateway.auth.token.lookup_self()["data"]["policies"] == ["tvgate"]
    assert gateway.auth.token.renew_self()["auth"]["client_token"] == token

    denied_reads = [
        "/v1/transit/keys/tvgate",  # the key's configuration and versions
        "/v1/transit/export/encryption-key/tvgate",  # the key material
        "/v1/transit/export/encryption-key/tvgate/1",
        "/v1/transit/backup/tvgate",  # a backup is the key material too
        "/v1/transit/keys",
        "/v1/transit/keys/someone-else",
        "/v1/secret/data/team/db",  # any other engine
        "/v1/cubbyhole/anything",  # not even the default policy's paths
        "/v1/sys/mounts",
        "/v1/sys/policies/acl/tvgate",
        "/v1/sys/auth",
        "/v1/auth/approle/role/tvgate/role-id",
        "/v1/auth/token/accessors",
    ]
    for path in denied_reads:
        with pytest.raises(hvac.exceptions.Forbidden):
            gateway.adapter.get(path)
    denied_writes = [
        ("/v1/transit/encrypt/someone-else", {"plaintext": plaintext, "context": context}),
        ("/v1/transit/decrypt/someone-else", {"ciphertext": sealed, "context": context}),
        ("/v1/transit/rewrap/someone-else", {"ciphertext": sealed, "context": context}),
        ("/v1/transit/datakey/plaintext/tvgate", {"context": context}),
        ("/v1/transit/hmac/tvgate", {"input": plaintext}),
        ("/v1/transit/keys/tvgate/rotate", {}),
        ("/v1/transit/keys/tvgate/config", {"exportable": True}),
        ("/v1/transit/keys/tvgate/config", {"min_decryption_version": 1}),
        ("/v1/transit/keys/new-key", {"derived": True}),
        ("/v1/sys/policies/acl/tvgate", {"policy": 'path "*" { capabilities = ["sudo"] }'}),
        ("/v1/sys/mounts/kv2", {"type": "kv"}),
        ("/v1/auth/token/create", {"policies": ["tvgate"]}),
        ("/v1/auth/approle/role/tvgate/secret-id", {}),
        ("/v1/secret/data/team/db", {"data": {"password": "mine"}}),
        ("/v1/cubbyhole/anything", {"x": "y"}),
    ]
    for path, body in denied_writes:
        with pytest.raises(hvac.exceptions.Forbidden):
            gateway.adapter.post(path, json=body)


def test_the_approle_gives_a_token_with_the_gateway_policy_only(vault: VaultEnv) -> None:
    keyring = vault.keyring()
    keyring.check()
    assert keyring.logins == 1
    lookup = vault.server.client().auth.token.lookup_accessor(keyring.token_accessor)["data"]
    assert lookup["policies"] == ["tvgate"]
    assert lookup["renewable"] is True


# --- the gateway's token: AppRole login, renewal, login again ---


def test_approle_token_is_renewed_before_it_expires(vault: VaultEnv) -> None:
    clock = FakeClock()
    keyring = short_role_keyring(vault, "tvgate-renew", "60s", "1h", clock=clock)
    context = KeyContext(3, 3, None)
    ciphertext = keyring.encrypt(SECRET, context)
    accessor = keyring.token_accessor
    assert (keyring.logins, keyring.renewals) == (1, 0)
    root = vault.server.client()
    before = root.auth.token.lookup_accessor(accessor)["data"]

    clock.now += 30  # half the TTL: not yet
    keyring.decrypt(ciphertext, context)
    assert keyring.renewals == 0

    clock.now += 15  # past two thirds of the TTL: renew before it expires
    assert keyring.decrypt(ciphertext, context) == SECRET
    assert (keyring.logins, keyring.renewals) == (1, 1)
    assert keyring.token_accessor == accessor
    after = root.auth.token.lookup_accessor(accessor)["data"]
    assert after.get("last_renewal_time") and not before.get("last_renewal_time")


def test_approle_logs_in_again_when_the_token_is_revoked(vault: VaultEnv) -> None:
    clock = FakeClock()
    keyring = short_role_keyring(vault, "tvgate-revoke", "60s", "1h", clock=clock)
    context = KeyContext(4, 4, None)
    ciphertext = keyring.encrypt(SECRET, context)
    root = vault.server.client()

    # Revoked under our feet, mid-TTL: the request is denied, so log in and retry once.
    first = keyring.token_accessor
    root.auth.token.revoke_accessor(first)
    assert keyring.decrypt(ciphertext, context) == SECRET
    assert keyring.logins == 2 and keyring.token_accessor != first

    # Revoked, and then renewal is due: renewal is impossible, a new login is not.
    second = keyring.token_accessor
    root.auth.token.revoke_accessor(second)
    clock.now += 50
    assert keyring.decrypt(ciphertext, context) == SECRET
    assert keyring.logins == 3 and keyring.token_accessor not in (first, second)


def test_approle_logs_in_again_when_the_token_reaches_its_max_ttl(vault: VaultEnv) -> None:
    """Real time: a 2 s token that may live 3 s at most cannot be renewed for ever."""
    keyring = short_role_keyring(vault, "tvgate-maxttl", "2s", "3s")
    context = KeyContext(5, 5, None)
    ciphertext = keyring.encrypt(SECRET, context)
    first = keyring.token_accessor
    time.sleep(1.5)
    assert keyring.decrypt(ciphertext, context) == SECRET
    time.sleep(2.0)  # the first token is past its max TTL now
    assert keyring.decrypt(ciphertext, context) == SECRET
    assert keyring.logins >= 2 and keyring.token_accessor != first
    with pytest.raises(hvac.exceptions.VaultError):
        vault.server.client().auth.token.lookup_accessor(first)


def test_a_configured_token_is_looked_up_and_renewed(vault: VaultEnv) -> None:
    root = vault.server.client()
    token = root.auth.token.create(
        policies=["tvgate"], no_default_policy=True, ttl="60s", renewable=True
    )["auth"]["client_token"]
    clock = FakeClock()
    keyring = VaultKeyring(vault.addr, token=token, clock=clock)
    context = KeyContext(6, 6, None)
    ciphertext = keyring.encrypt(SECRET, context)
    assert (keyring.logins, keyring.renewals) == (0, 0)
    clock.now += 45
    assert keyring.decrypt(ciphertext, context) == SECRET
    assert keyring.renewals == 1
    # Without AppRole there is no way back from a revoked token: unavailable, and said so.
    root.auth.token.revoke(token)
    with pytest.raises(KeyringUnavailable) as raised:
        keyring.decrypt(ciphertext, context)
    assert token not in str(raised.value) and "denied" in str(raised.value)


# --- failures: unavailable versus bad ciphertext, and never a secret in a message ---


class _FailingVault(http.server.BaseHTTPRequestHandler):
    status = 500

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"errors":["internal error"]}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.parametrize("status", [500, 502])
def test_vault_5xx_is_unavailable(status: int) -> None:
    handler = type("Failing", (_FailingVault,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        keyring = VaultKeyring(
            f"http://127.0.0.1:{server.server_address[1]}", token="s.secret-token-value"
        )
        with pytest.raises(KeyringUnavailable) as raised:
            keyring.encrypt(SECRET, KeyContext(1, 1, None))
        assert f"HTTP {status}" in str(raised.value)
        assert "secret-token-value" not in str(raised.value) and SECRET not in str(raised.value)
    finally:
        server.shutdown()
        server.server_close()


def test_failures_are_classified_without_secrets(vault: VaultEnv, tmp_path: Path) -> None:
    context = KeyContext(8, 8, None)
    good = vault.keyring()
    ciphertext = good.encrypt(SECRET, context)

    # Nothing listens: unavailable.
    closed = VaultKeyring(f"http://127.0.0.1:{free_port()}", token="s.tok-abcdef", timeout=2)
    with pytest.raises(KeyringUnavailable) as raised:
        closed.decrypt(ciphertext, context)
    assert "unreachable" in str(raised.value)

    # A wrong AppRole secret: unavailable (the gateway cannot serve), credentials unsaid.
    wrong = vault.keyring(secret_id="00000000-0000-0000-0000-000000000000")
    with pytest.raises(KeyringUnavailable) as raised:
        wrong.decrypt(ciphertext, context)
    message = str(raised.value)
    assert vault.role_id not in message and "00000000-0000" not in message

    # A transit key that does not exist: unavailable, not the ciphertext's fault.
    missing = vault.keyring(key="no-such-key")
    with pytest.raises(KeyringUnavailable):
        missing.decrypt(ciphertext, context)

    # Tampered or foreign ciphertexts: this row's problem, a KeyringError.
    tampered = ciphertext[:-6] + ("AAAAAA" if not ciphertext.endswith("AAAAAA") else "BBBBBB")
    for bad in (tampered, "vault:v1:bm90IGEgY2lwaGVydGV4dA==", "vault:v999:" + ciphertext[9:]):
        with pytest.raises(KeyringError) as error:
            good.decrypt(bad, context)
        assert SECRET not in str(error.value) and bad not in str(error.value)
    with pytest.raises(KeyringError):
        good.decrypt("local:v1:abc", context)


def test_a_process_with_both_backends_reads_both(vault: VaultEnv, tmp_path: Path) -> None:
    master = base64.b64encode(os.urandom(32)).decode()
    both = load_settings(
        None,
        {
            "TVGATE_DATA_DIR": str(tmp_path),
            "TVGATE_KEYRING": "local",
            "TVGATE_MASTER_KEY": master,
            "TVGATE_VAULT_ADDR": vault.addr,
            "TVGATE_VAULT_ROLE_ID": vault.role_id,
            "TVGATE_VAULT_SECRET_ID": vault.secret_id,
        },
    )
    keyring = build_keyring(both)
    assert isinstance(keyring, KeyringSet) and set(keyring.readers) == {"local", "vault"}
    context = KeyContext(9, 9, None)
    from_local = keyring.encrypt(SECRET, context)
    from_vault = keyring.backend("vault").encrypt(SECRET, context)
    assert from_local.startswith("local:v1:") and from_vault.startswith("vault:v")
    assert keyring.decrypt(from_local, context) == keyring.decrypt(from_vault, context) == SECRET

    # A vault-only process does not create a master key file, and cannot read local ones.
    vault_only = load_settings(
        None, {"TVGATE_DATA_DIR": str(tmp_path), **vault.env(), "TVGATE_KEYRING": "vault"}
    )
    only = build_keyring(vault_only)
    assert set(only.readers) == {"vault"} and not (tmp_path / "master.key").exists()
    assert only.decrypt(from_vault, context) == SECRET
    with pytest.raises(KeyringError) as raised:
        only.decrypt(from_local, context)
    assert "local keyring" in str(raised.value)
    assert LocalKeyring(base64.b64decode(master)).decrypt(from_local, context) == SECRET


def test_migrate_local_to_vault_and_back(vault: VaultEnv, db: None, tmp_path: Path) -> None:
    """The migration mechanics, in process (tests/test_vault_gateway.py does it while a
    gateway serves): every row moves, a row that does not decrypt is reported and kept."""
    local = LocalKeyring(b"m" * 32)
    vault_keyring = vault.keyring()
    both = KeyringSet(local, {"vault": vault_keyring})
    services.add_user("admin@a.test", "org-a", admin=True)
    expected = {}
    for i in range(4):
        expected[f"k{i}"] = f"sk-migrate-{i}-" + "e" * 20
        services.add_key(f"k{i}", "openai", expected[f"k{i}"], local, org_name="org-a")
    rows = {k.name: k for k in ProviderKey.select()}
    # k3 holds k2's ciphertext (a bad restore, say): it cannot be migrated.
    ProviderKey.update(ciphertext=rows["k2"].ciphertext).where(
        ProviderKey.id == rows["k3"].id
    ).execute()

    to_vault = services.migrate_keys(both, vault_keyring, batch_size=3)
    assert (to_vault.updated, to_vault.failed) == (3, ["k3"]) and not to_vault.complete
    assert to_vault.versions == {"vault": 3, "local": 1}
    for name in ("k0", "k1", "k2"):
        row = ProviderKey.get(ProviderKey.name == name)
        assert row.ciphertext.startswith("vault:v")
        assert both.decrypt(row.ciphertext, KeyContext(row.org_id, row.id, None)) == expected[name]

    services.rotate_key("k3", expected["k3"], both, org_name="org-a")  # repaired (as local)
    again = services.migrate_keys(both, vault_keyring)
    assert (again.updated, again.unchanged, again.failed) == (1, 3, [])
    back = services.migrate_keys(KeyringSet(vault_keyring, {"local": local}), local)
    assert (back.updated, back.versions) == (4, {"local": 4})
    for name, secret in expected.items():
        row = ProviderKey.get(ProviderKey.name == name)
        assert local.decrypt(row.ciphertext, KeyContext(row.org_id, row.id, None)) == secret


# --- rotation: rewrap every ciphertext, then retire the old version ---


def test_rotate_rewrap_retire(own_vault: VaultEnv, db: None) -> None:
    keyring = own_vault.keyring()
    operator = own_vault.server.client()
    services.add_user("admin@a.test", "org-a", admin=True)
    services.add_user("admin@b.test", "org-b", admin=True)
    secrets_by_name = {}
    for i in range(5):
        org = "org-a" if i % 2 else "org-b"
        name = f"key-{i}"
        secrets_by_name[name] = f"sk-rotate-{i}-" + "q" * 24
        services.add_key(name, "anthropic", secrets_by_name[name], keyring, org_name=org)
    local = LocalKeyring(b"L" * 32)
    services.add_key("local-one", "openai", "sk-local-" + "w" * 20, local, org_name="org-a")
    before = {k.name: k.ciphertext for k in ProviderKey.select()}
    assert {ciphertext_version(before[f"key-{i}"]) for i in range(5)} == {1}

    status = vault_admin.rotate(operator)
    assert status.latest_version == 2
    report = services.rewrap_keys(keyring, batch_size=2)
    assert (report.updated, report.unchanged, report.failed) == (5, 1, [])
    assert report.versions == {"v2": 5}
    after = {k.name: k for k in ProviderKey.select()}
    assert after["local-one"].ciphertext == before["local-one"]  # not Vault's to rewrap
    for name, secret in secrets_by_name.items():
        row = after[name]
        assert ciphertext_version(row.ciphertext) == 2
        assert keyring.decrypt(row.ciphertext, KeyContext(row.org_id, row.id, None)) == secret

    # Once every ciphertext is at v2, v1 can be retired: the rows still decrypt,
    # a ciphertext kept from before the rewrap no longer does.
    assert vault_admin.retire(operator, 2).min_decryption_version == 2
    for name, secret in secrets_by_name.items():
        row = after[name]
        context = KeyContext(row.org_id, row.id, None)
        assert keyring.decrypt(row.ciphertext, context) == secret
        with pytest.raises(KeyringError):
            keyring.decrypt(before[name], context)

    # A second rewrap has nothing to do; a row holding another row's ciphertext is reported.
    again = services.rewrap_keys(keyring, batch_size=10)
    assert (again.updated, again.unchanged, again.failed) == (0, 6, [])
    ProviderKey.update(ciphertext=after["key-1"].ciphertext).where(
        ProviderKey.id == after["key-2"].id
    ).execute()
    vault_admin.rotate(operator)
    broken = services.rewrap_keys(keyring, batch_size=10)
    assert broken.failed == ["key-2"] and broken.updated == 4 and not broken.complete


def test_a_row_changed_after_it_was_read_is_not_overwritten(vault: VaultEnv, db: None) -> None:
    keyring = vault.keyring()
    services.add_user("admin@a.test", "org-a", admin=True)
    services.add_key("k", "openai", SECRET, keyring, org_name="org-a")
    row = ProviderKey.get(ProviderKey.name == "k")
    context = KeyContext(row.org_id, row.id, None)
    read = row.ciphertext
    rewrapped = keyring.rewrap(read, context)
    # Between the read and the write, an admin replaces the secret.
    services.rotate_key("k", SECRET + "-new", keyring, org_name="org-a")
    assert not services.update_ciphertext_if_unchanged(row.id, read, rewrapped)
    current = ProviderKey.get_by_id(row.id)
    assert keyring.decrypt(current.ciphertext, context) == SECRET + "-new"
    assert services.update_ciphertext_if_unchanged(
        row.id, current.ciphertext, keyring.rewrap(current.ciphertext, context)
    )


# --- the operator's side ---


def test_policy_files_are_the_rendered_policies() -> None:
    for kind, file in (("gateway", "tvgate.hcl"), ("operator", "tvgate-operator.hcl")):
        assert (ROOT / "vault_policies" / file).read_text() == vault_admin.render_policy(kind)
    custom = vault_admin.render_policy("gateway", "kms/transit", "gate-key")
    assert 'path "kms/transit/decrypt/gate-key"' in custom and 'path "transit/' not in custom


def test_cli_vault_setup_writes_the_credentials_file(vault: VaultEnv, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVGATE_", "VAULT_"))}
    env.update({"VAULT_TOKEN": vault.root_token, "PYTHONPATH": str(ROOT)})
    output = tmp_path / "creds" / "tvgate-vault.env"
    result = run(env, "vault", "setup", "--addr", vault.addr, "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "already enabled" in result.stderr and "already exists" in result.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert values["TVGATE_KEYRING"] == "vault" and values["TVGATE_VAULT_ADDR"] == vault.addr
    assert values["TVGATE_VAULT_ROLE_ID"] == vault.role_id
    assert values["TVGATE_VAULT_SECRET_ID"] not in result.stdout + result.stderr
    assert vault.root_token not in result.stdout + result.stderr
    # The new secret_id logs in, to a token with the gateway policy only.
    keyring = vault.keyring(secret_id=values["TVGATE_VAULT_SECRET_ID"])
    context = KeyContext(2, 2, None)
    assert keyring.decrypt(keyring.encrypt(SECRET, context), context) == SECRET
    root = vault.server.client()
    written = root.sys.read_acl_policy("tvgate")["data"]["policy"]
    assert written == (ROOT / "vault_policies" / "tvgate.hcl").read_text()
    # Without --output the credentials go to standard output, for a secret store to take.
    printed = run(env, "vault", "setup", "--addr", vault.addr)
    assert printed.returncode == 0 and "TVGATE_VAULT_SECRET_ID=" in printed.stdout
    # Without a token it says what is missing and does nothing.
    del env["VAULT_TOKEN"]
    refused = run(env, "vault", "setup", "--addr", vault.addr)
    assert refused.returncode == 1 and "operator token" in refused.stderr


def test_operator_policy_sets_up_and_rotates_but_never_decrypts(own_vault: VaultEnv) -> None:
    root = own_vault.server.client()
    token = root.auth.token.create(policies=["tvgate-operator"], no_default_policy=True)["auth"][
        "client_token"
    ]
    operator = own_vault.server.client(token)
    result = vault_admin.setup(operator)  # again, as the operator: idempotent
    assert "policy tvgate-operator is up to date" in result.steps
    assert result.role_id == own_vault.role_id and result.secret_id
    assert vault_admin.rotate(operator).latest_version == 2
    assert vault_admin.key_status(operator).derived
    context = KeyContext(1, 1, None)
    ciphertext = own_vault.keyring().encrypt(SECRET, context)
    for op, body in (
        ("decrypt", {"ciphertext": ciphertext, "context": context_b64(context)}),
        ("encrypt", {"plaintext": "eA==", "context": context_b64(context)}),
    ):
        with pytest.raises(hvac.exceptions.Forbidden):
            operator.adapter.post(f"/v1/transit/{op}/tvgate", json=body)
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.adapter.get("/v1/transit/export/encryption-key/tvgate")
    # It may not widen its own policy either.
    with pytest.raises(vault_admin.VaultAdminError):
        vault_admin._step(
            "write policy",
            lambda: operator.sys.create_or_update_acl_policy(
                name="tvgate-operator", policy='path "*" { capabilities = ["sudo"] }'
            ),
        )


def test_setup_refuses_a_key_that_is_not_derived(own_vault: VaultEnv) -> None:
    root = own_vault.server.client()
    root.secrets.transit.create_key(name="plain")
    with pytest.raises(vault_admin.VaultAdminError) as raised:
        vault_admin.setup(root, key="plain")
    assert "not derived" in str(raised.value)
    assert root.secrets.transit.read_key(name="plain")["data"]["derived"] is False


def test_make_dev_vault_starts_a_ready_openbao(tmp_path: Path) -> None:
    """``make dev-vault``: a dev server set up for tvgate, its settings printed, Ctrl-C ends it."""
    venv = Path(sys.executable).parent.parent
    port = free_port()
    output = tmp_path / "make.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVGATE_", "VAULT_"))}
    with output.open("wb") as out:
        # The venv is already installed: tell make not to reinstall it (-o).
        proc = subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "-o",
                f"{venv}/.installed-test",
                "-o",
                f"{venv}/.installed",
                "dev-vault",
                f"VENV={venv}",
                f"DEV_VAULT_PORT={port}",
                f"DEV_VAULT_DIR={tmp_path / 'dev'}",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops it." not in output.read_text():
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        printed = output.read_text()
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in printed.splitlines()
            if line.strip().startswith("export TVGATE_")
        )
        assert exports["TVGATE_VAULT_ADDR"] == f"http://127.0.0.1:{port}"
        assert stat.S_IMODE((tmp_path / "dev" / "dev-vault.env").stat().st_mode) == 0o600
        settings = load_settings(None, exports)
        keyring = build_keyring(settings)
        context = KeyContext(1, 2, None)
        assert keyring.decrypt(keyring.encrypt(SECRET, context), context) == SECRET
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        proc.wait(30)
    closed = OpenBao(tmp_path, dev=True)
    closed.addr = f"http://127.0.0.1:{port}"
    assert closed.health() == 0
