"""Prometheus metrics of one tvgate process: a small registry fed from trace rows, rendered on scrape.

Every proxied call is observed once, from the trace row ``ProxyCall`` queues
(``Metrics.observe``), so the metrics and the traces cannot disagree about
what a call was. Observing runs on the IOLoop thread and only bumps numbers
in dicts keyed by label tuples: no lock (the IOLoop is the only writer and
the scrape handler runs on the same thread), no string formatting. Text is
rendered only when ``/metrics`` is scraped.

Each process has its own registry. With ``--workers N``, every worker also
serves its own ``/metrics`` on ``metrics_listen``'s port + its worker index,
so Prometheus scrapes each worker as a target of its own (the ``/metrics`` of
the shared port answers for whichever worker accepted that connection).
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tvgate import __version__
from tvgate.models import OUTCOME_REJECTED, OUTCOME_TIMEOUT, OUTCOME_UPSTREAM_ERROR

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds, for time to first byte and total time: LLM calls run from
#: milliseconds (count_tokens, cached answers) to many minutes (long streams).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
#: Seconds, for the gateway's own added time: it should stay in the low milliseconds.
OVERHEAD_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

#: Outcomes that count as an upstream error.
_UPSTREAM_ERROR_OUTCOMES = frozenset({OUTCOME_UPSTREAM_ERROR, OUTCOME_TIMEOUT})
#: The ``error_type`` of a call the governor refused (tvgate.proxy.call, 429).
_GOVERNANCE_REFUSAL = "rate_limited"
#: Dollars of (org id, provider, model, usage): the governor's prices (tvgate.governance).
Pricer = Callable[[int, str, str, tuple[int, int, int, int]], float]
#: Token counts a trace row carries, and the ``type`` label each is exported under.
_TOKEN_FIELDS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_read_tokens", "cache_read"),
    ("cache_write_tokens", "cache_write"),
)


def _escape(value: Any) -> str:
    """A label value in the text format: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[Any, ...], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Counter:
    """A counter family: one float per label tuple."""

    def __init__(self, name: str, help_: str, label_names: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_
        self.label_names = label_names
        self.values: dict[tuple[Any, ...], float] = {}

    def inc(self, labels: tuple[Any, ...] = (), amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items(), key=lambda item: str(item[0])):
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class _Buckets:
    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum = 0.0


class Histogram:
    """A histogram family with fixed buckets; observing is one bisect and two additions."""

    def __init__(
        self,
        name: str,
        help_: str,
        buckets: tuple[float, ...],
        label_names: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.help = help_
        self.buckets = buckets
        self.label_names = label_names
        self.children: dict[tuple[Any, ...], _Buckets] = {}

    def observe(self, value: float, labels: tuple[Any, ...] = ()) -> None:
        child = self.children.get(labels)
        if child is None:
            # One slot per bucket plus the +Inf overflow.
            child = self.children[labels] = _Buckets(len(self.buckets) + 1)
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        child.counts[bisect_left(self.buckets, value)] += 1
        child.sum += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        bounds = [_number(b) for b in self.buckets] + ["+Inf"]
        for labels, child in sorted(self.children.items(), key=lambda item: str(item[0])):
            cumulative = 0
            for bound, count in zip(bounds, child.counts, strict=True):
                cumulative += count
                label_text = _labels(self.label_names, labels, f'le="{bound}"')
                yield f"{self.name}_bucket{label_text} {cumulative}"
            plain = _labels(self.label_names, labels)
            yield f"{self.name}_sum{plain} {_number(child.sum)}"
            yield f"{self.name}_count{plain} {cumulative}"


class _Sampled:
    """What every value read at scrape time shares: its name, help and kind header."""

    def __init__(self, name: str, help_: str, kind: str) -> None:
        self.name = name
        self.help = help_
        self.kind = kind

    def _header(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"


class Sampled(_Sampled):
    """A value read only at scrape time (a queue depth, a counter kept elsewhere)."""

    def __init__(self, name: str, help_: str, kind: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_, kind)
        self.read = read

    def render(self) -> Iterable[str]:
        yield from self._header()
        yield f"{self.name} {_number(self.read())}"


class SampledByLabel(_Sampled):
    """Values read only at scrape time, one per value of a label (a count kept elsewhere
    by reason)."""

    def __init__(
        self, name: str, help_: str, kind: str, label: str, read: Callable[[], Mapping[str, float]]
    ) -> None:
        super().__init__(name, help_, kind)
        self.label = label
        self.read = read

    def render(self) -> Iterable[str]:
        yield from self._header()
        for value, count in sorted(self.read().items()):
            yield f"{self.name}{_labels((self.label,), (value,))} {_number(count)}"


class Metrics:
    """The registry of one tvgate process."""

    def __init__(
        self,
        worker: int = 0,
        price: Pricer | None = None,
        priced: Callable[[], bool] = lambda: True,
    ) -> None:
        self.worker = worker
        self.price = price
        #: Whether ``price`` knows the prices yet: until then, tokens wait unpriced.
        self.priced = priced
        self.started = time.time()
        self.open_streams = 0
        self.requests = Counter(
            "tvgate_requests_total",
            "Proxied calls that reached authentication, by route, HTTP status and outcome.",
            ("route", "status", "outcome"),
        )
        self.time_to_first_byte = Histogram(
            "tvgate_time_to_first_byte_seconds",
            "From the complete client request to the first response byte sent to the client.",
            LATENCY_BUCKETS,
            ("provider", "route"),
        )
        self.duration = Histogram(
            "tvgate_request_duration_seconds",
            "From the complete client request to the end of the call.",
            LATENCY_BUCKETS,
            ("provider", "route"),
        )
        self.overhead = Histogram(
            "tvgate_overhead_seconds",
            "Time tvgate adds before the upstream request goes out (identity, body, routing, key).",
            OVERHEAD_BUCKETS,
            ("provider", "route"),
        )
        self.tokens = Counter(
            "tvgate_tokens_total",
            "Tokens reported by the provider, by org id, route, tool and type (input, output, "
            "cache_read, cache_write).",
            ("org_id", "route", "tool", "type"),
        )
        self.cost = Counter(
            "tvgate_cost_usd_total",
            "Dollars of the calls at their org's prices, by org id, route and tool.",
            ("org_id", "route", "tool"),
        )
        self.governance_refusals = Counter(
            "tvgate_governance_refusals_total",
            "Calls refused (429) by a budget, a rate limit or a concurrency cap, by org id "
            "and route.",
            ("org_id", "route"),
        )
        self.upstream_errors = Counter(
            "tvgate_upstream_errors_total",
            "Calls that ended in a provider error, a failed connection or a timeout.",
            ("route", "outcome", "error_type"),
        )
        self.connections_refused = Counter(
            "tvgate_connections_refused_total",
            "Client connections closed unserved: past the per-address cap, or without "
            "their first request's headers within the header timeout.",
            ("reason",),
        )
        #: Tokens not priced yet, by (org id, route, tool, provider, model): what
        #: ``tvgate_cost_usd_total`` adds at the next scrape, at the prices then.
        self._unpriced: dict[tuple[Any, ...], list[int]] = {}
        #: The most answer bytes one call's capture has retained (at most capture_max_bytes).
        self.capture_retained_max = 0
        self._sampled: list[Sampled | SampledByLabel] = [
            Sampled(
                "tvgate_open_streams",
                "Streaming responses being relayed right now.",
                "gauge",
                lambda: self.open_streams,
            ),
            Sampled(
                "tvgate_capture_retained_bytes_max",
                "The most bytes of answer one call's capture retained for its trace.",
                "gauge",
                lambda: self.capture_retained_max,
            ),
        ]

    # --- the hot path (IOLoop thread) ---

    def observe(self, row: dict[str, Any]) -> None:
        """Count one finished call from its trace row."""
        route = row["route_name"]
        outcome = row["outcome"]
        self.requests.inc((route, row["status_code"], outcome))
        by_route = (row["provider"], route)
        received = row["received_at"]
        first_byte = row["first_byte_at"]
        if first_byte is not None:
            self.time_to_first_byte.observe(first_byte - received, by_route)
        finished = row["finished_at"]
        if finished is not None:
            self.duration.observe(finished - received, by_route)
        self.overhead.observe(row["overhead_ms"] / 1000.0, by_route)
        org_id, tool = row["org_id"], row["tool"]
        used = False
        for field, kind in _TOKEN_FIELDS:
            count = row[field]
            if count:
                used = True
                self.tokens.inc((org_id, route, tool, kind), count)
        if used:
            # Priced at scrape time (render), not here: a few additions per call.
            key = (
                org_id,
                route,
                tool,
                row["provider"],
                row["response_model"] or row["upstream_model"],
            )
            pending = self._unpriced.get(key)
            if pending is None:
                pending = self._unpriced[key] = [0, 0, 0, 0]
            pending[0] += row["input_tokens"]
            pending[1] += row["output_tokens"]
            pending[2] += row["cache_read_tokens"]
            pending[3] += row["cache_write_tokens"]
        if outcome in _UPSTREAM_ERROR_OUTCOMES:
            self.upstream_errors.inc((route, outcome, row["error_type"]))
        elif outcome == OUTCOME_REJECTED and row["error_type"] == _GOVERNANCE_REFUSAL:
            self.governance_refusals.inc((org_id, route))

    def stream_opened(self) -> None:
        self.open_streams += 1

    def stream_closed(self) -> None:
        self.open_streams -= 1

    # --- wiring and scraping ---

    def sample(self, name: str, help_: str, read: Callable[[], float], kind: str = "gauge") -> None:
        """Export a value that is read at scrape time (``kind``: gauge or counter)."""
        self._sampled.append(Sampled(name, help_, kind, read))

    def sample_by(
        self,
        name: str,
        help_: str,
        label: str,
        read: Callable[[], Mapping[str, float]],
        kind: str = "gauge",
    ) -> None:
        """Export values read at scrape time, one per value of ``label``."""
        self._sampled.append(SampledByLabel(name, help_, kind, label, read))

    def _price_unpriced(self) -> None:
        price, unpriced, cost = self.price, self._unpriced, self.cost
        if price is None or not self.priced():
            return
        for (org_id, route, tool, provider, model), usage in unpriced.items():
            tokens = (usage[0], usage[1], usage[2], usage[3])
            cost.inc((org_id, route, tool), price(org_id, provider, model, tokens))
        unpriced.clear()

    def render(self) -> bytes:
        self._price_unpriced()
        lines: list[str] = [
            "# HELP tvgate_worker_info This process: worker index, pid and tvgate version.",
            "# TYPE tvgate_worker_info gauge",
            f'tvgate_worker_info{{worker="{self.worker}",pid="{os.getpid()}",'
            f'version="{_escape(__version__)}"}} 1',
            "# HELP tvgate_process_start_time_seconds When this process started (Unix time).",
            "# TYPE tvgate_process_start_time_seconds gauge",
            f"tvgate_process_start_time_seconds {self.started:.3f}",
        ]
        for family in (
            self.requests,
            self.time_to_first_byte,
            self.duration,
            self.overhead,
            self.tokens,
            self.cost,
            self.upstream_errors,
            self.governance_refusals,
            self.connections_refused,
        ):
            lines.extend(family.render())
        for sampled in self._sampled:
            lines.extend(sampled.render())
        lines.append("")
        return "\n".join(lines).encode()
