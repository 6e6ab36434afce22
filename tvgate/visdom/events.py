"""Stored calls as Visdom Trace ``StreamEventRequest`` documents, protocol version 2.

This module owns what Visdom Trace receives of a call, given the state of the call's
session (:class:`SessionState`, kept in the database by the pusher): pure functions,
the same input giving the same events, so that events made once and resent dedupe.

Per call, in order:

* ``session_start`` on the first call of a session (or the first after it was sealed);
* ``tool_use`` ``PostToolUse`` for each tool result the call's request brings back for
  a tool use of an earlier answer (``tool_response``, ``tool_is_error``);
* ``transcript`` events carrying Claude-Code-shaped JSONL records: the user turn(s) the
  call added, then the assistant's answer with the provider's message id as
  ``message.id`` (Visdom Trace's dedup key against its own proxy and hooks). Line *i*
  of an event is chunk ``transcript_offset + i``; the session's offset only grows, so
  chunks are gap-free;
* ``tool_use`` ``PreToolUse`` for each tool call of the answer.

``session_end`` with ``final_stats`` comes from :func:`session_end` once a session has
been idle. Every event's ``event_uuid`` is a UUIDv7 made from the trace id and the
event's index in that trace (:func:`event_uuid`). An event never serialises to more
than :data:`MAX_EVENT_BYTES`: transcript lines are spread over several events, and a
line or tool field too large alone is shrunk, its largest strings first, as the hooks
shrink theirs.

Without captured bodies a call's lines carry no text: the assistant line has the
message id, model and usage, with empty content, and no user line is sent.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from tvgate.providers.base import ANTHROPIC_MESSAGES
from tvgate.visdom.lines import Answer, Block, answer_of, user_turns

__all__ = [
    "MAX_EVENT_BYTES",
    "PROTOCOL_VERSION",
    "CallRecord",
    "SessionState",
    "call_events",
    "event_uuid",
    "session_end",
    "shrink",
    "visdom_tool",
]

PROTOCOL_VERSION = 2
#: Visdom Trace's hooks cap a payload at 512 KB; this leaves room for the HTTP framing.
MAX_EVENT_BYTES = 512 * 1024 - 4096
#: Tool uses of a session awaiting their result; the oldest are forgotten past this.
MAX_OPEN_TOOLS = 256
#: The tools Visdom Trace knows. Others are sent under the family of the API they
#: spoke, with tvgate's own name in ``params`` (tvgate_tool).
VISDOM_TOOLS = frozenset({"claude-code", "codex", "gsd", "opencode"})
_TOOL_ALIASES = {"gsd2": "gsd"}

Event = dict[str, Any]


@dataclass(slots=True)
class CallRecord:
    """One stored call: its trace row's fields and its stored (redacted) bodies."""

    trace_id: str
    session_id: str
    tool: str
    endpoint: str
    provider: str
    model: str
    received_at: float
    finished_at: float | None
    message_id: str
    request_id: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    branch: str = ""
    cwd: str = ""
    #: The stored request and answer documents; None when bodies are not captured.
    request: Any = None
    response: Any = None
    captured: bool = True


@dataclass(slots=True)
class SessionState:
    """What the pusher remembers of a session between calls (stored as JSON)."""

    started: bool = False
    #: The next transcript chunk index.
    offset: int = 0
    #: tool_use_id -> tool name, of tool uses whose result has not come back yet.
    open_tools: dict[str, str] = field(default_factory=dict)
    first_at: float = 0.0
    last_at: float = 0.0
    tool: str = ""
    model: str = ""
    cwd: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    user_messages: int = 0
    assistant_messages: int = 0
    total_tool_calls: int = 0

    def dumps(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def loads(cls, text: str) -> SessionState:
        if not text:
            return cls()
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in orjson.loads(text).items() if k in known})


def rfc3339(moment: float) -> str:
    return (
        datetime.fromtimestamp(moment, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def event_uuid(trace_id: str, index: int, moment: float) -> str:
    """A UUIDv7 for event ``index`` of a trace: the call's time in milliseconds, then
    bits of SHA-256 of (trace id, index), so a resend carries the same uuid."""
    digest = hashlib.sha256(f"{trace_id}:{index}".encode()).digest()
    millis = int(moment * 1000) & ((1 << 48) - 1)
    rand_a = int.from_bytes(digest[:2], "big") & 0x0FFF
    rand_b = int.from_bytes(digest[2:10], "big") & ((1 << 62) - 1)
    value = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


def visdom_tool(tool: str, endpoint: str) -> tuple[str, str]:
    """(Visdom Trace's tool name, tvgate's own name when it is not one Visdom knows)."""
    name = _TOOL_ALIASES.get(tool, tool)
    if name in VISDOM_TOOLS:
        return name, ""
    return ("claude-code" if endpoint == ANTHROPIC_MESSAGES else "codex"), tool


# --- shrinking -----------------------------------------------------------------------

_CUT_MARK = "…[cut by tvgate: {} bytes]"


def _size(value: Any) -> int:
    return len(orjson.dumps(value))


def _largest_string(value: Any) -> tuple[int, tuple[Any, ...]]:
    """The length and path of the longest string inside ``value`` (walked without
    recursion: a hostile body may nest deeply)."""
    best: tuple[int, tuple[Any, ...]] = (-1, ())
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if len(item) > best[0]:
                best = (len(item), path)
        elif isinstance(item, dict):
            stack.extend((child, (*path, key)) for key, child in item.items())
        elif isinstance(item, list):
            stack.extend((child, (*path, index)) for index, child in enumerate(item))
    return best


def shrink(value: Any, limit: int) -> Any:
    """``value`` with its largest strings cut until it serialises to ``limit`` bytes or
    less (a copy; at most 64 cuts, then the value is replaced by a note)."""
    if _size(value) <= limit:
        return value
    # In a list, so that a string on its own is cut like one inside an object.
    box = [orjson.loads(orjson.dumps(value))]
    limit += 2
    for _ in range(64):
        excess = _size(box) - limit
        if excess <= 0:
            return box[0]
        length, path = _largest_string(box)
        if length <= 64:
            break
        parent: Any = box
        for key in path[:-1]:
            parent = parent[key]
        text: str = parent[path[-1]]
        # Characters may be several bytes and escapes longer: cut 64 more than needed.
        keep = max(0, length - excess - 64)
        parent[path[-1]] = text[:keep] + _CUT_MARK.format(len(text.encode()))
    if _size(box) <= limit:
        return box[0]
    return {"tvgate_cut": f"{_size(box[0])} bytes, too large to send"}


# --- building events -----------------------------------------------------------------


class _Builder:
    """The events of one call, numbered for their uuids."""

    def __init__(self, call: CallRecord, state: SessionState) -> None:
        self.call = call
        self.state = state
        self.events: list[Event] = []
        tool, own = visdom_tool(call.tool or state.tool, call.endpoint)
        self.base: Event = {
            "protocol_version": PROTOCOL_VERSION,
            "tool": tool,
            "session_id": call.session_id,
            "timestamp": rfc3339(call.received_at),
            "event_index": None,
        }
        if call.model:
            self.base["model"] = call.model
        cwd = call.cwd or state.cwd
        if cwd:
            self.base["cwd"] = cwd
        if own:
            self.base["params"] = {"tvgate_tool": own}

    def add(self, event_type: str, hook: str, **fields: Any) -> Event:
        event = {
            **self.base,
            "event_type": event_type,
            "hook_event_name": hook,
            "event_uuid": event_uuid(self.call.trace_id, len(self.events), self.call.received_at),
            **fields,
        }
        self.events.append(event)
        return event

    def tool_event(self, hook: str, tool_name: str, tool_use_id: str, **fields: Any) -> None:
        event = self.add("tool_use", hook, tool_name=tool_name, tool_use_id=tool_use_id, **fields)
        for name in ("tool_input", "tool_response"):
            if name in event and _size(event) > MAX_EVENT_BYTES:
                event[name] = shrink(event[name], MAX_EVENT_BYTES - _size({**event, name: ""}))

    def transcript(self, lines: list[Event]) -> None:
        """Transcript events holding ``lines``, as many to an event as fit."""
        envelope = _size(
            {
                **self.base,
                "event_type": "transcript",
                "hook_event_name": "Stop",
                "event_uuid": event_uuid("", 0, 0),
                "transcript_offset": 1 << 40,
                "transcript_lines": [],
            }
        )
        room = MAX_EVENT_BYTES - envelope
        batch: list[Event] = []
        used = 0
        for line in lines:
            line = shrink(line, room - 1)
            size = _size(line) + 1
            if batch and used + size > room:
                self._emit_lines(batch)
                batch, used = [], 0
            batch.append(line)
            used += size
        if batch:
            self._emit_lines(batch)

    def _emit_lines(self, batch: list[Event]) -> None:
        self.add(
            "transcript",
            "Stop",
            transcript_offset=self.state.offset,
            transcript_lines=batch,
        )
        self.state.offset += len(batch)


def _line(call: CallRecord, kind: str, index: int, message: Event) -> Event:
    line: Event = {
        "type": kind,
        "uuid": str(
            uuid.UUID(bytes=hashlib.sha256(f"{call.trace_id}/{index}".encode()).digest()[:16])
        ),
        "timestamp": rfc3339(
            call.received_at if kind == "user" else (call.finished_at or call.received_at)
        ),
        "sessionId": call.session_id,
        "message": message,
    }
    if call.branch:
        line["gitBranch"] = call.branch
    if call.cwd:
        line["cwd"] = call.cwd
    return line


def _usage(call: CallRecord) -> dict[str, int]:
    """Claude's usage fields from the trace's figures: ``input_tokens`` without cache
    reads (OpenAI counts them inside its prompt tokens)."""
    uncached = call.input_tokens
    if call.provider != "anthropic":
        uncached = max(0, call.input_tokens - call.cache_read_tokens)
    return {
        "input_tokens": uncached,
        "output_tokens": call.output_tokens,
        "cache_read_input_tokens": call.cache_read_tokens,
        "cache_creation_input_tokens": call.cache_write_tokens,
    }


def call_events(call: CallRecord, state: SessionState) -> list[Event]:
    """The events of one call; ``state`` is updated to after it."""
    builder = _Builder(call, state)
    if not state.started:
        builder.add("session_start", "SessionStart")
        state.started = True
        state.first_at = call.received_at
        state.open_tools.clear()
    turns = user_turns(call.endpoint, call.request) if call.captured else []
    answer: Answer | None = answer_of(call.response) if call.captured else None
    for turn in turns:
        for block in turn:
            if block.get("type") != "tool_result":
                continue
            name = state.open_tools.pop(block.get("tool_use_id") or "", None)
            if name is not None:
                builder.tool_event(
                    "PostToolUse",
                    name,
                    block["tool_use_id"],
                    tool_response=block.get("content"),
                    tool_is_error=bool(block.get("is_error")),
                )
    lines = [
        _line(call, "user", index, {"role": "user", "content": turn})
        for index, turn in enumerate(turns)
    ]
    if call.message_id or answer is not None:
        content: list[Block] = answer.content if answer is not None else []
        message: Event = {
            "id": call.message_id,
            "type": "message",
            "model": call.model,
            "role": "assistant",
            "content": content,
            "usage": _usage(call),
        }
        if answer is not None and answer.stop_reason:
            message["stop_reason"] = answer.stop_reason
        line = _line(call, "assistant", len(turns), message)
        if call.request_id:
            line["requestId"] = call.request_id
        lines.append(line)
    builder.transcript(lines)
    for block in answer.content if answer is not None else ():
        if block.get("type") == "tool_use":
            builder.tool_event("PreToolUse", block["name"], block["id"], tool_input=block["input"])
            state.open_tools[block["id"]] = block["name"]
            state.total_tool_calls += 1
    while len(state.open_tools) > MAX_OPEN_TOOLS:
        del state.open_tools[next(iter(state.open_tools))]
    _count(
        call,
        state,
        user=sum(1 for turn in turns if _is_prompt(turn)),
        answered=len(lines) > len(turns),
    )
    return builder.events


def _is_prompt(turn: list[Block]) -> bool:
    """A turn the person typed, not one carrying tool results back."""
    return any(block.get("type") != "tool_result" for block in turn)


def _count(call: CallRecord, state: SessionState, *, user: int, answered: bool) -> None:
    state.last_at = max(state.last_at, call.finished_at or call.received_at)
    state.tool = call.tool or state.tool
    state.model = call.model or state.model
    state.cwd = call.cwd or state.cwd
    state.input_tokens += _usage(call)["input_tokens"]
    state.output_tokens += call.output_tokens
    state.cache_read_tokens += call.cache_read_tokens
    state.cache_write_tokens += call.cache_write_tokens
    state.user_messages += user
    state.assistant_messages += int(answered)


def session_end(
    session_id: str, state: SessionState, key: str, endpoint: str = ANTHROPIC_MESSAGES
) -> Event:
    """The ``session_end`` of an idle session, with its totals; ``key`` makes its uuid
    (unique per sealing of the session). ``state`` is reset for a later call."""
    tool, own = visdom_tool(state.tool, endpoint)
    event: Event = {
        "protocol_version": PROTOCOL_VERSION,
        "tool": tool,
        "event_type": "session_end",
        "hook_event_name": "SessionEnd",
        "session_id": session_id,
        "timestamp": rfc3339(state.last_at),
        "event_uuid": event_uuid(key, 0, state.last_at),
        "event_index": None,
        "final_stats": {
            "duration_ms": max(0, round((state.last_at - state.first_at) * 1000)),
            "total_tokens": state.input_tokens
            + state.output_tokens
            + state.cache_read_tokens
            + state.cache_write_tokens,
            "input_tokens": state.input_tokens,
            "output_tokens": state.output_tokens,
            "cache_read_tokens": state.cache_read_tokens,
            "cache_write_tokens": state.cache_write_tokens,
            "user_messages": state.user_messages,
            "assistant_messages": state.assistant_messages,
            "total_tool_calls": state.total_tool_calls,
        },
    }
    if state.model:
        event["model"] = state.model
    if state.cwd:
        event["cwd"] = state.cwd
    if own:
        event["params"] = {"tvgate_tool": own}
    offset = state.offset
    state.__init__()  # type: ignore[misc]  # sealed: a later call starts the session anew
    # The transcript chunks keep counting up: Visdom keys chunks by (session, chunk).
    state.offset = offset
    return event
