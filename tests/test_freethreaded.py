"""White-box order checks of the freethreaded storage: ADD-5 across re-queues, reads and takes from home.

A read or an add can run in the window between a flush's detach and its
re-queue; these tests open that window deterministically by running them from
a logging handler that the flush calls there (when it delivers the older half
of a split record past ``max_pending``). The conformance suite checks the same
order statistically through the public API (test_add.py). Each test runs on
``freethreaded`` and on ``native``, which reuses its storage around a compiled ``add``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aggregator_freethreaded import FreeThreadedAggregator

from aggregator_reference import AggregatorClosedError

from .conftest import fork_while_held, native_or_skip


def merge(stored: list[Any], incoming: list[Any]) -> list[Any]:
    if incoming and incoming[0] == "boom":
        raise ValueError("boom")
    return stored + incoming


class Window(logging.Handler):
    """Runs ``action`` once, from inside the flush, when the split's older half goes out."""

    def __init__(self) -> None:
        super().__init__()
        self.action: Callable[[], None] | None = None
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.action is not None and not self.fired and "past max_pending" in record.getMessage():
            self.fired = True
            self.action()


@pytest.fixture(params=["freethreaded", "native"])
def aggregator_class(request: pytest.FixtureRequest) -> Any:
    """The backend under test: its aggregator class."""
    return FreeThreadedAggregator if request.param == "freethreaded" else native_or_skip().NativeAggregator


@pytest.fixture
def window() -> Iterator[Window]:
    handler = Window()
    log = logging.getLogger("aggregator_reference")
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)


def run(
    scenario: Callable[[Any, list[ThreadPoolExecutor]], None], window: Window, aggregator_class: Any
) -> list[int]:
    """Thread A's sequence numbers for key "k", in delivery order."""
    agg: Any = aggregator_class(merge, flush_interval=None, max_pending=1)
    pools = [ThreadPoolExecutor(1) for _ in range(3)]
    a, b, _ = pools
    try:
        a.submit(agg.add, "dummy", [("A", 0)]).result()
        agg.flush()  # the output is full from now on
        a.submit(agg.add, "k", [("A", 1)]).result()
        a.submit(agg.add, "o", [("A", 9)]).result()
        b.submit(agg.add, "o", ["boom"]).result()  # combining "o" fails: a split, delivered past max_pending
        window.action = lambda: scenario(agg, pools)
        agg.flush()  # the split goes out; the gathered chunk ("k": A1) is re-queued after the window
        assert window.fired
        b.submit(agg.add, "k", [("B", 1)]).result()
        got = agg.drain()
        for _ in range(10):
            agg.flush()
            got += agg.drain()
        agg.shutdown(timeout=5)
        got += agg.drain()
    finally:
        for pool in pools:
            pool.shutdown()
    return [i for key, value in got if key == "k" for thread, i in value if thread == "A"]


def test_two_takes_from_home_keep_a_threads_order(window: Window, aggregator_class: Any) -> None:
    def scenario(agg: Any, pools: list[ThreadPoolExecutor]) -> None:
        a, _, c = pools
        a.submit(agg.add, "k", [("A", 2)]).result()
        c.submit(agg.get, "k").result()  # a read moves A2 home
        a.submit(agg.add, "k", [("A", 3)]).result()  # A takes it back; then A1 is re-queued home

    assert run(scenario, window, aggregator_class) == [1, 2, 3]


def test_a_take_from_home_and_a_new_partial_keep_a_threads_order(
    window: Window, aggregator_class: Any
) -> None:
    def scenario(agg: Any, pools: list[ThreadPoolExecutor]) -> None:
        a, b, c = pools
        a.submit(agg.add, "k", [("A", 2)]).result()
        c.submit(agg.get, "k").result()  # a read moves A2 home
        b.submit(agg.add, "k", [("B", 1)]).result()  # B takes A2 from home
        a.submit(agg.add, "k", [("A", 3)]).result()  # a new partial of A

    assert run(scenario, window, aggregator_class) == [1, 2, 3]


class Interrupt(BaseException):
    """Stands for ``KeyboardInterrupt``."""


class FailingHashKey:
    """A key whose ``__hash__`` raises ``error`` at the n-th call counted over every such key."""

    calls = 0
    fail_at = 0
    error: type[BaseException] = ValueError
    failed: str | None = None  # the name of the key whose hash raised

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        FailingHashKey.calls += 1
        if FailingHashKey.calls == FailingHashKey.fail_at:
            FailingHashKey.failed = self.name
            raise FailingHashKey.error("hash fails once")
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FailingHashKey) and other.name == self.name


def failed_key() -> str | None:
    """The name of the key whose hash raised in this run (read anew: a hash call sets it)."""
    return FailingHashKey.failed


def sweep_run(fail_at: int, pools: list[ThreadPoolExecutor], aggregator_class: Any) -> list[str]:
    """Two writers, a reader and flushes over two keys; the n-th hash fails. What broke CLOSE-5."""
    FailingHashKey.calls, FailingHashKey.fail_at, FailingHashKey.failed = 0, fail_at, None
    a, b, r = pools
    agg: Any = aggregator_class(lambda x, y: x + y, flush_interval=None, max_pending=2)
    k, j = FailingHashKey("k"), FailingHashKey("j")
    added: list[tuple[str, str]] = []

    def add(pool: ThreadPoolExecutor, key: FailingHashKey, value: str) -> None:
        try:
            pool.submit(agg.add, key, (value,)).result(10)
            added.append((key.name, value))
        except (ValueError, Interrupt):
            pass

    def do(pool: ThreadPoolExecutor, call: Callable[[], object]) -> None:
        try:
            pool.submit(call).result(10)
        except (ValueError, Interrupt):
            pass

    steps: list[Callable[[], None]] = [
        lambda: add(a, k, "A0"),
        lambda: add(b, k, "B0"),
        lambda: add(a, j, "A0j"),
        lambda: do(r, lambda: agg.get(k)),
        lambda: add(b, k, "B1"),
        lambda: add(a, k, "A1"),
        lambda: do(a, agg.flush),
        lambda: add(a, k, "A2"),
        lambda: do(r, agg.snapshot),
        lambda: add(a, k, "A3"),
        lambda: add(b, k, "B2"),
        lambda: do(b, agg.flush),
        lambda: add(a, k, "A4"),
        lambda: do(r, lambda: agg.get(j)),
        lambda: add(b, j, "B0j"),
    ]
    for step in steps:
        step()
    got: list[tuple[Any, tuple[str, ...]]] = []
    for _ in range(20):
        do(a, agg.flush)
        got += agg.drain()
        if not len(agg) and not agg.pending:
            break
    FailingHashKey.fail_at = 0
    agg.shutdown(timeout=10)
    got += agg.drain()
    problems = []
    for name in ("k", "j"):
        delivered = sorted(v for key, values in got if key.name == name for v in values)
        expected = sorted(v for n, v in added if n == name)
        if delivered != expected:
            problems.append(f"fail_at={fail_at}: {name} delivered {delivered}, added {expected}")
        if name == failed_key():
            continue  # FLUSH-5: only the key whose own hash raised may lose its order
        in_order = [v for key, values in got if key.name == name for v in values]
        for thread in "AB":
            mine = [v for v in in_order if v.startswith(thread)]
            if mine != sorted(mine, key=lambda v: int(v.strip("ABj"))):
                problems.append(f"fail_at={fail_at}: {name} thread {thread} out of order: {in_order}")
    return problems


@pytest.mark.parametrize("error", [ValueError, Interrupt], ids=["Exception", "BaseException"])
def test_a_hash_failing_anywhere_loses_nothing_and_keeps_other_keys_in_order(
    error: type, aggregator_class: Any
) -> None:
    FailingHashKey.error = error
    pools = [ThreadPoolExecutor(1) for _ in range(3)]
    try:
        FailingHashKey.fail_at = 0
        problems = [p for n in range(1, 90) for p in sweep_run(n, pools, aggregator_class)]
    finally:
        for pool in pools:
            pool.shutdown()
    assert not problems, problems


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.parametrize("lock", ["_shared", "this thread's buffer lock"])
def test_a_kept_add_in_a_forked_child_refuses_without_the_lock_a_parent_thread_held(
    aggregator_class: Any, lock: str
) -> None:
    # LIFE-3: ``add = agg.add`` taken before the fork must refuse in the child, even where the
    # add would take a lock that a thread of the parent held at the fork (no thread of the
    # child will release it): ``_shared`` (registering the buffer of a thread new to the
    # storage), or the adding thread's own buffer lock (taken by adds on free-threaded builds;
    # a read or a flush in another thread holds it for a moment).
    agg: Any = aggregator_class(merge, flush_interval=None)
    add = agg.add
    if lock == "_shared":
        with ThreadPoolExecutor(1) as pool:
            pool.submit(add, "k", [1]).result()  # the main thread has no buffer in this storage
        shared = agg._storage._shared
    else:
        add("k", [1])
        shared = agg._storage._local.buffer.lock

    def in_child() -> int:
        try:
            add("j", [1])
        except AggregatorClosedError:
            return 0
        return 1

    exit_code = fork_while_held(shared, in_child)
    outcomes = {
        0: "refused",
        1: "accepted",
        3: "raised something else",
        -signal.SIGALRM: "hung",
        None: "ran on",
    }
    assert exit_code == 0, outcomes.get(exit_code, exit_code) if exit_code is not None else "ran on"
    agg.shutdown(timeout=10)
    assert agg.drain() == [("k", [1])]
