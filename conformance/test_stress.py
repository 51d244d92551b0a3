"""Zero loss under load: CLOSE-5 (with FLUSH-2, OUT-2)."""

from __future__ import annotations

import operator
import threading
import time
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import Factory, fold_records, run_threads

WRITERS = 1000
ADDS_PER_WRITER = 1000
KEYS = 100


@pytest.mark.clause("CLOSE-5", "FLUSH-2", "OUT-2")
@pytest.mark.timeout(900)
def test_thousand_writers_thousand_adds_exact_totals(make: Factory) -> None:
    agg = make(operator.add, flush_interval=0.003, max_pending=16)
    totals: list[dict[int, int]] = [{}, {}]

    def consume(index: int) -> None:
        mine = totals[index]
        for key, value in agg.records():
            mine[key] = mine.get(key, 0) + value

    consumers = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(2)]
    for thread in consumers:
        thread.start()

    def write(index: int) -> None:
        add = agg.add
        for i in range(ADDS_PER_WRITER):
            add((index + i) % KEYS, 1)

    run_threads(WRITERS, write, timeout=800)
    agg.shutdown(timeout=120)
    for thread in consumers:
        thread.join(30)
        assert not thread.is_alive()
    combined = {k: totals[0].get(k, 0) + totals[1].get(k, 0) for k in totals[0].keys() | totals[1].keys()}
    assert combined == dict.fromkeys(range(KEYS), WRITERS * ADDS_PER_WRITER // KEYS)
    stats = agg.stats()
    assert stats.adds == WRITERS * ADDS_PER_WRITER
    assert stats.requeued > 0, "max_pending=16 should have forced re-queues"


@pytest.mark.clause("CLOSE-5", "ADD-5")
def test_concurrent_in_place_merges_lose_nothing(make: Factory, fast_switching: None) -> None:
    def merge(stored: list[int], incoming: list[int]) -> list[int]:
        stored.extend(incoming)
        return stored

    agg = make(merge, flush_interval=0.001, max_pending=4)
    delivered: dict[int, list[int]] = {}

    def write(index: int) -> None:
        for i in range(1000):
            agg.add(i % 10, [index * 1000 + i])

    consumer = threading.Thread(target=fold_records, args=(agg, delivered, merge), daemon=True)
    consumer.start()
    run_threads(16, write)
    agg.shutdown(timeout=60)
    consumer.join(30)
    assert not consumer.is_alive(), "a thread of the test did not finish: deadlock?"
    assert sorted(v for values in delivered.values() for v in values) == sorted(
        index * 1000 + i for index in range(16) for i in range(1000)
    )
    for key, values in delivered.items():
        assert all(v % 1000 % 10 == key for v in values)


@pytest.mark.clause("CLOSE-5", "CLOSE-2")
def test_many_writers_racing_shutdown_with_a_stalling_consumer(
    backend_name: str, fast_switching: None
) -> None:
    agg: Any = ar.create(operator.add, backend=backend_name, flush_interval=0.001, max_pending=8)
    accepted = [0] * 32
    delivered: dict[int, int] = {}
    consumer_gate = threading.Event()

    def consume() -> None:
        consumer_gate.wait(10)
        for key, value in agg.records():
            delivered[key] = delivered.get(key, 0) + value

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()

    def write(index: int) -> None:
        if index == 31:
            deadline = time.monotonic() + 30
            while len(agg) < 20 and time.monotonic() < deadline:  # more than the output holds
                time.sleep(0.001)
            with pytest.raises(TimeoutError):
                agg.shutdown(timeout=0.01)  # the consumer is stalled
            consumer_gate.set()
            agg.shutdown(timeout=60)
            return
        for i in range(3000):
            try:
                agg.add(i % 50, 1)
            except ar.AggregatorClosedError:
                return
            accepted[index] += 1

    run_threads(32, write)
    consumer.join(30)
    assert not consumer.is_alive(), "a thread of the test did not finish: deadlock?"
    assert sum(delivered.values()) == sum(accepted)
