"""The compiled backend's own parts: what the conformance suite cannot see through the public API.

The suite runs on ``native`` like on every installed backend; these tests
check the C module's promises: no GIL needed on free-threaded builds, no
record kept alive by a thread that outlives its aggregator, each thread its
own buffer, and a ``merge`` run from C recognised as user code (REENTRY-1).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import weakref
from array import array
from collections.abc import Callable
from typing import Any

import pytest

import aggregator_reference as ar
from aggregator_reference import kit

from .conftest import fork_while_held, native_or_skip

native: Any = native_or_skip()


def test_native_is_found_through_its_entry_point() -> None:
    assert "native" in ar.backend_names()
    assert ar.load_backend("native") is native.NativeAggregator


@pytest.mark.skipif(not native.FREE_THREADED, reason="a free-threaded build of the module")
def test_importing_it_keeps_the_gil_off() -> None:
    # A module that does not declare Py_mod_gil turns the GIL back on when imported.
    code = "import sys, aggregator_native, aggregator_reference; print(sys._is_gil_enabled())"
    env = {key: value for key, value in os.environ.items() if key != "PYTHON_GIL"}
    command = [sys.executable, "-W", "error", "-c", code]
    out = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


class Value:
    """A record that can tell whether it is still alive."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __add__(self, other: Value) -> Value:
        return Value(self.n + other.n)


def test_a_thread_that_outlives_the_storage_keeps_none_of_its_records() -> None:
    storage = native.NativeStorage(lambda a, b: a + b)
    value = Value(1)
    alive = weakref.ref(value)
    storage.add("k", value)  # this (long-lived) thread now has a buffer of this storage
    del storage, value
    gc.collect()
    assert alive() is None, "the thread's state still holds the buffer and its records"


def test_each_new_thread_gets_a_buffer_of_its_own() -> None:
    # Thread ids and thread states are reused as threads come and go: a buffer cached for a
    # thread that ended must not be taken by the next one (its add would merge into it).
    agg: Any = ar.create(lambda a, b: a + b, backend="native", flush_interval=None)
    returned = []
    for _ in range(50):
        thread = threading.Thread(target=lambda: returned.append(agg.add("k", 1)))
        thread.start()
        thread.join()
    assert returned == [False] * 50
    assert agg.get("k") == 50
    agg.shutdown()
    assert agg.drain() == [("k", 50)]


def test_a_merge_run_from_c_is_user_code_of_its_storage() -> None:
    seen: list[tuple[bool, bool, float]] = []
    storage: Any = None

    def merge(a: int, b: int) -> int:
        seen.append((kit.in_user_code_of(storage), kit.holding_locks_of(storage), kit.callback_timeout()))
        return a + b

    storage = native.NativeStorage(merge)
    storage.add("k", 1)
    assert not kit.in_user_code_of(storage)
    assert not kit.holding_locks_of(storage)
    assert kit.callback_timeout() == -1
    storage.add("k", 2)
    assert seen == [(True, True, kit.CALLBACK_WAIT)]
    other = native.NativeStorage(merge)
    assert not kit.in_user_code_of(other)


def test_a_buffers_state_is_a_dict_and_its_stamps() -> None:
    buffer = native.NativeStorage(lambda a, b: a + b).buffer_type(0)
    bad: object
    for bad in [({}, ()), ({}, []), ({}, array("q")), ([], native._native.Stamps()), ({},), None]:
        with pytest.raises(TypeError, match="state"):
            buffer.state = bad
    records: dict[str, int] = {"a": 1}
    buffer.state = (records, native._native.Stamps())
    assert buffer.state[0] is records


def test_stamps_are_a_sequence_of_int64_that_grows() -> None:
    stamps = native._native.Stamps()
    values = [2**63 - 1, -(2**63), -2, -1, 0, *range(1, 10_000, 7)]
    for value in values:
        assert stamps.append(value) is None
    assert len(stamps) == len(values)
    assert (stamps[0], stamps[1], stamps[len(values) - 1]) == (values[0], values[1], values[-1])
    assert list(stamps) == values
    with pytest.raises(IndexError):
        stamps[len(values)]
    with pytest.raises(OverflowError):
        stamps.append(2**63)
    with pytest.raises(TypeError):
        stamps.append("1")
    with pytest.raises(TypeError):
        native._native.Stamps([1])
    assert len(stamps) == len(values)  # a refused append leaves it as it was


def test_each_new_record_gets_its_first_add_stamp_in_order() -> None:
    storage: Any = native.NativeStorage(lambda a, b: a + b)
    before = time.perf_counter_ns()
    for key in "abcab":
        storage.add(key, 1)
    after = time.perf_counter_ns()
    records, stamps = storage._core.buffer.state
    assert list(records) == ["a", "b", "c"]
    assert len(stamps) == 3
    assert before <= stamps[0] <= stamps[1] <= stamps[2] <= after
    storage.close()


def test_assigning_stranded_keeps_the_same_list() -> None:
    # The owner reads the list's length while it adds, unlocked: the list must never go away.
    buffer = native.NativeStorage(lambda a, b: a + b).buffer_type(0)
    stranded = buffer.stranded
    state = buffer.new_state()
    buffer.stranded = [state]
    assert buffer.stranded is stranded
    assert stranded == [state]
    buffer.stranded = []
    assert buffer.stranded is stranded
    assert stranded == []
    with pytest.raises(TypeError, match="stranded"):
        buffer.stranded = (state,)


class Boom(Exception):
    """What the merge below raises for a value of -1."""


def test_every_compiled_path_gives_back_the_references_it_took() -> None:
    # Merges, new records, add_many with each kind of failing pair, a merge that raises,
    # an add after shutdown: afterwards the key and value objects are referenced as before.
    key = "".join(["a", "key"])  # an object of this test's own
    other = "".join(["another", "key"])
    one = Value(1)
    bad = Value(-1)

    def merge(a: Value, b: Value) -> Value:
        if b.n == -1:
            raise Boom
        return a + b

    def exercise() -> None:  # its locals go when it returns
        agg: Any = ar.create(merge, backend="native", flush_interval=None, max_pending=2)
        for _ in range(3):
            agg.add(key, one)
            agg.add_many([(key, one), (other, one), [other, one]])
            for pairs in ([(key, one), (key, bad)], [(key, one), (other, one, one)], [(key, one), 5]):
                with pytest.raises((Boom, TypeError, ValueError)):
                    agg.add_many(pairs)
            with pytest.raises(Boom):
                agg.add(key, bad)
            with pytest.raises(TypeError):
                agg.add([key], one)
            agg.flush()
            agg.drain()
        agg.add(key, one)
        agg.shutdown()
        with pytest.raises(ar.AggregatorClosedError):
            agg.add(key, one)
        with pytest.raises(ar.AggregatorClosedError):
            agg.add_many([(key, one)])
        assert agg.drain()

    before = [sys.getrefcount(x) for x in (key, other, one, bad)]
    exercise()
    gc.collect()
    assert [sys.getrefcount(x) for x in (key, other, one, bad)] == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_is_in_the_probe_can_make_aggregators() -> None:
    # LIFE-3: the probe's registry lock, held by another thread at fork, must not stay held
    # in the child (the child has only the forking thread).

    def in_child() -> int:  # 0 only if it could use a new aggregator
        agg = ar.create(lambda a, b: a + b, backend="native", flush_interval=None)
        agg.add("k", 1)
        agg.shutdown()
        return 0 if agg.drain() == [("k", 1)] else 1

    code = fork_while_held(native._live_lock, in_child)
    assert code != -signal.SIGALRM, "the child hung (killed by its alarm)"
    assert code == 0


def test_aggregators_made_and_dropped_by_one_thread_leave_nothing_behind() -> None:
    # Each storage a thread adds to leaves an entry in that thread's state: it must go with it.
    def cycle() -> None:
        agg = ar.create(lambda a, b: a + b, backend="native", flush_interval=None)
        agg.add("k", 1)
        agg.shutdown()

    for _ in range(100):
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            cycle()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"{grown} bytes kept after 2000 aggregators (about {grown // 2000} each)"


def test_add_kept_after_its_aggregator_is_gone_refuses_instead_of_losing_records() -> None:
    agg: Any = ar.create(lambda a, b: a + b, backend="native", flush_interval=None)
    add, add_many = agg.add, agg.add_many
    add("k", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # "k" is dropped undelivered (LIFE-1)
        del agg
        gc.collect()
    calls: list[Callable[[], object]] = [
        lambda: add("k", 1),
        lambda: add("new", 1),
        lambda: add_many([("k", 1)]),
    ]
    for call in calls:
        with pytest.raises(ar.AggregatorClosedError):
            call()


def test_the_probe_runs_while_other_threads_make_and_drop_storages() -> None:
    # THREAD-1: the probe (asked whenever a call checks for user code, REENTRY-1) walks the
    # storages alive while other threads drop theirs; it must never raise out of that call.
    stop = threading.Event()
    made = [0]
    _alive = [native.NativeStorage(lambda a, b: a + b) for _ in range(1000)]  # a long walk

    def churn() -> None:
        while not stop.is_set():
            storage = native.NativeStorage(lambda a, b: a + b)
            del storage  # it leaves the probe's registry now, from this thread
            made[0] += 1

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    errors: list[BaseException] = []
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not errors:
            try:
                kit.callback_timeout()
            except Exception as exc:
                errors.append(exc)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert made[0] > 0
    assert not errors, f"the probe raised {errors[0]!r} ({made[0]} aggregators made meanwhile)"


_RACE_ATTRIBUTES = """
import sys, threading, time
import aggregator_native as native

storage = native.NativeStorage(lambda a, b: a + b)
core, buffer = storage._core, native._native.Buffer(0)
stop = threading.Event()
wrong = []

def rebind():
    i = 0
    while not stop.is_set():  # each value new, so that the one replaced dies at once
        core.buffers = (object(), i)
        core.home = {i: object()}
        buffer.state = ({i: object()}, native._native.Stamps())
        i += 1

def read():
    while not stop.is_set():
        got = (core.buffers, core.home, buffer.state)
        if [type(value) for value in got] != [tuple, dict, tuple]:
            wrong.append(got)
            return

threads = [threading.Thread(target=rebind), threading.Thread(target=read)]
for thread in threads:
    thread.start()
time.sleep(1)
stop.set()
for thread in threads:
    thread.join()
print("wrong" if wrong else "ok")
"""


def test_attributes_read_while_another_thread_rebinds_them() -> None:
    # THREAD-1: the Python part rebinds a core's and a buffer's objects; a getter racing a
    # setter must never hand out an object the setter has just released (a crash on 3.13t).
    result = subprocess.run(
        [sys.executable, "-c", _RACE_ATTRIBUTES], check=False, capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr[-2000:]
