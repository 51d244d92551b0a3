"""Delivery into the SQLite sink on every backend: SINK-5 (effectively once) with SINK-2's retries."""

from __future__ import annotations

import operator
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import aggregator_reference as ar
from aggregator_reference.sinks import SQLiteSink

from .conftest import Factory, run_threads

LARGEST = "max({stored}, {incoming})"


class LosesAcknowledgements:
    """A sink whose writes commit and then, now and then, raise as if the acknowledgement was lost."""

    def __init__(self, sink: SQLiteSink[str, int], seed: int) -> None:
        self.sink = sink
        self.random = random.Random(seed)
        self.lost = 0
        self.ids: list[str] = []

    def write(self, batch: list[tuple[str, int]], batch_id: str) -> None:
        self.sink.write(batch, batch_id)
        self.ids.append(batch_id)
        if self.random.random() < 0.3:
            self.lost += 1
            raise ConnectionError(f"acknowledgement of {batch_id} lost after its commit")

    def close(self) -> None:
        self.sink.close()


@pytest.mark.clause("SINK-5", "SINK-2")
def test_batches_retried_after_their_commit_are_applied_once(make: Factory, tmp_path: Path) -> None:
    sink: SQLiteSink[str, int] = SQLiteSink(tmp_path / "sink.db")
    lossy = LosesAcknowledgements(sink, seed=7)
    agg = make(operator.add, flush_interval=0.005, max_pending=16)
    delivery = agg.deliver(lossy, batch_size=8, max_wait=0.005, retry=ar.Retry(first=0.001, maximum=0.005))
    added: list[Counter[str]] = [Counter() for _ in range(4)]

    def write(index: int) -> None:
        rng = random.Random(index)
        for _ in range(1500):
            key = f"k{rng.randrange(60)}"
            agg.add(key, 1)
            added[index][key] += 1

    run_threads(4, write)
    agg.shutdown(timeout=60)
    assert delivery.stats().done
    assert lossy.lost > 0, "no acknowledgement was lost: the test proved nothing"
    assert delivery.stats().retries == lossy.lost
    # Every lost acknowledgement was followed by a write of the same id, which the ledger skipped.
    assert len(lossy.ids) == delivery.stats().batches + lossy.lost
    assert sink.read() == dict(sum(added, Counter()))


@pytest.mark.clause("SINK-5")
def test_the_ledger_skips_a_batch_number_it_holds_and_refuses_bad_ids(tmp_path: Path) -> None:
    sink: SQLiteSink[str, Any] = SQLiteSink(
        tmp_path / "sink.db", table="t", merge="max({stored}, {incoming})"
    )
    sink.write([("a", 5)], "w:1")
    sink.write([("a", 9)], "w:1")  # the same number again: skipped
    sink.write([("a", 7)], "w:2")
    sink.write([("b", 1)], "w:2")
    assert sink.read() == {"a": 7}  # b's batch reused w:2: skipped, not applied
    with pytest.raises(ValueError, match="batch_id"):
        sink.write([("a", 1)], "no number")
    # A second sink on the same file (another process, say) sees the same ledger.
    other: SQLiteSink[str, Any] = SQLiteSink(
        tmp_path / "sink.db", table="t", merge="max({stored}, {incoming})"
    )
    other.write([("c", 1)], "w:2")
    other.write([("c", 1)], "v:1")
    assert other.read() == {"a": 7, "c": 1}
    other.close()
    sink.close()
