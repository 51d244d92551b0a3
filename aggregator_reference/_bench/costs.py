"""What one part of an aggregator costs, measured on its own: flush, memory, the floor of a Python ``add``.

Flush against putting the same tuples into a ``queue.Queue``, memory against
a plain dict, and the floor: a method doing more and more of an ``add``.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable
from queue import Queue
from typing import Any

from .._registry import create
from .writers import MERGES, Body, adding, bare_dict, int_sum, timed

__all__ = ["floor_breakdown", "flush_cost", "memory_ratio"]


# -- flush and memory -------------------------------------------------------------------------


def flush_cost(backend: str, records: int, repeats: int) -> tuple[float, float]:
    """``(seconds to flush(), seconds to put the same tuples into a queue.Queue)``, best of ``repeats``."""
    flush_times, queue_times = [], []
    for _ in range(repeats):
        aggregator: Any = create(int_sum, backend=backend, flush_interval=None, max_pending=records)
        for key in range(records):
            aggregator.add(key, key)
        items = list(aggregator.snapshot().items())
        started = time.perf_counter()
        aggregator.flush()
        flush_times.append(time.perf_counter() - started)
        aggregator.shutdown()
        aggregator.drain()
        queue: Queue[tuple[int, int]] = Queue()
        started = time.perf_counter()
        for item in items:
            queue.put(item)
        queue_times.append(time.perf_counter() - started)
    return min(flush_times), min(queue_times)


def memory_ratio(backend: str, records: int) -> float:
    """Bytes traced while ``records`` int records are buffered, over a plain dict of the same."""

    def traced(build: Callable[[], object]) -> int:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = build()
            after = tracemalloc.get_traced_memory()[0]
            del kept
        finally:
            tracemalloc.stop()
        return after - before

    values = list(range(1000, 1000 + records))  # allocated outside the trace: shared by both

    def plain() -> object:
        return dict(zip(range(records), values, strict=True))

    def buffered() -> object:
        aggregator: Any = create(int_sum, backend=backend, flush_interval=None, max_pending=1)
        for key, value in zip(range(records), values, strict=True):
            aggregator.add(key, value)
        return aggregator

    return traced(buffered) / traced(plain)


# -- the floor of a Python add ------------------------------------------------------------


class _FloorProbe:
    """The steps of an ``add`` one at a time, to show what each costs (``bench --floor``)."""

    def __init__(self, merge: Callable[[int, int], int], keys: int) -> None:
        self.data = dict.fromkeys(range(keys), 0)
        self.merge = merge
        self.lock = threading.Lock()

    def update(self, key: int, value: int) -> None:
        data = self.data
        data[key] = self.merge(data[key], value)

    def update_checked(self, key: int, value: int) -> bool:
        data = self.data
        if key in data:
            data[key] = self.merge(data[key], value)
            return True
        data[key] = value
        return False

    def update_locked(self, key: int, value: int) -> bool:
        held = self.lock
        if not held.acquire(False):
            held.acquire()
        try:
            data = self.data
            if key in data:
                data[key] = self.merge(data[key], value)
                return True
            data[key] = value
            return False
        finally:
            held.release()


def floor_breakdown(keys: int, adds: int, repeats: int, merge: str = "python") -> dict[str, float]:
    """ns per add, one writer: the inline loop, then a method doing more and more of an ``add``."""
    function = MERGES[merge]
    sequence = [i % keys for i in range(adds)]
    probe = _FloorProbe(function, keys)
    steps: dict[str, Body] = {
        "inline d[k] = merge(d[k], v)": bare_dict(dict.fromkeys(range(keys), 0), function),
        "method: the update only": adding(lambda: probe.update),
        "method: + key test, return value": adding(lambda: probe.update_checked),
        "method: + Lock acquire/release": adding(lambda: probe.update_locked),
    }
    result: dict[str, float] = {}
    for name, body in steps.items():
        best = min(timed(body, 1, sequence) for _ in range(repeats))
        result[name] = best / adds * 1e9
    return result
