"""Fixtures, options and checks shared by the conformance suite.

``--backend NAME`` (repeatable) restricts the run; by default every backend in
the ``aggregator_reference.backends`` entry-point group is tested.

A deadlock fails, never hangs: each test has a time limit (pytest-timeout,
thread method, :data:`~._timeouts.DEFAULT_TIMEOUT` seconds unless ``--timeout``
says otherwise) after which the run stops naming the test, its clauses and
every thread's stack (see ``_timeouts``); and every wait in these helpers is
bounded and fails with a message saying what it waited for (see ``_waits``).
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import aggregator_reference as ar

from . import _timeouts
from ._spec import contract_clauses
from ._waits import call_bounded, peek

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


@pytest.hookimpl(tryfirst=True)  # before pytest-timeout reads the options it defaults
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "clause(*ids): the spec/CONTRACT.md clauses this test checks")
    _timeouts.configure(config)


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    return _timeouts.set_timer(item, settings)


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    return _timeouts.cancel_timer(item)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    _timeouts.configure_worker(node)


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(report: Any) -> None:
    _timeouts.add_report_to_crash(report)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    before = set(threading.enumerate())
    try:
        return (yield)
    finally:
        _timeouts.note_threads_left(item, before)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_timeouts.EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    _timeouts.remove_reports(config)
    _timeouts.check_threads_at_exit(config, config.stash.get(_timeouts.EXIT_STATUS, 1))


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


#: Seconds the shutdown helpers keep draining and retrying before they fail.
SHUTDOWN_LIMIT = 60.0
#: Extra seconds before a call that never returns is declared wedged, so that
#: the helper's own deadline, with its fuller message, comes first.
GRACE = 5.0


class StallingMerge:
    """An ``int`` sum that, merging an incoming ``2``, sets ``entered`` and waits for ``release``.

    The merge in flight that shutdown, flush and add tests race against; it waits at most
    ``bound`` seconds, so that a test that never releases it still ends.
    """

    def __init__(self, bound: float = 10.0) -> None:
        self.entered, self.release, self.bound = threading.Event(), threading.Event(), bound

    def __call__(self, stored: int, incoming: int) -> int:
        if incoming == 2:
            self.entered.set()
            self.release.wait(self.bound)
        return stored + incoming


def describe(aggregator: Any) -> str:
    """What ``aggregator`` still holds, read without waiting on a wedged backend."""
    pending = peek(lambda: aggregator.pending)
    buffered = peek(lambda: len(aggregator))
    return f"{pending} record(s) pending in the output, {buffered} key(s) buffered"


def shutdown_collecting(
    aggregator: Any,
    merge: Callable[[Any, Any], Any] = operator.add,
    into: dict[Any, Any] | None = None,
    *,
    limit: float = SHUTDOWN_LIMIT,
) -> dict[Any, Any]:
    """Shut ``aggregator`` down while draining it; return everything delivered, folded per key.

    Raises ``AssertionError`` saying what is still pending and buffered when it
    is not shut down after ``limit`` seconds, or when a call into it does not
    return (the calls run in a daemon thread, so a wedged lock fails too).
    """
    delivered: dict[Any, Any] = {} if into is None else into
    name = type(aggregator).__name__
    deadline = time.monotonic() + limit

    def take() -> None:
        for key, value in aggregator.drain():
            delivered[key] = merge(delivered[key], value) if key in delivered else value

    def until_closed() -> None:
        while not aggregator.closed:
            take()
            try:
                aggregator.shutdown(timeout=0.05)
            except TimeoutError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{name} still not shut down after {limit:g} s of draining and calling "
                        f"shutdown(): {describe(aggregator)}; the last shutdown() said: {exc}"
                    ) from exc
        take()

    call_bounded(until_closed, limit + GRACE, f"shutdown() of {name}", state=lambda: describe(aggregator))
    return delivered


def close_quietly(aggregator: Any, *, limit: float = SHUTDOWN_LIMIT) -> None:
    """Shut ``aggregator`` down, dropping what a test left in its output; bounded like the above."""
    shutdown_collecting(aggregator, lambda stored, incoming: stored, limit=limit)


@pytest.fixture
def make(backend_name: str) -> Iterator[Factory]:
    """``make(merge=operator.add, **options)`` builds an aggregator of the backend under test.

    The flusher is off unless ``flush_interval`` is given; every aggregator is
    shut down at teardown, which fails (instead of hanging) for one that
    does not shut down within :data:`SHUTDOWN_LIMIT` seconds.
    """
    created: list[Any] = []

    def factory(merge: Callable[[Any, Any], Any] = operator.add, **options: Any) -> Any:
        options.setdefault("flush_interval", None)
        aggregator = ar.create(merge, backend=backend_name, **options)
        created.append(aggregator)
        return aggregator

    yield factory
    stuck: list[str] = []
    for each in created:
        try:
            close_quietly(each)
        except AssertionError as exc:
            stuck.append(str(exc))
    if stuck:
        pytest.fail(
            f"teardown could not shut down {len(stuck)} of {len(created)} aggregator(s):\n"
            + "\n".join(stuck),
            pytrace=False,
        )


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
