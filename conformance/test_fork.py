"""Aggregators across ``os.fork()`` (LIFE-3): in the child, the parent's are closed and empty.

Each test forks with a parent thread busy where it matters (inside ``merge``,
holding whatever lock the backend holds there) and checks every call the
child makes, through the aggregator and through references taken before the
fork, with a bound: a call waiting for a lock held by a thread the child does
not have would wait forever.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import operator
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import aggregator_reference as ar

from .conftest import shutdown_collecting

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")

CALL_BOUND = 5  # seconds each call in the child may take before it counts as hung


class _Hung(Exception):
    """Raised in the child by SIGALRM when a call runs past CALL_BOUND."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Hung


def in_a_forked_child(calls: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Fork now; in the child run each call in order. What each did, by name.

    ``"refused"`` (AggregatorClosedError), ``"returned <repr>"``, ``"hung"``
    (past CALL_BOUND), or the name of another exception raised.
    """
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a threaded process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(read)
            signal.signal(signal.SIGALRM, _on_alarm)
            for name, call in calls.items():
                signal.alarm(CALL_BOUND)
                try:
                    outcome = f"returned {call()!r}"
                except ar.AggregatorClosedError:
                    outcome = "refused"
                except _Hung:
                    outcome = "hung"
                except Exception as exc:
                    outcome = type(exc).__name__
                finally:
                    signal.alarm(0)
                os.write(write, (json.dumps([name, outcome]) + "\n").encode())
        finally:
            os._exit(0)
    os.close(write)
    got = b""
    deadline = time.monotonic() + CALL_BOUND * len(calls) + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], 0.1)
            if ready:
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                got += chunk
    finally:
        os.close(read)
        if not os.waitpid(pid, os.WNOHANG)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    done = dict(json.loads(line) for line in got.decode().splitlines())
    return {name: done.get(name, "hung (the child stopped answering)") for name in calls}


def _in_a_new_thread(call: Any, *args: Any) -> None:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call(*args)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the call did not return within 30 s"
    if raised:
        raise raised[0]


def _child(agg: Any, backend_name: str, results: Any, kept: dict[str, Any]) -> None:
    report: dict[str, Any] = {"len": len(agg), "closed": agg.closed, "pending": agg.pending}
    try:
        agg.add("a", 1)
        report["add"] = "accepted"
    except ar.AggregatorClosedError as exc:
        report["add"] = str(exc)
    for name, call in kept.items():  # references taken in the parent, before the fork
        try:
            call()
            report[name] = "accepted"
        except ar.AggregatorClosedError as exc:  # LIFE-3: saying why, not "after shutdown()"
            report[name] = "refused, naming the parent" if "parent" in str(exc) else f"refused: {exc}"
    report["records"] = list(agg.records())
    agg.shutdown()
    own = ar.create(operator.add, backend=backend_name, flush_interval=0.01)
    own.add("child", 1)
    own.add("child", 2)
    own.shutdown()
    report["own"] = own.drain()
    results.put(report)


@pytest.mark.clause("LIFE-3", "LIFE-1", "CLOSE-5", "ADD-8")
def test_a_forked_child_cannot_deliver_the_parents_records(backend_name: str) -> None:
    agg = ar.create(operator.add, backend=backend_name, flush_interval=0.01, max_pending=2)
    for key in "abcde":
        agg.add(key, 1)  # some flushed into the output, the rest buffered
    add, add_many, adder = agg.add, agg.add_many, agg.adder()  # kept, as a hot loop keeps them
    kept = {
        "kept add": lambda: add("a", 1),
        "kept adder()": lambda: adder("a", 1),
        "adder() taken in the child": lambda: agg.adder()("a", 1),
        "kept add_many": lambda: add_many([("new", 1)]),
        "kept add, new key": lambda: add("new", 1),
        "kept add, new thread": lambda: _in_a_new_thread(add, "new", 1),
    }
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a threaded process
        child = context.Process(target=_child, args=(agg, backend_name, results, kept))
        child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, f"the child failed (exit code {child.exitcode})"
    report = results.get()
    assert (report["len"], report["closed"], report["pending"], report["records"]) == (0, True, 0, [])
    assert "parent" in report["add"], report["add"]
    assert "create" in report["add"], report["add"]
    assert report["own"] == [("child", 3)]
    assert {name: report[name] for name in kept} == dict.fromkeys(kept, "refused, naming the parent")
    for key in "ab":
        agg.add(key, 1)  # the parent's aggregator is unaffected
    assert shutdown_collecting(agg) == {"a": 2, "b": 2, "c": 1, "d": 1, "e": 1}


@pytest.mark.clause("LIFE-3", "CLOSE-5")
def test_a_forked_child_refuses_at_once_while_a_parent_thread_was_inside_merge(backend_name: str) -> None:
    # The parent's writer holds whatever the backend holds around merge (a lock, a stripe, a
    # shard, a busy mark) when the fork happens; in the child nobody will ever let go of it.
    inside, release = threading.Event(), threading.Event()

    def merge(stored: int, incoming: int) -> int:
        if incoming < 0:
            inside.set()
            release.wait(60)
            return stored
        return stored + incoming

    agg = ar.create(merge, backend=backend_name, flush_interval=None)
    add, add_many, get = agg.add, agg.add_many, agg.get  # kept, as a hot loop keeps them

    def write() -> None:
        agg.add("k", 1)
        agg.add("k", -1)  # merges, and waits inside merge until released

    writer = threading.Thread(target=write)
    writer.start()
    assert inside.wait(10), "merge was not called"
    try:
        got = in_a_forked_child(
            {
                "agg.add(k)": lambda: agg.add("k", 2),
                "kept add(k)": lambda: add("k", 2),
                "kept add(other key)": lambda: add("other", 2),
                "kept add_many": lambda: add_many([("k", 2), ("other", 2)]),
                "kept get(k)": lambda: get("k"),
                "len": lambda: len(agg),
                "records": lambda: list(itertools.islice(agg.records(), 10)),
                "shutdown": lambda: agg.shutdown(timeout=1),
            }
        )
    finally:
        release.set()
        writer.join(10)
    assert got == {
        "agg.add(k)": "refused",
        "kept add(k)": "refused",
        "kept add(other key)": "refused",
        "kept add_many": "refused",
        "kept get(k)": "returned None",
        "len": "returned 0",
        "records": "returned []",
        "shutdown": "returned None",
    }
    assert shutdown_collecting(agg) == {"k": 1}  # the parent's own, once


@pytest.mark.clause("LIFE-3", "CLOSE-5")
def test_a_records_iterator_started_before_the_fork_ends_in_the_child(backend_name: str) -> None:
    agg = ar.create(operator.add, backend=backend_name, flush_interval=None)
    for key in "abc":
        agg.add(key, 1)
    agg.flush()
    records, batches = agg.records(), agg.batches(max_size=1, max_wait=0)
    first = [next(records), *next(batches)]  # both started, the rest still in the output
    got = in_a_forked_child(
        {
            "records": lambda: list(records),
            "batches": lambda: list(batches),
            "drain": agg.drain,
        }
    )
    # the parent's records, copied into the child: delivering them there delivers them twice
    assert got == {"records": "returned []", "batches": "returned []", "drain": "returned []"}
    rest = shutdown_collecting(agg)
    assert sorted([key for key, _ in first] + list(rest)) == ["a", "b", "c"]


class _GatedSink:
    """A sink whose ``write`` holds its batch until ``release`` is set."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.written: list[tuple[Any, Any]] = []

    def write(self, batch: list[tuple[Any, Any]], batch_id: str, /) -> None:
        self.entered.set()
        self.release.wait(30)
        self.written.extend(batch)


@pytest.mark.clause("LIFE-3", "SINK-1")
def test_a_delivery_begun_before_the_fork_has_ended_in_the_child(backend_name: str) -> None:
    # The delivery's thread is in the parent, writing a batch: in the child, nothing would
    # ever end the copy, so wait() would block forever; and its held records are the parent's.
    agg = ar.create(operator.add, backend=backend_name, flush_interval=0.01)
    sink = _GatedSink()
    delivery = agg.deliver(sink, batch_size=1, max_wait=0.01)
    try:
        agg.add("a", 1)
        assert sink.entered.wait(10), "the delivery never wrote"
        report = in_a_forked_child(
            {
                "wait": delivery.wait,
                "done": lambda: delivery.done,
                "held": delivery.held,
                "error": lambda: type(delivery.error).__name__,
                "deliver again": lambda: agg.deliver(_GatedSink()),
            }
        )
    finally:
        sink.release.set()
    assert report == {
        "wait": "returned True",
        "done": "returned True",
        "held": "returned []",
        "error": "returned 'RuntimeError'",
        "deliver again": "refused",
    }
    agg.shutdown()
    assert delivery.wait(10)
    assert sink.written == [("a", 1)]  # the parent's delivery wrote it, once
