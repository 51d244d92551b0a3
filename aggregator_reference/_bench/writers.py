"""The writer loops of ``bench`` and their timing: the baseline dict, ``add`` through ``adder()``, processes.

Each writer thread runs one loop over its sequence of keys, started together
on a barrier; the process ceiling runs the same loop in independent processes.
"""

from __future__ import annotations

import multiprocessing
import operator
import threading
import time
from collections.abc import Callable
from typing import Any

from .._registry import create

__all__ = ["BASELINE", "MERGES", "Body", "adding", "bare_dict", "int_sum", "process_ceiling", "timed"]

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
