"""What the trace writer keeps in memory for want of a place: one bounded store.

Two things wait here, and share one budget:

- *held traces*: batches neither the database nor the spool took (a full or read-only
  disk during an outage), oldest first. Every later trace waits behind them, in order,
  and both are tried again with a backoff (:meth:`HoldingStore.due`).
- *held bodies*: the redacted bodies of traces already written whose org has a key
  whose plaintext is not known yet (redacted with what is known, never stored or
  spooled), by trace id, stored once every key of the org is known.

Bounds: at most ``queue_size`` held traces (past it the oldest are lost, counted as
``spool_error``); the bytes of every body here count against ``body_budget`` with the
bodies queued, and past it bodies are let go first, oldest first (held traces' before
held bodies'), the traces themselves kept.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from tvgate.traces.rows import Item, RedactedBody, WriterStats

log = logging.getLogger("tvgate.traces")

#: While neither the database nor the spool takes the held traces, the first and the
#: longest wait between two tries of both.
_RETRY_MIN, _RETRY_MAX = 0.1, 5.0


class HoldingStore:
    def __init__(self, queue_size: int, body_budget: int, stats: WriterStats) -> None:
        self.queue_size = queue_size
        self.body_budget = body_budget
        self.stats = stats
        #: Traces neither the database nor the spool took, oldest first.
        self.traces: deque[Item] = deque()
        #: Bodies waiting for their org's keys, by trace id: (org, body).
        self.bodies: dict[str, tuple[int, RedactedBody]] = {}
        #: Bytes of every body here, held traces' and held bodies'.
        self.body_bytes = 0
        self._retry_at = 0.0
        self._delay = _RETRY_MIN

    # --- held traces ---

    def hold(self, items: list[Item]) -> None:
        """Keep traces neither the database nor the spool took, within the bounds."""
        if items and not self.traces:
            self._retry_at = time.monotonic() + self._delay
        for item in items:
            self.traces.append(item)
            self.body_bytes += item.body_size
        while len(self.traces) > self.queue_size:
            lost = self.traces.popleft()
            self.body_bytes -= lost.body_size
            self.stats.dropped_by["spool_error"] += 1
            log.error(
                "trace %s lost: neither the database nor the spool took it, and %d traces "
                "are held in memory already",
                lost.row.get("id"),
                self.queue_size,
            )
        self._bound()

    def due(self) -> bool:
        """The backoff says to try the held traces again."""
        return time.monotonic() >= self._retry_at

    def tried(self, tried: list[Item], rest: list[Item]) -> None:
        """``tried`` (every held trace) were offered; ``rest`` is what neither took."""
        if not rest:
            self.traces.clear()
            self._recount()
            self._delay = _RETRY_MIN
            log.info("%d traces held in memory are written or spooled", len(tried))
            return
        if len(rest) != len(tried):  # some could not be spooled at all (counted)
            self.traces = deque(rest)
            self._recount()
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, _RETRY_MAX)

    def lose(self) -> None:
        """At stop: the traces still held are lost, and counted."""
        if not self.traces:
            return
        self.stats.dropped_by["spool_error"] += len(self.traces)
        log.error(
            "%d traces lost at stop: neither the database nor the spool took them",
            len(self.traces),
        )
        self.traces.clear()
        self._recount()

    # --- held bodies ---

    def hold_body(self, trace_id: str, org_id: int, body: RedactedBody) -> None:
        if trace_id in self.bodies:
            return  # a batch written again row by row meets its bodies twice
        self.bodies[trace_id] = (org_id, body)
        self.body_bytes += body.size
        self._bound()

    @property
    def held_body_bytes(self) -> int:
        """Bytes of the held bodies alone (the held traces' are the serving process's too)."""
        return sum(body.size for _, body in self.bodies.values())

    def bodies_by_org(self) -> dict[int, list[str]]:
        by_org: dict[int, list[str]] = {}
        for trace_id, (org_id, _) in self.bodies.items():
            by_org.setdefault(org_id, []).append(trace_id)
        return by_org

    def release(self, trace_ids: list[str], *, stored: bool) -> None:
        """Let go of held bodies: stored onto their traces, or not kept (counted)."""
        for trace_id in trace_ids:
            _, body = self.bodies.pop(trace_id)
            self.body_bytes -= body.size
            if not stored:
                self.stats.bodies_dropped += 1

    def drop_bodies(self) -> None:
        """At stop: bodies still waiting for a key are not kept (their traces are)."""
        if self.bodies:
            log.warning(
                "%d held bodies dropped at stop: a key of their org was never known",
                len(self.bodies),
            )
            self.release(list(self.bodies), stored=False)

    def _recount(self) -> None:
        # Counted again, not by difference: trying a trace may have let its body go.
        self.body_bytes = sum(item.body_size for item in self.traces) + sum(
            body.size for _, body in self.bodies.values()
        )

    def _bound(self) -> None:
        """Past the body budget, let bodies go, oldest first: held traces' first."""
        for item in self.traces:
            if self.body_bytes <= self.body_budget:
                return
            if item.body is not None:
                self.body_bytes -= item.body_size
                item.body = None
                self.stats.bodies_dropped += 1
                item.note("body not kept: the spool could not be written")
        while self.body_bytes > self.body_budget and self.bodies:
            self.release([next(iter(self.bodies))], stored=False)
