"""The reference backend: one lock, one dict, obviously correct.

The conformance suite compares every other backend against the behaviour
written down here; speed is not its concern.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar, final

from . import _kit as kit
from ._engine import BufferedAggregator

__all__ = ["ReferenceAggregator", "ReferenceStorage"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@final
class ReferenceStorage(Generic[K, V]):
    """A :class:`~aggregator_reference.Storage` with one dict behind one lock.

    Thread safety: ``_lock`` (a plain ``Lock``) guards every attribute except
    the counters' reads. It is taken as :func:`kit.finish_acquire` says, so
    waiting threads yield the GIL instead of forming a convoy, and a call from
    inside ``merge`` raises ``ReentrantMergeError`` instead of waiting for
    itself. ``shards`` is always 1; the ``shards`` hint is ignored.
    """

    shards = 1

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        self._merge = merge
        # Guards everything below.
        self._lock = threading.Lock()
        self._data: dict[K, V] = {}
        # The chunk a flush detached and has not yet settled with requeue().
        self._transit: tuple[Mapping[K, V], ...] = ()
        self._closed = False
        self._merges = 0
        self._stored = 0

    @kit.holds_locks
    def add(self, key: K, value: V, /) -> bool:
        """Merge ``value`` into ``key``'s record or store it; see :meth:`Aggregator.add`."""
        held = self._lock
        if not held.acquire(False):
            kit.finish_acquire(held, "add()", closed=self._closed)
        try:
            if self._closed:
                kit.refuse_closed("add()")
            data = self._data
            if key in data:
                data[key] = self._merge(data[key], value)
                self._merges += 1
                return True
            data[key] = value
            self._stored += 1
            return False
        finally:
            held.release()

    def get(self, key: K, default: Any, /) -> Any:
        return kit.call_holding(
            self._lock, "get()", lambda: kit.lookup(self._data, self._transit, key, default)
        )

    def snapshot(self) -> dict[K, V]:
        with kit.holding(self._lock, "snapshot()"):
            return kit.visible_records(self._data, self._transit)

    def __len__(self) -> int:
        with kit.holding(self._lock, "len()"):
            return kit.count_visible(self._data, self._transit)

    def detach(self) -> list[Mapping[K, V]]:
        with kit.holding(self._lock, "flush()"):
            if not self._data:
                return []
            chunk, self._data = self._data, {}
            self._transit = (chunk,)
            return [chunk]

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        def settle() -> list[tuple[K, V]]:
            failed = kit.requeue_into(self._data, leftover, self._merge)
            self._transit = ()
            return failed

        return kit.call_holding(self._lock, "flush()", settle)

    def stop_adds(self) -> None:
        self._closed = True  # add() reads it under the lock; an add already past the check finishes

    def close(self) -> None:
        with kit.holding(self._lock, "shutdown()"):  # waits for the add in flight
            self._closed = True

    def counts(self) -> tuple[int, int]:
        # Without the lock, so that stats() never waits for a merge; each int is read whole.
        return self._merges, self._stored


@final
class ReferenceAggregator(BufferedAggregator[K, V]):
    """One lock, one dict: the obviously correct model the other backends are checked against.

    Entry point ``reference``; the shared engine over :class:`ReferenceStorage`.
    """

    storage_class = ReferenceStorage
