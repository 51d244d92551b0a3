"""The ``striped`` backend: one shared dict, a power-of-two array of lock stripes.

A key's stripe is chosen from its hash and ``add`` takes only that stripe's
lock, so writers to different stripes never wait on each other. A flush takes
every stripe (in index order) to swap the dict, so no merge still running
against the old dict can be lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar, final

import aggregator_reference as ar
from aggregator_reference import kit

__all__ = ["DEFAULT_STRIPES", "StripedAggregator", "StripedStorage"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Stripes used when no ``shards`` hint is given.
DEFAULT_STRIPES = 64


@final
class StripedStorage(Generic[K, V]):
    """A :class:`~aggregator_reference.Storage`: one dict, ``shards`` lock stripes.

    Thread safety: stripe ``i`` guards the records whose ``hash(key) &
    (shards - 1) == i`` in ``_data``, and ``_states[i]``/``_merges[i]``/
    ``_stored[i]``. Replacing ``_data`` or ``_transit`` needs every stripe,
    taken in index order (the only order in which several are taken). Stripes
    are reentrant so that ``merge`` may read; ``_states`` refuses the rest.
    """

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        self.shards = DEFAULT_STRIPES if shards is None else shards
        self._merge = merge
        self._mask = self.shards - 1
        self._stripes = tuple(threading.RLock() for _ in range(self.shards))
        self._states = [kit.OPEN] * self.shards
        self._merges = [0] * self.shards
        self._stored = [0] * self.shards
        self._data: dict[K, V] = {}
        self._transit: tuple[Mapping[K, V], ...] = ()

    def add(self, key: K, value: V, /) -> bool:
        """Merge or store under the key's stripe; see :meth:`aggregator_reference.Aggregator.add`."""
        stripe = hash(key) & self._mask
        with self._stripes[stripe]:
            states = self._states
            if states[stripe]:
                kit.refuse(states[stripe], "add()")
            data = self._data
            if key in data:
                states[stripe] = kit.MERGING
                try:
                    data[key] = self._merge(data[key], value)
                finally:
                    states[stripe] = kit.OPEN
                self._merges[stripe] += 1
                return True
            data[key] = value
            self._stored[stripe] += 1
            return False

    @contextmanager
    def _all_stripes(self) -> Iterator[None]:
        """Hold every stripe, taken in index order."""
        taken = 0
        try:
            for lock in self._stripes:
                lock.acquire()
                taken += 1
            yield
        finally:
            for lock in self._stripes[:taken]:
                lock.release()

    def get(self, key: K, default: Any, /) -> Any:
        with self._stripes[hash(key) & self._mask]:
            return kit.lookup(self._data, self._transit, key, default)

    def snapshot(self) -> dict[K, V]:
        with self._all_stripes():
            return kit.visible_records(self._data, self._transit)

    def __len__(self) -> int:
        with self._all_stripes():
            return kit.count_visible(self._data, self._transit)

    def detach(self) -> list[Mapping[K, V]]:
        if not self._data:
            return []
        with self._all_stripes():
            if kit.MERGING in self._states:  # with every stripe held, only this thread can be merging
                kit.refuse(kit.MERGING, "flush()")
            chunk, self._data = self._data, {}
            self._transit = (chunk,)
        return [chunk]

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        with self._all_stripes():
            states = list(self._states)
            self._states[:] = [kit.MERGING] * self.shards
            try:
                return kit.requeue_into(self._data, leftover, self._merge)
            finally:
                self._states[:] = states
                self._transit = ()

    def close(self) -> None:
        with self._all_stripes():
            if kit.MERGING in self._states:
                kit.refuse(kit.MERGING, "shutdown()")
            self._states[:] = [kit.CLOSED] * self.shards

    def counts(self) -> tuple[int, int]:
        return sum(self._merges), sum(self._stored)


@final
class StripedAggregator(ar.BufferedAggregator[K, V]):
    """One shared dict behind a power-of-two array of lock stripes chosen by key hash.

    Entry point ``striped``; the shared engine over :class:`StripedStorage`.
    """

    storage_class = StripedStorage
