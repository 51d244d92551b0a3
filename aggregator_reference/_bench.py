"""``python -m aggregator_reference bench``: every backend side by side, on this machine, in seconds.

Each measurement runs ``writers`` threads, started together on a barrier,
each adding ``adds`` values over ``keys`` integer keys with an ``int`` sum
merge (:func:`int_sum`, a plain Python function as users write it, or
``operator.add`` with ``--merge operator``); throughput is all adds divided by the wall time, the
best of ``repeats`` runs, backends interleaved so that they share the noise.
The baseline is the same loop writing ``d[k] = merge(d[k], v)`` into a plain
shared dict with no lock: the floor no aggregator can beat. The ceiling is
the same work as one writer, done by ``writers`` independent processes.
"""

from __future__ import annotations

import multiprocessing
import operator
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from queue import Queue
from typing import Any, TextIO

from ._registry import backend_names, create, gil_enabled

__all__ = ["BASELINE", "BenchReport", "Measurement", "run_bench"]

BASELINE = "dict"
Body = Callable[[list[int]], None]


def int_sum(stored: int, incoming: int) -> int:
    """The default merge: an ``int`` sum written as a user would."""
    return stored + incoming


MERGES: dict[str, Callable[[int, int], int]] = {"python": int_sum, "operator": operator.add}


@dataclass
class Measurement:
    """One workload on one backend: throughput and its ratios."""

    backend: str
    writers: int
    keys: int
    adds: int
    seconds: float
    ns_per_add: float
    adds_per_s: float
    vs_baseline: float = 0.0  # ns/add divided by the baseline's at the same writers and keys
    scaling: float = 0.0  # throughput divided by this backend's own with one writer
    ceiling: float = 0.0  # throughput of `writers` independent processes over one, where measured


@dataclass
class BenchReport:
    """Everything one run measured, JSON-ready through :func:`dataclasses.asdict`."""

    python: str
    gil_enabled: bool
    cpus: int
    adds_per_writer: int
    repeats: int
    merge: str
    measurements: list[Measurement] = field(default_factory=list)
    flush: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    recommendation: str = ""


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -- writer loops: module-level functions, one attribute lookup outside the loop ----------


def _adding(add: Callable[[int, int], Any]) -> Body:
    def body(sequence: list[int]) -> None:
        for key in sequence:
            add(key, 1)

    return body


def _bare_dict(shared: dict[int, int], merge: Callable[[int, int], int]) -> Body:
    def body(sequence: list[int]) -> None:
        d = shared
        for key in sequence:
            d[key] = merge(d[key], 1)

    return body


def _timed(body: Body, writers: int, sequence: list[int]) -> float:
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


def _one_run(
    backend: str, writers: int, keys: int, sequence: list[int], merge: Callable[[int, int], int]
) -> float:
    if backend == BASELINE:
        return _timed(_bare_dict(dict.fromkeys(range(keys), 0), merge), writers, sequence)
    aggregator: Any = create(merge, backend=backend, flush_interval=None, max_pending=max(keys, 1024))
    try:
        return _timed(_adding(aggregator.add), writers, sequence)
    finally:
        aggregator.shutdown()
        aggregator.drain()


# -- the process ceiling ------------------------------------------------------------------


def _process_worker(  # noqa: PLR0917 (a Process target: positional arguments)
    backend: str, keys: int, adds: int, merge_name: str, sync: tuple[Any, Any, Any], slot: int
) -> None:
    ready, go, times = sync
    merge = MERGES[merge_name]
    sequence = [i % keys for i in range(adds)]
    if backend == BASELINE:
        body = _bare_dict(dict.fromkeys(range(keys), 0), merge)
    else:
        body = _adding(create(merge, backend=backend, flush_interval=None).add)
    ready.wait()
    go.wait()
    started = time.perf_counter()
    body(sequence)
    times[2 * slot], times[2 * slot + 1] = started, time.perf_counter()


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
        "inline d[k] = merge(d[k], v)": _bare_dict(dict.fromkeys(range(keys), 0), function),
        "method: the update only": _adding(probe.update),
        "method: + key test, return value": _adding(probe.update_checked),
        "method: + Lock acquire/release": _adding(probe.update_locked),
    }
    result: dict[str, float] = {}
    for name, body in steps.items():
        best = min(_timed(body, 1, sequence) for _ in range(repeats))
        result[name] = best / adds * 1e9
    return result


# -- the run --------------------------------------------------------------------------------


def _progress(out: TextIO | None, done: int, total: int, label: str) -> None:
    if out is not None:
        out.write(f"\r\x1b[2Kbench [{done:>3}/{total}] {label}")
        out.flush()


def run_bench(
    backends: Sequence[str] | None = None,
    writers: Sequence[int] = (1, 2, 4, 8),
    keys: Sequence[int] = (100,),
    adds: int = 50_000,
    repeats: int = 3,
    *,
    merge: str = "python",
    ceiling: bool | None = None,
    flush_records: int = 100_000,
    memory_records: int = 0,
    floor: bool = False,
    peers: bool = False,
    progress: TextIO | None = None,
) -> BenchReport:
    """Measure every backend (and the baseline) over ``writers`` x ``keys``.

    ``ceiling=None`` measures the process ceiling only where threads can run in
    parallel (GIL disabled). ``flush_records``/``memory_records`` of 0 skip those parts.
    """
    names = [*(backends or backend_names()), BASELINE]
    report = BenchReport(
        python=sys.version.split()[0],
        gil_enabled=gil_enabled(),
        cpus=usable_cpus(),
        adds_per_writer=adds,
        repeats=repeats,
        merge=merge,
    )
    peer_bodies: dict[str, Callable[[int], Body]] = {}
    if peers:
        from ._peers import available_peers

        peer_bodies, report.skipped = available_peers()
        names[-1:-1] = list(peer_bodies)
    cases = [(w, k) for k in keys for w in writers]
    total, done = len(cases) * repeats * len(names), 0
    best: dict[tuple[str, int, int], float] = {}
    for count, key_count in cases:
        sequence = [i % key_count for i in range(adds)]
        for _ in range(repeats):
            for name in names:
                _progress(progress, done, total, f"{name}: {count} writer(s), {key_count} keys")
                if name in peer_bodies:
                    seconds = _timed(peer_bodies[name](key_count), count, sequence)
                else:
                    seconds = _one_run(name, count, key_count, sequence, MERGES[merge])
                slot = (name, count, key_count)
                best[slot] = min(best.get(slot, seconds), seconds)
                done += 1
    for (name, count, key_count), seconds in best.items():
        total_adds = count * adds
        report.measurements.append(
            Measurement(
                name, count, key_count, total_adds, seconds, seconds / total_adds * 1e9, total_adds / seconds
            )
        )
    _relate(report)
    if ceiling if ceiling is not None else not report.gil_enabled:
        for m in report.measurements:
            if m.writers > 1 and m.backend not in peer_bodies:
                _progress(progress, done, total, f"process ceiling: {m.backend}, {m.writers} processes")
                m.ceiling = process_ceiling(
                    m.backend, m.writers, m.keys, adds=adds, repeats=repeats, merge=merge
                )
    for name in names[:-1]:
        if name in peer_bodies:
            continue
        if flush_records:
            _progress(progress, done, total, f"flush of {flush_records} records: {name}")
            flushed, queued = flush_cost(name, flush_records, repeats)
            report.flush[name] = flushed / queued
        if memory_records:
            _progress(progress, done, total, f"memory of {memory_records} records: {name}")
            report.memory[name] = memory_ratio(name, memory_records)
    if floor:
        _progress(progress, done, total, "the floor of a Python add")
        report.floor = floor_breakdown(keys[len(keys) // 2], adds, repeats, merge)
    if progress is not None:
        progress.write("\r\x1b[2K")
    report.recommendation = _recommend(report, set(peer_bodies))
    return report


def _relate(report: BenchReport) -> None:
    """Fill in each measurement's ratio to the baseline and to its own single writer."""
    index = {(m.backend, m.writers, m.keys): m for m in report.measurements}
    for m in report.measurements:
        base = index.get((BASELINE, m.writers, m.keys))
        single = index.get((m.backend, 1, m.keys))
        m.vs_baseline = m.ns_per_add / base.ns_per_add if base else 0.0
        m.scaling = m.adds_per_s / single.adds_per_s if single else 0.0


def _recommend(report: BenchReport, peers: set[str]) -> str:
    ours = [m for m in report.measurements if m.backend not in peers and m.backend != BASELINE]
    if not ours:
        return ""
    most = max(m.writers for m in ours)
    keys = sorted({m.keys for m in ours})[len({m.keys for m in ours}) // 2]
    at_most = [m for m in ours if m.writers == most and m.keys == keys]
    single = [m for m in ours if m.writers == 1 and m.keys == keys]
    best_many = max(at_most, key=lambda m: m.adds_per_s)
    best_one = max(single, key=lambda m: m.adds_per_s) if single else best_many
    text = (
        f"{best_many.backend}: fastest with {most} writers over {keys} keys "
        f"({best_many.ns_per_add:.0f} ns/add)"
    )
    if best_one.backend != best_many.backend:
        text += f"; with one writer {best_one.backend} is fastest ({best_one.ns_per_add:.0f} ns/add)"
    return text


# -- presenting --------------------------------------------------------------------------


def format_table(report: BenchReport) -> str:
    """The report as a plain-text table."""
    build = "GIL enabled" if report.gil_enabled else "free-threaded, GIL disabled"
    lines = [
        f"Python {report.python} ({build}), {report.cpus} usable CPUs, "
        f"{report.adds_per_writer} adds per writer, best of {report.repeats}; "
        f"merge: int sum ({'a Python function' if report.merge == 'python' else 'operator.add'})",
        "",
        f"{'backend':<14}{'writers':>8}{'keys':>8}{'adds/s':>14}{'ns/add':>10}{'x dict':>9}"
        f"{'x 1 writer':>12}{'ceiling':>9}",
    ]
    rows = sorted(report.measurements, key=lambda m: (m.keys, m.writers, m.backend == BASELINE, m.ns_per_add))
    for m in rows:
        ceiling = f"{m.scaling / m.ceiling:>8.0%}" if m.ceiling else f"{'':>8}"
        lines.append(
            f"{m.backend:<14}{m.writers:>8}{m.keys:>8}{m.adds_per_s:>14,.0f}{m.ns_per_add:>10.0f}"
            f"{m.vs_baseline:>9.2f}{m.scaling:>12.2f} {ceiling}"
        )
    if any(m.ceiling for m in report.measurements):
        lines.append("(ceiling: scaling as a fraction of what independent processes reach on this machine)")
    if report.flush:
        lines.append("")
        lines.append("flush() cost over putting the same tuples into a queue.Queue: " + _pairs(report.flush))
    if report.memory:
        lines.append("memory of buffered int records over a plain dict: " + _pairs(report.memory))
    if report.floor:
        base = next(iter(report.floor.values()))
        lines.append("")
        lines.append("The floor of a Python add (one writer, ns/add, x inline loop):")
        lines.extend(f"  {name:<36}{ns:>6.0f}{ns / base:>7.2f}x" for name, ns in report.floor.items())
    for name, why in report.skipped.items():
        lines.append(f"skipped {name}: {why}")
    if report.recommendation:
        lines.append("")
        lines.append(f"Recommendation on this machine: {report.recommendation}")
    return "\n".join(lines)


def _pairs(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {ratio:.2f}x" for name, ratio in values.items())


def report_dict(report: BenchReport) -> dict[str, Any]:
    """The report as plain data (for ``--json``)."""
    return asdict(report)


def plot(report: BenchReport, path: str) -> None:
    """Draw throughput against writer threads per backend into ``path`` (needs matplotlib).

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install 'aggregator-reference[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "--plot needs matplotlib: pip install 'aggregator-reference[plot]'"
        ) from exc
    key_counts = sorted({m.keys for m in report.measurements})
    figure, axes = plt.subplots(1, len(key_counts), figsize=(6 * len(key_counts), 4.5), squeeze=False)
    for axis, key_count in zip(axes[0], key_counts, strict=True):
        for backend in dict.fromkeys(m.backend for m in report.measurements):
            points = sorted(
                (m.writers, m.adds_per_s)
                for m in report.measurements
                if m.backend == backend and m.keys == key_count
            )
            style = "k--" if backend == BASELINE else "-o"
            axis.plot([w for w, _ in points], [a / 1e6 for _, a in points], style, label=backend)
        axis.set_xlabel("writer threads")
        axis.set_ylabel("million adds per second")
        axis.set_title(f"{key_count} keys")
        axis.set_xscale("log", base=2)
        axis.grid(True, alpha=0.3)
        axis.legend()
    build = "GIL" if report.gil_enabled else "free-threaded"
    figure.suptitle(f"aggregator backends, Python {report.python} ({build}), {report.cpus} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_counts(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; every count must be >= 1."""
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"expected a comma-separated list of counts >= 1, got {text!r}")
    return counts
