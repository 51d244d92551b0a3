"""``ar.kit.finish_acquire``: how a storage's thread waits for a contended lock.

The lock-based storages (reference, striped, sharded and third parties' that
follow the kit) take their locks through it, on the hot path of every ``add``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import aggregator_reference as ar


class CountingLock:
    """A lock that counts the blocking ``acquire`` calls made on it (each one a wake-up)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blocking_waits = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            self.blocking_waits += 1
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()


def wait_behind_holder(lock: CountingLock, held_for: float, call: Any) -> None:
    """Hold ``lock`` in another thread for ``held_for`` seconds while this one runs ``call``."""
    taken = threading.Event()

    def hold() -> None:
        lock.acquire()
        taken.set()
        time.sleep(held_for)
        lock.release()

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait()
    try:
        call()
    finally:
        holder.join()


def test_a_waiter_sleeps_until_the_lock_is_released_instead_of_waking_periodically() -> None:
    # A waiter that woke every 20 ms to try again turned the stress test's thousand writers into
    # 50,000 wake-ups a second, each needing the GIL: the lock's holder waited for the GIL behind
    # them and the run took minutes instead of two seconds.
    lock = CountingLock()
    wait_behind_holder(lock, 0.5, lambda: ar.kit.finish_acquire(lock, "add()"))
    lock.release()
    assert lock.blocking_waits <= 2, f"{lock.blocking_waits} wake-ups while the lock was held for 0.5 s"


def test_a_call_from_inside_merge_waits_once_for_its_bound_then_gives_way() -> None:
    outer, inner = threading.Lock(), CountingLock()

    def merge() -> None:  # a user's merge that reads another key, whose lock another thread holds
        ar.kit.finish_acquire(inner, "get()")

    @ar.kit.holds_locks
    def merge_holding(held: Any) -> None:  # as a storage runs merge while it holds ``held``
        merge()

    raised: list[BaseException] = []

    def call() -> None:
        try:
            merge_holding(outer)
        except ar.ReentrantMergeError as error:
            raised.append(error)

    saved = ar.kit.CALLBACK_WAIT
    ar.kit.CALLBACK_WAIT = 0.3
    try:
        wait_behind_holder(inner, 0.6, call)
    finally:
        ar.kit.CALLBACK_WAIT = saved
    assert raised, "the call from inside merge waited for the lock instead of giving way"
    assert "waited 0.3 s" in str(raised[0])
    assert inner.blocking_waits <= 2, f"{inner.blocking_waits} wake-ups in a 0.3 s bounded wait"
