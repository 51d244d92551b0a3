"""Scale-out (issue 9): several processes, each with its own aggregator, delivering into one table.

4 worker processes (``spawn``), each with 4 writer threads, deliver into one
PostgreSQL table, and into one SQLite file in WAL mode, through a sink
wrapper that fails about 5% of writes, half before the commit and half after
it: the table's totals must equal everything added, exactly (SINK-2, SINK-5).
"""

from __future__ import annotations

import multiprocessing
import operator
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import aggregator_reference as ar
from aggregator_reference.sinks import SQLiteSink

from .flaky_sink import Flaky

pytestmark = pytest.mark.timeout(300)

PROCESSES = 4
THREADS = 4
ADDS = 5_000  # per thread
KEYS = 500


def _worker(kind: str, target: str, table: str, seed: int) -> dict[str, Any]:
    """One process: its own aggregator and delivery; returns what it added and what failed."""
    if kind == "sqlite":
        sink: Any = SQLiteSink(target, table=table)
    else:
        from aggregator_reference.sinks import PostgresSink

        sink = PostgresSink(target, table=table)
    flaky = Flaky(sink, rate=0.05, seed=seed)
    agg = ar.create(operator.add, flush_interval=0.01, max_pending=256)
    delivery = agg.deliver(flaky, batch_size=8, max_wait=0.01, retry=ar.Retry(first=0.001, maximum=0.02))
    added: Counter[str] = Counter()
    lock = threading.Lock()

    def write(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        mine: Counter[str] = Counter()
        for _ in range(ADDS):
            key, value = f"k{rng.randrange(KEYS)}", rng.randrange(1, 10)
            agg.add(key, value)
            mine[key] += value
        with lock:
            added.update(mine)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    agg.shutdown(timeout=120)
    stats = delivery.stats()
    return {
        "added": dict(added),
        "adds": agg.stats().adds,
        "failed": dict(flaky.failed),
        "retries": stats.retries,
        "batches": stats.batches,
        "records": stats.records,
    }


def _scale_out(kind: str, target: str, table: str) -> tuple[Counter[str], list[dict[str, Any]]]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        results = pool.starmap(_worker, [(kind, target, table, seed) for seed in range(1, PROCESSES + 1)])
    expected: Counter[str] = Counter()
    for result in results:
        expected.update(result["added"])
    return expected, results


def _failed(results: list[dict[str, Any]]) -> Counter[str]:
    failed = Counter[str]()
    for r in results:
        failed.update(r["failed"])
    return failed


def _report(kind: str, results: list[dict[str, Any]]) -> str:
    failed = _failed(results)
    return (
        f"{kind}: {sum(r['adds'] for r in results)} adds in {PROCESSES} processes x {THREADS} threads; "
        f"{sum(r['records'] for r in results)} rows written in {sum(r['batches'] for r in results)} "
        f"transactions; failures injected: {failed['before commit']} before commit, "
        f"{failed['after commit']} after; {sum(r['retries'] for r in results)} retries"
    )


def test_four_processes_deliver_exact_totals_into_one_sqlite_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    expected, results = _scale_out("sqlite", path, "totals")
    print(_report("SQLite", results))
    assert sum(r["adds"] for r in results) == PROCESSES * THREADS * ADDS
    assert _failed(results)["before commit"] > 0
    assert _failed(results)["after commit"] > 0
    assert sum(r["retries"] for r in results) == sum(_failed(results).values())  # no lock errors
    assert SQLiteSink(path, table="totals").read() == dict(expected)


def test_four_processes_deliver_exact_totals_into_one_postgres_table(postgres_dsn: str, table: str) -> None:
    from aggregator_reference.sinks import PostgresSink

    expected, results = _scale_out("postgres", postgres_dsn, table)
    print(_report("PostgreSQL", results))
    assert sum(r["adds"] for r in results) == PROCESSES * THREADS * ADDS
    assert _failed(results)["before commit"] > 0
    assert _failed(results)["after commit"] > 0
    # Every retry was an injected failure: concurrent batches never deadlock on the table's rows.
    assert sum(r["retries"] for r in results) == sum(_failed(results).values())
    assert PostgresSink(postgres_dsn, table=table).read() == dict(expected)
