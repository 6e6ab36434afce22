"""The trace writer process: ``python -m tvgate.traces.child``, one per serving process.

The serving process starts it (a fresh interpreter, not a fork) with one end of a
socketpair as its standard input and its settings in ``TVGATE_WRITER_CONFIG`` (JSON).
It runs a :class:`~tvgate.traces.writer.TraceWriter`, fed with the traces read from
the socket (:mod:`tvgate.traces.frames`), and tells the serving process, over the same
socket, up to which trace everything is in the database or the spool (``ACK``) and
its counters (``STATS``, with each ack and every ``STATS_INTERVAL``).

It stops when told (``STOP``) or when the serving process is gone (the socket ends:
a kill -9 of the worker): either way it writes or spools every trace it has read, so a
dead worker loses only the traces it had not handed to the kernel yet. It ignores
SIGINT, SIGTERM and SIGHUP (a terminal's, sent to the whole group): a stop is the
serving process's to give, after its own drain.

The redaction keys: the plaintexts the serving process has decrypted (``KEY``), and
local ciphertexts read with the local keyring's master key (``LOCAL``), as that process
would read them itself; the writer never asks a key store anything.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from tvgate.config import otlp_header_pairs
from tvgate.db import ConnectionAge, open_database
from tvgate.keyring import LOCAL_PREFIX, KeyContext, KeyringError
from tvgate.keyring.local import LocalKeyring
from tvgate.logformat import JsonFormatter
from tvgate.traces import frames, schedule
from tvgate.traces.writer import TraceWriter

if TYPE_CHECKING:
    from tvgate.traces.otlp import SpanExport

log = logging.getLogger("tvgate.traces")

#: How often the writer process reports its counters.
STATS_INTERVAL = 0.25
#: The environment variable holding the writer's settings.
CONFIG_ENV = "TVGATE_WRITER_CONFIG"
_UNREADABLE = object()


class SentPlaintexts:
    """The keys' plaintexts the serving process sent, and the local keyring if it has one
    (:class:`~tvgate.traces.store.KnownPlaintexts`)."""

    def __init__(self) -> None:
        self._plaintexts: dict[tuple[int, str], object] = {}
        self.local: LocalKeyring | None = None

    def learn(self, key_id: int, ciphertext: str, plaintext: str | None) -> None:
        self._plaintexts[(key_id, ciphertext)] = _UNREADABLE if plaintext is None else plaintext

    def at_hand(self, ciphertext: str, context: KeyContext) -> str | None:
        known = self._plaintexts.get((context.key_id, ciphertext))
        if known is _UNREADABLE:
            raise KeyringError("key ciphertext does not decrypt for this key")
        if isinstance(known, str):
            return known
        if self.local is not None and ciphertext.startswith(LOCAL_PREFIX):
            return self.local.decrypt(ciphertext, context)
        return None


class Reporter:
    """What the writer process says to the serving process: acks and counters, sent by
    the writer's thread (acks) and this one's (counters), one frame at a time."""

    def __init__(self, sock: socket.socket, writer: TraceWriter) -> None:
        self.sock = sock
        self.writer = writer
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self.gone = False

    def send(self, make: Callable[[], bytes]) -> None:
        """Send what ``make`` returns, made under the lock: counters read by one thread
        never overtake those read later by the other."""
        with self._lock:
            if self.gone:
                return
            try:
                self.sock.sendall(make())
            except OSError:
                self.gone = True  # the serving process is gone: the stop follows from it

    def ack(self, seq: int) -> None:
        """Acknowledge, with the counters of the batch just written (held bodies and
        all): what a reader of the database finds, readiness shows."""
        self.send(lambda: frames.ack_frame(seq) + self._stats(frames.STATS))

    def stats(self, kind: int = frames.STATS) -> None:
        self.send(lambda: self._stats(kind))

    def _stats(self, kind: int) -> bytes:
        writer = self.writer
        gauges = {
            "depth": writer.depth,
            "held": writer.held,
            "held_bodies": writer.held_bodies,
            "held_body_bytes": writer.holding.held_body_bytes,
            "taken": writer.taken_seq,
            "spool_size": writer.spool_size,
            "capture_stored_bytes": writer.capture_stored_bytes,
            "capture_scanned_bytes": writer.capture_scanned_bytes,
            "slot": writer.spool.slot,
            "running": writer.running,
        }
        document = frames.stats_document(writer.stats, gauges, writer.wanted_keys())
        return frames.frame(kind, document)

    def run(self) -> None:
        while not self._done.is_set():
            self.stats()
            self._wake.wait(STATS_INTERVAL)
            self._wake.clear()

    def finish(self) -> None:
        self._done.set()
        self._wake.set()


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes from the serving process, or None once it is gone: the end of the
    socket, or a reset (it died, or exited with our acknowledgements unread in its
    buffer), which ends the frames as an end does, not the writer with a traceback."""
    chunks = []
    while size:
        try:
            chunk = sock.recv(min(size, 1 << 20))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def serve(
    sock: socket.socket,
    writer: TraceWriter,
    keys: SentPlaintexts,
    spans: SpanExport | None = None,
) -> bool:
    """Read frames until ``STOP`` (True) or the end of the socket (False)."""
    reporter = Reporter(sock, writer)
    writer.on_progress = reporter.ack
    writer.start()
    thread = threading.Thread(target=reporter.run, name="tvgate-writer-reporter", daemon=True)
    thread.start()
    told = False
    while True:
        head = _read_exactly(sock, frames.HEADER_SIZE)
        if head is None:
            break
        length, kind = frames.header(head)
        payload = _read_exactly(sock, length) if length else b""
        if payload is None:
            break
        if kind == frames.TRACE:
            seq, row, body = frames.read_trace(payload)
            writer.submit(row, body, seq)
        elif kind == frames.KEY:
            key = orjson.loads(payload)
            keys.learn(key["id"], key["c"], key["p"])
            writer.release_soon()
        elif kind == frames.LOCAL:
            keys.local = LocalKeyring(payload)
            writer.release_soon()
        elif kind == frames.CHANGED:
            writer.settings_changed(frames.read_changed(payload))
        elif kind == frames.CLOCK:
            writer.clock(frames.read_clock(payload))
        elif kind == frames.STOP:
            told = True
            break
    if not told:
        log.warning("the serving process is gone; writing what it sent, then stopping")
    # The drain is not left waiting behind other work (the serving process raises it
    # too when it stops; when it is gone, no one else would).
    schedule.raise_own()
    writer.stop()
    if spans is not None:
        spans.stop()  # before the last STATS: what it dropped at the end is reported
    reporter.finish()
    thread.join()
    reporter.stats(frames.DONE)
    return told


def main() -> int:
    config = orjson.loads(os.environ.pop(CONFIG_ENV))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config["log_level"].upper())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # The calls first (tvgate.traces.schedule): SCHED_BATCH at nice 10 from the start;
    # the serving process puts it to SCHED_IDLE while it keeps up.
    schedule.start_behind()
    sock = socket.socket(fileno=sys.stdin.fileno())
    sock.setblocking(True)
    keys = SentPlaintexts()
    writer = TraceWriter(
        open_database(config["database_url"]),
        keys,
        queue_size=config["queue_size"],
        batch_size=config["batch_size"],
        spool_dir=Path(config["spool_dir"]),
        settings_ttl=config["settings_ttl"],
        worker=config["worker"],
        body_budget=config["body_budget"],
        connection_age=ConnectionAge(config["db_idle_timeout"], config["db_max_age"]),
    )
    spans = None
    if config["otlp_endpoint"]:
        # Imported only when used: the SDK costs the writer process memory and start time.
        from tvgate.traces.otlp import SpanExport

        spans = SpanExport(
            config["otlp_endpoint"],
            otlp_header_pairs(config["otlp_headers"]),
            config["otlp_timeout"],
            writer.stats,
            worker=config["worker"],
        )
        writer.batches.on_written = spans.export_rows
    started = time.monotonic()
    serve(sock, writer, keys, spans)
    log.debug("trace writer process ran %.1fs", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
