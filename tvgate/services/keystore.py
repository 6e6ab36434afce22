"""Moving stored ciphertexts: rewrap after a Vault key rotation, migrate between keyring
backends, in batches that never overwrite a secret rotated meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tvgate.keyring import (
    KeyContext,
    Keyring,
    KeyringError,
    Rewrapper,
    backend_of,
)
from tvgate.models import (
    ProviderKey,
    database,
)
from tvgate.services.access import ServiceError


def update_ciphertext_if_unchanged(key_id: int, old: str, new: str) -> bool:
    """Store ``new`` only if the row still holds ``old`` (nobody rotated it meanwhile)."""
    updated = (
        ProviderKey.update(ciphertext=new)
        .where((ProviderKey.id == key_id) & (ProviderKey.ciphertext == old))
        .execute()
    )
    return bool(updated)


@dataclass
class CiphertextReport:
    """What a rewrap or migration did, row by row counted (names only, never secrets)."""

    updated: int = 0
    unchanged: int = 0
    conflicts: int = 0
    failed: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.conflicts


def _key_batches(batch_size: int) -> Iterator[list[tuple[int, str, KeyContext, str]]]:
    """Every key row as (id, name, context, ciphertext), ``batch_size`` rows at a time,
    by id, each batch read fresh (rows may change between batches)."""
    last = 0
    while True:
        rows = list(
            ProviderKey.select(
                ProviderKey.id,
                ProviderKey.org,
                ProviderKey.owner,
                ProviderKey.name,
                ProviderKey.ciphertext,
            )
            .where(ProviderKey.id > last)
            .order_by(ProviderKey.id)
            .limit(batch_size)
        )
        if not rows:
            return
        last = rows[-1].id
        yield [(r.id, r.name, KeyContext(r.org_id, r.id, r.owner_id), r.ciphertext) for r in rows]


def _store(
    report: CiphertextReport, changes: list[tuple[int, str, str, str]]
) -> list[tuple[int, str, str, str]]:
    """Write (id, name, old, new) changes in one transaction; returns the conflicting ones."""
    conflicts = []
    with database.atomic():
        for key_id, name, old, new in changes:
            if update_ciphertext_if_unchanged(key_id, old, new):
                report.updated += 1
            else:
                conflicts.append((key_id, name, old, new))
    return conflicts


def rewrap_keys(
    vault: Rewrapper,
    *,
    batch_size: int = 100,
    progress: Callable[[CiphertextReport], None] | None = None,
) -> CiphertextReport:
    """Move every vault ciphertext to the newest transit key version, while gateways serve.

    Vault rewraps without returning plaintext. Each batch is one Vault request and one
    transaction; a row is updated only if it still holds what was read, so a secret
    replaced meanwhile is never overwritten (it was encrypted under the newest version
    anyway). Rows of another backend are left alone.
    """
    if batch_size <= 0:
        raise ServiceError("batch size must be positive")
    report = CiphertextReport()
    for batch in _key_batches(batch_size):
        rows = [row for row in batch if backend_of(row[3]) == "vault"]
        report.unchanged += len(batch) - len(rows)
        results = vault.rewrap_batch([(ct, ctx) for _id, _name, ctx, ct in rows])
        changes = []
        for (key_id, name, _ctx, old), new in zip(rows, results, strict=True):
            if new is None:
                report.failed.append(name)
                continue
            version = new.split(":", 2)[1] if new.count(":") >= 2 else "?"
            report.versions[version] = report.versions.get(version, 0) + 1
            if new.split(":", 2)[:2] == old.split(":", 2)[:2]:
                report.unchanged += 1  # already under the newest version: no write needed
            else:
                changes.append((key_id, name, old, new))
        report.conflicts += len(_store(report, changes))
        if progress is not None:
            progress(report)
    return report


def migrate_keys(
    keyring: Keyring,
    target: Keyring,
    *,
    batch_size: int = 100,
    progress: Callable[[CiphertextReport], None] | None = None,
) -> CiphertextReport:
    """Re-encrypt every key with ``target`` (decrypting with ``keyring``, which reads every
    configured backend), while gateways serve: a gateway configured with both backends
    decrypts either form, so a row may switch at any moment. Rows changed meanwhile are
    retried once; the plaintexts never leave this process's memory."""
    if batch_size <= 0:
        raise ServiceError("batch size must be positive")
    report = CiphertextReport()

    def convert(
        row_id: int, name: str, ctx: KeyContext, old: str
    ) -> tuple[int, str, str, str] | None:
        try:
            new = target.encrypt(keyring.decrypt(old, ctx), ctx)
        except KeyringError:
            report.failed.append(name)
            return None
        return (row_id, name, old, new)

    for batch in _key_batches(batch_size):
        changes = []
        for row_id, name, ctx, old in batch:
            if backend_of(old) == target.name:
                report.unchanged += 1
                continue
            change = convert(row_id, name, ctx, old)
            if change is not None:
                changes.append(change)
        for key_id, name, _old, _new in _store(report, changes):
            # Rotated or migrated by someone else between our read and write: read it again.
            current = ProviderKey.get_or_none(ProviderKey.id == key_id)
            if current is None:
                continue  # deleted meanwhile: nothing left to migrate
            if backend_of(current.ciphertext) == target.name:
                report.unchanged += 1
                continue
            ctx = KeyContext(current.org_id, current.id, current.owner_id)
            retry = convert(key_id, name, ctx, current.ciphertext)
            if retry is not None and _store(report, [retry]):
                report.conflicts += 1  # changing under us again: left for the next run
        if progress is not None:
            progress(report)
    report.versions = _backend_counts()
    return report


def _backend_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in ProviderKey.select(ProviderKey.ciphertext):
        backend = backend_of(key.ciphertext)
        counts[backend] = counts.get(backend, 0) + 1
    return counts
