"""Calls from inside merges that a backend runs while it holds more than one record's lock: REENTRY-1.

The merges of ``test_reentry.py`` and of
``test_partials.test_merges_of_two_aggregators_calling_each_other_never_deadlock``
run from an ``add`` that merges into a record the adding thread keeps alone.
A backend may also run ``merge`` while it holds what every thread needs: an
``add`` whose key a read (or a re-queue) moved where all threads' records meet,
or a read or flush combining the partial records of several threads (ADD-2).
REENTRY-1 promises for those too that nothing deadlocks, also when such merges
in two threads call each other's aggregators, and that ``add`` of the key
being merged raises ``ReentrantMergeError`` at once.

Every scenario is built through public calls only, so it means the same on
every backend: one that merges in ``add`` simply runs the merge earlier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import aggregator_reference as ar

from ._waits import call_bounded, format_stacks
from .conftest import Factory, shutdown_collecting

#: Seconds a scenario may take before it counts as a deadlock; a refusal after a
#: bounded wait (1 s in the shared engine) ends well within it.
LIMIT = 20.0

#: What a merge of one aggregator calls on the other one.
CROSS_CALLS: dict[str, Callable[[Any], object]] = {
    "get": lambda target: target.get("k"),
    "len": len,
    "snapshot": lambda target: target.snapshot(),
    "flush": lambda target: target.flush(),
    "add": lambda target: target.add("elsewhere", 1),
}


class CrossMerges:
    """Two aggregators' merges that meet on a barrier, then each call the other aggregator.

    Only a merge that runs while ``armed`` is set calls across, once per
    aggregator; ``outcome[name]`` says whether that call worked or was refused
    with ``ReentrantMergeError`` (anything else propagates out of the merge).
    """

    def __init__(self, call: str) -> None:
        self.call = CROSS_CALLS[call]
        self.armed = threading.Event()
        self.both_inside = threading.Barrier(2)
        self.aggs: dict[str, Any] = {}
        self.outcome: dict[str, str] = {}

    def merge_of(self, name: str, other: str) -> Callable[[int, int], int]:
        def merge(stored: int, incoming: int) -> int:
            if self.armed.is_set() and name not in self.outcome:
                self.outcome[name] = "inside"
                try:
                    self.both_inside.wait(3)  # both merges run, each holding what it holds
                except threading.BrokenBarrierError:
                    pass  # a backend that ran only one of them here: nothing to cross
                try:
                    self.call(self.aggs[other])
                    self.outcome[name] = "worked"
                except ar.ReentrantMergeError:
                    self.outcome[name] = "refused"
            return stored + incoming

        return merge

    def create(self, backend_name: str) -> None:
        for name, other in (("X", "Y"), ("Y", "X")):
            self.aggs[name] = ar.create(self.merge_of(name, other), backend=backend_name, flush_interval=None)

    def run_both(self, step: Callable[[Any], object], what: str) -> None:
        """Run ``step(aggregator)`` for both aggregators at once, each in a daemon thread; bounded.

        Raises ``AssertionError`` with every thread's stack when one has not
        ended after :data:`LIMIT` seconds (it is left behind, as a daemon), or
        the first exception a step raised.
        """
        errors: list[BaseException] = []

        def body(agg: Any) -> None:
            try:
                step(agg)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=body, args=(agg,), name=f"conformance: {name}", daemon=True)
            for name, agg in self.aggs.items()
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + LIMIT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread for thread in threads if thread.is_alive()]
        if stuck:
            raise AssertionError(
                f"{what} did not end within {LIMIT:g} s: deadlock (REENTRY-1)? The stuck threads "
                f"are left running as daemons.\n{format_stacks(stuck)}"
            )
        if errors:
            raise errors[0]

    def totals(self) -> list[dict[Any, Any]]:
        return [shutdown_collecting(agg) for agg in self.aggs.values()]


@pytest.mark.clause("REENTRY-1", "READ-1")
@pytest.mark.parametrize("call", sorted(CROSS_CALLS))
def test_merges_of_adds_after_a_read_calling_each_other_never_deadlock(backend_name: str, call: str) -> None:
    # Each aggregator's key was read before the merging add: a backend that keeps
    # records per thread moved it to its shared home, and the add takes it back from
    # there, running the merge with the shared lock held. Both such merges, in two
    # threads, then call the other aggregator: each must work or be refused, not wait
    # forever for the other.
    cross = CrossMerges(call)
    cross.create(backend_name)

    def write(agg: Any) -> None:
        agg.add("k", 1)
        assert agg.get("k") == 1
        cross.armed.set()
        agg.add("k", 2)  # merges; the merge calls the other aggregator

    cross.run_both(write, "merges of adds after a read calling each other")
    assert sorted(cross.outcome) == ["X", "Y"], "both merges ran"
    assert set(cross.outcome.values()) <= {"worked", "refused"}, cross.outcome
    for got in cross.totals():
        assert got["k"] == 3, "REENTRY-1: nothing is lost, whether the calls worked or were refused"


@pytest.mark.clause("REENTRY-1", "ADD-2", "FLUSH-6")
@pytest.mark.parametrize("step", ["get", "snapshot", "flush"])
@pytest.mark.parametrize("call", ["get", "flush"])
def test_merges_combining_partials_calling_each_other_never_deadlock(
    backend_name: str, step: str, call: str
) -> None:
    # Two threads add the same key to each aggregator: a backend with per-thread
    # partial records (ADD-2) keeps two, and combines them in the read or flush
    # below, with its shared lock held. Both steps run at once, and each combining
    # merge calls the other aggregator. A backend that merged in add() has nothing
    # left to combine: its merges ran unarmed, and the reads simply work.
    cross = CrossMerges(call)
    cross.create(backend_name)
    writers = [ThreadPoolExecutor(1) for _ in range(2)]
    try:
        for agg in cross.aggs.values():
            for value, writer in zip((1, 2), writers, strict=True):
                writer.submit(agg.add, "k", value).result(timeout=LIMIT)
    finally:
        for writer in writers:
            writer.shutdown()
    steps: dict[str, Callable[[Any], object]] = {
        "get": lambda agg: agg.get("k"),
        "snapshot": lambda agg: agg.snapshot(),
        "flush": lambda agg: agg.flush(),
    }
    cross.armed.set()
    cross.run_both(steps[step], f"{step}()s whose merges call each other")
    assert set(cross.outcome.values()) <= {"worked", "refused"}, cross.outcome
    for got in cross.totals():
        assert got["k"] == 3, "REENTRY-1: nothing is lost, whether the calls worked or were refused"


@pytest.mark.clause("REENTRY-1", "ADD-4")
@pytest.mark.parametrize("read", ["get", "snapshot", "get from another thread"])
def test_adding_the_key_being_merged_after_a_read_raises(make: Factory, read: str) -> None:
    # test_reentry's "add same key", with the key read before the merging add: a
    # backend with per-thread records runs that merge while it takes the record back
    # from its shared home, and the add from inside it must still be refused at once.
    holder: dict[str, Any] = {}

    def merge(stored: int, incoming: int) -> int:
        if incoming == 2:
            holder["agg"].add("k", 100)
        return stored + incoming

    agg = holder["agg"] = make(merge)
    reads: dict[str, Callable[[], object]] = {
        "get": lambda: agg.get("k"),
        "snapshot": agg.snapshot,
    }

    def body() -> None:  # one writer thread, so that "k" has one record
        agg.add("k", 1)
        agg.add("other", 1)
        if read in reads:
            reads[read]()
        else:
            with ThreadPoolExecutor(1) as reader:
                assert reader.submit(agg.get, "k").result() == 1
        before = agg.stats()
        with pytest.raises(ar.ReentrantMergeError):
            agg.add("k", 2)
        assert agg.stats() == before, "ADD-4: a refused call changes no counter"

    call_bounded(body, LIMIT, "add() of the key being merged, from merge (deadlock?)")
    assert agg.snapshot() == {"k": 1, "other": 1}
    # Nothing was left half done: the aggregator still adds, flushes and shuts down.
    assert agg.add("k", 5) is True
    assert shutdown_collecting(agg) == {"k": 6, "other": 1}
