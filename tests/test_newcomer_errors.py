"""Issue 22 (a newcomer's first hour), items 4, 7 and 11, each against a real ``tvgate serve``.

4: a provider that cannot be reached names its host and the cause (DNS, refused, TLS,
timeout) to the client, in the trace and in a warning log line. 7: an unknown path says
that the endpoint does not exist and how to fix the base URL, in the envelope of the API
the request looks like, never as ``model_not_found`` (and a misplaced provider endpoint
is not a 404, which Claude Code reports as a model problem); an unknown ``/ui/…`` page is
the UI's HTML 404. 11: ``/readyz`` says in words what is wrong with Vault, and a ``vault:``
ciphertext on a gateway without Vault is explained in the log.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from anthropic.types import MessageParam
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayFactory,
    GatewayProcess,
    add_test_key,
    beside,
    free_port,
    setup_vault,
    stop_gateway,
)
from tests.openbao import OpenBao
from tvgate import services
from tvgate.models import Org, ProviderKey, Route, database

CONNECT_TIMEOUT = "2"
PROMPT: list[MessageParam] = [{"role": "user", "content": "hi"}]
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


# --- outside systems that fail in the ways a provider can (threads of this process) ---


class _Listener:
    """A TCP listener on a free port that does ``serve(connection)`` with each connection,
    or never accepts at all (``serve=None``: the kernel completes the TCP handshake, and
    the TLS handshake then waits for ever)."""

    def __init__(self, serve: Any = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.serve = serve
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if serve is not None:
            self.sock.settimeout(0.2)
            self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # A client that gives up (or refuses the certificate) ends the connection.
            with conn, contextlib.suppress(OSError):
                self.serve(conn)

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        if self.thread.is_alive():
            self.thread.join(5)


def _answer_plain_http(conn: socket.socket) -> None:
    """Not a TLS server: whatever the client sends, an HTTP answer in clear text."""
    conn.settimeout(2)
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def _self_signed(directory: Path) -> ssl.SSLContext:
    """A TLS server context with a certificate no CA signed, for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "self-signed.pem", directory / "self-signed.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


def _tls_server(context: ssl.SSLContext) -> Any:
    def serve(conn: socket.socket) -> None:
        conn.settimeout(2)
        # The client refuses the certificate: the handshake fails on its side.
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(4096)

    return serve


@dataclass
class Unreachable:
    """A gateway with a short connect timeout, and an org whose routes lead nowhere."""

    gateway: GatewayProcess
    token: str
    #: route name -> the host (and port) its key's base URL names
    hosts: dict[str, str]
    #: A member of another org, whose one key has a ciphertext Vault made.
    vault_org_token: str


@pytest.fixture(scope="module")
def unreachable(
    gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Unreachable]:
    silent = _Listener()
    plain = _Listener(_answer_plain_http)
    self_signed = _Listener(_tls_server(_self_signed(tmp_path_factory.mktemp("tls"))))
    refused_port = free_port()
    hosts = {
        "to-nowhere": "nonexistent.invalid",
        "to-closed-port": f"127.0.0.1:{refused_port}",
        "to-plain-http": f"127.0.0.1:{plain.port}",
        "to-self-signed": f"127.0.0.1:{self_signed.port}",
        "to-silent": f"127.0.0.1:{silent.port}",
    }
    urls = {
        "to-nowhere": "https://nonexistent.invalid",
        "to-closed-port": f"http://127.0.0.1:{refused_port}",
        "to-plain-http": f"https://127.0.0.1:{plain.port}",
        "to-self-signed": f"https://127.0.0.1:{self_signed.port}",
        "to-silent": f"https://127.0.0.1:{silent.port}",
    }
    gateway.bind()
    org_name = "unreachable-" + uuid.uuid4().hex[:6]
    services.add_user(f"dev@{org_name}.test", org_name)
    token, _ = services.issue_token(f"dev@{org_name}.test", org_name)
    for route, url in urls.items():
        add_test_key(route + "-key", org_name, url)
        services.add_route(route, route + "-key", org_name=org_name)
    vault_org_token = _vault_ciphertext_route()
    database.close()
    gw = beside(
        gateway,
        TVGATE_CONNECT_TIMEOUT=CONNECT_TIMEOUT,
    )
    try:
        yield Unreachable(gw, token, hosts, vault_org_token)
    finally:
        stop_gateway(gw.proc)
        for listener in (silent, plain, self_signed):
            listener.close()


def _vault_ciphertext_route() -> str:
    """An org (the member's token returned) with a key whose ciphertext Vault made (as after
    ``keys migrate --to vault``), for a gateway that has no Vault: written straight into
    the database. An org of its own: until a call finds that the key does not decrypt, the
    trace writer holds the org's bodies back, waiting to learn the key."""
    org_name = "vaultless-" + uuid.uuid4().hex[:6]
    services.add_user(f"dev@{org_name}.test", org_name)
    token, _ = services.issue_token(f"dev@{org_name}.test", org_name)
    org = Org.get(Org.name == org_name)
    key = ProviderKey.create(
        org=org,
        name="vault-made",
        provider="anthropic",
        base_url="https://api.anthropic.com",
        ciphertext="vault:v1:c29tZXRoaW5nIHZhdWx0IHNlYWxlZA==",
        fingerprint="…",
    )
    Route.create(org=org, name="from-vault", key=key, scope="org")
    return token


def _ask(
    setup: Unreachable, route: str, *, stream: bool = False, token: str = ""
) -> tuple[int, dict[str, Any], str]:
    """(status, error, session) of a call on ``route`` through the anthropic SDK."""
    session = uuid.uuid4().hex
    client = anthropic.Anthropic(
        base_url=setup.gateway.url, api_key=token or setup.token, max_retries=0
    )
    with pytest.raises(anthropic.APIStatusError) as failed:
        client.messages.create(
            model=route,
            max_tokens=16,
            messages=PROMPT,
            stream=stream,
            extra_headers={"x-tvgate-session": session},
        )
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    return failed.value.status_code, body["error"], session


def _warnings(gateway: GatewayProcess) -> list[str]:
    lines = [orjson.loads(line) for line in gateway.log_text().splitlines() if line.startswith("{")]
    return [line["msg"] for line in lines if line["level"] == "warning"]


# --- 4: an unreachable provider names its host and the cause ---


@pytest.mark.parametrize(
    ("route", "status", "cause"),
    [
        ("to-nowhere", 502, "DNS lookup failed: the host name does not resolve"),
        ("to-closed-port", 502, "connection refused (nothing listens on that port)"),
        ("to-plain-http", 502, "TLS handshake failed"),
        ("to-self-signed", 502, "TLS certificate not trusted"),
        ("to-silent", 504, f"no connection within {CONNECT_TIMEOUT} s (TVGATE_CONNECT_TIMEOUT)"),
    ],
)
def test_an_unreachable_provider_names_its_host_and_the_cause(
    unreachable: Unreachable, route: str, status: int, cause: str
) -> None:
    host = unreachable.hosts[route]
    got, error, session = _ask(unreachable, route)
    assert got == status
    message = error["message"]
    assert message.startswith(f"could not connect to the provider at {host}: "), message
    assert cause in message
    (trace,) = unreachable.gateway.wait_traces(1, session_id=session)
    assert trace.error_message == message
    assert trace.outcome == ("timeout" if status == 504 else "upstream_error")
    logged = [w for w in _warnings(unreachable.gateway) if f"on route {route!r}" in w]
    assert logged, "no warning logged for the failed call"
    assert message in logged[-1]
    assert ANTHROPIC_SECRET not in unreachable.gateway.log_text()


def test_a_stream_to_a_refused_port_tells_the_host_and_cause_too(
    unreachable: Unreachable,
) -> None:
    status, error, session = _ask(unreachable, "to-closed-port", stream=True)
    assert status == 502
    host = unreachable.hosts["to-closed-port"]
    assert error["message"] == (
        f"could not connect to the provider at {host}: "
        "connection refused (nothing listens on that port)"
    )
    (trace,) = unreachable.gateway.wait_traces(1, session_id=session)
    assert trace.error_message == error["message"]


# --- 11: a vault: ciphertext on a gateway with no Vault ---


def test_a_vault_ciphertext_without_vault_is_explained_in_the_log(
    unreachable: Unreachable,
) -> None:
    status, error, _session = _ask(unreachable, "from-vault", token=unreachable.vault_org_token)
    assert status == 502
    assert error["message"] == "the key of route 'from-vault' cannot be used; ask an admin"
    warnings = _warnings(unreachable.gateway)
    explained = [w for w in warnings if "Vault ciphertext" in w]
    assert explained, warnings
    assert "no Vault is configured here" in explained[0]
    assert "TVGATE_VAULT_ADDR" in explained[0]
    log = unreachable.gateway.log_text()
    assert "key vault-made of org" in log and "vault keyring, which is not configured" in log
    # Once: a second call does not repeat the explanation.
    _ask(unreachable, "from-vault", token=unreachable.vault_org_token)
    assert len([w for w in _warnings(unreachable.gateway) if "Vault ciphertext" in w]) == 1


# --- 7: unknown paths ---


def test_anthropic_base_url_with_v1_is_told_how_to_fix_it(
    gateway: GatewayProcess, member_token: str
) -> None:
    """ANTHROPIC_BASE_URL=https://gw/v1: the SDK posts /v1/v1/messages."""
    client = anthropic.Anthropic(base_url=gateway.url + "/v1", api_key=member_token, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as failed:
        client.messages.create(model="claude-test", max_tokens=16, messages=PROMPT)
    # Not a NotFoundError: Claude Code turns every 404 into "an issue with the selected model".
    assert failed.value.status_code == 400
    body = failed.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    message = body["error"]["message"]
    assert message.startswith("no endpoint POST /v1/v1/messages: /v1 appears twice")
    assert f"ANTHROPIC_BASE_URL={gateway.url})" in message
    assert f"OPENAI_BASE_URL={gateway.url}/v1)" in message
    assert "model" not in message


def test_openai_base_url_without_v1_is_told_how_to_fix_it(
    gateway: GatewayProcess, member_token: str
) -> None:
    """OPENAI_BASE_URL=https://gw: the SDK posts /chat/completions."""
    client = openai.OpenAI(base_url=gateway.url, api_key=member_token, max_retries=0)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="gpt-test", messages=CHAT)
    assert failed.value.status_code == 404
    body = failed.value.body
    assert isinstance(body, dict)
    assert body["code"] == "unknown_endpoint" and body["type"] == "not_found_error"
    assert body["message"].startswith(
        "no endpoint POST /chat/completions: tvgate serves /chat/completions under /v1"
    )
    assert f"OPENAI_BASE_URL={gateway.url}/v1)" in body["message"]


@pytest.mark.parametrize(
    ("method", "path", "headers", "anthropic_envelope"),
    [
        ("POST", "/v1/v1/messages", {"x-api-key": "t"}, True),
        ("POST", "/v1/v1/messages", {"anthropic-version": "2023-06-01"}, True),
        ("POST", "/api2/v1/chat/completions", {}, False),
        ("GET", "/foo", {}, False),
        ("POST", "/foo", {"anthropic-version": "2023-06-01"}, True),
    ],
)
def test_unknown_paths_answer_unknown_endpoint_never_model_not_found(
    gateway: GatewayProcess,
    method: str,
    path: str,
    headers: dict[str, str],
    anthropic_envelope: bool,
) -> None:
    response = httpx2.request(method, gateway.url + path, headers=headers, timeout=10)
    # Only a misplaced Anthropic endpoint is a 400 (Claude Code calls every 404 a model issue).
    assert response.status_code == (400 if path.endswith("/messages") else 404)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if anthropic_envelope:
        assert body["type"] == "error"
        error = body["error"]
        assert error["type"] == "not_found_error"
    else:
        error = body["error"]
        assert error["code"] == "unknown_endpoint" and error["type"] == "not_found_error"
    message = error["message"]
    assert message.startswith(f"no endpoint {method} {path}: ")
    assert "model_not_found" not in response.text
    assert f"ANTHROPIC_BASE_URL={gateway.url}" in message
    if path == "/api2/v1/chat/completions":
        assert "tvgate serves /v1/chat/completions without /api2 in front" in message


def test_an_unknown_ui_page_is_the_uis_html_404(gateway: GatewayProcess) -> None:
    response = httpx2.get(gateway.url + "/ui/nope", timeout=10)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>404</h1>" in response.text
    assert "tvgate has no page /ui/nope." in response.text
    assert '<a class="brand" href="/ui/">tvgate</a>' in response.text
    # The pages' own headers, not the proxy's.
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


# --- 11: /readyz says what is wrong with Vault ---


def test_readyz_says_in_words_what_is_wrong_with_vault(
    vault_gateways: GatewayFactory, tmp_path: Path
) -> None:
    (tmp_path / "openbao").mkdir()
    server = OpenBao(tmp_path / "openbao", dev=True)  # of its own: this test stops it
    server.start()
    try:
        env = setup_vault(server)
        gateway = vault_gateways("readyz-words", vault_env=env)
        assert httpx2.get(gateway.url + "/readyz", timeout=30).status_code == 200

        server.client(server.root_token).sys.seal()
        sealed = httpx2.get(gateway.url + "/readyz", timeout=30)
        assert sealed.status_code == 503
        keyring = sealed.json()["checks"]["keyring"]
        assert (
            keyring
            == "unavailable: cannot encrypt with vault transit: vault is sealed or in standby"
        )

        server.stop()
        down = httpx2.get(gateway.url + "/readyz", timeout=30)
        assert down.status_code == 503
        keyring = down.json()["checks"]["keyring"]
        assert keyring == (
            "unavailable: cannot encrypt with vault transit: vault is unreachable: "
            "connection refused (is it running on that port?)"
        )
        assert "Unavailable" not in orjson.dumps(down.json()).decode()
        # The log also names where Vault was looked for (the answer does not).
        assert f"(vault at {server.addr})" in gateway.log_text()
        assert server.addr not in down.text
    finally:
        server.stop()
