"""OpenTelemetry spans and the Prometheus metrics of calls (issue 24).

A gateway with ``TVGATE_OTLP_ENDPOINT`` pointed at an OTLP/HTTP receiver of the test's
own (``http.server`` on a free port), which decodes each export with the official
``opentelemetry-proto`` schema: a streamed Anthropic call, an OpenAI chat call and a
failed call become CLIENT spans with the GenAI conventions' attributes, tvgate's own,
their real start and end, and the client's ``traceparent`` as their parent. With the
receiver down, calls answer as before and the spans lost are counted on ``/metrics``.
"""

from __future__ import annotations

import gzip
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.conftest import ANTHROPIC_SECRET, ROOT, scrape
from tests.harness import GatewayProcess, beside, fake_scenario
from tvgate import services
from tvgate.metrics import Metrics
from tvgate.models import Trace
from tvgate.traces.span_content import CONTENT_MAX, content_attributes
from tvgate.traces.spans import checked_traceparent, parent_ids

#: The export header the gateway is given: a secret, which must reach the receiver only.
API_KEY = "otlp-key-" + secrets.token_hex(8)
TRACE_ID, PARENT_ID = secrets.token_hex(16), secrets.token_hex(8)
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
#: A metric name in a PromQL expression.
METRIC = re.compile(r"\btvgate_[a-z_]+")


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, with its resource's attributes,
    and the headers of each export."""

    def __init__(self) -> None:
        self.spans: list[tuple[Span, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    for resource_spans in request.resource_spans:
                        resource = attributes(resource_spans.resource.attributes)
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend((s, resource) for s in scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def span_of(self, trace_id: str, timeout: float = 15.0) -> tuple[Span, dict[str, Any]]:
        """The span of tvgate's trace ``trace_id``, once it has come (or fail)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for span, resource in self.spans:
                    if attributes(span.attributes).get("tvgate.trace_id") == trace_id:
                        return span, resource
            time.sleep(0.05)
        raise AssertionError(f"no span for trace {trace_id}")


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module")
def otel_gateway(gateway: GatewayProcess, receiver: Receiver) -> Iterator[GatewayProcess]:
    with beside(
        gateway,
        TVGATE_OTLP_ENDPOINT=receiver.url,
        TVGATE_OTLP_HEADERS=f"x-api-key={API_KEY},x-team=gateway",
    ) as gw:
        yield gw


def _one_trace(gw: GatewayProcess, session: str) -> Trace:
    (found,) = gw.wait_traces(1, session_id=session)
    return found


def _check_times(span: Span, trace: Trace) -> None:
    # The call's own moments, not the export's: to the microsecond.
    assert abs(span.start_time_unix_nano - trace.received_at * 1e9) < 1000
    assert trace.finished_at is not None
    assert abs(span.end_time_unix_nano - trace.finished_at * 1e9) < 1000
    assert span.end_time_unix_nano > span.start_time_unix_nano


def test_a_streamed_anthropic_call_is_a_client_span_under_the_callers_traceparent(
    otel_gateway: GatewayProcess, receiver: Receiver
) -> None:
    session = "otel-" + secrets.token_hex(4)
    client = anthropic.Anthropic(
        base_url=otel_gateway.url, api_key=otel_gateway.tokens["dev@acme.test"], max_retries=0
    )
    with client.messages.stream(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "hello spans"}],
        extra_headers={"traceparent": TRACEPARENT, "X-Claude-Code-Session-Id": session},
    ) as stream:
        answer = stream.get_final_message()
    trace = _one_trace(otel_gateway, session)
    assert trace.traceparent == TRACEPARENT
    span, resource = receiver.span_of(trace.id)
    assert span.name == "chat claude-upstream-1"
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_ID
    assert span.span_id.hex() not in ("", PARENT_ID)
    assert span.status.code != Status.STATUS_CODE_ERROR
    _check_times(span, trace)
    got = attributes(span.attributes)
    usage = answer.usage
    cache_read = usage.cache_read_input_tokens or 0
    cache_write = usage.cache_creation_input_tokens or 0
    assert cache_read and cache_write  # the fake provider reports both
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-upstream-1",
        "gen_ai.response.model": answer.model,
        "gen_ai.response.id": answer.id,
        "gen_ai.response.finish_reasons": [answer.stop_reason],
        "gen_ai.conversation.id": session,
        # The conventions' input tokens include the cache's; Anthropic's do not.
        "gen_ai.usage.input_tokens": usage.input_tokens + cache_read + cache_write,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": cache_read,
        "gen_ai.usage.cache_creation.input_tokens": cache_write,
        "server.address": "127.0.0.1",
        "tvgate.trace_id": trace.id,
        "tvgate.org_id": trace.org_id,
        "tvgate.user_id": trace.user_id,
        "tvgate.route": "claude-test",
        "tvgate.key_name": "fake-anthropic",
        "tvgate.outcome": "ok",
        "tvgate.stream": True,
        "tvgate.tool": "anthropic-sdk",
        "http.response.status_code": 200,
    }
    assert {name: got.get(name) for name in expected} == expected
    assert got["tvgate.cost_usd"] == pytest.approx(trace.cost_usd)
    assert "error.type" not in got
    # The org has not turned content on: no prompt, no answer.
    assert not {"gen_ai.input.messages", "gen_ai.output.messages"} & got.keys()
    assert resource["service.name"] == "tvgate"
    # The export headers reached the receiver, and no log line names the key.
    assert any(h.get("x-api-key") == API_KEY for h in receiver.headers)
    assert API_KEY not in otel_gateway.log_text()


def test_an_openai_chat_call_and_a_failed_call_are_spans(
    otel_gateway: GatewayProcess, receiver: Receiver
) -> None:
    session = "otel-" + secrets.token_hex(4)
    client = openai.OpenAI(
        base_url=otel_gateway.openai_url,
        api_key=otel_gateway.tokens["dev@acme.test"],
        max_retries=0,
    )
    completion = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hello chat spans"}],
        extra_headers={"x-tvgate-session": session},
    )
    trace = _one_trace(otel_gateway, session)
    span, _ = receiver.span_of(trace.id)
    assert span.name == "chat gpt-upstream-1"
    assert span.kind == Span.SPAN_KIND_CLIENT
    # No traceparent: a root span of a trace of its own.
    assert span.parent_span_id == b""
    _check_times(span, trace)
    got = attributes(span.attributes)
    assert completion.usage is not None
    assert {
        name: got.get(name)
        for name in (
            "gen_ai.provider.name",
            "gen_ai.request.model",
            "gen_ai.response.id",
            "gen_ai.response.finish_reasons",
            "gen_ai.usage.input_tokens",
            "gen_ai.usage.output_tokens",
            "tvgate.route",
            "tvgate.key_name",
            "tvgate.outcome",
        )
    } == {
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-upstream-1",
        "gen_ai.response.id": completion.id,
        "gen_ai.response.finish_reasons": [completion.choices[0].finish_reason],
        # OpenAI's prompt tokens include the cached ones already.
        "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
        "tvgate.route": "gpt-test",
        "tvgate.key_name": "fake-openai",
        "tvgate.outcome": "ok",
    }

    failed = "otel-" + secrets.token_hex(4)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "this one fails"}],
            # A malformed traceparent (flags "zz") is ignored, not half-used.
            **_headers(fake_scenario("error_529", failed), traceparent=TRACEPARENT[:-2] + "zz"),
        )
    trace = _one_trace(otel_gateway, failed)
    assert trace.traceparent == ""
    span, _ = receiver.span_of(trace.id)
    assert span.parent_span_id == b""
    assert span.status.code == Status.STATUS_CODE_ERROR
    got = attributes(span.attributes)
    assert got["tvgate.outcome"] == "upstream_error"
    assert got["error.type"] == "server_error"
    assert got["http.response.status_code"] == 503


def _headers(kwargs: dict[str, Any], **extra: str) -> dict[str, Any]:
    return {"extra_headers": {**kwargs["extra_headers"], **extra}}


def test_content_goes_into_spans_only_when_the_org_turns_it_on_and_redacted(
    otel_gateway: GatewayProcess, receiver: Receiver
) -> None:
    otel_gateway.bind()
    services.set_policy("acme", span_content=True)
    try:
        # The writer reads the org's settings again once the change is announced.
        time.sleep(2)
        session = "otel-" + secrets.token_hex(4)
        client = anthropic.Anthropic(
            base_url=otel_gateway.url, api_key=otel_gateway.tokens["dev@acme.test"], max_retries=0
        )
        answer = client.messages.create(
            model="claude-test",
            max_tokens=64,
            system="You are terse.",
            messages=[
                {"role": "user", "content": "first turn"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": f"my key is {ANTHROPIC_SECRET} keep it"},
            ],
            extra_headers={"X-Claude-Code-Session-Id": session},
        )
        span, _ = receiver.span_of(_one_trace(otel_gateway, session).id)
    finally:
        otel_gateway.bind()
        services.set_policy("acme", span_content=False)
    got = attributes(span.attributes)
    assert ANTHROPIC_SECRET not in str(got)
    system = orjson.loads(got["gen_ai.system_instructions"])
    assert system == [{"type": "text", "content": "You are terse."}]
    inputs = orjson.loads(got["gen_ai.input.messages"])
    assert [m["role"] for m in inputs] == ["user", "assistant", "user"]
    assert inputs[0]["parts"] == [{"type": "text", "content": "first turn"}]
    (last,) = inputs[2]["parts"]
    assert last["content"].startswith("my key is ") and last["content"].endswith(" keep it")
    (output,) = orjson.loads(got["gen_ai.output.messages"])
    assert output["role"] == "assistant"
    assert output["finish_reason"] == answer.stop_reason
    assert output["parts"] == [
        {"type": "text", "content": block.text} for block in answer.content if block.type == "text"
    ]
    assert "tvgate.content_truncated" not in got


def test_content_keeps_the_latest_messages_that_fit() -> None:
    turns = [{"role": "user", "content": f"turn {i} " + "x" * 1000} for i in range(200)]
    request = orjson.dumps({"model": "m", "messages": turns})
    got = content_attributes("anthropic.messages", request, None)
    kept = orjson.loads(got["gen_ai.input.messages"])
    assert len(got["gen_ai.input.messages"]) <= CONTENT_MAX
    assert 50 < len(kept) < 200
    assert kept[-1]["parts"][0]["content"].startswith("turn 199 ")
    assert got["tvgate.content_truncated"] is True
    # One message too long alone: its text is cut, the message kept.
    huge = orjson.dumps({"messages": [{"role": "user", "content": "y" * (3 * CONTENT_MAX)}]})
    got = content_attributes("anthropic.messages", huge, None)
    (message,) = orjson.loads(got["gen_ai.input.messages"])
    assert 0 < len(message["parts"][0]["content"]) <= CONTENT_MAX // 2
    # No conversation in an embeddings call; a body that is no JSON gives nothing.
    assert content_attributes("openai.embeddings", b'{"input": "a"}', None) == {}
    assert content_attributes("openai.chat", b"not json", None) == {}


def test_traceparent_is_checked_strictly() -> None:
    assert checked_traceparent(TRACEPARENT) == TRACEPARENT
    assert parent_ids(TRACEPARENT) == (int(TRACE_ID, 16), int(PARENT_ID, 16), 1)
    for bad in (
        None,
        "",
        TRACEPARENT.upper(),  # the recommendation writes lower case
        "01" + TRACEPARENT[2:],  # only version 00 is this format
        TRACEPARENT + "-00",
        TRACEPARENT[:-1],
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero ids are invalid
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-0g",
    ):
        assert checked_traceparent(bad) == "", bad


def test_metrics_after_calls_have_the_histograms_and_counters(
    otel_gateway: GatewayProcess,
) -> None:
    client = anthropic.Anthropic(
        base_url=otel_gateway.url, api_key=otel_gateway.tokens["dev@acme.test"], max_retries=0
    )
    before = scrape(otel_gateway.url)
    client.messages.create(
        model="claude-sonnet", max_tokens=64, messages=[{"role": "user", "content": "priced"}]
    )
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(
            model="claude-test",
            max_tokens=64,
            messages=[{"role": "user", "content": "fails"}],
            **fake_scenario("error_529"),
        )
    after = scrape(otel_gateway.url)

    def grew(prefix: str, *labels: str) -> float:
        keys = [k for k in after if k.startswith(prefix) and all(x in k for x in labels)]
        assert keys, (prefix, labels)
        return sum(after[k] - before.get(k, 0.0) for k in keys)

    sonnet = ('provider="anthropic"', 'route="claude-sonnet"')
    for histogram in (
        "tvgate_time_to_first_byte_seconds",
        "tvgate_request_duration_seconds",
        "tvgate_overhead_seconds",
    ):
        assert grew(histogram + "_count{", *sonnet) == 1
        assert grew(histogram + "_bucket{", *sonnet, 'le="+Inf"') == 1
    assert grew("tvgate_tokens_total{", 'route="claude-sonnet"', 'type="output"') > 0
    # The route's model has a price: the counter has it at the org's prices, once the
    # gateway has read them (within a second of its start).
    deadline = time.monotonic() + 5
    while not any(k.startswith("tvgate_cost_usd_total{") for k in after):
        assert time.monotonic() < deadline, "no cost counted"
        time.sleep(0.2)
        after = scrape(otel_gateway.url)
    assert grew("tvgate_cost_usd_total{", 'route="claude-sonnet"') > 0
    assert (
        grew(
            "tvgate_upstream_errors_total{", 'route="claude-test"', 'error_type="overloaded_error"'
        )
        == 1
    )
    assert "tvgate_sink_backlog" in after
    assert after["tvgate_otlp_spans_dropped_total"] == 0


def test_the_sample_dashboard_queries_only_metrics_tvgate_exports(
    otel_gateway: GatewayProcess,
) -> None:
    dashboard = orjson.loads((ROOT / "docs" / "grafana-tvgate.json").read_bytes())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for e in exprs for name in METRIC.findall(e)}
    text = httpx2.get(otel_gateway.url + "/metrics", timeout=5).text
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert len(used) >= 15
    assert used - exported == set()


def test_refusals_and_cost_are_counted_from_the_row() -> None:
    """The labels of what a row adds up to (governance refusals need a budget to be hit,
    which tests/test_governance.py sets up; here the row alone)."""
    priced: list[tuple[int, str, str, tuple[int, int, int, int]]] = []

    def price(org_id: int, provider: str, model: str, usage: tuple[int, int, int, int]) -> float:
        priced.append((org_id, provider, model, usage))
        return 0.25

    ready = False
    metrics = Metrics(price=price, priced=lambda: ready)
    row: dict[str, Any] = {
        "org_id": 3,
        "provider": "openai",
        "route_name": "gpt",
        "tool": "codex",
        "status_code": 200,
        "outcome": "ok",
        "error_type": "",
        "received_at": 10.0,
        "first_byte_at": 10.1,
        "finished_at": 10.2,
        "overhead_ms": 0.4,
        "input_tokens": 100,
        "output_tokens": 20,
        "cache_read_tokens": 50,
        "cache_write_tokens": 0,
        "response_model": "gpt-5",
        "upstream_model": "gpt-5-2025",
    }
    metrics.observe(row)
    metrics.observe(
        {
            **row,
            "status_code": 429,
            "outcome": "rejected",
            "error_type": "rate_limited",
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_read_tokens": 0,
        }
    )
    # Before the prices are read, nothing is priced at 0: the tokens wait.
    assert "tvgate_cost_usd_total{" not in metrics.render().decode()
    ready = True
    text = metrics.render().decode()
    assert priced == [(3, "openai", "gpt-5", (100, 20, 50, 0))]
    assert 'tvgate_cost_usd_total{org_id="3",route="gpt",tool="codex"} 0.25' in text
    assert 'tvgate_tokens_total{org_id="3",route="gpt",tool="codex",type="cache_read"} 50' in text
    assert 'tvgate_governance_refusals_total{org_id="3",route="gpt"} 1' in text


def test_a_collector_that_is_down_fails_no_call_and_its_drops_are_counted(
    gateway: GatewayProcess,
) -> None:
    # A collector that takes the connection and never answers: each export waits out
    # its whole timeout. A call that waited for the export would take at least that long.
    export_timeout = 4.0
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        down = f"http://127.0.0.1:{hung.getsockname()[1]}/v1/traces"
        with beside(
            gateway,
            TVGATE_OTLP_ENDPOINT=down,
            TVGATE_OTLP_TIMEOUT=str(export_timeout),
            TVGATE_OTLP_HEADERS=f"x-api-key={API_KEY}",
        ) as gw:
            _calls_while_the_collector_hangs(gw, export_timeout)


def _calls_while_the_collector_hangs(gw: GatewayProcess, export_timeout: float) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.tokens["dev@acme.test"], max_retries=0)
    took = []
    for _ in range(3):
        started = time.monotonic()
        client.messages.create(
            model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        took.append(time.monotonic() - started)
    # The export is the writer process's: no call waits for it (a bound of half the
    # export's timeout, far above a call's few milliseconds, not a speed figure).
    assert max(took) < export_timeout / 2, took
    deadline = time.monotonic() + 20 + 3 * export_timeout
    while scrape(gw.url)["tvgate_otlp_spans_dropped_total"] < 3:
        assert time.monotonic() < deadline, "the dropped spans were not counted"
        time.sleep(0.2)
    assert httpx2.get(gw.url + "/readyz", timeout=5).status_code == 200
    # One warning for the outage, not one per batch; the key in none.
    log = gw.log_text()
    assert log.count("OTLP export failed") == 1, log
    assert API_KEY not in log
