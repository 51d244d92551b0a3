"""``ar.kit.finish_acquire``: how a storage's thread waits for a contended lock.

The lock-based storages (reference, striped, sharded and third parties' that
follow the kit) take their locks through it, on the hot path of every ``add``.
Each waiter here runs in a thread of its own: the main thread waits in slices
(THREAD-2, checked by the conformance suite).
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import aggregator_reference as ar


class CountingLock:
    """A lock that counts its ``acquire`` calls: tries that do not block, and waits that do."""

    def __init__(self, tries_before_release: int | None = None) -> None:
        self._lock = threading.Lock()
        self.tries = self.blocking_waits = 0
        self.blocked, self.tried_enough = threading.Event(), threading.Event()
        self._enough = tries_before_release

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            self.blocking_waits += 1
            self.blocked.set()
        else:
            self.tries += 1
            if self.tries == self._enough:
                self.tried_enough.set()
                self._lock.release()  # here, so that no other thread has to wake up in time
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()


def wait_in_a_thread(
    lock: CountingLock, call: Callable[[], object], release_when: threading.Event, then: float = 0.0
) -> list[Any]:
    """Hold ``lock`` while another thread runs ``call``; let go ``then`` s after ``release_when`` is set.

    Returns what ``call`` returned or raised, in a list.
    """
    lock.acquire(False)
    lock.tries = 0
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as error:
            outcome.append(error)

    waiter = threading.Thread(target=run, daemon=True)
    waiter.start()
    try:
        assert release_when.wait(10), "the waiter never got that far"
        time.sleep(then)
    finally:
        lock.release()
        waiter.join(10)
    assert not waiter.is_alive(), "the waiter did not take the lock once it was free"
    return outcome


def test_a_waiter_sleeps_until_the_release_instead_of_waking_up_to_look_again() -> None:
    # A waiter that woke every 20 ms to look again turned the stress test's thousand writers into
    # 50,000 wake-ups a second, each needing the GIL: the lock's holder waited for the GIL behind
    # them and the run took minutes instead of two seconds.
    lock = CountingLock()
    wait_in_a_thread(lock, lambda: ar.kit.finish_acquire(lock, "add()"), lock.blocked, then=0.3)
    lock.release()
    assert lock.blocking_waits == 1, f"{lock.blocking_waits} waits for one release"


@pytest.mark.skipif(not getattr(sys, "_is_gil_enabled", lambda: True)(), reason="no spin without the GIL")
def test_with_the_gil_a_waiter_looks_again_many_times_before_it_blocks() -> None:
    # Blocking at once (or after a millisecond, which a thousand writers use up before each has
    # run once) makes every release a hand-off through the kernel: a lock convoy, 1/40 of the speed.
    lock = CountingLock(tries_before_release=50)  # the 50th try releases it, then takes it
    done = threading.Event()

    def call() -> None:
        ar.kit.finish_acquire(lock, "add()")
        done.set()

    wait_in_a_thread(lock, call, done)  # a waiter that blocked instead is freed after 10 s, failing
    assert lock.blocking_waits == 0, "the waiter blocked before 50 tries, while the lock kept changing hands"


def test_a_call_from_inside_merge_waits_once_for_its_bound_then_gives_way() -> None:
    outer, inner = threading.Lock(), CountingLock()

    def merge() -> None:  # a user's merge that reads another key, whose lock another thread holds
        ar.kit.finish_acquire(inner, "get()")

    @ar.kit.holds_locks
    def merge_holding(held: Any) -> None:  # as a storage runs merge while it holds ``held``
        merge()

    saved, ar.kit.CALLBACK_WAIT = ar.kit.CALLBACK_WAIT, 0.2
    gave_way = threading.Event()

    def call() -> None:
        try:
            merge_holding(outer)
        finally:
            gave_way.set()

    try:
        outcome = wait_in_a_thread(inner, call, gave_way)
    finally:
        ar.kit.CALLBACK_WAIT = saved
    assert isinstance(outcome[0], ar.ReentrantMergeError), outcome
    assert "waited 0.2 s" in str(outcome[0])
    assert inner.blocking_waits == 1, f"{inner.blocking_waits} waits in one bounded wait"


def test_an_interrupt_that_comes_with_the_lock_leaves_the_lock_free() -> None:
    # The holder interrupts the main thread, then lets go: the main thread's acquire() returns with the
    # lock and the interrupt is raised right after, before any caller's try could release it.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("_thread.interrupt_main() interrupts only the main thread, and this test runs in another")
    lock = threading.Lock()
    lock.acquire()

    def hand_over() -> None:
        time.sleep(0.2)
        _thread.interrupt_main()
        lock.release()

    holder = threading.Thread(target=hand_over)
    holder.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ar.kit.acquire_interruptibly(lock)
    finally:
        holder.join(10)
    assert not lock.locked(), "the interrupt left the lock held: no one will ever release it"
