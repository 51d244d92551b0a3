"""Calls from inside merge: REENTRY-1."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import aggregator_reference as ar

from ._waits import call_bounded
from .conftest import Factory, shutdown_collecting

CALLS: dict[str, Callable[[Any], Any]] = {
    "add same key": lambda agg: agg.add("k", 100),
    "flush": lambda agg: agg.flush(),
    "shutdown": lambda agg: agg.shutdown(timeout=1),
}


def run_with_timeout(target: Callable[[], Any], seconds: float = 20) -> Any:
    """Run ``target`` in a daemon thread so that a deadlock fails the test, with every thread's stack."""
    return call_bounded(target, seconds, "the call from merge (deadlock?)")


@pytest.mark.clause("REENTRY-1", "ADD-4")
@pytest.mark.parametrize("call", sorted(CALLS))
def test_mutating_calls_from_merge_raise(make: Factory, call: str) -> None:
    holder: dict[str, Any] = {}

    def merge(stored: int, incoming: int) -> int:
        if incoming == 2:
            CALLS[call](holder["agg"])
        return stored + incoming

    agg = holder["agg"] = make(merge)

    def body() -> None:  # one thread, so that "k" has one record that add() merges into
        agg.add("k", 1)
        agg.add("other", 1)
        before = agg.stats()
        with pytest.raises(ar.ReentrantMergeError):
            agg.add("k", 2)
        assert agg.stats() == before, "ADD-4: a refused call changes no counter"

    run_with_timeout(body)
    assert agg.snapshot() == {"k": 1, "other": 1}
    # Nothing was left half-done: the aggregator still adds, flushes and shuts down.
    assert not agg.closed
    assert agg.add("k", 5) is True
    assert agg.flush() == 2
    agg.shutdown(timeout=5)
    assert sorted(agg.drain()) == [("k", 6), ("other", 1)]


READS: dict[str, Callable[[Any], Any]] = {
    "get": lambda agg: agg.get("k"),
    "len": len,
    "snapshot": lambda agg: agg.snapshot(),
}


@pytest.mark.clause("REENTRY-1")
def test_adding_another_key_from_merge_works_or_raises(make: Factory) -> None:
    holder: dict[str, Any] = {}
    outcome: list[Any] = []

    def merge(stored: int, incoming: int) -> int:
        try:
            outcome.append(holder["agg"].add("other", 10))
        except ar.ReentrantMergeError:
            outcome.append("refused")
        return stored + incoming

    agg = holder["agg"] = make(merge)

    def body() -> None:
        agg.add("k", 1)
        agg.add("k", 2)

    run_with_timeout(body)
    assert outcome in ([False], ["refused"])
    expected = {"k": 3, "other": 10} if outcome == [False] else {"k": 3}
    assert shutdown_collecting(agg) == expected


@pytest.mark.clause("REENTRY-1")
@pytest.mark.parametrize("read", sorted(READS))
def test_reads_from_merge_answer_or_raise_but_never_deadlock(make: Factory, read: str) -> None:
    holder: dict[str, Any] = {}
    seen: list[Any] = []

    def merge(stored: int, incoming: int) -> int:
        agg = holder["agg"]
        seen.append((agg.pending, agg.stats().adds))  # always allowed
        try:
            seen.append(READS[read](agg))
        except ar.ReentrantMergeError:
            seen.append("refused")
        return stored + incoming

    agg = holder["agg"] = make(merge)
    assert run_with_timeout(lambda: (agg.add("k", 1), agg.add("k", 2))) == (False, True)
    outside = {"get": 1, "len": 1, "snapshot": {"k": 1}}[read]
    assert seen in ([(0, 1), outside], [(0, 1), "refused"])
    assert agg.get("k") == 3


@pytest.mark.clause("REENTRY-1", "FLUSH-2", "FLUSH-5")
def test_calls_from_a_requeue_merge_raise_and_the_record_is_kept(backend_name: str) -> None:
    # Through the Storage protocol, so that newer data surely arrives between
    # detach and requeue; skipped for backends not built on the shared engine.
    cls = ar.load_backend(backend_name)
    factory = getattr(cls, "storage_class", None)
    if factory is None:
        pytest.skip(f"{backend_name} is not built on BufferedAggregator")
    holder: dict[str, Any] = {}
    raised: list[BaseException] = []

    def merge(stored: int, incoming: int) -> int:
        try:
            holder["storage"].add("k", 1)  # the key being merged
        except ar.ReentrantMergeError as exc:
            raised.append(exc)
            raise
        return stored + incoming

    storage = holder["storage"] = factory(merge, None)
    storage.add("k", 1)
    chunks = storage.detach()
    storage.add("k", 2)
    # Re-queue everything, as when the output is full; the merge of the re-queued
    # record with the newer one happens now or (per-thread backends) at the next
    # detach. Either way the reentrant add is refused and both records survive.
    failed = [pair for chunk in chunks for pair in storage.requeue(chunk, list(chunk.items()))]
    out = [pair for chunk in storage.detach() for pair in chunk.items()]
    assert raised, "merge was never called to combine the re-queued record with newer data"
    assert all(isinstance(exc, ar.ReentrantMergeError) for exc in raised)
    assert sorted(failed + out) == [("k", 1), ("k", 2)]


CALLS_WHILE_A_FLUSH_WAITS: dict[str, Callable[[Any], Any]] = {
    "flush": lambda agg: agg.flush(),
    "shutdown": lambda agg: agg.shutdown(timeout=1),
    "len": len,
    "snapshot": lambda agg: agg.snapshot(),
    "get another key": lambda agg: agg.get("other"),
    "add another key": lambda agg: agg.add("other", 5),
}


@pytest.mark.clause("REENTRY-1", "FLUSH-4")
@pytest.mark.parametrize("periodic", [False, True], ids=["manual", "periodic"])
@pytest.mark.parametrize("call", sorted(CALLS_WHILE_A_FLUSH_WAITS))
def test_calls_from_merge_while_another_flush_waits_for_it(make: Factory, call: str, periodic: bool) -> None:
    # The merge holds whatever its add holds while a flush in another thread waits
    # for it; then the merge calls back. That must answer or raise, never deadlock.
    in_merge, go, answered = threading.Event(), threading.Event(), threading.Event()
    outcome: list[Any] = []
    holder: dict[str, Any] = {}

    merged_in: list[threading.Thread] = []

    def merge(stored: int, incoming: int) -> int:
        if incoming == 2:
            merged_in.append(threading.current_thread())
            in_merge.set()
            go.wait(10)
            try:
                outcome.append(CALLS_WHILE_A_FLUSH_WAITS[call](holder["agg"]))
            except ar.ReentrantMergeError:
                outcome.append("refused")
            answered.set()
        return stored + incoming

    agg = holder["agg"] = make(merge, flush_interval=0.002 if periodic else None, max_pending=1)
    agg.add("other", 1)
    deadline = time.monotonic() + 10
    while periodic and agg.pending == 0:  # then the output is full: "k" stays buffered
        assert time.monotonic() < deadline, "the periodic flusher never ran"
        time.sleep(0.001)
    flusher = None
    with ThreadPoolExecutor(1) as writer:
        writer.submit(agg.add, "k", 1).result()
        writer_thread = writer.submit(threading.current_thread).result()
        adding = writer.submit(agg.add, "k", 2)
        assert in_merge.wait(10), "merge was never called"
        if not periodic:
            flusher = threading.Thread(target=lambda: outcome.append(("flushed", agg.flush())), daemon=True)
            flusher.start()
        time.sleep(0.1)  # let the flush reach the record that merge holds
        go.set()
        result = run_with_timeout(lambda: adding.result(20))
    assert answered.wait(20), "the call from merge never returned"  # a tick's merge may run it
    if flusher is not None:
        flusher.join(20)
        assert not flusher.is_alive(), "deadlock: the flush never finished"
    # A periodic tick may have detached "k" just then: the add stored it anew, and the
    # tick's re-queue ran the merge instead (ADD-2); either way the call from it answered.
    assert result is (merged_in[0] is writer_thread)
    answer = [o for o in outcome if not (isinstance(o, tuple) and o[0] == "flushed")]
    if call in ("flush", "shutdown"):
        assert answer == ["refused"]
    else:
        assert len(answer) == 1
        assert answer[0] == "refused" or call != "add another key" or answer[0] in (True, False), answer
    delivered = shutdown_collecting(agg)
    added_other = call == "add another key" and answer[0] != "refused"
    assert delivered == {"k": 3, "other": 6 if added_other else 1}


@pytest.mark.clause("REENTRY-1")
@pytest.mark.parametrize("call", ["add", "get"])
def test_merges_calling_each_others_keys_never_deadlock(make: Factory, call: str) -> None:
    # Two threads merge into keys 0 and 1 (different shards or stripes) at once, and
    # each merge calls add/get of the other key: lock A then B against B then A.
    both_inside = threading.Barrier(2)
    outcome: list[Any] = []
    holder: dict[str, Any] = {}

    def merge(stored: int, incoming: int) -> int:
        if incoming < 0:
            try:
                both_inside.wait(2)
            except threading.BrokenBarrierError:
                pass  # a backend that serialises these merges never lets both in
            other = 1 - holder["key"][threading.get_ident()]
            try:
                if call == "add":
                    outcome.append(("added", other, holder["agg"].add(other, 100)))
                else:
                    outcome.append(("got", other, holder["agg"].get(other)))
            except ar.ReentrantMergeError:
                outcome.append("refused")
            return stored + 1
        return stored + incoming

    agg = holder["agg"] = make(merge)
    holder["key"] = {}

    def write(key: int) -> None:
        holder["key"][threading.get_ident()] = key
        agg.add(key, 1)
        agg.add(key, -1)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(write, key) for key in (0, 1)]
        run_with_timeout(lambda: [f.result(30) for f in futures], seconds=30)
    added = {0: 0, 1: 0}
    for entry in outcome:
        if entry != "refused" and entry[0] == "added":
            added[entry[1]] += 100
    assert shutdown_collecting(agg) == {0: 2 + added[0], 1: 2 + added[1]}


class SlowKey:
    """A key whose first ``__hash__`` in the thread named ``slow_in`` sleeps ``seconds``."""

    def __init__(self, name: str, seconds: float, slow_in: str) -> None:
        self.name, self.seconds, self.slow_in = name, seconds, slow_in
        self.started = threading.Event()

    def __hash__(self) -> int:
        if threading.current_thread().name == self.slow_in and not self.started.is_set():
            self.started.set()
            time.sleep(self.seconds)
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlowKey) and other.name == self.name

    def __repr__(self) -> str:
        return f"SlowKey({self.name!r})"


@pytest.mark.clause("REENTRY-1", "CLOSE-5")
@pytest.mark.parametrize("read", ["get", "snapshot", "flush"])
def test_a_read_from_another_merge_that_gives_up_loses_no_add_in_flight(backend_name: str, read: str) -> None:
    # A thread runs a slow merge, then at once adds a key whose hashing is slow; meanwhile
    # another aggregator's merge reads this aggregator and may give up waiting for that
    # thread (REENTRY-1). Whatever the read does, every add is kept.
    slow_merge = threading.Event()

    def merge(stored: int, incoming: int) -> int:
        if threading.current_thread().name == "slow-writer" and not slow_merge.is_set():
            slow_merge.set()
            time.sleep(0.4)
        return stored + incoming

    agg = ar.create(merge, backend=backend_name, flush_interval=None)
    second = SlowKey("second", 2.0, "slow-writer")
    outcome: list[str] = []

    def reading_merge(stored: int, incoming: int) -> int:
        try:
            {"get": lambda: agg.get("other"), "snapshot": agg.snapshot, "flush": agg.flush}[read]()
            outcome.append("worked")
        except ar.ReentrantMergeError:
            outcome.append("refused")
        return stored + incoming

    caller = ar.create(reading_merge, backend=backend_name, flush_interval=None)
    try:
        writer = threading.Thread(
            target=lambda: (agg.add("first", 1), agg.add("first", 1), agg.add(second, 2)),
            name="slow-writer",
            daemon=True,
        )
        writer.start()
        assert slow_merge.wait(10)
        time.sleep(0.1)  # the read begins during the slow merge and is still waiting after it
        call_bounded(
            lambda: (caller.add("c", 1), caller.add("c", 1)), 30, "a read from another aggregator's merge"
        )
        writer.join(30)
        assert not writer.is_alive(), "the slow adds did not return"
        assert len(outcome) == 1
        stats = agg.stats()  # one writer: one add merged, two stored, whatever the read did (STAT-1)
        assert (stats.merges, stats.stored) == (1, 2), stats
    finally:
        shutdown_collecting(caller)
        got = shutdown_collecting(agg)
    assert got == {"first": 2, second: 2}, f"delivered {got}; the read from merge {outcome}"


def operator_add(stored: int, incoming: int) -> int:
    return stored + incoming


@pytest.mark.clause("REENTRY-1", "CLOSE-4")
@pytest.mark.parametrize(("timeout", "raised"), [(0.2, TimeoutError), (5.0, ar.ReentrantMergeError)])
def test_shutdown_with_a_timeout_from_another_merge_gives_up_at_the_shorter_bound(
    backend_name: str, timeout: float, raised: type
) -> None:
    # Y's add is in flight (its merge waits); X's merge calls Y.shutdown(timeout=...): it
    # cannot finish. Its own timeout, if the shorter, ends it with TimeoutError; else the
    # bound on waits from inside merge (1 s) ends it with ReentrantMergeError.
    gate, inside = threading.Event(), threading.Event()

    def slow(stored: int, incoming: int) -> int:
        inside.set()
        gate.wait(30)
        return stored + incoming

    y = ar.create(slow, backend=backend_name, flush_interval=None)
    outcome: list[Any] = []

    def calling(stored: int, incoming: int) -> int:
        started = time.monotonic()
        try:
            y.shutdown(timeout=timeout)
            outcome.append("finished")
        except (TimeoutError, ar.ReentrantMergeError) as exc:
            outcome.append(type(exc))
        outcome.append(time.monotonic() - started)
        return stored + incoming

    x = ar.create(calling, backend=backend_name, flush_interval=None)
    try:
        in_flight = threading.Thread(target=lambda: (y.add("k", 1), y.add("k", 2)), daemon=True)
        in_flight.start()
        assert inside.wait(10)
        call_bounded(lambda: (x.add("c", 1), x.add("c", 1)), 30, "shutdown() from another merge")
        assert outcome[0] is raised, outcome
        assert outcome[1] < 4.0, f"gave up after {outcome[1]:.1f} s, not at the shorter bound"
    finally:
        gate.set()
        in_flight.join(30)
        assert shutdown_collecting(y) == {"k": 3}
        shutdown_collecting(x)
