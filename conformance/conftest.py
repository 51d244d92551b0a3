"""Fixtures, options and checks shared by the conformance suite.

``--backend NAME`` (repeatable) restricts the run; by default every backend in
the ``aggregator_reference.backends`` entry-point group is tested.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import aggregator_reference as ar

from ._spec import contract_clauses

settings.register_profile(
    "ci",
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=100, stateful_step_count=50, deadline=None)
settings.register_profile("thorough", max_examples=1000, stateful_step_count=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

Factory = Callable[..., Any]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aggregator conformance")
    group.addoption(
        "--backend",
        action="append",
        default=[],
        metavar="NAME",
        help="test only this backend (repeatable); default: every installed backend",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "clause(*ids): the spec/CONTRACT.md clauses this test checks")


def selected_backends(config: pytest.Config) -> list[str]:
    """The backends to test, validated against the registry."""
    chosen: list[str] = config.getoption("--backend") or ar.backend_names()
    for name in chosen:
        ar.load_backend(name)  # BackendNotFoundError lists what is installed
    return chosen


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", selected_backends(metafunc.config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test cites at least one clause, and only clauses the contract defines."""
    known = contract_clauses()
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if not str(item.path).startswith(here):
            continue
        cited = [c for mark in item.iter_markers("clause") for c in mark.args]
        if not cited:
            raise pytest.UsageError(f"{item.nodeid} cites no clause (@pytest.mark.clause)")
        unknown = sorted(set(cited) - known)
        if unknown:
            raise pytest.UsageError(f"{item.nodeid} cites clauses not in CONTRACT.md: {unknown}")


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """On GIL builds, switch threads far more often so that races show (py-free-threading guide)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


def shutdown_collecting(
    aggregator: Any,
    merge: Callable[[Any, Any], Any] = operator.add,
    into: dict[Any, Any] | None = None,
) -> dict[Any, Any]:
    """Shut ``aggregator`` down while draining it; return everything delivered, folded per key."""
    delivered: dict[Any, Any] = {} if into is None else into

    def take() -> None:
        for key, value in aggregator.drain():
            delivered[key] = merge(delivered[key], value) if key in delivered else value

    while not aggregator.closed:
        take()
        try:
            aggregator.shutdown(timeout=0.05)
        except TimeoutError:
            continue
    take()
    return delivered


def close_quietly(aggregator: Any) -> None:
    """Shut ``aggregator`` down, draining whatever a test left in its output."""
    shutdown_collecting(aggregator, lambda stored, incoming: stored)


@pytest.fixture
def make(backend_name: str) -> Iterator[Factory]:
    """``make(merge=operator.add, **options)`` builds an aggregator of the backend under test.

    The flusher is off unless ``flush_interval`` is given; every aggregator is
    shut down at teardown.
    """
    created: list[Any] = []

    def factory(merge: Callable[[Any, Any], Any] = operator.add, **options: Any) -> Any:
        options.setdefault("flush_interval", None)
        aggregator = ar.create(merge, backend=backend_name, **options)
        created.append(aggregator)
        return aggregator

    yield factory
    for each in created:
        close_quietly(each)


def fold_records(
    aggregator: Any, into: dict[Any, Any], merge: Callable[[Any, Any], Any] = operator.add
) -> None:
    """Consume ``aggregator.records()`` until it ends, folding each key's values into ``into``."""
    for key, value in aggregator.records():
        into[key] = merge(into[key], value) if key in into else value


def run_threads(count: int, target: Callable[[int], object], *, timeout: float = 120.0) -> None:
    """Run ``target(i)`` in ``count`` threads started together on a barrier; re-raise the first error."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            barrier.wait()
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), "a thread did not finish in time: deadlock?"
    if errors:
        raise errors[0]
