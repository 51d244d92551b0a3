"""Bounding the buffer: BUF-1, BUF-2, BUF-3, and their counters in STAT-1.

Bad values of ``max_buffered``, ``max_block`` and ``flush_at`` are in
``test_construction``'s ARG-1 table. A read that overlaps a flush may be stale
(READ-2), so the exact checks below read the buffer after a manual ``flush()``
into a full output: it waits for a running flush (FLUSH-4), hands nothing
off and changes nothing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import aggregator_reference as ar

from ._waits import call_bounded
from .conftest import Factory, fold_records, run_threads, shutdown_collecting

#: Seconds a bounded wait of these tests allows: far more than any of them needs.
LIMIT = 10.0


def wait_until(condition: Callable[[], bool], what: str, seconds: float = LIMIT) -> None:
    """Poll ``condition`` until it holds; fail saying ``what`` did not happen within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g} s")
        time.sleep(0.002)


class Background:
    """``target()`` run in a daemon thread; :meth:`join` is bounded and fails with a message."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        self.name = name
        self.returned: list[object] = []
        self.raised: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self.thread.start()

    def _run(self, target: Callable[[], object]) -> None:
        try:
            self.returned.append(target())
        except BaseException as exc:
            self.raised.append(exc)

    def join(self, seconds: float = LIMIT) -> None:
        self.thread.join(seconds)
        assert not self.thread.is_alive(), f"{self.name} did not finish within {seconds:g} s"


def folded(records: list[tuple[Any, int]]) -> dict[Any, int]:
    """``records`` summed per key."""
    totals: dict[Any, int] = {}
    for key, value in records:
        totals[key] = totals.get(key, 0) + value
    return totals


@pytest.mark.clause("BUF-1", "BUF-2", "STAT-1")
def test_one_writer_fills_the_buffer_exactly_then_waits_then_fails(make: Factory) -> None:
    agg = make(max_buffered=3, max_pending=1, max_block=1.0)
    for key in range(3):
        assert agg.add(key, 1) is False
    assert agg.pending == 0, "the flusher ran before an add found the buffer full"
    assert agg.stats().early_flushes == 0

    # At the bound: the add wakes the flusher, whose flush hands one record to the
    # output (max_pending=1) and re-queues two, which makes room for the new one.
    assert call_bounded(lambda: agg.add(3, 1), LIMIT, "add() of a 4th key at the bound") is False
    assert agg.flush() == 0  # the output is full: waits for the flusher's flush, changes nothing
    assert agg.pending == 1
    assert len(agg) == 3, "with one writer the buffer holds exactly max_buffered records (BUF-2)"
    stats = agg.stats()
    assert stats.stored == 4
    assert stats.adds_waited == 1, "the 4th add waited for room: one add, however many looks"
    assert stats.early_flushes >= 1, "the 4th add woke the flusher"
    assert stats.buffer_full_errors == 0

    # At the bound with the output full: every flush re-queues everything, no room comes.
    before = agg.snapshot()
    with pytest.raises(ar.BufferFullError) as caught:
        call_bounded(lambda: agg.add(4, 1), LIMIT, "add() of a 5th key with no room coming")
    assert isinstance(caught.value, ar.AggregatorError)
    assert "3" in str(caught.value), f"the message names neither count: {caught.value}"
    assert agg.flush() == 0
    assert agg.get(4) is None
    assert len(agg) == 3
    assert agg.snapshot() == before
    after = agg.stats()
    assert (after.adds, after.merges, after.stored) == (stats.adds, stats.merges, stats.stored)
    assert after.buffer_full_errors == 1
    assert after.adds_waited == 2, "adds that waited, each once, however long it looked for room"

    buffered = next(iter(before))  # a merge into a buffered record is accepted while full
    assert call_bounded(lambda: agg.add(buffered, 10), LIMIT, "add() merging while full") is True
    assert agg.stats().merges == stats.merges + 1

    delivered = folded(agg.drain())  # room in the output: the next flush makes room in the buffer
    assert call_bounded(lambda: agg.add(4, 1), LIMIT, "add() of the 5th key after drain()") is False
    shutdown_collecting(agg, into=delivered)
    expected = dict.fromkeys(range(5), 1)
    expected[buffered] += 10
    assert delivered == expected


@pytest.mark.clause("BUF-1", "FLUSH-2", "CLOSE-5")
def test_requeued_records_are_never_dropped_to_keep_the_bound(make: Factory) -> None:
    agg = make(max_buffered=2, max_pending=1, max_block=0.2)
    accepted: Counter[str] = Counter()
    delivered: dict[str, int] = {}
    refused = 0
    for step in range(24):
        key, value = f"k{step % 4}", step + 1  # distinct values: a lost or doubled one shows
        try:
            agg.add(key, value)
        except ar.BufferFullError:
            refused += 1
        else:
            accepted[key] += value
        if step % 4 == 3:
            for got, each in agg.drain(limit=1):
                delivered[got] = delivered.get(got, 0) + each
    stats = agg.stats()
    assert stats.requeued >= 1, "no flush re-queued anything: the test did not test BUF-1"
    assert stats.buffer_full_errors == refused
    shutdown_collecting(agg, into=delivered)
    assert delivered == dict(accepted)
    assert agg.stats().adds == 24 - refused


@pytest.mark.clause("BUF-1", "CLOSE-2", "CLOSE-5")
def test_an_add_waiting_for_room_when_shutdown_begins_is_refused(make: Factory) -> None:
    agg = make(max_buffered=2, max_pending=1, max_block=30)
    agg.add("a", 1)
    agg.add("b", 1)
    assert agg.flush() == 1  # one record fills the output, the other is re-queued
    assert agg.add("c", 1) is False  # the buffer is at its bound, the output full
    before = agg.stats()
    adding = Background(lambda: agg.add("d", 1), "add() waiting for room")
    wait_until(
        lambda: (
            agg.stats().adds_waited > before.adds_waited or agg.stats().early_flushes > before.early_flushes
        ),
        "the waiting add() waking the flusher",
    )
    assert adding.thread.is_alive(), f"add() did not wait for room: {adding.returned or adding.raised}"

    stopping = Background(lambda: agg.shutdown(timeout=LIMIT), "shutdown()")
    adding.join()  # well before max_block: shutdown() has begun, no consumer yet
    assert adding.returned == [], "an add() waiting when shutdown() began was accepted"
    [error] = adding.raised
    assert isinstance(error, ar.AggregatorClosedError), f"expected AggregatorClosedError, got {error!r}"

    delivered: dict[str, int] = {}
    consumer = Background(lambda: fold_records(agg, delivered), "consumer")
    stopping.join(LIMIT + 5)
    consumer.join()
    assert stopping.raised == [], f"shutdown() raised {stopping.raised}"
    assert delivered == {"a": 1, "b": 1, "c": 1}
    assert agg.stats().adds == 3


@pytest.mark.clause("BUF-1", "STAT-1")
def test_max_block_zero_fails_at_once_and_still_wakes_the_flusher(make: Factory) -> None:
    agg = make(max_buffered=1, max_pending=1, max_block=0)
    agg.add("a", 1)
    assert agg.flush() == 1  # the output is full from now on
    assert agg.add("b", 1) is False  # and the buffer at its bound
    before = agg.stats()
    with pytest.raises(ar.BufferFullError):
        call_bounded(lambda: agg.add("c", 1), LIMIT, "add() with max_block=0")
    wait_until(
        lambda: agg.stats().early_flushes > before.early_flushes, "the refused add() waking the flusher"
    )
    assert agg.flush() == 0  # waits for that flush (the output is full): "b" is buffered again
    assert agg.add("b", 1) is True  # a merge is accepted at the bound
    stats = agg.stats()
    assert (stats.stored, stats.buffer_full_errors) == (before.stored, 1)
    assert shutdown_collecting(agg) == {"a": 1, "b": 2}


@pytest.mark.clause("BUF-3", "FLUSH-3", "STAT-1")
@pytest.mark.parametrize("flush_interval", [100, None])
def test_flush_at_runs_the_flusher_at_once(make: Factory, flush_interval: float | None) -> None:
    agg = make(flush_interval=flush_interval, flush_at=5, max_pending=100)
    for key in range(4):
        agg.add(key, 1)
    agg.add(0, 1)  # merges do not bring the buffer closer to flush_at
    time.sleep(0.2)  # room for an early flush that must not happen
    assert (agg.pending, agg.stats().early_flushes) == (0, 0), "flushed before flush_at records"
    agg.add(4, 1)
    wait_until(
        lambda: agg.pending == 5 and agg.stats().early_flushes >= 1,
        "the early flush of the 5 records buffered at flush_at=5",
    )
    assert agg.flush() == 0, "the early flush left records buffered"
    assert shutdown_collecting(agg) == {0: 2, 1: 1, 2: 1, 3: 1, 4: 1}


@pytest.mark.clause("BUF-1", "BUF-3", "FLUSH-3")
def test_the_flusher_of_a_bound_runs_only_when_woken(make: Factory) -> None:
    agg = make(max_buffered=5, max_pending=100)
    for key in range(5):  # up to the bound: nothing waits, nothing wakes the flusher
        assert agg.add(key, 1) is False
    time.sleep(0.2)  # room for a flush that must not happen
    stats = agg.stats()
    assert (agg.pending, stats.flushes, stats.early_flushes, stats.adds_waited) == (0, 0, 0, 0)
    assert len(agg) == 5


@pytest.mark.clause("BUF-2", "BUF-1", "CLOSE-5")
def test_several_writers_exceed_the_bound_by_at_most_one_record_each(make: Factory) -> None:
    writers, bound, keys = 4, 50, 300
    agg = make(max_buffered=bound, max_pending=10**6, max_block=2.0)  # nothing is ever re-queued
    accepted: list[Counter[tuple[int, int]]] = [Counter() for _ in range(writers)]
    refused = [0] * writers
    delivered: dict[tuple[int, int], int] = {}
    consumer = Background(lambda: fold_records(agg, delivered), "consumer")
    done = threading.Event()
    seen = [0]  # the most keys len() showed

    def watch() -> None:
        while not done.is_set():
            seen[0] = max(seen[0], len(agg))

    watcher = Background(watch, "watcher")

    def write(index: int) -> None:
        for n in range(keys):
            for key in ((index, n), (index, n), (index, n // 2)):  # new keys and merges
                try:
                    agg.add(key, 1)
                except ar.BufferFullError:
                    refused[index] += 1
                else:
                    accepted[index][key] += 1

    try:
        run_threads(writers, write, timeout=60)
    finally:
        done.set()
    watcher.join()
    # A read that overlaps a flush may also show what that flush hands off (READ-2):
    # at most one more buffer's worth.
    most = 2 * (bound + writers)
    assert 0 < seen[0] <= most, f"len() showed {seen[0]} keys buffered, max_buffered={bound}"
    call_bounded(lambda: agg.shutdown(timeout=30), 40, "shutdown()")
    consumer.join()
    total: Counter[tuple[int, int]] = Counter()
    for each in accepted:
        total.update(each)
    assert total.total() > 0
    assert Counter(delivered) == total
    assert agg.stats().adds == total.total()
    assert agg.stats().buffer_full_errors == sum(refused)


@pytest.mark.clause("STAT-1")
@pytest.mark.parametrize(
    "bounds", [{}, {"max_buffered": 100}, {"flush_at": 100}], ids=["none", "bound", "at"]
)
def test_buffered_counts_the_records_one_writer_buffered(make: Factory, bounds: dict[str, int]) -> None:
    agg = make(max_pending=3, **bounds)
    fresh = agg.stats()
    assert (fresh.buffered, fresh.early_flushes, fresh.adds_waited, fresh.buffer_full_errors) == (0, 0, 0, 0)
    for key in range(7):
        agg.add(key, 1)
    for key in (0, 3, 3, 6):
        agg.add(key, 1)
    assert agg.stats().buffered == 7
    for handed, left in ((3, 4), (3, 1), (1, 0)):
        assert agg.flush() == handed
        assert agg.stats().buffered == left
        agg.drain()
    stats = agg.stats()
    assert (stats.early_flushes, stats.adds_waited, stats.buffer_full_errors) == (0, 0, 0)


@pytest.mark.clause("ARG-1", "BUF-1")
@pytest.mark.parametrize(
    "options",
    [{"max_block": 0}, {"max_block": 0.5}, {"max_buffered": 1}, {"flush_at": 1}],
    ids=["block-0", "block-half", "buffered-1", "at-1"],
)
def test_valid_bounds_are_accepted(make: Factory, options: dict[str, float]) -> None:
    agg = make(max_pending=100, **options)
    assert agg.add("a", 1) is False
    call_bounded(lambda: agg.add("b", 1), LIMIT, "add() of a second key")
    assert shutdown_collecting(agg) == {"a": 1, "b": 1}


@pytest.mark.clause("REENTRY-1", "BUF-3", "BUF-1")
@pytest.mark.parametrize(
    "bounds", [{"flush_at": 1}, {"max_buffered": 4, "max_block": 0.05}], ids=["at", "bound"]
)
@pytest.mark.usefixtures("fast_switching")
def test_merges_adding_other_keys_while_early_flushes_run_never_deadlock(
    make: Factory, bounds: dict[str, float]
) -> None:
    # merge (which may run holding a storage lock) adds another key, so it asks for room
    # while the flusher, woken early all the time, measures the buffer after each flush.
    agg: Any = None
    inner: Counter[str] = Counter()

    def merge(stored: int, incoming: int) -> int:
        try:
            agg.add(("inner", incoming), 0)
        except ar.AggregatorError as exc:  # refused (REENTRY-1) or no room (BUF-1): both fine
            inner[type(exc).__name__] += 1
        return stored + incoming

    agg = make(merge, max_pending=10**9, **bounds)

    accepted: list[Counter[Any]] = [Counter(), Counter()]

    def writer(thread: int) -> None:
        for step in range(60):
            key = (thread, step % 7)
            for _ in range(2):
                try:
                    agg.add(key, 1)
                    accepted[thread][key] += 1
                except ar.BufferFullError:
                    pass

    run_threads(2, writer, timeout=120)
    delivered = shutdown_collecting(agg)
    assert {key: n for key, n in delivered.items() if key[0] != "inner"} == accepted[0] + accepted[1]


@pytest.mark.clause("BUF-1", "CLOSE-1")
def test_an_add_waiting_for_room_with_the_output_full_does_not_spin(make: Factory) -> None:
    agg = make(max_buffered=20, max_pending=1, max_block=1.0)
    for key in range(21):  # the 21st wakes a flush: one record out, the output is full
        agg.add(key, 1)
    before, cpu, wall = agg.stats(), time.process_time(), time.monotonic()
    with pytest.raises(ar.BufferFullError):
        call_bounded(lambda: agg.add("new", 1), LIMIT, "add() with no room coming")
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    flushes = agg.stats().flushes - before.flushes
    # Nothing can make room until a consumer takes from the output: flushing again and
    # again only re-queues the same records.
    assert flushes <= 10, f"{flushes} flushes while one add waited {wall:.2f} s for room"
    assert cpu < 0.5 * wall, f"the wait used {cpu:.2f} s of CPU in {wall:.2f} s"


@pytest.mark.clause("BUF-3")
@pytest.mark.usefixtures("fast_switching")
def test_every_round_that_reaches_flush_at_is_flushed_early(make: Factory) -> None:
    # Each round brings the buffer to flush_at while the previous round's early flush may
    # still be finishing: that wake-up must not be lost (an extra, earlier flush is allowed).
    agg = make(flush_at=5, max_pending=10**6)
    key = 0
    for round_ in range(300):
        for _ in range(5):
            agg.add(key, 1)
            key += 1
        wait_until(lambda: len(agg) < 5, f"round {round_}'s early flush")
        agg.drain()
    assert agg.stats().early_flushes >= 300


@pytest.mark.clause("BUF-2")
@pytest.mark.usefixtures("fast_switching")
def test_one_writer_never_passes_the_bound_while_flushes_and_a_consumer_race_it(make: Factory) -> None:
    bound, adds = 8, 15_000
    agg = make(flush_interval=0.0005, max_buffered=bound, max_pending=4, max_block=5.0)
    stop = threading.Event()
    taken: list[tuple[int, int]] = []

    def consume() -> None:  # drains, then stalls: flushes alternately empty and re-queue the buffer
        turn = 0
        while not stop.is_set():
            turn += 1
            if turn % 2:
                taken.extend(agg.drain())
            time.sleep(0.0003)

    consumer = Background(consume, "consumer")
    over = []
    try:
        for key in range(adds):
            agg.add(key, 1)
            if (seen := len(agg)) > bound + 1:  # + 1: a per-thread backend during a flush (BUF-2)
                over.append((key, seen))
    finally:
        stop.set()
        consumer.join()
    assert not over, f"len() passed max_buffered={bound} + 1 after {len(over)} add(s), e.g. {over[:3]}"
    delivered = shutdown_collecting(agg, into=folded(taken))
    assert delivered == dict.fromkeys(range(adds), 1)


@pytest.mark.clause("BUF-1")
def test_new_keys_below_the_bound_are_accepted_from_threads_that_come_and_go(make: Factory) -> None:
    # Each key comes from a thread of its own that then exits: whatever a backend set aside
    # for a thread must not count as buffered records once it is gone.
    agg = make(max_buffered=30, max_pending=100, max_block=0)
    refused: list[BaseException] = []

    def add_one(key: int) -> None:
        try:
            agg.add(key, 1)
        except ar.BufferFullError as exc:
            refused.append(exc)

    for key in range(30):
        adding = Background(lambda key=key: add_one(key), f"adder {key}")  # type: ignore[misc]
        adding.join()
    assert not refused, f"{len(refused)} new key(s) refused below the bound, first: {refused[0]}"
    assert shutdown_collecting(agg) == dict.fromkeys(range(30), 1)


@pytest.mark.clause("BUF-1", "REENTRY-1")
def test_an_add_from_inside_merge_at_the_bound_does_not_wait_for_a_flush_it_blocks(make: Factory) -> None:
    agg: Any = None
    inner: list[object] = []

    def merge(stored: int, incoming: Any) -> Any:
        if incoming == "call":
            try:
                inner.append(agg.add("inner", 1))
            except ar.AggregatorError as exc:  # refused, or no room: either, but at once
                inner.append(exc)
            return stored
        return stored + incoming

    agg = make(merge, max_buffered=2, max_pending=100, max_block=10)
    agg.add("a", 1)
    agg.add("b", 1)  # at the bound
    started = time.monotonic()
    agg.add("a", "call")  # this thread: a merge into its record (a thread of its own would not merge)
    waited = time.monotonic() - started
    assert len(inner) == 1
    # The flush it would wait for may need what this merge holds: refused or no room, at once.
    assert waited < 5, f"the add from inside merge waited {waited:.1f} s"
    assert shutdown_collecting(agg).items() >= {"a": 1, "b": 1}.items()


@pytest.mark.clause("BUF-1", "REENTRY-1")
def test_an_add_from_inside_another_aggregators_merge_still_waits_a_little_for_room(
    make: Factory,
) -> None:
    # B is full (output and buffer); a consumer makes room 0.3 s later, within the 1 s that
    # an add from inside another aggregator's merge may wait (CALLBACK_WAIT).
    target = make(max_buffered=1, max_pending=1, max_block=5)
    target.add("x", 1)
    target.flush()
    target.add("y", 1)
    outcome: list[object] = []

    def merge(stored: int, incoming: int) -> int:
        timer = threading.Timer(0.3, target.drain)
        timer.start()
        try:
            outcome.append(target.add("z", 1))
        except ar.AggregatorError as exc:
            outcome.append(exc)
        finally:
            timer.join()
        return stored + incoming

    caller = make(merge)
    caller.add("k", 1)
    caller.add("k", 1)  # runs merge, which adds to the full target
    assert outcome == [False], f"the add from inside another's merge did not wait for room: {outcome}"
    assert shutdown_collecting(caller) == {"k": 2}
    assert shutdown_collecting(target) == {"y": 1, "z": 1}


@pytest.mark.clause("BUF-1", "BUF-2")
@pytest.mark.parametrize("bound", [100, 1000])
def test_one_writer_never_buffers_past_a_large_bound(make: Factory, bound: int) -> None:
    # A backend that hands out allowances (a share of the room left) must never hand out more
    # than the room: with small bounds every share is one record and a wrong share cannot show.
    agg = make(max_buffered=bound, max_pending=2 * bound, max_block=0)
    for key in range(2 * bound):
        try:
            agg.add(key, 1)
        except ar.BufferFullError:
            break
        assert len(agg) <= bound, f"{len(agg)} records buffered after add #{key + 1}, max_buffered={bound}"
    assert agg.stats().stored >= bound, "one writer filled the buffer before it was full"


@pytest.mark.clause("BUF-3")
@pytest.mark.parametrize("flush_at", [4, 100, 1000])
def test_one_writer_reaching_a_large_flush_at_is_flushed_early(make: Factory, flush_at: int) -> None:
    # The record that brings the buffer to flush_at wakes the flusher, not one record later:
    # a backend handing out allowances must stop each one short of it (with flush_at=5 every
    # allowance is too small for a wrong cap to show; with 4, a wake-up one record early shows).
    agg = make(flush_interval=None, flush_at=flush_at, max_pending=2 * flush_at)
    for key in range(flush_at - 1):
        agg.add(key, 1)
    time.sleep(0.2)  # room for an early flush that must not happen
    assert (agg.pending, agg.stats().early_flushes) == (0, 0), "flushed before flush_at records"
    agg.add(flush_at - 1, 1)
    wait_until(
        lambda: agg.pending == flush_at and agg.stats().early_flushes == 1,
        f"the early flush of the {flush_at} records buffered at flush_at={flush_at}",
    )
    assert shutdown_collecting(agg) == dict.fromkeys(range(flush_at), 1)
