"""Batches and asyncio consumers: OUT-5, OUT-6 (and OUT-2's exactly-once across every kind)."""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import aggregator_reference as ar

from ._waits import call_bounded
from .conftest import Factory

BAD_BATCH_ARGUMENTS = [
    ({"max_size": 0}, ValueError, "max_size"),
    ({"max_size": -3}, ValueError, "max_size"),
    ({"max_size": 2.5}, TypeError, "max_size"),
    ({"max_size": "10"}, TypeError, "max_size"),
    ({"max_size": True}, TypeError, "max_size"),
    ({"max_wait": -0.1}, ValueError, "max_wait"),
    ({"max_wait": 1e300}, ValueError, "max_wait"),
    ({"max_wait": "1"}, TypeError, "max_wait"),
    ({"max_wait": None}, TypeError, "max_wait"),
    ({"max_wait": False}, TypeError, "max_wait"),
]


def run_loop(coroutine: Callable[[], Coroutine[Any, Any, Any]], seconds: float = 30) -> Any:
    """Run ``coroutine()`` in a fresh event loop in a daemon thread, failing instead of hanging."""
    return call_bounded(lambda: asyncio.run(coroutine()), seconds, "the event loop")


def fill(agg: Any, keys: range) -> None:
    for key in keys:
        agg.add(key, 1)
    agg.flush()


@pytest.mark.clause("OUT-5")
@pytest.mark.parametrize(("arguments", "error", "name"), BAD_BATCH_ARGUMENTS)
@pytest.mark.parametrize("method", ["batches", "abatches"])
def test_bad_batch_arguments_raise_at_the_call_naming_them(
    make: Factory, method: str, arguments: dict[str, Any], error: type[Exception], name: str
) -> None:
    agg = make()
    with pytest.raises(error, match=name):
        getattr(agg, method)(**arguments)  # the call itself raises, not the first step


@pytest.mark.clause("OUT-5", "OUT-1")
def test_batches_hold_max_size_records_in_output_order(make: Factory) -> None:
    agg = make(max_pending=100)
    fill(agg, range(7))
    batches = agg.batches(max_size=3, max_wait=1e6)
    first, second = next(batches), next(batches)
    assert (len(first), len(second), agg.pending) == (3, 3, 1)
    agg.shutdown()
    rest = list(batches)  # shut down: what waits goes out at once, then the end
    assert [len(batch) for batch in rest] == [1]
    assert sorted(first + second + rest[0]) == [(key, 1) for key in range(7)]


@pytest.mark.clause("OUT-5")
def test_a_batch_goes_out_max_wait_after_its_oldest_record_arrived(make: Factory) -> None:
    agg = make(max_pending=100)
    fill(agg, range(2))
    time.sleep(0.3)  # the records have waited longer than max_wait before anyone asks
    got = call_bounded(lambda: next(agg.batches(max_size=100, max_wait=0.2)), 10, "a due batch")
    assert sorted(got) == [(0, 1), (1, 1)]
    fill(agg, range(2, 4))
    got = call_bounded(lambda: next(agg.batches(max_size=100, max_wait=0)), 10, "max_wait=0")
    assert sorted(got) == [(2, 1), (3, 1)]


@pytest.mark.clause("OUT-5")
def test_a_batch_that_reaches_max_size_exactly_goes_out_at_once(make: Factory) -> None:
    agg = make(max_pending=100)
    fill(agg, range(3))
    got = call_bounded(lambda: next(agg.batches(max_size=3, max_wait=1e6)), 10, "a full batch")
    assert sorted(got) == [(0, 1), (1, 1), (2, 1)]


def first_batch_at(agg: Any, max_size: int, max_wait: float) -> tuple[threading.Thread, list[Any]]:
    """A consumer thread taking one batch; the list gets ``(batch, monotonic time it came)``."""
    got: list[Any] = []

    def consume() -> None:
        batch = next(agg.batches(max_size=max_size, max_wait=max_wait))
        got.append((batch, time.monotonic()))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    return consumer, got


@pytest.mark.clause("OUT-5")
def test_a_lone_record_goes_out_after_max_wait_with_nothing_else_happening(make: Factory) -> None:
    # The consumer waits first; the record's arrival wakes it, and from then on only
    # the clock can make the batch due: no other flush, no shutdown.
    agg = make(max_pending=100, flush_interval=None)
    consumer, got = first_batch_at(agg, max_size=100, max_wait=0.3)
    time.sleep(0.1)  # the consumer waits on an empty output
    before = time.monotonic()
    fill(agg, range(1))
    consumer.join(10)
    assert not consumer.is_alive(), "a batch due by max_wait alone never went out"
    [(batch, came)] = got
    assert batch == [(0, 1)]
    assert came - before >= 0.3 - 0.01, "the batch went out before max_wait"


@pytest.mark.clause("OUT-5")
def test_a_batch_asked_for_late_still_waits_out_the_rest_of_max_wait(make: Factory) -> None:
    # The record has waited 1.2 s of its 2 s when the consumer asks: 0.8 s remain.
    agg = make(max_pending=100, flush_interval=None)
    before = time.monotonic()
    fill(agg, range(1))
    time.sleep(1.2)
    consumer, got = first_batch_at(agg, max_size=100, max_wait=2.0)
    consumer.join(10)
    assert not consumer.is_alive(), "a batch due by max_wait never went out"
    [(batch, came)] = got
    assert batch == [(0, 1)]
    assert came - before >= 2.0 - 0.01, f"the batch went out {came - before:.2f} s after arriving"


@pytest.mark.clause("OUT-5")
def test_max_wait_counts_from_the_oldest_record_left_by_records_taken_one_at_a_time(
    make: Factory,
) -> None:
    # Records taken one at a time leave the clock of those still waiting as it was; once all of
    # a flush's records are taken, the next flush's arrival starts the clock anew.
    agg = make(max_pending=100, flush_interval=None)
    fill(agg, range(2))
    records = agg.records()
    first = [next(records), next(records)]  # the first flush's, one at a time
    time.sleep(0.5)
    before = time.monotonic()
    fill(agg, range(2, 5))
    first.append(next(records))  # one of the second flush's
    consumer, got = first_batch_at(agg, max_size=100, max_wait=1.0)
    consumer.join(10)
    assert not consumer.is_alive(), "a batch due by max_wait never went out"
    [(batch, came)] = got
    assert len(batch) == 2
    assert came - before >= 1.0 - 0.01, f"the batch went out {came - before:.2f} s after its records came"
    agg.shutdown()
    assert sorted(first + batch + agg.drain()) == [(key, 1) for key in range(5)]


@pytest.mark.clause("OUT-5")
def test_max_wait_counts_from_the_oldest_of_several_flushes_waiting(make: Factory) -> None:
    agg = make(max_pending=100, flush_interval=None)
    first = time.monotonic()
    fill(agg, range(2))
    time.sleep(1.0)
    fill(agg, range(2, 4))  # a second arrival, 1 s younger
    consumer, got = first_batch_at(agg, max_size=100, max_wait=1.5)
    consumer.join(10)
    assert not consumer.is_alive(), "a batch due by max_wait never went out"
    [(batch, came)] = got
    assert sorted(batch) == [(key, 1) for key in range(4)]
    waited = came - first
    # Due 1.5 s after the oldest record came; 2.5 s if timed from the younger ones.
    assert 1.5 - 0.01 <= waited < 2.2, f"the batch went out {waited:.2f} s after its oldest record came"


@pytest.mark.clause("OUT-5", "OUT-4")
def test_records_stay_in_the_output_until_their_batch_is_yielded(make: Factory) -> None:
    agg = make(max_pending=100)
    got: list[Any] = []
    consumer = threading.Thread(
        target=lambda: got.extend(agg.batches(max_size=10, max_wait=1e6)), daemon=True
    )
    consumer.start()
    fill(agg, range(3))
    time.sleep(0.2)  # the consumer waits for 7 more (or for the shutdown)
    assert agg.pending == 3
    taken = agg.drain(1)  # another consumer may take them meanwhile: exactly once
    agg.shutdown()
    consumer.join(10)
    assert not consumer.is_alive()
    assert len(got) == 1
    assert sorted(taken + got[0]) == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.clause("OUT-5", "OUT-2")
def test_batches_end_after_shutdown_once_drained(make: Factory) -> None:
    agg = make(max_pending=4)
    got: list[list[Any]] = []
    consumer = threading.Thread(
        target=lambda: got.extend(agg.batches(max_size=3, max_wait=0.05)), daemon=True
    )
    consumer.start()
    for key in range(50):
        agg.add(key, 1)
    agg.shutdown()  # needs the consumer to make room: max_pending is 4
    consumer.join(10)
    assert not consumer.is_alive(), "batches() did not end after shutdown"
    assert all(1 <= len(batch) <= 3 for batch in got)
    assert sorted(key for batch in got for key, _ in batch) == list(range(50))


@pytest.mark.clause("OUT-6", "OUT-2")
def test_arecords_waits_without_blocking_the_loop(make: Factory) -> None:
    agg = make(max_pending=1000)
    five_ticks = threading.Event()
    ticked: list[bool] = []

    def feed() -> None:  # from a thread, so that a blocked loop still gets its records, and ends
        ticked.append(five_ticks.wait(10))
        fill(agg, range(5))
        agg.shutdown()

    async def main() -> list[Any]:
        got: list[Any] = []

        async def consume() -> None:
            async for record in agg.arecords():
                got.append(record)

        async def tick() -> None:
            for _ in range(5):
                await asyncio.sleep(0.01)
            five_ticks.set()

        consumer = asyncio.create_task(consume())  # runs first: it waits on an empty output
        ticker = asyncio.create_task(tick())
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        await asyncio.wait_for(consumer, 30)
        await ticker
        return got

    got = run_loop(main, 60)
    assert ticked == [True], "the loop was blocked while arecords() waited: it did not tick"
    assert sorted(got) == [(key, 1) for key in range(5)]


@pytest.mark.clause("OUT-6")
def test_an_async_consumer_waits_without_polling(make: Factory) -> None:
    agg = make()

    async def main() -> float:
        consumer = asyncio.create_task(anext(agg.arecords()))
        await asyncio.sleep(0.05)
        cpu = time.thread_time()
        await asyncio.sleep(1.0)  # nothing arrives: a poller would spin this thread
        used = time.thread_time() - cpu
        await asyncio.to_thread(fill, agg, range(1))
        assert await asyncio.wait_for(consumer, 10) == (0, 1)
        return used

    assert run_loop(main) < 0.2, "the loop's thread was busy while its only consumer waited"


@pytest.mark.clause("OUT-6", "OUT-5")
def test_abatches_and_ashutdown_from_the_loop_that_consumes(make: Factory) -> None:
    agg = make(max_pending=3)

    async def main() -> list[list[Any]]:
        got: list[list[Any]] = []

        async def consume() -> None:
            async for batch in agg.abatches(max_size=2, max_wait=0.05):
                got.append(batch)

        consumer = asyncio.create_task(consume())
        for key in range(40):
            agg.add(key, 1)
        await agg.ashutdown()  # needs room in the output, which the consumer in this loop makes
        await asyncio.wait_for(consumer, 10)
        return got

    got = run_loop(main)
    assert all(1 <= len(batch) <= 2 for batch in got)
    assert sorted(key for batch in got for key, _ in batch) == list(range(40))


@pytest.mark.clause("OUT-6", "CLOSE-5")
def test_an_app_adding_from_the_loop_with_a_consumer_task_gets_exact_totals(make: Factory) -> None:
    agg = make(flush_interval=0.01, max_pending=50)
    totals: Counter[str] = Counter()

    async def main() -> None:
        async def consume() -> None:
            async for key, value in agg.arecords():
                totals[key] += value

        async def request(user: int) -> None:  # an ASGI handler: a few adds between awaits
            for hit in range(20):
                agg.add(f"user{user % 37}", 1)
                if hit % 5 == 0:
                    await asyncio.sleep(0)

        consumer = asyncio.create_task(consume())
        await asyncio.gather(*(request(user) for user in range(300)))
        await agg.ashutdown()
        await asyncio.wait_for(consumer, 10)

    run_loop(main, 60)
    assert sum(totals.values()) == 300 * 20
    assert totals == Counter({f"user{u}": 20 * sum(1 for x in range(300) if x % 37 == u) for u in range(37)})


@pytest.mark.clause("OUT-6", "OUT-2", "OUT-3", "OUT-5", "CLOSE-5")
def test_every_kind_of_consumer_at_once_gets_each_record_exactly_once(make: Factory) -> None:
    agg = make(flush_interval=0.005, max_pending=20)
    delivered: list[Any] = []
    lock = threading.Lock()

    def keep(records: list[Any]) -> None:
        with lock:
            delivered.extend(records)

    def by_records() -> None:
        for record in agg.records():
            keep([record])

    def by_batches() -> None:
        for batch in agg.batches(max_size=7, max_wait=0.01):
            keep(batch)

    def by_drain() -> None:
        while not agg.closed:
            keep(agg.drain(3))
            time.sleep(0.002)
        keep(agg.drain())

    async def by_arecords() -> None:
        async for record in agg.arecords():
            keep([record])

    async def by_abatches() -> None:
        async for batch in agg.abatches(max_size=5, max_wait=0.01):
            keep(batch)

    consumers = [
        threading.Thread(target=target, daemon=True)
        for target in (
            by_records,
            by_batches,
            by_drain,
            lambda: asyncio.run(by_arecords()),
            lambda: asyncio.run(by_abatches()),
        )
    ]
    for consumer in consumers:
        consumer.start()
    writers = [
        threading.Thread(target=lambda w=w: [agg.add((w, i), 1) for i in range(500)], daemon=True)
        for w in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    call_bounded(agg.shutdown, 60, "shutdown with five kinds of consumer")
    for consumer in consumers:
        consumer.join(30)
        assert not consumer.is_alive(), "a consumer did not end after shutdown"
    keys = [key for key, _ in delivered]
    assert len(keys) == len(set(keys)) == 4 * 500


@pytest.mark.clause("OUT-6", "OUT-5", "CLOSE-5")
@given(
    plan=st.lists(
        st.tuples(st.integers(0, 6), st.sampled_from(["records", "batches"]), st.integers(0, 4)),
        min_size=1,
        max_size=6,
    )
)
def test_cancelling_async_consumers_at_any_point_loses_nothing(backend_name: str, plan: list[Any]) -> None:
    # Each step: add and flush some records, start a consumer of one kind, let the loop run
    # a few rounds (it may be waiting, or between receiving a batch and its next step),
    # then cancel it. Whatever it received plus what is still in the output is everything.
    agg = ar.create(operator.add, backend=backend_name, flush_interval=None, max_pending=1000)

    async def main() -> list[Any]:
        received: list[Any] = []
        key = 0
        for new, kind, rounds in plan:
            for _ in range(new):
                agg.add(key, 1)
                key += 1
            await asyncio.to_thread(agg.flush)

            async def consume(kind: str = kind) -> None:
                if kind == "records":
                    async for record in agg.arecords():
                        received.append(record)
                else:
                    async for batch in agg.abatches(max_size=2, max_wait=0.001):
                        received.extend(batch)
                        await asyncio.sleep(0)  # cancelled here: the batch was already handed over

            task = asyncio.create_task(consume())
            for _ in range(rounds):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return received

    try:
        received = run_loop(main)
    finally:
        agg.shutdown()
    rest = agg.drain()
    keys = [key for key, _ in received + rest]
    total = sum(new for new, _, _ in plan)
    assert sorted(keys) == list(range(total)), f"received {received}, left {rest}"


@pytest.mark.clause("OUT-6", "FLUSH-1")
def test_a_flush_after_a_consumers_loop_was_closed_still_works(make: Factory) -> None:
    # A loop closed while its consumer still waited (not cancelled: loop.close() without
    # asyncio.run's clean-up) must not break the flushes that would wake it.
    agg = make(max_pending=100)
    loop = asyncio.new_event_loop()

    async def consume() -> None:
        async for _ in agg.arecords():
            pass

    task = loop.create_task(consume())
    loop.run_until_complete(asyncio.sleep(0.05))  # the consumer now waits on a future
    loop.close()
    fill(agg, range(3))  # wakes it: its loop is closed
    assert sorted(agg.drain()) == [(0, 1), (1, 1), (2, 1)]
    task._log_destroy_pending = False  # type: ignore[attr-defined]  # it is, on purpose


@pytest.mark.clause("OUT-5")
def test_max_wait_counts_from_the_oldest_record_still_waiting(make: Factory) -> None:
    agg = make(max_pending=100)
    fill(agg, range(3))
    fill(agg, range(3, 6))  # two flushes: two arrivals, both taken by the one drain below
    time.sleep(1.0)
    assert len(agg.drain()) == 6  # the old records are gone: the next batch waits afresh
    fill(agg, range(6, 8))
    got: list[Any] = []
    consumer = threading.Thread(
        target=lambda: got.extend(agg.batches(max_size=100, max_wait=1.2)), daemon=True
    )
    consumer.start()
    time.sleep(0.6)  # due 1.2 s after the new records arrived; 0.2 s if timed from the old ones
    assert got == [], "a batch went out before its oldest record had waited max_wait"
    agg.shutdown()
    consumer.join(10)
    assert not consumer.is_alive()
    assert [sorted(batch) for batch in got] == [[(6, 1), (7, 1)]]


@pytest.mark.clause("OUT-6", "OUT-2")
def test_cancelling_one_waiting_consumer_leaves_the_others_waiting(make: Factory) -> None:
    agg = make()

    async def main() -> Any:
        async def take() -> Any:
            async for record in agg.arecords():
                return record
            return None

        first = asyncio.ensure_future(take())
        second = asyncio.ensure_future(take())
        await asyncio.sleep(0.05)  # both wait on the empty output
        first.cancel()
        await asyncio.sleep(0.05)
        await asyncio.to_thread(fill, agg, range(1))  # must still wake the second
        return await asyncio.wait_for(second, 10)

    assert run_loop(main) == (0, 1)
