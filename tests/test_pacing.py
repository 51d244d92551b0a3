"""The engine's flusher and bound (``aggregator_reference._pacing``) with a storage that stalls a flush.

A lock-based storage holds its lock through a re-queue, so adds cannot run
while one stalls there; this one stalls *before* taking it, as a storage with
per-thread buffers may, so that the engine's own order of events shows.
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Mapping
from typing import Any

import aggregator_reference as ar


class StallingStorage:
    """The reference storage, whose ``requeue`` first waits for ``release`` when ``stall`` is set."""

    stall = False

    def __init__(self, merge: Any, shards: int | None) -> None:
        self._inner: Any = ar.ReferenceStorage(merge, shards)
        self.entered, self.release = threading.Event(), threading.Event()
        self.add = self._inner.add
        self.shards = 1

    def get(self, key: Any, default: object, /) -> object:
        return self._inner.get(key, default)

    def snapshot(self) -> dict[Any, Any]:
        return dict(self._inner.snapshot())

    def __len__(self) -> int:
        return len(self._inner)

    def detach(self) -> list[Mapping[Any, Any]]:
        return list(self._inner.detach())

    def requeue(self, chunk: Mapping[Any, Any], leftover: list[tuple[Any, Any]], /) -> list[tuple[Any, Any]]:
        if self.stall:
            self.entered.set()
            self.release.wait(30)
        return list(self._inner.requeue(chunk, leftover))

    def stop_adds(self) -> None:
        self._inner.stop_adds()

    def close(self) -> None:
        self._inner.close()

    def counts(self) -> tuple[int, int]:
        merges, stored = self._inner.counts()
        return merges, stored


class StallingAggregator(ar.BufferedAggregator[Any, Any]):
    storage_class = StallingStorage


def test_an_early_flush_asked_for_during_another_flush_waits_for_it_then_runs() -> None:
    # BUF-3 and FLUSH-4: an early flush is not a periodic tick, so it is never skipped: the
    # running flush took the buffer before the records that asked for this one arrived.
    agg: Any = StallingAggregator(operator.add, flush_interval=None, max_pending=1, flush_at=5)
    storage: Any = agg._storage
    agg.add("fill", 1)
    agg.flush()  # the output is full: the next flush re-queues, and stalls there
    agg.add("first", 1)
    storage.stall = True
    flushing = threading.Thread(target=agg.flush, daemon=True)
    flushing.start()
    try:
        assert storage.entered.wait(10), "the manual flush did not reach its re-queue"
        for key in range(4):  # after that flush's detach: the 4th brings the buffer to 5
            agg.add(key, 1)
        assert [key for key, _ in agg.drain()] == ["fill"]
    finally:
        storage.stall = False
        storage.release.set()
    flushing.join(10)
    assert not flushing.is_alive()
    deadline = time.monotonic() + 10
    while agg.stats().early_flushes < 1 or agg.pending < 1:
        assert time.monotonic() < deadline, f"no early flush after the manual one: {agg.stats()}"
        time.sleep(0.005)
    delivered = [("fill", 1)]
    while not agg.closed:  # the output holds one record at a time: drain while shutting down
        delivered += agg.drain()
        try:
            agg.shutdown(timeout=0.05)
        except TimeoutError:
            assert time.monotonic() < deadline + 10, "shutdown() never completed"
    delivered += agg.drain()
    assert sorted(delivered, key=repr) == sorted(
        [("fill", 1), ("first", 1)] + [(k, 1) for k in range(4)], key=repr
    )
