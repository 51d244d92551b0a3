"""The reference backend: one lock, one dict, obviously correct.

The conformance suite compares every other backend against the behaviour
written down here; speed is not its concern.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar, final

from ._engine import BufferedAggregator
from ._kit import CLOSED, MERGING, OPEN, count_visible, lookup, refuse, requeue_into, visible_records

__all__ = ["ReferenceAggregator", "ReferenceStorage"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@final
class ReferenceStorage(Generic[K, V]):
    """A :class:`~aggregator_reference.Storage` with one dict behind one lock.

    Thread safety: ``_lock`` guards every attribute; it is reentrant so that a
    ``merge`` may read the buffer (``get``/``snapshot``/``len``), while ``add``,
    ``detach`` and ``close`` from inside ``merge`` are refused through the
    ``MERGING`` state. ``shards`` is always 1; the ``shards`` hint is ignored.
    """

    shards = 1

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        self._merge = merge
        # Guards everything below.
        self._lock = threading.RLock()
        self._data: dict[K, V] = {}
        # The chunk a flush detached and has not yet settled with requeue().
        self._transit: tuple[Mapping[K, V], ...] = ()
        self._state = OPEN
        self._merges = 0
        self._stored = 0

    def add(self, key: K, value: V, /) -> bool:
        """Merge ``value`` into ``key``'s record or store it; see :meth:`Aggregator.add`."""
        with self._lock:
            if self._state:
                refuse(self._state, "add()")
            data = self._data
            if key in data:
                self._state = MERGING
                try:
                    data[key] = self._merge(data[key], value)
                finally:
                    self._state = OPEN
                self._merges += 1
                return True
            data[key] = value
            self._stored += 1
            return False

    def get(self, key: K, default: Any, /) -> Any:
        with self._lock:
            return lookup(self._data, self._transit, key, default)

    def snapshot(self) -> dict[K, V]:
        with self._lock:
            return visible_records(self._data, self._transit)

    def __len__(self) -> int:
        with self._lock:
            return count_visible(self._data, self._transit)

    def detach(self) -> list[Mapping[K, V]]:
        with self._lock:
            if self._state == MERGING:
                refuse(MERGING, "flush()")
            if not self._data:
                return []
            chunk, self._data = self._data, {}
            self._transit = (chunk,)
            return [chunk]

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        with self._lock:
            state, self._state = self._state, MERGING
            try:
                failed = requeue_into(self._data, leftover, self._merge)
            finally:
                self._state = state
            self._transit = ()
            return failed

    def close(self) -> None:
        with self._lock:
            if self._state == MERGING:
                refuse(MERGING, "shutdown()")
            self._state = CLOSED

    def counts(self) -> tuple[int, int]:
        # Without the lock, so that stats() never waits for a merge; each int is read whole.
        return self._merges, self._stored


@final
class ReferenceAggregator(BufferedAggregator[K, V]):
    """One lock, one dict: the obviously correct model the other backends are checked against.

    Entry point ``reference``; the shared engine over :class:`ReferenceStorage`.
    """

    storage_class = ReferenceStorage
