"""A strict stand-in for Visdom Trace's stream ingestion (``StreamEventRequest``).

It validates every event as ``../shared/VISDOM.md`` gives the protocol and answers as
Visdom Trace does: ``{session_db_id, event_db_id, status: "ok"}``, 401 for a wrong
Bearer, 413 over 512 KB, 422 (``{"error": ...}``) for a malformed event. It keeps what
it stored the way the server keys it: sessions by (repo or project, session_id),
transcript chunks by (session, chunk index) (a chunk sent again with the same content
is a no-op, with different content an error), tool events deduplicated by
``event_uuid`` and by (session_id, tool_use_id, hook_event_name). Tests read
``problems`` (every protocol breach seen: it must stay empty), make it refuse some
events (``refuse``), or stop it and start it again on the same port.

Credentials are checked as Visdom Trace's extractor does: the org ingest key, or a user
token the login stand-in (tests/fake_visdom.py, ``login``) issued and still honours (a
session not revoked, an access token signed and unexpired); anything else is a
text/plain 401. ``delivered_with`` says which credential each stored event came with
("org", or the Visdom Trace user id). ``misbehave`` makes it answer an event in a
hostile way (tests of the pusher's bounds), ``hold`` keeps an answer back (the event
stored) until the test releases it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import tornado.iostream
import tornado.web

from tests.fake_visdom import FakeVisdom
from tests.served import ServedApp

MAX_BODY = 512 * 1024
TOOLS = {"claude-code", "codex", "gsd", "opencode"}
EVENT_TYPES = {"tool_use", "transcript", "session_start", "session_end", "verification_phase_start"}
FINAL_STATS = (
    "duration_ms",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "user_messages",
    "assistant_messages",
    "total_tool_calls",
)
KNOWN_FIELDS = {
    "protocol_version", "tool", "event_type", "session_id", "timestamp", "hook_event_name",
    "tool_name", "tool_use_id", "tool_input", "tool_response", "tool_is_error", "event_uuid",
    "event_index", "transcript_lines", "transcript_offset", "model", "cwd", "final_stats",
    "flow_id", "labels", "params",
}  # fmt: skip
CONTENT_TYPES = {"text", "thinking", "tool_use", "tool_result", "image", "document"}


@dataclass
class Session:
    key: tuple[str, str]
    db_id: int
    tool: str
    chunks: dict[int, bytes] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    final_stats: dict[str, int] | None = None

    def lines(self) -> list[dict[str, Any]]:
        """The transcript in chunk order (gaps are a problem the stand-in records)."""
        return [orjson.loads(self.chunks[i]) for i in sorted(self.chunks)]

    def tool_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event_type"] == "tool_use"]


def _is_rfc3339(value: object) -> bool:
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)", value
    ):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _is_uuid7(value: object) -> bool:
    try:
        parsed = uuid.UUID(str(value))
    except ValueError:
        return False
    return parsed.version == 7 and parsed.variant == uuid.RFC_4122 and str(parsed) == value


def check_line(line: object) -> list[str]:
    """What is wrong with one transcript line (a Claude Code JSONL record)."""
    if not isinstance(line, dict):
        return ["a transcript line is not an object"]
    wrong = []
    if line.get("type") not in ("user", "assistant"):
        wrong.append(f"line type {line.get('type')!r}")
    if not _is_rfc3339(line.get("timestamp")):
        wrong.append(f"line timestamp {line.get('timestamp')!r}")
    message = line.get("message")
    if not isinstance(message, dict):
        return [*wrong, "line without message"]
    if message.get("role") != line.get("type"):
        wrong.append("message.role differs from the line's type")
    content = message.get("content")
    if not isinstance(content, list):
        wrong.append("message.content is not a list")
    else:
        for block in content:
            if not isinstance(block, dict) or block.get("type") not in CONTENT_TYPES:
                wrong.append(f"content block {str(block)[:80]}")
            elif block["type"] == "tool_use" and not (
                isinstance(block.get("name"), str) and isinstance(block.get("id"), str)
            ):
                wrong.append("tool_use block without name or id")
    if line.get("type") == "assistant":
        if not isinstance(message.get("id"), str) or not isinstance(message.get("model"), str):
            wrong.append("assistant message without id or model")
        usage = message.get("usage")
        names = (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        )
        if not isinstance(usage, dict) or not all(
            isinstance(usage.get(n), int) and usage[n] >= 0 for n in names
        ):
            wrong.append(f"assistant usage {usage!r}")
    return wrong


def check_event(event: object) -> list[str]:
    """What is wrong with one ``StreamEventRequest``, field by field."""
    if not isinstance(event, dict):
        return ["the body is not a JSON object"]
    wrong = [f"unknown field {name}" for name in event if name not in KNOWN_FIELDS]
    if event.get("protocol_version") not in (1, 2) or isinstance(
        event.get("protocol_version"), bool
    ):
        wrong.append(f"protocol_version {event.get('protocol_version')!r}")
    if event.get("tool") not in TOOLS:
        wrong.append(f"tool {event.get('tool')!r}")
    kind = event.get("event_type")
    if kind not in EVENT_TYPES:
        wrong.append(f"event_type {kind!r}")
    if not isinstance(event.get("session_id"), str) or not event["session_id"]:
        wrong.append("session_id")
    if not _is_rfc3339(event.get("timestamp")):
        wrong.append(f"timestamp {event.get('timestamp')!r}")
    for name in ("hook_event_name", "model", "cwd", "tool_name", "tool_use_id", "flow_id"):
        if name in event and not isinstance(event[name], str):
            wrong.append(f"{name} is not a string")
    if event.get("event_index") is not None:
        wrong.append("event_index must be null")
    if "event_uuid" in event and not _is_uuid7(event["event_uuid"]):
        wrong.append(f"event_uuid {event['event_uuid']!r} is not a UUIDv7")
    if "params" in event and not (
        isinstance(event["params"], dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in event["params"].items())
    ):
        wrong.append("params is not {string: string}")
    if kind == "tool_use":
        if "event_uuid" not in event:
            wrong.append("tool_use without event_uuid")
        if event.get("hook_event_name") not in ("PreToolUse", "PostToolUse"):
            wrong.append(f"tool_use hook_event_name {event.get('hook_event_name')!r}")
        for name in ("tool_name", "tool_use_id"):
            if not isinstance(event.get(name), str) or not event[name]:
                wrong.append(f"tool_use without {name}")
        if event.get("hook_event_name") == "PostToolUse" and not isinstance(
            event.get("tool_is_error"), bool
        ):
            wrong.append("PostToolUse without a boolean tool_is_error")
    if kind == "transcript":
        lines = event.get("transcript_lines")
        offset = event.get("transcript_offset")
        if not isinstance(lines, list) or not lines:
            wrong.append("transcript without transcript_lines")
        else:
            for line in lines:
                wrong.extend(check_line(line))
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            wrong.append(f"transcript_offset {offset!r}")
    if kind == "session_end":
        stats = event.get("final_stats")
        if not isinstance(stats, dict) or set(stats) != set(FINAL_STATS):
            wrong.append(f"final_stats {stats!r}")
        elif not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in stats.values()
        ):
            wrong.append(f"final_stats values {stats!r}")
    return wrong


class _StreamHandler(tornado.web.RequestHandler):
    @property
    def fake(self) -> FakeVisdomIngest:
        fake: FakeVisdomIngest = self.application.settings["fake"]
        return fake

    def answer(self, status: int, document: Any, plain: bool = False) -> None:
        self.set_status(status)
        if plain:
            self.set_header("Content-Type", "text/plain")
            self.finish(str(document))
            return
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(document))

    def initialize(self, kind: str) -> None:
        self.kind = kind

    async def post(self, scope: str) -> None:
        fake = self.fake
        hostile = fake.misbehave(self.request) if fake.misbehave is not None else None
        if hostile is not None:
            with fake.lock:
                fake.hostile_answers[hostile] += 1
            await HOSTILE[hostile](self)
            return
        status = fake.answer_post(self, self.kind, scope)
        with fake.lock:
            fake.answers[status] += 1

    async def drip(self) -> None:
        """A 200 whose body never ends: a byte a second, until the client goes."""
        self.set_header("Content-Type", "application/json")
        self.write(b'{"status": ')
        try:
            while True:
                await self.flush()
                await asyncio.sleep(1)
                self.write(b" ")
        except tornado.iostream.StreamClosedError:
            return


async def _huge(handler: _StreamHandler) -> None:
    """A 200 with a 10 MB body."""
    handler.set_header("Content-Type", "application/json")
    handler.finish(b'{"status": "ok", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}')


async def _redirect(handler: _StreamHandler) -> None:
    handler.redirect(handler.fake.redirect_to + handler.request.path, status=307)


async def _html(handler: _StreamHandler) -> None:
    """A sign-in page in front of the server (a proxy's), answering 200."""
    handler.set_header("Content-Type", "text/html; charset=utf-8")
    handler.finish(b"<html><body><form>Sign in</form></body></html>")


#: The hostile answers ``misbehave`` can pick.
HOSTILE = {
    "huge": _huge,
    "drip": _StreamHandler.drip,
    "redirect": _redirect,
    "html": _html,
}


class FakeVisdomIngest:
    def __init__(self, key: str, login: FakeVisdom | None = None) -> None:
        self.key = key
        #: The login stand-in whose user tokens are taken too.
        self.login = login
        self._served = ServedApp("fake-visdom-ingest")
        self.port = self._served.port
        self.url = self._served.url
        self.lock = threading.Lock()
        self.sessions: dict[tuple[str, str], Session] = {}
        #: Every breach of the protocol seen; a test asserts it stays empty.
        self.problems: list[str] = []
        #: (path, headers, event) of every POST that passed the checks.
        self.received: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.answers: Counter[int] = Counter()
        self.largest = 0
        #: Events for which refuse(event) returns a status are answered with it.
        self.refuse: Any = None
        #: (credential, event) of every event stored: "org" for the org key, else the
        #: Visdom Trace user id of the token it came with.
        self.delivered_with: list[tuple[str, dict[str, Any]]] = []
        #: Requests for which misbehave(request) names a HOSTILE answer get it.
        self.misbehave: Any = None
        self.hostile_answers: Counter[str] = Counter()
        #: Where the "redirect" answer points.
        self.redirect_to = ""
        #: Events for which hold(event) is true are stored, then answered only once
        #: ``released`` is set (a POST in flight, for a kill in the middle of a push).
        self.hold: Any = None
        self.held = threading.Event()
        self.released = threading.Event()
        self._uuids: dict[str, bytes] = {}
        self._tool_keys: set[tuple[str, str, str]] = set()
        self._next_id = 0

    # --- the endpoint ---

    def answer_post(self, handler: _StreamHandler, kind: str, scope: str) -> int:
        """Check and store one POST; the status answered."""
        request = handler.request
        credential = self.credential_of(request.headers.get("Authorization", ""))
        if credential is None:
            handler.answer(401, "Invalid or expired token", plain=True)
            return 401
        body = request.body
        with self.lock:
            self.largest = max(self.largest, len(body))
        if len(body) > MAX_BODY:
            self._problem(f"a POST of {len(body)} bytes, over 512 KB")
            handler.answer(413, {"error": "payload too large"})
            return 413
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._problem("a body that is not JSON")
            handler.answer(422, {"error": "invalid JSON"})
            return 422
        if (
            kind == "projects"
            and request.headers.get("x-tracevault-project-attribution") != "derived"
        ):
            self._problem("a project stream POST without x-tracevault-project-attribution: derived")
        wrong = check_event(event)
        if wrong:
            self._problem(f"{event.get('event_type')}: {'; '.join(wrong)}")
            handler.answer(422, {"error": "; ".join(wrong)})
            return 422
        if self.refuse is not None:
            status = self.refuse(event)
            if status:
                handler.answer(status, {"error": f"refused by the test ({status})"})
                return int(status)
        with self.lock:
            session_id, event_id, error = self._store(f"{kind}:{scope}", event, body)
        if error:
            handler.answer(422, {"error": error})
            return 422
        with self.lock:
            self.received.append((request.path, dict(request.headers), event))
            self.delivered_with.append((credential, event))
        if self.hold is not None and self.hold(event):
            self.held.set()
            # Answered later, or never: the gateway is killed before it reads an answer.
            self.released.wait(120)
        handler.answer(200, {"session_db_id": session_id, "event_db_id": event_id, "status": "ok"})
        return 200

    def credential_of(self, authorization: str) -> str | None:
        """ "org" for the org key, the user id for a user token the login stand-in honours."""
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token:
            return None
        if token == self.key:
            return "org"
        person = self.login.person_of(token) if self.login is not None else None
        return person.user_id if person is not None else None

    def credentials(self, session_id: str) -> list[str]:
        """The credential each stored event of a session came with, in order."""
        with self.lock:
            return [who for who, e in self.delivered_with if e["session_id"] == session_id]

    def _problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def _store(self, scope: str, event: dict[str, Any], body: bytes) -> tuple[int, int | None, str]:
        key = (scope, event["session_id"])
        session = self.sessions.get(key)
        if session is None:
            self._next_id += 1
            session = self.sessions[key] = Session(key, self._next_id, event["tool"])
        kind = event["event_type"]
        if kind == "transcript":
            for index, line in enumerate(event["transcript_lines"]):
                chunk = orjson.dumps(line)
                at = event["transcript_offset"] + index
                if at in session.chunks and session.chunks[at] != chunk:
                    self.problems.append(f"chunk {at} of {key} sent again with other content")
                    return session.db_id, None, f"chunk {at} differs"
                session.chunks[at] = chunk
            session.events.append(event)
            return session.db_id, None, ""
        uid = event.get("event_uuid")
        if isinstance(uid, str):
            if uid in self._uuids:
                if self._uuids[uid] != body:
                    self.problems.append(f"event_uuid {uid} sent again with other content")
                return session.db_id, None, ""  # a duplicate: dedup, not stored again
            self._uuids[uid] = body
        if kind == "tool_use":
            dedup = (event["session_id"], event["tool_use_id"], event["hook_event_name"])
            if dedup in self._tool_keys:
                return session.db_id, None, ""
            self._tool_keys.add(dedup)
        if kind == "session_end":
            session.ended = True
            session.final_stats = event["final_stats"]
        session.events.append(event)
        self._next_id += 1
        return session.db_id, self._next_id, ""

    # --- what tests read ---

    def gaps(self) -> list[str]:
        """Sessions whose chunks are not 0..n-1."""
        with self.lock:
            return [
                f"{key}: chunks {sorted(s.chunks)}"
                for key, s in self.sessions.items()
                if sorted(s.chunks) != list(range(len(s.chunks)))
            ]

    def session(self, session_id: str) -> Session:
        with self.lock:
            found = [s for (_scope, sid), s in self.sessions.items() if sid == session_id]
        assert len(found) == 1, f"{len(found)} sessions {session_id!r}: {list(self.sessions)}"
        return found[0]

    # --- lifecycle ---

    def start(self) -> FakeVisdomIngest:
        self._served.start(
            [
                (
                    r"/api/v1/(?:orgs/[^/]+/)?repos/([^/]+)/stream",
                    _StreamHandler,
                    {"kind": "repos"},
                ),
                (r"/api/v1/projects/([^/]+)/stream", _StreamHandler, {"kind": "projects"}),
            ],
            max_body_size=4 * MAX_BODY,
            fake=self,
        )
        return self

    def stop(self) -> None:
        """Stop listening and drop connections: Visdom Trace is down until start()."""
        self._served.stop()
