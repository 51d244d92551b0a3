"""Unit tests of the bounded output (``aggregator_reference._output.Output``).

Its wake-ups are hard to reach through the public API: a consumer blocked on an
empty output is woken by records delivered past ``max_pending`` (FLUSH-5) only
in a race, and ``shutdown()`` re-checks for room every few seconds anyway
(CLOSE-6's WARNING interval). Here each one is checked directly: a thread
blocks, another acts, and the blocked one must return; every thread is a
daemon joined with a bound, so a lost wake-up fails instead of hanging.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from aggregator_reference._output import Output

#: Seconds a blocked call gets to return after it was woken: far above any real wake-up.
LIMIT = 10.0


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``call`` in a daemon thread; the list gets its result."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def joined(thread: threading.Thread) -> None:
    thread.join(LIMIT)
    assert not thread.is_alive(), "the blocked call was never woken"


def full(maxsize: int) -> Output[int]:
    output: Output[int] = Output(maxsize)
    assert output.offer(list(range(maxsize))) == maxsize
    return output


def test_force_wakes_a_consumer_blocked_on_an_empty_output() -> None:
    output: Output[int] = Output(1)
    entered = threading.Event()

    def get() -> tuple[bool, int | None]:
        entered.set()
        return output.get()

    thread, result = in_thread(get)
    assert entered.wait(LIMIT)
    try:
        # get() may not be waiting yet: then it finds the item without a wake-up, which is fine too.
        output.force([7])
        joined(thread)
    finally:
        output.close()  # frees the thread if the wake-up was lost
    assert result == [(True, 7)]


def test_force_of_several_items_wakes_as_many_consumers() -> None:
    output: Output[int] = Output(1)
    threads = [in_thread(output.get) for _ in range(3)]
    try:
        output.force([1, 2, 3])
        for thread, _ in threads:
            joined(thread)
    finally:
        output.close()
    assert sorted(result[0] for _, result in threads) == [(True, 1), (True, 2), (True, 3)]


def test_force_past_items_not_yet_taken_wakes_a_consumer_per_item() -> None:
    # Three consumers wait; one item arrives and, before any consumer runs, two more are
    # forced in: every consumer must be woken, though the output was not empty at the force.
    output: Output[int] = Output(10)
    threads = [in_thread(output.get) for _ in range(3)]
    waiters = output._not_empty._waiters  # type: ignore[attr-defined]
    deadline = time.monotonic() + LIMIT
    while len(waiters) < 3:
        assert time.monotonic() < deadline, "the consumers never blocked"
        time.sleep(0.001)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # no consumer runs between the two calls below
    try:
        assert output.offer([1]) == 1
        output.force([2, 3])
    finally:
        sys.setswitchinterval(previous)
    try:
        for thread, _ in threads:
            joined(thread)
    finally:
        output.close()
    assert sorted(result[0] for _, result in threads) == [(True, 1), (True, 2), (True, 3)]


def test_take_wakes_a_wait_for_room() -> None:
    output = full(1)
    thread, result = in_thread(lambda: output.wait_for_room(60.0))
    try:
        assert output.take() == [0]
        joined(thread)
    finally:
        output.close()
    assert result == [True]


def test_get_wakes_a_wait_for_room() -> None:
    output = full(1)
    thread, result = in_thread(lambda: output.wait_for_room(60.0))
    try:
        assert output.get() == (True, 0)
        joined(thread)
    finally:
        output.close()
    assert result == [True]


def test_wait_for_room_under_a_second_sees_room_made_meanwhile() -> None:
    output = full(1)
    taker = threading.Timer(0.1, output.take)
    taker.daemon = True
    taker.start()
    thread, result = in_thread(lambda: output.wait_for_room(0.8))
    joined(thread)
    joined(taker)
    assert result == [True]


def gave_up_waiting_for_room(output: Output[int], seconds: float) -> bool:
    """Whether ``wait_for_room(seconds)``, run in a thread nobody helps, returned ``False``."""
    thread, result = in_thread(lambda: output.wait_for_room(seconds))
    try:
        joined(thread)
    finally:
        output.close()
    return result == [False]


def test_wait_for_room_gives_up_when_nobody_takes() -> None:
    assert gave_up_waiting_for_room(full(1), 0.2)


def test_wait_for_room_gives_up_on_a_full_output_of_more_than_256() -> None:
    # 300 is not one of the small ints CPython caches: a size compared by identity fails here.
    assert gave_up_waiting_for_room(full(300), 0.05)


def test_wait_for_room_gives_up_on_an_output_past_maxsize() -> None:
    output = full(1)
    output.force([1, 2])
    assert gave_up_waiting_for_room(output, 0.05)
    assert output.offer([9]) == 0
    assert len(output) == 3


def test_offer_fills_only_the_room_left() -> None:
    output: Output[int] = Output(2)
    assert output.offer([0]) == 1
    assert output.offer([1, 2, 3]) == 1
    assert output.take() == [0, 1]
