"""What tvgate knows of Anthropic's Messages API (and its token counter).

The endpoints and upstream paths, the key header (``x-api-key``), the error envelope
and the stream's ``error`` event, the ``/v1/models`` format, how usage counts cached
tokens (``input_tokens`` excludes them), and the assembler that rebuilds a Message
from its stream (``message_start``, ``content_block_*``, ``message_delta``,
``message_stop``), as the ``anthropic`` SDK's own accumulator does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from tvgate.models import PROVIDER_ANTHROPIC
from tvgate.providers.base import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES, JSON
from tvgate.providers.common import (
    Assembled,
    SSEStream,
    StreamAssembler,
    Usage,
    as_int,
    as_str,
    error_fields,
    event_index,
    sub_object,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    508: "loop_detected",
    529: "overloaded_error",
}
#: ``created_at`` of every listed model: a route has no release date.
_CREATED = datetime.fromtimestamp(0, UTC).isoformat().replace("+00:00", "Z")


class AnthropicMessages:
    """``/v1/messages``."""

    api = ANTHROPIC_MESSAGES
    provider = PROVIDER_ANTHROPIC
    client_path = "messages"
    upstream_path = "/v1/messages"
    default_base_url = "https://api.anthropic.com"
    charged = True

    def auth_headers(self, secret: str) -> list[tuple[str, str]]:
        return [("x-api-key", secret)]

    def error_body(self, status: int, message: str, *, kind: str = "", code: str = "") -> bytes:
        kind = kind or _ERROR_TYPES.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})

    def stream_error_event(self, message: str, kind: str = "api_error") -> bytes:
        payload = {"type": "error", "error": {"type": kind, "message": message}}
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"

    def models_body(self, routes: Sequence[tuple[str, str]], *, has_more: bool = False) -> bytes:
        data = [
            {"type": "model", "id": name, "display_name": name, "created_at": _CREATED}
            for name, _provider in routes
        ]
        return orjson.dumps(
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def uncached_input(self, input_tokens: int, cache_read_tokens: int) -> int:
        # Anthropic's input_tokens already leaves out the tokens read from the cache.
        return input_tokens

    def stream_assembler(self, max_retained: int) -> StreamAssembler | None:
        return _AnthropicStream(max_retained)

    def assemble(self, obj: JSON) -> Assembled:
        return _answer(obj, complete=True)

    def read_usage(self, usage: object) -> Usage:
        return _anthropic_usage(usage)


class AnthropicCountTokens(AnthropicMessages):
    """``/v1/messages/count_tokens``: a count, not a model's answer; never streamed."""

    api = ANTHROPIC_COUNT_TOKENS
    client_path = "messages/count_tokens"
    upstream_path = "/v1/messages/count_tokens"
    charged = False

    def stream_assembler(self, max_retained: int) -> StreamAssembler | None:
        return None

    def assemble(self, obj: JSON) -> Assembled:
        return Assembled(None, Usage(input_tokens=as_int(obj.get("input_tokens"))), complete=True)


MESSAGES = AnthropicMessages()
COUNT_TOKENS = AnthropicCountTokens()


def _anthropic_usage(u: object) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        as_int(u.get("input_tokens")),
        as_int(u.get("output_tokens")),
        as_int(u.get("cache_read_input_tokens")),
        as_int(u.get("cache_creation_input_tokens")),
        as_int(sub_object(u, "output_tokens_details").get("thinking_tokens")),
    )


# Content block deltas that extend a string field of their block.
_ANTHROPIC_TEXT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking"}


class _AnthropicStream(SSEStream):
    __slots__ = ("_blocks", "_done", "_json", "_message", "_parts")

    def __init__(self, max_retained: int) -> None:
        super().__init__(max_retained)
        self._message: JSON | None = None
        self._blocks: dict[int, JSON] = {}
        # Per open block: the field its deltas extend ("text"/"thinking") and the pieces.
        self._parts: dict[int, tuple[str, list[str]]] = {}
        # Per open tool block: pieces of its input JSON, parsed when the block stops.
        self._json: dict[int, list[str]] = {}
        self._done = False

    def _msg(self) -> JSON:
        if self._message is None:
            self._message = {"type": "message", "role": "assistant", "content": []}
        return self._message

    def _on_event(self, name: str | None, obj: JSON, size: int) -> None:
        kind = obj.get("type") or name
        if kind == "content_block_delta":
            idx = event_index(obj["index"])
            delta = obj["delta"]
            dtype = delta["type"]
            text_field = _ANTHROPIC_TEXT_DELTAS.get(dtype)
            if text_field is not None:
                parts = self._parts.get(idx)
                if parts is not None and parts[0] == text_field:
                    parts[1].append(self._take(delta[text_field]))
            elif dtype == "input_json_delta":
                pieces = self._json.get(idx)
                if pieces is not None:
                    pieces.append(self._take(delta["partial_json"]))
            elif dtype == "signature_delta":
                block = self._blocks.get(idx)
                if block is not None and block.get("type") == "thinking":
                    block["signature"] = delta["signature"]
            elif dtype == "citations_delta":
                block = self._blocks.get(idx)
                if block is not None and block.get("type") == "text" and self._charge(size):
                    citations = block.get("citations")
                    if citations:
                        citations.append(delta["citation"])
                    else:
                        block["citations"] = [delta["citation"]]
        elif kind == "content_block_start":
            idx = event_index(obj["index"])
            block = obj["content_block"]
            if not isinstance(block, dict):
                return
            if not self._charge(size):
                return
            self._msg()
            self._blocks[idx] = block
            btype = block.get("type")
            if btype == "text" or btype == "thinking":
                self._parts[idx] = (btype, [])
            elif isinstance(btype, str) and btype.endswith("tool_use"):
                self._json[idx] = []
        elif kind == "content_block_stop":
            self._close_block(obj["index"])
        elif kind == "message_start":
            message = obj["message"]
            if isinstance(message, dict) and self._charge(size):
                self._message = message
                for i, block in enumerate(message.get("content") or ()):
                    if isinstance(block, dict):
                        self._blocks[i] = block
        elif kind == "message_delta":
            msg = self._msg()
            for key, value in sub_object(obj, "delta").items():
                # Stop fields are set even when null, as the SDK does; other
                # fields (container) only when given.
                if value is not None or key.startswith("stop_"):
                    msg[key] = value
            usage = msg.get("usage")
            if not isinstance(usage, dict):
                usage = msg["usage"] = {}
            # message_delta usage is cumulative: each given field replaces the
            # message_start value, absent ones leave it.
            for key, value in sub_object(obj, "usage").items():
                if value is not None:
                    usage[key] = value
        elif kind == "message_stop":
            self._done = True
            metrics = obj.get("amazon-bedrock-invocationMetrics")
            if isinstance(metrics, dict):
                self._bedrock_usage(metrics)
        elif kind == "error":
            self._error = error_fields(obj.get("error"))

    def _bedrock_usage(self, metrics: JSON) -> None:
        """Bedrock's own count of the call (its last event's ``invocationMetrics``): the
        figures the answer's usage left out."""
        usage = self._msg().setdefault("usage", {})
        if isinstance(usage, dict):
            for field, metric in (
                ("input_tokens", "inputTokenCount"),
                ("output_tokens", "outputTokenCount"),
                ("cache_read_input_tokens", "cacheReadInputTokenCount"),
                ("cache_creation_input_tokens", "cacheWriteInputTokenCount"),
            ):
                if not usage.get(field) and isinstance(metrics.get(metric), int):
                    usage[field] = metrics[metric]

    def _close_block(self, idx: object) -> None:
        if not isinstance(idx, int):
            return
        block = self._blocks.get(idx)
        if block is None:
            return
        parts = self._parts.pop(idx, None)
        if parts is not None:
            key, pieces = parts
            start = block.get(key)
            block[key] = (start if isinstance(start, str) else "") + "".join(pieces)
        json_pieces = self._json.pop(idx, None)
        if json_pieces:
            raw = "".join(json_pieces)
            if raw:
                try:
                    block["input"] = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    block["input"] = raw

    def _build(self) -> Assembled:
        for idx in list(self._parts) + list(self._json):
            self._close_block(idx)
        msg = self._message
        if msg is None:
            return Assembled(None, complete=self._done)
        msg["content"] = [self._blocks[i] for i in sorted(self._blocks)]
        return _answer(msg, complete=self._done)


def _answer(msg: JSON, *, complete: bool) -> Assembled:
    """A Message (whole, or rebuilt from its stream) as a trace records it."""
    return Assembled(
        msg,
        _anthropic_usage(msg.get("usage")),
        as_str(msg.get("id")),
        as_str(msg.get("model")),
        as_str(msg.get("stop_reason")),
        complete=complete,
    )
