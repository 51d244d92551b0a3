"""add_many (ADD-7) and aggregators across os.fork() (LIFE-3)."""

from __future__ import annotations

import multiprocessing
import operator
import os
import threading
import warnings
from collections import Counter
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import Factory, shutdown_collecting


@pytest.mark.clause("ADD-7", "ADD-1", "STAT-1")
def test_add_many_is_add_for_each_pair_in_order(make: Factory) -> None:
    seen: list[tuple[Any, Any]] = []

    def merge(stored: list[int], incoming: list[int]) -> list[int]:
        seen.append((stored, incoming))
        return stored + incoming

    agg = make(merge)
    pairs = iter([("a", [1]), ("b", [2]), ("a", [3]), ("a", [4]), ("c", [5])])  # any iterable
    assert agg.add_many(pairs) == 2
    assert agg.add_many([]) == 0
    assert seen == [([1], [3]), ([1, 3], [4])]  # in order, older first
    assert (agg.stats().adds, agg.stats().merges, agg.stats().stored) == (5, 2, 3)
    assert shutdown_collecting(agg, operator.add) == {"a": [1, 3, 4], "b": [2], "c": [5]}


@pytest.mark.clause("ADD-7", "ADD-4")
@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (("k", "boom"), ValueError),  # merge raises
        (([], 1), TypeError),  # unhashable key
        (("only one",), ValueError),  # not a pair
        (7, TypeError),  # not a pair at all
    ],
)
def test_add_many_keeps_the_pairs_before_a_failure_and_names_it(make: Factory, bad: Any, error: type) -> None:
    def merge(stored: int, incoming: Any) -> int:
        if incoming == "boom":
            raise ValueError("boom")
        return stored + int(incoming)

    agg = make(merge)
    agg.add("k", 1)
    with pytest.raises(error) as raised:
        agg.add_many([("k", 1), ("new", 1), bad, ("after", 1)])
    assert any("pair 2" in note for note in getattr(raised.value, "__notes__", [])), raised.value
    assert shutdown_collecting(agg) == {"k": 2, "new": 1}


@pytest.mark.clause("ADD-7", "CLOSE-1")
def test_add_many_after_shutdown_raises_closed(make: Factory) -> None:
    agg = make()
    agg.shutdown()
    with pytest.raises(ar.AggregatorClosedError):
        agg.add_many([("k", 1)])


@pytest.mark.clause("ADD-7", "THREAD-1", "CLOSE-5")
def test_add_many_from_many_threads_gives_exact_totals(make: Factory) -> None:
    agg = make(flush_interval=0.005, max_pending=64)
    threads = [
        threading.Thread(target=lambda: agg.add_many((i % 50, 1) for i in range(2000)), daemon=True)
        for _ in range(4)
    ]
    got: Counter[Any] = Counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    got.update(shutdown_collecting(agg))
    assert got == Counter(dict.fromkeys(range(50), 4 * 40))


def _in_a_new_thread(call: Any, *args: Any) -> None:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call(*args)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the call did not return within 30 s"
    if raised:
        raise raised[0]


def _child(agg: Any, backend_name: str, results: Any, kept: dict[str, Any]) -> None:
    report: dict[str, Any] = {"len": len(agg), "closed": agg.closed, "pending": agg.pending}
    try:
        agg.add("a", 1)
        report["add"] = "accepted"
    except ar.AggregatorClosedError as exc:
        report["add"] = str(exc)
    for name, call in kept.items():  # references taken in the parent, before the fork
        try:
            call()
            report[name] = "accepted"
        except ar.AggregatorClosedError:
            report[name] = "refused"
    report["records"] = list(agg.records())
    agg.shutdown()
    own = ar.create(operator.add, backend=backend_name, flush_interval=0.01)
    own.add("child", 1)
    own.add("child", 2)
    own.shutdown()
    report["own"] = own.drain()
    results.put(report)


@pytest.mark.clause("LIFE-3", "LIFE-1", "CLOSE-5")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_cannot_deliver_the_parents_records(backend_name: str) -> None:
    agg = ar.create(operator.add, backend=backend_name, flush_interval=0.01, max_pending=2)
    for key in "abcde":
        agg.add(key, 1)  # some flushed into the output, the rest buffered
    add, add_many = agg.add, agg.add_many  # kept, as a hot loop keeps them
    kept = {
        "kept add": lambda: add("a", 1),
        "kept add_many": lambda: add_many([("new", 1)]),
        "kept add, new key": lambda: add("new", 1),
        "kept add, new thread": lambda: _in_a_new_thread(add, "new", 1),
    }
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a threaded process
        child = context.Process(target=_child, args=(agg, backend_name, results, kept))
        child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, f"the child failed (exit code {child.exitcode})"
    report = results.get()
    assert (report["len"], report["closed"], report["pending"], report["records"]) == (0, True, 0, [])
    assert "parent" in report["add"], report["add"]
    assert "create" in report["add"], report["add"]
    assert report["own"] == [("child", 3)]
    assert {name: report[name] for name in kept} == dict.fromkeys(kept, "refused")
    for key in "ab":
        agg.add(key, 1)  # the parent's aggregator is unaffected
    assert shutdown_collecting(agg) == {"a": 2, "b": 2, "c": 1, "d": 1, "e": 1}
