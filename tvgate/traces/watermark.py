"""Trace writers' watermarks: how far each writer's worker is written, in order.

Each worker has a trace writer process of its own, so a session's next call (served by
another worker) can be written before the call before it. A writer publishes, with each
batch and every ``HEARTBEAT`` while idle, a watermark ``upto``: every call of its worker
that finished before ``upto`` is in the database. It is the earliest end (or receipt) of
what the writer still holds (queued, in a batch, held, spooled and not replayed), and
when it holds nothing the serving process's clock as of the last ``CLOCK`` frame read:
the frames arrive in order, so each trace that ended before that clock was read before
it (:mod:`tvgate.traces.client` sends one every ``CLOCK_INTERVAL``). The row is written
after the batch commits, so a reader that sees ``upto`` sees every trace it covers.

A reader (the Visdom outbox) takes the minimum over the live writers: one not refreshed
for ``STALE`` seconds is gone (killed, or its host away) and ignored; a dead worker's
spool is replayed by another writer, which counts it in its own watermark then. A writer
that is alive but cannot reach the database keeps its watermark where it was: readers
wait for it (order over latency).
"""

from __future__ import annotations

import os
import socket

from tvgate.models import WriterWatermark

#: Seconds between the watermarks of an idle writer.
HEARTBEAT = 1.0
#: A watermark not refreshed for this long is a gone writer's (well above HEARTBEAT and
#: a batch's time; a writer paused longer than this is passed by).
STALE = 30.0


def writer_identity(worker: int) -> str:
    """This writer process's key: host, worker number, pid (one row per process)."""
    return f"{socket.gethostname()[:150]}/{worker}/{os.getpid()}"


def worker_of(writer: str) -> str:
    """A writer's identity without its host and pid: "worker N"."""
    parts = writer.rsplit("/", 2)
    return f"worker {parts[-2]}" if len(parts) == 3 else "worker"


def publish(writer: str, upto: float, now: float) -> None:
    WriterWatermark.insert(writer=writer, upto=upto, updated_at=now).on_conflict(
        conflict_target=[WriterWatermark.writer],
        update={WriterWatermark.upto: upto, WriterWatermark.updated_at: now},
    ).execute()


def withdraw(writer: str) -> None:
    """A writer that stopped with nothing left to write: it holds no one back."""
    WriterWatermark.delete().where(WriterWatermark.writer == writer).execute()


def live(now: float) -> list[WriterWatermark]:
    """The live writers' watermarks, the one furthest behind first."""
    return list(
        WriterWatermark.select()
        .where(WriterWatermark.updated_at >= now - STALE)
        .order_by(WriterWatermark.upto)
    )


def written_before(now: float) -> float:
    """Every call that ended before the time returned is in the database (``now`` when
    no writer is live: no one is writing)."""
    marks = live(now)
    return min(marks[0].upto, now) if marks else now
