"""``python -m aggregator_reference bench``: every backend side by side, on this machine, in seconds.

Each measurement runs ``writers`` threads, started together on a barrier,
each adding ``adds`` values over ``keys`` integer keys, through an ``add``
of its own (``aggregator.adder()``, ADD-8), with an ``int`` sum
merge (:func:`int_sum`, a plain Python function as users write it, or
``operator.add`` with ``--merge operator``); throughput is all adds divided by the wall time, the
best of ``repeats`` runs, backends interleaved so that they share the noise.
The baseline is the same loop writing ``d[k] = merge(d[k], v)`` into a plain
shared dict with no lock: the floor no aggregator can beat. The ceiling is
the same work as one writer, done by ``writers`` independent processes.
The measurements of one part on its own are in :mod:`.costs` (flush,
memory, the floor) and :mod:`.consumers`; the loops in :mod:`.writers`;
the report and the table in :mod:`.report`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .._registry import backend_names, create, gil_enabled
from .consumers import consumption
from .costs import floor_breakdown, flush_cost, memory_ratio
from .report import BenchReport, Measurement, recommend
from .writers import BASELINE, MERGES, Body, adding, bare_dict, process_ceiling, timed

__all__ = ["run_bench", "usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _one_run(
    backend: str, writers: int, keys: int, sequence: list[int], merge: Callable[[int, int], int]
) -> float:
    if backend == BASELINE:
        return timed(bare_dict(dict.fromkeys(range(keys), 0), merge), writers, sequence)
    aggregator: Any = create(merge, backend=backend, flush_interval=None, max_pending=max(keys, 1024))
    try:
        return timed(adding(aggregator.adder), writers, sequence)
    finally:
        aggregator.shutdown()
        aggregator.drain()


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
    consumer_records: int = 0,
    floor: bool = False,
    peers: bool = False,
    progress: TextIO | None = None,
) -> BenchReport:
    """Measure every backend (and the baseline) over ``writers`` x ``keys``.

    ``ceiling=None`` measures the process ceiling only where threads can run in
    parallel (GIL disabled). ``flush_records``/``memory_records``/``consumer_records``
    of 0 skip those parts.
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
        from .peers import available_peers

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
                    seconds = timed(peer_bodies[name](key_count), count, sequence)
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
        if consumer_records:
            _progress(progress, done, total, f"consumers of {consumer_records} records: {name}")
            report.consumers[name] = consumption(name, consumer_records, keys[len(keys) // 2], repeats)
    if floor:
        _progress(progress, done, total, "the floor of a Python add")
        report.floor = floor_breakdown(keys[len(keys) // 2], adds, repeats, merge)
    if progress is not None:
        progress.write("\r\x1b[2K")
    report.recommendation = recommend(report, set(peer_bodies))
    return report


def _relate(report: BenchReport) -> None:
    """Fill in each measurement's ratio to the baseline and to its own single writer."""
    index = {(m.backend, m.writers, m.keys): m for m in report.measurements}
    for m in report.measurements:
        base = index.get((BASELINE, m.writers, m.keys))
        single = index.get((m.backend, 1, m.keys))
        m.vs_baseline = m.ns_per_add / base.ns_per_add if base else 0.0
        m.scaling = m.adds_per_s / single.adds_per_s if single else 0.0
