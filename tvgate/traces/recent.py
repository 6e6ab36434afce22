"""Recent items per key, most recent first, bounded in count per key and in bytes in all.

The trace writer's last bodies per conversation (:mod:`tvgate.traces.conversations`) and
the serving process's last translated bodies per caller (:mod:`tvgate.translate.history`)
are both such a memory: an item that a new one continues is replaced by it, a key's
oldest items go past ``per_key``, and the least recently used key's oldest items go
while the bytes held are over ``budget``. An item over a quarter of the budget is not
kept (one conversation must not push out every other).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar


class _Sized(Protocol):
    @property
    def size(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=_Sized)


class Recent(Generic[K, V]):
    """Items per key, most recent first; ``size``: the bytes they hold in all."""

    def __init__(self, budget: int, per_key: int) -> None:
        self.budget = budget
        self.per_key = per_key
        self.size = 0
        self._items: OrderedDict[K, list[V]] = OrderedDict()

    def get(self, key: K) -> list[V]:
        """The items of ``key``, most recent first (not to be changed)."""
        return self._items.get(key, [])

    def touch(self, key: K) -> None:
        """``key`` was used: the last to lose its items to the budget."""
        if key in self._items:
            self._items.move_to_end(key)

    def add(self, key: K, item: V, replacing: V | None = None) -> None:
        """``item`` first among ``key``'s, in place of ``replacing`` (which it continues)."""
        if item.size > self.budget // 4:
            return
        items = self._items.setdefault(key, [])
        self._items.move_to_end(key)
        if replacing is not None and replacing in items:
            # It went on from `replacing`: the new item holds all it was kept for.
            items.remove(replacing)
            self.size -= replacing.size
        items.insert(0, item)
        self.size += item.size
        while len(items) > self.per_key:
            self.size -= items.pop().size
        while self.size > self.budget:
            oldest_key, oldest = next(iter(self._items.items()))
            self.size -= oldest.pop().size
            if not oldest:
                del self._items[oldest_key]

    def clear(self) -> None:
        self._items.clear()
        self.size = 0
