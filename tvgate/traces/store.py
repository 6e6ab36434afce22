"""Captured content in the database: the blob sink, and the per-org capture settings.

Blobs are zstd-compressed and stored once per org, keyed by digest. Every time
a trace refers to a blob its ``referenced_at`` is moved forward, so retention
can delete blobs no kept trace needs. To save writes, a process treats a blob it
stored or touched in the last ``TOUCH_WINDOW`` as present; ``store_request``
then does not descend into that node, so a descendant's ``referenced_at`` may
lag its ancestor's by one window per tree level. Retention keeps a margin of a
day, far more than any tree's depth in windows.
Runs in the trace writer's thread (and in the pool for reads), never on the IOLoop.

The capture settings hold the plaintexts of the org's keys (to redact them) as long
as their rows hold the same ciphertexts; they are taken from the gateway's
decrypted-key cache (or the local keyring, which needs no network), never from Vault
here, so a hung key store cannot stall the writer.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import orjson
import zstandard

from tvgate.keyring import KeyContext, KeyringError
from tvgate.models import Blob, Org, ProviderKey
from tvgate.traces.redact import MAX_PATTERNS, Redactor, invalid_patterns

log = logging.getLogger("tvgate.traces")

#: How long a process trusts that a blob it stored is still there and recently touched.
TOUCH_WINDOW = 3600.0
_COMPRESS = zstandard.ZstdCompressor(level=3)
_DECOMPRESS = zstandard.ZstdDecompressor()
#: Blobs remembered as touched, at most: ~200 bytes each, ~10 MB per process. The oldest
#: are forgotten first (and stored again if a trace needs them), so the set stays at
#: this size under load instead of growing and being dropped at once.
TOUCHED_MAX = 50_000
#: (org, digest) -> when this process last stored or touched that blob; oldest first.
_TOUCHED: OrderedDict[tuple[int, bytes], float] = OrderedDict()
#: Rows per INSERT statement at most (a power of two), and the columns each gives, in order.
_INSERT_ROWS = 128
_BLOB_COLUMNS = ("org_id", "digest", "data", "size", "referenced_at")
_INSERTS: dict[tuple[type, int], str] = {}
#: (org, pattern) of the stored redaction patterns already logged as skipped.
_WARNED: set[tuple[int, str]] = set()
#: (org, key id) of the keys already logged as not redactable (they do not decrypt).
_UNREADABLE_WARNED: set[tuple[int, int]] = set()


def insert_chunks(count: int, largest: int) -> list[tuple[int, int]]:
    """``count`` rows cut into (start, end) chunks of ``largest`` rows, then of the powers
    of two of the rest (``largest`` a power of two): a batch's rows go in through at most
    a few statements of at most log2(``largest``) + 1 sizes. The ORM takes ~0.2 ms CPU per
    row to write a multi-row statement (22 ms for 100 trace rows), once per size: with a
    statement per batch size, a fresh writer paid it for each of up to 100 sizes as its
    batches happened to reach them."""
    chunks: list[tuple[int, int]] = []
    start = 0
    size = largest
    while start < count:
        while size > count - start:
            size //= 2
        chunks.append((start, start + size))
        start += size
    return chunks


def _insert_sql(rows: int) -> str:
    """``INSERT`` of ``rows`` blobs that moves ``referenced_at`` of those already stored;
    the ORM writes it (dialect, quoting, conflict clause) once per database and size.
    Its parameters: each row's columns in :data:`_BLOB_COLUMNS` order, then the time."""
    key = (type(Blob._meta.database.obj), rows)
    sql = _INSERTS.get(key)
    if sql is None:
        sample = dict.fromkeys(_BLOB_COLUMNS, 0)
        query = Blob.insert_many([sample] * rows, fields=[getattr(Blob, c) for c in _BLOB_COLUMNS])
        query = query.on_conflict(
            conflict_target=[Blob.org_id, Blob.digest], update={Blob.referenced_at: 0.0}
        )
        sql = _INSERTS[key] = query.sql()[0]
    return sql


class BlobStore:
    """One org's blobs. Puts are buffered until ``flush`` (inside the writer's transaction)."""

    def __init__(self, org_id: int) -> None:
        self.org_id = org_id
        self._pending: dict[bytes, bytes] = {}
        self._flushed: list[bytes] = []

    def has(self, digest: bytes) -> bool:
        touched = _TOUCHED.get((self.org_id, digest))
        return digest in self._pending or (
            touched is not None and time.time() - touched < TOUCH_WINDOW
        )

    def put(self, digest: bytes, data: bytes) -> None:
        self._pending[digest] = data

    def get(self, digest: bytes) -> bytes:
        if digest in self._pending:
            return self._pending[digest]
        row = Blob.get_or_none((Blob.org_id == self.org_id) & (Blob.digest == digest.hex()))
        if row is None:
            raise KeyError(digest.hex())
        return bytes(_DECOMPRESS.decompress(bytes(row.data)))

    def flush(self) -> None:
        if not self._pending:
            return
        now = time.time()
        to_db = Blob.data.db_value
        rows = [
            (self.org_id, digest.hex(), to_db(_COMPRESS.compress(data)), len(data), now)
            for digest, data in self._pending.items()
        ]
        execute = Blob._meta.database.execute_sql
        for start, end in insert_chunks(len(rows), _INSERT_ROWS):
            chunk = rows[start:end]
            execute(_insert_sql(len(chunk)), [*itertools.chain.from_iterable(chunk), now])
        self._flushed.extend(self._pending)
        self._pending.clear()

    def committed(self) -> None:
        """The transaction holding the flushed blobs committed: skip them for a window."""
        now = time.time()
        for digest in self._flushed:
            key = (self.org_id, digest)
            _TOUCHED[key] = now
            _TOUCHED.move_to_end(key)
        self._flushed.clear()
        _forget_oldest(now)


def _forget_oldest(now: float) -> None:
    """Forget the touched blobs past ``TOUCHED_MAX`` and those out of the window."""
    while _TOUCHED:
        at = next(iter(_TOUCHED.values()))
        if len(_TOUCHED) <= TOUCHED_MAX and now - at < TOUCH_WINDOW:
            return
        _TOUCHED.popitem(last=False)


class KnownPlaintexts(Protocol):
    """Where the writer finds keys' plaintexts without waiting on a key store: the
    gateway's decrypted-key cache (:meth:`tvgate.keyring.PlaintextCache.at_hand`)."""

    def at_hand(self, ciphertext: str, context: KeyContext) -> str | None: ...


#: A key as the writer knows it: its id and the ciphertext its row holds.
KeyRef = tuple[int, str]


@dataclass(slots=True)
class CaptureSettings:
    """What the writer needs of an org to store its bodies.

    ``redactor`` masks the org's keys whose plaintext is known. While ``unknown`` is not
    empty, a body may hold a key the redactor cannot find: the writer holds such bodies
    back until :meth:`learn` finds every plaintext (or the keyring says a key does not
    decrypt: then no call can use it, and it is left out, logged once).
    """

    capture_bodies: bool
    patterns: list[str]
    plaintexts: dict[KeyRef, str]
    unknown: dict[KeyRef, KeyContext]
    #: Every key of the org when they were read (those that do not decrypt too).
    refs: frozenset[KeyRef] = frozenset()
    #: The redacted prompt and answer go into the call's span (tvgate.traces.otlp).
    span_content: bool = False
    redactor: Redactor = field(init=False)
    loaded_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.redactor = Redactor(literals=self.plaintexts.values(), patterns=self.patterns)

    def learn(self, known: KnownPlaintexts) -> None:
        """Take the plaintexts of unknown keys that are in memory now."""
        found = False
        for ref, context in list(self.unknown.items()):
            try:
                plaintext = known.at_hand(ref[1], context)
            except KeyringError:
                _warn_unreadable(context)
                del self.unknown[ref]
                continue
            if plaintext is not None:
                self.plaintexts[ref] = plaintext
                del self.unknown[ref]
                found = True
        if found:
            self.redactor = Redactor(literals=self.plaintexts.values(), patterns=self.patterns)


def load_capture_settings(
    org_id: int, known: KnownPlaintexts, previous: CaptureSettings | None = None
) -> CaptureSettings:
    """Read an org's switch, patterns and keys; the keys' plaintexts come from ``known``
    or ``previous`` (the settings this replaces), never from a key store that may not
    answer: the writer never waits on Vault. Keys found in neither are ``unknown``."""
    org = Org.get_by_id(org_id)
    remembered = previous.plaintexts if previous is not None else {}
    plaintexts: dict[KeyRef, str] = {}
    unknown: dict[KeyRef, KeyContext] = {}
    refs: set[KeyRef] = set()
    for key in ProviderKey.select().where(ProviderKey.org == org_id):
        ref = (key.id, key.ciphertext)
        refs.add(ref)
        context = KeyContext(org_id, key.id, key.owner_id)
        try:
            plaintext = remembered.get(ref) or known.at_hand(key.ciphertext, context)
        except KeyringError:
            _warn_unreadable(context)  # no call can use it either
            continue
        if plaintext is None:
            unknown[ref] = context
        else:
            plaintexts[ref] = plaintext
    try:
        patterns = [p for p in orjson.loads(org.redaction_patterns) if isinstance(p, str)]
    except orjson.JSONDecodeError:
        patterns = []
    return CaptureSettings(
        capture_bodies=org.capture_bodies,
        patterns=_usable_patterns(org_id, patterns),
        plaintexts=plaintexts,
        unknown=unknown,
        refs=frozenset(refs),
        span_content=org.span_content,
    )


def key_refs(org_id: int) -> frozenset[KeyRef]:
    """The org's keys as they are now: one small query, to see whether settings read
    earlier still name every key (one added since must be redacted at once)."""
    query = ProviderKey.select(ProviderKey.id, ProviderKey.ciphertext)
    return frozenset((key.id, key.ciphertext) for key in query.where(ProviderKey.org == org_id))


def _warn_unreadable(context: KeyContext) -> None:
    if (context.org_id, context.key_id) not in _UNREADABLE_WARNED:
        _UNREADABLE_WARNED.add((context.org_id, context.key_id))
        log.warning(
            "key %d of org %d not redactable: it does not decrypt", context.key_id, context.org_id
        )


def _usable_patterns(org_id: int, patterns: list[str]) -> list[str]:
    """``patterns`` less those RE2 refuses, each logged once per process.

    Patterns are refused when saved; these were saved before (by a tvgate that ran
    them on Python's ``re``). Skipping one keeps the others and the built-ins working,
    and the policy shows it as invalid.
    """
    invalid = dict(invalid_patterns(patterns))
    for pattern, reason in invalid.items():
        if (org_id, pattern) not in _WARNED:
            _WARNED.add((org_id, pattern))
            log.warning("org %d: redaction pattern %s skipped: it %s", org_id, pattern, reason)
    return [p for p in patterns if p not in invalid][:MAX_PATTERNS]
