"""Construction, statistics and the registry: ARG-1, STAT-1, REG-1, REG-2."""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import time
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import Factory, shutdown_collecting
from .test_flush import GatedKey

BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"merge": 42}, TypeError, "merge"),
    ({"merge": None}, TypeError, "merge"),
    ({"flush_interval": 0}, ValueError, "flush_interval"),
    ({"flush_interval": -1}, ValueError, "flush_interval"),
    ({"flush_interval": float("nan")}, ValueError, "flush_interval"),
    ({"flush_interval": float("inf")}, ValueError, "flush_interval"),
    ({"flush_interval": 1e300}, ValueError, "flush_interval"),  # past threading.TIMEOUT_MAX
    ({"flush_interval": "1"}, TypeError, "flush_interval"),
    ({"flush_interval": True}, TypeError, "flush_interval"),
    ({"max_pending": 0}, ValueError, "max_pending"),
    ({"max_pending": 1.5}, TypeError, "max_pending"),
    ({"max_pending": "8"}, TypeError, "max_pending"),
    ({"shards": 0}, ValueError, "shards"),
    ({"shards": 3}, ValueError, "shards"),
    ({"shards": -4}, ValueError, "shards"),
    ({"shards": 5}, ValueError, "shards"),
    ({"shards": 9}, ValueError, "shards"),
    ({"shards": 12}, ValueError, "shards"),
    ({"shards": 2.0}, TypeError, "shards"),
    ({"max_buffered": 0}, ValueError, "max_buffered"),
    ({"max_buffered": -1}, ValueError, "max_buffered"),
    ({"max_buffered": 2.5}, TypeError, "max_buffered"),
    ({"max_buffered": "3"}, TypeError, "max_buffered"),
    ({"max_buffered": True}, TypeError, "max_buffered"),
    ({"flush_at": 0}, ValueError, "flush_at"),
    ({"flush_at": -1}, ValueError, "flush_at"),
    ({"flush_at": 2.5}, TypeError, "flush_at"),
    ({"flush_at": "5"}, TypeError, "flush_at"),
    ({"flush_at": True}, TypeError, "flush_at"),
    ({"max_block": -1}, ValueError, "max_block"),
    ({"max_block": float("nan")}, ValueError, "max_block"),
    ({"max_block": float("inf")}, ValueError, "max_block"),
    ({"max_block": "1"}, TypeError, "max_block"),
    ({"max_block": None}, TypeError, "max_block"),
    ({"max_block": True}, TypeError, "max_block"),
]


@pytest.mark.clause("ARG-1")
@pytest.mark.parametrize(("arguments", "error", "name"), BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(
    backend_name: str, arguments: dict[str, Any], error: type[Exception], name: str
) -> None:
    arguments = dict(arguments)
    merge = arguments.pop("merge", operator.add)
    with pytest.raises(error, match=name):
        ar.create(merge, backend=backend_name, **arguments)


@pytest.mark.clause("ARG-1")
@pytest.mark.parametrize("shards", [1, 2, 8, 64])
def test_valid_shard_hints_are_accepted(make: Factory, shards: int) -> None:
    agg = make(operator.add, shards=shards)
    assert isinstance(agg.shards, int)
    assert agg.shards >= 1
    agg.add("a", 1)
    assert agg.get("a") == 1


@pytest.mark.clause("STAT-1")
def test_stats_is_frozen_and_consistent(make: Factory) -> None:
    agg = make(operator.add, max_pending=1)
    stats = agg.stats()
    assert dataclasses.is_dataclass(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(stats, "adds", 5)  # noqa: B010
    for i in range(3):
        agg.add(i, 1)
    agg.add(0, 1)
    agg.flush()
    stats = agg.stats()
    assert stats.adds == stats.merges + stats.stored == 4
    assert (stats.merges, stats.stored) == (1, 3)
    assert (stats.flushed, stats.requeued, stats.flushes) == (1, 2, 1)
    assert (stats.ticks_skipped, stats.overflowed, stats.flush_errors) == (0, 0, 0)
    for field in dataclasses.fields(ar.Stats):
        assert getattr(stats, field.name) >= 0


@pytest.mark.clause("REG-1")
def test_backend_is_registered_and_loadable(backend_name: str) -> None:
    names = ar.backend_names()
    assert names == sorted(names)
    assert backend_name in names
    cls = ar.load_backend(backend_name)
    agg = cls(operator.add, flush_interval=None, max_pending=4, shards=None)
    try:
        assert isinstance(agg, ar.Aggregator)
        assert agg.add("a", 1) is False
    finally:
        agg.shutdown()


@pytest.mark.clause("REG-1")
@pytest.mark.parametrize("positional", [(None,), (None, 4), (None, 4, None)])
def test_backend_class_takes_its_options_by_keyword_only(
    backend_name: str, positional: tuple[object, ...]
) -> None:
    cls = ar.load_backend(backend_name)
    with pytest.raises(TypeError):
        cls(operator.add, *positional)


@pytest.mark.clause("REG-1")
def test_unknown_backend_lists_the_installed_ones() -> None:
    with pytest.raises(ar.BackendNotFoundError) as caught:
        ar.create(operator.add, backend="no-such-backend")
    assert isinstance(caught.value, LookupError)
    for name in ar.backend_names():
        assert name in str(caught.value)


@pytest.mark.clause("REG-2")
def test_environment_variable_chooses_the_backend(backend_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_BACKEND", backend_name)
    agg: Any = ar.create(operator.add, flush_interval=None)
    try:
        assert type(agg) is ar.load_backend(backend_name)
    finally:
        agg.shutdown()
    monkeypatch.setenv("AGGREGATOR_BACKEND", "no-such-backend")
    with pytest.raises(ar.BackendNotFoundError):
        ar.create(operator.add)


@pytest.mark.clause("REG-2")
def test_default_backend_follows_the_gil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGGREGATOR_BACKEND", raising=False)
    name = ar.default_backend()
    assert name in ar.backend_names()
    first_of_both = [b for b in ("native", "freethreaded") if b in ar.backend_names()]
    if first_of_both:  # first in both preference orders
        assert name == first_of_both[0]
    elif ar.gil_enabled():
        first = [b for b in ("reference", "sharded", "striped") if b in ar.backend_names()]
        assert name == (first[0] if first else name)
    agg: Any = ar.create(operator.add, flush_interval=None)
    try:
        assert type(agg) is ar.load_backend(name)
    finally:
        agg.shutdown()


@pytest.mark.clause("STAT-1", "FLUSH-4")
def test_ticks_skipped_counts_each_skipped_tick_once(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aggregator_reference")
    entered, release = threading.Event(), threading.Event()
    agg = make(operator.add, flush_interval=0.002, max_pending=1)
    agg.add(GatedKey("first", entered, release), 1)
    agg.add(GatedKey("second", entered, release), 1)
    # One record reaches the output, which is then full; the other is re-queued, its key hashed.
    stalled = threading.Thread(target=agg.flush, daemon=True)
    GatedKey.block_in = stalled
    try:
        stalled.start()
        assert entered.wait(10), "the manual flush never re-queued the key"
        deadline = time.monotonic() + 10
        while agg.stats().ticks_skipped < 3:
            assert time.monotonic() < deadline, "no periodic tick was skipped"
            time.sleep(0.002)
    finally:
        release.set()
        GatedKey.block_in = None
    stalled.join(10)
    assert not stalled.is_alive(), "a thread of the test did not finish: deadlock?"
    shutdown_collecting(agg)  # stops the flusher: no tick runs after this
    logged = [
        r
        for r in caplog.records
        if r.name == "aggregator_reference" and r.levelno == logging.DEBUG and "skipped" in r.getMessage()
    ]
    assert agg.stats().ticks_skipped == len(logged)


class Interrupt(BaseException):
    """Stands for ``KeyboardInterrupt``: a ``BaseException`` that is not an ``Exception``."""


class InterruptingKey:
    """A key whose ``__hash__`` raises :class:`Interrupt` once, in a thread other than the main one."""

    armed = False

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        if InterruptingKey.armed and threading.current_thread() is not threading.main_thread():
            InterruptingKey.armed = False
            raise Interrupt(f"hash of {self.name}")
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InterruptingKey) and other.name == self.name


@pytest.mark.clause("STAT-1", "FLUSH-5")
def test_flush_errors_counts_each_error_a_flush_logged(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    agg = make(operator.add, flush_interval=0.002, max_pending=1)
    agg.add("filler", 1)
    deadline = time.monotonic() + 10
    while agg.pending == 0:
        assert time.monotonic() < deadline, "the periodic flusher never ran"
        time.sleep(0.001)
    agg.add(InterruptingKey("interrupted"), 10)
    InterruptingKey.armed = True  # the next tick re-queues the key; its hash raises there
    try:
        while InterruptingKey.armed:
            assert time.monotonic() < deadline, "no tick hashed the key"
            time.sleep(0.001)
    finally:
        InterruptingKey.armed = False
    shutdown_collecting(agg)  # stops the flusher: no tick runs after this
    errors = [r for r in caplog.records if r.name == "aggregator_reference" and r.levelno >= logging.ERROR]
    assert errors, "the failed flush logged no error"
    assert agg.stats().flush_errors == len(errors)
