"""What a provider sends back must not leak the key or reach past the API; no route loops.

Review findings 16.6, 16.9 and 16.14, each reproduced against a real ``tvgate serve``:

* A provider that echoes the key it was sent (``x-fake-echo-key``), in an error body, a
  response header, its request id or an in-band stream error split across two chunks:
  the client, the trace (error message, upstream request id, attempts), the database and
  the log see only its masked form.
* A member's own key whose base URL is the gateway and whose secret is the member's
  ``tvg_`` token: refused when it names the gateway's own address; through another
  gateway of the same deployment (which no address check can know) it ends in one 508
  ``loop_detected`` with two traces and no slot held.
* A provider's 3xx becomes a 502 in the API's envelope without its ``Location``; its
  ``Content-Security-Policy`` and ``Access-Control-*`` headers are not relayed, nor what
  it says of its own origin (HSTS, Alt-Svc, cookies, Clear-Site-Data, reporting).
* The key echoed URL-escaped or base64-encoded is masked as the plaintext is.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import httpx2
import openai
import orjson
import pytest

from tests.conftest import (
    GatewayProcess,
    add_fake_key,
    launch_gateway,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.models import Org, Trace
from tvgate.proxy.scrub import KeyScrubber, masked
from tvgate.web import HSTS

MESSAGE = {"model": "leak-echo", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "leak-echo-gpt", "messages": [{"role": "user", "content": "hi"}]}
ECHO = {"x-fake-echo-key": "1"}


@dataclass(frozen=True)
class LeakOrg:
    """An org of its own: keys with secrets no other test uses, so a leak is this test's."""

    name: str
    org_id: int
    member: str
    member_email: str
    anthropic_secret: str
    openai_secret: str
    primary_secret: str
    backup_secret: str
    #: A secret that URL-escaping changes (base64 keys have "+/="), on route leak-odd.
    odd_secret: str

    @property
    def secrets(self) -> list[str]:
        return [
            self.anthropic_secret,
            self.openai_secret,
            self.primary_secret,
            self.backup_secret,
            self.odd_secret,
        ]


@pytest.fixture(scope="module")
def leak(gateway: GatewayProcess, fake_provider: FakeProvider) -> LeakOrg:
    gateway.bind()
    org = "leak-" + secrets.token_hex(3)
    email = f"dev@{org}.test"
    services.add_user(f"admin@{org}.test", org, admin=True)
    services.add_user(email, org)
    services.set_policy(org, allow_user_keys=True, allow_user_routes=True)
    member, _ = services.issue_token(email, org)
    anthropic_secret = add_fake_key(fake_provider, org, "echo", fake_provider.url)
    openai_secret = add_fake_key(
        fake_provider, org, "echo-gpt", fake_provider.openai_url, provider="openai"
    )
    # A primary that fails with a 500 and a backup that is overloaded: both failures are
    # kept as attempts, the backup's is what the client gets.
    primary_secret = add_fake_key(
        fake_provider, org, "primary", fake_provider.url + "/scenario/error_500"
    )
    backup_secret = add_fake_key(
        fake_provider, org, "backup", fake_provider.url + "/scenario/error_529"
    )
    odd_secret = "sk-ant-api03-" + base64.b64encode(secrets.token_bytes(30)).decode() + "+/=="
    add_fake_key(fake_provider, org, "echo-odd", fake_provider.url, secret=odd_secret)
    services.add_route("leak-odd", "echo-odd", org_name=org)
    services.add_route("leak-echo", "echo", model="claude-upstream-1", org_name=org)
    services.add_route("leak-echo-gpt", "echo-gpt", model="gpt-upstream-1", org_name=org)
    services.add_route("leak-backup", "backup", org_name=org)
    services.add_route("leak-chain", "primary", org_name=org, fallbacks=["leak-backup"])
    return LeakOrg(
        org,
        Org.get(Org.name == org).id,
        member,
        email,
        anthropic_secret,
        openai_secret,
        primary_secret,
        backup_secret,
        odd_secret,
    )


def assert_no_secret(text: str, leak: LeakOrg, where: str) -> None:
    for secret in leak.secrets:
        assert secret not in text, f"a provider key reached {where}"


def assert_trace_clean(trace: Trace, leak: LeakOrg) -> None:
    for field in ("error_message", "upstream_request_id", "attempts", "error_type"):
        assert_no_secret(getattr(trace, field) or "", leak, f"the trace's {field}")


def assert_stores_clean(gateway: GatewayProcess, leak: LeakOrg) -> None:
    assert_no_secret(gateway.dump_database(), leak, "the database")
    assert_no_secret(gateway.log_text(), leak, "the log")


def post(
    gw: GatewayProcess, token: str, body: dict[str, object], **headers: str
) -> httpx2.Response:
    return httpx2.post(
        gw.url + "/v1/messages",
        content=orjson.dumps(body),
        headers={"x-api-key": token, "anthropic-version": "2023-06-01", **headers},
        timeout=60,
    )


# --- 16.6: the key a provider echoes -----------------------------------------------------


@pytest.mark.parametrize("scenario", ["error_500", "error_429"])
def test_an_echoed_key_in_an_error_answer_is_masked(
    gateway: GatewayProcess, leak: LeakOrg, scenario: str
) -> None:
    session = uuid.uuid4().hex
    response = post(
        gateway,
        leak.member,
        MESSAGE,
        **ECHO,
        **{"x-fake-scenario": scenario, "x-tvgate-session": session},
    )
    assert response.status_code in (500, 429)
    # The provider's answer still comes through, with the key masked in place.
    assert response.json()["error"]["message"].startswith(
        "Internal server error" if scenario == "error_500" else "This request would exceed"
    )
    assert_no_secret(response.text, leak, "the client's body")
    assert_no_secret(str(response.headers.multi_items()), leak, "the client's headers")
    assert response.headers["x-fake-echoed-key"].endswith(leak.anthropic_secret[-4:])
    assert int(response.headers["content-length"]) == len(response.content)
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.status_code == response.status_code and trace.error_message
    assert trace.upstream_request_id.startswith("req_")
    assert_trace_clean(trace, leak)
    assert_stores_clean(gateway, leak)


def test_an_echoed_key_never_reaches_the_anthropic_sdk(
    gateway: GatewayProcess, leak: LeakOrg
) -> None:
    client = anthropic.Anthropic(
        base_url=gateway.url,
        api_key=leak.member,
        max_retries=0,
        default_headers={**ECHO, "x-fake-scenario": "error_500"},
    )
    with pytest.raises(anthropic.InternalServerError) as raised:
        client.messages.create(
            model="leak-echo", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert_no_secret(str(raised.value), leak, "the SDK's error")
    assert_no_secret(str(raised.value.response.headers), leak, "the SDK's headers")


def test_an_echoed_key_never_reaches_the_openai_sdk(gateway: GatewayProcess, leak: LeakOrg) -> None:
    session = uuid.uuid4().hex
    client = openai.OpenAI(
        base_url=gateway.openai_url,
        api_key=leak.member,
        max_retries=0,
        default_headers={**ECHO, "x-fake-scenario": "error_500", "x-tvgate-session": session},
    )
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="leak-echo-gpt", messages=CHAT["messages"])  # type: ignore[arg-type]
    assert "The server had an error" in str(raised.value)
    assert_no_secret(str(raised.value), leak, "the SDK's error")
    assert_no_secret(str(raised.value.response.headers), leak, "the SDK's headers")
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert_trace_clean(trace, leak)
    assert_stores_clean(gateway, leak)


def test_an_echoed_key_split_across_stream_chunks_is_masked(
    gateway: GatewayProcess, leak: LeakOrg
) -> None:
    """The in-band error of a stream carries the key, written in two halves."""
    session = uuid.uuid4().hex
    response = post(
        gateway,
        leak.member,
        {**MESSAGE, "stream": True},
        **ECHO,
        **{"x-fake-scenario": "error_event", "x-tvgate-session": session},
    )
    assert response.status_code == 200
    assert "event: error" in response.text and "overloaded_error" in response.text
    assert leak.anthropic_secret[-4:] in response.text  # the masked form took its place
    assert_no_secret(response.text, leak, "the client's stream")
    assert_no_secret(str(response.headers.multi_items()), leak, "the client's headers")
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.error_type == "overloaded_error" and "sent with key" in trace.error_message
    assert_trace_clean(trace, leak)
    assert_stores_clean(gateway, leak)


def test_echoed_keys_of_every_attempt_are_masked(gateway: GatewayProcess, leak: LeakOrg) -> None:
    session = uuid.uuid4().hex
    response = post(
        gateway,
        leak.member,
        {**MESSAGE, "model": "leak-chain"},
        **ECHO,
        **{"x-tvgate-session": session},
    )
    assert response.status_code == 529
    assert_no_secret(response.text, leak, "the client's body")
    assert_no_secret(str(response.headers.multi_items()), leak, "the client's headers")
    (trace,) = gateway.wait_traces(1, session_id=session)
    attempts = json.loads(trace.attempts)
    assert [a["status"] for a in attempts] == [500, 529]
    # The primary's failure is kept as an attempt; the backup's answered the client.
    assert "sent with key" in attempts[0]["error"] and "sent with key" in trace.error_message
    assert_trace_clean(trace, leak)
    assert_stores_clean(gateway, leak)


def test_the_masked_form_keeps_the_length_and_hides_the_key() -> None:
    key = "sk-ant-api03-" + "0123456789abcdef" * 6
    assert masked(key) == "sk-ant-" + "*" * (len(key) - 11) + key[-4:]
    assert masked("tvg_" + "x" * 43)[-4:] == "xxxx" and masked("abcdefgh") == "********"


def test_the_scrubber_masks_a_key_split_anywhere_and_a_key_cut_short() -> None:
    key = "sk-proj-" + secrets.token_hex(20)
    body = b'data: {"error": {"message": "bad key ' + key.encode() + b'"}}\n\n'
    want = body.replace(key.encode(), masked(key).encode())
    for first in range(len(body) + 1):
        for second in range(first, len(body) + 1, 7):
            scrubber = KeyScrubber()
            scrubber.add(key)
            parts = (body[:first], body[first:second], body[second:])
            assert b"".join(scrubber.chunk(part) for part in parts) + scrubber.end() == want
    scrubber = KeyScrubber()
    scrubber.add(key)
    # All but the last character of the key, then the body ends: nothing of it gets out.
    out = scrubber.chunk(b"key " + key[:-1].encode()) + scrubber.end()
    assert out == b"key " + masked(key)[:-1].encode()


# --- the key echoed URL-escaped or base64-encoded ------------------------------------------


def assert_no_encoded_key(text: str, secret: str, where: str) -> None:
    """Neither the key URL-escaped nor any base64 run that decodes (at any of its four
    offsets, either alphabet) to the middle of the key, which a masked form does not keep."""
    assert urllib.parse.quote(secret, safe="") not in text, f"the URL-escaped key reached {where}"
    middle = secret[8:-8].encode()
    for alphabet, altchars in ((r"[A-Za-z0-9+/]", b"+/"), (r"[A-Za-z0-9_-]", b"-_")):
        for run in re.findall(alphabet + "{16,}", text):
            for shift in range(4):
                part = run[shift:]
                part = part[: len(part) - len(part) % 4]
                decoded = base64.b64decode(part.encode(), altchars=altchars)
                assert middle not in decoded, f"the base64-encoded key reached {where}"


@pytest.mark.parametrize("encoding", ["url", "base64"])
@pytest.mark.parametrize("stream", [False, True], ids=["error", "stream"])
def test_a_key_echoed_encoded_is_masked(
    gateway: GatewayProcess, leak: LeakOrg, encoding: str, stream: bool
) -> None:
    odd_secret = leak.odd_secret
    session = uuid.uuid4().hex
    response = post(
        gateway,
        leak.member,
        {**MESSAGE, "model": "leak-odd", "stream": stream},
        **{
            "x-fake-echo-key": encoding,
            "x-fake-scenario": "error_event" if stream else "error_500",
            "x-tvgate-session": session,
        },
    )
    assert response.status_code == (200 if stream else 500)
    assert "sent with key" in response.text and "x-fake-echoed-key" in response.headers
    assert_no_encoded_key(response.text, odd_secret, "the client's body")
    assert_no_encoded_key(str(response.headers.multi_items()), odd_secret, "the client's headers")
    if not stream:
        assert int(response.headers["content-length"]) == len(response.content)
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert "sent with key" in trace.error_message
    for field in ("error_message", "upstream_request_id", "attempts", "error_type"):
        assert_no_encoded_key(getattr(trace, field) or "", odd_secret, f"the trace's {field}")
    assert_no_encoded_key(gateway.dump_database(), odd_secret, "the database")
    assert_no_encoded_key(gateway.log_text(), odd_secret, "the log")


def test_the_scrubber_masks_every_encoding_of_a_key_split_anywhere() -> None:
    key = "sk-ant-" + base64.b64encode(secrets.token_bytes(24)).decode() + "+/"
    forms = [
        urllib.parse.quote(key, safe=""),
        base64.b64encode(key.encode()).decode(),
        base64.b64encode(b"Basic " + key.encode()).decode(),
        base64.urlsafe_b64encode(b"u:" + key.encode()).decode(),
    ]
    for form in forms:
        body = b'data: {"error": {"message": "bad key ' + form.encode() + b'"}}\n\n'
        for cut in range(len(body) + 1):
            scrubber = KeyScrubber()
            scrubber.add(key)
            out = scrubber.chunk(body[:cut]) + scrubber.chunk(body[cut:]) + scrubber.end()
            assert len(out) == len(body)
            assert_no_encoded_key(out.decode(), key, f"a chunk cut at {cut} of {form[:12]}")
        scrubber = KeyScrubber()
        scrubber.add(key)
        assert_no_encoded_key(scrubber.text(form), key, "a masked text")


def test_a_key_is_masked_alike_as_a_calls_first_key_and_after_another() -> None:
    key = "sk-ant-" + base64.b64encode(secrets.token_bytes(24)).decode() + "+/"
    other = "sk-proj-" + secrets.token_hex(20)
    body = b" ".join(
        [
            key.encode(),
            urllib.parse.quote(key, safe="").encode(),
            base64.b64encode(b"Basic " + key.encode()),
            other.encode(),
        ]
    )
    for cut in range(len(body) + 1):
        outs = []
        for keys in ([key], [key, key], [other, key], [key, other]):
            scrubber = KeyScrubber()
            for secret in keys:
                scrubber.add(secret)
            outs.append(scrubber.chunk(body[:cut]) + scrubber.chunk(body[cut:]) + scrubber.end())
        first, again, after, both = outs
        assert first == again and after == both, cut
        assert first.startswith(masked(key).encode()) and first.endswith(other.encode())
        assert after == first.replace(other.encode(), masked(other).encode())
        assert_no_encoded_key(first.decode(), key, f"a chunk cut at {cut}")


# --- what a provider says of its own origin ---------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_providers_origin_headers_are_not_relayed(
    gateway: GatewayProcess, leak: LeakOrg, stream: bool
) -> None:
    """HSTS, Alt-Svc, cookies, Clear-Site-Data and reporting endpoints speak for the origin
    that sends them: the gateway's origin (which serves the web UI too) is tvgate's."""
    response = post(
        gateway, leak.member, {**MESSAGE, "stream": stream}, **{"x-fake-origin-headers": "1"}
    )
    assert response.status_code == 200
    assert "x-fake-request-id" in response.headers  # the provider's own headers still pass
    for name in ("strict-transport-security", "alt-svc", "set-cookie", "clear-site-data"):
        assert name not in response.headers, name
    for name in ("nel", "report-to"):
        assert name not in response.headers, name


def test_the_gateways_own_hsts_stays_on_a_proxied_answer(
    deployment: Deployment, leak: LeakOrg
) -> None:
    """With an https public URL tvgate sets HSTS itself; the provider's does not replace it."""
    response = post(deployment.first, leak.member, MESSAGE)
    assert response.status_code == 200
    assert response.headers.get_list("strict-transport-security") == [HSTS]


# --- 16.9: a route through the gateway itself ---------------------------------------------


@dataclass
class Deployment:
    """Two gateways on one database (two VMs of one deployment), with a public URL."""

    first: GatewayProcess
    second: GatewayProcess
    public_url: str


@pytest.fixture(scope="module")
def deployment(gateway: GatewayProcess, leak: LeakOrg) -> Iterator[Deployment]:
    public_url = "https://gateway.leak.test"
    # A cap on calls open at once across both: a loop that held slots would exhaust it.
    env = {
        "TVGATE_PUBLIC_URL": public_url,
        "TVGATE_MAX_CONCURRENT_CALLS": "4",
        "TVGATE_QUEUE_TIMEOUT": "1",
    }
    first = launch_gateway(gateway.database_url, gateway.data_dir, gateway.tokens, **env)
    try:
        second = launch_gateway(gateway.database_url, gateway.data_dir, gateway.tokens, **env)
    except BaseException:
        stop_gateway(first.proc)
        raise
    yield Deployment(first, second, public_url)
    stop_gateway(second.proc)
    stop_gateway(first.proc)


def api(gw: GatewayProcess, token: str) -> httpx2.Client:
    return httpx2.Client(
        base_url=gw.url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def add_token_as_key(
    client: httpx2.Client, leak: LeakOrg, name: str, base_url: str
) -> httpx2.Response:
    """``POST /keys``: a member's own Anthropic key on ``base_url`` whose secret is the
    member's own ``tvg_`` token (what points a route back at a gateway)."""
    key = {"name": name, "provider": "anthropic", "secret": leak.member, "base_url": base_url}
    return client.post("/keys", json=key)


@pytest.mark.parametrize(
    "address",
    ["listen", "localhost", "any", "public", "public-default-port"],
)
def test_a_key_whose_base_url_is_the_gateway_itself_is_refused(
    deployment: Deployment, leak: LeakOrg, address: str
) -> None:
    gw = deployment.first
    port = gw.url.rsplit(":", 1)[1]
    base_url = {
        "listen": gw.url,
        "localhost": f"http://localhost:{port}/",
        "any": f"http://0.0.0.0:{port}",
        "public": deployment.public_url + "/v1/",
        "public-default-port": "https://GATEWAY.leak.test:443",
    }[address]
    name = "self-" + secrets.token_hex(3)
    with api(gw, leak.member) as client:
        response = add_token_as_key(client, leak, name, base_url)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request" and "this gateway" in error["message"]
        assert name not in {k["name"] for k in client.get("/keys").json()["keys"]}


def test_the_cli_refuses_the_gateways_own_address_too(
    gateway: GatewayProcess, leak: LeakOrg
) -> None:
    refused = gateway.cli(
        "keys",
        "add",
        "self-cli",
        "--provider",
        "anthropic",
        "--org",
        leak.name,
        "--base-url",
        gateway.url.replace("127.0.0.1", "localhost"),
        stdin=leak.member + "\n",
    )
    assert refused.returncode == 1 and "this gateway itself" in refused.stderr, refused.stderr
    assert leak.member not in refused.stdout + refused.stderr


def test_a_route_looping_through_the_deployment_ends_in_one_508(
    deployment: Deployment, leak: LeakOrg, fake_provider: FakeProvider
) -> None:
    """The finding's setup: a member's own key with the member's ``tvg_`` token as its secret
    and a base URL that reaches the gateway (here through the second gateway of the same
    deployment, which the first cannot tell from any other address)."""
    first, second = deployment.first, deployment.second
    route = "loop-" + secrets.token_hex(3)
    with api(first, leak.member) as client:
        created = add_token_as_key(client, leak, route, second.url)
        assert created.status_code == 201, created.text
        made = client.post("/routes", json={"name": route, "key": route})
        assert made.status_code == 201, made.text
    sdk = anthropic.Anthropic(base_url=first.url, api_key=leak.member, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as raised:
        sdk.messages.create(
            model=route, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == 508
    assert raised.value.body["error"]["type"] == "loop_detected"  # type: ignore[index]
    # One trace of the call the member made (the provider's answer: the second gateway's
    # 508), one of the call that came back (refused before it had a route).
    traces = first.wait_traces(2, org_id=leak.org_id, requested_model=route)
    assert sorted((t.route_name, t.status_code, t.error_type) for t in traces) == [
        ("", 508, "loop_detected"),
        (route, 508, "loop_detected"),
    ]
    assert_no_secret(str([t.error_message for t in traces]), leak, "the loop's traces")
    # No slot stays held: with a cap of 4, four calls at once still get through.
    ok = [post(first, leak.member, MESSAGE) for _ in range(4)]
    assert [r.status_code for r in ok] == [200] * 4


def test_a_client_cannot_pass_off_a_mark_and_the_mark_is_never_relayed(
    deployment: Deployment, leak: LeakOrg, fake_provider: FakeProvider
) -> None:
    """Another deployment's mark travels on (a loop through two deployments is caught too);
    the mark is never in an answer; a chain that is too long is refused."""
    test_id = uuid.uuid4().hex
    response = post(
        deployment.first,
        leak.member,
        MESSAGE,
        **{"x-tvgate-hop": "elsewhere", "x-test-id": test_id},
    )
    assert response.status_code == 200
    assert "x-tvgate-hop" not in response.headers
    (upstream,) = [r for r in fake_provider.requests if r.headers.get("x-test-id") == test_id]
    marks = [mark.strip() for mark in upstream.headers["x-tvgate-hop"].split(",")]
    assert marks[0] == "elsewhere" and len(marks) == 2 and marks[1] != "elsewhere"
    too_long = post(
        deployment.first,
        leak.member,
        MESSAGE,
        **{"x-tvgate-hop": ", ".join(f"gw{i}" for i in range(20))},
    )
    assert too_long.status_code == 508
    assert too_long.json()["error"]["type"] == "loop_detected"


# --- 16.14: what a provider's answer may not do on the gateway's origin --------------------


@pytest.mark.parametrize("status", ["301", "307", "308"])
@pytest.mark.parametrize("api_kind", ["anthropic", "openai"])
def test_a_provider_redirect_is_a_502_without_its_location(
    gateway: GatewayProcess, leak: LeakOrg, fake_provider: FakeProvider, api_kind: str, status: str
) -> None:
    session = uuid.uuid4().hex
    headers = {
        "x-fake-scenario": "redirect",
        "x-fake-redirect-status": status,
        "x-tvgate-session": session,
        "Authorization": f"Bearer {leak.member}",
    }
    if api_kind == "anthropic":
        response = httpx2.post(gateway.url + "/v1/messages", json=MESSAGE, headers=headers)
    else:
        response = httpx2.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 502, response.text
    assert "location" not in response.headers
    body = response.json()
    if api_kind == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
    else:
        assert body["error"]["type"] == "server_error"
    assert "redirect" in (body["error"]["message"])
    assert not any(r.path == "/v1/redirected" for r in fake_provider.requests)
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.status_code == 502 and trace.outcome == "upstream_error"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_provider_csp_and_cors_headers_are_not_relayed(
    gateway: GatewayProcess, leak: LeakOrg, stream: bool
) -> None:
    response = post(gateway, leak.member, {**MESSAGE, "stream": stream}, **{"x-fake-cors": "1"})
    assert response.status_code == 200
    assert "x-fake-request-id" in response.headers  # the provider's own headers still pass
    for name in (
        "content-security-policy",
        "access-control-allow-origin",
        "access-control-allow-credentials",
    ):
        assert name not in response.headers, name
