"""Helpers for writing a :class:`~aggregator_reference.Storage` (public as ``aggregator_reference.kit``).

The record helpers take no lock: call them with the lock that guards the dicts
held. :func:`finish_acquire` is how a storage waits for a contended lock.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn, TypeVar

from ._errors import AggregatorClosedError, ReentrantMergeError

__all__ = [
    "CALLBACK_WAIT",
    "Unsettled",
    "acquire_all",
    "acquire_interruptibly",
    "call_holding",
    "callback_timeout",
    "count_visible",
    "finish_acquire",
    "held_by_this_thread",
    "holding",
    "holding_all",
    "holding_locks_of",
    "holds_locks",
    "in_user_code_of",
    "lookup",
    "probe_held_locks",
    "refuse_closed",
    "refuse_reentrant",
    "release_all",
    "requeue_into",
    "visible_records",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Code objects of storage methods that may run user code while holding a lock.
_HOLDERS: set[Any] = set()

#: Seconds a call made from inside ``merge`` (while a storage lock is held further
#: up the stack) waits for another lock before it is refused: two such merges
#: that wait for each other's locks would otherwise deadlock (REENTRY-1).
CALLBACK_WAIT = 1.0


def holds_locks(function: F) -> F:
    """Mark a storage method that runs user code (``merge``, key ``__hash__``/``__eq__``) holding a lock.

    Inside it, keep the lock in a local named ``held`` (bound before acquiring
    is fine), or the locks in a local named ``all_held`` (bound only once all
    are held). That is how :func:`finish_acquire` recognises a call that comes
    back from that user code, instead of waiting for itself forever. The
    function itself is returned unchanged: no cost on the hot path.
    """
    _HOLDERS.add(function.__code__)
    return function


#: Probes of compiled storages, which run user code from C with no frame to mark: each
#: returns ``(storage, lock)`` for what the calling thread holds while it runs such code.
_PROBES: list[Callable[[], Iterable[tuple[object, Any]]]] = []


def probe_held_locks(probe: Callable[[], Iterable[tuple[object, Any]]]) -> None:
    """Register ``probe``: how a compiled storage tells what :func:`holds_locks` tells for Python code.

    A storage whose ``add`` is written in C calls ``merge`` with no Python
    frame of its own on the stack; ``probe()`` returns, for the calling thread,
    a ``(storage, lock)`` pair for each storage whose user code it is running
    and the lock (or busy buffer's lock) that call holds, so that the checks
    below see it. Called off the hot path only; it must be thread-safe.
    """
    _PROBES.append(probe)


def _probed() -> list[tuple[object, Any]]:
    return [pair for probe in _PROBES for pair in probe()] if _PROBES else []


def _locks_held(frame: FrameType | None) -> list[Any]:
    """The locks that marked frames from ``frame`` upwards hold, and those probes report."""
    held: list[Any] = [lock for _, lock in _probed()]
    while frame is not None:
        if frame.f_code in _HOLDERS:
            local = frame.f_locals
            if local.get("held") is not None:
                held.append(local["held"])
            held.extend(local.get("all_held", ()))
        frame = frame.f_back
    return held


def held_by_this_thread(lock: Any) -> bool:
    """Whether a frame marked with :func:`holds_locks` up this thread's stack holds ``lock``.

    It walks the stack: for checks off the hot path.
    """
    return any(lock is h for h in _locks_held(sys._getframe(1)))


def callback_timeout() -> float:
    """:data:`CALLBACK_WAIT` if this thread runs user code holding a storage's lock, else ``-1``.

    A ready ``timeout=`` for ``Lock.acquire``: wait as long as it takes, unless
    the caller is a ``merge`` (maybe another aggregator's) that others may be
    waiting for. It walks the stack: off the hot path.
    """
    return CALLBACK_WAIT if _locks_held(sys._getframe(1)) else -1


def in_user_code_of(owner: object) -> bool:
    """Whether this thread is inside user code that ``owner`` (a storage) is running.

    True when a frame marked with :func:`holds_locks` is on this thread's stack
    at or below a frame whose ``self`` is ``owner``: the call comes from a
    ``merge`` (or key method) that one of ``owner``'s methods runs. The engine
    asks this before ``flush()`` and ``shutdown()`` wait for anything, so that
    such a call raises ``ReentrantMergeError`` instead of waiting for a flush
    that waits for this very merge. It walks the stack: off the hot path only.
    """
    if any(storage is owner for storage, _ in _probed()):
        return True
    frame: FrameType | None = sys._getframe(1)
    marked = False
    while frame is not None:
        marked = marked or frame.f_code in _HOLDERS
        if marked and frame.f_locals.get("self") is owner:
            return True
        frame = frame.f_back
    return False


def holding_locks_of(owner: object) -> bool:
    """Whether a frame of ``owner`` (a storage) up this thread's stack holds a lock (or names one).

    True inside a ``merge`` that one of ``owner``'s methods runs while it holds
    ``held`` or ``all_held`` (see :func:`holds_locks`); unlike
    :func:`in_user_code_of`, not merely because such a method is on the stack
    after it let go of its locks. It walks the stack: off the hot path only.
    """
    if any(storage is owner for storage, _ in _probed()):
        return True
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _HOLDERS and frame.f_locals.get("self") is owner:
            local = frame.f_locals
            if local.get("held") is not None or local.get("all_held"):
                return True
        frame = frame.f_back
    return False


#: With the GIL, how many times :func:`finish_acquire` yields it and looks again before it blocks.
SPIN_TRIES = 100
#: Seconds between the main thread's looks for a ``KeyboardInterrupt`` while it waits for a lock.
INTERRUPT_SLICE = 0.05


def finish_acquire(lock: Any, call: str = "this call", *, closed: bool = False) -> None:
    """Take ``lock`` after ``lock.acquire(False)`` failed, without a lock convoy or a silent deadlock.

    With the GIL, a thread that sleeps in the kernel on a contended lock turns
    every release into a wake-up, and the threads queue up behind the GIL (a
    lock convoy: 8 threads ran at 1/13 of one thread's speed; a thousand, on
    one lock, at 1/40); so, with the GIL, yield it and look again up to
    :data:`SPIN_TRIES` times. Counted in tries, not seconds, the spin lasts as
    long as the other runnable threads take to pass the GIL round: a
    millisecond's spin ended before a thousand writers had each run once,
    so they all blocked and the convoy formed (the stress test took a minute
    instead of two seconds, one run in six). A lock still taken after that is
    held by a slow merge: then, as without the GIL, block until its release,
    so that a long wait (such as ``shutdown()`` waiting for an add in flight,
    CLOSE-6) costs no CPU. Never wake up periodically to look again: a
    thousand writers doing that every 20 ms kept the GIL from the lock's
    holder for minutes.

    A call from inside ``merge`` (a frame marked with :func:`holds_locks`
    further up this stack holds a lock) waits at most :data:`CALLBACK_WAIT`
    seconds: the thread holding ``lock`` may be waiting for the lock this
    thread holds (merges calling each other's keys), and one of the two must
    give way.

    ``closed``: the caller's storage refuses adds now; then an ``add`` that is
    not a call back from its own ``merge`` is refused at once instead of
    waiting: in a child process after ``os.fork()`` the holder may be a
    thread that is gone (LIFE-3).

    Raises:
        ReentrantMergeError: a frame marked with :func:`holds_locks` further up
            this thread's stack holds ``lock`` (the call comes from inside a
            ``merge``, or key method, that the storage is running), or holds
            another lock and ``lock`` stayed taken for :data:`CALLBACK_WAIT` s.
        AggregatorClosedError: ``closed``, and not the first case.
    """
    held = _locks_held(sys._getframe(1).f_back)  # the frame that failed to acquire holds nothing yet
    if any(lock is h for h in held):
        refuse_reentrant(call)
    if closed:
        refuse_closed(call)
    if getattr(sys, "_is_gil_enabled", lambda: True)():
        for _ in range(SPIN_TRIES):
            time.sleep(0)
            if lock.acquire(False):
                return
    if not acquire_interruptibly(lock, CALLBACK_WAIT if held else -1):
        raise ReentrantMergeError(
            f"{call} called from inside merge waited {CALLBACK_WAIT} s for a lock that another "
            "thread holds while this merge holds one; refused rather than risk a deadlock"
        )


def acquire_interruptibly(lock: Any, timeout: float = -1) -> bool:
    """``lock.acquire(timeout=timeout)``, asleep in the kernel, but interruptible in the main thread.

    Only the holder's release ends the wait, so other threads never wake up to
    look again. The main thread does, every :data:`INTERRUPT_SLICE`: a
    ``KeyboardInterrupt`` from ``_thread.interrupt_main()`` (or a signal that
    another thread received) does not wake a thread asleep in ``acquire()``,
    and raised only once the lock is taken, before the caller's ``try``, it
    would leave the lock held for good (THREAD-2); raised after a slice, it
    releases what that slice took.
    """
    if threading.current_thread() is not threading.main_thread():
        return bool(lock.acquire(timeout=timeout))
    deadline = None if timeout < 0 else time.monotonic() + timeout
    while True:
        wait = INTERRUPT_SLICE if deadline is None else min(INTERRUPT_SLICE, deadline - time.monotonic())
        got: list[bool] = []
        try:
            # The interrupt is raised as the call returns: C code keeps its outcome first.
            got.extend(map(lock.acquire, (True,), (max(wait, 0.0),)))
        except BaseException:
            if got and got[0]:
                lock.release()  # taken in the slice that the interrupt ended
            raise
        if got[0]:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def acquire_all(locks: Sequence[Any], call: str = "this call") -> None:
    """Take every lock of ``locks``, in order (the only order in which several are taken)."""
    taken = 0
    try:
        for lock in locks:
            if not lock.acquire(False):
                finish_acquire(lock, call)
            taken += 1
    except BaseException:
        release_all(locks[:taken])
        raise


def release_all(locks: Sequence[Any]) -> None:
    """Release every lock of ``locks``, last first."""
    for lock in reversed(locks):
        lock.release()


@holds_locks
def call_holding(held: Any, call: str, work: Callable[[], T]) -> T:
    """``work()`` with ``held`` taken as :func:`finish_acquire` says; ``work`` may run user code.

    For paths off the hot one that run ``merge`` or key methods while holding
    a lock (``get``, ``requeue``): a call back from that code is recognised
    through this frame, marked with :func:`holds_locks`.
    """
    if not held.acquire(False):
        finish_acquire(held, call)
    try:
        return work()
    finally:
        held.release()


@contextmanager
def holding(lock: Any, call: str = "this call") -> Iterator[None]:
    """``with holding(lock):`` for code that runs no user code while holding ``lock``."""
    if not lock.acquire(False):
        finish_acquire(lock, call)
    try:
        yield
    finally:
        lock.release()


@contextmanager
def holding_all(locks: Sequence[Any], call: str = "this call") -> Iterator[None]:
    """``with holding_all(locks):`` for code that runs no user code while holding them."""
    acquire_all(locks, call)
    try:
        yield
    finally:
        release_all(locks)


#: In a process made by ``os.fork()``, the parent's pid (set by ``_fork.disown``): a refused
#: add then also says that aggregators inherited through the fork are closed, which is why an
#: ``add`` kept from before the fork is refused there though nobody called ``shutdown()``.
_forked_from: int | None = None


def refuse_closed(call: str) -> NoReturn:
    """Raise ``AggregatorClosedError`` for ``call`` made after ``close()``."""
    text = f"{call} called after shutdown() began"
    parent = _forked_from
    if parent is not None:
        text += (
            f"; this process was forked from pid {parent}, and every aggregator inherited from "
            "the parent is closed here (its copied records belong to the parent): create new "
            "aggregators in the child"
        )
    raise AggregatorClosedError(text)


def refuse_reentrant(call: str) -> NoReturn:
    """Raise ``ReentrantMergeError`` for ``call`` made from inside a ``merge`` the storage runs."""
    raise ReentrantMergeError(f"{call} called from inside merge of the same aggregator")


class Unsettled(list[tuple[K, V]]):
    """The pairs a re-queue could not put back, and the ``BaseException`` that stopped it, if any.

    :func:`requeue_into` returns one. When ``interrupt`` is set (a ``merge`` or
    key method raised ``KeyboardInterrupt``, ``SystemExit``...), the list holds
    the pair it was raised for and every pair after it, untouched; the engine
    delivers them, settles the rest of the flush without running user code,
    then raises ``interrupt``.
    """

    interrupt: BaseException | None = None
    #: The storage already logged and counted why these could not be put back
    #: (FLUSH-6's split halves): the engine only delivers them.
    counted = False


def requeue_into(
    data: dict[K, V], leftover: Iterable[tuple[K, V]], merge: Callable[[V, V], V]
) -> Unsettled[K, V]:
    """Put ``leftover`` back into ``data``, older first: ``merge(leftover_value, newer)``.

    Returns the pairs that could not be put back because ``merge`` or the
    key's ``__hash__``/``__eq__`` raised; ``data`` keeps its newer record then.
    A ``BaseException`` that is not an ``Exception`` stops the loop: see :class:`Unsettled`.
    """
    failed: Unsettled[K, V] = Unsettled()
    pairs = list(leftover)
    for index, (key, value) in enumerate(pairs):
        try:
            if key in data:
                merged = merge(value, data[key])
                del data[key]  # so the record keeps the older key object (KEY-1)
            else:
                merged = value
            data[key] = merged
        except Exception:
            failed.append((key, value))
        except BaseException as exc:
            failed.extend(pairs[index:])
            failed.interrupt = exc
            break
    return failed


def lookup(data: Mapping[K, V], transit: Iterable[Mapping[K, V]], key: K, default: Any) -> Any:
    """``data[key]``, else the first detached chunk holding ``key``, else ``default``."""
    if key in data:
        return data[key]
    for chunk in transit:
        if key in chunk:
            return chunk[key]
    return default


def visible_records(data: Mapping[K, V], transit: Iterable[Mapping[K, V]]) -> dict[K, V]:
    """Detached chunks overlaid by the live ``data`` (the buffered value wins).

    A chunk that is not a ``dict`` is read through its ``items()``, not looked
    up again key by key: a storage's own mapping may yield its pairs there, so
    that a NaN key (only itself) or a key whose ``__eq__`` raises is shown too.
    """
    result: dict[K, V] = {}
    for chunk in transit:
        result.update(chunk if isinstance(chunk, dict) else chunk.items())
    result.update(data)
    return result


def count_visible(data: Mapping[K, V], transit: Iterable[Mapping[K, V]]) -> int:
    """``len(visible_records(data, transit))`` without building the dict when nothing is detached."""
    chunks = [chunk for chunk in transit if chunk]
    if not chunks:
        return len(data)
    return len(visible_records(data, chunks))
