"""``bench --sink N``: the write a buffer saves, into SQLite, against one upsert per event."""

from __future__ import annotations

import operator
import os
import random
import sqlite3
import tempfile
import time
from dataclasses import dataclass

from .._registry import create
from ..sinks import SQLiteSink

__all__ = ["SinkReduction", "write_reduction"]


@dataclass(frozen=True)
class SinkReduction:
    """One run of :func:`write_reduction` (rates per second of wall time, both ways on one workload)."""

    events: int
    keys: int
    backend: str
    direct_events_per_s: float  # = rows written per second: one upsert and one commit per event
    buffered_events_per_s: float  # adds per second, until every total is in the table
    buffered_rows: int  # rows written through the aggregator
    buffered_transactions: int
    buffered_rows_per_s: float

    @property
    def write_reduction(self) -> float:
        """Rows written directly (one per event) over rows written through the aggregator."""
        return self.events / max(1, self.buffered_rows)

    @property
    def speedup(self) -> float:
        """Events per second through the aggregator over events per second directly."""
        return self.buffered_events_per_s / self.direct_events_per_s


def _workload(events: int, keys: int) -> list[tuple[str, int]]:
    rng = random.Random(0)
    return [(f"k{rng.randrange(keys)}", 1) for _ in range(events)]


def _direct(path: str, workload: list[tuple[str, int]]) -> float:
    """Seconds for one upsert and one commit per event: what users replace."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # as SQLiteSink does: durable at each commit
        connection.execute("CREATE TABLE direct (key PRIMARY KEY, value)")
        upsert = (
            "INSERT INTO direct (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value"
        )
        started = time.perf_counter()
        for key, value in workload:
            connection.execute(upsert, (key, value))  # autocommit: one transaction per event
        return time.perf_counter() - started
    finally:
        connection.close()


def write_reduction(events: int, keys: int, backend: str | None = None) -> SinkReduction:
    """Count ``events`` over ``keys`` into a SQLite file both ways, in one run; check both totals."""
    workload = _workload(events, keys)
    with tempfile.TemporaryDirectory(prefix="aggregator-bench-") as folder:
        direct_path = os.path.join(folder, "direct.db")
        direct_s = _direct(direct_path, workload)
        sink: SQLiteSink[str, int] = SQLiteSink(os.path.join(folder, "buffered.db"), table="buffered")
        agg = create(operator.add, backend=backend, flush_interval=0.1)
        delivery = agg.deliver(sink, batch_size=500, max_wait=0.1)
        started = time.perf_counter()
        add = agg.add
        for key, value in workload:
            add(key, value)
        agg.shutdown()  # every total written and committed
        buffered_s = time.perf_counter() - started
        written = delivery.stats()
        with sqlite3.connect(direct_path) as connection:
            direct_total = connection.execute("SELECT sum(value) FROM direct").fetchone()[0]
        buffered_total = sum(sink.read().values())
        sink.close()
    if direct_total != events or buffered_total != events:
        raise RuntimeError(
            f"totals differ: {events} events, direct {direct_total}, buffered {buffered_total}"
        )
    return SinkReduction(
        events=events,
        keys=keys,
        backend=type(agg).__name__,
        direct_events_per_s=events / direct_s,
        buffered_events_per_s=events / buffered_s,
        buffered_rows=written.records,
        buffered_transactions=written.batches,
        buffered_rows_per_s=written.records / buffered_s,
    )


def format_reduction(r: SinkReduction) -> list[str]:
    """The lines ``bench`` prints for it."""
    return [
        "",
        f"Into SQLite (WAL), {r.events:,} events over {r.keys:,} keys, same run:",
        f"  {'one upsert per event:':<34}{r.direct_events_per_s:>12,.0f} events/s, "
        f"{r.direct_events_per_s:>10,.0f} rows/s, {r.events:,} transactions",
        f"  {'through ' + r.backend + ':':<34}{r.buffered_events_per_s:>12,.0f} events/s, "
        f"{r.buffered_rows_per_s:>10,.0f} rows/s, {r.buffered_transactions:,} transactions "
        f"({r.buffered_rows:,} rows)",
        f"  {r.write_reduction:,.0f}x fewer rows written, {r.speedup:.1f}x the events per second",
    ]
