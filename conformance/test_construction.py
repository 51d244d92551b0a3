"""Construction, statistics and the registry: ARG-1, STAT-1, REG-1, REG-2."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import Factory

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
    if "freethreaded" in ar.backend_names():  # first in both preference orders
        assert name == "freethreaded"
    elif ar.gil_enabled():
        first = [b for b in ("reference", "sharded", "striped") if b in ar.backend_names()]
        assert name == (first[0] if first else name)
    agg: Any = ar.create(operator.add, flush_interval=None)
    try:
        assert type(agg) is ar.load_backend(name)
    finally:
        agg.shutdown()
