"""A flush re-queues records into keys that a read split while it held them: FLUSH-2, FLUSH-5, FLUSH-6, KEY-1.

On a backend with per-thread partial records a read may split a key's record
in two (FLUSH-6) while a flush holds an older record of that key; the flush's
re-queue then meets the key's halves. A backend with one record per key splits
nothing, and these tests check the simpler outcome there.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from .conftest import Factory
from .test_partials import Interrupt, _HoldIn


class RaisingConcat:
    """A merge that concatenates lists, and raises ``error`` (an exception class) while it is set."""

    def __init__(self) -> None:
        self.error: type[BaseException] | None = None

    def __call__(self, stored: list[str], incoming: list[str]) -> list[str]:
        if self.error is not None:
            raise self.error("cannot combine")
        return stored + incoming


@dataclass
class _Held:
    """What :func:`_requeue_after_a_split` saw."""

    split: bool  # the backend keeps per-thread partials: the read split the keys
    raised: BaseException | None  # what the held flush raised
    held_out: list[tuple[Any, Any]]  # the output right after that flush
    later: list[list[tuple[Any, Any]]]  # what each later flush delivered, in order
    added: list[tuple[Any, str]] = field(default_factory=list)  # every value accepted, this thread's in order

    def delivered(self) -> list[tuple[Any, Any]]:
        return [record for records in (self.held_out, *self.later) for record in records]


def _requeue_after_a_split(
    make: Factory,
    held: list[tuple[object, str]],
    split: list[tuple[object, str, str]],
    requeue_error: type[BaseException] | None = None,
) -> _Held:
    """A flush holds ``held`` (the output is full: it re-queues them) while a read splits ``split``'s keys.

    A variant of ``test_partials._split_while_a_flush_holds`` for several keys,
    a merge that may raise ``Interrupt`` and a flush that may raise. For each
    ``(key, mine, other)`` of ``split``, this thread adds ``mine`` and another
    thread ``other`` while the flush is held, then a read runs while merges
    raise ``ValueError``: a backend with per-thread partials splits each such
    key there (FLUSH-6). The flush is held inside a log call: it logs when it
    delivers an older split half (of key ``x``) past ``max_pending``, made
    beforehand for that. While the flush then re-queues, merges raise
    ``requeue_error``. A backend with one record per key splits nothing and
    gets the ``split`` values after the flush.
    """
    merge = RaisingConcat()
    added: list[tuple[Any, str]] = []
    raised: list[BaseException] = []

    def add(pool: ThreadPoolExecutor | None, key: object, value: str) -> None:
        try:
            if pool is None:
                agg.add(key, [value])
            else:
                pool.submit(agg.add, key, [value]).result(30)
        except ValueError:
            return  # one record per key: add merged, and raised (ADD-4)
        added.append((key, value))

    def flush() -> None:
        try:
            agg.flush()
        except BaseException as exc:  # what the held flush raised is checked
            raised.append(exc)

    agg = make(merge, max_pending=1)
    hold = _HoldIn("flusher-under-test")
    ar_logger = logging.getLogger("aggregator_reference")
    with ThreadPoolExecutor(1) as other:
        add(None, "fill", "f")
        agg.flush()  # the output is full from now on
        add(None, "x", "x1")
        merge.error = ValueError
        add(other, "x", "x2")
        agg.snapshot()  # a backend with partials splits x here: x1 waits to go out first
        merge.error = None
        splits = agg.stats().flush_errors > 0
        for key, value in held:
            add(None, key, value)
        ar_logger.addHandler(hold)
        try:
            flusher = threading.Thread(target=flush, name="flusher-under-test", daemon=True)
            flusher.start()  # takes held out, delivers x1 past max_pending (logged), then re-queues held
            if splits:
                assert hold.inside.wait(30), "the flush logged nothing about the split it delivers"
                for key, mine, theirs in split:
                    add(None, key, mine)  # newer than what the flush holds, from the same thread
                    add(other, key, theirs)
                merge.error = ValueError
                agg.snapshot()  # splits each key of split while the flush still holds its records
                merge.error = requeue_error
            hold.go.set()
            flusher.join(30)
            assert not flusher.is_alive(), "the flush did not return"
        finally:
            ar_logger.removeHandler(hold)
            hold.go.set()
            merge.error = None
        if not splits:
            for key, mine, theirs in split:
                add(None, key, mine)
                add(other, key, theirs)
    outcome = _Held(splits, raised[0] if raised else None, agg.drain(), [], added)
    while agg.pending or len(agg):
        agg.flush()
        outcome.later.append(agg.drain())
    return outcome


def _folded(records: list[tuple[Any, Any]]) -> dict[Any, list[str]]:
    """Every value of each key, sorted; keys grouped as a dict groups them (KEY-1)."""
    folded: dict[Any, list[str]] = {}
    for key, values in records:
        folded.setdefault(key, []).extend(values)
    return {key: sorted(values) for key, values in folded.items()}


def _assert_nothing_lost(seen: _Held) -> None:
    """CLOSE-5: each value accepted is delivered exactly once, under its key."""
    expected = _folded([(key, [value]) for key, value in seen.added])
    assert _folded(seen.delivered()) == expected, f"delivered {seen.delivered()}"


def _in_delivery_order(seen: _Held, key: object, values: list[str]) -> list[str]:
    """Which of ``values`` were delivered for ``key`` (as a dict matches it), in delivery order."""
    probe = {key: None}
    return [v for stored, value in seen.delivered() if stored in probe for v in value if v in values]


@pytest.mark.clause("FLUSH-2", "FLUSH-5", "FLUSH-6", "CLOSE-5", "ADD-5")
@pytest.mark.parametrize(
    "requeue_error", [None, ValueError, Interrupt], ids=["merges", "merge-raises", "merge-interrupted"]
)
def test_a_flush_requeueing_into_two_split_keys_loses_no_half(
    make: Factory, requeue_error: type[BaseException] | None
) -> None:
    # The read splits k and m while the flush holds k: a; a merges into k's older half (FLUSH-2),
    # goes ahead of it if that merge raises, and an Interrupt stops the flush after it delivered
    # what it had not settled (FLUSH-5). No half of either split key may be lost on the way.
    seen = _requeue_after_a_split(make, [("k", "a")], [("k", "b", "c"), ("m", "mb", "mc")], requeue_error)
    _assert_nothing_lost(seen)
    mine = _in_delivery_order(seen, "k", ["a", "b"])
    assert mine == ["a", "b"], f"this thread added a then b to k; delivered {seen.delivered()}"
    if seen.split and requeue_error is Interrupt:
        assert isinstance(seen.raised, Interrupt), f"the flush raised {seen.raised!r}, not the Interrupt"
    else:
        assert seen.raised is None, f"the flush raised {seen.raised!r}"


@pytest.mark.clause("OUT-1", "FLUSH-5", "FLUSH-2", "CLOSE-5")
def test_a_merge_raising_into_a_split_half_keeps_the_flushs_other_keys_within_max_pending(
    make: Factory,
) -> None:
    # The flush holds k: a and then z: za; the merge of a into k's older half raises. Only k's
    # record may come out past max_pending for it (FLUSH-5): z is re-queued like any other.
    seen = _requeue_after_a_split(make, [("k", "a"), ("z", "za")], [("k", "b", "c")], ValueError)
    assert [record for record in seen.held_out if record[0] == "z"] == [], (
        f"z went out past max_pending: {seen.held_out}"
    )
    _assert_nothing_lost(seen)
    assert seen.raised is None, f"the flush raised {seen.raised!r}"


@pytest.mark.clause("KEY-1", "FLUSH-2", "FLUSH-6", "ADD-5")
def test_a_record_requeued_into_an_equal_but_distinct_split_key_merges_into_its_older_half(
    make: Factory,
) -> None:
    # 1 and 1.0 are one key (KEY-1): the flush's 1: a is older than the 1.0 this thread adds
    # afterwards, and goes out first, under the key added first.
    seen = _requeue_after_a_split(make, [(1, "a")], [(1.0, "b", "c")])
    _assert_nothing_lost(seen)
    mine = _in_delivery_order(seen, 1, ["a", "b"])
    assert mine == ["a", "b"], f"this thread added a then b to 1; delivered {seen.delivered()}"
    keys = [type(key) for key, value in seen.delivered() if "a" in value]
    assert keys == [int], f"the record of a is not under the key 1 added first: {seen.delivered()}"


@pytest.mark.clause("KEY-1", "FLUSH-2", "CLOSE-5")
def test_a_record_requeued_never_merges_into_another_keys_split_half(make: Factory) -> None:
    # The read splits z while the flush holds k: a (and x, split before): a and x2 are re-queued
    # under their own keys, never merged into z's half.
    seen = _requeue_after_a_split(make, [("k", "a")], [("z", "b", "c")])
    _assert_nothing_lost(seen)
