"""``python -m aggregator_reference bench``: every backend side by side, on this machine, in seconds.

:mod:`.run` runs it (:func:`run_bench`), :mod:`.writers` holds the writer
loops, :mod:`.costs` and :mod:`.consumers` what one part costs on its own,
:mod:`.report` the report and its table, :mod:`.sink` the write reduction in
front of SQLite, :mod:`.peers` other libraries' counters. The names below are
what the CLI, ``benchmarks/`` (asv) and the tests use.
"""

from __future__ import annotations

from .consumers import CONSUMERS, Consumption, consumer_rate, consumption
from .costs import floor_breakdown, flush_cost, memory_ratio
from .report import BenchReport, Measurement, format_table, parse_counts, plot, report_dict
from .run import run_bench, usable_cpus
from .writers import BASELINE, MERGES, Body, adding, bare_dict, int_sum, process_ceiling, timed

__all__ = [
    "BASELINE",
    "CONSUMERS",
    "MERGES",
    "BenchReport",
    "Body",
    "Consumption",
    "Measurement",
    "adding",
    "bare_dict",
    "consumer_rate",
    "consumption",
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
    "timed",
    "usable_cpus",
]
