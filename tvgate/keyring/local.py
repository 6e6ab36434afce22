"""The local keyring: AES-256-GCM under a master key kept beside the data (the embedded default).

The master key comes from ``TVGATE_MASTER_KEY`` (base64 of 32 bytes) or from
``master.key`` in the data directory, created with mode 0600 on first start.
Each encryption uses a fresh 96-bit nonce; the key's org, id and owner are the
associated data, so a ciphertext moved to another row fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tvgate.config import ConfigError, Settings
from tvgate.keyring import LOCAL_PREFIX, KeyContext, KeyringError

PREFIX = LOCAL_PREFIX
NONCE_BYTES = 12


class LocalKeyring:
    name = "local"

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ConfigError("the local keyring's master key must be 32 bytes")
        #: Kept for the trace writer's process, which reads local ciphertexts itself (to
        #: redact them) as this process would: sent over its socket, never written.
        self.master_key = master_key
        self._aead = AESGCM(master_key)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalKeyring:
        if settings.master_key:
            try:
                return cls(base64.b64decode(settings.master_key, validate=True))
            except binascii.Error:
                raise ConfigError("master_key is not valid base64") from None
        return cls(load_or_create_key_file(Path(settings.data_dir) / "master.key"))

    def encrypt(self, plaintext: str, context: KeyContext) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.as_bytes())
        return PREFIX + base64.b64encode(nonce + sealed).decode()

    def decrypt(self, ciphertext: str, context: KeyContext) -> str:
        if not ciphertext.startswith(PREFIX):
            raise KeyringError("not a local keyring ciphertext")
        try:
            raw = base64.b64decode(ciphertext[len(PREFIX) :], validate=True)
            return self._aead.decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.as_bytes()
            ).decode()
        except (InvalidTag, binascii.Error, ValueError):
            # Never say more: the message may end up in a log or a response.
            raise KeyringError("key ciphertext does not decrypt for this key") from None

    def check(self) -> None:
        return None


def local_is_configured(settings: Settings) -> bool:
    """True when a master key exists (setting or file): then this process can read local
    ciphertexts even when another backend encrypts. The file is never created for that."""
    return bool(settings.master_key) or (Path(settings.data_dir) / "master.key").exists()


def load_or_create_key_file(path: Path) -> bytes:
    """Read the 32-byte master key file, creating it (mode 0600) when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) != 32:
            raise ConfigError(f"{path} must hold exactly 32 bytes") from None
        return data
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key
