"""Flushing: FLUSH-1 … FLUSH-5."""

from __future__ import annotations

import logging
import operator
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ._waits import call_bounded
from .conftest import Factory, run_threads, shutdown_collecting


@pytest.mark.clause("FLUSH-1")
def test_flush_hands_every_record_to_the_output(make: Factory) -> None:
    agg = make(operator.add)
    for i in range(10):
        agg.add(i, i)
        agg.add(i, 1)
    assert agg.flush() == 10
    assert len(agg) == 0
    assert agg.snapshot() == {}
    assert sorted(agg.drain()) == [(i, i + 1) for i in range(10)]
    assert agg.flush() == 0


@pytest.mark.clause("FLUSH-1", "STAT-1")
def test_flush_counts(make: Factory) -> None:
    agg = make(operator.add)
    agg.add("a", 1)
    agg.add("a", 1)
    agg.add("b", 1)
    agg.flush()
    agg.flush()
    stats = agg.stats()
    assert (stats.adds, stats.merges, stats.stored) == (3, 1, 2)
    assert (stats.flushed, stats.requeued, stats.flushes) == (2, 0, 2)


@pytest.mark.clause("FLUSH-2")
def test_records_that_do_not_fit_are_requeued(make: Factory) -> None:
    agg = make(operator.add, max_pending=3)
    for i in range(10):
        agg.add(i, 1)
    assert agg.flush() == 3
    assert agg.pending == 3
    assert len(agg) == 7
    assert agg.stats().requeued == 7
    assert agg.flush() == 0  # still full: nothing moves, nothing is lost
    assert len(agg) == 7
    delivered = dict(agg.drain())
    while len(agg):
        agg.flush()
        delivered.update(agg.drain())
    assert delivered == dict.fromkeys(range(10), 1)


@pytest.mark.clause("FLUSH-2")
def test_requeue_merges_older_first_with_newer_data(backend_name: str) -> None:
    # Whitebox through the public Storage protocol: newer data arrives between
    # detach and requeue, as it does when writers race a flush.
    import aggregator_reference as ar

    factory = getattr(ar.load_backend(backend_name), "storage_class", None)
    if factory is None:
        pytest.skip(f"{backend_name} is not built on BufferedAggregator")
    storage = factory(operator.add, None)
    storage.add("k", "old-")
    chunks = storage.detach()
    storage.add("k", "new")
    for chunk in chunks:
        assert storage.requeue(chunk, list(chunk.items())) == []
    assert storage.snapshot() == {"k": "old-new"}


@pytest.mark.clause("FLUSH-2", "CLOSE-5")
def test_writers_racing_flushes_with_a_full_output_lose_nothing(make: Factory) -> None:
    agg = make(operator.add, max_pending=5)
    delivered: dict[int, int] = {}
    done = threading.Event()

    def flusher() -> None:
        while not done.is_set():
            agg.flush()
            for key, value in agg.drain(3):
                delivered[key] = delivered.get(key, 0) + value

    thread = threading.Thread(target=flusher, daemon=True)
    thread.start()
    try:
        run_threads(4, lambda index: [agg.add(i % 20, 1) for i in range(2000)])
    finally:
        done.set()
        thread.join(30)
        assert not thread.is_alive(), "a thread of the test did not finish: deadlock?"
    shutdown_collecting(agg, into=delivered)
    assert delivered == dict.fromkeys(range(20), 400)
    assert agg.stats().requeued > 0


@pytest.mark.clause("FLUSH-3")
def test_background_flusher_flushes_periodically(make: Factory) -> None:
    agg = make(operator.add, flush_interval=0.01)
    agg.add("a", 1)
    iterator = agg.records()
    # Arrives without any flush() call; a flusher that never runs fails here, not at the run's timeout.
    assert call_bounded(lambda: next(iterator), 10, "waiting for the periodic flusher") == ("a", 1)
    assert agg.stats().flushes >= 1


@pytest.mark.clause("FLUSH-3")
def test_no_background_flusher_when_interval_is_none(make: Factory) -> None:
    agg = make(operator.add, flush_interval=None)
    agg.add("a", 1)
    time.sleep(0.05)
    assert agg.stats().flushes == 0
    assert agg.pending == 0
    assert agg.get("a") == 1


class GatedKey:
    """A key whose ``__hash__`` can be made to block or raise, to stall or break a flush."""

    block_in: threading.Thread | None = None
    raising = False

    def __init__(self, name: str, entered: threading.Event, release: threading.Event) -> None:
        self.name, self.entered, self.release = name, entered, release

    def __hash__(self) -> int:
        if GatedKey.raising:
            raise RuntimeError(f"hash of {self.name} failed")
        if GatedKey.block_in is threading.current_thread():
            self.entered.set()
            self.release.wait(30)
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GatedKey) and other.name == self.name

    def __repr__(self) -> str:
        return f"GatedKey({self.name!r})"


@pytest.fixture
def gates() -> Any:
    entered, release = threading.Event(), threading.Event()
    yield entered, release
    release.set()
    GatedKey.block_in = None
    GatedKey.raising = False


@pytest.mark.clause("FLUSH-4")
def test_periodic_tick_is_skipped_while_a_flush_runs(
    make: Factory, caplog: pytest.LogCaptureFixture, gates: Any
) -> None:
    entered, release = gates
    caplog.set_level(logging.DEBUG, logger="aggregator_reference")
    agg = make(operator.add, flush_interval=0.002, max_pending=1)
    agg.add(GatedKey("first", entered, release), 1)
    agg.add(GatedKey("second", entered, release), 1)
    # One record reaches the output, which is then full; the other stays buffered,
    # so every later flush re-queues it and hashes its key.
    stalled = threading.Thread(target=agg.flush, daemon=True)
    GatedKey.block_in = stalled
    stalled.start()
    assert entered.wait(10), "the manual flush never re-queued the key"
    deadline = time.monotonic() + 10
    while agg.stats().ticks_skipped == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    skipped = agg.stats().ticks_skipped
    release.set()
    stalled.join(10)
    assert not stalled.is_alive(), "a thread of the test did not finish: deadlock?"
    assert skipped > 0
    assert any("skipped" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


class StallOnError(logging.Handler):
    """Holds the thread ``stall_in`` at its ERROR records, until ``go`` is set."""

    def __init__(
        self, stall_in: threading.Thread, entered: threading.Event, release: threading.Event
    ) -> None:
        super().__init__()
        self.stall_in, self.entered, self.go = stall_in, entered, release

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR and threading.current_thread() is self.stall_in:
            self.entered.set()
            self.go.wait(30)


@pytest.mark.clause("FLUSH-4", "FLUSH-5")
def test_a_manual_flush_waits_for_the_one_running(make: Factory, gates: Any) -> None:
    # The first flush stalls after the storage let go of everything: in the ERROR it logs for a
    # record it could not re-queue (its key's hash raised). Only the flush itself is running then.
    entered, release = gates
    agg = make(operator.add, max_pending=1)
    agg.add("fill", 1)
    agg.flush()  # the output is full: the next flush re-queues both records, whatever their order
    agg.add("first", 1)
    agg.add(GatedKey("second", entered, release), 1)
    stalled = threading.Thread(target=agg.flush, daemon=True)
    handler = StallOnError(stalled, entered, release)
    logging.getLogger("aggregator_reference").addHandler(handler)
    try:
        GatedKey.raising = True
        stalled.start()
        assert entered.wait(10), "the flush logged no ERROR for the record it could not re-queue"
        GatedKey.raising = False
        agg.add("third", 1)
        second = threading.Thread(target=agg.flush, daemon=True)
        second.start()
        second.join(0.3)
        waited = second.is_alive()
        release.set()
        stalled.join(10)
        second.join(10)
    finally:
        logging.getLogger("aggregator_reference").removeHandler(handler)
    assert not stalled.is_alive(), "the first flush did not finish: deadlock?"
    assert not second.is_alive(), "the second flush did not finish: deadlock?"
    assert waited, "a second flush() ran while another was running"
    assert sorted(shutdown_collecting(agg).values()) == [1, 1, 1, 1]


@pytest.mark.clause("FLUSH-4")
def test_manual_flushes_never_overlap(make: Factory) -> None:
    agg = make(operator.add, flush_interval=0.001)

    def add_and_flush(index: int) -> None:
        for i in range(300):
            agg.add(i, 1)
            agg.flush()

    run_threads(4, add_and_flush)
    delivered = shutdown_collecting(agg)
    assert delivered == dict.fromkeys(range(300), 4)
    stats = agg.stats()
    assert stats.adds == 1200
    assert stats.flushes >= 1200  # every manual flush ran, one after another


@pytest.mark.clause("FLUSH-5", "OUT-1")
def test_flusher_errors_are_logged_and_records_overflow_instead_of_dropping(
    make: Factory, caplog: pytest.LogCaptureFixture, gates: Any
) -> None:
    entered, release = gates
    agg = make(operator.add, max_pending=1, flush_interval=0.002)
    agg.add("good", 1)
    consumer = agg.records()
    assert next(consumer) == ("good", 1)
    agg.add("blocker", 1)
    deadline = time.monotonic() + 10
    while agg.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert agg.pending == 1  # the output is full now
    bad = [GatedKey(f"bad{i}", entered, release) for i in range(3)]
    for key in bad:
        agg.add(key, 1)
    GatedKey.raising = True
    while agg.stats().overflowed < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    GatedKey.raising = False
    assert agg.stats().overflowed == 3
    assert agg.pending == 4  # past max_pending rather than lost
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    got = {next(consumer) for _ in range(4)}
    assert got == {("blocker", 1), *((key, 1) for key in bad)}
    agg.add("later", 1)  # the flusher keeps working
    assert next(consumer) == ("later", 1)


@pytest.mark.clause("FLUSH-6", "CLOSE-5")
def test_partials_that_cannot_be_combined_are_kept_logged_and_counted(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # int + str raises: one thread adds ints, another strs, to one key. A backend
    # with one record per key refuses the second thread's adds (ADD-4); one with
    # per-thread partials accepts them and must say so when it cannot combine them.
    agg = make(operator.add)
    accepted: list[Any] = []
    with ThreadPoolExecutor(1) as ints, ThreadPoolExecutor(1) as strs:
        for pool, value in ((ints, 1), (strs, "x"), (ints, 2), (strs, "y")):
            try:
                pool.submit(agg.add, "k", value).result()
            except TypeError:
                continue
            accepted.append(value)
    assert len(agg) == 1
    agg.snapshot()  # a read that combines partials must not raise either
    agg.flush()
    delivered = agg.drain()
    assert [key for key, _ in delivered] == ["k"] * len(delivered)
    values = [value for _, value in delivered]
    assert sum(v for v in accepted if isinstance(v, int)) == sum(v for v in values if isinstance(v, int))
    assert "".join(v for v in accepted if isinstance(v, str)) == "".join(
        v for v in values if isinstance(v, str)
    )
    if len(delivered) > 1:  # split: said, counted
        assert agg.stats().flush_errors >= 1
        assert any(r.levelno >= logging.ERROR and r.exc_info for r in caplog.records)
    else:
        assert agg.stats().flush_errors == 0


@pytest.mark.clause("FLUSH-6", "ADD-5")
def test_a_split_record_keeps_each_threads_order(make: Factory) -> None:
    # Thread A's older value is re-queued; B, then A, add newer values; the flush
    # fails once to combine A's newer value. Whatever splits, A's values must
    # reach the consumer oldest first.
    fail = {"on": ""}
    flushing = threading.get_ident()

    def merge(stored: tuple[str, ...], incoming: tuple[str, ...]) -> tuple[str, ...]:
        if fail["on"] in incoming and threading.get_ident() == flushing:
            fail["on"] = ""
            raise RuntimeError("merge failed once")
        return stored + incoming

    agg = make(merge, max_pending=1)
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
        b.submit(agg.add, "warm", ("w",)).result()
        a.submit(agg.add, "filler", ("f",)).result()
        agg.flush()  # the output is full from now on
        a.submit(agg.add, "k", ("a1",)).result()
        agg.flush()  # "k" is re-queued
        b.submit(agg.add, "k", ("b1",)).result()
        a.submit(agg.add, "k", ("a2",)).result()
        fail["on"] = "a2"
        agg.flush()
        fail["on"] = ""
    order: list[str] = []
    while agg.pending or len(agg):
        for key, value in agg.drain():
            if key == "k":
                order.extend(value)
        agg.flush()
    assert sorted(order) == ["a1", "a2", "b1"]
    assert [v for v in order if v.startswith("a")] == ["a1", "a2"], order


class Interrupt(BaseException):
    """Stands for ``KeyboardInterrupt``: a ``BaseException`` that is not an ``Exception``."""


class InterruptingKey:
    """A key whose ``__hash__`` raises :class:`Interrupt` once, in a thread other than ``spared``."""

    armed = False
    spared: threading.Thread | None = None

    def __init__(self, name: object) -> None:
        self.name = name

    def __hash__(self) -> int:
        if InterruptingKey.armed and threading.current_thread() is not InterruptingKey.spared:
            InterruptingKey.armed = False
            raise Interrupt(f"hash of {self.name}")
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InterruptingKey) and other.name == self.name

    def __repr__(self) -> str:
        return f"InterruptingKey({self.name!r})"


@pytest.fixture
def interrupting() -> Any:
    yield InterruptingKey
    InterruptingKey.armed = False
    InterruptingKey.spared = None


@pytest.mark.clause("FLUSH-5", "CLOSE-5")
@pytest.mark.parametrize("others", [1, 40], ids=["one other key", "forty other keys"])
def test_a_base_exception_inside_a_flush_loses_nothing(make: Factory, interrupting: Any, others: int) -> None:
    # With forty other keys, a sharded or striped backend detaches several chunks: those
    # after the interrupted one must be settled too. Keys that hash as small ints put the
    # interrupted one (hash 0) in the first shard or stripe, whatever PYTHONHASHSEED is.
    agg = make(operator.add, max_pending=1)
    agg.add("filler", 1)
    agg.flush()  # the output is full: the next flush re-queues everything, hashing each key
    key = interrupting("interrupted") if others == 1 else interrupting(0)
    agg.add(key, 10)
    other_keys: list[object] = ["other"] if others == 1 else list(range(1, others + 1))
    for other in other_keys:
        agg.add(other, 100)
    with ThreadPoolExecutor(1) as flusher:
        interrupting.armed = True
        try:
            flusher.submit(agg.flush).result()
        except Interrupt:
            pass  # it may propagate, but only after every record is settled
    assert not interrupting.armed, "the flush never hashed the key"
    assert shutdown_collecting(agg) == {"filler": 1, key: 10, **dict.fromkeys(other_keys, 100)}


@pytest.mark.clause("FLUSH-5", "FLUSH-3")
def test_the_periodic_flusher_survives_a_base_exception(
    make: Factory, interrupting: Any, caplog: pytest.LogCaptureFixture
) -> None:
    agg = make(operator.add, flush_interval=0.002, max_pending=1)
    agg.add("filler", 1)
    deadline = time.monotonic() + 10
    while agg.pending == 0:
        assert time.monotonic() < deadline, "the periodic flusher never ran"
        time.sleep(0.001)
    key = interrupting("interrupted")
    agg.add(key, 10)
    interrupting.spared = threading.current_thread()
    interrupting.armed = True  # the next tick re-queues the key and its hash raises there
    while interrupting.armed:
        assert time.monotonic() < deadline, "no tick hashed the key"
        time.sleep(0.001)
    delivered = dict(agg.drain())
    agg.add("later", 1000)
    while "later" not in delivered:
        assert time.monotonic() < deadline + 10, "the periodic flusher stopped after the exception"
        delivered.update(agg.drain())
        time.sleep(0.002)
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    assert shutdown_collecting(agg, into=delivered) == {"filler": 1, key: 10, "later": 1000}
