"""The ``sharded`` backend: N shards, each its own dict and lock; a flush detaches shard by shard.

The design of the Go library this project descends from, without its weak
spots: re-queued records merge older first; ``add`` after shutdown raises
instead of vanishing; shutdown waits on a condition instead of polling; flushes
never overlap; reads see records while they are being flushed; empty shards
cost nothing at flush.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar, final

import aggregator_reference as ar
from aggregator_reference import kit

__all__ = ["ShardedAggregator", "ShardedStorage", "default_shard_count"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def default_shard_count() -> int:
    """The next power of two >= the CPUs this process may use, and at least 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(4, 1 << (cpus - 1).bit_length())


@final
class _Shard(Generic[K, V]):
    """One shard; ``lock`` (a plain ``Lock``) guards every other attribute."""

    __slots__ = ("closed", "data", "lock", "merges", "stored", "transit")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[K, V] = {}
        self.transit: tuple[Mapping[K, V], ...] = ()  # detached, not yet settled by requeue()
        self.closed = False
        self.merges = 0
        self.stored = 0


@final
class ShardedStorage(Generic[K, V]):
    """A :class:`~aggregator_reference.Storage` of ``shards`` independently locked dicts.

    A key's shard is ``hash(key) & (shards - 1)``; ``add`` takes only that
    shard's lock. ``detach`` swaps each non-empty shard's dict under its lock
    (phase one); the engine then hands the chunks to the output (phase two)
    and ``requeue`` settles each chunk under its shard's lock.

    Thread safety: each shard's attributes are guarded by its own lock, taken
    as :func:`kit.finish_acquire` says (no convoy with the GIL; a call from
    inside ``merge`` that needs the shard ``merge`` runs under raises
    ``ReentrantMergeError``). Several shard locks are only ever held together
    by ``close``, taken in index order.
    """

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        self.shards = default_shard_count() if shards is None else shards
        self._merge = merge
        self._mask = self.shards - 1
        self._shards: tuple[_Shard[K, V], ...] = tuple(_Shard() for _ in range(self.shards))
        # id(chunk) -> its shard, for the chunks of the flush in progress (flush-only state).
        self._owner: dict[int, _Shard[K, V]] = {}

    @kit.holds_locks
    def add(self, key: K, value: V, /) -> bool:
        """Merge into or store in the key's shard; see :meth:`aggregator_reference.Aggregator.add`."""
        shard = self._shards[hash(key) & self._mask]
        held = shard.lock
        if not held.acquire(False):
            kit.finish_acquire(held, "add()", closed=shard.closed)
        try:
            if shard.closed:
                kit.refuse_closed("add()")
            data = shard.data
            if key in data:
                data[key] = self._merge(data[key], value)
                shard.merges += 1
                return True
            data[key] = value
            shard.stored += 1
            return False
        finally:
            held.release()

    def get(self, key: K, default: Any, /) -> Any:
        shard = self._shards[hash(key) & self._mask]
        return kit.call_holding(
            shard.lock, "get()", lambda: kit.lookup(shard.data, shard.transit, key, default)
        )

    def snapshot(self) -> dict[K, V]:
        result: dict[K, V] = {}
        for shard in self._shards:
            with kit.holding(shard.lock, "snapshot()"):
                result.update(kit.visible_records(shard.data, shard.transit))
        return result

    def __len__(self) -> int:
        total = 0
        for shard in self._shards:
            with kit.holding(shard.lock, "len()"):
                total += kit.count_visible(shard.data, shard.transit)
        return total

    def detach(self) -> list[Mapping[K, V]]:
        # Refused before any shard is detached: nothing to undo (an undo would merge, and could fail).
        if kit.in_user_code_of(self):
            kit.refuse_reentrant("flush()")
        chunks: list[Mapping[K, V]] = []
        for shard in self._shards:
            if not shard.data:  # unlocked peek: an empty shard costs nothing
                continue
            with kit.holding(shard.lock, "flush()"):  # outside user code: waits, never refuses
                if not shard.data:
                    continue
                chunk, shard.data = shard.data, {}
                shard.transit = (chunk,)
            self._owner[id(chunk)] = shard
            chunks.append(chunk)
        return chunks

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        shard = self._owner.pop(id(chunk))

        def settle() -> list[tuple[K, V]]:
            failed = kit.requeue_into(shard.data, leftover, self._merge)
            shard.transit = ()
            return failed

        return kit.call_holding(shard.lock, "flush()", settle)

    def stop_adds(self) -> None:
        for shard in self._shards:  # add() reads it under the shard's lock
            shard.closed = True

    def close(self) -> None:
        with kit.holding_all([shard.lock for shard in self._shards], "shutdown()"):  # adds in flight
            for shard in self._shards:
                shard.closed = True

    def counts(self) -> tuple[int, int]:
        return sum(s.merges for s in self._shards), sum(s.stored for s in self._shards)


@final
class ShardedAggregator(ar.BufferedAggregator[K, V]):
    """N shards (next power of two >= CPUs, at least 4), each a dict behind its own lock.

    Entry point ``sharded``; the shared engine over :class:`ShardedStorage`.
    """

    storage_class = ShardedStorage
