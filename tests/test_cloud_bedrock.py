"""AWS Bedrock: Bedrock keys as routes' upstreams, and clients in Bedrock mode at /bedrock.

A real ``tvgate serve`` (SQLite, then PostgreSQL) with Bedrock keys of each kind (an
access key, one with a session token, a Bedrock API key, a role assumed through STS) on
the fake Bedrock (tests/fake_bedrock.py), which recomputes each SigV4 signature with
botocore and answers in real event-stream frames. Clients: the ``anthropic`` SDK (its
Messages client on Bedrock routes, its ``AnthropicBedrock`` client at ``/bedrock`` on
routes of every kind), the ``openai`` SDK (Chat Completions translated onto a Bedrock
route) and real Claude Code in Bedrock mode.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx2
import openai
import orjson
import pytest
from botocore.eventstream import EventStreamBuffer

from tests.clients import Setup, claude_bash_session, run_claude
from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    add_test_key,
    launch_gateway,
    own_postgres,
    seed,
)
from tests.fake_bedrock import BAD_SIGNATURE, FakeBedrock
from tests.fake_provider import FakeProvider
from tests.harness import MASTER_KEY
from tests.test_newcomer_keys import _form_xsrf as form_xsrf
from tests.test_newcomer_keys import _sign_in as sign_in
from tvgate import services
from tvgate.db import open_database
from tvgate.keyring.local import LocalKeyring
from tvgate.models import database
from tvgate.providers import anthropic as anthropic_api
from tvgate.providers.clouds.eventstream import (
    EventStreamToSSE,
    FrameReader,
    SSEToEventStream,
    chunk_frame,
)
from tvgate.proxy.bedrock_mode import BEDROCK_MODE_NOTE
from tvgate.services.access import ServiceError
from tvgate.traces.pricing import Price, PriceTable, price_name

MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@dataclass
class Bedrock:
    """The gateway, the fake Bedrock, and the secrets of its Bedrock keys."""

    gw: GatewayProcess
    fake: FakeBedrock
    secrets: list[str]

    @property
    def token(self) -> str:
        return self.gw.tokens["dev@acme.test"]


def _bedrock_key(name: str, fields: dict[str, str], base_url: str, **settings: str) -> None:
    add_test_key(
        name,
        "acme",
        base_url,
        json.dumps(fields),
        provider="bedrock",
        settings={"region": "us-east-1", **settings},
    )


@pytest.fixture(scope="module")
def fake_bedrock(fake_provider: FakeProvider) -> Iterator[FakeBedrock]:
    with FakeBedrock(fake_provider.url, ANTHROPIC_SECRET) as fake:
        yield fake


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bedrock(
    request: pytest.FixtureRequest,
    fake_provider: FakeProvider,
    fake_bedrock: FakeBedrock,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Bedrock]:
    tmp = tmp_path_factory.mktemp("bedrock")
    if request.param == "sqlite":
        yield from _bedrock_gateway(
            f"sqlite:///{tmp / 'tvgate.db'}", tmp, fake_provider, fake_bedrock
        )
        return
    with own_postgres(tmp) as url:
        yield from _bedrock_gateway(url, tmp, fake_provider, fake_bedrock)


def _bedrock_gateway(
    url: str, tmp: Path, fake_provider: FakeProvider, fake: FakeBedrock
) -> Iterator[Bedrock]:
    tokens = seed(url, tmp, fake_provider)
    open_database(url)
    key_id, secret = fake.add_key()
    token = "IQoJb3JpZ2lu" + secrets.token_urlsafe(60)
    token_key_id, token_secret = fake.add_key(token)
    api_key = fake.add_api_key()
    role_key_id, role_secret = fake.add_key()
    role = "arn:aws:iam::123456789012:role/tvgate-bedrock"
    fake.roles[role] = "ext-" + uuid.uuid4().hex[:8]
    _bedrock_key("br-keys", {"access_key_id": key_id, "secret_access_key": secret}, fake.url)
    _bedrock_key(
        "br-agent",
        {"access_key_id": key_id, "secret_access_key": secret},
        fake.url + "/scenario/agent",
    )
    _bedrock_key(
        "br-token",
        {"access_key_id": token_key_id, "secret_access_key": token_secret, "session_token": token},
        fake.url,
    )
    _bedrock_key("br-api", {"api_key": api_key}, fake.url)
    _bedrock_key(
        "br-role",
        {"access_key_id": role_key_id, "secret_access_key": role_secret},
        fake.url,
        role_arn=role,
        external_id=fake.roles[role],
        sts_endpoint=fake.url + "/sts/",
    )
    wrong = secrets.token_urlsafe(30)
    _bedrock_key("br-wrong", {"access_key_id": key_id, "secret_access_key": wrong}, fake.url)
    for name in ("keys", "token", "api", "role", "wrong", "agent"):
        services.add_route(f"claude-br-{name}", f"br-{name}", model=MODEL, org_name="acme")
    database.close()
    with launch_gateway(url, tmp, tokens) as gw:
        yield Bedrock(gw, fake, [secret, token, token_secret, api_key, role_secret, wrong, key_id])
    database.close()


def _messages(bedrock: Bedrock) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=bedrock.token, base_url=bedrock.gw.url, max_retries=0)


Client = anthropic.Anthropic | anthropic.AnthropicBedrock


def _send(
    client: Client, model: str, text: str = "hello bedrock", **headers: str
) -> anthropic.types.Message:
    """One non-streamed Messages call; ``headers`` with ``_`` for ``-``."""
    return client.messages.create(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": text}],
        extra_headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


def _stream(
    client: Client, model: str, text: str = "hello bedrock", **headers: str
) -> tuple[str, anthropic.types.Message]:
    """One streamed Messages call: its text as streamed, and the final message."""
    with client.messages.stream(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": text}],
        extra_headers={k.replace("_", "-"): v for k, v in headers.items()},
    ) as stream:
        return "".join(stream.text_stream), stream.get_final_message()


def _text(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


@pytest.mark.parametrize("route", ["keys", "token", "api", "role"])
def test_an_anthropic_client_on_a_bedrock_route(bedrock: Bedrock, route: str) -> None:
    """Each kind of Bedrock key serves a Messages client, streamed and not: the request as
    Bedrock takes it (model in the path, anthropic_version and the beta header in the body),
    the answer as Anthropic's, the usage in the trace."""
    client = _messages(bedrock)
    session = uuid.uuid4().hex
    headers = {"anthropic_beta": "context-1m-2025-08-07", "x_tvgate_session": session}
    answer = _send(client, f"claude-br-{route}", **headers)
    assert _text(answer) == "You said: hello bedrock"
    sent = bedrock.fake.requests[-1]
    assert sent.path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    assert "model" not in sent.body and "stream" not in sent.body
    assert sent.body["anthropic_version"] == "bedrock-2023-05-31"
    assert sent.body["anthropic_beta"] == ["context-1m-2025-08-07"]
    text, final = _stream(client, f"claude-br-{route}", **headers)
    assert text == "You said: hello bedrock"
    assert final.usage.output_tokens == answer.usage.output_tokens
    assert bedrock.fake.requests[-1].path.endswith("/invoke-with-response-stream")
    traces = bedrock.gw.wait_traces(2, session_id=session)
    for trace in traces:
        assert (trace.provider, trace.upstream_model, trace.outcome) == ("bedrock", MODEL, "ok")
        assert trace.input_tokens == answer.usage.input_tokens > 0
        assert trace.output_tokens == answer.usage.output_tokens > 0
        assert trace.cost_usd > 0  # priced as claude-sonnet-4-5


def test_a_token_count_on_a_bedrock_route_is_bedrocks_count_tokens(bedrock: Bedrock) -> None:
    client = _messages(bedrock)
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "count me"}]
    counted = client.messages.count_tokens(model="claude-br-keys", messages=messages)
    direct = client.messages.count_tokens(model="claude-test", messages=messages)
    assert counted.input_tokens == direct.input_tokens > 0
    assert bedrock.fake.requests[-1].path.endswith("%3A0/count-tokens")
    assert bedrock.fake.requests[-1].body["max_tokens"] == 1


def test_the_role_is_assumed_once_and_its_credentials_reused(bedrock: Bedrock) -> None:
    before = len(bedrock.fake.assumed)
    client = _messages(bedrock)
    for _ in range(3):
        _send(client, "claude-br-role")
    assert len(bedrock.fake.assumed) - before <= 1


def test_a_wrong_signature_is_refused_with_awss_message(bedrock: Bedrock) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        _send(_messages(bedrock), "claude-br-wrong")
    assert raised.value.status_code == 403
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": BAD_SIGNATURE},
    }


@pytest.mark.parametrize(
    ("scenario", "error"),
    [("error_429", anthropic.RateLimitError), ("error_500", anthropic.InternalServerError)],
)
def test_bedrock_errors_reach_the_client_in_the_anthropic_envelope(
    bedrock: Bedrock, scenario: str, error: type[anthropic.APIStatusError]
) -> None:
    with pytest.raises(error) as raised:
        _send(_messages(bedrock), "claude-br-keys", x_fake_scenario=scenario)
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["message"]


@pytest.mark.parametrize("sdk", ["messages", "bedrock"])
def test_an_exception_frame_mid_stream_is_an_error_event(bedrock: Bedrock, sdk: str) -> None:
    """The fake provider's in-band error, an exception frame from Bedrock: an error event for
    a Messages client; an exception frame again for a client in Bedrock mode."""
    client = _messages(bedrock) if sdk == "messages" else _bedrock_sdk(bedrock)
    with pytest.raises(anthropic.APIStatusError) as raised:
        _stream(client, "claude-br-keys", x_fake_scenario="error_event")
    assert "overloaded" in str(raised.value).lower() or "unavailable" in str(raised.value).lower()


def test_an_openai_chat_client_on_a_bedrock_route(bedrock: Bedrock) -> None:
    client = openai.OpenAI(api_key=bedrock.token, base_url=bedrock.gw.url + "/v1", max_retries=0)
    answer = client.chat.completions.create(
        model="claude-br-keys", messages=[{"role": "user", "content": "hello chat"}]
    )
    assert answer.choices[0].message.content == "You said: hello chat"
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    chunks = client.chat.completions.create(
        model="claude-br-api",
        messages=[{"role": "user", "content": "hello chat"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: hello chat"
    assert "model" not in bedrock.fake.requests[-1].body


def _bedrock_sdk(bedrock: Bedrock) -> anthropic.AnthropicBedrock:
    return anthropic.AnthropicBedrock(
        api_key=bedrock.token,
        base_url=bedrock.gw.url + "/bedrock",
        aws_region="us-east-1",
        max_retries=0,
    )


@pytest.mark.parametrize("route", ["claude-test", "claude-br-keys", "gpt-test"])
def test_the_anthropic_bedrock_sdk_at_tvgate_reaches_every_kind_of_route(
    bedrock: Bedrock, fake_provider: FakeProvider, route: str
) -> None:
    """``AnthropicBedrock`` at /bedrock: an Anthropic route, a Bedrock route and an OpenAI
    one (translated), each streamed (event-stream frames, parsed by the SDK with botocore)
    and not."""
    client = _bedrock_sdk(bedrock)
    answer = _send(client, route, "hi there", anthropic_beta="beta-one")
    assert _text(answer) == "You said: hi there"
    if route == "claude-test":
        sent = fake_provider.requests[-1]
        assert sent.headers.get("anthropic-beta") == "beta-one"
        assert "anthropic_version" not in sent.json()
    text, final = _stream(client, route, "hi there")
    assert text == "You said: hi there"
    assert final.usage.output_tokens > 0


def test_the_bedrock_sdk_gets_bedrock_errors(bedrock: Bedrock) -> None:
    client = _bedrock_sdk(bedrock)
    with pytest.raises(anthropic.NotFoundError) as raised:
        _send(client, "no-such-route")
    assert raised.value.response.headers["x-amzn-errortype"] == "ResourceNotFoundException"
    assert "no route named 'no-such-route'" in raised.value.response.json()["message"]
    with pytest.raises(anthropic.RateLimitError):
        _send(client, "claude-br-keys", x_fake_scenario="error_429")
    refused = httpx2.post(
        bedrock.gw.url + "/bedrock/model/claude-test/invoke",
        content=b"not json",
        headers={"Authorization": f"Bearer {bedrock.token}"},
    )
    assert refused.status_code == 400
    assert refused.headers["x-amzn-errortype"] == "ValidationException"
    assert refused.json()["message"].startswith("request body is not valid JSON")


def test_inference_profiles_list_the_callers_routes(bedrock: Bedrock) -> None:
    listed = httpx2.get(
        bedrock.gw.url + "/bedrock/inference-profiles",
        headers={"Authorization": f"Bearer {bedrock.token}"},
    )
    assert listed.status_code == 200
    names = {p["inferenceProfileId"] for p in listed.json()["inferenceProfileSummaries"]}
    assert {"claude-test", "claude-br-keys"} <= names
    one = httpx2.get(
        bedrock.gw.url + "/bedrock/inference-profiles/claude-br-keys",
        headers={"Authorization": f"Bearer {bedrock.token}"},
    ).json()
    assert one["models"] == [{"modelArn": f"arn:aws:bedrock:::foundation-model/{MODEL}"}]
    missing = httpx2.get(
        bedrock.gw.url + "/bedrock/inference-profiles/nope",
        headers={"Authorization": f"Bearer {bedrock.token}"},
    )
    assert missing.status_code == 404
    assert missing.headers["x-amzn-errortype"] == "ResourceNotFoundException"


def test_real_claude_code_in_bedrock_mode(bedrock: Bedrock, tmp_path: Path) -> None:
    """Claude Code with CLAUDE_CODE_USE_BEDROCK at tvgate's /bedrock runs a Bash tool call on
    a Bedrock route (the fake Bedrock's agent scenario), traced with usage."""
    marker = "tvgate-ok-" + uuid.uuid4().hex[:8]
    env = {
        "CLAUDE_CODE_USE_BEDROCK": "1",
        "ANTHROPIC_BEDROCK_BASE_URL": bedrock.gw.url + "/bedrock",
        "CLAUDE_CODE_SKIP_BEDROCK_AUTH": "1",
        "AWS_BEARER_TOKEN_BEDROCK": bedrock.token,
        "AWS_REGION": "us-east-1",
    }
    setup = Setup(
        bedrock.gw.url,
        bedrock.token,
        "claude-br-agent",
        tmp_path,
        {"x-fake-command": f"echo {marker} > out.txt && cat out.txt"},
        env,
    )
    run = run_claude(setup, "Write the marker file with the Bash tool.")
    result, _ = claude_bash_session(run, setup, marker)
    traces = bedrock.gw.wait_traces(2, session_id=result["session_id"])
    assert {(t.provider, t.upstream_model, t.outcome) for t in traces} == {("bedrock", MODEL, "ok")}
    assert all(t.input_tokens > 0 and t.output_tokens > 0 for t in traces)
    assert {t.tool for t in traces} == {"claude-code"}
    # Through /bedrock, as Bedrock mode calls it (not the Anthropic base URL's /v1/messages).
    assert all(BEDROCK_MODE_NOTE in json.loads(t.anomalies) for t in traces)


def test_no_bedrock_secret_reaches_any_surface(bedrock: Bedrock) -> None:
    """The canary: after every test above, no field of any Bedrock key's secret is in an
    answer, a trace (row or body), the log, the database or any file of the data dir."""
    for route in ("keys", "token", "api", "role", "wrong"):
        for scenario in ("normal", "error_500"):
            reply = httpx2.post(
                bedrock.gw.url + "/v1/messages",
                content=orjson.dumps(
                    {
                        "model": f"claude-br-{route}",
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": "hi"}],
                    }
                ),
                headers={
                    "x-api-key": bedrock.token,
                    "anthropic-version": "2023-06-01",
                    "x-fake-scenario": scenario,
                },
                timeout=60,
            )
            text = reply.text + str(reply.headers)
            for secret in bedrock.secrets:
                assert secret not in text
    listed = httpx2.get(
        bedrock.gw.url + "/api/v1/keys",
        headers={"Authorization": f"Bearer {bedrock.gw.tokens['admin@acme.test']}"},
    ).text
    bedrock.gw.bind()
    traces = bedrock.gw.traces()
    bodies = [json.dumps(services.get_trace(t.id, org_name="acme"), default=str) for t in traces]
    files = [
        p.read_bytes().decode("latin-1") for p in bedrock.gw.data_dir.rglob("*") if p.is_file()
    ]
    # The role's session credentials, which STS minted for tvgate, too.
    minted = [
        value
        for key_id, key in bedrock.fake.keys.items()
        if key_id.startswith("ASIA")
        for value in (key_id, key.secret, key.token or "")
    ]
    assert minted
    for secret in bedrock.secrets + minted:
        for where, text in (
            ("the keys API", listed),
            ("the log", bedrock.gw.log_text()),
            ("the database", bedrock.gw.dump_database()),
            ("a trace", "\n".join(bodies)),
            ("a file of the data dir", "\n".join(files)),
        ):
            assert secret not in text, f"a Bedrock secret reached {where}"


# --- without a gateway -------------------------------------------------------------------


def test_bedrock_model_ids_have_the_models_prices() -> None:
    table = PriceTable([Price("claude-sonnet-4*", 3.0, 15.0, 0.3, 3.75)])
    for model in (
        MODEL,
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        "global.anthropic.claude-sonnet-4-20250514-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/" + MODEL,
    ):
        assert table.find(1, model) is not None, model
    assert price_name("eu.anthropic.claude-haiku-4-5-20251001-v1:0") == "claude-haiku-4-5-20251001"
    assert table.find(1, "mistral.mistral-large-2402-v1:0") is None


def test_event_stream_frames_both_ways() -> None:
    """tvgate's frames decode with botocore's decoder; a Bedrock stream becomes SSE and back."""
    event = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "hi"},
    }
    frames = SSEToEventStream().feed(
        b"event: content_block_delta\ndata: " + orjson.dumps(event) + b"\n\n"
    )
    buffer = EventStreamBuffer()
    buffer.add_data(frames)
    (message,) = list(buffer)
    assert message.headers[":event-type"] == "chunk"
    assert orjson.loads(base64.b64decode(orjson.loads(message.payload)["bytes"])) == event
    sse = EventStreamToSSE()
    whole = chunk_frame(orjson.dumps(event)) * 2
    out = b"".join(sse.feed(whole[i : i + 7]) for i in range(0, len(whole), 7))
    assert out == (b"event: content_block_delta\ndata: " + orjson.dumps(event) + b"\n\n") * 2
    corrupt = bytearray(chunk_frame(b'{"type":"ping"}'))
    corrupt[-1] ^= 1
    assert b"event: error" in EventStreamToSSE().feed(bytes(corrupt))
    with pytest.raises(Exception, match="at most"):
        FrameReader(max_frame=64).feed(chunk_frame(b'{"type":"x","pad":"' + b"y" * 100 + b'"}'))


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize(
    ("secret", "settings", "error"),
    [
        ('{"access_key_id": "AKIA1"}', {"region": "us-east-1"}, "has no secret_access_key"),
        ("AKIA-not-json", {"region": "us-east-1"}, "is a JSON object"),
        ('{"api_key": "ABSK1234"}', {}, "needs its AWS region"),
        ('{"api_key": "ABSK1234", "extra": "x"}', {"region": "us-east-1"}, "unknown fields"),
        ('{"api_key": "ABSK1234"}', {"region": "us-east-1", "color": "red"}, "unknown Bedrock"),
        (
            '{"api_key": "ABSK1234"}',
            {"region": "us-east-1", "role_arn": "arn:aws:iam::123456789012:role/r"},
            "needs an access key",
        ),
    ],
)
def test_a_bad_bedrock_key_is_refused_naming_the_field(
    secret: str, settings: dict[str, str], error: str
) -> None:
    services.add_user("admin@acme.test", "acme", admin=True)
    with pytest.raises(ServiceError, match=error) as raised:
        services.add_key("br", "bedrock", secret, _keyring(), org_name="acme", settings=settings)
    assert "ABSK1234" not in str(raised.value)


def _keyring() -> LocalKeyring:
    return LocalKeyring(MASTER_KEY)


def test_usage_left_out_of_the_answer_comes_from_bedrocks_invocation_metrics() -> None:
    assembler = anthropic_api.MESSAGES.stream_assembler(1 << 20)
    assert assembler is not None
    metrics = {"inputTokenCount": 12, "outputTokenCount": 3, "invocationLatency": 5}
    for event in (
        {"type": "message_start", "message": {"id": "msg_1", "model": "m", "content": []}},
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics},
    ):
        assembler.feed(b"event: x\ndata: " + orjson.dumps(event) + b"\n\n")
    usage = assembler.finish().usage
    assert (usage.input_tokens, usage.output_tokens) == (12, 3)


def test_the_ui_adds_a_bedrock_key(bedrock: Bedrock) -> None:
    """The admin's key form takes a Bedrock key: provider, region, the JSON secret; the key's
    page shows its settings and never the secret."""
    key_id, secret = bedrock.fake.add_key()
    name = "br-ui-" + uuid.uuid4().hex[:6]
    with sign_in(bedrock.gw) as browser:
        xsrf = form_xsrf(browser.get("/ui/keys").text, "add-key")
        added = browser.post(
            "/ui/keys",
            data={
                "_xsrf": xsrf,
                "name": name,
                "provider": "bedrock",
                "secret": json.dumps({"access_key_id": key_id, "secret_access_key": secret}),
                "region": "eu-west-1",
                "base_url": bedrock.fake.url,
                "max_concurrent": "0",
                "available_to_all": "on",
            },
        )
        assert added.status_code in (200, 302, 303), added.text
        page = browser.get(f"/ui/keys/{name}").text
    assert "eu-west-1" in page and key_id[-4:] in page
    assert secret not in page and secret not in added.text


def test_the_cli_adds_bedrock_keys_as_the_readme_writes_them(bedrock: Bedrock) -> None:
    """``keys add --provider bedrock --region`` with the JSON secret on standard input (over
    two lines, as pasted), and ``--role-arn``/``--external-id``; their routes serve."""
    key_id, secret = bedrock.fake.add_key()
    name = "br-cli-" + uuid.uuid4().hex[:6]
    pasted = json.dumps({"access_key_id": key_id, "secret_access_key": secret}, indent=1) + "\n"
    added = bedrock.gw.cli(
        "keys", "add", name, "--provider", "bedrock", "--region", "us-east-1",
        "--base-url", bedrock.fake.url, "--org", "acme", stdin=pasted,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "us-east-1" in added.stdout and key_id[-4:] in added.stdout
    assert secret not in added.stdout + added.stderr
    role = "arn:aws:iam::123456789012:role/cli-" + uuid.uuid4().hex[:6]
    bedrock.fake.roles[role] = "cli-ext"
    role_key = bedrock.gw.cli(
        "keys", "add", name + "-role", "--provider", "bedrock", "--region", "us-east-1",
        "--base-url", bedrock.fake.url, "--role-arn", role, "--external-id", "cli-ext",
        "--sts-endpoint", bedrock.fake.url + "/sts/", "--org", "acme",
        stdin=pasted.replace("\n", "") + "\n",
    )  # fmt: skip
    assert role_key.returncode == 0, role_key.stderr
    for key in (name, name + "-role"):
        routed = bedrock.gw.cli(
            "routes", "add", key, "--key", key, "--model", MODEL, "--org", "acme"
        )
        assert routed.returncode == 0, routed.stderr
    client = _messages(bedrock)
    for key in (name, name + "-role"):
        for _ in range(100):  # the gateway hears of new routes within its cache TTL
            try:
                answer = _send(client, key)
                break
            except anthropic.NotFoundError:
                time.sleep(0.1)
        assert _text(answer) == "You said: hello bedrock"
    assert role in bedrock.fake.assumed
