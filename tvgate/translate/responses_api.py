"""The OpenAI Responses side that the two translators for Responses clients share.

A Responses client (Codex) may be on an Anthropic route (:mod:`.responses_to_anthropic`)
or on a Chat Completions-only upstream (:mod:`.responses_to_chat`); what this module
owns is the same for both: which top-level request fields are carried, dropped or
refused (:func:`check_fields`), the request pieces read the same way for either target
(input items, function tools, ``tool_choice``, ``text.format``, ``reasoning.effort``),
the Response object and its output items, Responses usage, and :class:`ResponsesWriter`,
which turns "open an item, add text, close it, complete" into the Responses event
sequence the ``openai`` SDK's accumulator and Codex read.

Responses has no server state here: ``store`` and ``previous_response_id`` (and the
other fields that need a stored response) are refused unless absent or off, with a 400
naming the field. Built-in tools (web search, file search, code interpreter...) are
refused the same way: no upstream on these routes runs them.

Unlike the Chat translators, a Responses stream holds the answer: the protocol's
``*.done`` events and ``response.completed`` repeat every item in full.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from tvgate.translate.chat_to_anthropic import TranslationError, _dict, _list, _short
from tvgate.translate.chat_to_anthropic import check_fields as _check_fields

JSON = dict[str, Any]

# Responses fields with no counterpart upstream whose loss changes nothing the client
# relies on: dropped and noted.
_HARMLESS = frozenset(
    (
        "metadata",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "service_tier",
        "client_metadata",
        "stream_options",
    )
)
# Fields dropped only at the value that means "off"; any other value is refused. The
# first four need a response stored server-side, which these routes cannot keep.
_DEFAULT_ONLY: dict[str, tuple[object, ...]] = {
    "store": (None, False),
    "previous_response_id": (None,),
    "conversation": (None,),
    "background": (None, False),
    "prompt": (None,),
    "top_logprobs": (None, 0),
    "max_tool_calls": (None,),
    "truncation": (None, "disabled"),
}
_HANDLED = frozenset(
    (
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "reasoning",
        "stream",
        "include",
        "user",
    )
)
#: Tools Codex offers with every request that no upstream here runs, and that it works
#: without: web search (OpenAI runs it), its sub-agent tools (a ``namespace`` of
#: function tools called by a namespaced name) and its freeform ``custom`` apply_patch
#: (Codex's shell tool edits files as well). Offered, never required: dropped and noted.
_OPTIONAL_TOOLS = frozenset(("web_search", "web_search_preview", "namespace", "custom"))
#: ``include`` asks for reasoning the client sends back (Codex always does, store=false).
ENCRYPTED = "reasoning.encrypted_content"
#: Reasoning efforts a Responses client may ask for (``none`` and ``minimal``: no thinking).
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
#: Chat finish reasons as a Response's status and ``incomplete_details.reason``.
_STATUS: dict[str, tuple[str, str]] = {
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}
#: The request fields a Response object repeats, and their values when not given.
_ECHO: JSON = {
    "instructions": None,
    "max_output_tokens": None,
    "parallel_tool_calls": True,
    "temperature": 1.0,
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
}


@dataclass(slots=True)
class ResponsesRequest:
    """What a Responses request became upstream, and what the answer must repeat."""

    body: JSON
    stream: bool
    #: The request fields a Response object repeats.
    echo: JSON
    #: The client asked for reasoning items it can send back (``include``).
    encrypted: bool = False
    #: What could not be carried, one note each, for the trace.
    dropped: list[str] = field(default_factory=list)


# --- request ------------------------------------------------------------------------


def check_fields(body: JSON, dropped: list[str]) -> None:
    """Refuse (400) a top-level field neither target can express; note the dropped."""
    _check_fields(body, _HANDLED, _HARMLESS, _DEFAULT_ONLY, dropped)
    for i, name in enumerate(_list(body.get("include"), "include")):
        if name != ENCRYPTED:
            dropped.append(f"include[{i}]={_short(name)}")
    text = _dict(body.get("text"))
    for key, value in text.items():
        if key == "verbosity" and value not in (None, "medium"):
            raise TranslationError("text.verbosity", "text.verbosity is not supported")
        if key not in ("format", "verbosity"):
            raise TranslationError(f"text.{key}", f"text.{key} is not supported")


def request_echo(body: JSON) -> JSON:
    """The request fields a Response object repeats (OpenAI's defaults where absent)."""
    out = {key: body.get(key, default) for key, default in _ECHO.items()}
    reasoning = _dict(body.get("reasoning"))
    out["reasoning"] = {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
    out["text"] = {"format": _dict(body.get("text")).get("format") or {"type": "text"}}
    return out


def input_items(body: JSON) -> list[JSON]:
    """``input`` as a list of items (a string is one user message); each an object."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise TranslationError("input", "input must be a string or a non-empty array")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TranslationError(f"input[{i}]", f"input[{i}] must be an object")
    return items


def item_type(item: JSON) -> object:
    """An input item's type; ``message`` may be left out (EasyInputMessage)."""
    return item.get("type", "message" if "role" in item else None)


def content_parts(content: object, where: str) -> list[JSON]:
    """A message's ``content`` as a list of parts (a string is one input_text)."""
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content", f"{where}.content must be a string or array")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise TranslationError(
                f"{where}.content[{j}]", f"{where}.content[{j}] must be an object"
            )
    return content


def image_url(part: JSON, where: str) -> str:
    """The URL of an ``input_image`` part; a stored file (``file_id``) cannot be fetched."""
    url = part.get("image_url")
    if not isinstance(url, str):
        raise TranslationError(f"{where}.image_url", f"{where}: only image_url is supported")
    return url


def arguments_object(arguments: object, where: str) -> JSON:
    """A function call's ``arguments`` string as the JSON object it must be."""
    try:
        value = orjson.loads(arguments or "{}") if isinstance(arguments, str) else None
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise TranslationError(where, f"{where} must be a JSON object")
    return value


def function_tools(body: JSON, dropped: list[str]) -> list[JSON]:
    """The request's function tools. The tools Codex offers with every request beside
    its shell (:data:`_OPTIONAL_TOOLS`) are dropped and noted, so that it works on these
    routes; any other built-in tool is refused, and so is a ``tool_choice`` naming one."""
    out: list[JSON] = []
    for i, tool in enumerate(_list(body.get("tools"), "tools")):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in _OPTIONAL_TOOLS:
            name = tool.get("name")
            dropped.append(
                f"tools[{i}]: {kind} tool" + (f" {name}" if isinstance(name, str) else "")
            )
            continue
        if kind != "function":
            raise TranslationError(
                f"tools[{i}].type", f"tools[{i}]: {kind!r} tools cannot run on this route"
            )
        if not isinstance(tool.get("name"), str):
            raise TranslationError(f"tools[{i}].name", f"tools[{i}].name is required")
        out.append(tool)
    return out


def chat_tool(tool: JSON) -> JSON:
    """A function tool in Chat's shape (which :mod:`.chat_to_anthropic` also reads)."""
    function: JSON = {
        "name": tool["name"],
        "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def chat_tool_choice(body: JSON) -> object:
    """``tool_choice`` in Chat's spelling (which :mod:`.chat_to_anthropic` also reads)."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("name"), str)
    ):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise TranslationError("tool_choice", f"tool_choice {_short(choice)} is not supported")


def json_schema(body: JSON) -> JSON | None:
    """``text.format`` as Chat's ``json_schema`` (name, schema, strict if given), else None."""
    fmt = _dict(body.get("text")).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind != "json_schema" or not isinstance(fmt, dict):
        # Anthropic constrains output to a schema only; "any JSON object" has none.
        raise TranslationError("text.format.type", f"text.format.type {kind!r} is not supported")
    if not isinstance(fmt.get("schema"), dict):
        raise TranslationError("text.format.schema", "text.format.schema is required")
    out: JSON = {"name": fmt.get("name") or "output", "schema": fmt["schema"]}
    if isinstance(fmt.get("strict"), bool):
        out["strict"] = fmt["strict"]
    return out


def reasoning_effort(body: JSON) -> str | None:
    """``reasoning.effort``, checked; None when not given."""
    reasoning = body.get("reasoning")
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise TranslationError("reasoning", "reasoning must be an object")
    for key in reasoning:
        if key not in ("effort", "summary", "generate_summary"):
            raise TranslationError(f"reasoning.{key}", f"reasoning.{key} is not supported")
    effort = reasoning.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise TranslationError("reasoning.effort", f"reasoning.effort {_short(effort)} is unknown")
    return effort


def max_output_tokens(body: JSON) -> int | None:
    value = body.get("max_output_tokens")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise TranslationError("max_output_tokens", "max_output_tokens must be a positive integer")
    return value


def _count(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


# --- response -----------------------------------------------------------------------


def responses_usage(usage: object) -> JSON:
    """Chat-shaped usage (an upstream's, or Anthropic's through ``chat_usage``) in the
    Responses shape: input includes the cached tokens on both; a cache write is kept
    beside ``cached_tokens`` where the upstream reported one."""
    u = _dict(usage)
    prompt = _dict(u.get("prompt_tokens_details"))
    details: JSON = {"cached_tokens": _count(prompt.get("cached_tokens"))}
    if _count(prompt.get("cache_write_tokens")):
        details["cache_write_tokens"] = prompt["cache_write_tokens"]
    reasoning = _count(_dict(u.get("completion_tokens_details")).get("reasoning_tokens"))
    inputs, outputs = _count(u.get("prompt_tokens")), _count(u.get("completion_tokens"))
    return {
        "input_tokens": inputs,
        "input_tokens_details": details,
        "output_tokens": outputs,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": inputs + outputs,
    }


def status_of(finish_reason: object) -> tuple[str, JSON | None]:
    """A Chat finish reason as a Response's ``status`` and ``incomplete_details``
    (anything but a known reason, from a member's own server say, is "completed")."""
    reason = _STATUS.get(finish_reason) if isinstance(finish_reason, str) else None
    if reason is None:
        return "completed", None
    status, detail = reason
    return status, {"reason": detail}


def message_item(item_id: str, text: str, status: str = "completed") -> JSON:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def call_item(
    item_id: str, call_id: object, name: object, arguments: str, status: str = "completed"
) -> JSON:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def reasoning_item(item_id: str, text: str, encrypted: str | None) -> JSON:
    item: JSON = {
        "id": item_id,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": text}] if text else [],
    }
    if encrypted is not None:
        item["encrypted_content"] = encrypted
    return item


def response_object(
    echo: JSON,
    response_id: str,
    model: object,
    status: str,
    output: list[JSON],
    usage: JSON | None,
    *,
    created_at: int | None = None,
    incomplete: JSON | None = None,
    error: JSON | None = None,
) -> JSON:
    """A Response object: the answer's fields, the request's repeated (``echo``)."""
    created = created_at if created_at is not None else int(time.time())
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": error,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "previous_response_id": None,
        "store": False,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
        **echo,
    }


# --- stream -------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    """An output item being streamed: its text so far (message, reasoning or arguments)."""

    kind: str
    id: str
    index: int
    call_id: object = None
    name: object = None
    parts: list[str] = field(default_factory=list)
    #: The delta event's bytes up to the delta's JSON string, built at open.
    prefix: bytes = b""

    @property
    def text(self) -> str:
        return "".join(self.parts)


_DELTAS = {
    "message": (b"response.output_text.delta", b',"content_index":0,"delta":', b',"logprobs":[]'),
    "reasoning": (b"response.reasoning_summary_text.delta", b',"summary_index":0,"delta":', b""),
    "function_call": (b"response.function_call_arguments.delta", b',"delta":', b""),
}
_ITEM_PREFIX = {"message": "msg", "reasoning": "rs", "function_call": "fc"}


class ResponsesWriter:
    """The Responses event sequence, from "open an item, add to it, close it, end".

    Items are keyed by the upstream's own handle (an Anthropic block index, a Chat tool
    call index); several may be open at once, and :meth:`complete` closes the rest in
    output order. Every event carries its ``sequence_number``; ``response.completed``
    (or ``response.incomplete``, or ``response.failed``) repeats the finished items."""

    __slots__ = ("_created", "_echo", "_id", "_model", "_open", "_output", "_seq", "done")

    def __init__(self, echo: JSON) -> None:
        self._echo = echo
        self._id = ""
        self._model: object = None
        self._created = 0
        self._seq = 0
        self._open: dict[object, _Item] = {}
        # Output index -> the finished item.
        self._output: dict[int, JSON] = {}
        #: The client's stream has ended (completed, incomplete or failed).
        self.done = False

    @property
    def started(self) -> bool:
        return bool(self._id)

    def _event(self, kind: str, payload: JSON) -> bytes:
        data = orjson.dumps({"type": kind, **payload, "sequence_number": self._seq})
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _response(self, status: str, usage: JSON | None = None, **extra: Any) -> JSON:
        output = [self._output[i] for i in sorted(self._output)]
        return response_object(
            self._echo, self._id, self._model, status, output, usage,
            created_at=self._created, **extra,
        )  # fmt: skip

    def start(self, upstream_id: object, model: object) -> bytes:
        """``response.created`` and ``response.in_progress`` (once)."""
        if self._id:
            return b""
        self._id = (
            f"resp_{upstream_id}" if isinstance(upstream_id, str) and upstream_id else "resp_0"
        )
        self._model = model
        self._created = int(time.time())
        snapshot = {"response": self._response("in_progress")}
        return self._event("response.created", snapshot) + self._event(
            "response.in_progress", snapshot
        )

    def open(self, key: object, kind: str, call_id: object = None, name: object = None) -> bytes:
        """Start an output item of ``kind`` (message, reasoning, function_call) as ``key``."""
        # A handle opened again (an upstream repeating a block start) ends its item first:
        # output indices stay unique, and no item is left unfinished.
        out = self.start(None, None) + self.close(key)
        index = len(self._output) + len(self._open)
        item = _Item(kind, f"{_ITEM_PREFIX[kind]}_{self._id[5:]}_{index}", index, call_id, name)
        self._open[key] = item
        where = {"item_id": item.id, "output_index": index}
        if kind == "message":
            added = message_item(item.id, "", "in_progress")
            added["content"] = []
        elif kind == "reasoning":
            added = reasoning_item(item.id, "", None)
        else:
            added = call_item(item.id, call_id, name, "", "in_progress")
        out += self._event("response.output_item.added", {"output_index": index, "item": added})
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event(
                "response.content_part.added", {**where, "content_index": 0, "part": part}
            )
        elif kind == "reasoning":
            part = {"type": "summary_text", "text": ""}
            out += self._event(
                "response.reasoning_summary_part.added", {**where, "summary_index": 0, "part": part}
            )
        name_, middle, _ = _DELTAS[kind]
        item.prefix = (
            b"event: " + name_ + b'\ndata: {"type":"' + name_ + b'","item_id":"'
            + item.id.encode() + b'","output_index":' + str(index).encode() + middle
        )  # fmt: skip
        return out

    def is_open(self, key: object) -> bool:
        return key in self._open

    def text_of(self, key: object) -> str:
        return self._open[key].text

    def delta(self, key: object, text: str) -> bytes:
        """A delta to the open item ``key`` (nothing if ``key`` is not open or ``text`` empty)."""
        item = self._open.get(key)
        if item is None or not text or not isinstance(text, str):
            return b""
        item.parts.append(text)
        seq = self._seq
        self._seq += 1
        return (
            item.prefix + orjson.dumps(text) + _DELTAS[item.kind][2]
            + b',"sequence_number":' + str(seq).encode() + b"}\n\n"
        )  # fmt: skip

    def close(self, key: object, encrypted: str | None = None) -> bytes:
        """The ``*.done`` events of item ``key`` (a reasoning item with ``encrypted``)."""
        item = self._open.pop(key, None)
        if item is None:
            return b""
        where = {"item_id": item.id, "output_index": item.index}
        text = item.text
        if item.kind == "message":
            done = message_item(item.id, text)
            part = done["content"][0]
            out = self._event(
                "response.output_text.done",
                {**where, "content_index": 0, "text": text, "logprobs": []},
            )
            out += self._event(
                "response.content_part.done", {**where, "content_index": 0, "part": part}
            )
        elif item.kind == "reasoning":
            done = reasoning_item(item.id, text, encrypted)
            out = b""
            if text:
                out = self._event(
                    "response.reasoning_summary_text.done",
                    {**where, "summary_index": 0, "text": text},
                )
            part = {"type": "summary_text", "text": text}
            out += self._event(
                "response.reasoning_summary_part.done", {**where, "summary_index": 0, "part": part}
            )
        else:
            done = call_item(item.id, item.call_id, item.name, text)
            out = self._event(
                "response.function_call_arguments.done",
                {**where, "name": item.name, "arguments": text},
            )
        self._output[item.index] = done
        return out + self._event(
            "response.output_item.done", {"output_index": item.index, "item": done}
        )

    def complete(self, finish_reason: object, usage: JSON) -> bytes:
        """Close what is open and end with ``response.completed`` (or ``.incomplete``)."""
        if self.done:
            return b""
        out = self.start(None, None)
        for key in sorted(self._open, key=lambda k: self._open[k].index):
            out += self.close(key)
        status, incomplete = status_of(finish_reason)
        self.done = True
        response = self._response(status, usage, incomplete=incomplete)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, {"response": response})

    def fail(self, code: str, message: str) -> bytes:
        """End the stream with ``response.failed``: the error's code and message, the
        items finished so far (Codex reads the error off this event and retries)."""
        if self.done:
            return b""
        out = self.start(None, None)
        self.done = True
        response = self._response("failed", error={"code": code, "message": message})
        return out + self._event("response.failed", {"response": response})
