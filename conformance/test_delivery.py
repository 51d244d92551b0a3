"""Delivering to a sink: SINK-1 … SINK-4 (deliver, adeliver, and shutdown's wait for them).

The sinks here are in-memory ledgers that fail on purpose: before applying a
batch (the connection dropped) or after (the commit happened, its
acknowledgement was lost). Like a database that stores the ids it committed in
the batch's own transaction, a ledger skips a ``batch_id`` it has applied, so
its totals are exact exactly when the delivery retries each batch whole, under
its own id, and drops nothing. Every wait is bounded; retries wait milliseconds
(:data:`FAST`).
"""

from __future__ import annotations

import asyncio
import logging
import operator
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import pytest

import aggregator_reference as ar

from ._waits import call_bounded
from .conftest import Factory, run_threads, shutdown_collecting
from .test_bounds import Background, wait_until
from .test_consumers import run_loop

#: Seconds a bounded wait of these tests allows: far more than any of them needs.
LIMIT = 10.0
#: Retries a millisecond or so apart, so that a failing sink costs the tests little.
FAST = ar.Retry(first=0.001, maximum=0.005)

Records = list[tuple[Any, Any]]


class SinkDown(Exception):
    """What a ledger's failing ``write`` raises: the delivery must retry the batch."""


class SinkCrash(BaseException):
    """Not an ``Exception``: a ``write`` or ``close`` raising it ends the delivery (SINK-4)."""


class Call(NamedTuple):
    """One ``write`` as the sink saw it."""

    batch_id: str
    records: Records  # a copy, taken when the call came
    outcome: str  # "ok", "again" (an id already applied: skipped), "before" or "after" (raised)

    @property
    def raised(self) -> bool:
        return self.outcome in {"before", "after"}


class Ledger:
    """A sink that applies each ``batch_id`` once and records every call.

    ``write`` raises :class:`SinkDown` while ``healthy`` is clear; otherwise it
    follows ``script`` (outcomes for the first calls), then fails at random at
    the rate ``failures``, half of the time before applying the batch and half
    after. ``pause`` seconds per write make it slow. No ``close()``: see
    :class:`ClosingLedger`.
    """

    def __init__(
        self,
        merge: Callable[[Any, Any], Any] = operator.add,
        *,
        failures: float = 0.0,
        seed: int = 0,
        script: Sequence[str] = (),
        healthy: threading.Event | None = None,
        pause: float = 0.0,
    ) -> None:
        self.merge = merge
        self.failures = failures
        self.random = random.Random(seed)
        self.script = list(script)
        self.healthy = healthy
        self.pause = pause
        self.calls: list[Call] = []  # every write, in order
        self.applied: dict[str, Records] = {}  # batch_id -> its records, in the order applied
        self.totals: dict[Any, Any] = {}  # every applied record folded with merge, per key
        self.raised: list[SinkDown] = []  # every exception its writes raised
        self.events: list[str] = []  # "write" and "close", in order

    def write(self, batch: Records, batch_id: str, /) -> None:
        self.apply(batch, batch_id)

    def apply(self, batch: Records, batch_id: str) -> None:
        """What ``write`` does, shared with :class:`AsyncLedger`."""
        self.events.append("write")
        records = list(batch)
        if self.pause:
            time.sleep(self.pause)
        outcome = self._outcome()
        if outcome == "before":
            self._fail(batch_id, records, outcome)
        if batch_id in self.applied:
            outcome = "again" if outcome == "ok" else outcome
        else:
            self.applied[batch_id] = records
            for key, value in records:
                self.totals[key] = self.merge(self.totals[key], value) if key in self.totals else value
        if outcome == "after":
            self._fail(batch_id, records, outcome)
        self.calls.append(Call(batch_id, records, outcome))

    def _outcome(self) -> str:
        if self.healthy is not None and not self.healthy.is_set():
            return "before"
        if self.script:
            return self.script.pop(0)
        draw = self.random.random()
        if draw < self.failures / 2:
            return "before"
        return "after" if draw < self.failures else "ok"

    def _fail(self, batch_id: str, records: Records, outcome: str) -> None:
        self.calls.append(Call(batch_id, records, outcome))
        error = SinkDown(f"batch {batch_id} failed {outcome} applying")
        self.raised.append(error)
        raise error

    def sequence(self) -> Records:
        """Every applied record, in the order the sink applied them."""
        return [record for records in self.applied.values() for record in records]


class ClosingLedger(Ledger):
    """A :class:`Ledger` with ``close()``, which counts its calls."""

    closes = 0

    def close(self) -> None:
        self.events.append("close")
        self.closes += 1


class AsyncLedger(ClosingLedger):
    """A :class:`ClosingLedger` whose ``write`` and ``close`` are coroutines: inert unless awaited."""

    async def write(self, batch: Records, batch_id: str, /) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.apply(batch, batch_id)

    async def close(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().close()


def agg_backend(agg: Any) -> str:
    """The registry name of ``agg``'s backend."""
    return next(name for name in ar.backend_names() if isinstance(agg, ar.load_backend(name)))


def folded(
    records: Iterable[tuple[Any, Any]], merge: Callable[[Any, Any], Any] = operator.add
) -> dict[Any, Any]:
    """``records`` folded per key with ``merge``, in order."""
    totals: dict[Any, Any] = {}
    for key, value in records:
        totals[key] = merge(totals[key], value) if key in totals else value
    return totals


def check_batch_ids(sink: Ledger, batch_size: int) -> None:
    """SINK-2: ids ``"<writer>:<n>"`` of one writer, ``n`` from 1, the next only once a write returned.

    A write that raised is followed by a write of the same id with the same
    records in the same order; every batch holds 1 to ``batch_size`` records.
    """
    assert sink.calls, "the sink was never written"
    writers = {call.batch_id.rpartition(":")[0] for call in sink.calls}
    assert len(writers) == 1, f"one delivery wrote under several writers: {sorted(writers)}"
    assert writers != {""}, f"batch ids are not '<writer>:<n>': {sink.calls[0].batch_id!r}"
    first: dict[str, Records] = {}
    previous: Call | None = None
    for call in sink.calls:
        n = int(call.batch_id.rpartition(":")[2])
        if previous is None:
            assert n == 1, f"the first batch is {call.batch_id!r}, not n = 1"
        elif previous.raised:
            assert call.batch_id == previous.batch_id, (
                f"batch {previous.batch_id} raised, then {call.batch_id} was written before it"
            )
        else:
            expected = int(previous.batch_id.rpartition(":")[2]) + 1
            assert n == expected, f"batch {call.batch_id} was written after {previous.batch_id}"
        seen = first.setdefault(call.batch_id, call.records)
        assert call.records == seen, f"the retry of {call.batch_id} carried {call.records}, first {seen}"
        assert 1 <= len(call.records) <= batch_size, f"batch {call.batch_id} has {len(call.records)} records"
        previous = call


def check_stats(delivery: ar.Delivery[Any, Any], sink: Ledger) -> None:
    """SINK-3: a delivery that has ended counts what the sink acknowledged, and holds nothing."""
    stats = delivery.stats()
    acknowledged = {call.batch_id: call.records for call in sink.calls if not call.raised}
    assert stats.batches == len(acknowledged)
    assert stats.records == sum(len(records) for records in acknowledged.values())
    assert stats.retries == sum(call.raised for call in sink.calls)
    assert (stats.held, stats.failing, stats.done) == (0, False, True), stats
    assert delivery.held() == []
    assert delivery.error is None


def shutdown_bounded(agg: Any) -> None:
    call_bounded(agg.shutdown, LIMIT, "shutdown() with a delivery running")


def error_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aggregator_reference" and r.levelno >= logging.ERROR]


class NotCallableWrite:
    write = "not a method"


BAD_DELIVERY_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"sink": object()}, TypeError, "sink"),
    ({"sink": NotCallableWrite()}, TypeError, "sink"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 1.5}, TypeError, "batch_size"),
    ({"batch_size": True}, TypeError, "batch_size"),
    ({"max_wait": -1}, ValueError, "max_wait"),
    ({"max_wait": "x"}, TypeError, "max_wait"),
    ({"retry": 0.1}, TypeError, "retry"),
    ({"retry": {"first": 0.1}}, TypeError, "retry"),
]


@pytest.mark.clause("SINK-1")
@pytest.mark.parametrize(("arguments", "error", "name"), BAD_DELIVERY_ARGUMENTS)
@pytest.mark.parametrize("method", ["deliver", "adeliver"])
def test_bad_arguments_raise_naming_them_and_start_nothing(
    make: Factory, method: str, arguments: dict[str, Any], error: type[Exception], name: str
) -> None:
    agg = make(max_pending=10)
    for key in range(3):
        agg.add(key, 1)
    agg.flush()
    sink = ClosingLedger()
    options = {"sink": sink, "max_wait": 0, **arguments}
    before = set(threading.enumerate())

    async def in_a_loop() -> None:
        with pytest.raises(error, match=name):
            agg.adeliver(**options)
        await asyncio.sleep(0.01)  # a task it started would run now

    if method == "adeliver":
        run_loop(in_a_loop, LIMIT)
    else:
        with pytest.raises(error, match=name):
            agg.deliver(**options)
    started = [t for t in threading.enumerate() if t not in before]
    assert not started, f"{method}() with a bad {name} started {started}"
    assert sink.events == [], f"{method}() with a bad {name} wrote or closed the sink"
    assert agg.pending == 3, "a record left the output"
    # Nothing was registered either: a good delivery starts, and takes everything.
    good = ClosingLedger()
    delivery = agg.deliver(good, max_wait=0)
    shutdown_bounded(agg)
    assert good.totals == {0: 1, 1: 1, 2: 1}
    assert delivery.done


@pytest.mark.clause("SINK-1", "SINK-4")
def test_one_delivery_at_a_time_and_another_once_it_ended(make: Factory) -> None:
    agg = make()
    first = ClosingLedger()
    delivery = agg.deliver(first, max_wait=0)
    second = ClosingLedger()
    with pytest.raises(ar.DeliveryError, match="running"):
        agg.deliver(second)
    assert issubclass(ar.DeliveryError, ar.AggregatorError)
    assert issubclass(ar.DeliveryError, RuntimeError)

    async def in_a_loop() -> None:
        with pytest.raises(ar.DeliveryError):
            agg.adeliver(second)

    run_loop(in_a_loop, LIMIT)
    agg.add("a", 1)
    agg.flush()
    wait_until(lambda: delivery.stats().records == 1, "the first delivery writing a")
    assert second.events == [], "a refused delivery wrote or closed its sink"

    class Crashes(ClosingLedger):
        def write(self, batch: Records, batch_id: str, /) -> None:
            raise SinkCrash("the sink's process is going away")

    # A delivery that ended (its write raised a BaseException) lets another start while the
    # aggregator is open (after shutdown() completed, deliver() is refused: see test_delivery_edges).
    crashing = ar.create(operator.add, backend=agg_backend(agg), flush_interval=None)
    ended = crashing.deliver(Crashes(), max_wait=0)
    crashing.add("b", 1)
    crashing.flush()
    assert ended.wait(LIMIT)
    third = ClosingLedger()
    crashing.deliver(third, max_wait=0)
    shutdown_bounded(crashing)
    assert Counter(third.totals) + Counter(folded(ended.held())) == {"b": 1}
    shutdown_bounded(agg)
    assert first.totals == {"a": 1}
    assert delivery.done


@pytest.mark.clause("SINK-1")
def test_deliver_from_several_threads_at_once_starts_one(make: Factory) -> None:
    agg = make()
    sinks = [ClosingLedger() for _ in range(4)]
    started: list[int] = []
    refused: list[int] = []

    def start(index: int) -> None:
        try:
            agg.deliver(sinks[index], max_wait=0)
        except ar.DeliveryError:
            refused.append(index)
        else:
            started.append(index)

    run_threads(4, start, timeout=LIMIT)
    assert (len(started), len(refused)) == (1, 3), f"started {started}, refused {refused}"
    agg.add("a", 1)
    shutdown_bounded(agg)
    assert sinks[started[0]].totals == {"a": 1}
    assert all(sinks[index].events == [] for index in refused)


@pytest.mark.clause("SINK-2")
def test_batch_ids_count_from_one_under_a_writer_unique_to_the_delivery(make: Factory) -> None:
    writers = []
    for _ in range(2):
        agg = make(max_pending=100)
        for key in range(7):
            agg.add(key, 1)
        sink = Ledger()
        agg.deliver(sink, batch_size=3, max_wait=0)
        shutdown_bounded(agg)
        numbers = [call.batch_id.rpartition(":")[2] for call in sink.calls]
        assert numbers == [str(n) for n in range(1, len(numbers) + 1)]
        assert sum(len(call.records) for call in sink.calls) == 7
        check_batch_ids(sink, 3)
        writer = sink.calls[0].batch_id.rpartition(":")[0]
        uuid.UUID(writer)  # a random UUID: ValueError if it is not one
        writers.append(writer)
    assert writers[0] != writers[1], "two deliveries wrote under one writer id"


@pytest.mark.clause("SINK-2", "CLOSE-5")
@pytest.mark.usefixtures("fast_switching")
def test_failed_writes_are_retried_whole_in_sequence_and_totals_are_exact(make: Factory) -> None:
    agg = make(flush_interval=0.01, max_pending=8)
    sink = ClosingLedger(failures=0.3, seed=2024, script=["before", "ok", "after"])
    delivery = agg.deliver(sink, batch_size=3, max_wait=0.002, retry=FAST)
    added = [Counter[str]() for _ in range(4)]

    def write(index: int) -> None:
        for i in range(1500):
            key = f"k{(i * 7 + index) % 60}"
            agg.add(key, 1)
            added[index][key] += 1
            if i % 100 == 0:
                time.sleep(0.001)  # let the flusher tick while the writers add

    run_threads(4, write, timeout=LIMIT)
    shutdown_bounded(agg)
    assert sink.totals == sum(added, Counter[str]()), "what the sink applied differs from what was added"
    check_batch_ids(sink, 3)
    outcomes = Counter(call.outcome for call in sink.calls)
    assert outcomes["before"] >= 1, f"no write failed before applying: {outcomes}"
    assert outcomes["after"] >= 1, f"no write failed after applying: {outcomes}"
    check_stats(delivery, sink)
    assert sink.closes == 1


@pytest.mark.clause("SINK-2", "ADD-5")
@pytest.mark.usefixtures("fast_switching")
def test_the_records_of_one_key_reach_the_sink_in_each_threads_order(make: Factory) -> None:
    # Values are tuples of (thread, sequence number) pairs, concatenated: folding a key's
    # records in the order the sink got them must show each thread's numbers increasing.
    # Frequent flushes and a slow sink put several records of each key in most batches.
    agg = make(operator.add, flush_interval=0.001, max_pending=16)
    sink = Ledger(operator.add, failures=0.3, seed=7, script=["after", "before"], pause=0.002)
    delivery = agg.deliver(sink, batch_size=6, max_wait=0.005, retry=FAST)
    threads, count, keys = 4, 400, 2

    def write(index: int) -> None:
        for i in range(count):
            agg.add(f"k{i % keys}", ((index, i),))
            if i % 20 == 0:
                time.sleep(0.001)  # spread the adds over many flushes

    run_threads(threads, write, timeout=LIMIT)
    shutdown_bounded(agg)
    check_batch_ids(sink, 6)
    assert delivery.stats().retries >= 2
    for key, value in folded(sink.sequence()).items():
        for index in range(threads):
            mine = [i for thread, i in value if thread == index]
            assert mine == list(range(int(key[1:]), count, keys)), (
                f"thread {index}'s values of {key} reached the sink as {mine}"
            )
    assert sum(len(value) for value in sink.totals.values()) == threads * count


@pytest.mark.clause("SINK-3", "OUT-1", "FLUSH-2")
@pytest.mark.usefixtures("fast_switching")
def test_a_failing_sink_holds_one_batch_while_adds_keep_merging(make: Factory) -> None:
    keys, max_pending, batch_size = 12, 6, 4
    agg = make(flush_interval=0.01, max_pending=max_pending)
    healthy = threading.Event()
    sink = ClosingLedger(healthy=healthy)
    delivery = agg.deliver(sink, batch_size=batch_size, max_wait=0.002, retry=FAST)
    stop = threading.Event()
    added = [Counter[int]() for _ in range(4)]

    def write(index: int) -> None:
        i = 0
        while not stop.is_set():
            key = (i * 5 + index) % keys
            agg.add(key, 1)
            added[index][key] += 1
            i += 1
            if i % 64 == 0:
                time.sleep(0.0005)  # let the flusher and the delivery run on a busy GIL

    writers = Background(lambda: run_threads(4, write, timeout=LIMIT), "the writers")
    try:
        wait_until(lambda: delivery.stats().retries >= 2, "the first batch failing twice")
        samples: list[ar.DeliveryStats] = []
        while len(samples) < 20:
            stats, pending, buffered = delivery.stats(), agg.pending, len(agg)
            samples.append(stats)
            assert pending <= max_pending, f"{pending} pending with max_pending={max_pending}"
            assert buffered <= keys, f"{buffered} keys buffered, of {keys} keys added"
            time.sleep(0.001)
        wait_until(lambda: delivery.stats().retries > samples[-1].retries + 2, "the retries going on")
        stop.set()
        writers.join()
        assert not writers.raised, f"an add failed while the sink failed: {writers.raised}"
        assert agg.stats().merges > 0
        batch = sink.calls[0].records
        assert {call.batch_id for call in sink.calls} == {sink.calls[0].batch_id}, (
            "a failing batch was skipped"
        )
        for stats in [*samples, delivery.stats()]:
            assert stats.failing
            assert stats.held == len(batch), f"held {stats.held}, the batch written has {len(batch)}"
            assert (stats.batches, stats.records, stats.done) == (0, 0, False)
            assert any(stats.last_error is error for error in sink.raised), stats.last_error
        assert samples[0].retries <= samples[-1].retries < delivery.stats().retries
        assert delivery.held() == batch
        assert agg.pending <= max_pending
        assert len(agg) <= keys
    finally:
        stop.set()
        healthy.set()
    shutdown_bounded(agg)
    assert sink.totals == sum(added, Counter[int]())
    check_batch_ids(sink, batch_size)
    check_stats(delivery, sink)
    assert isinstance(delivery.stats().last_error, SinkDown), "last_error is kept after later writes succeed"


@pytest.mark.clause("SINK-4", "CLOSE-4")
@pytest.mark.parametrize("keys", [20, 200], ids=["output-fits", "output-full"])
def test_shutdown_times_out_while_the_sink_fails_and_a_later_one_continues(make: Factory, keys: int) -> None:
    agg = make(max_pending=50)
    for key in range(keys):
        agg.add(key, 1)
    healthy = threading.Event()
    sink = ClosingLedger(healthy=healthy)
    delivery = agg.deliver(sink, batch_size=5, max_wait=0, retry=FAST)
    try:
        agg.flush()  # with 200 keys the output is full and the rest is re-queued
        wait_until(lambda: delivery.stats().retries >= 1, "the first write failing")
        with pytest.raises(TimeoutError):
            call_bounded(lambda: agg.shutdown(timeout=0.3), LIMIT, "shutdown(timeout=0.3)")
        assert not agg.closed
        with pytest.raises(ar.AggregatorClosedError):
            agg.add("late", 1)
        stats = delivery.stats()
        assert (stats.failing, stats.done, stats.held) == (True, False, 5), stats
        # Every record is still held: in the buffer, the output or the delivery's batch.
        assert len(agg) + agg.pending + stats.held == keys
        assert sink.events.count("close") == 0, "the sink was closed with records still to write"
    finally:
        healthy.set()
    shutdown_bounded(agg)
    assert agg.closed
    assert sink.totals == dict.fromkeys(range(keys), 1)
    assert sink.events.count("close") == 1, "close() was not called exactly once"
    assert sink.events[-1] == "close", f"a write came after close(): {sink.events[-3:]}"
    check_batch_ids(sink, 5)
    check_stats(delivery, sink)


@pytest.mark.clause("SINK-4", "CLOSE-1")
@pytest.mark.parametrize("sink_type", [ClosingLedger, Ledger], ids=["with-close", "without-close"])
def test_shutdown_returns_once_the_sink_has_everything(make: Factory, sink_type: type[Ledger]) -> None:
    agg = make(max_pending=1000)
    for key in range(200):
        agg.add(key, 1)
    sink = sink_type(pause=0.0005)  # 40 slow batches, all written after shutdown() began
    delivery = agg.deliver(sink, batch_size=5, max_wait=0)
    shutdown_bounded(agg)
    # No waiting from here on: shutdown() itself waited.
    assert sink.totals == dict.fromkeys(range(200), 1)
    assert delivery.done
    if isinstance(sink, ClosingLedger):
        assert sink.closes == 1
        assert sink.events[-1] == "close"
    check_stats(delivery, sink)


class Crashing(ClosingLedger):
    """Writes ``good`` batches, fails the next with :class:`SinkDown`, then raises ``crash`` on its retry."""

    def __init__(self, good: int, crash: SinkCrash) -> None:
        super().__init__(script=["ok"] * good + ["before"])
        self.crash = crash
        self.crashed_with: Records = []

    def write(self, batch: Records, batch_id: str, /) -> None:
        if not self.script and self.calls and self.calls[-1].raised:
            self.crashed_with = list(batch)
            raise self.crash
        self.apply(batch, batch_id)


@pytest.mark.clause("SINK-4", "CLOSE-5")
@pytest.mark.parametrize("then", ["drain", "deliver-again"])
def test_a_base_exception_from_write_ends_the_delivery_and_loses_nothing(
    make: Factory, caplog: pytest.LogCaptureFixture, then: str
) -> None:
    caplog.set_level(logging.ERROR, logger="aggregator_reference")
    agg = make(max_pending=10)
    for key in range(40):
        agg.add(key, 1)
    agg.flush()  # 10 in the output, 30 buffered
    crash = SinkCrash("the sink's process is going away")
    sink = Crashing(good=2, crash=crash)
    delivery = agg.deliver(sink, batch_size=3, max_wait=0, retry=FAST)
    assert delivery.wait(LIMIT), "a BaseException from write did not end the delivery"
    assert delivery.done
    assert delivery.stats().done
    assert delivery.error is crash
    assert sink.crashed_with, "the sink never crashed"
    assert delivery.held() == sink.crashed_with, "held() is not the batch the delivery held"
    assert delivery.stats().held == len(sink.crashed_with)
    assert error_logs(caplog), "the end of the delivery was not logged at ERROR"
    assert sink.closes == 0
    if then == "drain":
        rest = shutdown_collecting(agg, limit=LIMIT)  # shutdown() does not wait for the ended delivery
    else:
        again = ClosingLedger(pause=0.0005)
        agg.deliver(again, batch_size=3, max_wait=0)  # the first one ended: another may start
        shutdown_bounded(agg)  # which waits for the new one: no waiting from here on
        rest = again.totals
        assert again.closes == 1
    everything = Counter(folded(sink.sequence())) + Counter(folded(delivery.held())) + Counter(rest)
    assert everything == dict.fromkeys(range(40), 1)


@pytest.mark.clause("SINK-4")
def test_a_base_exception_from_close_ends_the_delivery_and_shutdown_returns(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aggregator_reference")
    crash = SinkCrash("close failed")

    class CrashingClose(ClosingLedger):
        def close(self) -> None:
            super().close()
            raise crash

    agg = make()
    sink = CrashingClose()
    delivery = agg.deliver(sink, max_wait=0)
    agg.add("a", 1)
    shutdown_bounded(agg)
    assert agg.closed
    assert sink.totals == {"a": 1}
    assert delivery.wait(LIMIT)
    assert delivery.error is crash
    assert delivery.held() == []
    assert error_logs(caplog)


@pytest.mark.clause("SINK-1", "SINK-2", "SINK-4", "OUT-6")
@pytest.mark.parametrize("sink_type", [AsyncLedger, ClosingLedger], ids=["async-sink", "sync-sink"])
def test_adeliver_writes_everything_added_from_the_loop(
    make: Factory, sink_type: type[ClosingLedger]
) -> None:
    agg = make(flush_interval=0.01, max_pending=8)
    sink = sink_type(failures=0.3, seed=11, script=["before", "after"])
    added = Counter[str]()

    async def main() -> ar.Delivery[Any, Any]:
        delivery: ar.Delivery[Any, Any] = agg.adeliver(sink, batch_size=4, max_wait=0.002, retry=FAST)

        async def produce(index: int) -> None:
            for i in range(300):
                key = f"k{(index + i) % 13}"
                agg.add(key, 1)
                added[key] += 1
                if i % 10 == 0:
                    await asyncio.sleep(0)

        await asyncio.gather(*(produce(index) for index in range(10)))
        await agg.ashutdown()
        assert delivery.done, "ashutdown() returned before the delivery ended"
        return delivery

    delivery = run_loop(main, LIMIT)
    assert sink.totals == added
    assert sink.closes == 1, "the async close() was not awaited exactly once"
    assert sink.events[-1] == "close"
    check_batch_ids(sink, 4)
    assert delivery.stats().retries >= 2
    check_stats(delivery, sink)


@pytest.mark.clause("SINK-1")
def test_adeliver_outside_a_running_loop_raises_and_starts_nothing(make: Factory) -> None:
    agg = make()
    sink = ClosingLedger()
    with pytest.raises(RuntimeError):
        agg.adeliver(sink)
    other = ClosingLedger()
    agg.deliver(other, max_wait=0)  # nothing was registered: no DeliveryError
    agg.add("a", 1)
    shutdown_bounded(agg)
    assert other.totals == {"a": 1}
    assert sink.events == []


@pytest.mark.clause("SINK-1", "SINK-2")
def test_deliver_refuses_a_sink_whose_write_is_a_coroutine_function(make: Factory) -> None:
    # deliver() calls write in a thread, where the coroutine it returns never runs: counting
    # that as written would drop the batch while stats() says it was written (SINK-2).
    agg = make()
    agg.add("k", 1)
    agg.flush()
    with pytest.raises(TypeError, match=r"sink .*async write\(\).*adeliver\(\)"):
        agg.deliver(AsyncLedger(), max_wait=0)
    assert agg.drain() == [("k", 1)]  # nothing started, nothing consumed
    agg.deliver(ClosingLedger(), max_wait=0)  # nothing registered either


class ReturnsACoroutine(ClosingLedger):
    """A plain ``write`` that hands back a coroutine (a wrapper around an async client, say)."""

    def write(self, batch: Records, batch_id: str, /) -> Any:
        async def later() -> None:
            self.apply(batch, batch_id)

        return later()


@pytest.mark.clause("SINK-2", "SINK-4")
def test_a_write_returning_an_awaitable_ends_the_delivery_and_loses_nothing(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    agg = make()
    sink = ReturnsACoroutine()
    for key in range(5):
        agg.add(key, 1)
    agg.flush()
    delivery = agg.deliver(sink, max_wait=0)
    assert delivery.wait(LIMIT)
    assert isinstance(delivery.error, TypeError)
    assert "adeliver()" in str(delivery.error)
    assert delivery.stats().batches == 0
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    rest = shutdown_collecting(agg, limit=LIMIT)
    assert sink.totals == {}
    assert Counter(folded(delivery.held())) + Counter(rest) == dict.fromkeys(range(5), 1)
