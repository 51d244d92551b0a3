"""Shutting down at interpreter exit (LIFE-2): the bound, the hook's order, its failures, Ctrl-C."""

from __future__ import annotations

import importlib
import logging
import math
import operator
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import aggregator_reference as ar
from aggregator_reference import _exit
from conformance.test_exit import child_env, run_child

from .conftest import fork_while_held

#: Seconds a child interpreter gets to exit before the test fails.
CHILD_LIMIT = 60.0


@pytest.fixture
def exit_timeout() -> Iterator[None]:
    """Restore the exit bound that a test changes."""
    previous = ar.set_exit_timeout(_exit.DEFAULT_EXIT_TIMEOUT)
    yield
    ar.set_exit_timeout(previous)


@pytest.mark.usefixtures("exit_timeout")
def test_set_exit_timeout_returns_the_previous_bound() -> None:
    assert ar.set_exit_timeout(2) == _exit.DEFAULT_EXIT_TIMEOUT
    assert ar.set_exit_timeout(None) == 2
    assert ar.set_exit_timeout(0) is None
    assert ar.set_exit_timeout(0.25) == 0


@pytest.mark.usefixtures("exit_timeout")
@pytest.mark.parametrize(
    ("seconds", "error", "message"),
    [
        ("5", TypeError, "exit timeout must be a number of seconds or None, got str"),
        (True, TypeError, "got bool"),
        (-1, ValueError, r"exit timeout must be >= 0 seconds .* got -1"),
        (math.nan, ValueError, "got nan"),
        (math.inf, ValueError, "pass None to wait without a bound"),
    ],
)
def test_set_exit_timeout_refuses_bad_bounds(seconds: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ar.set_exit_timeout(seconds)  # type: ignore[arg-type]
    assert ar.set_exit_timeout(1) == _exit.DEFAULT_EXIT_TIMEOUT  # unchanged by the refusal


def test_a_failing_shutdown_at_exit_is_logged_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken: ar.ReferenceAggregator[str, int] = ar.ReferenceAggregator(operator.add, flush_interval=None)
    fine: ar.ReferenceAggregator[str, int] = ar.ReferenceAggregator(operator.add, flush_interval=None)
    broken.add("a", 1)
    fine.add("b", 1)

    def close() -> None:
        raise OSError("the storage cannot close")

    monkeypatch.setattr(broken._storage, "close", close)
    with caplog.at_level(logging.WARNING, logger="aggregator_reference"):
        _exit.shut_down_all([broken, fine], 10.0)
    assert fine.closed
    assert fine.drain() == [("b", 1)]
    assert not broken.closed
    assert list(broken.records()) == []  # its output was closed all the same: records() ends
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    assert "the storage cannot close" in caplog.text
    assert "ReferenceAggregator" in errors[0].getMessage()
    monkeypatch.undo()  # the storage closes again: finish, so that no ResourceWarning leaks into later tests
    broken.shutdown()
    assert broken.drain() == [("a", 1)]


def test_the_exit_hook_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("a bug in the exit hook")

    monkeypatch.setattr(_exit, "shut_down_all", fail)
    agg = ar.create(operator.add, backend="reference", flush_interval=None)
    with caplog.at_level(logging.WARNING, logger="aggregator_reference"):
        _exit.at_exit()  # must not raise
    assert "a bug in the exit hook" in caplog.text
    agg.shutdown()


def test_a_shutdown_that_exit_stopped_waiting_for_ends_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A daemon thread still logging while the interpreter finalizes can hang it (a lock
    # it holds when it is frozen); so once exit stops waiting, its shutdown() gives up.
    monkeypatch.setattr(_exit, "SHUTDOWN_WARNING_INTERVAL", 0.01)
    waited: list[_exit._Ending] = []
    warned = threading.Event()
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.set()  # type: ignore[method-assign]
    logging.getLogger("aggregator_reference").addHandler(handler)

    def interrupted(self: _exit._Ending, deadline: float | None) -> None:
        waited.append(self)
        warned.wait(30)  # Ctrl-C once shutdown() has said that it waits
        raise KeyboardInterrupt

    monkeypatch.setattr(_exit._Ending, "wait", interrupted)
    agg: ar.ReferenceAggregator[int, int] = ar.ReferenceAggregator(
        operator.add, flush_interval=None, max_pending=2
    )
    for i in range(5):
        agg.add(i, 1)
    with caplog.at_level(logging.WARNING, logger="aggregator_reference"):
        try:
            _exit.shut_down_all([agg], None)  # no bound: only the interrupt ends the wait
        finally:
            logging.getLogger("aggregator_reference").removeHandler(handler)
    (ending,) = waited
    assert ending.thread is not None
    ending.thread.join(30)
    assert not ending.thread.is_alive(), "shutdown() went on after exit stopped waiting for it"
    assert "exit interrupted" in caplog.text
    assert "2 record(s) pending in the output, 3 key(s) still buffered" in caplog.text
    delivered: list[tuple[int, int]] = []
    while not agg.closed:  # nothing was lost: a later shutdown() still delivers everything
        delivered += agg.drain()
        try:
            agg.shutdown(timeout=0.05)
        except TimeoutError:
            pass
    delivered += agg.drain()
    assert sorted(delivered) == [(i, 1) for i in range(5)]


def test_the_exit_hook_holds_aggregators_weakly() -> None:
    agg = ar.create(operator.add, backend="reference", flush_interval=None)
    assert agg in _exit.live()
    agg.shutdown()
    assert agg not in _exit.live()  # shut down: nothing left to do at exit
    del agg


POOL_CONSUMER = """
import operator
import aggregator_reference as ar

agg = ar.create(operator.add, backend="reference", flush_interval=None, max_pending=4)
for i in range(20):
    agg.add(i, 1)

# Imported after the aggregator exists: concurrent.futures then registers its own exit hook,
# which joins the pool's workers, after ours. Ours must still run first.
from concurrent.futures import ThreadPoolExecutor

def consume():
    print("consumed", sum(value for _, value in agg.records()), flush=True)

ThreadPoolExecutor(1).submit(consume)  # never shut down: its worker is joined at exit
"""


def test_a_consumer_in_a_thread_pool_ends_at_exit() -> None:
    child = run_child(POOL_CONSUMER)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "consumed 20\n"


CREATED_IN_AN_ATEXIT_HANDLER = """
import atexit, operator
import aggregator_reference as ar

def at_end():  # the process's first aggregator, made while the interpreter shuts down
    agg = ar.create(operator.add, backend="reference", flush_interval=None)
    agg.add("k", 1)
    agg.shutdown()
    print("created", agg.drain(), flush=True)

atexit.register(at_end)
"""


def test_the_first_aggregator_may_be_created_in_an_atexit_handler() -> None:
    # LIFE-2's hook cannot be registered that late; creating an aggregator must still work.
    child = run_child(CREATED_IN_AN_ATEXIT_HANDLER)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "created [('k', 1)]\n"


STALLED_FOREVER = """
import operator, signal
import aggregator_reference as ar

# As in a terminal: Ctrl-C raises KeyboardInterrupt, whatever disposition or mask this child
# inherited from the test runner's worker process (which may ignore or block SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
from aggregator_reference import _exit

_exit.SHUTDOWN_WARNING_INTERVAL = 0.05
ar.set_exit_timeout(None)  # wait as long as it takes: only Ctrl-C ends it
agg = ar.create(operator.add, backend="reference", flush_interval=None, max_pending=4)
for i in range(10):
    agg.add(i, 1)
"""


def test_ctrl_c_while_exit_waits_stops_waiting_and_says_what_was_left() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", STALLED_FOREVER],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    ) as child:
        assert child.stderr is not None
        timer = threading.Timer(CHILD_LIMIT, child.kill)  # a child that hangs ends our reads
        timer.start()
        try:
            seen = []
            for line in child.stderr:  # the periodic WARNING says that exit is waiting
                seen.append(line)
                if "has waited" in line:
                    child.send_signal(signal.SIGINT)
                    break
            seen.append(child.stderr.read())
            returncode = child.wait()
        finally:
            timer.cancel()
    stderr = "".join(seen)
    assert returncode == 0, stderr
    assert "has waited" in stderr, stderr
    assert "interrupted" in stderr, stderr
    assert "4 record(s) pending in the output, 6 key(s) still buffered" in stderr, stderr
    assert "Traceback" not in stderr, stderr


class _Sink:
    def write(self, batch: list[tuple[Any, Any]], batch_id: str, /) -> None:
        pass


def _create_and_shut_down() -> None:
    agg = ar.create(operator.add, backend="reference", flush_interval=None)
    agg.add("k", 1)
    agg.shutdown()


def _deliver_and_shut_down() -> None:
    agg = ar.create(operator.add, backend="reference", flush_interval=None)
    agg.deliver(_Sink())
    agg.add("k", 1)
    agg.shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.parametrize(
    ("lock", "work"),
    [("_registry._lock", _create_and_shut_down), ("_delivering._deliveries_lock", _deliver_and_shut_down)],
)
def test_a_child_forked_while_a_module_lock_was_held_can_use_aggregators(lock: str, work: Any) -> None:
    # LIFE-3: "Aggregators the child creates work as anywhere else", also when another thread of
    # the parent held one of the package's module locks at the fork (nobody releases it there).
    module, name = lock.split(".")
    held_lock = getattr(importlib.import_module(f"aggregator_reference.{module}"), name)

    def in_child() -> int:
        work()
        return 0

    code = fork_while_held(held_lock, in_child)
    assert code != -signal.SIGALRM, f"the child hung on {lock} (killed by its alarm)"
    assert code == 0, "the child raised"
