"""Storing request bodies from where they differ from the last body of their conversation.

This module owns the trace writer's memory of recent bodies. A coding agent sends
the whole conversation again on every call, so a body is almost always the body
before it plus a turn or two. Redacting, splitting and hashing it whole costs CPU
in proportion to the whole conversation on every call, under the GIL
(bench/README.md); done from the last element both bodies share, it costs what
the new turn costs.

For each conversation (org, user and the client's session id) the last few bodies
stored are kept: the body, its redacted form, where it was cut, the digest of each
part and its root. A new body is compared with them (a memcmp per candidate) for
the longest prefix that ends just after an element of a top-level conversation
array (:attr:`tvgate.traces.split.Split.resumes`). Then only the bytes after it
are redacted and scanned, and only the parts after it are hashed; the result is the
same as for the whole body, byte for byte and digest for digest, because:

* an element that ends in ``}``, ``]`` or ``"`` ends there whatever follows, so
  the scan of the shared bytes, and its cuts, cannot change (:mod:`.split`);
* a secret cannot span such an end when the redactor is
  :attr:`~tvgate.traces.redact.Redactor.element_local` (no admin patterns); with
  admin patterns the body is redacted whole, and only the rest is reused.

A body sent again unchanged (an SDK's retry, a fallback) keeps the root it had, as
long as the store still has it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tvgate.traces.content import BlobSink, store_parts
from tvgate.traces.recent import Recent
from tvgate.traces.redact import Redactor
from tvgate.traces.split import Split, continue_split, split_body

#: Who a body's conversation belongs to: org id, user id, the client's session id.
ConversationKey = tuple[int, int | None, str]

#: Bytes of bodies kept in all, by default.
DEFAULT_BUDGET = 32 * 1024 * 1024
#: Bodies kept per conversation: parallel calls (subagents, a title request) each
#: continue their own.
PER_CONVERSATION = 4
#: Rough bytes of bookkeeping per part (its offset, digest, list slots).
_PART_OVERHEAD = 120


@dataclass(slots=True, eq=False)
class _Body:
    raw: bytes
    #: ``raw`` itself when redaction changed nothing.
    redacted: bytes
    redactor: Redactor
    #: Cuts and resume offsets in ``redacted``.
    split: Split
    digests: list[bytes]
    #: The resume offsets as (offset in ``raw``, offset in ``redacted``), ascending.
    resumes: list[tuple[int, int]]
    root: bytes

    @property
    def size(self) -> int:
        held = len(self.raw) + (0 if self.redacted is self.raw else len(self.redacted))
        return held + _PART_OVERHEAD * len(self.digests)

    def shared_resume(self, raw: bytes) -> tuple[int, int] | None:
        """The last resume offsets whose bytes before them ``raw`` starts with."""
        resumes = self.resumes
        if not resumes:
            return None
        view = memoryview(self.raw)
        # One or two memcmps in the usual cases: a body sent again, or the same
        # conversation with its last element changed (Claude Code moves its
        # cache_control marker there) and new ones after it.
        for back in (1, 2):
            if back <= len(resumes) and raw.startswith(view[: resumes[-back][0]]):
                return resumes[-back]
        if not raw.startswith(view[: resumes[0][0]]):
            return None
        low, high = 0, len(resumes) - 2  # resumes[low] is shared, resumes[high] is not
        while high - low > 1:
            middle = (low + high) // 2
            if raw.startswith(view[: resumes[middle][0]]):
                low = middle
            else:
                high = middle
        return resumes[low]

    def same_as(self, raw: bytes, shared: tuple[int, int] | None) -> bool:
        """Whether ``raw`` is this body, given what :meth:`shared_resume` found."""
        if len(raw) != len(self.raw):
            return False
        if shared is None:
            return not self.resumes and raw == self.raw
        # The bytes before the resume offset are known to be the same: compare the rest.
        return shared is self.resumes[-1] and raw.startswith(
            memoryview(self.raw)[shared[0] :], shared[0]
        )


def _to_raw(offset: int, shifts: list[tuple[int, int]]) -> int:
    """Map an offset in a redacted body back to the body (see ``redact_shifts``)."""
    index = bisect.bisect_right(shifts, offset, key=lambda shift: shift[0]) - 1
    return offset if index < 0 else offset - shifts[index][1]


class Conversations:
    """The last bodies stored per conversation; bounded by ``budget`` bytes in all."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        #: Bytes of every body stored; of those, the bytes that were redacted and
        #: scanned (the rest continued from a conversation's previous body); and the
        #: bodies that continued so.
        self.stored = 0
        self.scanned = 0
        self.continued = 0
        #: The bodies kept (``recent.size`` bytes, at most ``recent.budget``).
        self.recent: Recent[ConversationKey, _Body] = Recent(budget, PER_CONVERSATION)

    def store(self, key: ConversationKey, redactor: Redactor, raw: bytes, sink: BlobSink) -> bytes:
        """Redact ``raw``, store it through ``sink``; return its root digest."""
        self.stored += len(raw)
        bodies = self.recent.get(key)
        base: _Body | None = None
        shared: tuple[int, int] | None = None
        for body in bodies:
            if body.redactor is not redactor:
                continue
            found = body.shared_resume(raw)
            if body.same_as(raw, found) and sink.has(body.root):
                self.recent.touch(key)
                return body.root
            if found is not None and (shared is None or found[0] > shared[0]):
                base, shared = body, found
        if base is not None and shared is not None and redactor.element_local:
            stored = self._store_rest(base, shared, redactor, raw, sink)
            self.continued += 1
            self.scanned += len(raw) - shared[0]
        else:
            stored = self._store_whole(redactor, raw, sink)
            self.scanned += len(raw)
        self.recent.add(key, stored, replacing=base)
        return stored.root

    @staticmethod
    def _store_whole(redactor: Redactor, raw: bytes, sink: BlobSink) -> _Body:
        redacted, shifts = redactor.redact_shifts(raw)
        split = split_body(redacted)
        root, digests = store_parts(redacted, split.cuts, sink)
        resumes = [(_to_raw(offset, shifts), offset) for offset in split.resumes]
        return _Body(raw, redacted, redactor, split, digests, resumes, root)

    @staticmethod
    def _store_rest(
        base: _Body, shared: tuple[int, int], redactor: Redactor, raw: bytes, sink: BlobSink
    ) -> _Body:
        raw_at, redacted_at = shared
        rest, shifts = redactor.redact_shifts(raw[raw_at:])
        if base.redacted is base.raw and not shifts:
            redacted = raw
        else:
            redacted = base.redacted[:redacted_at] + rest
        split = continue_split(redacted, base.split, redacted_at)
        known = bisect.bisect_left(base.split.cuts, redacted_at)
        root, digests = store_parts(redacted, split.cuts, sink, base.digests[:known])
        # split.resumes starts with base's, up to redacted_at; base.resumes pairs them.
        kept = bisect.bisect_right(base.split.resumes, redacted_at)
        resumes = base.resumes[:kept] + [
            (raw_at + _to_raw(offset - redacted_at, shifts), offset)
            for offset in split.resumes[kept:]
        ]
        return _Body(raw, redacted, redactor, split, digests, resumes, root)

    def forget(self) -> None:
        """Drop every body kept: a transaction that stored their blobs was rolled back,
        and a later body must not continue from blobs that are not there."""
        self.recent.clear()
