"""Facts of single backends that the contract leaves to each (ARG-1: ``shards`` reports what it uses)."""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import aggregator_reference as ar

#: Seconds a thread of these tests gets to finish: far above what it needs.
LIMIT = 10.0


@pytest.fixture
def created() -> Iterator[list[Any]]:
    aggregators: list[Any] = []
    yield aggregators
    for aggregator in aggregators:
        aggregator.shutdown(timeout=LIMIT)


@pytest.mark.parametrize("hint", [None, 1, 8, 64])
def test_reference_has_one_shard_whatever_the_hint(created: list[Any], hint: int | None) -> None:
    agg = ar.create(operator.add, backend="reference", flush_interval=None, shards=hint)
    created.append(agg)
    assert agg.shards == 1
    agg.add("a", 1)
    assert agg.shards == 1


def test_freethreaded_has_one_shard_per_writer_thread(created: list[Any]) -> None:
    agg = ar.create(operator.add, backend="freethreaded", flush_interval=None, shards=8)
    created.append(agg)
    assert agg.shards == 1  # no writer yet
    agg.add("main", 1)
    assert agg.shards == 1  # one writer: this thread
    writing, finish = threading.Barrier(4), threading.Event()

    def write(index: int) -> None:
        agg.add(index, 1)
        writing.wait(LIMIT)
        finish.wait(LIMIT)

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    writing.wait(LIMIT)
    try:
        assert agg.shards == 4  # this thread and three live writers
    finally:
        finish.set()
        for thread in threads:
            thread.join(LIMIT)
            assert not thread.is_alive(), "a writer thread did not finish: deadlock?"
    assert agg.shards == 4  # exited writers' buffers stay until a flush takes their records
    assert agg.flush() == 4
    assert agg.shards == 1  # the flush dropped the buffers of the threads that exited
    assert sorted(agg.drain(), key=repr) == sorted([("main", 1), (0, 1), (1, 1), (2, 1)], key=repr)
