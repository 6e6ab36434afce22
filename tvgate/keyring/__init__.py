"""Provider-key encryption: the backend interface, the backend set, and the plaintext cache.

A backend turns a key's secret into ciphertext bound to that key's org, id and
owner (a ciphertext copied onto another row does not decrypt) and back.
Backends are synchronous; callers run them in a thread pool. Plaintext lives
only in :class:`PlaintextCache`, in memory, for a short TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from tvgate.config import Settings

log = logging.getLogger("tvgate.keyring")


class KeyringError(Exception):
    """A ciphertext could not be decrypted (tampered, copied, or wrong master key)."""


class KeyringUnavailable(Exception):
    """The key store could not be reached; requests that need a key get a 503."""


#: What a ciphertext holds: a provider key, a credential tvgate keeps to re-check, or a
#: new proxy token a web session shows once.
SEALED_KEY = "key"
SEALED_TOKEN_ORIGIN = "token-origin"  # noqa: S105 - a kind of ciphertext, not a secret
SEALED_SESSION_ORIGIN = "session-origin"
SEALED_SESSION_FLASH = "session-flash"
#: An org's Visdom Trace ingest key (``tvk_``), bound to the org (row: the org id).
SEALED_VISDOM_INGEST = "visdom-ingest"
#: A user's own Visdom Trace credential, bound to the org and user (row and owner: the user).
SEALED_VISDOM_USER = "visdom-user"


@dataclass(frozen=True, slots=True)
class KeyContext:
    """What a ciphertext is bound to: its kind, org, row and owner."""

    org_id: int
    key_id: int
    owner_id: int | None = None
    #: Part of the context so a provider key's ciphertext never opens as another kind's
    #: (and is never sent to Visdom Trace as a session), even where the row ids match.
    kind: str = SEALED_KEY

    def as_bytes(self) -> bytes:
        owner = self.owner_id or ""
        if self.kind == SEALED_KEY:
            # Unchanged for provider keys: their stored ciphertexts must keep opening.
            return f"tvgate-key:org={self.org_id}:key={self.key_id}:owner={owner}".encode()
        return f"tvgate-{self.kind}:org={self.org_id}:row={self.key_id}:owner={owner}".encode()


class Keyring(Protocol):
    name: str

    def encrypt(self, plaintext: str, context: KeyContext) -> str: ...

    def decrypt(self, ciphertext: str, context: KeyContext) -> str: ...

    def check(self) -> None:
        """Raise KeyringUnavailable when the backend cannot serve."""


class Rewrapper(Protocol):
    """A backend whose key has versions: ciphertexts can move to the newest one unseen."""

    def rewrap_batch(self, items: Sequence[tuple[str, KeyContext]]) -> list[str | None]:
        """Each ciphertext under the newest key version, or None where that item fails."""
        ...


#: Every ciphertext says which backend made it, so a process configured with both can
#: decrypt either while keys move between them (``tvgate keys migrate``).
LOCAL_PREFIX = "local:v1:"
VAULT_PREFIX = "vault:v"


def backend_of(ciphertext: str) -> str:
    """``local`` or ``vault`` by the ciphertext's prefix; ``unknown`` otherwise."""
    if ciphertext.startswith(LOCAL_PREFIX):
        return "local"
    if ciphertext.startswith(VAULT_PREFIX):
        return "vault"
    return "unknown"


class KeyringSet:
    """The keyring of a process: the configured backend encrypts; every backend that is
    configured decrypts the ciphertexts it made (chosen by their prefix).

    ``keyring`` in the settings picks the encrypting backend. The local backend also reads
    when a master key is configured or its file exists; the vault backend also reads when
    ``vault_addr`` is set. So during a migration a gateway serves both forms.
    """

    def __init__(self, primary: Keyring, readers: Mapping[str, Keyring]) -> None:
        self.primary = primary
        self.name = primary.name
        self.readers = {primary.name: primary, **readers}
        #: The backends a ciphertext needed that this process does not have, warned of once.
        self._missing_warned: set[str] = set()

    def encrypt(self, plaintext: str, context: KeyContext) -> str:
        return self.primary.encrypt(plaintext, context)

    def decrypt(self, ciphertext: str, context: KeyContext) -> str:
        return self.backend(backend_of(ciphertext)).decrypt(ciphertext, context)

    def check(self) -> None:
        # Readiness is about the backend new keys need; a second backend that is only
        # there for a migration must not take the gateway out of a load balancer.
        self.primary.check()

    def backend(self, name: str) -> Keyring:
        reader = self.readers.get(name)
        if reader is None:
            self._warn_missing(name)
            raise KeyringError(
                f"this key was encrypted by the {name} keyring, which is not configured here"
            )
        return reader

    def _warn_missing(self, name: str) -> None:
        """Once per backend: the keys it encrypted cannot be used here, and what to set."""
        if name in self._missing_warned:
            return
        self._missing_warned.add(name)
        if name == "vault":
            log.warning(
                "a key is a Vault ciphertext (vault:v…) and no Vault is configured here: "
                "set TVGATE_VAULT_ADDR with TVGATE_VAULT_ROLE_ID and TVGATE_VAULT_SECRET_ID "
                "(or TVGATE_VAULT_TOKEN), or replace the key's secret (tvgate keys rotate)"
            )
        elif name == "local":
            log.warning(
                "a key is a local-keyring ciphertext (local:v1:…) and this process has no "
                "master key: set TVGATE_MASTER_KEY (or put master.key in the data directory), "
                "or replace the key's secret (tvgate keys rotate)"
            )
        else:
            log.warning(
                "a key's ciphertext has no known keyring prefix (neither local: nor vault:): "
                "replace the key's secret (tvgate keys rotate)"
            )


def build_keyring(settings: Settings) -> KeyringSet:
    """The process's keyring: the configured backend, plus every other one configured."""
    from tvgate.keyring.local import LocalKeyring, local_is_configured
    from tvgate.keyring.vault import VaultKeyring

    readers: dict[str, Keyring] = {}
    if settings.keyring == "local" or local_is_configured(settings):
        readers["local"] = LocalKeyring.from_settings(settings)
    vault_credentials = bool(settings.vault_token or settings.vault_role_id)
    if settings.keyring == "vault" or (settings.vault_addr and vault_credentials):
        # Building it does not contact Vault: a gateway starts (and says it is not ready)
        # while Vault is away.
        readers["vault"] = VaultKeyring.from_settings(settings)
    if settings.keyring not in readers:
        raise KeyringUnavailable(f"keyring backend {settings.keyring!r} is not available")
    return KeyringSet(readers[settings.keyring], readers)


def fingerprint(secret: str) -> str:
    """What may be shown of a key: its last four characters."""
    return secret[-4:] if len(secret) >= 8 else "…"


@dataclass(slots=True)
class _Entry:
    plaintext: str
    expires: float


class PlaintextCache:
    """Decrypted keys in memory for ``ttl`` seconds, keyed by key id and ciphertext.

    Keying by the ciphertext makes a secret's replacement atomic for requests in flight:
    a request holds the route snapshot it started with, whose ciphertext still finds (or
    decrypts to) the old secret, while requests on the new snapshot get the new one.
    Used on the IOLoop thread only (decryption runs in ``executor``), but for
    :meth:`at_hand`, which the trace writer's thread calls to redact an org's keys
    without ever waiting on the key store: it only reads a dict and a set, which the
    IOLoop thread changes one item at a time or replaces.
    """

    def __init__(self, keyring: Keyring, executor: Executor, ttl: float) -> None:
        self.keyring = keyring
        self.executor = executor
        self.ttl = ttl
        self._entries: dict[tuple[int, str], _Entry] = {}
        self._pending: dict[tuple[int, str], asyncio.Future[str]] = {}
        #: Ciphertexts the keyring answered do not decrypt (no call can use them either).
        self._unreadable: frozenset[tuple[int, str]] = frozenset()
        # Bumped by forget(): a decryption that started before must not be cached after.
        self._generation = 0
        self.clock: Callable[[], float] = time.monotonic
        #: Bumped each time a plaintext is cached: the trace writer's process is sent the
        #: new ones (:meth:`decrypted`) before the next trace.
        self.stored = 0
        self.hits = 0
        self.misses = 0

    async def get(self, ciphertext: str, context: KeyContext) -> str:
        """The plaintext for this key, decrypting in the pool at most once at a time."""
        cache_key = (context.key_id, ciphertext)
        entry = self._entries.get(cache_key)
        if entry is not None and entry.expires > self.clock():
            self.hits += 1
            return entry.plaintext
        pending = self._pending.get(cache_key)
        if pending is not None:
            return await pending
        self.misses += 1
        loop = asyncio.get_running_loop()
        generation = self._generation
        started = time.perf_counter()
        pending = asyncio.ensure_future(
            loop.run_in_executor(self.executor, self.keyring.decrypt, ciphertext, context)
        )
        self._pending[cache_key] = pending
        pending.add_done_callback(lambda _f: self._pending.pop(cache_key, None))
        try:
            plaintext = await pending
        except KeyringError:
            self._unreadable = self._unreadable | {cache_key}
            raise
        log.debug(
            "key %d decrypted by the %s keyring in %.1f ms",
            context.key_id,
            backend_of(ciphertext),
            (time.perf_counter() - started) * 1000,
        )
        if generation == self._generation:
            self._entries[cache_key] = _Entry(plaintext, self.clock() + self.ttl)
            self.stored += 1
        return plaintext

    def decrypted(self) -> list[tuple[tuple[int, str], str]]:
        """Every plaintext in memory, by (key id, ciphertext)."""
        return [(cache_key, entry.plaintext) for cache_key, entry in self._entries.items()]

    def at_hand(self, ciphertext: str, context: KeyContext) -> str | None:
        """The plaintext if it can be had without waiting on a key store: in memory, or
        from a backend that needs no network (local); None otherwise. Any thread; it
        caches nothing. KeyringError when the key is known not to decrypt."""
        cache_key = (context.key_id, ciphertext)
        entry = self._entries.get(cache_key)
        if entry is not None:
            return entry.plaintext
        if cache_key in self._unreadable:
            raise KeyringError("key ciphertext does not decrypt for this key")
        if isinstance(self.keyring, KeyringSet):
            from tvgate.keyring.local import LocalKeyring

            reader = self.keyring.readers.get(backend_of(ciphertext))
            if isinstance(reader, LocalKeyring):
                return reader.decrypt(ciphertext, context)
        return None

    def forget(self, key_id: int) -> None:
        """Drop a key at once (changed, disabled or deleted in this process)."""
        self._generation += 1
        for cache_key in [k for k in self._entries if k[0] == key_id]:
            del self._entries[cache_key]

    def forget_version(self, key_id: int, ciphertext: str) -> None:
        """Drop one ciphertext's plaintext (the key row no longer holds it)."""
        self._generation += 1
        self._entries.pop((key_id, ciphertext), None)

    def sweep(self) -> int:
        """Drop expired plaintexts, so none stays in memory long past its TTL."""
        now = self.clock()
        expired = [k for k, entry in self._entries.items() if entry.expires <= now]
        for cache_key in expired:
            del self._entries[cache_key]
        return len(expired)

    def __len__(self) -> int:
        return len(self._entries)
