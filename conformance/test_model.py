"""A hypothesis state machine: random add/flush/drain/get/snapshot/len/shutdown against a plain-dict model.

The flusher is off, so every step is deterministic apart from which records a
flush hands off when the output has room for only some of them; the model
learns that choice from the aggregator and checks everything else.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import aggregator_reference as ar

from .conftest import close_quietly


class Boom(Exception):
    """What the model's merge raises for a value containing ``"boom"``."""


def merge(stored: tuple[Any, ...], incoming: tuple[Any, ...]) -> tuple[Any, ...]:
    """Concatenation: not commutative, so a wrong argument order shows."""
    if "boom" in incoming:
        raise Boom(incoming)
    return stored + incoming


# Keys that collide as dict keys (1, 1.0, True; 0, 0.0, -0.0) and keys that do not.
KEYS = st.sampled_from([0, 1, 1.0, True, 2, "a", "b", (1, 2), 0.0, -0.0, None, frozenset({1})])
VALUES = st.tuples(st.integers(0, 9)) | st.just(("boom",))
MISSING = object()


def keyed(records: dict[Any, Any]) -> list[tuple[str, Any]]:
    """Records by ``repr`` of the key, so that ``1`` and ``True`` count as different objects."""
    return sorted((repr(k), v) for k, v in records.items())


class AggregatorMachine(RuleBasedStateMachine):
    backend_name: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.agg: Any = None
        self.buffer: dict[Any, Any] = {}
        self.batches: list[list[tuple[Any, Any]]] = []  # the output: FIFO of unordered flush batches
        self.shutting = self.closed = False
        self.merges = self.stored = self.flushed = 0

    @initialize(max_pending=st.integers(1, 6))
    def create(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.agg = ar.create(merge, backend=self.backend_name, flush_interval=None, max_pending=max_pending)

    def pending(self) -> int:
        return sum(map(len, self.batches))

    @rule(key=KEYS, value=VALUES)
    def add(self, key: Any, value: Any) -> None:
        self.check_add(key, value)

    @precondition(lambda self: bool(self.buffer))
    @rule(data=st.data(), value=VALUES)
    def add_buffered(self, data: st.DataObject, value: Any) -> None:
        """Merge into a record the model says is buffered (a re-queued one, often)."""
        self.check_add(data.draw(st.sampled_from(sorted(self.buffer, key=repr))), value)

    def check_add(self, key: Any, value: Any) -> None:
        if self.shutting:
            with pytest.raises(ar.AggregatorClosedError):
                self.agg.add(key, value)
        elif key in self.buffer:
            try:
                merged = merge(self.buffer[key], value)
            except Boom:
                with pytest.raises(Boom):
                    self.agg.add(key, value)
                return
            assert self.agg.add(key, value) is True
            self.buffer[key] = merged
            self.merges += 1
        else:
            assert self.agg.add(key, value) is False
            self.buffer[key] = value
            self.stored += 1

    @rule(key=st.sampled_from([[1], {"a": 1}, {1}]))
    def add_unhashable(self, key: Any) -> None:
        with pytest.raises((TypeError, ar.AggregatorClosedError)):
            self.agg.add(key, (1,))

    def learn_flush(self) -> int:
        """Update the model after a flush: what left the buffer went to the output as one batch."""
        remaining = self.agg.snapshot()
        for key, value in remaining.items():
            assert key in self.buffer
            assert self.buffer[key] == value
        moved = [(k, v) for k, v in self.buffer.items() if k not in remaining]
        self.buffer = {k: v for k, v in self.buffer.items() if k in remaining}
        if moved:
            self.batches.append(moved)
        self.flushed += len(moved)
        return len(moved)

    @rule()
    def flush(self) -> None:
        if self.shutting:
            with pytest.raises(ar.AggregatorClosedError):
                self.agg.flush()
            return
        expected = min(len(self.buffer), self.max_pending - self.pending())
        assert self.agg.flush() == expected
        assert self.learn_flush() == expected

    @rule(data=st.data(), value=VALUES)
    def flush_and_drain(self, data: st.DataObject, value: Any) -> None:
        """Flush, then learn what moved from the output alone: no read between flushes.

        Reads may reorganise a backend's records (per-thread partials), so this
        step is how the model checks adds that follow a re-queue without a read.
        """
        if self.shutting:
            return
        expected = min(len(self.buffer), self.max_pending - self.pending())
        assert self.agg.flush() == expected
        got = self.agg.drain()
        assert len(got) == self.pending() + expected
        older = [pair for batch in self.batches for pair in batch]
        self.batches = []
        for key, record in got[: len(older)]:
            assert any(repr(k) == repr(key) and v == record for k, v in older)
        moved = got[len(older) :]
        for key, record in moved:
            assert key in self.buffer, f"{key!r} was flushed but never buffered"
            assert repr(key) in {repr(k) for k in self.buffer if k == key}, "KEY-1: not the first key"
            assert self.buffer[key] == record
            del self.buffer[key]
        self.flushed += len(moved)
        if self.buffer:  # then add to a re-queued record, still without a read
            self.check_add(data.draw(st.sampled_from(sorted(self.buffer, key=repr))), value)

    @rule(limit=st.none() | st.integers(0, 4))
    def drain(self, limit: int | None) -> None:
        expected = self.pending() if limit is None else min(limit, self.pending())
        got = self.agg.drain(limit)
        assert len(got) == expected
        for key, value in got:
            batch = self.batches[0]
            match = next(i for i, (k, v) in enumerate(batch) if repr(k) == repr(key) and v == value)
            batch.pop(match)
            if not batch:
                self.batches.pop(0)

    @rule(key=KEYS)
    def get(self, key: Any) -> None:
        assert self.agg.get(key, MISSING) == self.buffer.get(key, MISSING)

    @precondition(lambda self: not self.closed)
    @rule()
    def shutdown(self) -> None:
        fits = len(self.buffer) <= self.max_pending - self.pending()
        if fits:
            self.agg.shutdown(timeout=10)
        else:
            with pytest.raises(TimeoutError):
                self.agg.shutdown(timeout=0)
        self.shutting = True
        self.learn_flush()
        self.closed = fits

    @rule()
    def reads_match_model(self) -> None:
        """A rule, not an invariant: a read after every step would hide what reads repair."""
        snapshot = self.agg.snapshot()
        assert keyed(snapshot) == keyed(self.buffer)
        assert len(self.agg) == len(self.buffer)

    @invariant()
    def matches_model(self) -> None:
        if self.agg is None:
            return
        assert self.agg.pending == self.pending() <= self.max_pending
        assert self.agg.closed == self.closed
        stats = self.agg.stats()
        assert (stats.adds, stats.merges, stats.stored) == (
            self.merges + self.stored,
            self.merges,
            self.stored,
        )
        assert stats.flushed == self.flushed

    def teardown(self) -> None:
        if self.agg is not None:
            close_quietly(self.agg)


@pytest.mark.clause(
    "KEY-1",
    "ADD-1",
    "ADD-2",
    "ADD-3",
    "ADD-4",
    "FLUSH-1",
    "FLUSH-2",
    "OUT-1",
    "OUT-3",
    "OUT-4",
    "READ-1",
    "CLOSE-2",
    "CLOSE-4",
    "STAT-1",
)
def test_aggregator_matches_the_dict_model(backend_name: str) -> None:
    machine = type("AggregatorMachine", (AggregatorMachine,), {"backend_name": backend_name})
    run: Any = run_state_machine_as_test  # untyped in some hypothesis releases
    # The bugs this machine exists for need several steps in a row: at least 100 runs.
    run(machine, settings=settings(max_examples=max(100, settings().max_examples)))
