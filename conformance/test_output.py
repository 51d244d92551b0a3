"""The output: OUT-1 … OUT-4."""

from __future__ import annotations

import operator
import threading
from collections import Counter

import pytest

from .conftest import Factory, run_threads


@pytest.mark.clause("OUT-1")
def test_pending_never_exceeds_max_pending(make: Factory) -> None:
    agg = make(operator.add, max_pending=4)
    for i in range(20):
        agg.add(i, 1)
        agg.flush()
        assert agg.pending <= 4
    assert agg.pending == 4


@pytest.mark.clause("OUT-1")
def test_records_leave_in_the_order_they_entered(make: Factory) -> None:
    agg = make(operator.add)
    order = []
    for i in range(5):
        agg.add(i, i)
        agg.flush()
        order.append((i, i))
    assert agg.drain() == order


@pytest.mark.clause("OUT-2")
def test_records_ends_after_shutdown_and_drain(make: Factory) -> None:
    agg = make(operator.add)
    for i in range(3):
        agg.add(i, 1)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(agg.records()), daemon=True)
    consumer.start()
    agg.shutdown(timeout=10)
    consumer.join(10)
    assert not consumer.is_alive()
    assert sorted(got) == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.clause("OUT-2")
def test_several_consumers_each_record_exactly_once(make: Factory) -> None:
    agg = make(operator.add, max_pending=8, flush_interval=0.001)
    per_consumer: list[list[tuple[int, int]]] = [[] for _ in range(4)]
    consumers = [
        threading.Thread(target=lambda i=i: per_consumer[i].extend(agg.records()), daemon=True)
        for i in range(4)
    ]
    for thread in consumers:
        thread.start()
    run_threads(4, lambda index: [agg.add(index * 1000 + i, 1) for i in range(500)])
    agg.shutdown(timeout=30)
    for thread in consumers:
        thread.join(10)
        assert not thread.is_alive()
    everything = [record for records in per_consumer for record in records]
    counts = Counter(key for key, _ in everything)
    assert len(counts) == 2000
    assert set(counts.values()) == {1}


@pytest.mark.clause("OUT-3")
def test_drain_takes_what_is_there_without_blocking(make: Factory) -> None:
    agg = make(operator.add)
    assert agg.drain() == []
    for i in range(5):
        agg.add(i, 1)
    agg.flush()
    first = agg.drain(2)
    assert len(first) == 2
    assert agg.drain(0) == []
    rest = agg.drain()
    assert sorted(first + rest) == [(i, 1) for i in range(5)]
    agg.add("late", 1)
    agg.shutdown(timeout=5)
    assert agg.drain() == [("late", 1)]  # works after shutdown too


@pytest.mark.clause("OUT-3")
@pytest.mark.parametrize(("limit", "error"), [(-1, ValueError), ("3", TypeError), (1.5, TypeError)])
def test_drain_rejects_bad_limits(make: Factory, limit: object, error: type[Exception]) -> None:
    agg = make(operator.add)
    agg.add("kept", 1)
    agg.flush()
    with pytest.raises(error, match="limit"):
        agg.drain(limit)
    assert agg.drain() == [("kept", 1)]


@pytest.mark.clause("OUT-4")
def test_pending_counts_records_in_the_output(make: Factory) -> None:
    agg = make(operator.add)
    assert agg.pending == 0
    for i in range(3):
        agg.add(i, 1)
    assert agg.pending == 0
    agg.flush()
    assert agg.pending == 3
    agg.drain(1)
    assert agg.pending == 2
