"""What a call's OpenTelemetry span says, from its trace row: no SDK here, only the mapping.

The request path keeps the client's W3C ``traceparent`` on the row when it is well
formed (:func:`checked_traceparent`); the writer process turns each written row into a
span (:mod:`tvgate.traces.otlp`) named and attributed as the OpenTelemetry GenAI
semantic conventions say (:func:`span_name`, :func:`span_attributes`), with tvgate's
own attributes under ``tvgate.``. Cache tokens: the conventions' ``input_tokens``
includes those read from and written to the cache (OpenAI's ``prompt_tokens`` does,
Anthropic's ``input_tokens`` does not, and the row keeps Anthropic's figure), so the
Anthropic figure is summed.
"""

from __future__ import annotations

import re
from typing import Any

from tvgate.models import OUTCOME_OK, PROVIDER_ANTHROPIC, PROVIDER_AZURE, PROVIDER_BEDROCK
from tvgate.providers import (
    ANTHROPIC_COUNT_TOKENS,
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    speaks,
)
from tvgate.traces.rows import TraceRow

#: Version 00 exactly: 2 hex, 32 hex of trace id, 16 hex of parent id, 2 hex of flags,
#: lower case as the W3C recommendation writes them (55 characters).
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

#: ``gen_ai.operation.name`` of each endpoint (tvgate.providers).
OPERATIONS = {
    ANTHROPIC_MESSAGES: "chat",
    ANTHROPIC_COUNT_TOKENS: "count_tokens",
    OPENAI_CHAT: "chat",
    OPENAI_RESPONSES: "chat",
    OPENAI_COMPLETIONS: "text_completion",
    OPENAI_EMBEDDINGS: "embeddings",
}

#: ``gen_ai.provider.name`` where the conventions name a provider otherwise than tvgate.
PROVIDER_NAMES = {PROVIDER_AZURE: "azure.ai.openai", PROVIDER_BEDROCK: "aws.bedrock"}


def checked_traceparent(value: str | None) -> str:
    """``value`` if it is a valid version-00 ``traceparent``, else empty (ignored, as the
    W3C recommendation says of a malformed one)."""
    if not value or len(value) != 55:
        return ""
    match = _TRACEPARENT.fullmatch(value)
    if match is None or match[1] == _ZERO_TRACE or match[2] == _ZERO_SPAN:
        return ""
    return value


def parent_ids(traceparent: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a checked ``traceparent``; None when empty."""
    if not traceparent:
        return None
    return int(traceparent[3:35], 16), int(traceparent[36:52], 16), int(traceparent[53:], 16)


def span_name(row: TraceRow) -> str:
    """``{gen_ai.operation.name} {gen_ai.request.model}``, as the conventions name it."""
    operation = OPERATIONS.get(row.get("endpoint", ""), "chat")
    model = row.get("upstream_model") or row.get("requested_model") or ""
    return f"{operation} {model}" if model else operation


def span_attributes(row: TraceRow) -> dict[str, Any]:
    """The span's attributes: the GenAI conventions' where they have a name, else
    ``tvgate.``; a figure or a name the call did not have is left out."""
    cache_read = int(row.get("cache_read_tokens") or 0)
    cache_write = int(row.get("cache_write_tokens") or 0)
    input_tokens = int(row.get("input_tokens") or 0)
    provider = row.get("provider") or ""
    if speaks(provider) == PROVIDER_ANTHROPIC:  # a Bedrock key counts as Anthropic does
        input_tokens += cache_read + cache_write
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATIONS.get(row.get("endpoint", ""), "chat"),
        "gen_ai.provider.name": PROVIDER_NAMES.get(provider, provider),
        "gen_ai.request.model": row.get("upstream_model") or row.get("requested_model") or "",
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": int(row.get("output_tokens") or 0),
        "tvgate.trace_id": row.get("id") or "",
        "tvgate.org_id": int(row.get("org_id") or 0),
        "tvgate.route": row.get("route_name") or "",
        "tvgate.key_name": row.get("key_name") or "",
        "tvgate.outcome": row.get("outcome") or "",
        "tvgate.cost_usd": float(row.get("cost_usd") or 0.0),
        "tvgate.overhead_ms": float(row.get("overhead_ms") or 0.0),
        "tvgate.stream": bool(row.get("stream")),
        "http.response.status_code": int(row.get("status_code") or 0),
    }
    optional = {
        "gen_ai.response.model": row.get("response_model"),
        "gen_ai.response.id": row.get("message_id"),
        "gen_ai.conversation.id": row.get("session_id"),
        "gen_ai.agent.id": row.get("agent_id"),
        "tvgate.parent_agent_id": row.get("parent_agent_id"),
        "server.address": row.get("server_address"),
        "tvgate.user_id": row.get("user_id"),
        "tvgate.tool": row.get("tool"),
        "tvgate.tool_version": row.get("tool_version"),
        "tvgate.requested_model": row.get("requested_model"),
        "tvgate.upstream_request_id": row.get("upstream_request_id"),
        "tvgate.repo": row.get("repo"),
        "tvgate.branch": row.get("branch"),
        "gen_ai.usage.cache_read.input_tokens": cache_read,
        "gen_ai.usage.cache_creation.input_tokens": cache_write,
        "gen_ai.usage.reasoning.output_tokens": row.get("reasoning_tokens"),
    }
    attributes.update((name, value) for name, value in optional.items() if value)
    if row.get("finish_reason"):
        attributes["gen_ai.response.finish_reasons"] = (row["finish_reason"],)
    if row.get("outcome") != OUTCOME_OK:
        attributes["error.type"] = row.get("error_type") or row.get("outcome") or "error"
    return attributes
