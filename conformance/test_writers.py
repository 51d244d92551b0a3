"""add_many (ADD-7) and adder() (ADD-8)."""

from __future__ import annotations

import operator
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import Factory, StallingMerge, shutdown_collecting


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


@pytest.mark.clause("ADD-7", "ADD-4", "STAT-1")
def test_add_many_of_a_long_list_counts_every_merge_and_names_a_failure_deep_inside_it(make: Factory) -> None:
    def merge(stored: int, incoming: Any) -> int:
        if incoming == "boom":
            raise ValueError("boom")
        return stored + int(incoming)

    agg = make(merge)
    pairs: list[Any] = [("abcde"[i % 5], 1) for i in range(300)]
    pairs[40] = ["a", 1]  # any pair, not only a tuple
    pairs[77] = ("c", "2")  # merge sees what was given
    pairs[150] = ("a", "boom")
    with pytest.raises(ValueError, match="boom") as raised:
        agg.add_many(pairs)
    assert any("pair 150" in note for note in getattr(raised.value, "__notes__", [])), raised.value
    assert (agg.stats().adds, agg.stats().merges, agg.stats().stored) == (150, 145, 5)
    assert agg.add_many(pairs[151:]) == 149
    assert shutdown_collecting(agg) == {"a": 59, "b": 60, "c": 61, "d": 60, "e": 60}


@pytest.mark.clause("ADD-7", "CLOSE-2", "CLOSE-4")
def test_add_many_refuses_the_pairs_after_shutdown_began_during_one_of_its_merges(make: Factory) -> None:
    merge = StallingMerge()
    in_merge, release = merge.entered, merge.release

    agg = make(merge)
    pairs = [("k", 1)] * 10 + [("k", 2)] + [("k", 1)] * 20
    with ThreadPoolExecutor(1) as writer:
        adding = writer.submit(agg.add_many, pairs)
        assert in_merge.wait(10)
        with pytest.raises(TimeoutError):
            agg.shutdown(timeout=0.1)
        release.set()
        with pytest.raises(ar.AggregatorClosedError) as raised:
            adding.result(10)
    assert any("pair 11" in note for note in getattr(raised.value, "__notes__", [])), raised.value
    assert shutdown_collecting(agg) == {"k": 12}


@pytest.mark.clause("ADD-7", "REENTRY-1")
@pytest.mark.parametrize("call", ["add", "flush"])
def test_add_many_of_a_list_refuses_a_merge_that_calls_back(make: Factory, call: str) -> None:
    agg: Any = None

    def merge(stored: int, incoming: int) -> int:
        if incoming == 2:
            getattr(agg, call)(*{"add": ("k", 1), "flush": ()}[call])
        return stored + incoming

    agg = make(merge)
    with pytest.raises(ar.ReentrantMergeError) as raised:
        agg.add_many([("k", 1)] * 5 + [("k", 2)] + [("k", 1)] * 5)
    assert any("pair 5" in note for note in getattr(raised.value, "__notes__", [])), raised.value
    assert shutdown_collecting(agg) == {"k": 5}


class _FlushingPair:
    """A pair whose unpacking calls ``flush()`` of the aggregator being added to: not a merge."""

    def __init__(self, agg: Any, key: str, value: int) -> None:
        self.agg, self.key, self.value = agg, key, value

    def __iter__(self) -> Any:
        self.agg.flush()
        return iter((self.key, self.value))


@pytest.mark.clause("ADD-7", "REENTRY-1", "CLOSE-2")
@pytest.mark.parametrize("given", ["generator", "pair object"])
@pytest.mark.parametrize("call", ["flush", "shutdown"])
def test_add_many_lets_its_pairs_call_flush_and_shutdown(make: Factory, given: str, call: str) -> None:
    # Only merge is "inside merge" (REENTRY-1): code that produces the pairs is the caller's own.
    agg: Any = make()

    def between() -> None:
        if call == "flush":
            agg.flush()
        else:
            agg.shutdown()

    def generator() -> Any:
        yield ("a", 1)
        yield ("a", 2)
        between()
        yield ("a", 3)

    class Pair(_FlushingPair):
        def __iter__(self) -> Any:
            between()
            return iter((self.key, self.value))

    pairs = generator() if given == "generator" else [("a", 1), ("a", 2), Pair(agg, "a", 3)]
    if call == "flush":
        assert agg.add_many(pairs) == 1  # the flush took "a" out: the third pair stores it anew
        assert shutdown_collecting(agg) == {"a": 6}
    else:
        with pytest.raises(ar.AggregatorClosedError) as raised:
            agg.add_many(pairs)
        assert any("pair 2" in note for note in getattr(raised.value, "__notes__", [])), raised.value
        assert agg.drain() == [("a", 3)]


@pytest.mark.clause("ADD-7")
@pytest.mark.parametrize("change", ["replace", "truncate", "append"])
def test_add_many_of_a_list_that_merge_changes_adds_what_the_list_holds_when_reached(
    make: Factory, change: str
) -> None:
    pairs = [("k", 1)] * 6

    def merge(stored: int, incoming: int) -> int:
        if change == "replace" and pairs[3] == ("k", 1):
            pairs[3] = ("k", 1000)
        elif change == "truncate" and len(pairs) > 3:
            del pairs[3:]
        elif change == "append" and len(pairs) < 8:
            pairs.append(("k", 50))
        return stored + incoming

    agg = make(merge)
    merged = agg.add_many(pairs)
    expected = {"replace": (5, 1005), "truncate": (2, 3), "append": (7, 106)}[change]
    assert (merged, shutdown_collecting(agg)["k"]) == expected


@pytest.mark.clause("ADD-7", "CLOSE-1")
def test_add_many_after_shutdown_raises_closed(make: Factory) -> None:
    agg = make()
    agg.shutdown()
    with pytest.raises(ar.AggregatorClosedError):
        agg.add_many([("k", 1)])


@pytest.mark.clause("ADD-7", "THREAD-1", "CLOSE-5")
@pytest.mark.parametrize("given", [iter, list], ids=["iterator", "list"])
def test_add_many_from_many_threads_gives_exact_totals(make: Factory, given: Callable[[Any], Any]) -> None:
    agg = make(flush_interval=0.005, max_pending=64)
    threads = [
        threading.Thread(target=lambda: agg.add_many(given([(i % 50, 1) for i in range(2000)])), daemon=True)
        for _ in range(4)
    ]
    got: Counter[Any] = Counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    got.update(shutdown_collecting(agg))
    assert got == Counter(dict.fromkeys(range(50), 4 * 40))


@pytest.mark.clause("ADD-8", "ADD-1", "ADD-2", "ADD-3", "STAT-1", "CLOSE-1")
@pytest.mark.parametrize("max_buffered", [None, 1000], ids=["unbounded", "bounded"])
def test_adder_is_add_in_an_object_of_its_own(make: Factory, max_buffered: int | None) -> None:
    agg = make(max_buffered=max_buffered)
    first, second = agg.adder(), agg.adder()
    assert first is not second  # one per writer thread: no shared object to count references on
    assert first is not agg.add
    assert first("k", 1) is False
    assert second("k", 2) is True
    assert agg.add("k", 3) is True
    with pytest.raises(TypeError):
        first([], 1)
    assert (agg.stats().adds, agg.stats().merges, agg.stats().stored) == (3, 2, 1)
    assert shutdown_collecting(agg) == {"k": 6}
    with pytest.raises(ar.AggregatorClosedError):
        first("k", 1)
    with pytest.raises(ar.AggregatorClosedError):
        agg.adder()("k", 1)


@pytest.mark.clause("ADD-8", "THREAD-1", "CLOSE-5")
def test_adders_of_many_threads_give_exact_totals(make: Factory) -> None:
    agg = make(flush_interval=0.005, max_pending=64)

    def write() -> None:
        add = agg.adder()
        for i in range(2000):
            add(i % 50, 1)

    threads = [threading.Thread(target=write, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert shutdown_collecting(agg) == dict.fromkeys(range(50), 4 * 40)
