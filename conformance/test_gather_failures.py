"""A gather of partial records that stops half way, at any point: FLUSH-5, CLOSE-5, ADD-5, KEY-1.

A backend with per-thread partial records (ADD-2) hashes each key several
times while a flush or a read collects its pieces, and runs ``merge`` to
combine them. These tests make a key's ``__hash__`` raise on chosen calls, and
a combining ``merge`` raise :class:`Interrupt`, at every point in turn: whatever
stops a gather, every added value is delivered exactly once (CLOSE-5), a
``BaseException`` out of a flush propagates (FLUSH-5), each thread's values
keep their order where no hash of their key failed (ADD-5), and a key comes
out under the key object added first (KEY-1). Backends with one record per key
hash less and combine nothing: the same checks hold there, with fewer steps.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from .conftest import Factory, shutdown_collecting
from .test_partials import Interrupt, concat

#: More hash calls than any backend makes for one key in one flush, read or add.
MOST_CALLS = 60


class CountdownKey:
    """A key whose ``__hash__`` raises ``error`` on chosen calls after :meth:`arm` (numbered from 1)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls = 0
        self._failing: frozenset[int] = frozenset()
        self._error: type[BaseException] = Interrupt
        self._raised = 0

    def arm(self, *calls: int, error: type[BaseException] = Interrupt) -> None:
        self._calls, self._failing, self._error, self._raised = 0, frozenset(calls), error, 0

    def disarm(self) -> int:
        """Hash normally from now on; return how many times it raised since :meth:`arm`."""
        self._failing = frozenset()
        return self._raised

    def __hash__(self) -> int:
        if self._failing:
            self._calls += 1
            if self._calls in self._failing:
                self._raised += 1
                raise self._error(f"hash of {self.name}, call {self._calls}")
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CountdownKey) and other.name == self.name

    def __repr__(self) -> str:
        return f"CountdownKey({self.name!r})"


def _run(step: str, agg: Any) -> BaseException | None:
    """Flush or read ``agg``; return what it raised, if anything (a flush or read may stop half way)."""
    try:
        agg.flush() if step == "flush" else agg.snapshot()
    except (Interrupt, ValueError) as exc:
        return exc
    return None


def _delivered_in_order(agg: Any) -> list[tuple[Any, Any]]:
    """Flush and drain until nothing is buffered; every record delivered, in delivery order."""
    records: list[tuple[Any, Any]] = []
    for _ in range(100):
        if not (agg.pending or len(agg)):
            break
        records += agg.drain()
        agg.flush()
    records += agg.drain()
    assert shutdown_collecting(agg, concat) == {}, "records were left after the output ran dry"
    return records


def _values(records: list[tuple[Any, Any]], key: object) -> list[str]:
    """The values of ``key``'s records, flattened, in delivery order."""
    return [v for stored, value in records if stored == key for v in value]


@pytest.mark.clause("CLOSE-5", "FLUSH-5")
@pytest.mark.parametrize("step", ["flush", "read"])
@pytest.mark.parametrize("fails", [1, 2], ids=["hash-fails-once", "hash-fails-twice"])
def test_a_key_whose_hash_raises_at_any_point_of_a_gather_loses_nothing(
    make: Factory, step: str, fails: int
) -> None:
    # The key has a piece in each of two threads. Its hash raises an Interrupt on the n-th
    # call of the flush or read, for n = 1, 2, ... until the step makes fewer calls; "twice":
    # on calls n and n + 1, so that a retry after the first failure fails too. Each time,
    # both values and the other key's come out exactly once, and a flush raises the Interrupt.
    with ThreadPoolExecutor(1) as other:
        for call in range(1, MOST_CALLS):
            agg = make(concat)
            key = CountdownKey("k")
            agg.add(key, ["main"])
            other.submit(agg.add, key, ["thread"]).result(30)
            other.submit(agg.add, "after", ["x"]).result(30)
            agg.add("before", ["y"])
            key.arm(*range(call, call + fails))
            stopped = _run(step, agg)
            raised = key.disarm()
            if step == "flush":
                assert (stopped is not None) == (raised > 0), (
                    f"hash call {call}: the flush raised {stopped!r}"
                )
            delivered = shutdown_collecting(agg, concat)
            assert sorted(delivered.get(key, [])) == ["main", "thread"], f"hash call {call}: {delivered}"
            assert delivered.get("after") == ["x"], f"hash call {call}: {delivered}"
            assert delivered.get("before") == ["y"], f"hash call {call}: {delivered}"
            if not raised:
                break  # the step hashed the key fewer times: every call has failed once
        else:
            pytest.fail(f"the key's hash still raised on call {MOST_CALLS - 1} of one {step}")


@pytest.mark.clause("CLOSE-5", "FLUSH-5")
@pytest.mark.parametrize("step", ["flush", "read"])
@pytest.mark.parametrize("tripped", ["the failing key", "the other key"])
@pytest.mark.parametrize("first", ["failing key first", "other key first"])
def test_a_key_whose_hash_raises_after_a_merge_interrupted_a_gather_loses_nothing(
    make: Factory, step: str, tripped: str, first: str
) -> None:
    # Two keys have a piece in each of two threads; combining one of them ("tripped") raises
    # an Interrupt, and the failing key's hash raises on the n-th call of the flush or read,
    # for every n: also while the gather puts back what it had combined or not yet combined.
    trip = {"on": False}
    tripping = "k" if tripped == "the failing key" else "z"

    def merge(stored: list[str], incoming: list[str]) -> list[str]:
        if trip["on"] and stored[0].startswith(tripping):
            trip["on"] = False
            raise Interrupt
        return stored + incoming

    with ThreadPoolExecutor(1) as other:
        for call in range(1, MOST_CALLS):
            agg = make(merge)
            key = CountdownKey("k")
            agg.add(key, ["k-main"])
            agg.add("z", ["z-main"])
            adds = [(key, ["k-thread"]), ("z", ["z-thread"])]
            for pair in adds if first == "failing key first" else adds[::-1]:
                other.submit(agg.add, *pair).result(30)
            key.arm(call)
            trip["on"] = True
            stopped = _run(step, agg)
            interrupted = not trip["on"]
            trip["on"] = False
            raised = key.disarm()
            if step == "flush":
                assert (stopped is not None) == (raised > 0 or interrupted), (
                    f"hash call {call}: the flush raised {stopped!r}"
                )
            delivered = shutdown_collecting(agg, concat)
            assert sorted(delivered.get(key, [])) == ["k-main", "k-thread"], f"hash call {call}: {delivered}"
            assert sorted(delivered.get("z", [])) == ["z-main", "z-thread"], f"hash call {call}: {delivered}"
            if not raised:
                break  # the step hashed the key fewer times: every call has failed once
        else:
            pytest.fail(f"the key's hash still raised on call {MOST_CALLS - 1} of one {step}")


@pytest.mark.clause("CLOSE-5", "FLUSH-5", "ADD-5", "KEY-1")
@pytest.mark.parametrize("step", ["flush", "read"])
def test_a_gather_interrupted_while_combining_keeps_every_keys_pieces_in_order_under_its_first_key(
    make: Factory, step: str
) -> None:
    # Keys 1 and 0 each have three pieces: this thread's first value, which a read put in a
    # shared place and another thread's add then took (with its own value), this thread's
    # newer value (added as 1.0 and 0.0) and a third thread's (added as True and False).
    # The first merge that combines them raises an Interrupt: whichever key it was, the
    # other one's pieces were still waiting to be combined. Both keys come out whole, this
    # thread's values in order, under the key objects added first, 1 and 0 (KEY-1).
    trip = {"on": False}

    def merge(stored: list[str], incoming: list[str]) -> list[str]:
        if trip["on"]:
            trip["on"] = False
            raise Interrupt
        return stored + incoming

    agg = make(merge)
    keys = {1: (1, 1.0, True), 0: (0, 0.0, False)}  # each key: first, newer, newest object
    with ThreadPoolExecutor(1) as taker, ThreadPoolExecutor(1) as third:
        taker.submit(agg.add, "other", ["o"]).result(30)  # the taker is the first writer thread
        for name, (first, _, _) in keys.items():
            agg.add(first, [f"a{name}"])
        agg.snapshot()  # a backend with partials moves the records to a shared place
        for name, (_, newer, _) in keys.items():
            taker.submit(agg.add, newer, [f"b{name}"]).result(30)  # merges into the record read
        for name, (_, newer, newest) in keys.items():
            agg.add(newer, [f"c{name}"])
            third.submit(agg.add, newest, [f"d{name}"]).result(30)
    trip["on"] = True
    stopped = _run(step, agg)
    interrupted = not trip["on"]
    trip["on"] = False
    if step == "flush":
        assert isinstance(stopped, Interrupt) == interrupted, f"the flush raised {stopped!r}"
    records = _delivered_in_order(agg)
    assert [key for key, _ in records if key != "other" and type(key) is not int] == [], (
        f"KEY-1: 1 and 0 were added first; delivered {records}"
    )
    assert _values(records, "other") == ["o"], records
    for name in keys:
        values = _values(records, name)
        assert sorted(values) == [f"{v}{name}" for v in "abcd"], f"key {name}: delivered {records}"
        mine = [v for v in values if v in (f"a{name}", f"c{name}")]
        assert mine == [f"a{name}", f"c{name}"], f"this thread added a{name} then c{name}: {records}"


@pytest.mark.clause("CLOSE-5", "ADD-4", "READ-1")
@pytest.mark.parametrize("error", [Interrupt, ValueError], ids=["interrupt", "value-error"])
def test_an_add_whose_key_hash_raises_after_a_read_loses_nothing(
    make: Factory, error: type[BaseException]
) -> None:
    # A read first (a backend with partials moves the record to a shared place, and the
    # next add takes it back): the add's key hash raises on its n-th call, for every n.
    # An add that raises stores nothing and leaves the record as it was; one that returns
    # stored its value. Either way the record read is still there, exactly once.
    for call in range(1, MOST_CALLS):
        agg = make(concat)
        key = CountdownKey("k")
        agg.add(key, ["first"])
        agg.add("other", ["o"])
        assert agg.get(key) == ["first"]
        key.arm(call, error=error)
        try:
            agg.add(key, ["second"])
            added = ["second"]
        except error:
            added = []
        raised = key.disarm()
        assert raised or added, f"hash call {call}: add raised though the hash did not"
        assert agg.get(key) == ["first", *added], f"hash call {call}: read after the add"
        delivered = shutdown_collecting(agg, concat)
        assert delivered == {key: ["first", *added], "other": ["o"]}, f"hash call {call}: {delivered}"
        if not raised:
            break  # the add hashed the key fewer times: every call has failed once
    else:
        pytest.fail(f"the key's hash still raised on call {MOST_CALLS - 1} of one add")


@pytest.mark.clause("ADD-4", "STAT-1")
@pytest.mark.parametrize("error", [ValueError, Interrupt])
def test_an_add_whose_key_hash_raises_at_any_call_changes_no_counter(
    make: Factory, error: type[BaseException]
) -> None:
    # The hash may fail at its first call (looking the key up) or a later one (storing it): either
    # way the add raised, so nothing is stored and no counter moves (ADD-4, STAT-1).
    for call in range(1, 6):
        agg = make()
        agg.add("other", 1)
        key = CountdownKey("k")
        key.arm(call, error=error)
        try:
            stored = agg.add(key, 1)
        except error:
            stored = None
        raised = key.disarm()
        stats = agg.stats()
        if raised:
            assert stored is None
            assert (stats.adds, stats.merges, stats.stored) == (1, 0, 1), (call, stats)
            assert len(agg) == 1, call
            assert shutdown_collecting(agg) == {"other": 1}
        else:  # the add made fewer hash calls than ``call``: it stored the key
            assert stored is False
            assert (stats.adds, stats.stored) == (2, 2), (call, stats)
            assert shutdown_collecting(agg) == {"other": 1, key: 1}
