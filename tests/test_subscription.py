"""A member's own Claude subscription (Pro/Max) through a real ``tvgate serve`` (issue 21.1).

The Anthropic side is tests/fake_provider.py with ``oauth_tokens``: like Anthropic, it takes
only a subscription's OAuth bearer with the OAuth beta, and refuses an API key, a tvgate
token and a bearer without the beta. The member names themselves in ``x-tvgate-token``.

* The fake refuses what Anthropic refuses.
* With the org's switch off (the default), a 403 in Anthropic's envelope saying so and what
  to do; nothing reaches Anthropic. A member cannot turn it on; an admin can (API, CLI).
* On: the official ``anthropic`` SDK (``auth_token`` the OAuth bearer), streamed and not,
  and a token count, reach Anthropic with the bearer and the beta header unchanged, the
  model as sent, no tvgate token; each call is traced as the member's, marked
  ``client_credential = "subscription"``, with its usage; the member's rate limit applies.
* Another org's member cannot ride this org's switch, with or without ``x-tvgate-org``.
* The other endpoints refuse a subscription (400 in their API's envelope).
* The users list (API and UI) shows who routes a subscription through tvgate, how often.
* Canary: the bearer is in no answer, trace row, body, log line, spool entry, metric, OTLP
  span or file of the data directory, even when the provider echoes it back.
* Real Claude Code with ``CLAUDE_CODE_OAUTH_TOKEN`` runs a Bash session through tvgate; with
  the switch off it reports the 403's message.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import jwt
import orjson
import pytest
from tornado.httputil import HTTPHeaders

from tests.clients import Setup, claude_bash_session, claude_result, run_claude
from tests.conftest import ANTHROPIC_SECRET, GatewayProcess, scrape, seed
from tests.fake_provider import OAUTH_BETA, OAUTH_UNSUPPORTED, FakeProvider
from tests.harness import beside, launch_gateway, stop_gateway
from tests.test_otel import Receiver
from tests.test_security_writer import SqliteLock, _decoded_strings
from tvgate import services
from tvgate.identity.authenticator import subscription_credentials
from tvgate.models import CLIENT_SUBSCRIPTION, Trace, User, database

#: A subscription's OAuth bearer, as Claude Code holds one (``claude setup-token``).
OAUTH = "sk-ant-oat01-" + secrets.token_urlsafe(48)
#: The betas a subscription's call carries: the OAuth one among Claude Code's others.
BETAS = f"claude-code-20250219,{OAUTH_BETA},interleaved-thinking-2025-05-14"
#: A model no route of acme's is named: a subscription's calls take the model as sent.
MODEL = "claude-opus-4-7"


@pytest.fixture(scope="module")
def anthropic_api() -> Iterator[FakeProvider]:
    """The Anthropic API as a subscription meets it: no API key is any good there."""
    fake = FakeProvider(accepted_keys=set(), oauth_tokens={OAUTH}).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def gw(gateway: GatewayProcess, anthropic_api: FakeProvider) -> Iterator[GatewayProcess]:
    with beside(gateway, TVGATE_SUBSCRIPTION_BASE_URL=anthropic_api.url) as started:
        yield started


def api(gw: GatewayProcess, email: str) -> httpx2.Client:
    return httpx2.Client(
        base_url=gw.url + "/api/v1",
        headers={"Authorization": f"Bearer {gw.tokens[email]}"},
        timeout=30,
    )


def subscribed(gw: GatewayProcess, email: str, session: str, **headers: str) -> anthropic.Anthropic:
    """The ``anthropic`` SDK as a member signed in with their subscription uses it through
    tvgate: the OAuth bearer as its auth token, their tvgate token in ``x-tvgate-token``."""
    return anthropic.Anthropic(
        base_url=gw.url,
        api_key=None,
        auth_token=OAUTH,
        max_retries=0,
        default_headers={
            "x-tvgate-token": gw.tokens[email],
            "anthropic-beta": BETAS,
            "x-tvgate-session": session,
            **headers,
        },
    )


def raw_headers(gw: GatewayProcess, email: str, session: str = "") -> dict[str, str]:
    return {
        "Authorization": f"Bearer {OAUTH}",
        "x-tvgate-token": gw.tokens[email],
        "anthropic-beta": BETAS,
        "anthropic-version": "2023-06-01",
        "x-tvgate-session": session or uuid.uuid4().hex,
    }


def ask(gw: GatewayProcess, session: str, **extra: Any) -> httpx2.Response:
    return httpx2.post(
        gw.url + "/v1/messages",
        json={
            "model": MODEL,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello subscription"}],
            **extra.pop("body", {}),
        },
        headers={**raw_headers(gw, "dev@acme.test", session), **extra},
        timeout=60,
    )


def set_switch(gw: GatewayProcess, on: bool) -> None:
    """acme's switch, set by its admin through the gateway's API (in force there at once)."""
    with api(gw, "admin@acme.test") as admin:
        changed = admin.patch("/policy", json={"subscription_passthrough": on})
    assert changed.status_code == 200, changed.text
    assert changed.json()["subscription_passthrough"] is on


@pytest.fixture
def passthrough(gw: GatewayProcess) -> Iterator[None]:
    set_switch(gw, True)
    try:
        yield
    finally:
        set_switch(gw, False)


def test_the_fake_takes_only_a_subscriptions_bearer_with_its_beta(
    anthropic_api: FakeProvider, gateway: GatewayProcess
) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    version = {"anthropic-version": "2023-06-01"}

    def status(headers: dict[str, str]) -> tuple[int, str]:
        reply = httpx2.post(
            anthropic_api.url + "/v1/messages", json=body, headers=version | headers
        )
        return reply.status_code, reply.json().get("error", {}).get("message", "")

    assert status({"Authorization": f"Bearer {OAUTH}", "anthropic-beta": BETAS})[0] == 200
    assert status({"Authorization": f"Bearer {OAUTH}"}) == (401, OAUTH_UNSUPPORTED)
    bearer_and_key = {"Authorization": f"Bearer {OAUTH}", "anthropic-beta": OAUTH_BETA}
    assert status(bearer_and_key | {"x-api-key": ANTHROPIC_SECRET})[0] == 401
    for credential in (ANTHROPIC_SECRET, gateway.tokens["dev@acme.test"]):
        as_key = {"x-api-key": credential, "anthropic-beta": OAUTH_BETA}
        as_bearer = {"Authorization": f"Bearer {credential}", "anthropic-beta": OAUTH_BETA}
        assert status(as_key)[0] == status(as_bearer)[0] == 401


@pytest.mark.parametrize(
    ("authorization", "named", "read"),
    [
        (f"Bearer {OAUTH}", "tvg_me", ("tvg_me", OAUTH)),
        (f"bearer  {OAUTH} ", " tvg_me ", ("tvg_me", OAUTH)),
        (f"Bearer {OAUTH}", "", None),  # no one named: signs in (and fails) as usual
        ("Bearer tvg_other", "tvg_me", None),  # a tvgate credential: the usual sign-in
        ("Bearer tvs_session", "tvg_me", None),
        (f"Bearer {jwt.encode({'sub': 'me'}, 'k' * 32, algorithm='HS256')}", "tvg_me", None),
        (f"Basic {OAUTH}", "tvg_me", None),
        ("", "tvg_me", None),
    ],
)
def test_which_requests_carry_a_subscription(
    authorization: str, named: str, read: tuple[str, str] | None
) -> None:
    headers = HTTPHeaders({"Authorization": authorization, "x-tvgate-token": named})
    assert subscription_credentials(headers) == read


def test_with_the_switch_off_a_subscription_is_refused_in_anthropics_envelope(
    gw: GatewayProcess, anthropic_api: FakeProvider
) -> None:
    session, before = uuid.uuid4().hex, len(anthropic_api.requests)
    client = subscribed(gw, "dev@acme.test", session)
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        client.messages.create(
            model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 403
    body = refused.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"
    message = body["error"]["message"]
    assert "subscription passthrough is off for org 'acme'" in message
    assert "tvgate policy set --org acme --subscription-passthrough on" in message
    assert len(anthropic_api.requests) == before, "the call went to Anthropic"
    (trace,) = gw.wait_traces(1, session_id=session)
    assert (trace.status_code, trace.outcome) == (403, "rejected")
    assert trace.client_credential == CLIENT_SUBSCRIPTION


def test_a_member_cannot_turn_the_switch_on_and_an_admin_can(gw: GatewayProcess) -> None:
    with api(gw, "dev@acme.test") as member:
        refused = member.patch("/policy", json={"subscription_passthrough": True})
        assert refused.status_code == 403, refused.text
    with api(gw, "admin@acme.test") as admin:
        assert admin.get("/policy").json()["subscription_passthrough"] is False
        assert admin.patch("/policy", json={"subscription_passthrough": "yes"}).status_code == 400
        # The operator's CLI, as the README says.
        for value in ("on", "off"):
            done = gw.cli("policy", "set", "--org", "acme", "--subscription-passthrough", value)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["subscription_passthrough"] is (value == "on")
        assert admin.get("/policy").json()["subscription_passthrough"] is False
        events = admin.get("/audit").json()["events"]
    refusal = next(e for e in events if e["action"] == "set policy" and not e["allowed"])
    assert refusal["actor"] == "dev@acme.test"


def _forwarded(fake: FakeProvider, marker: str) -> list[Any]:
    """What reached the fake Anthropic of the calls that carried ``marker`` in their prompt."""
    return [r for r in fake.requests if marker.encode() in r.body]


def test_the_sdk_passes_a_subscription_through_streamed_and_not(
    gw: GatewayProcess,
    anthropic_api: FakeProvider,
    fake_provider: FakeProvider,
    passthrough: None,
) -> None:
    session, marker = uuid.uuid4().hex, "marker-" + uuid.uuid4().hex[:8]
    client = subscribed(gw, "dev@acme.test", session)
    messages: Any = [{"role": "user", "content": f"hello {marker}"}]
    answer = client.messages.create(model=MODEL, max_tokens=64, messages=messages)
    assert answer.content[0].type == "text"
    assert answer.content[0].text == f"You said: hello {marker}"
    with client.messages.stream(model=MODEL, max_tokens=64, messages=messages) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "text" and streamed.content[0].text == answer.content[0].text
    counted = client.messages.count_tokens(model=MODEL, messages=messages)
    assert counted.input_tokens > 0

    sent = _forwarded(anthropic_api, marker)
    assert [r.path for r in sent] == ["/v1/messages", "/v1/messages", "/v1/messages/count_tokens"]
    member_token = gw.tokens["dev@acme.test"]
    for request in sent:
        assert request.headers["authorization"] == f"Bearer {OAUTH}"
        assert request.headers["anthropic-beta"] == BETAS
        assert "x-api-key" not in request.headers
        # tvgate's own headers dropped, but for its loop mark.
        assert {n for n in request.headers if n.startswith("x-tvgate")} == {"x-tvgate-hop"}
        assert member_token not in json.dumps(request.headers)
        assert request.json()["model"] == MODEL

    traces = gw.wait_traces(3, session_id=session)
    gw.bind()
    dev = User.get(User.email == "dev@acme.test")
    assert {(t.user_id, t.client_credential, t.route_name, t.key_name) for t in traces} == {
        (dev.id, CLIENT_SUBSCRIPTION, "", "")
    }
    assert [(t.endpoint, t.stream) for t in traces] == [
        ("anthropic.messages", False),
        ("anthropic.messages", True),
        ("anthropic.count_tokens", False),
    ]
    assert all(t.outcome == "ok" and t.status_code == 200 for t in traces)
    assert {(t.provider, t.requested_model, t.upstream_model) for t in traces} == {
        ("anthropic", MODEL, MODEL)
    }
    assert all(t.input_tokens > 0 and t.output_tokens > 0 for t in traces[:2])
    shown = services.get_trace(traces[0].id, org_name="acme")
    assert shown["client_credential"] == CLIENT_SUBSCRIPTION
    # The member's next call on a route of the org's goes out with the org's key alone.
    routed = httpx2.post(
        gw.url + "/v1/messages",
        json={"model": "claude-test", "max_tokens": 8, "messages": messages},
        headers={"x-api-key": member_token, "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert routed.status_code == 200, routed.text
    (to_route,) = [r for r in fake_provider.requests if marker.encode() in r.body]
    assert to_route.headers["x-api-key"] == ANTHROPIC_SECRET
    assert "authorization" not in to_route.headers


def test_the_members_rate_limit_applies_to_their_subscription(
    gw: GatewayProcess, anthropic_api: FakeProvider, passthrough: None
) -> None:
    with api(gw, "admin@acme.test") as admin:
        made = admin.post("/limits", json={"scope": "user", "subject": "dev@acme.test", "rpm": 1})
        assert made.status_code in (200, 201), made.text
        try:
            session = uuid.uuid4().hex
            assert ask(gw, session).status_code == 200
            limited = ask(gw, session)
            assert limited.status_code == 429, limited.text
            assert limited.json()["error"]["type"] == "rate_limit_error"
            assert "dev@acme.test" in limited.json()["error"]["message"]
        finally:
            assert admin.delete(f"/limits/{made.json()['id']}").status_code in (200, 204)


def test_another_orgs_member_cannot_ride_this_orgs_switch(
    gw: GatewayProcess, anthropic_api: FakeProvider, passthrough: None
) -> None:
    before = len(anthropic_api.requests)
    headers = raw_headers(gw, "dev@other.test")
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    own_org = httpx2.post(gw.url + "/v1/messages", json=body, headers=headers, timeout=30)
    assert own_org.status_code == 403, own_org.text
    assert "off for org 'other'" in own_org.json()["error"]["message"]
    asks_for_acme = httpx2.post(
        gw.url + "/v1/messages", json=body, headers=headers | {"x-tvgate-org": "acme"}, timeout=30
    )
    assert asks_for_acme.status_code == 403, asks_for_acme.text
    assert "this token is for org 'other'" in asks_for_acme.json()["error"]["message"]
    assert len(anthropic_api.requests) == before


def test_the_other_endpoints_refuse_a_subscription_in_their_envelope(
    gw: GatewayProcess, anthropic_api: FakeProvider, passthrough: None
) -> None:
    before = len(anthropic_api.requests)
    headers = raw_headers(gw, "dev@acme.test")
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/responses", {"model": "gpt-test", "input": "hi"}),
    ):
        openai_headers = {k: v for k, v in headers.items() if k != "anthropic-version"}
        refused = httpx2.post(gw.url + path, json=body, headers=openai_headers, timeout=30)
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert f"not on {path}" in message and "/v1/messages" in message
    vertex = httpx2.post(
        gw.url + "/vertex/projects/p/locations/us-east5/publishers/anthropic/models/"
        "claude-test:rawPredict",
        json={"anthropic_version": "vertex-2023-10-16", "max_tokens": 8, "messages": []},
        headers=headers,
        timeout=30,
    )
    assert vertex.status_code == 400, vertex.text
    assert vertex.json()["error"]["type"] == "invalid_request_error"
    bedrock = httpx2.post(
        gw.url + "/bedrock/model/claude-test/invoke",
        json={"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8, "messages": []},
        headers=headers,
        timeout=30,
    )
    assert bedrock.status_code == 400, bedrock.text
    assert "/v1/messages/count_tokens only" in bedrock.text
    models = httpx2.get(gw.url + "/v1/models", headers=headers, timeout=30)
    assert models.status_code == 400, models.text
    assert models.json()["type"] == "error"
    assert "tvgate's routes" in models.json()["error"]["message"]
    assert len(anthropic_api.requests) == before


def test_admins_see_who_routes_a_subscription_through_tvgate(
    gw: GatewayProcess, passthrough: None
) -> None:
    session = uuid.uuid4().hex
    assert ask(gw, session).status_code == 200
    (trace,) = gw.wait_traces(1, session_id=session)
    with api(gw, "admin@acme.test") as admin:
        users = {u["email"]: u for u in admin.get("/users").json()["users"]}
    dev, admin_row = users["dev@acme.test"], users["admin@acme.test"]
    gw.bind()
    count = Trace.select().where(
        (Trace.user_id == dev["id"]) & (Trace.client_credential == CLIENT_SUBSCRIPTION)
    )
    assert dev["subscription_calls"] == count.count() >= 1
    assert dev["subscription_last_at"] == max(t.received_at for t in count)
    assert dev["subscription_last_at"] >= trace.received_at
    assert (admin_row["subscription_calls"], admin_row["subscription_last_at"]) == (0, None)
    # The users page shows the same.
    with httpx2.Client(base_url=gw.url, follow_redirects=False, timeout=30) as browser:
        page = browser.get("/ui/login")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        assert xsrf is not None
        token = gw.tokens["admin@acme.test"]
        assert browser.post("/ui/login", data={"_xsrf": xsrf[1], "token": token}).status_code == 302
        listed = browser.get("/ui/users").text
    row = next(r for r in listed.split("<tr") if "dev@acme.test" in r)
    last = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(dev["subscription_last_at"]))
    assert f'<td class="subscription">{dev["subscription_calls"]}, last {last}</td>' in row


# --- real Claude Code ---------------------------------------------------------------------------


def test_real_claude_code_signed_in_with_a_subscription_runs_a_bash_session(
    gw: GatewayProcess, anthropic_api: FakeProvider, passthrough: None, tmp_path: Path
) -> None:
    """Claude Code 2.1 with ``CLAUDE_CODE_OAUTH_TOKEN`` (no API key, no auth token), its
    base URL tvgate and the member's tvgate token in ``ANTHROPIC_CUSTOM_HEADERS``."""
    marker = "tvgate-ok-" + uuid.uuid4().hex[:8]
    token = gw.tokens["dev@acme.test"]
    headers = {
        "x-tvgate-token": token,
        "x-fake-scenario": "agent",
        "x-fake-command": f"echo {marker} > out.txt && cat out.txt",
    }
    setup = Setup(gw.url, token, "claude-sonnet-4-6", tmp_path, headers)
    setup.env["CLAUDE_CODE_OAUTH_TOKEN"] = OAUTH
    before = len(anthropic_api.requests)
    run = run_claude(setup, "Write the marker file with the Bash tool.", credential_env="")
    result, _ = claude_bash_session(run, setup, marker)
    reached = anthropic_api.requests[before:]
    assert not any(token in json.dumps(r.headers) for r in reached), "tvgate's token went on"
    sent = [r for r in reached if marker in r.headers.get("x-fake-command", "")]
    assert len(sent) == 2
    for request in sent:
        assert request.headers["authorization"] == f"Bearer {OAUTH}"
        betas = [b.strip() for b in request.headers["anthropic-beta"].split(",")]
        assert OAUTH_BETA in betas
    traces = gw.wait_traces(2, session_id=result["session_id"])
    gw.bind()
    dev = User.get(User.email == "dev@acme.test")
    assert {(t.user_id, t.client_credential, t.tool) for t in traces} == {
        (dev.id, CLIENT_SUBSCRIPTION, "claude-code")
    }
    assert all(t.outcome == "ok" and t.input_tokens > 0 and t.output_tokens > 0 for t in traces)
    assert {t.requested_model for t in traces} == {"claude-sonnet-4-6"}


def test_real_claude_code_with_the_switch_off_reports_the_403(
    gw: GatewayProcess, anthropic_api: FakeProvider, tmp_path: Path
) -> None:
    """Claude Code reports tvgate's 403 with its message; nothing reaches Anthropic."""
    token = gw.tokens["dev@acme.test"]
    setup = Setup(gw.url, token, "claude-sonnet-4-6", tmp_path, {"x-tvgate-token": token})
    setup.env["CLAUDE_CODE_OAUTH_TOKEN"] = OAUTH
    before = len(anthropic_api.requests)
    run = run_claude(setup, "Say hello.", credential_env="")
    result = claude_result(run)
    assert result["is_error"], run.describe()
    assert "subscription passthrough is off for org 'acme'" in result["result"], run.describe()
    assert len(anthropic_api.requests) == before


# --- the canary --------------------------------------------------------------------------------


#: A bearer no redaction pattern of tvgate's knows: only the call's own masking hides it.
CANARY = "oat-canary-" + secrets.token_hex(20)


def test_the_subscriptions_bearer_reaches_no_surface(
    anthropic_api: FakeProvider, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    """The canary: answers (the provider echoing the bearer back in headers, bodies, errors
    and mid-stream), trace rows and bodies, the spool (calls made while the database is
    locked), the log at debug, /metrics, the OTLP spans (content on) and every file."""
    anthropic_api.oauth_tokens = {OAUTH, CANARY}
    receiver = Receiver()
    url = f"sqlite:///{tmp_path / 'tvgate.db'}"
    tokens = seed(url, tmp_path, fake_provider)
    services.set_policy("acme", subscription_passthrough=True, span_content=True)
    database.close()
    gateway = launch_gateway(
        url,
        tmp_path,
        tokens,
        TVGATE_SUBSCRIPTION_BASE_URL=anthropic_api.url,
        TVGATE_OTLP_ENDPOINT=receiver.url,
        TVGATE_LOG_LEVEL="debug",
    )
    seen: list[str] = []
    session = uuid.uuid4().hex

    def call(
        path: str = "/v1/messages", *, stream: bool = False, headers: dict[str, str] | None = None
    ) -> int:
        sent = raw_headers(gateway, "dev@acme.test", session)
        sent["Authorization"] = f"Bearer {CANARY}"
        reply = httpx2.post(
            gateway.url + path,
            json={
                "model": MODEL,
                "max_tokens": 32,
                "stream": stream,
                "messages": [{"role": "user", "content": "canary"}],
            },
            headers=sent | (headers or {}),
            timeout=60,
        )
        seen.append(str(reply.headers) + reply.text)
        return reply.status_code

    try:
        echo = {"x-fake-echo-key": "1"}
        assert call(headers=echo) == 200
        assert call(stream=True, headers=echo) == 200
        assert call("/v1/messages/count_tokens", headers=echo) == 200
        assert call(headers=echo | {"x-fake-scenario": "error_500"}) == 500
        assert call(stream=True, headers=echo | {"x-fake-scenario": "error_event"}) == 200
        assert call(headers=echo | {"anthropic-beta": "claude-code-20250219"}) == 401
        assert call("/v1/chat/completions") == 400
        with SqliteLock(str(tmp_path / "tvgate.db")):
            threads = [
                threading.Thread(target=call, kwargs={"stream": s, "headers": echo})
                for s in (False, True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            deadline = time.monotonic() + 60
            while not (spooled := _spool_entries(tmp_path)) or len(spooled) < 2:
                assert time.monotonic() < deadline, "the writer did not spool"
                time.sleep(0.2)
            assert any(e["row"]["client_credential"] == CLIENT_SUBSCRIPTION for e in spooled)
            for entry in spooled:
                assert CANARY.encode() not in _decoded_strings(entry)
        traces = gateway.wait_traces(9, timeout=60, session_id=session)
        for trace in traces:
            receiver.span_of(trace.id)
        metrics = json.dumps(scrape(gateway.url))
    finally:
        stop_gateway(gateway.proc)
        receiver.server.shutdown()
    assert any(CANARY in str(r.headers) for r in anthropic_api.requests), "it went upstream"
    gateway.bind()
    bodies = [json.dumps(services.get_trace(t.id, org_name="acme"), default=str) for t in traces]
    with receiver.lock:
        spans = "\n".join(str(span) + str(resource) for span, resource in receiver.spans)
    files = [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    surfaces = {
        "an answer": "\n".join(seen),
        "a trace (row or body)": "\n".join(bodies),
        "the database": gateway.dump_database(),
        "the log": gateway.log_text(),
        "/metrics": metrics,
        "an OTLP span": spans,
        "a file of the data directory (spool, blobs)": "\n".join(files),
    }
    for where, text in surfaces.items():
        assert CANARY not in text, f"the subscription's bearer reached {where}"


def _spool_entries(folder: Path) -> list[dict[str, Any]]:
    lines = [
        line for path in folder.glob("traces.spool*") for line in path.read_bytes().splitlines()
    ]
    return [orjson.loads(line) for line in lines]


def test_a_members_own_route_cannot_take_their_subscription_to_their_host(
    gw: GatewayProcess, anthropic_api: FakeProvider, passthrough: None
) -> None:
    """A member's own key at a host of theirs, and their own route named as the model: a
    subscription's call still goes to Anthropic (the route is not used), on every prefix,
    and nothing reaches their host; without the subscription their route takes the call,
    with their key and no credential of the caller's."""
    theirs = FakeProvider(accepted_keys={"sk-ant-theirs"}).start()
    name = "theirs-" + uuid.uuid4().hex[:8]
    route_id = 0
    try:
        with api(gw, "admin@acme.test") as admin:
            allowed = admin.patch(
                "/policy", json={"allow_user_keys": True, "allow_user_routes": True}
            )
            assert allowed.status_code == 200, allowed.text
        with api(gw, "dev@acme.test") as member:
            key = {"name": name, "provider": "anthropic", "secret": "sk-ant-theirs"}
            added = member.post(
                "/keys", json=key | {"base_url": theirs.url, "owner": "dev@acme.test"}
            )
            assert added.status_code in (200, 201), added.text
            route = member.post(
                "/routes", json={"name": MODEL, "key": name, "owner": "dev@acme.test"}
            )
            assert route.status_code in (200, 201), route.text
            route_id = route.json()["id"]
        before = len(anthropic_api.requests)
        body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        for prefix in ("", "/anthropic", "/proxy/anthropic"):
            answer = httpx2.post(
                gw.url + prefix + "/v1/messages",
                json=body,
                headers=raw_headers(gw, "dev@acme.test"),
                timeout=30,
            )
            assert answer.status_code == 200, (prefix, answer.text)
        assert len(anthropic_api.requests) == before + 3
        assert not theirs.requests
        own = httpx2.post(
            gw.url + "/v1/messages",
            json=body,
            headers={"x-api-key": gw.tokens["dev@acme.test"], "anthropic-version": "2023-06-01"},
            timeout=30,
        )
        assert own.status_code == 200, own.text
        (sent,) = theirs.requests
        assert sent.headers.get("x-api-key") == "sk-ant-theirs"
        assert gw.tokens["dev@acme.test"] not in str(sent.headers) and OAUTH not in str(
            sent.headers
        )
    finally:
        with api(gw, "admin@acme.test") as admin:
            if route_id:
                admin.delete(f"/routes/{route_id}")
            admin.patch("/policy", json={"allow_user_keys": False, "allow_user_routes": False})
        theirs.stop()
