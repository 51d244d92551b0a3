"""The end of an aggregator's life as users meet it: a ``shutdown()`` that says why it waits, and exit.

:class:`Patience` is how ``shutdown()`` waits: in slices, logging a WARNING
every :data:`SHUTDOWN_WARNING_INTERVAL` seconds with what it waits for (CLOSE-6);
:class:`Closer` runs ``storage.close()`` so that the wait for it is bounded.

At interpreter exit, before non-daemon threads are joined (the hook that
``concurrent.futures`` uses), :func:`at_exit` shuts down every aggregator that
is still open, all at once, within :func:`set_exit_timeout`'s bound (LIFE-2).
Aggregators are held in a :class:`weakref.WeakSet` from construction on, so
this keeps none of them alive and costs ``add`` nothing.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _fork

if TYPE_CHECKING:
    from ._engine import BufferedAggregator
    from ._types import Storage

__all__ = [
    "DEFAULT_EXIT_TIMEOUT",
    "FLUSH",
    "MERGE",
    "ROOM",
    "SHUTDOWN_WARNING_INTERVAL",
    "Closer",
    "Patience",
    "Waiting",
    "at_exit",
    "joined",
    "live",
    "register",
    "remaining",
    "set_exit_timeout",
    "shut_down_all",
]

logger = logging.getLogger("aggregator_reference")

#: Seconds between the WARNINGs of a ``shutdown()`` that keeps waiting. A
#: shutdown shorter than this is a consumer catching up, not worth a word;
#: longer, and the person watching starts to wonder. 12 lines a minute at most.
SHUTDOWN_WARNING_INTERVAL = 5.0

#: Seconds that exit waits, for all aggregators together, by default. Enough
#: for a running consumer to take what the last flushes hand it (thousands of
#: records a millisecond); short enough that a program without one still exits
#: promptly, well inside ``docker stop``'s 10 s before SIGKILL.
DEFAULT_EXIT_TIMEOUT = 5.0

#: Extra seconds exit gives each ``shutdown(timeout=...)`` to notice its own
#: deadline, and a count of buffered keys to come back, before going on without.
#: So exit waits at most about ``timeout + 0.25 s`` (plus 0.25 s per count that waits).
_GRACE = 0.25

# Guards _live and _hooked; taken at construction and at exit, never held while waiting for anything.
_lock = threading.Lock()
_live: weakref.WeakSet[BufferedAggregator[Any, Any]] = weakref.WeakSet()
_hooked = False
# Assigned whole by set_exit_timeout(), read whole by at_exit().
_exit_timeout: float | None = DEFAULT_EXIT_TIMEOUT
# In a thread that shuts an aggregator down at exit: set once exit stops waiting for it,
# so that its shutdown() gives up quietly instead of logging while the interpreter ends.
_given_up: ContextVar[threading.Event | None] = ContextVar("aggregator_reference_given_up", default=None)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the thread that may have held it at the fork is not in the child
    _fork.disown(list(_live), os.getppid())  # LIFE-3


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Waiting(NamedTuple):
    """What a ``shutdown()`` waits for, and what the user can do about it."""

    #: Or a function that says it as things stand when the WARNING is logged.
    what: str | Callable[[], str]
    advice: str
    #: Whether the buffer can be counted now; not while a ``merge`` may hold its lock.
    countable: bool


#: Seconds shutdown() waits for its closer thread before it applies its timeout (CLOSE-4).
CLOSER_GRACE = 0.05

ROOM = Waiting(
    "a consumer to make room in the output",
    "drain the output with records() or drain() in another thread, or pass timeout=... "
    "to shutdown() (nothing is lost when it times out)",
    countable=True,
)
MERGE = Waiting(
    "add() calls in flight to return (a merge is still running)",
    "a merge that never returns holds shutdown() up; pass timeout=... to shutdown() "
    "to stop waiting (nothing is lost when it times out)",
    countable=False,
)
DELIVERY = Waiting(
    "the delivery to write what it took into its sink",
    "while the sink fails, the delivery retries its batch (see Delivery.stats()); fix the sink, "
    "or pass timeout=... to shutdown() (nothing is lost when it times out)",
    countable=True,
)
FLUSH = Waiting(
    "a running flush to finish (a merge is still running)",
    MERGE.advice,
    countable=False,
)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or ``None`` when there is none."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class Patience:
    """The deadline of one ``shutdown()`` call, and when it next says that it still waits.

    Not shared between threads: each ``shutdown()`` call makes its own.
    """

    def __init__(self, aggregator: BufferedAggregator[Any, Any], timeout: float | None) -> None:
        self._aggregator = aggregator
        self._started = time.monotonic()
        self.deadline = None if timeout is None else self._started + timeout
        self._warn_at = self._started + SHUTDOWN_WARNING_INTERVAL
        self._given_up = _given_up.get()

    def until(self, ready: Callable[[float], bool], waiting: Waiting) -> bool:
        """Call ``ready(seconds)`` until it returns ``True``; ``False`` once the deadline has passed.

        ``ready`` blocks (on a Condition, Event, Lock or join) for at most
        ``seconds``, which end at the deadline or at the next WARNING,
        whichever comes first; so this never spins. At exit, ``False`` also
        once exit has stopped waiting for this thread.
        """
        while True:
            end = self._warn_at if self.deadline is None else min(self._warn_at, self.deadline)
            if ready(max(0.0, end - time.monotonic())):
                return True
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                return False
            if self._given_up is not None and self._given_up.is_set():
                return False
            if now >= self._warn_at:
                self._warn(now, waiting)
                self._warn_at = now + SHUTDOWN_WARNING_INTERVAL

    def _warn(self, now: float, waiting: Waiting) -> None:
        aggregator = self._aggregator
        if waiting.countable:
            buffered = f"{len(aggregator)} key(s) buffered"
        else:
            buffered = "buffered keys not counted (that would wait for the merge)"
        logger.warning(
            "%s: shutdown() has waited %.1f s for %s: %d record(s) pending in the output, %s; %s",
            type(aggregator).__name__,
            now - self._started,
            waiting.what() if callable(waiting.what) else waiting.what,
            aggregator.pending,
            buffered,
            waiting.advice,
        )


class Closer:
    """Runs ``storage.close()`` once, in a daemon thread; ``done`` is set when it has returned."""

    def __init__(self, storage: Storage[Any, Any], name: str) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._storage = storage
        threading.Thread(target=self._run, name=f"{name}-closer", daemon=True).start()

    def _run(self) -> None:
        try:
            self._storage.close()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


def joined(thread: threading.Thread, seconds: float) -> bool:
    """Join ``thread`` for at most ``seconds``; whether it has ended."""
    thread.join(seconds)
    return not thread.is_alive()


# -- at interpreter exit -------------------------------------------------------


def set_exit_timeout(seconds: float | None) -> float | None:
    """Set how long interpreter exit waits for open aggregators to shut down; return the old bound.

    At exit, before non-daemon threads are joined, every aggregator not yet
    shut down is shut down, all at once, within this many seconds in total
    (:data:`DEFAULT_EXIT_TIMEOUT`, 5, by default); ``None`` waits as long as
    it takes, ``0`` not at all. Whatever is not delivered by then is logged at
    WARNING on the ``aggregator_reference`` logger (LIFE-2).

    Raises:
        TypeError: ``seconds`` is not a number or ``None``.
        ValueError: ``seconds`` is negative, NaN, infinite or above ``threading.TIMEOUT_MAX``.
    """
    global _exit_timeout
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"exit timeout must be a number of seconds or None, got {type(seconds).__name__}")
        if math.isinf(seconds):
            raise ValueError(
                f"exit timeout must be finite, got {seconds!r}; pass None to wait without a bound"
            )
        if not 0 <= seconds <= threading.TIMEOUT_MAX:
            raise ValueError(
                f"exit timeout must be >= 0 seconds and at most threading.TIMEOUT_MAX "
                f"({threading.TIMEOUT_MAX:g}), got {seconds!r}"
            )
    previous, _exit_timeout = _exit_timeout, seconds
    return previous


def register(aggregator: BufferedAggregator[Any, Any]) -> None:
    """Remember ``aggregator`` (weakly) for :func:`at_exit`; hook that in on the first call."""
    global _hooked
    with _lock:
        _live.add(aggregator)
        first, _hooked = not _hooked, True
    if first:
        _hook()


def _hook() -> None:
    """Run :func:`at_exit` before non-daemon threads are joined, or else at ``atexit``."""
    # Import concurrent.futures.thread first: its own hook, which joins the pool's
    # workers, is then registered before ours, and hooks run last registered first.
    # A consumer running in a ThreadPoolExecutor ends at exit only if ours runs first.
    try:
        import concurrent.futures.thread  # noqa: F401
    except (ImportError, RuntimeError):  # a trimmed interpreter, or too late for its own hook
        pass
    register_hook = getattr(threading, "_register_atexit", None)
    try:
        if register_hook is not None:
            register_hook(at_exit)
            return
    except RuntimeError:  # created while the interpreter is already shutting down
        return
    import atexit

    atexit.register(at_exit)


def live() -> list[BufferedAggregator[Any, Any]]:
    """The aggregators created in this process that are still alive and not shut down."""
    with _lock:
        return [aggregator for aggregator in _live if not aggregator.closed]


def at_exit() -> None:
    """The exit hook: :func:`shut_down_all` of :func:`live` within the exit bound; never raises."""
    try:
        aggregators = live()
        if aggregators:
            shut_down_all(aggregators, _exit_timeout)
    except BaseException:
        logger.exception("aggregator_reference: shutting aggregators down at exit failed")


def shut_down_all(aggregators: Iterable[BufferedAggregator[Any, Any]], timeout: float | None) -> None:
    """Shut ``aggregators`` down at once, each in a thread of its own, within ``timeout`` in total.

    Those that did not finish get their output closed all the same (so that
    consumers' ``records()`` loops end) and a WARNING with what is left;
    those whose ``shutdown()`` raised something else get an ERROR. Ctrl-C
    stops the wait early, with the same reports.
    """
    deadline = None if timeout is None else time.monotonic() + timeout + _GRACE
    endings = [_Ending(aggregator) for aggregator in aggregators]
    why = "as long as it took" if timeout is None else f"within the exit bound of {timeout:g} s"
    try:
        for ending in endings:
            ending.start(timeout)
        for ending in endings:
            ending.wait(deadline)
    except KeyboardInterrupt:
        why = "before exit was interrupted"
        logger.warning("aggregator_reference: exit interrupted; not waiting for shutdown() any longer")
    for ending in endings:
        ending.report(why)


class _Ending:
    """One aggregator's ``shutdown()`` at exit, run in a daemon thread so that exit can stop waiting."""

    def __init__(self, aggregator: BufferedAggregator[Any, Any]) -> None:
        self.aggregator = aggregator
        self.error: BaseException | None = None
        self.done = False  # set by the thread once shutdown() has returned or raised
        self.given_up = threading.Event()  # set when exit stops waiting for it
        self.thread: threading.Thread | None = None

    def start(self, timeout: float | None) -> None:
        self.thread = threading.Thread(
            target=self._run, args=(timeout,), name=f"{type(self.aggregator).__name__}-exit", daemon=True
        )
        try:
            self.thread.start()
        except RuntimeError:  # too late for threads (an atexit hook on 3.12+): here, then
            self._run(timeout)

    def wait(self, deadline: float | None) -> None:
        """Join the thread until ``deadline``, a second at a time.

        A Ctrl-C that arrives just before one long lock wait begins would go
        unseen until that wait ends; a second's wait sees it a second later.
        """
        while self.thread is not None and self.thread.is_alive():
            left = remaining(deadline)
            if left == 0:
                return
            self.thread.join(1.0 if left is None else min(left, 1.0))

    def _run(self, timeout: float | None) -> None:
        token = _given_up.set(self.given_up)  # seen only by the shutdown() that this call makes
        try:
            self.aggregator.shutdown(timeout=timeout)
        except BaseException as exc:
            self.error = exc
        finally:
            _given_up.reset(token)
        self.done = True

    def report(self, why: str) -> None:
        """Close the output of an aggregator that did not shut down, and say what it leaves."""
        aggregator = self.aggregator
        self.given_up.set()
        if aggregator.closed:
            stranded = aggregator._stranded_by_deliveries()  # shut down, but nobody takes them
            if stranded:
                logger.warning("%s: %s", type(aggregator).__name__, stranded)
            return
        aggregator._output.close()  # consumers' records() loops end once it is empty
        name = type(aggregator).__name__
        held = aggregator._deliveries_held()
        left = (
            f"{aggregator.pending} record(s) pending in the output, "
            + (f"{held} record(s) held by a delivery whose sink did not take them, " if held else "")
            + f"{_count_buffered(aggregator)} key(s) still buffered, not delivered"
        )
        if self.done and not isinstance(self.error, TimeoutError):
            logger.error(
                "%s: shutdown() at exit raised: %s. Its output is closed, so records() ends once it "
                "is empty; what is still buffered is lost",
                name,
                left,
                exc_info=self.error,
            )
            return
        logger.warning(
            "%s: not shut down %s: %s. Its output is closed, so records() ends once it is empty; "
            "what is still buffered is lost. Consume records() or drain() until shutdown() returns "
            "before the program ends, or give exit longer with "
            "aggregator_reference.set_exit_timeout(seconds)",
            name,
            why,
            left,
        )


def _count_buffered(aggregator: BufferedAggregator[Any, Any]) -> str:
    """``len(aggregator)``, unless it waits longer than :data:`_GRACE` (a merge holds the buffer)."""
    counted: list[int] = []

    def count() -> None:
        try:
            counted.append(len(aggregator))
        except Exception:
            pass

    try:
        counter = threading.Thread(target=count, name="aggregator_reference-count", daemon=True)
        counter.start()
        counter.join(_GRACE)
    except RuntimeError:  # no new threads this late in interpreter shutdown
        pass
    return str(counted[0]) if counted else "an unknown number of"
