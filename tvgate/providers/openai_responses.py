"""What tvgate knows of OpenAI's Responses API (what Codex speaks).

OpenAI's envelope, key header and ``/v1/models`` format (:class:`OpenAIAPI`), with
the Responses API's own ``error`` stream event, its usage (``input_tokens`` with
``input_tokens_details``) and the assembler that rebuilds a Response from its events
(``response.output_item.*``, the text, summary and argument deltas, the terminal
``response.completed``), as the ``openai`` SDK's accumulator does.
"""

from __future__ import annotations

from typing import Any

import orjson

from tvgate.providers.base import JSON, OPENAI_RESPONSES
from tvgate.providers.common import (
    Assembled,
    SSEStream,
    StreamAssembler,
    Usage,
    as_str,
    error_fields,
    event_index,
    sub_object,
)
from tvgate.providers.openai_chat import OpenAIAPI, openai_usage


class OpenAIResponses(OpenAIAPI):
    """``/v1/responses``."""

    api = OPENAI_RESPONSES
    client_path = "responses"
    upstream_path = "/responses"

    def stream_error_event(self, message: str, kind: str = "api_error") -> bytes:
        # The Responses API's own error event, plus the nested "error" object that
        # makes the openai SDKs raise instead of yielding it as an ordinary event.
        payload = {
            "type": "error",
            "code": kind,
            "message": message,
            "param": None,
            "error": {"type": kind, "code": kind, "message": message},
        }
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"

    def stream_assembler(self, max_retained: int) -> StreamAssembler | None:
        return _ResponsesStream(max_retained)

    def assemble(self, obj: JSON) -> Assembled:
        etype, emsg = error_fields(obj.get("error"))
        return Assembled(
            obj,
            _responses_usage(obj.get("usage")),
            as_str(obj.get("id")),
            as_str(obj.get("model")),
            _responses_stop(obj),
            etype,
            emsg,
            complete=True,
        )

    def read_usage(self, usage: object) -> Usage:
        return _responses_usage(usage)


RESPONSES = OpenAIResponses()


def _responses_usage(u: object) -> Usage:
    return openai_usage(u, "input", "output")


def _responses_stop(resp: JSON) -> str | None:
    status = as_str(resp.get("status"))
    if status == "incomplete":
        return as_str(sub_object(resp, "incomplete_details").get("reason")) or status
    if status in ("completed", "failed", "cancelled"):
        return status
    return None


_RESPONSE_LIFECYCLE = frozenset(("response.created", "response.in_progress", "response.queued"))
_RESPONSE_TERMINAL = frozenset(("response.completed", "response.failed", "response.incomplete"))

# Delta events: the item list the part lives in, the part's index field, its text field.
_RESPONSE_DELTAS: dict[str, tuple[str, str, str]] = {
    "response.output_text.delta": ("content", "content_index", "text"),
    "response.refusal.delta": ("content", "content_index", "refusal"),
    "response.reasoning_text.delta": ("content", "content_index", "text"),
    "response.reasoning_summary_text.delta": ("summary", "summary_index", "text"),
}
_RESPONSE_DONES: dict[str, tuple[str, str, str]] = {
    "response.output_text.done": ("content", "content_index", "text"),
    "response.refusal.done": ("content", "content_index", "refusal"),
    "response.reasoning_text.done": ("content", "content_index", "text"),
    "response.reasoning_summary_text.done": ("summary", "summary_index", "text"),
}
_RESPONSE_PART_ADDED = {
    "response.content_part.added": ("content", "content_index"),
    "response.reasoning_summary_part.added": ("summary", "summary_index"),
}


class _ResponsesStream(SSEStream):
    __slots__ = (
        "_args",
        "_base",
        "_base_size",
        "_done_items",
        "_final",
        "_items",
        "_max",
        "_parts",
        "_terminal",
    )

    def __init__(self, max_retained: int) -> None:
        super().__init__(max_retained)
        self._max = max_retained
        self._base: JSON | None = None
        self._base_size = 0
        self._final: JSON | None = None
        self._terminal: str | None = None
        self._items: dict[int, JSON] = {}
        self._done_items: dict[int, JSON] = {}
        # (output_index, list name, part index, text field) -> pieces.
        self._parts: dict[tuple[int, str, int, str], list[str]] = {}
        self._args: dict[int, list[str]] = {}

    def _on_event(self, name: str | None, obj: JSON, size: int) -> None:
        kind = obj.get("type") or name
        spec = _RESPONSE_DELTAS.get(kind) if isinstance(kind, str) else None
        if spec is not None:
            oi = obj["output_index"]
            if oi in self._items and oi not in self._done_items:
                key = (oi, spec[0], event_index(obj[spec[1]]), spec[2])
                self._parts.setdefault(key, []).append(self._take(obj["delta"]))
        elif kind == "response.function_call_arguments.delta" or (
            kind == "response.custom_tool_call_input.delta"
        ):
            oi = obj["output_index"]
            if oi in self._items and oi not in self._done_items:
                self._args.setdefault(oi, []).append(self._take(obj["delta"]))
        elif kind == "response.output_item.added":
            oi = obj["output_index"]
            item = obj["item"]
            if isinstance(oi, int) and isinstance(item, dict) and self._charge(size):
                self._items[oi] = item
        elif kind == "response.output_item.done":
            oi = obj["output_index"]
            item = obj["item"]
            if isinstance(oi, int) and isinstance(item, dict):
                # The finished item replaces the one built from deltas, if it fits
                # in the budget that replacing frees.
                freed = sum(map(len, self._args.get(oi, ())))
                freed += sum(sum(map(len, v)) for k, v in self._parts.items() if k[0] == oi)
                if size > self._budget + freed:
                    self._truncated = True
                    return
                self._drop_item(oi)
                self._charge(size)
                self._done_items[oi] = item
        elif kind in _RESPONSE_DONES:
            spec = _RESPONSE_DONES[kind]
            oi = obj["output_index"]
            key = (oi, spec[0], event_index(obj[spec[1]]), spec[2])
            old = self._parts.get(key)
            if old is not None:
                self._refund(old)
            if oi in self._items and oi not in self._done_items:
                self._parts[key] = [self._take(obj[spec[2]])]
        elif kind in _RESPONSE_PART_ADDED:
            where, index_field = _RESPONSE_PART_ADDED[kind]
            item = self._items.get(obj["output_index"])
            part = obj["part"]
            if item is not None and isinstance(part, dict) and self._charge(size):
                parts = item.get(where)
                if not isinstance(parts, list):
                    parts = item[where] = []
                _put(parts, obj[index_field], part)
        elif kind == "response.output_text.annotation.added":
            item = self._items.get(obj["output_index"])
            if item is not None and self._charge(size):
                part = item["content"][obj["content_index"]]
                annotations = part.get("annotations")
                if not isinstance(annotations, list):
                    annotations = part["annotations"] = []
                _put(annotations, obj.get("annotation_index", len(annotations)), obj["annotation"])
        elif kind in _RESPONSE_TERMINAL:
            resp = obj["response"]
            if not isinstance(resp, dict):
                return
            self._terminal = kind
            if kind == "response.failed":
                self._error = error_fields(resp.get("error"))
            if isinstance(resp.get("output"), list) and size <= self._max:
                # The final response carries the whole answer: the rest is spent.
                self._items.clear()
                self._done_items.clear()
                self._parts.clear()
                self._args.clear()
                self._base = None
                self._budget = self._max - size
                self._truncated = False
            else:
                # No output given, or too much to keep: the streamed items stand in.
                resp.pop("output", None)
            self._final = resp
        elif kind in _RESPONSE_LIFECYCLE:
            resp = obj["response"]
            if isinstance(resp, dict):
                self._budget += self._base_size
                self._base, self._base_size = None, 0
                if self._charge(size):
                    self._base, self._base_size = resp, size
        elif kind == "error":
            err = obj.get("error")
            if isinstance(err, dict):
                self._error = error_fields(err)
            else:
                self._error = (as_str(obj.get("code")) or "error", as_str(obj.get("message")))

    def _drop_item(self, oi: int) -> None:
        self._items.pop(oi, None)
        args = self._args.pop(oi, None)
        if args is not None:
            self._refund(args)
        for key in [k for k in self._parts if k[0] == oi]:
            self._refund(self._parts.pop(key))

    def _built_item(self, oi: int) -> JSON:
        item = self._items[oi]
        for (index, where, part_index, text_field), pieces in self._parts.items():
            if index == oi:
                parts = item.get(where)
                if isinstance(parts, list) and 0 <= part_index < len(parts):
                    part = parts[part_index]
                    if isinstance(part, dict):
                        part[text_field] = "".join(pieces)
        args = self._args.get(oi)
        if args is not None:
            item["input" if item.get("type") == "custom_tool_call" else "arguments"] = "".join(args)
        return item

    def _output(self) -> list[JSON]:
        indices = sorted(self._items.keys() | self._done_items.keys())
        return [
            self._done_items[i] if i in self._done_items else self._built_item(i) for i in indices
        ]

    def _build(self) -> Assembled:
        resp = self._final
        if resp is not None:
            if not isinstance(resp.get("output"), list):
                resp["output"] = self._output()
        elif self._base is not None or self._items or self._done_items:
            resp = dict(self._base or {})
            resp["output"] = self._output()
        else:
            return Assembled(None)
        return Assembled(
            resp,
            _responses_usage(resp.get("usage")),
            as_str(resp.get("id")),
            as_str(resp.get("model")),
            _responses_stop(resp) if self._terminal else None,
            complete=self._terminal is not None,
        )


def _put(items: list[Any], index: object, value: object) -> None:
    """Set ``items[index]``, appending when it is the next one (or not an index at all)."""
    if isinstance(index, int) and 0 <= index < len(items):
        items[index] = value
    else:
        items.append(value)
