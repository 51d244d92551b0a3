"""What ``bench`` measured, and how it is shown: the report, the table, JSON, the plot.

:class:`BenchReport` holds one run's :class:`Measurement` rows and the costs
measured on their own; :func:`format_table` prints it, :func:`report_dict`
makes it JSON-ready, :func:`plot` draws it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .consumers import CONSUMERS, Consumption
from .writers import BASELINE

__all__ = ["BenchReport", "Measurement", "format_table", "parse_counts", "plot", "recommend", "report_dict"]


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


def recommend(report: BenchReport, peers: set[str]) -> str:
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
