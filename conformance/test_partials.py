"""Records a backend combines on its own (per-thread partials, re-queues): FLUSH-6, ADD-5, CLOSE-5, REENTRY-1.

Backends with one record per key merge in ``add`` and raise there (ADD-4); these
tests then check the simpler outcome. Each writer is a one-thread executor, so
that "thread A, then thread B" is an order the test controls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

import aggregator_reference as ar

from ._waits import call_bounded
from .conftest import Factory, shutdown_collecting


def concat(stored: list[str], incoming: list[str]) -> list[str]:
    return stored + incoming


class FailingConcat:
    """A merge that concatenates lists, and raises ``ValueError`` while ``on`` is set."""

    def __init__(self) -> None:
        self.on = False
        self.failed = 0  # how many times it raised

    def __call__(self, stored: list[str], incoming: list[str]) -> list[str]:
        if self.on:
            self.failed += 1
            raise ValueError("cannot combine")
        return stored + incoming


def values_of(agg: Any, name: object) -> list[str]:
    """Flush and drain until nothing is left; the values delivered for key ``name``, in delivery order."""
    delivered: list[str] = []
    while agg.pending or len(agg):
        delivered += [v for key, value in agg.drain() if key == name for v in value]
        agg.flush()
    delivered += [v for key, value in agg.drain() if key == name for v in value]
    return delivered


@pytest.mark.clause("FLUSH-6", "ADD-5")
def test_splits_of_three_partials_come_out_oldest_first(make: Factory) -> None:
    merge = failing = FailingConcat()

    agg = make(merge)
    pools = [ThreadPoolExecutor(1) for _ in range(3)]
    try:
        for pool in pools:  # register the threads in the order 0, 1, 2
            pool.submit(agg.add, "reg", []).result()
        agg.flush()
        agg.drain()
        accepted = []
        for index in (2, 1, 0):  # first adds of "k": thread 2 oldest, then 1, then 0
            failing.on = True  # a backend that merges in add() refuses the later ones
            try:
                pools[index].submit(agg.add, "k", [f"t{index}"]).result()
                accepted.append(f"t{index}")
            except ValueError:
                pass
            failing.on = False
            time.sleep(0.002)
        failing.on = True
        agg.flush()
        failing.on = False
    finally:
        for pool in pools:
            pool.shutdown()
    out = [value for key, value in agg.drain() if key == "k"]
    assert [v for value in out for v in value] == accepted, f"delivered {out}, added in order {accepted}"
    errors = len(out) - 1
    assert agg.stats().flush_errors == errors, "each split is counted once"


class Interrupt(BaseException):
    """Stands for ``KeyboardInterrupt``."""


@pytest.mark.clause("FLUSH-6", "FLUSH-5", "ADD-5")
def test_an_interrupt_while_combining_partials_keeps_them_oldest_first(make: Factory) -> None:
    trip = {"on": False}

    def merge(stored: list[str], incoming: list[str]) -> list[str]:
        if trip["on"]:
            trip["on"] = False
            raise Interrupt
        return stored + incoming

    agg = make(merge)
    with ThreadPoolExecutor(1) as older, ThreadPoolExecutor(1) as newer:
        older.submit(agg.add, "k", ["older"]).result()
        time.sleep(0.002)
        trip["on"] = True
        accepted_newer = True
        try:
            newer.submit(agg.add, "k", ["newer"]).result()
        except Interrupt:
            accepted_newer = False  # one record per key: add merged, and raised (ADD-4)
        trip["on"] = True
        try:
            agg.flush()
        except Interrupt:
            pass
        trip["on"] = False
    out = values_of(agg, "k")
    assert out == (["older", "newer"] if accepted_newer else ["older"]), out


class FlakyKey:
    """A key whose ``__hash__`` raises once when armed, from any thread."""

    armed = False

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        if FlakyKey.armed:
            FlakyKey.armed = False
            raise ValueError(f"hash of {self.name}")
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlakyKey) and other.name == self.name

    def __repr__(self) -> str:
        return f"FlakyKey({self.name!r})"


@pytest.mark.clause("CLOSE-5", "FLUSH-5")
@pytest.mark.parametrize("step", ["flush", "read"])
def test_a_key_hash_failing_while_partials_combine_loses_nothing(make: Factory, step: str) -> None:
    agg = make(concat)
    key = FlakyKey("k")
    try:
        agg.add(key, ["main"])
        with ThreadPoolExecutor(1) as other:
            other.submit(agg.add, key, ["thread"]).result()
            other.submit(agg.add, "after", ["x"]).result()
        FlakyKey.armed = True
        try:
            agg.flush() if step == "flush" else agg.snapshot()
        except ValueError:
            pass  # it may propagate; nothing may be lost
    finally:
        FlakyKey.armed = False
    delivered = shutdown_collecting(agg, concat)
    assert sorted(delivered[key]) == ["main", "thread"]
    assert delivered["after"] == ["x"]


@pytest.mark.clause("REENTRY-1")
@pytest.mark.parametrize("call", ["get", "len", "flush", "add"])
def test_merges_of_two_aggregators_calling_each_other_never_deadlock(backend_name: str, call: str) -> None:
    both_inside = threading.Barrier(2)
    aggs: dict[str, Any] = {}
    outcome: dict[str, str] = {}

    def merging(name: str, other: str) -> Any:
        def merge(stored: int, incoming: int) -> int:
            if incoming == 2:
                try:
                    both_inside.wait(3)
                except threading.BrokenBarrierError:
                    pass
                target = aggs[other]
                calls: dict[str, Callable[[], object]] = {
                    "get": lambda: target.get("k"),
                    "len": lambda: len(target),
                    "flush": target.flush,
                    "add": lambda: target.add("elsewhere", 1),
                }
                try:
                    calls[call]()
                    outcome[name] = "worked"
                except ar.ReentrantMergeError:
                    outcome[name] = "refused"
            return stored + incoming

        return merge

    for name, other in (("one", "two"), ("two", "one")):
        aggs[name] = ar.create(merging(name, other), backend=backend_name, flush_interval=None)
    try:
        with ThreadPoolExecutor(2) as pool:

            def write(agg: Any) -> None:
                agg.add("k", 1)
                agg.add("k", 2)  # merges; the merge calls the other aggregator

            futures = [pool.submit(write, agg) for agg in aggs.values()]
            call_bounded(lambda: [f.result() for f in futures], 30, "two aggregators' merges (deadlock?)")
        assert sorted(outcome) == ["one", "two"]
    finally:
        delivered = [shutdown_collecting(agg) for agg in aggs.values()]
    for got in delivered:
        assert got["k"] == 3


@pytest.mark.clause("FLUSH-6", "STAT-1")
def test_a_split_is_logged_and_counted_once(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    merge = failing = FailingConcat()

    agg = make(merge, max_pending=1)
    agg.add("fill", ["f"])
    agg.flush()  # the output is full: a split's older half goes out past max_pending
    agg.add("k", ["main"])
    with ThreadPoolExecutor(1) as other:
        failing.on = True
        try:
            other.submit(agg.add, "k", ["thread"]).result()
        except ValueError:
            pass
        caplog.clear()
        agg.flush()
        failing.on = False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert agg.stats().flush_errors == len(errors) <= 1, [r.getMessage() for r in errors]


@pytest.mark.clause("ADD-1", "ADD-2", "READ-2")
def test_one_writer_merges_while_another_thread_reads(make: Factory, fast_switching: None) -> None:
    agg = make(lambda stored, incoming: stored + incoming)
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            agg.get("k")

    agg.add("k", 1)  # buffered from now on: nothing flushes
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        stored_anew = sum(not agg.add("k", 1) for _ in range(20000))
    finally:
        stop.set()
        reader.join(30)
    assert stored_anew == 0, f"add returned False {stored_anew} times while the key was buffered"
    assert agg.stats().stored == 1


@pytest.mark.clause("REENTRY-1", "THREAD-1")
def test_a_plain_add_waits_for_a_slow_merge_and_is_never_refused(make: Factory) -> None:
    in_merge = threading.Event()

    def merge(stored: str, incoming: str) -> str:
        if incoming == "slow":
            in_merge.set()
            time.sleep(1.5)  # longer than kit.CALLBACK_WAIT: only calls from inside merge may give up
        return stored + incoming

    agg = make(merge)
    agg.add("a", "a0")
    agg.add("b", "b0")
    agg.get("a")  # a read: a backend with partials may move both records to a shared place
    with ThreadPoolExecutor(1) as plain, ThreadPoolExecutor(1) as slow:
        plain.submit(agg.add, "other", "x").result()
        slowly = slow.submit(agg.add, "b", "slow")
        assert in_merge.wait(10)
        assert plain.submit(agg.add, "a", "a1").result(30) in (True, False)
        assert slowly.result(30) is True
    assert shutdown_collecting(agg, concat_str) == {"a": "a0a1", "b": "b0slow", "other": "x"}


def flush_unless_shut(agg: Any) -> None:
    """``flush()``, which another thread's ``shutdown()`` may have begun to refuse."""
    try:
        agg.flush()
    except ar.AggregatorClosedError:
        pass


def concat_str(stored: str, incoming: str) -> str:
    return stored + incoming


@pytest.mark.clause("REENTRY-1", "CLOSE-4")
@pytest.mark.parametrize("call", ["flush", "shutdown"])
def test_merges_flushing_each_others_aggregator_while_flushes_run_never_deadlock(
    backend_name: str, call: str
) -> None:
    inside = {"X": threading.Event(), "Y": threading.Event()}
    go = threading.Event()
    aggs: dict[str, Any] = {}
    outcome: dict[str, str] = {}

    def merging(name: str, other: str) -> Any:
        def merge(stored: str, incoming: str) -> str:
            if incoming == "call":
                inside[name].set()
                go.wait(10)
                try:
                    getattr(aggs[other], call)()  # shutdown() with no timeout: "as long as it takes"
                    outcome[name] = "worked"
                except ar.ReentrantMergeError:
                    outcome[name] = "refused"
            return stored + incoming

        return merge

    for name, other in (("X", "Y"), ("Y", "X")):
        aggs[name] = ar.create(merging(name, other), backend=backend_name, flush_interval=None)
    try:
        for agg in aggs.values():
            agg.add("k", "main")
        with ThreadPoolExecutor(4) as pool:

            def write(agg: Any) -> None:
                agg.add("k", "w")
                agg.add("k", "call")  # merges; the merge flushes the other aggregator

            writes = [pool.submit(write, agg) for agg in aggs.values()]
            for event in inside.values():
                assert event.wait(10)
            flushes = [pool.submit(flush_unless_shut, agg) for agg in aggs.values()]
            time.sleep(0.2)  # let the plain flushes reach the records the merges hold
            go.set()
            call_bounded(lambda: [f.result() for f in writes + flushes], 30, "merges flushing each other")
        assert sorted(outcome) == ["X", "Y"]
    finally:
        delivered = [shutdown_collecting(agg, concat_str) for agg in aggs.values()]
    for got in delivered:
        assert sorted(got["k"]) == sorted("mainwcall")


class _HoldIn(logging.Handler):
    """Holds the thread named ``name`` inside its first log call until ``go`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name_held = name
        self.inside = threading.Event()
        self.go = threading.Event()

    def handle(self, record: logging.LogRecord) -> bool:  # without the handler's lock: others log on
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread().name == self.name_held and not self.inside.is_set():
            self.inside.set()
            self.go.wait(30)


class EqRaises:
    """A key that hashes fine but whose ``__eq__`` raises: a dict finds it by identity only."""

    def __hash__(self) -> int:
        return 1

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("EqRaises.__eq__")

    def __repr__(self) -> str:
        return "EqRaises()"


@dataclass
class _HeldFlush:
    """What :func:`_split_while_a_flush_holds` saw."""

    split: bool  # the backend keeps per-thread partials: the read split the key
    failed: int  # merges that raised from the flush's start to its end
    held_out: list[tuple[Any, Any]]  # the output right after that flush
    later: list[list[tuple[Any, Any]]]  # what each later flush delivered, in order


def _values(records: list[tuple[Any, Any]], key: object) -> list[list[str]]:
    """The values of ``key``'s records, matched as a dict would (identity first)."""
    return [
        value for stored, value in records if type(stored) is type(key) and (stored is key or stored == key)
    ]


def _split_while_a_flush_holds(
    make: Factory, key: object, split_key: object, *, fail_requeue: bool = False
) -> tuple[Any, _HeldFlush]:
    """A flush holds ``key: ["a"]`` (the output is full: it re-queues it) while a read splits ``split_key``.

    Meanwhile this thread adds ``b`` and another thread ``c`` to ``split_key``,
    and a read runs while merges raise: a backend with per-thread partials
    splits it there (FLUSH-6). The flush is held inside a log call: it logs
    when it delivers an older split half past ``max_pending``, made beforehand
    for that. A backend with one record per key splits nothing, and gets ``b``
    after the flush. With ``fail_requeue``, merges still raise while the flush
    re-queues ``a``.
    """
    merge = failing = FailingConcat()

    def add_refusable(pool: ThreadPoolExecutor, key: object, value: list[str]) -> None:
        try:
            pool.submit(agg.add, key, value).result(30)
        except ValueError:
            pass  # one record per key: add merged, and raised (ADD-4)

    agg = make(merge, max_pending=1)
    hold = _HoldIn("flusher-under-test")
    ar_logger = logging.getLogger("aggregator_reference")
    with ThreadPoolExecutor(1) as other:
        agg.add("fill", ["f"])
        agg.flush()  # the output is full from now on
        agg.add("x", ["x1"])
        failing.on = True
        add_refusable(other, "x", ["x2"])
        agg.snapshot()  # a backend with partials splits x here: x1 waits to go out first
        failing.on = False
        split = agg.stats().flush_errors > 0
        agg.add(key, ["a"])  # this thread's oldest value of key
        failing.failed = 0
        ar_logger.addHandler(hold)
        try:
            flusher = threading.Thread(target=agg.flush, name="flusher-under-test", daemon=True)
            flusher.start()  # takes key:a out, delivers x1 past max_pending (logged), then re-queues key:a
            if split:
                assert hold.inside.wait(30), "the flush logged nothing about the split it delivers"
                agg.add(split_key, ["b"])  # newer than a, from the same thread
                add_refusable(other, split_key, ["c"])
                failing.on = True
                agg.snapshot()  # splits split_key while the flush still holds key:a
                failing.on = fail_requeue
            hold.go.set()
            flusher.join(30)
            assert not flusher.is_alive(), "the flush did not return"
        finally:
            ar_logger.removeHandler(hold)
            hold.go.set()
            failing.on = False
        if not split:
            agg.add(split_key, ["b"])
    outcome = _HeldFlush(split, failing.failed, agg.drain(), [])
    while agg.pending or len(agg):
        agg.flush()
        outcome.later.append(agg.drain())
    return agg, outcome


@pytest.mark.clause("FLUSH-6", "ADD-5", "FLUSH-2")
def test_a_split_made_during_a_flush_comes_out_after_the_record_that_flush_requeues(
    make: Factory,
) -> None:
    _, seen = _split_while_a_flush_holds(make, "k", "k")
    delivered = [
        v for records in (seen.held_out, *seen.later) for value in _values(records, "k") for v in value
    ]
    mine = [v for v in delivered if v in ("a", "b")]
    assert mine == ["a", "b"], f"this thread added a then b; delivered in order {delivered}"


class SlowHash:
    """A key whose ``__hash__`` sleeps in the thread named ``slow_in`` (once ``armed``)."""

    def __init__(self, name: str, slow_in: str) -> None:
        self.name, self.slow_in, self.armed = name, slow_in, False
        self.sleeping = threading.Event()

    def __hash__(self) -> int:
        if self.armed and threading.current_thread().name == self.slow_in:
            self.armed = False
            self.sleeping.set()
            time.sleep(0.3)
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlowHash) and other.name == self.name


class InterruptingHash:
    """A key whose ``__hash__`` raises :class:`Interrupt` once ``armed``."""

    armed = False

    def __hash__(self) -> int:
        if InterruptingHash.armed:
            InterruptingHash.armed = False
            raise Interrupt
        return 7


@pytest.mark.clause("ADD-5", "FLUSH-2", "FLUSH-5", "REENTRY-1")
@pytest.mark.parametrize(
    "stop", ["read from another merge gives up", "interrupt while placing", "interrupt while combining"]
)
def test_a_read_that_stops_half_way_keeps_each_threads_order(make: Factory, stop: str) -> None:
    hold = threading.Event()
    held = threading.Event()
    trip = {"on": False}

    def merge(stored: list[str], incoming: list[str]) -> list[str]:
        if incoming == ["u2"]:
            held.set()
            hold.wait(30)  # another writer's add stays in flight
        if trip["on"] and stored[:1] == ["ma"]:
            trip["on"] = False
            raise Interrupt  # while another key's pieces wait to be combined
        return stored + incoming

    agg = make(merge, max_pending=1)
    slow = SlowHash("slow", "flusher-under-test")
    agg.add("fill", ["f"])
    agg.flush()  # the output is full: the next flush re-queues everything
    agg.add(slow, ["s"])
    agg.add("k", ["a"])  # this thread's oldest value of k
    agg.add("m", ["ma"])
    slow.armed = True
    flusher = threading.Thread(target=agg.flush, name="flusher-under-test", daemon=True)
    flusher.start()  # re-queues slow, then k:a; hashing slow takes a while
    slow.sleeping.wait(10)  # a backend that hashes elsewhere: these are just the next values
    agg.add("k", ["b"])  # while k:a is out: a piece of its own, newer than a
    agg.add("m", ["mb"])
    flusher.join(30)
    assert not flusher.is_alive()
    with ThreadPoolExecutor(1) as other:
        if stop == "interrupt while combining":
            trip["on"] = True
            try:
                agg.snapshot()  # combining m's pieces raises; k's were not combined yet
            except Interrupt:
                pass
            trip["on"] = False
            assert agg.add("k", ["c"]) is True, "k is buffered: the only writer's add merges (ADD-2)"
        elif stop == "interrupt while placing":
            bad = InterruptingHash()
            other.submit(agg.add, bad, ["x"]).result(30)
            InterruptingHash.armed = True
            try:
                agg.snapshot()
            except Interrupt:
                pass
            InterruptingHash.armed = False
        else:
            other.submit(agg.add, "u", ["u1"]).result(30)
            in_flight = other.submit(agg.add, "u", ["u2"])
            assert held.wait(10)

            def read_from_merge(stored: int, incoming: int) -> int:
                try:
                    agg.snapshot()  # waits for the add in flight at most a while, then may give up
                except ar.ReentrantMergeError:
                    pass
                return stored + incoming

            caller = ar.create(read_from_merge, backend="reference", flush_interval=None)
            caller.add("c", 1)
            call_bounded(lambda: caller.add("c", 1), 30, "a read from another aggregator's merge")
            caller.shutdown()
            hold.set()
            in_flight.result(30)
    hold.set()
    delivered = values_of(agg, "k")
    expected = ["a", "b", "c"] if stop == "interrupt while combining" else ["a", "b"]
    assert delivered == expected, f"this thread added {expected}; delivered in order {delivered}"


@pytest.mark.clause("ADD-1", "ADD-2", "REENTRY-1")
def test_the_only_writer_merges_into_its_key_after_a_read_gave_up_on_it(make: Factory) -> None:
    slow = threading.Event()

    def merge(stored: int, incoming: int) -> int:
        if threading.current_thread().name == "only-writer" and not slow.is_set():
            slow.set()
            time.sleep(1.5)  # longer than a read from another merge waits
        return stored + incoming

    agg = make(merge)
    results: list[bool] = []
    go_on = threading.Event()

    def write() -> None:
        results.append(agg.add("k", 1))
        results.append(agg.add("k", 1))  # slow: a read from another merge gives up meanwhile
        go_on.wait(30)
        results.append(agg.add("k", 1))  # k is buffered: True (ADD-2, one writer)

    writer = threading.Thread(target=write, name="only-writer", daemon=True)
    writer.start()
    assert slow.wait(10)
    time.sleep(0.1)

    def read_from_merge(stored: int, incoming: int) -> int:
        try:
            agg.get("other")
        except ar.ReentrantMergeError:
            pass
        return stored + incoming

    caller = ar.create(read_from_merge, backend="reference", flush_interval=None)
    caller.add("c", 1)
    call_bounded(lambda: caller.add("c", 1), 30, "a read from another aggregator's merge")
    caller.shutdown()
    go_on.set()
    writer.join(30)
    assert results == [False, True, True]
    assert shutdown_collecting(agg) == {"k": 3}


@pytest.mark.clause("FLUSH-2", "FLUSH-6", "CLOSE-5", "STAT-1")
@pytest.mark.parametrize("fail_requeue", [False, True], ids=["merges", "merge-raises"])
def test_a_record_requeued_after_its_key_split_merges_into_the_older_half(
    make: Factory, caplog: pytest.LogCaptureFixture, fail_requeue: bool
) -> None:
    agg, seen = _split_while_a_flush_holds(make, "k", "k", fail_requeue=fail_requeue)
    records = [value for flushed in (seen.held_out, *seen.later) for value in _values(flushed, "k")]
    # Each record of k beyond the first is a merge that raised: the flush re-queues a into newer
    # data of k (FLUSH-2), here the older half of the split, unless that merge raises too.
    assert len(records) <= 1 + seen.failed, f"{seen.failed} merge(s) raised, k delivered as {records}"
    assert sorted(v for value in records for v in value) == ["a", "b", "c"][: 2 + seen.split]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert agg.stats().flush_errors == len(errors), [r.getMessage() for r in errors]


@pytest.mark.clause("KEY-1", "ADD-5", "FLUSH-6")
def test_a_nan_key_requeued_after_its_split_stays_in_order(make: Factory) -> None:
    nan = float("nan")  # one object: one key, that only identity matches (KEY-1)
    _, seen = _split_while_a_flush_holds(make, nan, nan)
    delivered = [
        v for records in (seen.held_out, *seen.later) for value in _values(records, nan) for v in value
    ]
    mine = [v for v in delivered if v in ("a", "b")]
    assert mine == ["a", "b"], f"this thread added a then b; delivered in order {delivered}"
    assert sorted(delivered) == ["a", "b", "c"][: 2 + seen.split]


@pytest.mark.clause("OUT-1", "FLUSH-5", "FLUSH-2")
def test_a_split_key_whose_eq_raises_does_not_push_other_requeued_records_past_max_pending(
    make: Factory,
) -> None:
    split_key = EqRaises()  # split while the flush holds "k": every comparison with it raises
    _, seen = _split_while_a_flush_holds(make, "k", split_key)
    assert _values(seen.held_out, "k") == [], f"k went past max_pending: {seen.held_out}"
    later = [record for records in seen.later for record in records]
    assert _values(later, "k") == [["a"]]
    assert sorted(v for value in _values(later, split_key) for v in value) == ["b", "c"][: 1 + seen.split]


def _split_by_a_read(agg: Any, failing: FailingConcat, key: object) -> None:
    """Add ``a`` to ``key`` here and ``b`` in another thread, then read while merges fail.

    A backend with per-thread partials splits the key's record in two there (FLUSH-6);
    one with a record per key merged ``b`` in ``add`` already.
    """
    agg.add(key, ["a"])
    with ThreadPoolExecutor(1) as other:
        other.submit(agg.add, key, ["b"]).result(30)
    failing.on = True
    try:
        agg.snapshot()
    finally:
        failing.on = False


@pytest.mark.clause("READ-1", "READ-2", "KEY-1")
def test_reads_after_a_nan_key_split_show_it(make: Factory) -> None:
    merge = failing = FailingConcat()

    agg = make(merge)
    nan = float("nan")  # one object: one key, that only a dict's identity check finds
    _split_by_a_read(agg, failing, nan)
    failing.on = True  # no read may need a merge to show what is buffered
    try:
        snap = agg.snapshot()
        found = agg.get(nan)
        count = len(agg)
    finally:
        failing.on = False
    assert [key is nan for key in snap] == [True], snap
    assert snap[nan] in (["a"], ["b"], ["a", "b"]), snap
    assert found in (["a"], ["b"], ["a", "b"]), found
    assert count == 1
    assert sorted(shutdown_collecting(agg, concat)[nan]) == ["a", "b"]


@pytest.mark.clause("READ-1", "READ-2")
def test_reads_after_a_split_of_a_key_whose_eq_raises_show_every_key(make: Factory) -> None:
    merge = failing = FailingConcat()

    agg = make(merge)
    key = EqRaises()
    agg.add("good", ["g"])
    _split_by_a_read(agg, failing, key)
    snap = agg.snapshot()
    assert sorted(map(repr, snap)) == ["'good'", "EqRaises()"], snap
    assert snap["good"] == ["g"]
    assert snap[key] in (["a"], ["b"], ["a", "b"]), snap
    assert agg.get("good") == ["g"]
    assert agg.get("missing", "none") == "none"
    assert agg.get(key) in (["a"], ["b"], ["a", "b"])
    delivered = shutdown_collecting(agg, concat)
    assert delivered["good"] == ["g"]
    assert sorted(delivered[key]) == ["a", "b"]


@pytest.mark.clause("ADD-1", "ADD-2", "READ-2")
def test_the_only_writer_adding_during_a_reads_combine_merges(make: Factory) -> None:
    # One writer thread; a read (another thread, not a writer) combines the key's pieces
    # and, inside that merge, lets the writer add the key again. The key is buffered all
    # along, so that add merges (True) once the read is done, whatever it waited for.
    writer_adds = threading.Event()
    writer_done = threading.Event()
    in_read = {"on": False}
    results: list[bool] = []

    def merge(stored: list[str], incoming: list[str]) -> list[str]:
        if in_read["on"] and threading.current_thread().name == "reader-under-test":
            in_read["on"] = False
            writer_adds.set()
            writer_done.wait(0.5)  # the writer's add may have to wait for this read: bounded
        return stored + incoming

    agg = make(merge, max_pending=1)
    slow = SlowHash("slow", "flusher-under-test")
    with ThreadPoolExecutor(1, thread_name_prefix="only-writer") as writer:
        writer.submit(agg.add, "fill", ["f"]).result(30)
        agg.flush()  # the output is full: the next flush re-queues everything
        writer.submit(agg.add, slow, ["s"]).result(30)
        writer.submit(agg.add, "k", ["a"]).result(30)
        slow.armed = True
        flusher = threading.Thread(target=agg.flush, name="flusher-under-test", daemon=True)
        flusher.start()  # re-queues slow, then k:a; hashing slow takes a while
        slow.sleeping.wait(10)
        writer.submit(agg.add, "k", ["b"]).result(30)  # k:a is out: a piece of its own
        flusher.join(30)
        assert not flusher.is_alive()

        def add_when_asked() -> None:
            assert writer_adds.wait(30)
            results.append(agg.add("k", ["c"]))
            writer_done.set()

        adding = writer.submit(add_when_asked)
        in_read["on"] = True
        reader = threading.Thread(target=agg.snapshot, name="reader-under-test", daemon=True)
        reader.start()
        reader.join(30)
        assert not reader.is_alive()
        in_read["on"] = False
        writer_adds.set()  # a backend that ran no merge in the read: the add comes now
        adding.result(30)
    assert results == [True], "k was buffered all along: the only writer's add merges (ADD-2)"
    delivered = values_of(agg, "k")
    assert delivered == ["a", "b", "c"]
