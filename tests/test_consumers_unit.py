"""The consumer loops against races a conformance test cannot force: a flush landing mid-step."""

from __future__ import annotations

import asyncio
import operator
import threading
from typing import Any

import aggregator_reference as ar
from conformance._waits import call_bounded


def test_abatches_sees_a_flush_that_lands_between_its_look_and_its_wait() -> None:
    agg: Any = ar.create(operator.add, backend="reference", flush_interval=None, max_pending=1)
    output = agg._output
    look = output.batch_now
    landed = threading.Event()

    def batch_now(max_size: int, max_wait: float) -> Any:
        batch = look(max_size, max_wait)
        if batch == float("inf") and not landed.is_set():  # empty; a flush lands right now
            landed.set()
            agg.add("x", 1)
            flusher = threading.Thread(target=agg.flush)
            flusher.start()
            flusher.join()
        return batch

    output.batch_now = batch_now

    async def first_batch() -> list[Any]:
        batches: list[list[Any]] = []
        async for batch in agg.abatches(max_size=2, max_wait=0.05):
            batches.append(batch)
            break
        return batches[0]

    try:
        assert call_bounded(lambda: asyncio.run(first_batch()), 10, "abatches after a flush mid-step") == [
            ("x", 1)
        ]
    finally:
        agg.shutdown(timeout=5)


def test_abatches_sees_the_output_fill_between_its_look_and_its_wait() -> None:
    # OUT-5: a batch is due once the output is full; a flush that fills it between abatches'
    # look and its wait must wake it, although fewer than max_size records wait.
    agg: Any = ar.create(operator.add, backend="reference", flush_interval=None, max_pending=4)
    output = agg._output
    look = output.batch_now
    filled = threading.Event()

    def batch_now(max_size: int, max_wait: float) -> Any:
        batch = look(max_size, max_wait)
        if batch == float("inf") and not filled.is_set():  # empty; a flush fills it right now
            filled.set()
            for key in range(4):
                agg.add(key, 1)
            flusher = threading.Thread(target=agg.flush)
            flusher.start()
            flusher.join()
            return 60.0  # as if the output had held a record that must wait max_wait
        return batch

    output.batch_now = batch_now

    async def first_batch() -> list[Any]:
        batch: list[Any]
        async for batch in agg.abatches(max_size=10, max_wait=60):
            return list(batch)
        return []

    try:
        batch = call_bounded(lambda: asyncio.run(first_batch()), 5, "abatches once the output filled")
        assert sorted(batch) == [(k, 1) for k in range(4)]
    finally:
        agg.shutdown(timeout=5)
