"""The ``striped`` backend: one shared dict, a power-of-two array of lock stripes.

A key's stripe is chosen from its hash and ``add`` takes only that stripe's
lock, so writers to different stripes never wait on each other. A flush takes
every stripe (in index order) to swap the dict, so no merge still running
against the old dict can be lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
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

    Thread safety: stripe ``i`` (a plain ``Lock``) guards the records whose
    ``hash(key) & (shards - 1) == i`` in ``_data``, and ``_merges[i]`` and
    ``_stored[i]``. Replacing ``_data``/``_transit`` or setting ``_closed``
    needs every stripe, taken in index order (the only order in which several
    are taken). Stripes are taken as :func:`kit.finish_acquire` says: no convoy
    with the GIL, and a call from inside ``merge`` that needs the stripe
    ``merge`` runs under raises ``ReentrantMergeError``.
    """

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        self.shards = DEFAULT_STRIPES if shards is None else shards
        self._merge = merge
        self._mask = self.shards - 1
        self._stripes = tuple(threading.Lock() for _ in range(self.shards))
        self._merges = [0] * self.shards
        self._stored = [0] * self.shards
        self._closed = False
        self._data: dict[K, V] = {}
        self._transit: tuple[Mapping[K, V], ...] = ()

    @kit.holds_locks
    def add(self, key: K, value: V, /) -> bool:
        """Merge or store under the key's stripe; see :meth:`aggregator_reference.Aggregator.add`."""
        stripe = hash(key) & self._mask
        held = self._stripes[stripe]
        if not held.acquire(False):
            kit.finish_acquire(held, "add()", closed=self._closed)
        try:
            if self._closed:
                kit.refuse_closed("add()")
            data = self._data
            if key in data:
                data[key] = self._merge(data[key], value)
                self._merges[stripe] += 1
                return True
            data[key] = value
            self._stored[stripe] += 1
            return False
        finally:
            held.release()

    def get(self, key: K, default: Any, /) -> Any:
        stripe = self._stripes[hash(key) & self._mask]
        return kit.call_holding(stripe, "get()", lambda: kit.lookup(self._data, self._transit, key, default))

    def snapshot(self) -> dict[K, V]:
        with kit.holding_all(self._stripes, "snapshot()"):
            return kit.visible_records(self._data, self._transit)

    def __len__(self) -> int:
        with kit.holding_all(self._stripes, "len()"):
            return kit.count_visible(self._data, self._transit)

    def detach(self) -> list[Mapping[K, V]]:
        if not self._data:
            return []
        with kit.holding_all(self._stripes, "flush()"):
            chunk, self._data = self._data, {}
            self._transit = (chunk,)
        return [chunk]

    @kit.holds_locks
    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        kit.acquire_all(self._stripes, "flush()")
        all_held = self._stripes
        try:
            failed = kit.requeue_into(self._data, leftover, self._merge)
            self._transit = ()
            return failed
        finally:
            kit.release_all(all_held)

    def stop_adds(self) -> None:
        self._closed = True  # add() reads it under a stripe; an add already past the check finishes

    def close(self) -> None:
        with kit.holding_all(self._stripes, "shutdown()"):  # waits for the adds in flight
            self._closed = True

    def counts(self) -> tuple[int, int]:
        return sum(self._merges), sum(self._stored)


@final
class StripedAggregator(ar.BufferedAggregator[K, V]):
    """One shared dict behind a power-of-two array of lock stripes chosen by key hash.

    Entry point ``striped``; the shared engine over :class:`StripedStorage`.
    """

    storage_class = StripedStorage
