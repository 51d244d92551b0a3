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
The measurements of one part on its own (flush, memory, the floor, the
ceiling, the consumers) are in :mod:`._bench_costs`; their names are
importable from here too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from ._bench_costs import (
    BASELINE,
    CONSUMERS,
    MERGES,
    Body,
    Consumption,
    adding,
    bare_dict,
    consumption,
    floor_breakdown,
    flush_cost,
    int_sum,
    memory_ratio,
    process_ceiling,
    timed,
)
from ._registry import backend_names, create, gil_enabled

__all__ = [
    "BASELINE",
    "MERGES",
    "BenchReport",
    "Consumption",
    "Measurement",
    "floor_breakdown",
    "flush_cost",
    "format_table",
    "int_sum",
    "memory_ratio",
    "parse_counts",
    "plot",
    "process_ceiling",
    "report_dict",
    "run_bench",
    "usable_cpus",
]


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
    consumers: dict[str, Consumption] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    recommendation: str = ""


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
    if report.consumers:
        lines.extend(_consumer_lines(report.consumers))
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


def _consumer_lines(consumers: dict[str, Consumption]) -> list[str]:
    first = next(iter(consumers.values()))
    lines = [
        "",
        f"Consumers: records/s taking {first.records} flushed records, and x records() in the same run;",
        f"add_many: time per pair over a loop of add() ({first.records} pairs over {first.keys} keys);",
        "bounded: add() with max_buffered set (never reached) over add() without",
        f"{'backend':<14}"
        + "".join(f"{kind + '()':>20}" for kind in CONSUMERS)
        + f"{'add_many':>10}{'bounded':>10}",
    ]
    for name, c in consumers.items():
        cells = [f"{c.per_s[kind]:>12,.0f} {c.vs_records[kind]:>6.2f}x" for kind in CONSUMERS]
        cells[0] = f"{c.per_s['records']:>20,.0f}"
        lines.append(f"{name:<14}" + "".join(cells) + f"{c.add_many_vs_add:>9.2f}x{c.bounded_vs_add:>9.2f}x")
    return lines


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
