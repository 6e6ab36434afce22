"""Provider-key encryption: the backend interface, the backend factory, and the plaintext cache.

A backend turns a key's secret into ciphertext bound to that key's org, id and
owner (a ciphertext copied onto another row does not decrypt) and back.
Backends are synchronous; callers run them in a thread pool. Plaintext lives
only in :class:`PlaintextCache`, in memory, for a short TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from tvgate.config import Settings


class KeyringError(Exception):
    """A ciphertext could not be decrypted (tampered, copied, or wrong master key)."""


class KeyringUnavailable(Exception):
    """The key store could not be reached; requests that need a key get a 503."""


@dataclass(frozen=True, slots=True)
class KeyContext:
    """What a ciphertext is bound to."""

    org_id: int
    key_id: int
    owner_id: int | None = None

    def as_bytes(self) -> bytes:
        return (
            f"tvgate-key:org={self.org_id}:key={self.key_id}:owner={self.owner_id or ''}".encode()
        )


class Keyring(Protocol):
    name: str

    def encrypt(self, plaintext: str, context: KeyContext) -> str: ...

    def decrypt(self, ciphertext: str, context: KeyContext) -> str: ...

    def check(self) -> None:
        """Raise KeyringUnavailable when the backend cannot serve."""


def build_keyring(settings: Settings) -> Keyring:
    if settings.keyring == "local":
        from tvgate.keyring.local import LocalKeyring

        return LocalKeyring.from_settings(settings)
    raise KeyringUnavailable(f"keyring backend {settings.keyring!r} is not available")


def fingerprint(secret: str) -> str:
    """What may be shown of a key: its last four characters."""
    return secret[-4:] if len(secret) >= 8 else "…"


@dataclass(slots=True)
class _Entry:
    plaintext: str
    version: str
    expires: float


class PlaintextCache:
    """Decrypted keys in memory, keyed by key id, valid while the ciphertext is unchanged."""

    def __init__(self, keyring: Keyring, executor: Executor, ttl: float) -> None:
        self.keyring = keyring
        self.executor = executor
        self.ttl = ttl
        self._entries: dict[int, _Entry] = {}
        self._pending: dict[tuple[int, str], asyncio.Future[str]] = {}
        self.clock: Callable[[], float] = time.monotonic

    async def get(self, ciphertext: str, context: KeyContext) -> str:
        """The plaintext for this key, decrypting in the pool at most once at a time."""
        entry = self._entries.get(context.key_id)
        now = self.clock()
        if entry is not None and entry.version == ciphertext and entry.expires > now:
            return entry.plaintext
        pending_key = (context.key_id, ciphertext)
        pending = self._pending.get(pending_key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(self.executor, self.keyring.decrypt, ciphertext, context)
            )
            self._pending[pending_key] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(pending_key, None))
            plaintext = await pending
            self._entries[context.key_id] = _Entry(plaintext, ciphertext, self.clock() + self.ttl)
            return plaintext
        return await pending

    def forget(self, key_id: int) -> None:
        """Drop a key at once (changed, disabled or deleted in this process)."""
        self._entries.pop(key_id, None)
