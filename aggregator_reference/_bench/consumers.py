"""The consumers (``records()``, ``batches()``, ``arecords()``, ``abatches()``) and ``add_many``, timed.

Records per second each consumer takes from records already flushed, ``add_many``
against a loop of ``add``, and ``add`` with ``max_buffered`` set against ``add`` without.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .._registry import create
from .writers import int_sum

__all__ = ["CONSUMERS", "Consumption", "consumer_rate", "consumption"]


# -- consumers and add_many -----------------------------------------------------------------

CONSUMERS = ("records", "batches", "arecords", "abatches")
BATCH_SIZE, BATCH_WAIT = 500, 0.5  # batches()/abatches() as the contract's defaults (OUT-5)


@dataclass
class Consumption:
    """One backend's consumers and ``add_many``, measured in one run (``bench --consumers N``)."""

    records: int  # records moved through each consumer; also the pairs given to add_many
    keys: int  # distinct keys among the add_many pairs
    per_s: dict[str, float] = field(default_factory=dict)  # records/s through each of CONSUMERS
    vs_records: dict[str, float] = field(default_factory=dict)  # each over records() in the same run
    add_ns: float = 0.0  # ns per pair, a loop of add(key, value)
    add_many_ns: float = 0.0  # ns per pair, one add_many(pairs)
    add_many_vs_add: float = 0.0  # add_many_ns / add_ns
    bounded_ns: float = 0.0  # ns per pair, a loop of add with max_buffered set (never reached)
    bounded_vs_add: float = 0.0  # bounded_ns / add_ns


def _through_records(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    for _ in aggregator.records():
        count += 1
    return count, time.perf_counter() - started


def _through_batches(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    for batch in aggregator.batches(BATCH_SIZE, BATCH_WAIT):
        count += len(batch)
    return count, time.perf_counter() - started


async def _through_arecords(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()  # timed inside the loop: its start-up is not the consumer's
    async for _ in aggregator.arecords():
        count += 1
    return count, time.perf_counter() - started


async def _through_abatches(aggregator: Any) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    async for batch in aggregator.abatches(BATCH_SIZE, BATCH_WAIT):
        count += len(batch)
    return count, time.perf_counter() - started


def consumer_rate(backend: str, kind: str, records: int) -> float:
    """Records per second through one consumer of ``kind`` (one of :data:`CONSUMERS`).

    ``records`` distinct keys go through one full flush into the output; after
    ``shutdown()`` the consumer takes them until its iterator ends, so the
    figure is the consumer's own cost per record, with no wait for a flush.

    Raises:
        RuntimeError: the consumer did not get exactly ``records`` records.
    """
    aggregator: Any = create(int_sum, backend=backend, flush_interval=None, max_pending=records)
    add = aggregator.add
    for key in range(records):
        add(key, 1)
    aggregator.flush()
    aggregator.shutdown()
    if kind == "records":
        count, seconds = _through_records(aggregator)
    elif kind == "batches":
        count, seconds = _through_batches(aggregator)
    elif kind == "arecords":
        count, seconds = asyncio.run(_through_arecords(aggregator))
    else:
        count, seconds = asyncio.run(_through_abatches(aggregator))
    if count != records:
        raise RuntimeError(f"{backend} {kind}(): consumed {count} of {records} records")
    return records / seconds


def _pairs_cost(
    backend: str, pairs: list[tuple[int, int]], keys: int, *, many: bool = False, bounded: bool = False
) -> float:
    """Seconds for one writer to add ``pairs``, by ``add_many`` or by a loop of ``add``.

    ``bounded``: with ``max_buffered`` set, twice the keys, so that no add waits (BUF-1).
    """
    bound = {"max_buffered": 2 * keys} if bounded else {}
    aggregator: Any = create(
        int_sum, backend=backend, flush_interval=None, max_pending=max(keys, 1024), **bound
    )
    try:
        if many:
            started = time.perf_counter()
            aggregator.add_many(pairs)
            return time.perf_counter() - started
        add = aggregator.add
        started = time.perf_counter()
        for key, value in pairs:
            add(key, value)
        return time.perf_counter() - started
    finally:
        aggregator.shutdown()
        aggregator.drain()


def consumption(backend: str, records: int, keys: int, repeats: int) -> Consumption:
    """Every consumer and ``add_many`` on ``backend``, best of ``repeats``, interleaved to share the noise."""
    pairs = [(i % keys, 1) for i in range(records)]
    rates: dict[str, float] = {}
    add = many = bounded = float("inf")
    for _ in range(repeats):
        for kind in CONSUMERS:
            rates[kind] = max(rates.get(kind, 0.0), consumer_rate(backend, kind, records))
        add = min(add, _pairs_cost(backend, pairs, keys))
        many = min(many, _pairs_cost(backend, pairs, keys, many=True))
        bounded = min(bounded, _pairs_cost(backend, pairs, keys, bounded=True))
    return Consumption(
        records,
        keys,
        per_s=rates,
        vs_records={kind: rate / rates["records"] for kind, rate in rates.items()},
        add_ns=add / records * 1e9,
        add_many_ns=many / records * 1e9,
        add_many_vs_add=many / add,
        bounded_ns=bounded / records * 1e9,
        bounded_vs_add=bounded / add,
    )
