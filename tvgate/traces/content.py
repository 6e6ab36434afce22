"""Content-addressed, byte-exact storage of request bodies, split where conversations repeat.

This module owns turning one request body, cut into parts (:mod:`tvgate.traces.split`
says where), into immutable blobs (and back). Coding agents resend the whole
conversation on every call, so storing each body whole grows with the square of the
session's length; here each body becomes a tree of blobs keyed by their content, and
a new call only adds the blobs its new turn made.

The reference tree (:func:`store_request`)
    A flat list of part digests would grow linearly per request, hence with the
    square of the session across its requests. The digests are grouped instead:

    * level 1 nodes list consecutive part digests, level 2 nodes list level 1
      digests, and so on; a node is a blob like any other (``b"TVN"``, the digest
      size, the level, then the digests);
    * where a node ends is decided by content (content-defined chunking over the
      digest list): after entry *i* when ``(digest[i][0] ^ digest[i-1][1]) & 15 ==
      0``, with at least :data:`MIN_FANOUT` and at most :data:`MAX_FANOUT` entries.
      The decision looks at two neighbouring digests, so a run of equal parts (or a
      part that repeats everywhere) cannot force a cut at every entry, and it does
      not depend on an entry's position, so the nodes of an unchanged prefix are
      the same blobs on every turn, and so are the nodes after an insertion once
      the boundaries realign (within a node or two);
    * levels are added until at most :data:`ROOT_FANOUT` digests remain: they form
      the root, whose digest :func:`store_request` returns.

    Appending a turn rewrites the last node of each level and the root: for a
    session of P parts that is O(log P) nodes of at most :data:`MAX_FANOUT`
    digests, not O(P).

Writing order and the sink
    Blobs are written children first, root last, and ``put`` only for blobs that
    ``has`` does not know. The walk is top down: a node the sink already has is
    not descended into, so an unchanged prefix costs one ``has`` per node, not one
    per part. That relies on two rules the sink must keep: ``has`` must see every
    earlier ``put`` (also one not yet flushed to the database), and a blob is only
    ever removed together with every node above it (a mark and sweep from live
    roots keeps this; deleting blobs by age does not).

Digests
    :func:`blob_digest` is SHA-256 truncated to 16 bytes. SHA-256 runs on the
    CPU's SHA extensions through OpenSSL, faster there than BLAKE2b (bench/README.md),
    and the body is hashed in full on every call. 128 bits put an accidental
    collision out of reach (birthday bound 2**64 blobs); a deliberate one needs
    about 2**64 hash evaluations. A node records its digest size, so moving to 32
    bytes (:data:`DIGEST_SIZE`) keeps old trees readable.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from typing import Protocol

from tvgate.traces.split import split_offsets

__all__ = [
    "DIGEST_SIZE",
    "BlobSink",
    "blob_digest",
    "load_request",
    "store_parts",
    "store_request",
]

#: Bytes kept of the SHA-256 of a blob.
DIGEST_SIZE = 16
#: Content-defined node sizes, in digests. With the 1-in-16 cut test a node holds
#: about MIN_FANOUT - 1 + 16 = 19 digests on average.
MIN_FANOUT = 4
MAX_FANOUT = 64
_CUT_MASK = 0x0F
#: A level with at most this many digests is the root.
ROOT_FANOUT = 32

_NODE_MAGIC = b"TVN"
_NODE_HEADER = len(_NODE_MAGIC) + 2


class BlobSink(Protocol):
    """Where blobs live, keyed by digest. Data is raw (uncompressed); the sink compresses it.

    ``has`` must see every earlier ``put``, flushed or not; ``put`` must tolerate a
    digest that another writer stored meanwhile (insert or ignore: same digest,
    same bytes); ``get`` raises when the blob is missing.
    """

    def has(self, digest: bytes) -> bool: ...

    def put(self, digest: bytes, data: bytes) -> None: ...

    def get(self, digest: bytes) -> bytes: ...


Buffer = bytes | bytearray | memoryview


def blob_digest(data: Buffer) -> bytes:
    """The content address of a blob: SHA-256, first :data:`DIGEST_SIZE` bytes."""
    return hashlib.sha256(data).digest()[:DIGEST_SIZE]


# --- the reference tree ----------------------------------------------------------

# Digests of short parts (a separator, `}]}` after a big string) repeat within and
# across requests; hashing costs a call of about a microsecond whatever the length,
# a dict lookup much less. Bounded, and shared by threads (dict operations are atomic).
_SHORT_PART = 64
_SHORT_MEMO_MAX = 4096
_short_memo: dict[bytes, bytes] = {}


def _part_digest(part: memoryview) -> bytes:
    if len(part) > _SHORT_PART:
        return blob_digest(part)
    key = part.tobytes()
    digest = _short_memo.get(key)
    if digest is None:
        if len(_short_memo) >= _SHORT_MEMO_MAX:
            _short_memo.clear()
        digest = _short_memo[key] = blob_digest(key)
    return digest


def _node(level: int, digests: list[bytes]) -> bytes:
    return _NODE_MAGIC + bytes((DIGEST_SIZE, level)) + b"".join(digests)


# For each byte value, 1 when it passes the cut test.
_CUT_TEST = bytes(int(not value & _CUT_MASK) for value in range(256))


def _chunk(digests: list[bytes]) -> list[list[bytes]]:
    """Group digests into nodes whose ends depend on content (see the module doc).

    A node ends after entry *i* when it holds :data:`MAX_FANOUT` entries, or at least
    :data:`MIN_FANOUT` and *i* passes the cut test. The test is run for every entry at
    once, on the digests' first and second bytes taken as two big integers, not in a
    Python loop per entry, which a long conversation made costly (bench/README.md).
    """
    count = len(digests)
    if not count:
        return []
    size = len(digests[0])
    joined = b"".join(digests)
    # Entry i (from 1) is tested on digests[i][0] ^ digests[i - 1][1].
    firsts = int.from_bytes(joined[size::size], "big")
    seconds = int.from_bytes(joined[1 : (count - 1) * size : size], "big")
    passed = (firsts ^ seconds).to_bytes(count - 1, "big").translate(_CUT_TEST)
    candidates: list[int] = []
    index = passed.find(1)
    while index != -1:
        candidates.append(index + 1)
        index = passed.find(1, index + 1)
    chunks: list[list[bytes]] = []
    start = 0
    while start < count:
        end = start + MAX_FANOUT - 1
        found = bisect.bisect_left(candidates, start + MIN_FANOUT - 1)
        if found < len(candidates) and candidates[found] < end:
            end = candidates[found]
        chunks.append(digests[start : end + 1])
        start = end + 1
    return chunks


def store_request(raw: bytes, sink: BlobSink) -> bytes:
    """Store a body through ``sink``; return the root digest that :func:`load_request` takes."""
    return store_parts(raw, split_offsets(raw), sink)[0]


def store_parts(
    raw: bytes, cuts: list[int], sink: BlobSink, known: list[bytes] | None = None
) -> tuple[bytes, list[bytes]]:
    """Store a body cut at ``cuts``; return its root digest and the digests of its parts.

    ``known``: the digests of the first parts, when the caller has them from an earlier
    body that starts with the same bytes (they are not hashed again).
    """
    view = memoryview(raw)
    data: dict[bytes, Buffer] = {}
    children: dict[bytes, list[bytes]] = {}
    digests: list[bytes] = list(known or ())
    for start, end in itertools.pairwise(cuts[len(digests) :]):
        part = view[start:end]
        digest = _part_digest(part)
        data[digest] = part
        digests.append(digest)
    parts = digests
    level = 1
    while len(digests) > ROOT_FANOUT:
        upper: list[bytes] = []
        for chunk in _chunk(digests):
            node = _node(level, chunk)
            digest = blob_digest(node)
            data[digest] = node
            children[digest] = chunk
            upper.append(digest)
        digests = upper
        level += 1
    root_node = _node(level, digests)
    root = blob_digest(root_node)
    data[root] = root_node
    children[root] = digests
    _write(root, _Blobs(data, view, cuts, parts), children, sink, set())
    return root, parts


class _Blobs:
    """The bytes of each blob of one body, by digest: new parts and nodes from a dict,
    known parts sliced from the body only when the sink lacks them (rare: the memory of
    an earlier body can outlive a blob that a retention sweep removed)."""

    __slots__ = ("_cuts", "_data", "_digests", "_index", "_view")

    def __init__(
        self, data: dict[bytes, Buffer], view: memoryview, cuts: list[int], digests: list[bytes]
    ) -> None:
        self._data = data
        self._view = view
        self._cuts = cuts
        self._digests = digests
        self._index: dict[bytes, int] | None = None

    def __getitem__(self, digest: bytes) -> Buffer:
        found = self._data.get(digest)
        if found is not None:
            return found
        if self._index is None:
            self._index = {digest: index for index, digest in enumerate(self._digests)}
        index = self._index[digest]
        return self._view[self._cuts[index] : self._cuts[index + 1]]


def _write(
    digest: bytes,
    data: _Blobs,
    children: dict[bytes, list[bytes]],
    sink: BlobSink,
    visited: set[bytes],
) -> None:
    """Write a subtree the sink lacks, children before their parent."""
    if digest in visited:
        return
    visited.add(digest)
    if sink.has(digest):
        return  # and so does its whole subtree: it was written children first
    for child in children.get(digest, ()):
        _write(child, data, children, sink, visited)
    sink.put(digest, bytes(data[digest]))


def load_request(root: bytes, sink: BlobSink) -> bytes:
    """The exact body stored under ``root``.

    Every blob read is checked against its digest; a missing blob is whatever the
    sink's ``get`` raises, a corrupt or foreign one raises ValueError.
    """
    parts: list[bytes] = []
    _load(root, None, sink, parts, {})
    return b"".join(parts)


def _load(
    digest: bytes,
    expected_level: int | None,
    sink: BlobSink,
    parts: list[bytes],
    cache: dict[bytes, bytes],
) -> None:
    node = _get(digest, sink, cache)
    if len(node) < _NODE_HEADER or node[: len(_NODE_MAGIC)] != _NODE_MAGIC:
        raise ValueError(f"blob {digest.hex()} is not a request tree node")
    size, level = node[len(_NODE_MAGIC)], node[len(_NODE_MAGIC) + 1]
    body = len(node) - _NODE_HEADER
    level_ok = level >= 1 if expected_level is None else level == expected_level
    if size == 0 or body % size or not level_ok:
        raise ValueError(f"blob {digest.hex()} is a malformed request tree node")
    for offset in range(_NODE_HEADER, len(node), size):
        child = node[offset : offset + size]
        if level == 1:
            parts.append(_get(child, sink, cache))
        else:
            _load(child, level - 1, sink, parts, cache)


def _get(digest: bytes, sink: BlobSink, cache: dict[bytes, bytes]) -> bytes:
    blob = cache.get(digest)
    if blob is None:
        blob = sink.get(digest)
        if hashlib.sha256(blob).digest()[: len(digest)] != digest:
            raise ValueError(f"blob {digest.hex()} does not match its digest")
        cache[digest] = blob
    return blob
