"""The output: OUT-1 … OUT-4."""

from __future__ import annotations

import operator
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ._waits import call_bounded
from .conftest import Factory, run_threads


class BadHashKey:
    """A key whose ``__hash__`` raises while :attr:`raising` is set: a flush cannot re-queue it."""

    raising = False

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        if BadHashKey.raising:
            raise RuntimeError(f"hash of {self.name} failed")
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BadHashKey) and other.name == self.name

    def __repr__(self) -> str:
        return f"BadHashKey({self.name!r})"


@pytest.fixture
def overflowing(make: Factory) -> Iterator[Any]:
    """An aggregator (``max_pending=1``) whose output holds 4 records: 3 delivered past it (FLUSH-5)."""
    agg = make(max_pending=1)
    agg.add("blocker", 1)
    assert agg.flush() == 1  # the output is full: the next flush re-queues everything
    for i in range(3):
        agg.add(BadHashKey(f"bad{i}"), 1)
    BadHashKey.raising = True
    try:
        agg.flush()
    finally:
        BadHashKey.raising = False
    assert agg.pending == 4
    yield agg
    BadHashKey.raising = False


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


@pytest.mark.clause("OUT-1", "FLUSH-2")
def test_a_flush_into_a_partly_full_output_hands_off_only_what_fits(make: Factory) -> None:
    agg = make(operator.add, max_pending=2)
    agg.add("first", 1)
    assert agg.flush() == 1
    for key in ("a", "b", "c"):
        agg.add(key, 1)
    assert agg.flush() == 1  # one place was left
    assert agg.pending == 2
    assert len(agg) == 2
    assert agg.stats().requeued == 2


@pytest.mark.clause("FLUSH-5", "FLUSH-2", "STAT-1")
def test_records_delivered_past_max_pending_are_not_counted_as_requeued(make: Factory) -> None:
    agg = make(operator.add, max_pending=1)
    agg.add("blocker", 1)
    assert agg.flush() == 1  # the output is full: the next flush re-queues everything
    for i in range(3):
        agg.add(BadHashKey(f"bad{i}"), 1)
    for i in range(2):
        agg.add(f"good{i}", 1)
    BadHashKey.raising = True
    try:
        agg.flush()
    finally:
        BadHashKey.raising = False
    stats = agg.stats()
    assert stats.overflowed == 3  # delivered past max_pending
    assert stats.requeued == 2  # only the two that went back into the buffer
    assert stats.flushed == 4
    assert agg.pending == 4
    assert sorted(agg.snapshot()) == ["good0", "good1"]


@pytest.mark.clause("OUT-1", "FLUSH-5")
def test_a_flush_into_an_output_past_max_pending_hands_off_nothing(overflowing: Any) -> None:
    for i in range(5):
        overflowing.add(f"new{i}", 1)
    assert overflowing.flush() == 0
    assert overflowing.pending == 4
    assert len(overflowing) == 5
    assert overflowing.stats().requeued == 5


@pytest.mark.clause("CLOSE-1", "CLOSE-4")
def test_shutdown_waits_without_spinning_on_an_output_past_max_pending(overflowing: Any) -> None:
    overflowing.add("late", 1)
    before = overflowing.stats().flushes
    with pytest.raises(TimeoutError):
        overflowing.shutdown(timeout=0.3)
    # Each flush finds no room and waits for a consumer; one that does not wait flushes in a loop.
    assert overflowing.stats().flushes - before < 50
    assert overflowing.pending == 4
    assert len(overflowing) == 1


@pytest.mark.clause("OUT-5", "FLUSH-5")
def test_a_batch_goes_out_at_once_from_an_output_past_max_pending(overflowing: Any) -> None:
    # Full means max_pending records wait *or more*: nothing more can come until some are taken.
    batch = call_bounded(
        lambda: next(overflowing.batches(max_size=100, max_wait=1e6)),
        10,
        "a batch from an overflowing output",
    )
    assert len(batch) == 4
