"""asv benchmarks: every installed backend and a bare-dict baseline, across writers, keys and CPUs.

All preparation happens in ``setup``; impossible combinations (more CPUs
than the machine has) are skipped by raising ``NotImplementedError`` there.
Shared data is built once, deterministically. See the README for how to run
and read them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import aggregator_reference as ar
from aggregator_reference import _bench

BASELINE = _bench.BASELINE
BACKENDS = [*ar.backend_names(), BASELINE]
TOTAL_ADDS = 100_000


def cpu_counts() -> list[int]:
    """1, 2, 4, ... up to the CPUs this process may use (and that count itself)."""
    usable = _bench.usable_cpus()
    counts = [1 << i for i in range(usable.bit_length()) if 1 << i <= usable]
    return sorted({*counts, usable})


class Stat:
    """A small mutable record, merged in place."""

    __slots__ = ("count", "total")

    def __init__(self, count: int, total: int) -> None:
        self.count, self.total = count, total


def merge_stat(stored: Stat | tuple[int, int], incoming: Stat | tuple[int, int]) -> Stat:
    """Merge into a :class:`Stat`, in place; a ``(count, total)`` tuple is a new value.

    ``incoming`` may itself be a merged record: backends combine partial
    records (per thread, or re-queued ones) with ``merge`` too.
    """
    record = Stat(*stored) if isinstance(stored, tuple) else stored
    if isinstance(incoming, tuple):
        record.count += incoming[0]
        record.total += incoming[1]
    else:
        record.count += incoming.count
        record.total += incoming.total
    return record


class AddSuite:
    """Time for a fixed number of adds (100,000 over all writers), per backend."""

    params = (BACKENDS, [1, 2, 4, 8, 16], [1, 100, 10_000], cpu_counts())
    param_names = ["backend", "writers", "keys", "cpus"]
    number = 1
    repeat = (3, 10, 10.0)
    warmup_time = 0.0
    timeout = 120

    def setup(self, backend: str, writers: int, keys: int, cpus: int) -> None:
        if cpus > _bench.usable_cpus():
            raise NotImplementedError(f"only {_bench.usable_cpus()} CPUs here")
        self.affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, sorted(self.affinity)[:cpus])
        self.sequence = [i % keys for i in range(TOTAL_ADDS // writers)]
        self.keys = keys
        self.aggregators: list[Any] = []

    def teardown(self, backend: str, writers: int, keys: int, cpus: int) -> None:
        os.sched_setaffinity(0, self.affinity)
        for aggregator in self.aggregators:
            while not aggregator.closed:  # drain, so that a full output never stalls the teardown
                aggregator.drain()
                try:
                    aggregator.shutdown(timeout=1.0)
                except TimeoutError:
                    continue

    def _body(
        self, backend: str, merge: Callable[[Any, Any], Any], value: Any, start: Any
    ) -> Callable[[], None]:
        sequence = self.sequence
        if backend == BASELINE:
            shared = dict.fromkeys(range(self.keys), start)

            def bare() -> None:
                d = shared
                for key in sequence:
                    d[key] = merge(d[key], value)

            return bare
        aggregator: Any = ar.create(merge, backend=backend, flush_interval=None, max_pending=self.keys)
        self.aggregators.append(aggregator)

        def adding() -> None:
            add = aggregator.adder()  # each writer thread its own (ADD-8)
            for key in sequence:
                add(key, value)

        return adding

    def _run(self, body: Callable[[], None], writers: int) -> None:
        threads = [threading.Thread(target=body) for _ in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def time_add_int_sum(self, backend: str, writers: int, keys: int, cpus: int) -> None:
        self._run(self._body(backend, _bench.int_sum, 1, 0), writers)

    def time_add_record_in_place(self, backend: str, writers: int, keys: int, cpus: int) -> None:
        self._run(self._body(backend, merge_stat, (1, 5), (0, 0)), writers)


class AddManySuite:
    """100,000 pairs over 100 keys from one thread: ``add_many`` against a loop of ``add``.

    The baseline is the inline loop ``d[k] = merge(d[k], v)`` over the same pairs.
    """

    params = [BACKENDS]
    param_names = ["backend"]

    def setup(self, backend: str) -> None:
        self.pairs = [(i % 100, 1) for i in range(TOTAL_ADDS)]
        if backend == BASELINE:
            self.shared = dict.fromkeys(range(100), 0)
            return
        self.aggregator: Any = ar.create(_bench.int_sum, backend=backend, flush_interval=None)
        self.aggregator.add_many((key, 0) for key in range(100))

    def teardown(self, backend: str) -> None:
        if backend != BASELINE:
            self.aggregator.shutdown()

    def time_add_many(self, backend: str) -> None:
        if backend == BASELINE:
            d, merge = self.shared, _bench.int_sum
            for key, value in self.pairs:
                d[key] = merge(d[key], value)
        else:
            self.aggregator.add_many(self.pairs)

    def time_add_loop(self, backend: str) -> None:
        if backend == BASELINE:
            raise NotImplementedError  # time_add_many is the baseline's loop
        add = self.aggregator.add
        for key, value in self.pairs:
            add(key, value)


class FlushSuite:
    """flush() of 100,000 buffered keys, against putting the same tuples into a queue.Queue."""

    params = [ar.backend_names()]
    param_names = ["backend"]
    number = 1
    repeat = (3, 10, 10.0)
    warmup_time = 0.0

    def setup(self, backend: str) -> None:
        self.aggregator: Any = ar.create(
            _bench.int_sum, backend=backend, flush_interval=None, max_pending=100_000
        )
        for key in range(100_000):
            self.aggregator.add(key, key)

    def teardown(self, backend: str) -> None:
        self.aggregator.shutdown()

    def time_flush_100k(self, backend: str) -> None:
        self.aggregator.flush()

    def track_flush_over_queue_put(self, backend: str) -> float:
        flushed, queued = _bench.flush_cost(backend, 100_000, repeats=3)
        return flushed / queued

    track_flush_over_queue_put.unit = "ratio"  # type: ignore[attr-defined]


class FlushUnderWritersSuite:
    """How long a flush() takes while writer threads keep adding: its median over 20 flushes, in ms.

    A flush must take every writer's records; on a backend with per-thread
    buffers it waits for each add in flight, so a writer descheduled mid-add
    (more writers than cores) delays it.
    """

    params = [ar.backend_names(), [1, 2, 8]]
    param_names = ["backend", "writers"]
    number = 1
    repeat = 1
    warmup_time = 0.0
    timeout = 120.0

    def track_flush_ms_while_adding(self, backend: str, writers: int) -> float:
        import statistics
        import time

        aggregator: Any = ar.create(_bench.int_sum, backend=backend, flush_interval=None, max_pending=1 << 30)
        stop = threading.Event()

        def write() -> None:
            key = 0
            while not stop.is_set():
                aggregator.add(key % 100, 1)
                key += 1

        threads = [threading.Thread(target=write, daemon=True) for _ in range(writers)]
        for thread in threads:
            thread.start()
        took = []
        try:
            for _ in range(20):
                started = time.perf_counter()
                aggregator.flush()
                took.append((time.perf_counter() - started) * 1e3)
                aggregator.drain()
                time.sleep(0.005)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            aggregator.shutdown()
        return statistics.median(took)

    track_flush_ms_while_adding.unit = "ms"  # type: ignore[attr-defined]


class QueueBaseline:
    """The by-hand alternative to a flush: 100,000 ``queue.Queue.put`` calls."""

    number = 1
    repeat = (3, 10, 10.0)
    warmup_time = 0.0

    def setup(self) -> None:
        from queue import Queue

        self.items = [(key, key) for key in range(100_000)]
        self.queue: Any = Queue()

    def time_queue_put_100k(self) -> None:
        put = self.queue.put
        for item in self.items:
            put(item)


class MemorySuite:
    """1,000,000 buffered ``int`` records, against a plain dict holding the same."""

    params = [BACKENDS]
    param_names = ["backend"]
    timeout = 300

    def peakmem_1m_records(self, backend: str) -> None:
        if backend == BASELINE:
            kept: Any = {key: key for key in range(1_000_000)}
        else:
            kept = ar.create(_bench.int_sum, backend=backend, flush_interval=None)
            for key in range(1_000_000):
                kept.add(key, key)
        del kept

    def track_memory_over_dict(self, backend: str) -> float:
        if backend == BASELINE:
            return 1.0
        return _bench.memory_ratio(backend, 1_000_000)

    track_memory_over_dict.unit = "ratio"  # type: ignore[attr-defined]
