"""Focused tests of the small pieces: settings, body decoding, the local keyring, routing, addresses."""

from __future__ import annotations

import base64
import gzip
import uuid
from pathlib import Path

import orjson
import pytest
import zstandard
from tornado.httputil import HTTPHeaders

from tvgate.config import ConfigError, load_settings
from tvgate.headers import header
from tvgate.identity import Principal
from tvgate.keyring import KeyContext, KeyringError
from tvgate.keyring.local import LocalKeyring
from tvgate.models import SCOPE_ORG, SCOPE_OWNED, SCOPE_USER, ProviderKey, Route
from tvgate.proxy.body import BodyError, decode_content, parse_request_body, with_model
from tvgate.proxy.record import new_trace_id, server_address
from tvgate.proxy.upstream import is_public_address
from tvgate.routing import OrgPolicy, OrgSnapshot, _entry

# --- settings ---


def test_environment_overrides_the_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "tvgate.toml"
    config.write_text(
        'listen = "0.0.0.0:9000"\nidle_timeout = 60\nallow_private_upstreams = true\n'
    )
    settings = load_settings(str(config), {"TVGATE_IDLE_TIMEOUT": "5"})
    assert settings.listen == "0.0.0.0:9000" and settings.port == 9000
    assert settings.idle_timeout == 5
    assert settings.allow_private_upstreams is True
    assert settings.max_clients == 1000 and settings.max_body_bytes == 32 * 1024 * 1024


def test_defaults_are_embedded() -> None:
    settings = load_settings(None, {})
    assert settings.listen == "127.0.0.1:8080"
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.keyring == "local" and settings.allow_private_upstreams is False


@pytest.mark.parametrize(
    "environ",
    [
        {"TVGATE_LISTEN": "nohost"},
        {"TVGATE_MAX_CLIENTS": "many"},
        {"TVGATE_ALLOW_PRIVATE_UPSTREAMS": "perhaps"},
        {"TVGATE_DATABASE_URL": "mysql://x"},
        {"TVGATE_KEYRING": "plaintext"},
    ],
)
def test_bad_settings_are_refused(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_settings(None, environ)


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "tvgate.toml"
    config.write_text("lisen = 1\n")
    with pytest.raises(ConfigError, match="lisen"):
        load_settings(str(config), {})


# --- request bodies ---

LIMIT = 1024


def test_gzip_and_zstd_decode_within_the_limit() -> None:
    plain = b'{"model": "m"}'
    assert decode_content(gzip.compress(plain), "gzip", LIMIT) == plain
    assert decode_content(zstandard.ZstdCompressor().compress(plain), "zstd", LIMIT) == plain
    assert decode_content(plain, "identity", LIMIT) == plain


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_decoding_stops_at_the_limit(coding: str) -> None:
    big = b"0" * (LIMIT * 50)
    packed = gzip.compress(big) if coding == "gzip" else zstandard.ZstdCompressor().compress(big)
    with pytest.raises(BodyError) as caught:
        decode_content(packed, coding, LIMIT)
    assert caught.value.status == 413


def test_truncated_and_unknown_encodings() -> None:
    with pytest.raises(BodyError, match="truncated"):
        decode_content(gzip.compress(b'{"model": "m"}')[:-6], "gzip", LIMIT)
    with pytest.raises(BodyError) as caught:
        decode_content(b"x", "br", LIMIT)
    assert caught.value.status == 415


def test_model_rewrite_keeps_every_other_field() -> None:
    raw = b'{"model":"alias","stream":true,"odd":{"n":[1,2]}}'
    body = parse_request_body(raw)
    assert with_model(body, "alias") is raw
    rewritten = with_model(body, "real-model")
    assert rewritten == b'{"model":"real-model","stream":true,"odd":{"n":[1,2]}}'
    assert parse_request_body(rewritten).stream is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Only the top level's model changes, wherever it is and whatever else says "model".
        (
            b'{"messages":[{"content":{"model":"alias"}}], "model" : "alias","x":"\\\\"}',
            b'{"messages":[{"content":{"model":"alias"}}], "model" : "real","x":"\\\\"}',
        ),
        (
            b'{"tools":{"model":"alias"},"model":"alias"}',
            b'{"tools":{"model":"alias"},"model":"real"}',
        ),
        (
            b' {\n "model" : "alias", "n": {"model":"alias"}}',
            b' {\n "model" : "real", "n": {"model":"alias"}}',
        ),
        (
            b'{"m":"\\"model\\":\\"alias\\"","model":"alias"}',
            b'{"m":"\\"model\\":\\"alias\\"","model":"real"}',
        ),
        # Written with escapes: rewritten through objects (the rest is equal, not byte-equal).
        (b'{"mod\\u0065l":"alias","n":1}', b'{"model":"real","n":1}'),
        (b'{"model":"\\u0061lias","n":1}', b'{"model":"real","n":1}'),
        # A body simdjson refuses and orjson takes (an integer past 64 bits).
        (b'{"model":"alias","seed":123456789012345678901234}', None),
    ],
)
def test_model_rewrite_changes_only_the_top_level_model(raw: bytes, expected: bytes | None) -> None:
    body = parse_request_body(raw)
    assert body.model == "alias"
    rewritten = with_model(body, "real")
    if expected is not None:
        assert rewritten == expected
    assert orjson.loads(rewritten)["model"] == "real"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model":"a","model":"b"}', "more than once"),
        (b'{"model":"a","seed":123456789012345678901234,"model":"b"}', "more than once"),
        (b'{"model":"a",}', "not valid JSON: trailing comma"),
        (b'{"model":"\\ud800"}', "not valid JSON"),
        (b'{"model":"a"} x', "not valid JSON"),
        (b'{"model":"a\xff"}', "not valid JSON"),
        (b'["model"]', "must be a JSON object"),
        (b'{"model":{"name":"a"}}', "has no 'model'"),
        (b'{"messages":[]}', "has no 'model'"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message) as caught:
        parse_request_body(raw)
    assert caught.value.status == 400


# --- local keyring ---


def test_local_keyring_binds_ciphertext_to_its_row() -> None:
    keyring = LocalKeyring(b"m" * 32)
    context = KeyContext(org_id=1, key_id=7, owner_id=None)
    sealed = keyring.encrypt("sk-secret-value", context)
    assert "sk-secret-value" not in sealed
    assert keyring.decrypt(sealed, context) == "sk-secret-value"
    assert sealed != keyring.encrypt("sk-secret-value", context)  # a fresh nonce each time
    for moved in (KeyContext(1, 8), KeyContext(2, 7), KeyContext(1, 7, owner_id=3)):
        with pytest.raises(KeyringError) as caught:
            keyring.decrypt(sealed, moved)
        assert "sk-secret" not in str(caught.value)
    with pytest.raises(KeyringError):
        LocalKeyring(b"x" * 32).decrypt(sealed, context)
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(KeyringError):
        keyring.decrypt(tampered, context)


def test_master_key_from_environment(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "TVGATE_MASTER_KEY": base64.b64encode(b"z" * 32).decode(),
            "TVGATE_DATA_DIR": str(tmp_path),
        },
    )
    keyring = LocalKeyring.from_settings(settings)
    assert keyring.decrypt(keyring.encrypt("s", KeyContext(1, 1)), KeyContext(1, 1)) == "s"
    assert not (tmp_path / "master.key").exists()


# --- routing ---

ALICE = Principal(user_id=10, org_id=1, org_name="acme", email="a@x", role="member")
BOB = Principal(user_id=11, org_id=1, org_name="acme", email="b@x", role="member")


def snapshot(
    *routes: tuple[int, str, str, int | None, int | None], allow_user_routes: bool = True
) -> OrgSnapshot:
    snap = OrgSnapshot(org_id=1, policy=OrgPolicy(allow_user_routes, allow_user_keys=True))
    for route_id, name, scope, user_id, key_owner in routes:
        route = Route(id=route_id, name=name, upstream_model="", scope=scope, user_id=user_id)
        key = ProviderKey(
            id=route_id,
            org_id=1,
            name=f"k{route_id}",
            provider="anthropic",
            base_url="https://x",
            ciphertext="ct",
            owner_id=key_owner,
        )
        entry = _entry(route, key, frozenset())
        (
            snap.patterns.append(entry)
            if entry.is_pattern
            else snap.exact.setdefault(name, []).append(entry)
        )
    return snap


def resolved_id(snap: OrgSnapshot, user: Principal, model: str) -> int | None:
    """The id of the route ``model`` resolves to for ``user``; None: no route."""
    entry = snap.resolve(user, model)
    return None if entry is None else entry.id


def test_exact_beats_pattern_and_scope_order() -> None:
    snap = snapshot(
        (1, "claude-*", SCOPE_ORG, None, None),
        (2, "claude-haiku-*", SCOPE_ORG, None, None),
        (3, "claude-sonnet", SCOPE_ORG, None, None),
        (4, "claude-sonnet", SCOPE_USER, 10, None),
        (5, "claude-sonnet", SCOPE_OWNED, 10, 10),
    )
    assert resolved_id(snap, ALICE, "claude-sonnet") == 5
    assert resolved_id(snap, BOB, "claude-sonnet") == 3
    assert resolved_id(snap, ALICE, "claude-haiku-4-5") == 2  # longest literal prefix
    assert resolved_id(snap, ALICE, "claude-opus") == 1
    assert snap.resolve(ALICE, "gpt-4o") is None


def test_owned_routes_follow_the_org_switch_and_key_ownership() -> None:
    snap = snapshot((5, "mine", SCOPE_OWNED, 10, 10), allow_user_routes=False)
    assert snap.resolve(ALICE, "mine") is None
    # An org route that points at someone's private key is not usable by others.
    snap = snapshot((6, "shared", SCOPE_ORG, None, 10))
    assert snap.resolve(ALICE, "shared") is not None
    assert snap.resolve(BOB, "shared") is None
    assert [r.name for r in snap.available(BOB)] == []


# --- upstream addresses ---


@pytest.mark.parametrize(
    ("host", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("not-an-ip", False),
    ],
)
def test_public_address_check(host: str, public: bool) -> None:
    assert is_public_address(host) is public


# --- trace ids and server addresses ---


def test_trace_ids_are_random_version_4_uuids_in_hex() -> None:
    ids = {new_trace_id() for _ in range(2000)}
    assert len(ids) == 2000
    for trace_id in ids:
        parsed = uuid.UUID(hex=trace_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert parsed.hex == trace_id  # 32 lower-case hex digits, as uuid4().hex
    # Every bit but the version's and the variant's varies.
    assert {int(trace_id[12], 16) for trace_id in ids} == {4}
    assert {int(trace_id[16], 16) for trace_id in ids} == {8, 9, 10, 11}
    assert {trace_id[0] for trace_id in ids} == set("0123456789abcdef")


@pytest.mark.parametrize(
    ("base_url", "host"),
    [
        ("https://api.anthropic.com", "api.anthropic.com"),
        ("https://API.OpenAI.com/v1", "api.openai.com"),
        ("http://user:pw@vllm.internal:8000/v1", "vllm.internal"),
        ("http://[2001:db8::1]:8000/v1", "2001:db8::1"),
        ("not a url", ""),
    ],
)
def test_server_address_is_the_base_urls_host(base_url: str, host: str) -> None:
    assert server_address(base_url) == host
    assert server_address(base_url) == host  # cached, the same


# --- reading a header ---


def test_header_reads_a_field_as_tornado_does() -> None:
    headers = HTTPHeaders.parse(
        "User-Agent: claude-cli/2.1.0\r\nX-Multi: a\r\nx-multi: b, c\r\nX-Empty: \r\n"
    )
    for name in ("User-Agent", "user-agent", "X-MULTI", "X-Empty"):
        assert header(headers, name) == headers.get(name)
    assert header(headers, "x-multi") == "a,b, c"
    assert header(headers, "Traceparent") == "" and headers.get("Traceparent") is None
