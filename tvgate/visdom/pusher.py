"""The Visdom pusher: delivers each connected org's outbox to Visdom Trace, off the
request path, one process per org at a time (a lease in the org's ``VisdomSink`` row).

Every ``visdom_push_interval`` seconds, for each connected org whose lease it gets, a
process makes the events of the traces written since the org's cursor
(:func:`tvgate.visdom.outbox.plan`) and POSTs the outbox, oldest first, one event per
request. The Bearer is the event's user's own Visdom Trace credential when one is held
and unexpired (tvgate.visdom.credentials: the token their calls came with), else the
org ingest key; a 401 or 403 to a user's credential drops it and the same event goes
again with the org key at once. The answer decides:

* 2xx with Visdom Trace's answer (``{"status": "ok", ...}``): delivered, the row is
  deleted (a crash before that resends it: at least once, deduplicated by Visdom Trace
  on chunk index and ``event_uuid``);
* 429, 5xx, no whole answer within ``visdom_push_timeout`` or Visdom Trace away: the
  org's round stops and is retried with exponential backoff (1 s doubling to
  :data:`MAX_BACKOFF`), from the same event, so each session stays in order;
* another 4xx, a redirect (never followed: the credential goes where the admin said),
  a 2xx that is not Visdom Trace's answer (HTML, over :data:`MAX_ANSWER`): the event is
  parked with its error (``tvgate visdom status``), and the later events of its session
  wait behind it until an admin reconnects.

``outcomes`` counts each (the ``tvgate_visdom_events_total`` metric), ``sent_with`` the
credential each delivered event went with.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import Counter

import orjson
from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPInputError
from tornado.simple_httpclient import HTTPTimeoutError

from tvgate.config import Settings
from tvgate.db import DatabaseRunner
from tvgate.identity.oidc import bounded_client
from tvgate.keyring import Keyring, KeyringError
from tvgate.models import VisdomEvent, VisdomSink
from tvgate.services.visdom import ingest_context
from tvgate.traces.sink import PeriodicPusher
from tvgate.visdom import credentials, outbox

log = logging.getLogger("tvgate.visdom")

MAX_BACKOFF = 30.0
#: Most bytes of an ingestion answer read (``{session_db_id, event_db_id, status}``).
MAX_ANSWER = 64 * 1024
#: Outcomes counted, in the order the metric lists them.
OUTCOMES = ("sent", "retried", "parked")
#: Rounds of planning per org and tick, so one org's backlog does not hold the others.
_PLANS_PER_TICK = 10


class _Retry(Exception):
    """Visdom Trace did not take an event now; the org's round stops and backs off."""


class VisdomPusher(PeriodicPusher):
    def __init__(self, settings: Settings, runner: DatabaseRunner, keyring: Keyring) -> None:
        super().__init__(settings.visdom_push_interval)
        self.settings = settings
        self.runner = runner
        self.keyring = keyring
        self.outcomes: Counter[str] = Counter({name: 0 for name in OUTCOMES})
        #: Events delivered by the credential they went with: "user" or "org".
        self.sent_with: Counter[str] = Counter({"user": 0, "org": 0})
        self.http.close()
        # Never reads more of an answer than the bounded client takes.
        self.http = bounded_client()
        #: (org id, user id) -> a user's credential opened, for a key TTL.
        self._opened: dict[tuple[int, int], _UserCredential] = {}
        self._open_ttl = settings.key_cache_ttl
        #: org id -> (backoff seconds, monotonic time of the next try).
        self._backoff: dict[int, tuple[float, float]] = {}

    async def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            orgs = await self.runner.run(outbox.connected_orgs)
            for org_id in orgs:
                backoff, retry_at = self._backoff.get(org_id, (0.0, 0.0))
                if time.monotonic() < retry_at:
                    continue
                try:
                    await self._push_org(org_id)
                    self._backoff.pop(org_id, None)
                except Exception as exc:  # noqa: BLE001 - retried; it must never stop the gateway
                    backoff = min(MAX_BACKOFF, max(1.0, backoff * 2))
                    self._backoff[org_id] = (backoff, time.monotonic() + backoff)
                    log.warning(
                        "visdom push for org %d: %s; retrying in %.0f s", org_id, exc, backoff
                    )
        except Exception as exc:  # noqa: BLE001 - the database away: the next tick tries again
            log.warning("visdom push: %s", exc)
        finally:
            self._busy = False

    async def _push_org(self, org_id: int) -> None:
        now = time.time()
        sink = await self.runner.run(lambda: outbox.take_lease(org_id, self.holder, now))
        if sink is None:
            return
        idle = self.settings.visdom_idle_timeout
        for _ in range(_PLANS_PER_TICK):
            made = await self.runner.run(lambda: outbox.plan(org_id, self.holder, now, idle))
            if made < outbox.PLAN_BATCH:
                break
        key = ""
        after = 0
        while True:
            events = await self.runner.run(functools.partial(outbox.next_events, org_id, after))
            if not events:
                return
            if not key:
                # Only for a round that sends (a Vault keyring asks Vault each time).
                key = await self.runner.run(
                    functools.partial(self.keyring.decrypt, sink.ciphertext, ingest_context(org_id))
                )
            users = await self._user_credentials(org_id, events)
            parked_sessions: set[str] = set()
            done: list[int] = []
            by_user: list[int] = []
            try:
                for event in events:
                    after = event.id
                    if event.session_id in parked_sessions:
                        continue
                    outcome, error, user_id = await self._deliver(sink, key, event, users)
                    if outcome == "sent":
                        self.outcomes["sent"] += 1
                        self.sent_with["user" if user_id else "org"] += 1
                        done.append(event.id)
                        if user_id:
                            by_user.append(user_id)
                    elif outcome == "parked":
                        parked_sessions.add(event.session_id)
                        parked = await self.runner.run(
                            functools.partial(outbox.park, org_id, event.id, error, sink.ciphertext)
                        )
                        if parked:
                            self.outcomes["parked"] += 1
                            log.warning(
                                "visdom event %d of org %d parked: %s", event.id, org_id, error
                            )
                    else:
                        self.outcomes["retried"] += 1
                        await self.runner.run(
                            functools.partial(outbox.failed, org_id, event.id, error)
                        )
                        raise _Retry(error)
            finally:
                await self.runner.run(
                    functools.partial(outbox.delivered, org_id, done, by_user, time.time())
                )
            # Still ours? (A long round must not outlive its lease unseen.)
            renewed = await self.runner.run(
                lambda: outbox.take_lease(org_id, self.holder, time.time())
            )
            if renewed is None:
                return
            if renewed.ciphertext != sink.ciphertext:
                key = ""  # reconnected meanwhile: the new key
            sink = renewed

    async def _user_credentials(
        self, org_id: int, events: list[VisdomEvent]
    ) -> dict[int, _UserCredential]:
        """The users of these events whose own Visdom Trace credential is held and
        unexpired (expired ones are deleted), opened (a Vault keyring: once per key TTL)."""
        wanted = {event.user_id for event in events if event.user_id}
        rows = await self.runner.run(
            functools.partial(credentials.held, org_id, wanted, time.time())
        )
        opened: dict[int, _UserCredential] = {}
        for user_id, row in rows.items():
            cached = self._opened.get((org_id, user_id))
            if (
                cached is None
                or cached.ciphertext != row.ciphertext
                or cached.until < time.monotonic()
            ):
                context = credentials.user_context(org_id, user_id)
                try:
                    token = await self.runner.run(
                        functools.partial(self.keyring.decrypt, row.ciphertext, context)
                    )
                except KeyringError:
                    # Sealed by another keyring or tampered with: useless here; the org key.
                    log.warning("the Visdom Trace credential of user %d does not open", user_id)
                    continue
                cached = _UserCredential(
                    token, row.ciphertext, row.expires_at, time.monotonic() + self._open_ttl
                )
                self._opened[(org_id, user_id)] = cached
            opened[user_id] = dataclasses.replace(cached, expires_at=row.expires_at)
        for gone in [k for k in self._opened if k[0] == org_id and k[1] not in rows]:
            del self._opened[gone]
        return opened

    async def _deliver(
        self,
        sink: VisdomSink,
        key: str,
        event: VisdomEvent,
        users: dict[int, _UserCredential],
    ) -> tuple[str, str, int | None]:
        """Send one event with its user's credential when one is held and unexpired, else
        with the org key; a 401 or 403 to the user's credential drops it and sends the
        event again with the org key at once. The outcome, the error, and the user whose
        credential it went with (None: the org key)."""
        user_id = event.user_id
        held = users.get(user_id) if user_id else None
        if user_id and held is not None and held.expires_at > time.time():
            outcome, error, code = await self._send(sink, held.token, event)
            if code not in (401, 403):
                return outcome, error, user_id if outcome == "sent" else None
            del users[user_id]
            self._opened.pop((sink.org_id, user_id), None)
            await self.runner.run(
                functools.partial(credentials.refused, sink.org_id, user_id, held.ciphertext)
            )
            log.info(
                "Visdom Trace answered %d to the credential of user %d: dropped; their events "
                "go with the org key",
                code,
                user_id,
            )
        outcome, error, _code = await self._send(sink, key, event)
        return outcome, error, None

    async def _send(self, sink: VisdomSink, key: str, event: VisdomEvent) -> tuple[str, str, int]:
        """POST one event: its outcome (sent, parked or retried), the error if any, and the
        status Visdom Trace answered (0: no answer)."""
        target = outbox.stream_target(sink, event.repo)
        if target is None:
            return (
                "parked",
                "the session has no repo (x-tracevault-repo) and the org no --project",
                0,
            )
        url, headers = target
        answer = _Answer()
        timeout = self.settings.visdom_push_timeout
        request = HTTPRequest(
            url,
            method="POST",
            body=bytes(event.body),
            headers={
                **headers,
                "Content-Type": "application/json",
                "Authorization": f"Bearer {key}",
            },
            connect_timeout=min(10.0, timeout),
            request_timeout=timeout,
            # A redirect is refused, not followed: the credential goes to the URL an admin set.
            follow_redirects=False,
            header_callback=answer.header,
            streaming_callback=answer.take,
        )
        try:
            response = await self.http.fetch(request, raise_error=False)
            code = response.code
        except Exception as exc:  # noqa: BLE001 - away, refused, reset, timed out: retried
            if not answer.too_big:
                if isinstance(exc, HTTPTimeoutError):
                    why = f"did not answer within {timeout:g} s"
                else:
                    why = f"unreachable: {type(exc).__name__}: {exc}"
                return "retried", f"Visdom Trace {why}", answer.code
            code = answer.code
        return _judge(code, answer)


def _judge(code: int, answer: _Answer) -> tuple[str, str, int]:
    """What Visdom Trace's answer means for the event (see the module)."""
    if code == 429 or code >= 500:
        return "retried", f"Visdom Trace answered {code}: {answer.text()}", code
    if answer.too_big:
        return (
            "parked",
            f"Visdom Trace answered {code} with more than {MAX_ANSWER // 1024} KiB, which is "
            "not its ingestion answer: is the URL Visdom Trace's?",
            code,
        )
    if 200 <= code < 300:
        if answer.is_ingest_answer():
            return "sent", "", code
        return (
            "parked",
            f"Visdom Trace answered {code} with {answer.content_type or 'no content type'}, "
            f'not its ingestion answer ({{"status": "ok"}}): is the URL Visdom Trace\'s? '
            f"{answer.text()}",
            code,
        )
    if 300 <= code < 400:
        return (
            "parked",
            f"Visdom Trace answered {code}, a redirect to {_printable(answer.location)[:200]}: "
            "tvgate does not follow redirects with a credential; connect with the URL "
            "Visdom Trace answers at",
            code,
        )
    return "parked", f"Visdom Trace answered {code}: {answer.text()}", code


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text).strip()


class _Answer:
    """What is read of an ingestion answer: its status line, a few headers and its first
    MAX_ANSWER bytes. Reading stops there (the connection is dropped): a hostile server's
    10 MB answer costs MAX_ANSWER of memory and no more time than it takes to send that."""

    def __init__(self) -> None:
        self.code = 0
        self.content_type = ""
        self.location = ""
        self.body = bytearray()
        self.too_big = False

    def header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            parts = line.split(" ", 2)
            self.code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            return
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-type":
            self.content_type = _printable(value)[:100]
        elif name == "location":
            self.location = value
        elif name == "content-length" and value.isdigit() and int(value) > MAX_ANSWER:
            self.too_big = True

    def take(self, chunk: bytes) -> None:
        if self.too_big or len(self.body) + len(chunk) > MAX_ANSWER:
            self.too_big = True
            # Ends the read: the HTTP client drops the connection (Tornado passes this on).
            raise HTTPInputError("answer too large")
        self.body += chunk

    def is_ingest_answer(self) -> bool:
        try:
            document = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return False
        return isinstance(document, dict) and document.get("status") == "ok"

    def text(self) -> str:
        return _printable(bytes(self.body[:300]).decode("utf-8", errors="replace"))


@dataclasses.dataclass(frozen=True, slots=True)
class _UserCredential:
    """A user's Visdom Trace credential, opened: in this process's memory only."""

    token: str = dataclasses.field(repr=False)
    ciphertext: str = dataclasses.field(repr=False)
    expires_at: float
    #: Monotonic time until which it is used without opening it again.
    until: float
