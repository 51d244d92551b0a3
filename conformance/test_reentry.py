"""Calls from inside merge: REENTRY-1."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import Factory

CALLS: dict[str, Callable[[Any], Any]] = {
    "add same key": lambda agg: agg.add("k", 100),
    "add other key": lambda agg: agg.add("other", 100),
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
    agg.add("k", 1)
    agg.add("other", 1)
    with pytest.raises(ar.ReentrantMergeError):
        run_with_timeout(lambda: agg.add("k", 2))
    assert agg.snapshot() == {"k": 1, "other": 1}
    # Nothing was left half-done: the aggregator still adds, flushes and shuts down.
    assert not agg.closed
    assert agg.add("k", 5) is True
    assert agg.flush() == 2
    agg.shutdown(timeout=5)
    assert sorted(agg.drain()) == [("k", 6), ("other", 1)]


@pytest.mark.clause("REENTRY-1")
def test_reads_from_merge_are_allowed(make: Factory) -> None:
    holder: dict[str, Any] = {}
    seen: list[Any] = []

    def merge(stored: int, incoming: int) -> int:
        agg = holder["agg"]
        seen.append((agg.get("k"), len(agg), dict(agg.snapshot()), agg.pending, agg.stats().adds))
        return stored + incoming

    agg = holder["agg"] = make(merge)
    agg.add("k", 1)
    assert run_with_timeout(lambda: agg.add("k", 2)) is True
    assert seen == [(1, 1, {"k": 1}, 0, 1)]
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
            holder["storage"].add("x", 1)
        except ar.ReentrantMergeError as exc:
            raised.append(exc)
            raise
        return stored + incoming

    storage = holder["storage"] = factory(merge, None)
    storage.add("k", 1)
    chunks = storage.detach()
    storage.add("k", 2)
    failed = [pair for chunk in chunks for pair in storage.requeue(chunk, list(chunk.items()))]
    assert failed == [("k", 1)]  # the engine delivers these past max_pending
    assert len(raised) == 1
    assert storage.snapshot() == {"k": 2}
