"""The serving process's side of its trace writer process: traces out, acks and counters in.

The trace writer runs in a process of its own (:mod:`tvgate.traces.child`), so that its
batches (splitting, redaction, hashing, SQL) never take the GIL from the IOLoop.
:meth:`WriterClient.submit` keeps the request path's interface: it serialises the row
and the body (:func:`~tvgate.traces.frames.trace_frame`, a few µs) and writes the frame
to a non-blocking socketpair; what the kernel does not take at once is written when
the IOLoop says the socket is writable. Nothing here ever blocks the loop. For the CPU,
the writer process waits behind this one (SCHED_IDLE) while it keeps up, and is raised
(SCHED_BATCH, nice 10) when its traces wait and for the drain (:mod:`tvgate.traces.schedule`).

Each frame carries a sequence number and is kept until the writer process acknowledges
it (it acks once a trace is in the database or the spool). When that process dies
(kill -9, a crash), this one sees its socket end: readiness says so
(``trace_writer.running`` false: 503) and ``tvgate_trace_writer_up`` is 0 until a new
one, started after ``RESTART_DELAY`` (``tvgate_trace_writer_restarts_total`` + 1), has
reported; every frame not acknowledged is sent again (inserts are idempotent by trace
id: a resend never duplicates). The frames kept are bounded like the writer's queue:
``queue_size`` traces (past it, counted ``queue_full``) and, with the bodies the writer
holds, ``body_budget`` bytes of bodies (past it, a trace is sent without its body).

The counters shown (written, dropped, spool size, held bodies, ...) come from the
writer process's ``STATS`` frames, added to those of the processes before it. Keys'
plaintexts this process holds are sent to it (never logged, never spooled): each one
the decrypted-key cache gains, before the next trace; those its held bodies wait for,
as soon as they are at hand (the gateway decrypts the others, off the loop, and they
follow); and the local keyring's master key, so that it reads local ciphertexts as
this process would.

A stop (:meth:`WriterClient.stop`, off the loop after the drain) sends ``STOP`` behind
every frame and waits for the writer process to write or spool all of them and exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from tornado.ioloop import IOLoop, PeriodicCallback

from tvgate.keyring import KeyContext, KeyringError, PlaintextCache
from tvgate.keyring.local import LocalKeyring
from tvgate.traces import frames, schedule
from tvgate.traces.child import CONFIG_ENV
from tvgate.traces.rows import DROP_REASONS, CapturedBody, TraceRow, WriterStats
from tvgate.traces.spool import count_lines

log = logging.getLogger("tvgate.traces")

#: How long after a writer process died the next one is started.
RESTART_DELAY = 0.5
#: The counters a writer process reports, added up over the processes of a worker.
_COUNTERS = (
    "written",
    "spooled",
    "bodies_dropped",
    "failures",
    "restarts",
    "spool_errors",
    "otlp_dropped",
)
#: How often the writer process is told this process's clock (its watermark follows it).
CLOCK_INTERVAL = 0.5
#: How much longer than the writer process's own stop a stop waits for it.
_STOP_GRACE = 10.0
#: PostgreSQL's ``bigint`` (orjson writes no wider integer): a value past it becomes 0.
_INT64 = 2**63


@dataclass(frozen=True)
class WriterConfig:
    """What the writer process needs (sent in its environment, never in its arguments:
    the database URL may hold a password)."""

    database_url: str
    spool_dir: str
    worker: int
    queue_size: int
    batch_size: int
    settings_ttl: float
    body_budget: int
    db_idle_timeout: float
    db_max_age: float
    log_level: str
    #: Where the writer process exports spans (empty: none), with what headers, how long.
    otlp_endpoint: str = ""
    otlp_headers: str = ""
    otlp_timeout: float = 10.0


class _Gauge:
    """A gauge the writer process reports, read by the name it has on the client (0 until
    the first report)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, client: WriterClient, owner: type | None = None) -> int:
        return int(client._gauges.get(self.name, 0))


class WriterClient:
    def __init__(
        self, config: WriterConfig, keys: PlaintextCache, local: LocalKeyring | None = None
    ) -> None:
        self.config = config
        self.queue_size = config.queue_size
        self.body_budget = config.body_budget
        self.keys = keys
        self.local = local
        #: Every counter, as shown: this process's, the writer processes' gone, the current one's.
        self.stats = WriterStats()
        self._base = WriterStats()
        self._reported: dict[str, Any] = {"dropped_by": dict.fromkeys(DROP_REASONS, 0)}
        self._gauges: dict[str, Any] = {}
        self._wanted: list[tuple[str, KeyContext]] = []
        #: Frames not acknowledged: (sequence number, frame, body bytes), oldest first.
        self._unacked: deque[tuple[int, bytes, int]] = deque()
        self._unacked_body_bytes = 0
        #: The last trace sent, the last the writer process took from its queue (those
        #: after it wait there: the queue's bound), the last it acknowledged.
        self._seq = self._taken = self._acked = 0
        self._loop: IOLoop | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._out: deque[memoryview] = deque()
        self._in = bytearray()
        #: The writer process has reported since it started (readiness).
        self._up = False
        #: Set once the first writer process has reported (``wait_up``).
        self._first_up = asyncio.Event()
        self._done = False
        self._stopping = False
        self._stopped: asyncio.Future[None] | None = None
        self._sent_keys: set[tuple[int, str]] = set()
        self._keys_stored = -1
        #: Its scheduling (tvgate.traces.schedule): idle while it keeps up.
        self._idle_allowed = schedule.may_leave_idle()
        self._priority = schedule.WriterPriority(None, idle_allowed=False)
        self._stall_check: PeriodicCallback | None = None
        self._clock: PeriodicCallback | None = None
        self._acked_at_check = 0
        #: Times a writer process was raised from SCHED_IDLE because its traces waited.
        self.raises = 0

    # --- what the gateway reads ---

    @property
    def depth(self) -> int:
        """Traces waiting for the writer process to take them."""
        return self._seq - self._taken

    @property
    def backlog(self) -> int:
        """Traces sent and not acknowledged yet (not in the database nor the spool)."""
        return len(self._unacked)

    @property
    def running(self) -> bool:
        """The writer process runs and has reported, its writer's thread alive (readiness
        reports it)."""
        return self._up and bool(self._gauges.get("running"))

    held = _Gauge()
    held_bodies = _Gauge()
    spool_size = _Gauge()
    capture_stored_bytes = _Gauge()
    capture_scanned_bytes = _Gauge()

    @property
    def pid(self) -> int | None:
        """The writer process's id (the benchmark reads its memory)."""
        return self._proc.pid if self._proc is not None else None

    def wanted_keys(self) -> list[tuple[str, KeyContext]]:
        """The keys whose plaintext the writer's held bodies wait for (the gateway warms them)."""
        return list(self._wanted)

    def settings_changed(self, org_id: int) -> None:
        """An org's policy or keys changed (``tvgate.services`` announced it): the writer
        process reads its capture settings again before its next trace. Call on the IOLoop;
        a writer process started later reads them afresh anyway."""
        self._send(frames.changed_frame(org_id))

    # --- the request path (IOLoop thread) ---

    def submit(self, row: TraceRow, body: CapturedBody | None = None) -> None:
        """Send a trace to the writer process; never blocks."""
        if self._seq - self._taken >= self.queue_size:
            self._base.dropped_by["queue_full"] += 1
            self._merge()
            log.error("trace queue full; trace %s dropped", row.get("id"))
            return
        size = 0 if body is None else body.size
        if size:
            held = int(self._gauges.get("held_body_bytes", 0))
            if self._unacked_body_bytes + held + size > self.body_budget:
                self._base.bodies_dropped += 1
                body, size = None, 0
        if self.keys.stored != self._keys_stored:
            self._push_keys()
        self._seq += 1
        try:
            data = frames.trace_frame(self._seq, row, body)
        except TypeError:
            # An integer past 64 bits (a hostile provider's usage): JSON holds no such
            # number; the row would have it set to 0 before the insert anyway.
            try:
                data = frames.trace_frame(self._seq, _fit_integers(row), body)
            except TypeError as exc:  # a value no JSON holds: nowhere to send it
                self._base.dropped_by["writer_error"] += 1
                self._merge()
                log.error("trace %s lost: it cannot be serialised (%s)", row.get("id"), exc)
                return
        self._unacked.append((self._seq, data, size))
        self._unacked_body_bytes += size
        if self._priority.idle and len(self._unacked) >= schedule.RAISE_BACKLOG:
            self._raise()
        self._send(data)

    # --- the writer process ---

    def start(self) -> None:
        """Start the writer process. Call on the IOLoop."""
        self._loop = IOLoop.current()
        # Counted before it reports, so that readiness tells at once (as it will).
        dead_letters = Path(self.config.spool_dir) / f"traces.deadletter.{self.config.worker}"
        self.stats.dead_letters = count_lines(dead_letters)
        self._spawn()
        self._stall_check = PeriodicCallback(self._check_stall, schedule.STALL_SECONDS * 1000)
        self._stall_check.start()
        self._clock = PeriodicCallback(self._send_clock, CLOCK_INTERVAL * 1000)
        self._clock.start()

    def _send_clock(self) -> None:
        """Behind every trace sent so far: each call that ended before now was recorded (and
        sent) on this loop already, so the writer may say it holds all of them."""
        self._send(frames.clock_frame(time.time()))

    async def wait_up(self, timeout: float) -> bool:
        """Wait until the first writer process has reported, or ``timeout`` seconds; True
        when it has. A worker waits for it before it serves, so that a gateway that
        answers is ready (its calls' traces would wait safely in the meantime anyway)."""
        try:
            await asyncio.wait_for(self._first_up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env[CONFIG_ENV] = orjson.dumps(dataclasses.asdict(self.config)).decode()
        # A fresh interpreter (fork and exec), never a fork of this threaded process.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tvgate.traces.child"],
            stdin=theirs.fileno(),
            env=env,
            close_fds=True,
        )
        theirs.close()
        # It starts at SCHED_BATCH; put behind the serving process once it has reported.
        self._priority = schedule.WriterPriority(self._proc.pid, idle_allowed=self._idle_allowed)
        ours.setblocking(False)
        self._sock, self._out, self._in = ours, deque(), bytearray()
        self._up = self._done = False
        self._sent_keys, self._keys_stored = set(), -1
        # What was not acknowledged is sent again: it waits in the new queue.
        self._taken = self._acked
        self._reported = {"dropped_by": dict.fromkeys(DROP_REASONS, 0)}
        assert self._loop is not None
        self._loop.add_handler(ours.fileno(), self._on_events, IOLoop.READ)
        if self.local is not None:
            self._send(frames.frame(frames.LOCAL, self.local.master_key))
        self._push_keys()
        for _, data, _ in self._unacked:
            self._send(data)
        if self._stopping:
            self._send(frames.frame(frames.STOP))

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return  # kept in _unacked: sent to the next writer process
        if not self._out:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the process is gone: the read side sees it
            if sent == len(data):
                return
            assert self._loop is not None
            self._loop.update_handler(sock.fileno(), IOLoop.READ | IOLoop.WRITE)
            data = data[sent:]
        self._out.append(memoryview(data))

    def _flush(self, sock: socket.socket) -> None:
        out = self._out
        while out:
            try:
                sent = sock.send(out[0])
            except BlockingIOError:
                return
            except OSError:
                out.clear()
                return
            if sent == len(out[0]):
                out.popleft()
            else:
                out[0] = out[0][sent:]
        assert self._loop is not None
        self._loop.update_handler(sock.fileno(), IOLoop.READ)

    def _on_events(self, fd: int, events: int) -> None:
        sock = self._sock
        if sock is None:
            return
        if events & IOLoop.WRITE:
            self._flush(sock)
        if events & (IOLoop.READ | IOLoop.ERROR):
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b""
                if not chunk:
                    self._read(b"")
                    self._gone()
                    return
                self._read(chunk)

    def _read(self, chunk: bytes) -> None:
        buffer = self._in
        buffer += chunk
        start = 0
        while len(buffer) - start >= frames.HEADER_SIZE:
            length, kind = frames.header(memoryview(buffer)[start:])
            end = start + frames.HEADER_SIZE + length
            if len(buffer) < end:
                break
            self._frame(kind, bytes(buffer[start + frames.HEADER_SIZE : end]))
            start = end
        del buffer[:start]

    def _frame(self, kind: int, payload: bytes) -> None:
        if kind == frames.ACK:
            self._on_ack(frames.read_ack(payload))
        elif kind in (frames.STATS, frames.DONE):
            document = orjson.loads(payload)
            self._reported = document["counters"]
            self._gauges = document["gauges"]
            self._taken = max(self._taken, int(self._gauges.get("taken", 0)))
            self._wanted = frames.read_wanted(document)
            self._merge()
            if not self._up:
                self._up = True
                self._first_up.set()
                log.info("trace writer process %d is up", self._proc.pid if self._proc else 0)
            self._done = kind == frames.DONE
            if self._priority.idle:
                if self.spool_size or self.held:
                    self._raise()  # a spool to replay (adopted, or left by an outage)
            else:
                self._pace()
            if self.keys.stored != self._keys_stored:
                self._push_keys()
            self._answer_wanted()

    def _on_ack(self, seq: int) -> None:
        self._acked = self._taken = max(self._acked, seq)
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            self._unacked_body_bytes -= unacked.popleft()[2]
        if not self._priority.idle:
            self._pace()

    # --- its scheduling (tvgate.traces.schedule) ---

    def _pace(self) -> None:
        """Caught up (or just up): behind the serving process again, unless stopping or
        it has work of its own (a spool to replay, traces held in memory)."""
        if (
            self._up
            and not self._stopping
            and len(self._unacked) <= schedule.LOWER_BACKLOG
            and not self.spool_size
            and not self.held
        ):
            self._priority.behind()

    def _check_stall(self) -> None:
        """Every ``STALL_SECONDS``: traces wait and none was acknowledged since the last
        look (a writer left without a core at SCHED_IDLE): raise it."""
        if self._priority.idle and self._unacked and self._acked == self._acked_at_check:
            self._raise()
        self._acked_at_check = self._acked

    def _raise(self) -> None:
        """Its traces wait: SCHED_BATCH until it caught up (counted: a gateway raising it
        all the time has no idle core for it)."""
        if self._priority.raised():
            self.raises += 1

    def _gone(self) -> None:
        """The writer process's socket ended: it stopped when told, or it died."""
        assert self._loop is not None and self._sock is not None
        self._loop.remove_handler(self._sock.fileno())
        self._sock.close()
        self._sock = None
        self._up = False
        # What it counted stays counted; its gauges go with it.
        self._add_to_base()
        proc = self._proc
        if self._done:
            self._loop.add_callback(self._reap, proc, restart=False)
            return
        self._base.restarts += 1
        lost_bodies = int(self._gauges.get("held_bodies", 0))
        self._base.bodies_dropped += lost_bodies
        self._gauges = {}
        self._merge()
        log.error(
            "the trace writer process died (%d traces not acknowledged, %d held bodies "
            "lost); starting it again",
            len(self._unacked),
            lost_bodies,
        )
        self._loop.add_callback(self._reap, proc, restart=True)

    async def _reap(self, proc: subprocess.Popen[bytes] | None, *, restart: bool) -> None:
        if proc is not None:
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
            if restart:
                log.error("the trace writer process exited with %s", _exit_status(code))
        if restart:
            await asyncio.sleep(RESTART_DELAY)
            self._spawn()
        elif self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # --- counters ---

    def _add_to_base(self) -> None:
        base, reported = self._base, self._reported
        for name in _COUNTERS:
            setattr(base, name, getattr(base, name) + int(reported.get(name, 0)))
        for reason, count in reported["dropped_by"].items():
            base.dropped_by[reason] = base.dropped_by.get(reason, 0) + count
        base.peak_depth = max(base.peak_depth, int(self._gauges.get("peak_depth", 0)))
        self._reported = {"dropped_by": dict.fromkeys(DROP_REASONS, 0)}

    def _merge(self) -> None:
        base, reported, gauges = self._base, self._reported, self._gauges
        stats = WriterStats(
            dropped_by={
                reason: count + int(reported["dropped_by"].get(reason, 0))
                for reason, count in base.dropped_by.items()
            },
            dead_letters=int(gauges.get("dead_letters", self.stats.dead_letters)),
            peak_depth=max(base.peak_depth, int(gauges.get("peak_depth", 0))),
            spool_error=gauges.get("spool_error"),
        )
        for name in _COUNTERS:
            setattr(stats, name, getattr(base, name) + int(reported.get(name, 0)))
        self.stats = stats

    # --- keys' plaintexts ---

    def _push_keys(self) -> None:
        """Send the plaintexts the decrypted-key cache gained since the last time."""
        self._keys_stored = self.keys.stored
        for (key_id, ciphertext), plaintext in self.keys.decrypted():
            if (key_id, ciphertext) not in self._sent_keys:
                self._sent_keys.add((key_id, ciphertext))
                self._send(frames.key_frame(key_id, ciphertext, plaintext))

    def _answer_wanted(self) -> None:
        """Send the keys held bodies wait for that are at hand (local, or cached)."""
        for ciphertext, context in self._wanted:
            ref = (context.key_id, ciphertext)
            if ref in self._sent_keys:
                continue
            try:
                plaintext = self.keys.at_hand(ciphertext, context)
            except KeyringError:
                plaintext = None  # it does not decrypt: the writer stops waiting for it
            else:
                if plaintext is None:
                    continue  # the gateway decrypts it (wanted_keys), then it is pushed
            self._sent_keys.add(ref)
            self._send(frames.key_frame(context.key_id, ciphertext, plaintext))

    # --- stop ---

    def stop(self, timeout: float = 60.0) -> None:
        """Have the writer process write or spool everything sent, then wait for it to
        exit. Call off the IOLoop (the drain runs it in the pool); on the loop thread it
        blocks the loop, for a process that serves no more."""
        loop = self._loop
        if loop is None:
            return
        if _on_loop(loop):
            self._stop_blocking(timeout)
            return
        stopping = asyncio.run_coroutine_threadsafe(self._stop(), loop.asyncio_loop)  # type: ignore[attr-defined]
        # Beyond the writer process's own wait for its thread (the same timeout), which it
        # reports before it exits.
        stopping.result(timeout + _STOP_GRACE)

    async def _stop(self) -> None:
        self._stopping = True
        self._drain_raised()
        self._stopped = asyncio.get_running_loop().create_future()
        self._send(frames.frame(frames.STOP))
        await self._stopped

    def _drain_raised(self) -> None:
        """At stop: the writer drains at SCHED_BATCH, not behind whatever else runs."""
        for periodic in (self._stall_check, self._clock):
            if periodic is not None:
                periodic.stop()
        self._priority.raised()

    def _stop_blocking(self, timeout: float) -> None:
        self._stopping = True
        self._drain_raised()
        sock, proc = self._sock, self._proc
        if sock is None or proc is None:
            return
        assert self._loop is not None
        self._loop.remove_handler(sock.fileno())
        sock.settimeout(timeout)
        try:
            for data in self._out:
                sock.sendall(data)
            sock.sendall(frames.frame(frames.STOP))
            while chunk := sock.recv(1 << 16):
                self._read(chunk)
        except OSError as exc:
            if exc.errno not in (None, errno.EPIPE, errno.ECONNRESET):
                raise
        sock.close()
        self._sock = None
        self._up = False
        proc.wait(timeout)


def _on_loop(loop: IOLoop) -> bool:
    try:
        return IOLoop.current(instance=False) is loop
    except RuntimeError:
        return False


def _fit_integers(row: TraceRow) -> TraceRow:
    """The row with each integer JSON cannot hold set to 0, and named in its anomalies."""
    fitted = dict(row)
    anomalies = list(row.get("anomalies") or ())
    for name, value in row.items():
        if isinstance(value, int) and not -_INT64 <= value < _INT64:
            fitted[name] = 0
            anomalies.append(f"{name} out of range")
    fitted["anomalies"] = anomalies
    return fitted


def _exit_status(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"
