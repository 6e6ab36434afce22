"""Each written trace as an OpenTelemetry span, exported over OTLP/HTTP from the writer process.

With ``otlp_endpoint`` set, the trace writer process (:mod:`tvgate.traces.child`) hands
every batch of rows it has written to :meth:`SpanExport.export_rows` (on the writer's
thread, after the commit: the row is then priced and mended). Each row becomes one
CLIENT span with the call's real start and end (``received_at``, ``finished_at``), the
client's ``traceparent`` as its parent, and the attributes of
:func:`~tvgate.traces.spans.span_attributes`. The SDK's ``BatchSpanProcessor`` sends
them from its own thread with the OTLP/HTTP exporter (protobuf, retries with backoff
within ``otlp_timeout``). Nothing of this runs in the serving process: a collector that
is slow or away never slows or fails a call.

What does not reach the collector is counted in ``WriterStats.otlp_dropped`` (reported
to the serving process with its ``STATS``, exposed as
``tvgate_otlp_spans_dropped_total``): spans of an export that failed after its retries,
spans not queued because ``QUEUE_SIZE`` were waiting already, and those still waiting
when a stop's wait ran out. Every call becomes a span (the sampler samples all): a
parent's sampled flag does not drop a call from the org's view of the gateway.

The export headers (``otlp_headers``) are secrets: they are passed to the exporter and
never logged; the SDK's own log lines (which a failing export writes once a batch) are
silenced, and one warning is logged when exports start failing and one when they work
again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from tvgate import __version__
from tvgate.models import OUTCOME_OK
from tvgate.traces.rows import TraceRow, WriterStats
from tvgate.traces.span_content import content_attributes
from tvgate.traces.spans import parent_ids, span_attributes, span_name

log = logging.getLogger("tvgate.traces")

#: Spans waiting for the exporter at most; past it, a span is dropped (and counted).
QUEUE_SIZE = 8192
#: Spans per export request.
BATCH_SIZE = 512
#: How long the processor waits to fill a batch before it sends what it has.
SCHEDULE_DELAY_MS = 1000


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class _CountingExporter(SpanExporter):
    """The OTLP exporter, with what it is handed and what it fails to send counted."""

    def __init__(self, inner: SpanExporter, owner: SpanExport) -> None:
        self.inner = inner
        self.owner = owner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.owner.handed(len(spans))
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001 - an exporter bug must not end the processor's thread
            result = SpanExportResult.FAILURE
        self.owner.exported(len(spans), result == SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class SpanExport:
    """Spans from written rows, batched and sent to ``endpoint`` off the writer's thread."""

    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str],
        timeout: float,
        stats: WriterStats,
        *,
        worker: int = 0,
        queue_size: int = QUEUE_SIZE,
        schedule_delay_ms: int = SCHEDULE_DELAY_MS,
    ) -> None:
        # Its lines would repeat for every failed batch, and name the endpoint's answer.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        self.stats = stats
        self.timeout = timeout
        self.queue_size = queue_size
        self._lock = threading.Lock()
        #: Spans given to the processor, and spans it handed to the exporter.
        self._queued = self._handed = 0
        self._failing = False
        exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout)
        self._processor = BatchSpanProcessor(
            _CountingExporter(exporter, self),
            max_queue_size=queue_size,
            schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=min(BATCH_SIZE, queue_size),
        )
        resource = Resource.create(
            {
                "service.name": "tvgate",
                "service.version": __version__,
                "tvgate.worker": worker,
            }
        )
        self._provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("tvgate", __version__)

    # --- the writer's thread ---

    def export_rows(self, rows: list[TraceRow]) -> None:
        """Queue a span for each written row; never blocks, never raises."""
        for row in rows:
            if self._queued - self._handed >= self.queue_size:
                self._drop(1)
                continue
            try:
                self._span(row)
            except Exception:  # a row the SDK refuses is a span lost, and counted
                log.exception("trace %s: its span could not be made", row.get("id"))
                self._drop(1)
                continue
            self._queued += 1

    def _span(self, row: TraceRow) -> None:
        parent = parent_ids(row.get("traceparent") or "")
        context = None
        if parent is not None:
            trace_id, span_id, flags = parent
            remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        attributes: dict[str, Any] = span_attributes(row)
        content = row.get("span_content")
        if content is not None:
            attributes.update(content_attributes(row.get("endpoint", ""), *content))
        received = row["received_at"]
        span = self._tracer.start_span(
            span_name(row),
            context=context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=_ns(received),
        )
        if row.get("outcome") != OUTCOME_OK:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=_ns(row.get("finished_at") or received))

    # --- the processor's thread ---

    def handed(self, count: int) -> None:
        self._handed += count

    def exported(self, count: int, ok: bool) -> None:
        if ok:
            if self._failing:
                self._failing = False
                log.info("OTLP export works again")
            return
        self._drop(count)
        if not self._failing:
            self._failing = True
            log.warning(
                "OTLP export failed: %d spans dropped; later failures are only counted "
                "(tvgate_otlp_spans_dropped_total)",
                count,
            )

    def _drop(self, count: int) -> None:
        # Two threads count drops: the writer's (queue full) and the processor's.
        with self._lock:
            self.stats.otlp_dropped += count

    # --- stop ---

    def stop(self, timeout: float | None = None) -> None:
        """Send what is queued, waiting at most ``timeout`` (default: one export's
        timeout); what is still waiting then is counted dropped."""
        done = threading.Thread(
            target=self._provider.shutdown, name="tvgate-otlp-stop", daemon=True
        )
        done.start()
        done.join(self.timeout if timeout is None else timeout)
        left = self._queued - self._handed
        if done.is_alive() and left > 0:
            self._drop(left)
