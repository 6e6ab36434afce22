"""A fake upstream LLM provider that speaks the Anthropic and OpenAI HTTP wire formats.

`FakeProvider` runs a Tornado HTTP server on 127.0.0.1 in a daemon thread with its own
IOLoop. It answers the endpoints a gateway forwards to (Anthropic Messages, count_tokens
and models; OpenAI chat completions, Responses, embeddings, legacy completions and
models) with the headers, JSON bodies and SSE framing the real APIs send, so the
official ``anthropic`` and ``openai`` SDKs parse its answers like real ones.

Everything in an answer is a function of the request, so the same request body gives
the same SDK result whether it is sent directly or through a gateway:

* IDs (``msg_01…``, ``toolu_01…``, ``chatcmpl-…``, ``call_…``, ``resp_…``, ``fc_…``,
  ``cmpl-…``) come from a SHA-256 of the request path and the canonical JSON of the body
  without ``stream``/``stream_options`` (so a streamed and a non-streamed call agree).
* Timestamps are fixed (``created`` = 1700000000).
* Text is ``"You said: <last user text>"`` (whitespace-normalised, truncated to 60
  characters), one delta per word.
* Usage: input tokens = words in the prompt fields of the body; output tokens = number of
  content deltas (+ ``OPENAI_REASONING_TOKENS`` for OpenAI); Anthropic cache tokens and
  OpenAI cached/reasoning tokens are non-zero constants (see the module constants).

Only the per-request ``request-id`` (Anthropic) / ``x-request-id`` (OpenAI) and our own
``x-fake-request-id`` headers differ between calls.

Behaviour is chosen with the request header ``x-fake-scenario`` (default ``normal``):

``normal``       a text answer.
``tool_use``     a text block, then a tool call ``{"path": "README.md", "limit": 10}``
                 (Anthropic tool_use, chat ``tool_calls``, Responses ``function_call``).
``agent``        a coding agent's turn: when the request offers a shell tool (Claude Code's
                 ``Bash``; Codex's ``exec_command``, ``shell`` or ``shell_command``) and its last
                 turn carries no tool result, a tool call running ``x-fake-command`` (default
                 ``AGENT_COMMAND``); when the last turn is a tool result, the text
                 ``"Tool said: <the result>"``; otherwise as ``normal``.
``thinking``     Anthropic: a thinking block (thinking_delta + signature_delta) before the
                 text. chat/completions: the reasoning first, as vLLM and DeepSeek send it
                 (``reasoning_content``, streamed a word a chunk). Others answer as ``normal``.
``error_529``    Anthropic 529 overloaded_error / OpenAI 503 server_error, ``retry-after: 1``.
``error_429``    429 rate-limit error in the API's envelope, ``retry-after: 2``.
``error_500``    500 api_error / server_error.
``error_event``  streams: HTTP 200, a few events, then an in-band error and a clean end
                 (Anthropic ``event: error``; chat/completions ``data: {"error": …}``;
                 Responses ``event: error`` whose shape is picked by ``x-fake-error-style``:
                 ``nested`` (default, as sent on the wire), ``flat`` (the documented
                 ``ResponseErrorEvent``) or ``failed`` (``response.failed``)).
                 Non-streaming requests get the ``error_529`` answer.
``reset``        a few events (or half of a JSON body), then a TCP RST (SO_LINGER 0).
``drip``         ``x-fake-events`` text deltas (default 20), ``x-fake-interval`` seconds
                 (default 0.2) before each one; every event is flushed on its own.
                 Non-streaming requests wait events x interval, then answer.
``hang``         nothing at all for ``x-fake-hang`` seconds (default 30), then ``normal``.
``stall``        streams: the headers and the first event, flushed, then nothing at all for
                 ``x-fake-hang`` seconds (default 30), then the rest (a provider gone quiet
                 mid-stream). Non-streaming requests wait that long, then answer.

``wrong_shape``  a 200 JSON answer of no endpoint's shape, ``{"object": "list", "data": [...]}``
                 (as a server answers whose path leads elsewhere), whether or not the
                 request streams; ``data`` holds ``x-fake-mb`` MiB of strings (default 0).
``redirect``     a 307 (``x-fake-redirect-status`` picks another 3xx) with a ``Location``
                 on the fake provider itself, and no body.

Knobs that combine with any scenario (request headers):

``x-fake-echo-key: 1``  a provider that echoes the credential it was sent: every answer
                 carries it in ``x-fake-echoed-key`` (as ``Bearer <key>``); error answers
                 also put it in their message and in their request id header; the in-band
                 error of ``error_event`` puts it in its message, written in two flushed
                 halves so that the key is split across chunks.
                 ``url`` or ``base64`` instead of ``1`` echoes it encoded so: the header's
                 ``Bearer <key>``, the request id's ``<key>`` and the message's ``k:<key>``
                 (so that base64 meets the key at each of its three alignments).
``x-fake-cors: 1``  every answer carries ``Content-Security-Policy`` and
                 ``Access-Control-Allow-Origin: *`` (with ``-Credentials: true``).
``x-fake-origin-headers: 1``  every answer also carries what a site says of its own
                 origin: ``Set-Cookie``, ``Alt-Svc``, ``Clear-Site-Data``, ``NEL`` and
                 ``Report-To`` (every answer has ``Strict-Transport-Security`` anyway).

The header ``x-fake-override`` (a JSON object) makes an Anthropic Messages answer
hostile, as a server of a member's own may be: ``usage`` (fields replacing those of
every usage object sent), ``model`` (the answer's model), ``id`` (the message id) and
``request_id`` (the ``request-id`` header). Everything else stays as the real API sends it.

A base URL ending in ``/scenario/<name>`` (so request paths ``/scenario/<name>/v1/…``)
picks the scenario for every request sent there, whatever the header says: two keys
on one fake provider can then behave differently (a failing primary and its fallback).

Every SSE event is written and flushed separately. A request that names an unknown
scenario gets a 400 in the API's envelope, so typos fail loudly.

Which API a request belongs to follows from its path: ``/v1/messages*`` is Anthropic,
``GET /v1/models`` is Anthropic when the request has an ``anthropic-version`` header,
everything else is OpenAI. Anthropic requests authenticate with ``x-api-key`` *or*
``Authorization: Bearer`` (anthropic>=2 sends the latter); OpenAI requests with
``Authorization: Bearer``. A request without any key is always refused (401), one with a
key outside ``accepted_keys`` too unless ``accepted_keys`` is None. A body that is not a
JSON object gets the API's 400. Content-Encoding is ignored.

Given ``oauth_tokens``, the Anthropic side checks what Anthropic checks of a Claude
subscription (Claude Code signed in to claude.ai, Pro/Max): it takes only ``Authorization:
Bearer <one of oauth_tokens>`` with ``OAUTH_BETA`` among the ``anthropic-beta`` values, and
refuses (401 ``authentication_error``) an ``x-api-key``, another bearer (an API key, a
tvgate token) and an OAuth bearer without that beta, with Anthropic's own message.

Every request is recorded (`FakeProvider.requests`) with our own id, which is also sent
back as the ``x-fake-request-id`` response header; `FakeProvider.wait_closed` waits for
the client (say, a gateway) to drop a request's connection before the answer was done.

Run it standalone with ``python tests/fake_provider.py --port 9999``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web
from tornado.http1connection import HTTP1Connection

CREATED = 1_700_000_000
"""Every ``created``/``created_at`` timestamp."""

ANTHROPIC_CACHE_CREATION_TOKENS = 4
ANTHROPIC_CACHE_READ_TOKENS = 16
OPENAI_REASONING_TOKENS = 2
"""Added to every OpenAI ``completion_tokens``/``output_tokens``; cached = input // 2."""

DEFAULT_DRIP_EVENTS = 20
DEFAULT_DRIP_INTERVAL = 0.2
DEFAULT_HANG = 30.0
RESET_DELAY = 0.05
"""Pause between the last flushed bytes and the RST, so the client reads them first."""

TOOL_INPUT: dict[str, Any] = {"path": "README.md", "limit": 10}
#: The JSON schema of the tool the tool_use scenario calls, which TOOL_INPUT fits.
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["path"],
}
DEFAULT_TOOL_NAME = "read_file"
TOOL_PREAMBLE = "I'll read the file."
AGENT_COMMAND = "echo tvgate-ok > out.txt && cat out.txt"
AGENT_PREAMBLE = "I'll run the command."
SHELL_TOOLS = ("Bash", "exec_command", "shell", "shell_command")
"""The shell tools the ``agent`` scenario calls, by name (Claude Code's first, then Codex's)."""

SCENARIOS = frozenset(
    {
        "normal",
        "tool_use",
        "agent",
        "thinking",
        "error_529",
        "error_429",
        "error_500",
        "error_event",
        "reset",
        "drip",
        "hang",
        "stall",
        "malformed",
        "redirect",
        "bulk",
        "wrong_shape",
    }
)
MALFORMED_BYTES = b"data: {not json\n\nevent\x00: \xff\xfe???\r\n: comment\ndata: [1, 2\n\n"
"""What ``malformed`` puts in the middle of a stream: broken JSON, NUL, invalid UTF-8."""

#: The ``anthropic-beta`` value an OAuth (subscription) bearer must come with.
OAUTH_BETA = "oauth-2025-04-20"
#: What Anthropic answers an OAuth bearer sent without ``OAUTH_BETA``.
OAUTH_UNSUPPORTED = "OAuth authentication is currently not supported."

ANTHROPIC_ORGANIZATION_ID = "8f2d1c3e-5b4a-4f6e-9d7c-0a1b2c3d4e5f"
ANTHROPIC_RESET_AT = "2023-11-14T22:14:20Z"
OPENAI_ORGANIZATION = "user-fakeorganization0001"
OPENAI_PROJECT = "proj_FakeProject0000000001"
SYSTEM_FINGERPRINT = "fp_f4ke5eed01"
#: What both providers' CDN edges (Cloudflare) add to every answer.
EDGE_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
    "cf-cache-status": "DYNAMIC",
}

ANTHROPIC_MODELS: list[dict[str, Any]] = [
    {
        "type": "model",
        "id": "claude-sonnet-4-6",
        "display_name": "Claude Sonnet 4.6",
        "created_at": "2026-02-17T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-opus-4-7",
        "display_name": "Claude Opus 4.7",
        "created_at": "2026-04-16T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-haiku-4-5-20251001",
        "display_name": "Claude Haiku 4.5",
        "created_at": "2025-10-01T00:00:00Z",
    },
]
OPENAI_MODELS: list[dict[str, Any]] = [
    {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
    {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
    {"id": "gpt-4.1", "object": "model", "created": 1744316542, "owned_by": "system"},
    {
        "id": "text-embedding-3-small",
        "object": "model",
        "created": 1705948997,
        "owned_by": "system",
    },
    {
        "id": "gpt-3.5-turbo-instruct",
        "object": "model",
        "created": 1692901427,
        "owned_by": "system",
    },
]

_log = logging.getLogger("fake_provider")
_SCENARIO_PREFIX = re.compile(r"/scenario/([a-z0-9_]+)(/.*)")

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass
class RecordedRequest:
    """One request as the fake provider received it."""

    id: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    closed_at: float | None = None
    finished_at: float | None = None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


# --------------------------------------------------------------------------- helpers


def _ident(seed: str, salt: str, length: int, alphabet: str = _B58) -> str:
    """A deterministic identifier of `length` characters drawn from `alphabet`."""
    number = int.from_bytes(hashlib.sha256(f"{salt}:{seed}".encode()).digest(), "big")
    chars = []
    for _ in range(length):
        number, rest = divmod(number, len(alphabet))
        chars.append(alphabet[rest])
    return "".join(chars)


def _hex(seed: str, salt: str, length: int) -> str:
    return hashlib.sha256(f"{salt}:{seed}".encode()).hexdigest()[:length]


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _anthropic_sse(event: str, obj: Any) -> bytes:
    return f"event: {event}\ndata: {_compact(obj)}\n\n".encode()


def _data_sse(obj: Any) -> bytes:
    return f"data: {_compact(obj)}\n\n".encode()


def _responses_sse(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\ndata: {_compact(obj)}\n\n".encode()


ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
ANTHROPIC_ERROR_EVENT = (
    b"event: error\n"
    b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
)
OPENAI_DONE = b"data: [DONE]\n\n"


def _collect_strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_strings(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_strings(item, out)


def _prompt_words(body: dict[str, Any]) -> int:
    """Words in the prompt-carrying fields of a request body (at least 1)."""
    strings: list[str] = []
    for key in ("system", "messages", "instructions", "input", "prompt"):
        _collect_strings(body.get(key), strings)
    return max(1, sum(len(text.split()) for text in strings))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(text for text in (_text_of(part) for part in content) if text)
    if isinstance(content, dict):
        if isinstance(content.get("text"), str):
            return cast(str, content["text"])
        if "content" in content and content.get("type") not in ("tool_result",):
            return _text_of(content["content"])
    return ""


def _last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user turn in an Anthropic, chat, Responses or completions body."""
    turns: Any = body.get("messages")
    if turns is None:
        turns = body.get("input")
    if turns is None:
        turns = body.get("prompt")
    if isinstance(turns, str):
        return turns
    if isinstance(turns, list):
        if turns and all(isinstance(turn, str) for turn in turns):
            return cast(str, turns[-1])
        for turn in reversed(turns):
            if isinstance(turn, dict) and turn.get("role") == "user":
                return _text_of(turn.get("content"))
    return ""


def _answer_text(body: dict[str, Any]) -> str:
    said = " ".join(_last_user_text(body).split())[:60].strip()
    return f"You said: {said}" if said else "Hello! How can I help you today?"


def _words(text: str) -> list[str]:
    """Split text into deltas of one word each, keeping the whitespace after each word."""
    return re.findall(r"\S+\s*", text) or [text]


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _tool_name(body: dict[str, Any]) -> str:
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        tool = tools[0]
        name = tool.get("name")
        if not isinstance(name, str):
            function = tool.get("function")
            name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return name
    return DEFAULT_TOOL_NAME


def _tool_names(body: dict[str, Any]) -> list[str]:
    """The names of the tools a request offers (Anthropic, chat and Responses shapes)."""
    names = []
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            function = tool.get("function")
            name = function.get("name") if isinstance(function, dict) else tool.get("name")
            if isinstance(name, str):
                names.append(name)
    return names


def _shell_call(body: dict[str, Any], command: str) -> tuple[str, dict[str, Any]] | None:
    """A call of the first shell tool the request offers running `command`, or None."""
    offered = _tool_names(body)
    for name in SHELL_TOOLS:
        if name in offered:
            break
    else:
        return None
    # Each tool's own parameters, as the tools declare them.
    by_tool: dict[str, dict[str, Any]] = {
        "Bash": {"command": command, "description": "Run the command"},
        "exec_command": {"cmd": command},
        "shell": {"command": ["bash", "-lc", command]},
        "shell_command": {"command": command},
    }
    return name, by_tool[name]


def _tool_result(body: dict[str, Any]) -> str | None:
    """The text of the tool result the last turn carries (Anthropic ``tool_result`` blocks,
    a chat ``tool`` message, a Responses ``function_call_output``), or None."""
    turns = body.get("messages")
    if turns is None:
        turns = body.get("input")
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        return None
    last = turns[-1]
    if last.get("type") == "function_call_output":
        output = last.get("output")
        return output if isinstance(output, str) else _text_of(output)
    if last.get("role") == "tool":
        return _text_of(last.get("content"))
    content = last.get("content")
    if last.get("role") == "user" and isinstance(content, list):
        results = [
            _text_of(part.get("content"))
            for part in content
            if isinstance(part, dict) and part.get("type") == "tool_result"
        ]
        if results:
            return " ".join(results)
    return None


def _mask_key(key: str) -> str:
    """Mask an API key the way OpenAI echoes it: a short prefix, stars, the last 4."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:5] + "*" * max(4, len(key) - 9) + key[-4:]


def _embedding(text: str, dimensions: int) -> list[float]:
    """Deterministic floats k/1024 in [-1, 1): exact in float32, so base64 and JSON agree."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    return [
        (int.from_bytes(raw[2 * i : 2 * i + 2], "big") % 2048 - 1024) / 1024
        for i in range(dimensions)
    ]


# --------------------------------------------------------------------------- replies


@dataclass
class _Frame:
    """One SSE event; `delta` marks content deltas (drip sleeps before those)."""

    data: bytes
    delta: bool = False


@dataclass
class _Reply:
    """What an endpoint answers: a JSON body, or SSE frames (+ the in-band error frame)."""

    body: Any = None
    frames: list[_Frame] | None = None
    error_frame: bytes | None = None


@dataclass
class _Ctx:
    """Everything an endpoint needs to build its deterministic answer."""

    api: str
    path: str
    body: dict[str, Any]
    scenario: str
    seed: str
    stream: bool
    pieces: list[str]
    input_tokens: int
    error_style: str
    interval: float = 0.0
    model: str = ""
    #: What ``x-fake-override`` replaces in the answer (Anthropic Messages).
    override: dict[str, Any] = field(default_factory=dict)
    #: The tool call the answer makes (tool_use and agent scenarios): name, input.
    tool_call: tuple[str, dict[str, Any]] | None = None

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))


# ---- Anthropic


@dataclass
class _Block:
    kind: str
    pieces: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def _anthropic_blocks(ctx: _Ctx) -> list[_Block]:
    if ctx.tool_call is not None:
        name, tool_input = ctx.tool_call
        return [
            _Block("text", ctx.pieces),
            _Block(
                "tool_use",
                ["", *_chunks(json.dumps(tool_input), 12)],
                {
                    "id": "toolu_01" + _ident(ctx.seed, "toolu", 22),
                    "name": name,
                    "input": tool_input,
                },
            ),
        ]
    blocks = []
    if ctx.scenario == "thinking":
        thinking = "The user wants their words echoed back. I will repeat them."
        signature = base64.b64encode(hashlib.sha512(f"sig:{ctx.seed}".encode()).digest() * 3)
        blocks.append(_Block("thinking", _words(thinking), {"signature": signature.decode()}))
    blocks.append(_Block("text", ctx.pieces))
    return blocks


def _anthropic_usage(ctx: _Ctx, output_tokens: int) -> dict[str, Any]:
    usage = {
        "input_tokens": ctx.input_tokens,
        "cache_creation_input_tokens": ANTHROPIC_CACHE_CREATION_TOKENS,
        "cache_read_input_tokens": ANTHROPIC_CACHE_READ_TOKENS,
        "cache_creation": {
            "ephemeral_5m_input_tokens": ANTHROPIC_CACHE_CREATION_TOKENS,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    return {**usage, **ctx.override.get("usage", {})}


def _anthropic_block_json(block: _Block, *, final: bool) -> dict[str, Any]:
    if block.kind == "text":
        return {"type": "text", "text": "".join(block.pieces) if final else ""}
    if block.kind == "thinking":
        return {
            "type": "thinking",
            "thinking": "".join(block.pieces) if final else "",
            "signature": block.extra["signature"] if final else "",
        }
    return {
        "type": "tool_use",
        "id": block.extra["id"],
        "name": block.extra["name"],
        "input": block.extra["input"] if final else {},
    }


def _anthropic_message(ctx: _Ctx) -> _Reply:
    blocks = _anthropic_blocks(ctx)
    output_tokens = sum(len(block.pieces) for block in blocks)
    stop_reason = "tool_use" if blocks[-1].kind == "tool_use" else "end_turn"
    message_id = ctx.override.get("id", "msg_01" + _ident(ctx.seed, "msg", 22))
    model = ctx.override.get("model", ctx.model)
    if not ctx.stream:
        return _Reply(
            body={
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [_anthropic_block_json(block, final=True) for block in blocks],
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": _anthropic_usage(ctx, output_tokens),
            }
        )
    start: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _anthropic_usage(ctx, 1),
    }
    frames = [_Frame(_anthropic_sse("message_start", {"type": "message_start", "message": start}))]
    delta_types = {
        "text": "text_delta",
        "thinking": "thinking_delta",
        "tool_use": "input_json_delta",
    }
    delta_keys = {"text": "text", "thinking": "thinking", "tool_use": "partial_json"}
    for index, block in enumerate(blocks):
        frames.append(
            _Frame(
                _anthropic_sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": _anthropic_block_json(block, final=False),
                    },
                )
            )
        )
        if index == 0:
            frames.append(_Frame(ANTHROPIC_PING))
        for piece in block.pieces:
            delta = {"type": delta_types[block.kind], delta_keys[block.kind]: piece}
            event = {"type": "content_block_delta", "index": index, "delta": delta}
            frames.append(_Frame(_anthropic_sse("content_block_delta", event), delta=True))
        if block.kind == "thinking":
            delta = {"type": "signature_delta", "signature": block.extra["signature"]}
            event = {"type": "content_block_delta", "index": index, "delta": delta}
            frames.append(_Frame(_anthropic_sse("content_block_delta", event)))
        stop = {"type": "content_block_stop", "index": index}
        frames.append(_Frame(_anthropic_sse("content_block_stop", stop)))
    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {
            "input_tokens": ctx.input_tokens,
            "cache_creation_input_tokens": ANTHROPIC_CACHE_CREATION_TOKENS,
            "cache_read_input_tokens": ANTHROPIC_CACHE_READ_TOKENS,
            "output_tokens": output_tokens,
            **ctx.override.get("usage", {}),
        },
    }
    frames.append(_Frame(_anthropic_sse("message_delta", message_delta)))
    frames.append(_Frame(_anthropic_sse("message_stop", {"type": "message_stop"})))
    return _Reply(frames=frames, error_frame=ANTHROPIC_ERROR_EVENT)


def _anthropic_count_tokens(ctx: _Ctx) -> _Reply:
    return _Reply(body={"input_tokens": ctx.input_tokens})


def _anthropic_models() -> dict[str, Any]:
    return {
        "data": ANTHROPIC_MODELS,
        "has_more": False,
        "first_id": ANTHROPIC_MODELS[0]["id"],
        "last_id": ANTHROPIC_MODELS[-1]["id"],
    }


# ---- OpenAI


def _openai_stream_error() -> dict[str, Any]:
    return {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def _chat_usage(ctx: _Ctx, deltas: int) -> dict[str, Any]:
    completion = deltas + OPENAI_REASONING_TOKENS
    return {
        "prompt_tokens": ctx.input_tokens,
        "completion_tokens": completion,
        "total_tokens": ctx.input_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": ctx.input_tokens // 2, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": OPENAI_REASONING_TOKENS,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


#: The reasoning a chat/completions answer of the thinking scenario starts with.
CHAT_REASONING = "The user wants their words echoed back. I will repeat them."


def _openai_plan(ctx: _Ctx) -> tuple[list[str], list[str] | None]:
    """Text deltas, and argument fragments of a tool call (tool_use scenario)."""
    if ctx.tool_call is not None:
        return ctx.pieces, _chunks(_compact(ctx.tool_call[1]), 6)
    return ctx.pieces, None


def _chat_completion(ctx: _Ctx) -> _Reply:
    pieces, arg_pieces = _openai_plan(ctx)
    completion_id = "chatcmpl-" + _ident(ctx.seed, "chatcmpl", 29, _B62)
    call_id = "call_" + _ident(ctx.seed, "call", 24, _B62)
    name = ctx.tool_call[0] if ctx.tool_call is not None else ""
    finish_reason = "tool_calls" if arg_pieces is not None else "stop"
    deltas = len(pieces) + len(arg_pieces or [])
    if not ctx.stream:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(pieces),
            "refusal": None,
            "annotations": [],
        }
        if ctx.scenario == "thinking":
            message["reasoning_content"] = CHAT_REASONING
        if arg_pieces is not None:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": "".join(arg_pieces)},
                }
            ]
        return _Reply(
            body={
                "id": completion_id,
                "object": "chat.completion",
                "created": CREATED,
                "model": ctx.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": _chat_usage(ctx, deltas),
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": ctx.model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if ctx.include_usage:
            obj["usage"] = None
        return obj

    frames = [_Frame(_data_sse(chunk({"role": "assistant", "content": "", "refusal": None})))]
    if ctx.scenario == "thinking":
        frames += [
            _Frame(_data_sse(chunk({"reasoning_content": word})), delta=True)
            for word in _words(CHAT_REASONING)
        ]
    frames += [_Frame(_data_sse(chunk({"content": piece})), delta=True) for piece in pieces]
    if arg_pieces is not None:
        first = {
            "index": 0,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        frames.append(_Frame(_data_sse(chunk({"tool_calls": [first]}))))
        for piece in arg_pieces:
            fragment = {"index": 0, "function": {"arguments": piece}}
            frames.append(_Frame(_data_sse(chunk({"tool_calls": [fragment]})), delta=True))
    frames.append(_Frame(_data_sse(chunk({}, finish_reason))))
    if ctx.include_usage:
        last = chunk({})
        last["choices"] = []
        last["usage"] = _chat_usage(ctx, deltas)
        frames.append(_Frame(_data_sse(last)))
    frames.append(_Frame(OPENAI_DONE))
    return _Reply(frames=frames, error_frame=_data_sse({"error": _openai_stream_error()}))


def _completion(ctx: _Ctx) -> _Reply:
    completion_id = "cmpl-" + _ident(ctx.seed, "cmpl", 29, _B62)
    completion_tokens = len(ctx.pieces)
    usage = {
        "prompt_tokens": ctx.input_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": ctx.input_tokens + completion_tokens,
    }

    def body(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": CREATED,
            "model": ctx.model,
            "choices": choices,
        }

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if not ctx.stream:
        return _Reply(body={**body([choice("".join(ctx.pieces), "stop")]), "usage": usage})
    frames = [_Frame(_data_sse(body([choice(piece, None)])), delta=True) for piece in ctx.pieces]
    frames.append(_Frame(_data_sse(body([choice("", "stop")]))))
    if ctx.include_usage:
        frames.append(_Frame(_data_sse({**body([]), "usage": usage})))
    frames.append(_Frame(OPENAI_DONE))
    return _Reply(frames=frames, error_frame=_data_sse({"error": _openai_stream_error()}))


def _response_object(
    ctx: _Ctx,
    response_id: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body = ctx.body
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "background": False,
        "completed_at": CREATED + 1 if status == "completed" else None,
        "error": error,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": ctx.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_logprobs": 0,
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _response(ctx: _Ctx) -> _Reply:
    pieces, arg_pieces = _openai_plan(ctx)
    response_id = "resp_" + _hex(ctx.seed, "resp", 48)
    message_id = "msg_" + _hex(ctx.seed, "msg", 48)
    call_item_id = "fc_" + _hex(ctx.seed, "fc", 48)
    call_id = "call_" + _ident(ctx.seed, "call", 24, _B62)
    name = ctx.tool_call[0] if ctx.tool_call is not None else ""
    text = "".join(pieces)
    arguments = "".join(arg_pieces or [])
    deltas = len(pieces) + len(arg_pieces or [])
    output_tokens = deltas + OPENAI_REASONING_TOKENS
    usage = {
        "input_tokens": ctx.input_tokens,
        "input_tokens_details": {"cached_tokens": ctx.input_tokens // 2},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": OPENAI_REASONING_TOKENS},
        "total_tokens": ctx.input_tokens + output_tokens,
    }
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    message_done = {
        "id": message_id,
        "type": "message",
        "status": "completed",
        "content": [part],
        "role": "assistant",
    }
    call_done = {
        "id": call_item_id,
        "type": "function_call",
        "status": "completed",
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }
    output = [message_done] + ([call_done] if arg_pieces is not None else [])
    if not ctx.stream:
        return _Reply(body=_response_object(ctx, response_id, "completed", output, usage))

    frames: list[_Frame] = []

    def emit(event: dict[str, Any], delta: bool = False) -> None:
        frames.append(
            _Frame(
                _responses_sse(
                    {"type": event.pop("type"), "sequence_number": len(frames), **event}
                ),
                delta,
            )
        )

    in_progress = _response_object(ctx, response_id, "in_progress", [], None)
    emit({"type": "response.created", "response": in_progress})
    emit({"type": "response.in_progress", "response": in_progress})
    message_added = {**message_done, "status": "in_progress", "content": []}
    emit({"type": "response.output_item.added", "output_index": 0, "item": message_added})
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    emit({"type": "response.content_part.added", **where, "part": {**part, "text": ""}})
    for piece in pieces:
        emit({"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}, True)
    emit({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
    emit({"type": "response.content_part.done", **where, "part": part})
    emit({"type": "response.output_item.done", "output_index": 0, "item": message_done})
    if arg_pieces is not None:
        call_added = {**call_done, "status": "in_progress", "arguments": ""}
        emit({"type": "response.output_item.added", "output_index": 1, "item": call_added})
        for piece in arg_pieces:
            event = {"item_id": call_item_id, "output_index": 1, "delta": piece}
            emit({"type": "response.function_call_arguments.delta", **event}, True)
        event = {"item_id": call_item_id, "output_index": 1, "arguments": arguments}
        emit({"type": "response.function_call_arguments.done", **event})
        emit({"type": "response.output_item.done", "output_index": 1, "item": call_done})
    completed = _response_object(ctx, response_id, "completed", output, usage)
    emit({"type": "response.completed", "response": completed})

    # The error frame takes the sequence number of the event it replaces (see _cut_index).
    cut = _cut_index(frames)
    message = _openai_stream_error()["message"]
    error_event: dict[str, Any]
    if ctx.error_style == "flat":
        error_event = {"type": "error", "sequence_number": cut, "code": "server_error"}
        error_event |= {"message": message, "param": None}
    elif ctx.error_style == "failed":
        error = {"code": "server_error", "message": message}
        failed = _response_object(ctx, response_id, "failed", [], None, error)
        error_event = {"type": "response.failed", "sequence_number": cut, "response": failed}
    else:
        error = {"type": "server_error", "code": "server_error", "message": message, "param": None}
        error_event = {"type": "error", "error": error, "sequence_number": cut}
    return _Reply(frames=frames, error_frame=_responses_sse(error_event))


def _embeddings(ctx: _Ctx) -> _Reply:
    raw = ctx.body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    else:
        inputs = list(raw) if isinstance(raw, list) else [raw]
    dimensions = ctx.body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions <= 0:
        dimensions = 3072 if "large" in ctx.model else 1536
    base64_format = ctx.body.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        tokens += len(item) if isinstance(item, list) else len(str(item).split())
        vector = _embedding(f"{ctx.model}:{_compact(item)}", dimensions)
        value: Any = vector
        if base64_format:
            value = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _Reply(body={"object": "list", "data": data, "model": ctx.model, "usage": usage})


def _cut_index(frames: list[_Frame]) -> int:
    """Where error_event/reset cut a stream: right after the second content delta."""
    seen = 0
    for index, frame in enumerate(frames):
        if frame.delta:
            seen += 1
            if seen == 2:
                return index + 1
    return max(1, len(frames) // 2)


# --------------------------------------------------------------------------- server


class _HTTPError(Exception):
    """An error answer in the API's envelope."""

    def __init__(self, status: int, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.extra = extra


class _Handler(tornado.web.RequestHandler):
    """Answers every path; dispatches on method and path itself."""

    provider: FakeProvider
    record: RecordedRequest | None = None
    #: The scenarios this handler knows (a fake of another service adds its own).
    scenarios: frozenset[str] = SCENARIOS

    def initialize(self, provider: FakeProvider) -> None:
        self.provider = provider
        self.client_gone = asyncio.Event()
        self.aborted = False

    @property
    def fake_id(self) -> str:
        fake_id = self.__dict__.get("_fake_id")
        if fake_id is None:
            fake_id = self.__dict__["_fake_id"] = uuid.uuid4().hex
        return cast(str, fake_id)

    def set_default_headers(self) -> None:
        self.set_header("Server", "cloudflare")
        self.set_header("x-fake-request-id", self.fake_id)
        headers = self.request.headers
        if headers.get("x-fake-echo-key") and self.sent_key:
            self.set_header("x-fake-echoed-key", self.echoed("Bearer ", self.sent_key))
        if headers.get("x-fake-cors"):
            self.set_header("Content-Security-Policy", "default-src 'none'; frame-ancestors *")
            self.set_header("Access-Control-Allow-Origin", "*")
            self.set_header("Access-Control-Allow-Credentials", "true")
        if headers.get("x-fake-origin-headers"):
            self.set_header("Set-Cookie", "__cf_bm=fake; path=/; HttpOnly; Secure")
            self.set_header("Alt-Svc", 'h3=":443"; ma=86400')
            self.set_header("Clear-Site-Data", '"cookies", "storage"')
            self.set_header("NEL", '{"report_to": "cf-nel", "max_age": 604800}')
            self.set_header("Report-To", '{"group": "cf-nel", "max_age": 604800}')

    @property
    def sent_key(self) -> str:
        """The credential the request carried (x-api-key, else the bearer token), or ""."""
        headers = self.request.headers
        authorization = headers.get("Authorization", "")
        bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
        return headers.get("x-api-key", "").strip() or bearer

    @property
    def echo_key(self) -> bool:
        return bool(self.request.headers.get("x-fake-echo-key")) and bool(self.sent_key)

    def echoed(self, lead: str, key: str, encoded_lead: str = "") -> str:
        """``lead + key`` as ``x-fake-echo-key`` asks to echo it: as is, or ``encoded_lead``
        (else ``lead``) and the key URL-escaped or base64-encoded together."""
        how = self.request.headers.get("x-fake-echo-key", "")
        text = (encoded_lead or lead) + key
        if how == "url":
            return urllib.parse.quote(text, safe="")
        if how == "base64":
            return base64.b64encode(text.encode()).decode()
        return lead + key

    @property
    def echoed_in_message(self) -> str:
        return self.echoed("", self.sent_key, "k:")

    def compute_etag(self) -> str | None:
        return None

    def prepare(self) -> None:
        self.path_scenario = ""
        prefixed = _SCENARIO_PREFIX.fullmatch(self.request.path)
        if prefixed is not None:
            self.path_scenario = prefixed[1]
            self.request.path = prefixed[2]
        headers: dict[str, str] = {}
        for name, value in self.request.headers.get_all():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.record = RecordedRequest(
            id=self.fake_id,
            method=self.request.method or "",
            path=self.request.path,
            query=self.request.query,
            headers=headers,
            body=self.request.body,
            received_at=time.monotonic(),
        )
        self.provider._record(self.record)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.client_gone.set()
        if self.record is not None and not self.aborted and not self._finished:
            self.provider._mark_closed(self.record)

    def on_finish(self) -> None:
        if self.record is not None and not self.aborted and self.record.closed_at is None:
            self.provider._mark_finished(self.record)

    # ---- dispatch

    @property
    def api(self) -> str:
        path = self.request.path
        if path.startswith("/v1/messages"):
            return "anthropic"
        if path.startswith("/v1/models") and "anthropic-version" in self.request.headers:
            return "anthropic"
        return "openai"

    async def get(self) -> None:
        await self._serve()

    async def post(self) -> None:
        await self._serve()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        kind = "api_error" if status_code >= 500 else "invalid_request_error"
        self._write_error_body(_HTTPError(status_code, kind, self._reason))

    @property
    def upstream_request_id(self) -> str:
        """The provider's own request id header value (unique per request)."""
        if self.echo_key and self.get_status() >= 400:
            return "req_" + self.echoed("", self.sent_key)
        if self.api == "anthropic":
            with contextlib.suppress(_HTTPError):  # a bad override is answered as an error
                if "request_id" in self._override:
                    return str(self._override["request_id"])
            return "req_011C" + _ident(self.fake_id, "req", 20)
        return "req_" + _hex(self.fake_id, "req", 32)

    async def _serve(self) -> None:
        try:
            self._authenticate(self.api)
            route = self._route()
            body = self._parse_body()
            scenario = (
                self.path_scenario
                or self.request.headers.get("x-fake-scenario", "normal").strip()
                or "normal"
            )
            if scenario not in self.scenarios:
                raise _HTTPError(
                    400, "invalid_request_error", f"unknown x-fake-scenario: {scenario}"
                )
            if scenario == "hang" and await self._sleep(self._number("x-fake-hang", DEFAULT_HANG)):
                return
            if scenario == "redirect":
                # A provider (or something pretending to be one) sending the client elsewhere.
                self.set_status(int(self._number("x-fake-redirect-status", 307)))
                self.set_header("Location", f"http://{self.request.host}/v1/redirected")
                self.finish()
                return
            if scenario == "bulk":
                await self._bulk(int(self._number("x-fake-mb", 20)))
                return
            if scenario == "wrong_shape":
                await self._wrong_shape(int(self._number("x-fake-mb", 0)))
                return
            ctx = self._context(body, scenario)
            if scenario == "error_event" and not ctx.stream:
                scenario = "error_529"
            self._raise_scenario_error(scenario)
            reply = route(ctx)
        except _HTTPError as error:
            self._write_error_body(error)
        else:
            await self._deliver(ctx, reply)

    def _route(self) -> Callable[[_Ctx], _Reply]:
        method, path = self.request.method, self.request.path.rstrip("/")
        posts: dict[str, Callable[[_Ctx], _Reply]] = {
            "/v1/messages": _anthropic_message,
            "/v1/messages/count_tokens": _anthropic_count_tokens,
            "/v1/chat/completions": _chat_completion,
            "/v1/completions": _completion,
            "/v1/responses": _response,
            "/v1/embeddings": _embeddings,
        }
        if method == "POST" and path in posts:
            return posts[path]
        if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
            return self._models
        if self.api == "anthropic":
            raise _HTTPError(404, "not_found_error", "Not Found")
        raise _HTTPError(
            404, "invalid_request_error", f"Invalid URL ({method} {self.request.path})"
        )

    def _models(self, ctx: _Ctx) -> _Reply:
        path = self.request.path.rstrip("/")
        anthropic = self.api == "anthropic"
        if path == "/v1/models":
            return _Reply(
                body=_anthropic_models() if anthropic else {"object": "list", "data": OPENAI_MODELS}
            )
        model_id = path.removeprefix("/v1/models/")
        for model in ANTHROPIC_MODELS if anthropic else OPENAI_MODELS:
            if model["id"] == model_id:
                return _Reply(body=model)
        if anthropic:
            raise _HTTPError(404, "not_found_error", f"model: {model_id}")
        raise _HTTPError(
            404,
            "invalid_request_error",
            f"The model '{model_id}' does not exist",
            param="model",
            code="model_not_found",
        )

    def _authenticate(self, api: str) -> None:
        headers = self.request.headers
        authorization = headers.get("Authorization", "")
        bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
        accepted = self.provider.accepted_keys
        if api == "anthropic" and self.provider.oauth_tokens is not None:
            self._authenticate_oauth(bearer)
            return
        if api == "anthropic":
            key = headers.get("x-api-key", "").strip() or bearer
            if not key:
                raise _HTTPError(401, "authentication_error", "x-api-key header is required")
            if accepted is not None and key not in accepted:
                raise _HTTPError(401, "authentication_error", "invalid x-api-key")
            return
        if not bearer:
            raise _HTTPError(
                401,
                "invalid_request_error",
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or as the password field (with blank username) if you're accessing the API "
                "from your browser and are prompted for a username and password. You can "
                "obtain an API key from https://platform.openai.com/account/api-keys.",
            )
        if accepted is not None and bearer not in accepted:
            raise _HTTPError(
                401,
                "invalid_request_error",
                f"Incorrect API key provided: {_mask_key(bearer)}. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )

    def _authenticate_oauth(self, bearer: str) -> None:
        """A Claude subscription's call: its OAuth bearer, with the OAuth beta."""
        headers = self.request.headers
        tokens = self.provider.oauth_tokens or set()
        if headers.get("x-api-key") or bearer not in tokens:
            raise _HTTPError(401, "authentication_error", "Invalid bearer token")
        betas = {b.strip() for b in ",".join(headers.get_list("anthropic-beta")).split(",")}
        if OAUTH_BETA not in betas:
            raise _HTTPError(401, "authentication_error", OAUTH_UNSUPPORTED)

    def _parse_body(self) -> dict[str, Any]:
        if self.request.method != "POST":
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError:
            body = None
        if isinstance(body, dict):
            return body
        if self.api == "anthropic":
            raise _HTTPError(
                400,
                "invalid_request_error",
                "There was an error parsing the body: expected a JSON object",
            )
        raise _HTTPError(
            400,
            "invalid_request_error",
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON. If you have trouble figuring out how to fix "
            "this, please contact us through our help center at help.openai.com.)",
        )

    def _number(self, header: str, default: float) -> float:
        raw = self.request.headers.get(header)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise _HTTPError(400, "invalid_request_error", f"{header} must be a number") from None
        if value < 0:
            raise _HTTPError(400, "invalid_request_error", f"{header} must not be negative")
        return value

    def _context(self, body: dict[str, Any], scenario: str) -> _Ctx:
        seed_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        seed_text = (
            self.request.path.rstrip("/")
            + "\n"
            + json.dumps(seed_body, sort_keys=True, ensure_ascii=False)
        )
        interval = 0.0
        if scenario == "drip":
            events = int(self._number("x-fake-events", DEFAULT_DRIP_EVENTS))
            interval = self._number("x-fake-interval", DEFAULT_DRIP_INTERVAL)
            pieces = [f"drip {i + 1}/{events} " for i in range(events)] or [""]
        else:
            pieces = _words(_answer_text(body))
        if scenario == "stall":
            interval = self._number("x-fake-hang", DEFAULT_HANG)
        tool_call = None
        if scenario == "tool_use":
            pieces, tool_call = _words(TOOL_PREAMBLE), (_tool_name(body), TOOL_INPUT)
        elif scenario == "agent":
            command = self.request.headers.get("x-fake-command", AGENT_COMMAND)
            result = _tool_result(body)
            tool_call = _shell_call(body, command) if result is None else None
            if result is not None:
                pieces = _words("Tool said: " + " ".join(result.split())[:200])
            elif tool_call is not None:
                pieces = _words(AGENT_PREAMBLE)
        return _Ctx(
            api=self.api,
            path=self.request.path.rstrip("/"),
            body=body,
            scenario=scenario,
            seed=hashlib.sha256(seed_text.encode()).hexdigest(),
            stream=bool(body.get("stream")),
            pieces=pieces,
            input_tokens=_prompt_words(body),
            error_style=self.request.headers.get("x-fake-error-style", "nested"),
            interval=interval,
            model=str(body.get("model", "")),
            override=self._override,
            tool_call=tool_call,
        )

    @property
    def _override(self) -> dict[str, Any]:
        try:
            override = json.loads(self.request.headers.get("x-fake-override", "{}"))
        except ValueError:
            raise _HTTPError(400, "invalid_request_error", "x-fake-override is not JSON") from None
        if not isinstance(override, dict):
            raise _HTTPError(400, "invalid_request_error", "x-fake-override is not an object")
        return override

    # ---- errors

    def _raise_scenario_error(self, scenario: str) -> None:
        anthropic = self.api == "anthropic"
        if scenario == "error_529":
            if anthropic:
                raise _HTTPError(529, "overloaded_error", "Overloaded", retry_after="1")
            raise _HTTPError(
                503,
                "server_error",
                "The engine is currently overloaded, please try again later.",
                retry_after="1",
            )
        if scenario == "error_429":
            if anthropic:
                raise _HTTPError(
                    429,
                    "rate_limit_error",
                    "This request would exceed the rate limit for your organization "
                    f"({ANTHROPIC_ORGANIZATION_ID}) of 50 requests per minute. For details, refer "
                    "to: https://docs.claude.com/en/api/rate-limits. You can see the response "
                    "headers for current usage. Please reduce the prompt length or the maximum "
                    "tokens requested, or try again later.",
                    retry_after="2",
                )
            raise _HTTPError(
                429,
                "requests",
                "Rate limit reached for requests in organization org-fake on requests per min "
                "(RPM): Limit 500, Used 500, Requested 1. Please try again in 2s. Visit "
                "https://platform.openai.com/account/rate-limits to learn more.",
                code="rate_limit_exceeded",
                retry_after="2",
            )
        if scenario == "error_500":
            if anthropic:
                raise _HTTPError(500, "api_error", "Internal server error")
            raise _HTTPError(
                500,
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
            )

    def _write_error_body(self, error: _HTTPError) -> None:
        self.clear()
        reason = {529: "Overloaded"}.get(error.status)
        self.set_status(error.status, reason)
        if self.echo_key:
            error.message += f" (the request was sent with key {self.echoed_in_message})"
        retry_after = error.extra.get("retry_after")
        if self.api == "anthropic":
            self._set_anthropic_headers(limited=error.status == 429)
            self.set_header("Content-Type", "application/json")
            payload = {
                "type": "error",
                "error": {"type": error.kind, "message": error.message},
                "request_id": self.upstream_request_id,
            }
            data = _compact(payload)
        else:
            self._set_openai_headers(limited=error.status == 429)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            payload = {
                "error": {
                    "message": error.message,
                    "type": error.kind,
                    "param": error.extra.get("param"),
                    "code": error.extra.get("code"),
                }
            }
            data = json.dumps(payload, indent=4, ensure_ascii=False) + "\n"
        if retry_after is not None:
            self.set_header("retry-after", retry_after)
        self.finish(data.encode())

    # ---- headers

    def _set_anthropic_headers(self, *, limited: bool = False) -> None:
        remaining = "0" if limited else "3999"
        headers = {
            "request-id": self.upstream_request_id,
            "anthropic-organization-id": ANTHROPIC_ORGANIZATION_ID,
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": remaining,
            "anthropic-ratelimit-requests-reset": ANTHROPIC_RESET_AT,
            "anthropic-ratelimit-tokens-limit": "480000",
            "anthropic-ratelimit-tokens-remaining": "0" if limited else "480000",
            "anthropic-ratelimit-tokens-reset": ANTHROPIC_RESET_AT,
            "anthropic-ratelimit-input-tokens-limit": "400000",
            "anthropic-ratelimit-input-tokens-remaining": "400000",
            "anthropic-ratelimit-input-tokens-reset": ANTHROPIC_RESET_AT,
            "anthropic-ratelimit-output-tokens-limit": "80000",
            "anthropic-ratelimit-output-tokens-remaining": "80000",
            "anthropic-ratelimit-output-tokens-reset": ANTHROPIC_RESET_AT,
            "via": "1.1 google",
            "x-robots-tag": "none",
        }
        self._set_headers(headers)

    def _set_openai_headers(self, *, limited: bool = False) -> None:
        headers = {
            "x-request-id": self.upstream_request_id,
            "openai-organization": OPENAI_ORGANIZATION,
            "openai-project": OPENAI_PROJECT,
            "openai-processing-ms": "42",
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-requests": "0" if limited else "9999",
            "x-ratelimit-remaining-tokens": "29999000",
            "x-ratelimit-reset-requests": "2s" if limited else "6ms",
            "x-ratelimit-reset-tokens": "2ms",
            "x-content-type-options": "nosniff",
        }
        self._set_headers(headers)

    def _set_headers(self, headers: dict[str, str]) -> None:
        """``headers``, and those that both providers' CDN edges add to every answer."""
        for name, value in {**headers, **EDGE_HEADERS}.items():
            self.set_header(name, value)

    # ---- delivery

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early if the client goes away; True if it did."""
        if self.client_gone.is_set():
            return True
        try:
            await asyncio.wait_for(self.client_gone.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def _reset(self) -> None:
        """Abort the connection with a TCP RST."""
        self.aborted = True
        stream = cast(HTTP1Connection, self.request.connection).stream
        sock = stream.socket
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.close()

    async def _deliver(self, ctx: _Ctx, reply: _Reply) -> None:
        if ctx.api == "anthropic":
            self._set_anthropic_headers()
        else:
            self._set_openai_headers()
        try:
            if reply.frames is None:
                delay = ctx.interval if ctx.scenario == "stall" else ctx.interval * len(ctx.pieces)
                await self._deliver_json(ctx, reply.body, delay)
            else:
                await self._deliver_stream(ctx, reply, ctx.interval)
        except tornado.iostream.StreamClosedError:
            return

    async def _deliver_json(self, ctx: _Ctx, body: Any, delay: float) -> None:
        if ctx.api == "anthropic":
            self.set_header("Content-Type", "application/json")
            payload = _compact(body).encode()
        else:
            self.set_header("Content-Type", "application/json")
            payload = (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()
        if delay and await self._sleep(delay):
            return
        if ctx.scenario == "reset":
            self.set_header("Content-Length", str(len(payload)))
            self.write(payload[: len(payload) // 2])
            await self.flush()
            await asyncio.sleep(RESET_DELAY)
            self._reset()
            return
        await self.finish(payload)

    async def _bulk(self, megabytes: int) -> None:
        """An SSE stream of ``megabytes`` MiB of ping events, as fast as the client takes it;
        with ``x-fake-endless: 1``, one event that never ends (no blank line, ever)."""
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        event = b'event: ping\ndata: {"type": "ping", "pad": "' + b"x" * 1000 + b'"}\n\n'
        chunk = event * 64
        if self.request.headers.get("x-fake-endless") == "1":
            self.write(b'event: ping\ndata: {"type": "ping", "pad": "')
            chunk = b"x" * len(chunk)
        for _ in range(megabytes * 1024 * 1024 // len(chunk)):
            if self.client_gone.is_set():
                return
            self.write(chunk)
            await self.flush()
        await self.finish()

    async def _wrong_shape(self, megabytes: int) -> None:
        """A 200 JSON answer of no endpoint's shape, with ``megabytes`` MiB of strings."""
        self.set_header("Content-Type", "application/json")
        self.write(b'{"object": "list", "data": [')
        mebibyte = (b'"' + b"x" * 1020 + b'", ') * 1024
        for _ in range(megabytes):
            if self.client_gone.is_set():
                return
            self.write(mebibyte)
            await self.flush()
        await self.finish(b'""]}')

    async def _deliver_stream(self, ctx: _Ctx, reply: _Reply, interval: float) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        frames = list(reply.frames or [])
        cut = _cut_index(frames)
        if ctx.scenario == "error_event" and reply.error_frame is not None:
            frames = [*frames[:cut], _Frame(self._echoing(reply.error_frame))]
        for index, frame in enumerate(frames):
            if ctx.scenario == "reset" and index == cut:
                await asyncio.sleep(RESET_DELAY)
                self._reset()
                return
            if ctx.scenario == "malformed" and index == cut:
                self.write(MALFORMED_BYTES)
            if ctx.scenario == "stall" and index == 1 and await self._sleep(interval):
                return
            if ctx.scenario == "drip" and interval and frame.delta and await self._sleep(interval):
                return
            key = self.echoed_in_message.encode()
            if self.echo_key and key in frame.data:
                # The key split across two chunks, as a provider might happen to send it.
                split = frame.data.index(key) + len(key) // 2
                self.write(frame.data[:split])
                await self.flush()
                await asyncio.sleep(RESET_DELAY)
                frame = _Frame(frame.data[split:])
            self.write(frame.data)
            await self.flush()
        await self.finish()

    def _echoing(self, error_frame: bytes) -> bytes:
        """The in-band error event, with the key in its message when asked to echo it."""
        if not self.echo_key:
            return error_frame
        head, sep, data = error_frame.partition(b"data: ")
        event = json.loads(data)
        error = event.get("error", event)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            error["message"] += f" (the request was sent with key {self.echoed_in_message})"
        return head + sep + _compact(event).encode() + b"\n\n"


def _log_request(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    _log.debug("%d %s %s", handler.get_status(), request.method, request.uri)


class FakeProvider:
    """A fake Anthropic + OpenAI upstream on 127.0.0.1, served from a daemon thread."""

    #: What answers every request (a fake of another service extends it).
    handler_class: type[_Handler] = _Handler

    def __init__(
        self,
        accepted_keys: set[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        oauth_tokens: set[str] | None = None,
    ) -> None:
        self.accepted_keys = accepted_keys
        #: The Claude subscriptions' OAuth bearers the Anthropic side takes, and only them.
        self.oauth_tokens = oauth_tokens
        self.requests: list[RecordedRequest] = []
        self.url = ""
        self.openai_url = ""
        self.port = 0
        self._host = host
        self._port = port
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()

    # ---- lifecycle

    def start(self) -> FakeProvider:
        """Start serving; returns self once the server accepts connections."""
        if self._thread is not None:
            return self
        sockets = tornado.netutil.bind_sockets(self._port, self._host, family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://{self._host}:{self.port}"
        self.openai_url = self.url + "/v1"
        self._thread = threading.Thread(
            target=self._run, args=(sockets,), name=f"fake-provider-{self.port}", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._stop_event is None:
            self.stop()
            raise RuntimeError("fake provider failed to start")
        return self

    def stop(self) -> None:
        """Stop the server, close every connection and join the thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(10)
        self._thread = self._loop = self._stop_event = None
        self._ready.clear()

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(sockets))
        finally:
            self._ready.set()  # also when serving failed: start() must not wait in vain
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self, sockets: list[socket.socket]) -> None:
        app = tornado.web.Application(
            [(r"/.*", self.handler_class, {"provider": self})], log_function=_log_request
        )
        server = tornado.httpserver.HTTPServer(app, idle_connection_timeout=60)
        server.add_sockets(sockets)
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._ready.set()
        await self._stop_event.wait()
        server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), timeout=5)
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # ---- recording

    def clear(self) -> None:
        """Forget recorded requests (and with them their close events)."""
        with self._cond:
            self.requests.clear()

    def wait_closed(self, request_id: str, timeout: float) -> float | None:
        """Block until request `request_id` was closed by its client; its closed_at, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self.requests:
                    if record.id == request_id and record.closed_at is not None:
                        return record.closed_at
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def _record(self, record: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(record)
            self._cond.notify_all()

    def _mark_closed(self, record: RecordedRequest) -> None:
        with self._cond:
            if record.closed_at is None:
                record.closed_at = time.monotonic()
            self._cond.notify_all()

    def _mark_finished(self, record: RecordedRequest) -> None:
        with self._cond:
            record.finished_at = time.monotonic()
            self._cond.notify_all()


def main(argv: list[str] | None = None) -> None:
    """Run the fake provider in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--key", action="append", help="accepted API key (repeatable; default: any)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(message)s")
    provider = FakeProvider(set(args.key) if args.key else None, host=args.host, port=args.port)
    provider.start()
    print(
        f"fake provider: anthropic base URL {provider.url}, openai base URL {provider.openai_url}",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        provider.stop()


if __name__ == "__main__":
    main()
