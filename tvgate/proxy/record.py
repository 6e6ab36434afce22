"""What a proxied call leaves behind: its trace record, its metrics, its governor charge.

``TraceRecord`` is the row a call's trace is written from, typed, with every field the
trace table takes from the request path; ``record_call`` builds it in one place from a
finished ``ProxyCall`` (``tvgate.proxy.call``) and its relay (``tvgate.proxy.relay``),
queues it with the captured bodies (``TraceWriter.submit``, which never blocks), counts
it in the metrics, and charges the usage the answer reports to the admission that served
the call, so that budgets see exactly what the trace says.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from tvgate.headers import header
from tvgate.models import (
    CLIENT_SUBSCRIPTION,
    OUTCOME_OK,
    OUTCOME_UPSTREAM_ERROR,
)
from tvgate.providers.common import checked_usage
from tvgate.traces.attribution import agent_ids, attribution_header, detect_tool, session_id
from tvgate.traces.spans import checked_traceparent
from tvgate.traces.writer import CapturedBody, TraceRow

if TYPE_CHECKING:
    from tvgate.proxy.call import ProxyCall


@dataclass
class TraceRecord:
    """One call's trace row (``tvgate.models.Trace``), as the writer takes it."""

    id: str
    org_id: int
    user_id: int
    route_name: str
    key_name: str
    provider: str
    endpoint: str
    requested_model: str
    upstream_model: str
    response_model: str
    stream: bool
    status_code: int
    outcome: str
    error_type: str
    error_message: str
    received_at: float
    first_byte_at: float | None
    finished_at: float | None
    overhead_ms: float
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    bytes_in: int
    bytes_out: int
    tool: str
    tool_version: str
    session_id: str
    agent_id: str
    parent_agent_id: str
    upstream_request_id: str
    message_id: str
    repo: str
    branch: str
    truncated: bool
    #: The attempts' JSON list when a fallback was tried (empty otherwise).
    attempts: str
    #: Filled by the writer once the bodies are stored.
    request_blob: str
    response_blob: str
    #: Priced by the writer.
    cost_usd: float
    #: What was off in the figures the provider reported (the writer adds its own mends).
    anomalies: list[Any]
    #: The client's W3C traceparent when well formed: the parent of the call's span.
    traceparent: str
    finish_reason: str
    server_address: str
    #: How the client called: "" over HTTP, "websocket" for a Responses WebSocket.
    transport: str
    #: CLIENT_SUBSCRIPTION when the caller's own subscription was the credential, else "".
    client_credential: str

    def row(self) -> TraceRow:
        """The record as the writer's row: its own attributes' dict, not a copy (a record
        is dropped once queued, and copying 41 fields cost 2 µs a call)."""
        row: TraceRow = vars(self)
        return row


def new_trace_id() -> str:
    """A random version-4 UUID as 32 hex digits, what ``uuid.uuid4().hex`` writes, without
    building a ``UUID`` (3 us a call against 0.6)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    return raw.hex()


@functools.lru_cache(maxsize=1024)
def server_address(base_url: str) -> str:
    """The host a key's base URL names (the trace's ``server_address``): a process sees a
    handful of base URLs, so each is parsed once, not once per call."""
    return urlsplit(base_url).hostname or ""


def record_call(call: ProxyCall) -> None:
    """Queue the trace of ``call``, which has ended; then charge its usage."""
    principal = call.principal
    if principal is None:
        return
    relay = call.relay
    assembled = relay.assembled()
    if assembled is not None and assembled.error_type and call.outcome == OUTCOME_OK:
        call.outcome = OUTCOME_UPSTREAM_ERROR
    headers = call.handler.client_headers
    tool, tool_version = detect_tool(header(headers, "User-Agent"))
    body = call.body
    # The provider may be a member's own server: an absurd figure counts toward nothing.
    usage, anomalies = checked_usage(assembled.usage) if assembled is not None else (None, [])
    translation = relay.translation
    if translation is not None:
        # The client's API, the route's, and what of the call the translation dropped.
        anomalies = [
            *anomalies,
            f"translated: {call.endpoint.api} on {relay.upstream_api.api}",
            *(f"translation dropped: {note}" for note in translation.notes),
        ]
    if call.notes:
        anomalies = [*anomalies, *call.notes]
    finished = time.perf_counter()
    route = call.route
    truncated = assembled is not None and (
        assembled.truncated or (relay.assembler is not None and not assembled.complete)
    )
    retained = relay.retained()
    gateway = call.gateway
    metrics = gateway.metrics
    metrics.capture_retained_max = max(metrics.capture_retained_max, retained)
    response = assembled.response if assembled is not None else None
    captured = (
        # The answer is held (as a document) until the writer stores it: its size
        # counts in the writer's memory budget with the request's.
        CapturedBody(body.raw, response, retained if response is not None else 0)
        if body is not None
        else None
    )
    if relay.stream_counted:
        metrics.stream_closed()
    failed = assembled is not None and bool(assembled.error_type)
    agent, parent_agent = agent_ids(headers)
    record = TraceRecord(
        id=new_trace_id(),
        org_id=principal.org_id,
        user_id=principal.user_id,
        route_name=route.name if route else "",
        key_name=route.key.name if route else "",
        provider=call.provider,
        endpoint=call.endpoint.api,
        requested_model=body.model if body else "",
        upstream_model=call.upstream_model,
        response_model=(assembled.model or "") if assembled else "",
        stream=bool(body and body.stream),
        status_code=relay.status,
        outcome=call.outcome or call.gone_outcome,
        error_type=(assembled.error_type if assembled and failed else "") or call.error_type,
        error_message=((assembled.error_message or "") if assembled and failed else "")
        or call.error_message,
        received_at=call.received_at,
        first_byte_at=call.at(relay.first_byte),
        finished_at=call.at(finished),
        overhead_ms=round(call.overhead_ms(), 3),
        input_tokens=usage.input_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        cache_read_tokens=usage.cache_read_tokens if usage else 0,
        cache_write_tokens=usage.cache_write_tokens if usage else 0,
        reasoning_tokens=usage.reasoning_tokens if usage else 0,
        bytes_in=call.bytes_in,
        bytes_out=relay.bytes_out,
        tool=tool,
        tool_version=tool_version,
        session_id=session_id(headers),
        agent_id=agent,
        parent_agent_id=parent_agent,
        upstream_request_id=relay.upstream_request_id,
        message_id=(assembled.message_id or "") if assembled else "",
        repo=attribution_header(headers, "repo"),
        branch=attribution_header(headers, "branch"),
        truncated=truncated,
        attempts=orjson.dumps(call.attempts).decode() if len(call.attempts) > 1 else "",
        request_blob="",
        response_blob="",
        cost_usd=0.0,
        anomalies=anomalies,
        traceparent=checked_traceparent(header(headers, "traceparent")),
        finish_reason=(assembled.stop_reason or "") if assembled else "",
        server_address=server_address(route.key.base_url) if route else "",
        transport=call.handler.transport,
        client_credential=CLIENT_SUBSCRIPTION if call.handler.subscription else "",
    )
    row = record.row()
    gateway.traces.submit(row, captured)
    metrics.observe(row)
    admission = call.serving_admission or call.admission
    if admission is not None and usage is not None:
        gateway.governor.charge(
            admission,
            principal.org_id,
            usage.input_tokens
            + usage.output_tokens
            + usage.cache_read_tokens
            + usage.cache_write_tokens,
            call.provider,
            (assembled.model if assembled is not None else "") or call.upstream_model,
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
            ),
        )
