"""The translated workloads of ``make bench``: a client of one API on a route of the other.

This module owns measuring what translation costs: one ``tvgate serve`` (SQLite, every
feature on) is sent, in turn, a passthrough call (the client speaks the route's API) and
a translated one (the client speaks the other API) of the same size, against the same
upstream answer, and the CPU seconds its serving process and its trace writer process
spent are read from ``/proc`` around each run and divided by the calls answered. CPU per
call is the figure a shared, loaded machine disturbs least; passthrough and translated
take turns within each repeat, so both see the same machine.

Two directions, each at 200 B and 190 KB, JSON and a 50-event stream, concurrency 16:

* an OpenAI Chat client on an Anthropic route, beside an Anthropic client on it;
* an Anthropic client on an OpenAI Chat route, beside a Chat client on it.

The goal (issue 19): a translated call costs at most 1.3 times the CPU of the
passthrough call of the same size in the same run, serving and writer process together.

``python -m bench.run --translated-only`` runs just these and prints their table.
"""

from __future__ import annotations

import http.client
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from bench import chat_payloads, payloads
from bench import gateway as gw
from bench.loadgen import read_headers_file, run_load, write_headers_file
from bench.procs import cpu_split

if TYPE_CHECKING:
    from bench.run import Bench

#: The goal: translated CPU per call over passthrough CPU per call, at most.
RATIO_GOAL = 1.3
CONNECTIONS = 16

_MESSAGES = "/v1/messages?beta=true"
_CHAT = "/v1/chat/completions"
#: What a client's answer must hold to be in the client's API (checked once per side).
_MARKS = {
    (_MESSAGES, "json"): b'"type":"message"',
    (_MESSAGES, "sse"): b"event: message_stop",
    (_CHAT, "json"): b'"object":"chat.completion"',
    (_CHAT, "sse"): b"data: [DONE]",
}


@dataclass(frozen=True)
class Side:
    """One way of calling a route: the client's path, body and headers."""

    path: str
    body: Path
    headers: Path


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    kind: str  # "json" or "sse"
    passthrough: Side
    translated: Side


@dataclass
class CaseResult:
    case: Case
    #: "passthrough"/"translated" -> the repeats: requests, rps, serving_s, writer_s.
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def per_call_ms(self, side: str, key: str) -> float:
        """The median over repeats of ``key`` CPU ms per call (``total``: both processes)."""
        values = [_per_call(run, key) for run in self.runs[side]]
        return statistics.median(values) if values else 0.0

    def ratios(self, key: str) -> list[float]:
        """Translated over passthrough CPU per call, each repeat's pair."""
        return [
            _per_call(t, key) / _per_call(p, key)
            for p, t in zip(self.runs["passthrough"], self.runs["translated"], strict=True)
            if _per_call(p, key) > 0
        ]

    def ratio(self, key: str = "total") -> float:
        values = self.ratios(key)
        return statistics.median(values) if values else 0.0


def _per_call(run: dict[str, float], key: str) -> float:
    seconds = run["serving_s"] + run["writer_s"] if key == "total" else run[key]
    return 1000.0 * seconds / run["requests"] if run["requests"] else 0.0


@dataclass
class TranslatedResult:
    cases: list[CaseResult]
    #: Traces written over the workloads, by outcome (and ``total``).
    traces: dict[str, int]
    answered: int


def cases(root: Path, token: str) -> list[Case]:
    """The workloads' body and header files under ``root``, and the cases they make."""
    root.mkdir(parents=True, exist_ok=True)
    token_header = {"Authorization": f"Bearer {token}"}
    headers = {
        _MESSAGES: write_headers_file(
            root / "anthropic.headers", {**payloads.CLAUDE_CODE_HEADERS, **token_header}
        ),
        _CHAT: write_headers_file(
            root / "chat.headers", {**chat_payloads.OPENAI_SDK_HEADERS, **token_header}
        ),
    }
    writers = {
        (_MESSAGES, "200 B"): payloads.small_request,
        (_MESSAGES, "190 KB"): payloads.large_request,
        (_CHAT, "200 B"): chat_payloads.small_chat_request,
        (_CHAT, "190 KB"): chat_payloads.large_chat_request,
    }

    def side(path: str, size: str, route: str, stream: bool) -> Side:
        api = "anthropic" if path == _MESSAGES else "chat"
        body = root / f"{api}-{route}-{size.replace(' ', '')}.body"
        body.write_bytes(writers[path, size](route, stream))
        return Side(path, body, headers[path])

    out = []
    directions = (
        (
            "chat-on-anthropic",
            "Chat client, Anthropic route",
            _MESSAGES,
            _CHAT,
            {"json": payloads.ROUTE_JSON, "sse": payloads.ROUTE_SSE},
        ),
        (
            "anthropic-on-chat",
            "Anthropic client, OpenAI route",
            _CHAT,
            _MESSAGES,
            {"json": chat_payloads.ROUTE_CHAT_JSON, "sse": chat_payloads.ROUTE_CHAT_SSE},
        ),
    )
    for slug, label, native, foreign, routes in directions:
        for size in ("200 B", "190 KB"):
            for kind, route in routes.items():
                stream = kind == "sse"
                out.append(
                    Case(
                        f"{slug}-{'small' if size == '200 B' else 'large'}-{kind}",
                        f"{label}, {size} {kind.upper()}",
                        kind,
                        side(native, size, route, stream),
                        side(foreign, size, route, stream),
                    )
                )
    return out


def _check(url: str, side: Side, kind: str) -> None:
    """One call, outside the figures: it must be answered 200 in the client's API (the
    load generator counts statuses only)."""
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(
            "POST", side.path, side.body.read_bytes(), read_headers_file(side.headers)
        )
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"{side.path} ({kind}): {response.status} {answer[:2000]!r}")
    if _MARKS[side.path, kind] not in answer:
        raise RuntimeError(f"{side.path} ({kind}): not an answer in the client's API: {answer!r}")


def run_translated(bench: Bench, database_url: str, token: str) -> TranslatedResult:
    """Every case against one fresh gateway: passthrough and translated in turn, repeated."""
    plan = bench.plan
    todo = cases(bench.tmp / "bodies" / "translated", token)
    before = gw.trace_counts(database_url)
    tvgate = gw.start_tvgate(database_url, token, bench.tmp / "gateway", "translated")
    results = [CaseResult(case, {"passthrough": [], "translated": []}) for case in todo]
    answered = 0
    try:
        for result in results:
            for name in ("passthrough", "translated"):
                side: Side = getattr(result.case, name)
                _check(tvgate.url, side, result.case.kind)
                # Warm the side (the upstream connections, the conversation's capture).
                warm = run_load(
                    tvgate.url + side.path,
                    side.body,
                    side.headers,
                    CONNECTIONS,
                    1,
                    use_wrk=bench.use_wrk,
                    python=bench.python,
                )
                answered += warm.requests + 1
        for _ in range(plan.repeat):
            for result in results:
                for name in ("passthrough", "translated"):
                    side = getattr(result.case, name)
                    serving0, writer0 = cpu_split(tvgate.pid)
                    load = run_load(
                        tvgate.url + side.path,
                        side.body,
                        side.headers,
                        CONNECTIONS,
                        plan.translated_seconds,
                        use_wrk=bench.use_wrk,
                        python=bench.python,
                    )
                    serving1, writer1 = cpu_split(tvgate.pid)
                    if load.errors_status or not load.requests:
                        raise RuntimeError(
                            f"{result.case.name} {name}: {load.errors_status} error answers, "
                            f"{load.requests} requests"
                        )
                    answered += load.requests
                    result.runs[name].append(
                        {
                            "requests": load.requests,
                            "rps": load.rps,
                            "serving_s": serving1 - serving0,
                            "writer_s": writer1 - writer0,
                        }
                    )
                bench.say("    " + case_line(result))
    finally:
        tvgate.stop()
    after = gw.trace_counts(database_url)
    traces = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    return TranslatedResult(results, traces, answered)


def case_line(result: CaseResult) -> str:
    last = {name: runs[-1] for name, runs in result.runs.items()}
    return (
        f"{result.case.title}: CPU/call passthrough "
        f"{_per_call(last['passthrough'], 'total'):.3f} ms, translated "
        f"{_per_call(last['translated'], 'total'):.3f} ms "
        f"({_per_call(last['translated'], 'total') / _per_call(last['passthrough'], 'total'):.2f}x)"
    )


def render(result: TranslatedResult) -> list[str]:
    """The report's section on translated calls (markdown lines)."""
    lines = [
        "## Translated calls",
        "",
        f"One gateway, concurrency {CONNECTIONS}, SQLite; each row's passthrough call (the "
        "client speaks the route's API) and translated call (the client speaks the other "
        "API) hit the same upstream answer with bodies of the same size, taking turns "
        "within each repeat. CPU per call is read from `/proc` (user + system) of the "
        "serving process and of its trace writer process, over every call of a run. "
        f"Goal: translated <= {RATIO_GOAL}x passthrough, both processes together.",
        "",
        "| workload | passthrough ms CPU/call (serving + writer) | translated ms CPU/call "
        "(serving + writer) | serving ratio | total ratio | each repeat | req/s passthrough "
        "/ translated | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in result.cases:

        def cpu(side: str, case: CaseResult = case) -> str:
            return (
                f"{case.per_call_ms(side, 'total'):.3f} ({case.per_call_ms(side, 'serving_s'):.3f}"
                f" + {case.per_call_ms(side, 'writer_s'):.3f})"
            )

        rps = {
            side: statistics.median(run["rps"] for run in case.runs[side])
            for side in ("passthrough", "translated")
        }
        ratio = case.ratio()
        lines.append(
            f"| {case.case.title} | {cpu('passthrough')} | {cpu('translated')} | "
            f"{case.ratio('serving_s'):.2f}x | {ratio:.2f}x | "
            f"{', '.join(f'{r:.2f}' for r in case.ratios('total'))} | "
            f"{rps['passthrough']:.0f} / {rps['translated']:.0f} | "
            f"{'yes' if ratio <= RATIO_GOAL else '**no**'} |"
        )
    lines += [
        "",
        f"Traces written: {', '.join(f'{k} {v}' for k, v in sorted(result.traces.items()))}, "
        f"for {result.answered} calls the load generator saw answered (warm-up calls "
        "included; a call it cut off at the end of a run is traced as client_cancelled, or "
        "ok if the gateway had finished it).",
        "",
    ]
    return lines
