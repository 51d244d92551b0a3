"""What one part of an aggregator costs, measured on its own: the pieces ``bench`` reports below its table.

The writer loops and their timing live here too, so that :mod:`._bench`
(the side-by-side run) and these measurements share them: flush against
``queue.Queue``, memory against a plain dict, the floor of a Python ``add``,
the process ceiling, and the consumers (``records()``, ``batches()``,
``arecords()``, ``abatches()``) with ``add_many`` against a loop of ``add``, and
``add`` with ``max_buffered`` set against ``add`` without.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import operator
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

from ._registry import create

__all__ = [
    "BASELINE",
    "CONSUMERS",
    "MERGES",
    "Body",
    "Consumption",
    "adding",
    "bare_dict",
    "consumer_rate",
    "consumption",
    "floor_breakdown",
    "flush_cost",
    "int_sum",
    "memory_ratio",
    "process_ceiling",
    "timed",
]

BASELINE = "dict"
Body = Callable[[list[int]], None]


def int_sum(stored: int, incoming: int) -> int:
    """The default merge: an ``int`` sum written as a user would."""
    return stored + incoming


MERGES: dict[str, Callable[[int, int], int]] = {"python": int_sum, "operator": operator.add}

# -- writer loops: module-level functions, one attribute lookup outside the loop ----------


def adding(make_add: Callable[[], Callable[[int, int], Any]]) -> Body:
    """A writer calling ``add(key, 1)`` for every key in its sequence, ``add = make_add()`` its own.

    Each writer thread takes its own ``add`` object, as ``adder()`` (ADD-8) gives it: on a
    free-threaded build, threads calling one shared object contend on its reference count.
    """

    def body(sequence: list[int]) -> None:
        add = make_add()
        for key in sequence:
            add(key, 1)

    return body


def bare_dict(shared: dict[int, int], merge: Callable[[int, int], int]) -> Body:
    """The baseline writer: ``d[k] = merge(d[k], 1)`` into a shared dict, no lock."""

    def body(sequence: list[int]) -> None:
        d = shared
        for key in sequence:
            d[key] = merge(d[key], 1)

    return body


def timed(body: Body, writers: int, sequence: list[int]) -> float:
    """Wall time for ``writers`` threads each running ``body(sequence)``, started on a barrier."""
    barrier = threading.Barrier(writers + 1)

    def run() -> None:
        barrier.wait()
        body(sequence)

    threads = [threading.Thread(target=run) for _ in range(writers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


# -- the process ceiling ------------------------------------------------------------------


def _process_worker(  # noqa: PLR0917 (a Process target: positional arguments)
    backend: str, keys: int, adds: int, merge_name: str, sync: tuple[Any, Any, Any], slot: int
) -> None:
    ready, go, times = sync
    merge = MERGES[merge_name]
    sequence = [i % keys for i in range(adds)]
    aggregator = None  # kept until the adds are done: an add may not outlive its aggregator
    if backend == BASELINE:
        body = bare_dict(dict.fromkeys(range(keys), 0), merge)
    else:
        aggregator = create(merge, backend=backend, flush_interval=None)
        body = adding(aggregator.adder)
    ready.wait()
    go.wait()
    started = time.perf_counter()
    body(sequence)
    times[2 * slot], times[2 * slot + 1] = started, time.perf_counter()
    if aggregator is not None:
        aggregator.shutdown()


def process_ceiling(backend: str, processes: int, keys: int, *, adds: int, repeats: int, merge: str) -> float:
    """Throughput of ``processes`` independent processes doing one writer's work, over one process."""
    context = multiprocessing.get_context("spawn")

    def wall(count: int) -> float:
        ready, go = context.Barrier(count + 1), context.Event()
        times = context.Array("d", 2 * count)
        workers = [
            context.Process(
                target=_process_worker, args=(backend, keys, adds, merge, (ready, go, times), slot)
            )
            for slot in range(count)
        ]
        for worker in workers:
            worker.start()
        ready.wait()
        go.set()
        for worker in workers:
            worker.join()
        return float(max(times[1::2]) - min(times[0::2]))

    one = min(wall(1) for _ in range(repeats))
    many = min(wall(processes) for _ in range(repeats))
    return processes * one / many


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


# -- consumers and add_many -----------------------------------------------------------------

CONSUMERS = ("records", "batches", "arecords", "abatches")
BATCH_SIZE, BATCH_WAIT = 500, 0.5  # batches()/abatches() as the contract's defaults (OUT-5)


@dataclass
class Consumption:
    """One backend's consumers and ``add_many``, measured in one run (``bench --consumers N``)."""

    records: int  # records moved through each consumer; also the pairs given to add_many
    keys: int  # distinct keys among the add_many pairs
    per_s: dict[str, float] = field(default_factory=dict)  # records/s through each of CONSUMERS
    vs_records: dict[str, float] = field(default_factory=dict)  # each over records() in the same run
    add_ns: float = 0.0  # ns per pair, a loop of add(key, value)
    add_many_ns: float = 0.0  # ns per pair, one add_many(pairs)
    add_many_vs_add: float = 0.0  # add_many_ns / add_ns
    bounded_ns: float = 0.0  # ns per pair, a loop of add with max_buffered set (never reached)
    bounded_vs_add: float = 0.0  # bounded_ns / add_ns


def _through_records(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    for _ in aggregator.records():
        count += 1
    return count, time.perf_counter() - started


def _through_batches(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    for batch in aggregator.batches(BATCH_SIZE, BATCH_WAIT):
        count += len(batch)
    return count, time.perf_counter() - started


async def _through_arecords(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()  # timed inside the loop: its start-up is not the consumer's
    async for _ in aggregator.arecords():
        count += 1
    return count, time.perf_counter() - started


async def _through_abatches(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    async for batch in aggregator.abatches(BATCH_SIZE, BATCH_WAIT):
        count += len(batch)
    return count, time.perf_counter() - started


def consumer_rate(backend: str, kind: str, records: int) -> float:
    """Records per second through one consumer of ``kind`` (one of :data:`CONSUMERS`).

    ``records`` distinct keys go through one full flush into the output; after
    ``shutdown()`` the consumer takes them until its iterator ends, so the
    figure is the consumer's own cost per record, with no wait for a flush.

    Raises:
        RuntimeError: the consumer did not get exactly ``records`` records.
    """
    aggregator: Any = create(int_sum, backend=backend, flush_interval=None, max_pending=records)
    add = aggregator.add
    for key in range(records):
        add(key, 1)
    aggregator.flush()
    aggregator.shutdown()
    if kind == "records":
        count, seconds = _through_records(aggregator)
    elif kind == "batches":
        count, seconds = _through_batches(aggregator)
    elif kind == "arecords":
        count, seconds = asyncio.run(_through_arecords(aggregator))
    else:
        count, seconds = asyncio.run(_through_abatches(aggregator))
    if count != records:
        raise RuntimeError(f"{backend} {kind}(): consumed {count} of {records} records")
    return records / seconds


def _pairs_cost(
    backend: str, pairs: list[tuple[int, int]], keys: int, *, many: bool = False, bounded: bool = False
) -> float:
    """Seconds for one writer to add ``pairs``, by ``add_many`` or by a loop of ``add``.

    ``bounded``: with ``max_buffered`` set, twice the keys, so that no add waits (BUF-1).
    """
    bound = {"max_buffered": 2 * keys} if bounded else {}
    aggregator: Any = create(
        int_sum, backend=backend, flush_interval=None, max_pending=max(keys, 1024), **bound
    )
    try:
        if many:
            started = time.perf_counter()
            aggregator.add_many(pairs)
            return time.perf_counter() - started
        add = aggregator.add
        started = time.perf_counter()
        for key, value in pairs:
            add(key, value)
        return time.perf_counter() - started
    finally:
        aggregator.shutdown()
        aggregator.drain()


def consumption(backend: str, records: int, keys: int, repeats: int) -> Consumption:
    """Every consumer and ``add_many`` on ``backend``, best of ``repeats``, interleaved to share the noise."""
    pairs = [(i % keys, 1) for i in range(records)]
    rates: dict[str, float] = {}
    add = many = bounded = float("inf")
    for _ in range(repeats):
        for kind in CONSUMERS:
            rates[kind] = max(rates.get(kind, 0.0), consumer_rate(backend, kind, records))
        add = min(add, _pairs_cost(backend, pairs, keys))
        many = min(many, _pairs_cost(backend, pairs, keys, many=True))
        bounded = min(bounded, _pairs_cost(backend, pairs, keys, bounded=True))
    return Consumption(
        records,
        keys,
        per_s=rates,
        vs_records={kind: rate / rates["records"] for kind, rate in rates.items()},
        add_ns=add / records * 1e9,
        add_many_ns=many / records * 1e9,
        add_many_vs_add=many / add,
        bounded_ns=bounded / records * 1e9,
        bounded_vs_add=bounded / add,
    )
