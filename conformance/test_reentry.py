"""Calls from inside merge: REENTRY-1."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import Factory, shutdown_collecting

CALLS: dict[str, Callable[[Any], Any]] = {
    "add same key": lambda agg: agg.add("k", 100),
    "flush": lambda agg: agg.flush(),
    "shutdown": lambda agg: agg.shutdown(timeout=1),
}


def run_with_timeout(target: Callable[[], Any], seconds: float = 20) -> Any:
    """Run ``target`` in a thread so that a deadlock fails the test instead of hanging it."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["value"] = target()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlock: the call never returned"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


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
        with pytest.raises(ar.ReentrantMergeError):
            agg.add("k", 2)

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
