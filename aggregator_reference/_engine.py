"""The engine every backend shares: flusher thread, bounded output, shutdown, statistics.

A backend is a :class:`Storage` plus a two-line subclass of :class:`BufferedAggregator`
that names it; everything else in this module is written once, here.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

from . import _exit
from . import _kit as kit
from ._arguments import check_arguments, check_bounds
from ._consume import Consuming
from ._delivering import Delivering
from ._errors import AggregatorClosedError, ReentrantMergeError
from ._output import Output
from ._pacing import Flusher, Pacer
from ._types import Merge, Stats, Storage
from ._writing import Writing

__all__ = ["BufferedAggregator", "logger"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger("aggregator_reference")


class BufferedAggregator(Writing[K, V], Consuming[K, V], Delivering[K, V], Generic[K, V]):
    """The engine: an :class:`~aggregator_reference.Aggregator` over a backend's :class:`Storage`.

    A backend subclasses it and sets :attr:`storage_class`; nothing else::

        class MyAggregator(BufferedAggregator[K, V]):
            storage_class = MyStorage

    ``add`` is the storage's own bound method, so the hot path is one call deep.

    Thread safety: every public method may be called from any thread.
    ``_flush_lock`` is held for the whole of each flush, so at most one runs;
    the shutdown flags only ever go from False to True. Lock order: ``_flush_lock``,
    then the storage's locks, then the output's. Counters other than the
    storage's are written only with ``_flush_lock`` held (``_ticks_skipped``
    only by the flusher thread).
    """

    storage_class: ClassVar[Callable[..., Storage[Any, Any]]]
    add: Callable[[K, V], bool]

    def __init__(
        self,
        merge: Merge[V],
        *,
        flush_interval: float | None = 1.0,
        max_pending: int = 1024,
        shards: int | None = None,
        max_buffered: int | None = None,
        max_block: float = 1.0,
        flush_at: int | None = None,
    ) -> None:
        """Build the buffer and start the flusher thread (see FLUSH-3 and BUF-3 for when there is one).

        Raises:
            TypeError: an argument has the wrong type (the message names it).
            ValueError: an argument is out of range (the message names it).
        """
        check_arguments(merge, flush_interval, max_pending, shards)
        check_bounds(max_buffered, max_block, flush_at)
        self._closed = False
        self._storage: Storage[K, V] = type(self).storage_class(merge, shards)
        self._pacer = Pacer(self, self._storage, max_buffered, max_block, flush_at)
        self.add = self._pacer.add  # the storage's own add unless bounded (BUF-1)
        if self.add == self._storage.add and hasattr(self._storage, "add_many"):
            self.add_many = self._storage.add_many  # type: ignore[method-assign]  # its own: faster
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._output: Output[tuple[K, V]] = Output(max_pending)
        # Each flag only ever goes from False to True, in one assignment.
        self._shutting_down = False
        # Held for the whole of every flush: manual, periodic and shutdown's.
        self._flush_lock = threading.Lock()
        # Ident of the thread running a flush (set with _flush_lock held), to refuse re-entry.
        self._flush_owner: int | None = None
        # Guards _closer: the one thread that runs storage.close() for shutdown().
        self._closer_lock = threading.Lock()
        self._closer: _exit.Closer | None = None
        self._flushed = self._requeued = self._flushes = 0
        self._ticks_skipped = self._overflowed = self._flush_errors = self._early_flushes = 0
        self._flusher: Flusher | None = None
        if flush_interval is not None or self._pacer.bounded:
            self._flusher = Flusher(self, flush_interval)
            self._flusher.thread.start()
        _exit.register(self)  # shut down at interpreter exit if nobody did (LIFE-2)

    # -- flushing -------------------------------------------------------------

    def flush(self) -> int:
        """Hand every buffered record to the output; return how many were handed off.

        Waits for a flush already running. Records that do not fit are
        re-queued (FLUSH-2).

        Raises:
            AggregatorClosedError: ``shutdown()`` has begun.
            ReentrantMergeError: called from inside this aggregator's ``merge``.
        """
        if self._shutting_down:
            raise AggregatorClosedError("flush() called after shutdown() began")
        self._refuse_from_merge("flush()")
        lock = self._flush_lock
        # From inside another aggregator's merge, the running flush may be waiting for that
        # merge: wait only so long (REENTRY-1).
        if not lock.acquire(False) and not kit.acquire_interruptibly(lock, kit.callback_timeout()):
            raise ReentrantMergeError(
                f"flush() called from inside merge waited {kit.CALLBACK_WAIT} s for a running flush "
                "that may be waiting for this merge; refused rather than risk a deadlock"
            )
        try:
            return self._flush_locked()[0]
        finally:
            lock.release()

    def _refuse_from_merge(self, call: str) -> None:
        """Raise ``ReentrantMergeError`` if this thread is inside a ``merge`` this aggregator runs.

        Asked before waiting for anything, so that a refused call changes
        nothing (ADD-4), and before waiting for a flush that may itself be
        waiting for this very merge (REENTRY-1).
        """
        if self._flush_owner == threading.get_ident() or kit.in_user_code_of(self._storage):
            raise ReentrantMergeError(f"{call} called from inside merge of the same aggregator")

    def _tick(self, early: bool = False) -> None:
        """One flush of the flusher; never raises.

        A periodic one is skipped if a flush is running (FLUSH-4); an ``early``
        one (woken, BUF-3) waits for it: that flush may have taken the buffer
        before the records that asked for this one arrived.
        """
        if not self._flush_lock.acquire(blocking=early):
            logger.debug("%s: periodic flush skipped, a flush is still running", type(self).__name__)
            self._ticks_skipped += 1
            return
        try:
            if not self._shutting_down:
                self._early_flushes += early
                self._flush_locked()
        except BaseException:  # SystemExit or KeyboardInterrupt from merge too: keep flushing
            logger.exception("%s: periodic flush failed; records stay buffered", type(self).__name__)
            self._flush_errors += 1
        finally:
            self._flush_lock.release()

    def _flush_locked(self) -> tuple[int, int]:
        """Detach, hand off, re-queue. Only called with ``_flush_lock`` held.

        Returns ``(handed_off, requeued)``. If a ``merge`` or key method raises
        a ``BaseException`` that is not an ``Exception`` while a chunk is
        re-queued, the rest of the flush runs no user code: what was not put
        back is delivered past ``max_pending`` (FLUSH-5), then it is raised.
        """
        self._flush_owner = threading.get_ident()
        handed = requeued = 0
        interrupt: BaseException | None = None
        try:
            for chunk in self._storage.detach():
                items = list(chunk.items())
                if interrupt is not None:  # settle without merging, deliver everything
                    self._storage.requeue(chunk, [])
                    self._deliver_unrequeueable(items)
                    handed += len(items)
                    continue
                taken = self._output.offer(items)
                leftover = items[taken:] if taken < len(items) else []
                failed = self._storage.requeue(chunk, leftover)
                interrupt = getattr(failed, "interrupt", None)
                handed += taken
                requeued += len(leftover) - len(failed)
                if failed:
                    self._deliver_unrequeueable(failed)
                    handed += len(failed)
        finally:
            self._flush_owner = None
            self._flushes += 1
            self._flushed += handed
            self._requeued += requeued
            self._pacer.after_flush()
        if interrupt is not None:
            raise interrupt
        return handed, requeued

    def _deliver_unrequeueable(self, failed: list[tuple[K, V]]) -> None:
        """Deliver records the storage could not put back, past ``max_pending`` (never drop them)."""
        self._output.force(failed)
        if getattr(failed, "counted", False):  # the storage logged and counted the cause already
            logger.warning(
                "%s: %d record(s) kept apart by the storage (a merge or a gather that raised) "
                "delivered past max_pending",
                type(self).__name__,
                len(failed),
            )
        else:
            logger.error(
                "%s: %d record(s) could not be re-queued (merge or key hash/eq raised); "
                "delivered past max_pending instead",
                type(self).__name__,
                len(failed),
            )
            self._flush_errors += 1
        self._overflowed += len(failed)  # last: a reader that sees it sees the log line too

    # -- consuming ------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records waiting in the output; stale as soon as it is read."""
        return len(self._output)

    # -- reading the buffer ----------------------------------------------------

    def get(self, key: K, default: Any = None) -> Any:
        """The buffered record for ``key``, or ``default``; see READ-1/READ-2 for flushes in progress.

        Raises:
            TypeError: ``key`` is unhashable.
        """
        return self._storage.get(key, default)

    def snapshot(self) -> dict[K, V]:
        """A new dict of the buffered records (the values themselves, not copies)."""
        return self._storage.snapshot()

    def __len__(self) -> int:
        """How many keys are buffered; stale as soon as it returns."""
        return len(self._storage)

    @property
    def shards(self) -> int:
        """How many independently locked parts the buffer has."""
        return self._storage.shards

    @property
    def closed(self) -> bool:
        """``True`` once ``shutdown()`` has completed."""
        return self._closed

    def stats(self) -> Stats:
        """A snapshot of the counters; each may be a little stale under concurrent use."""
        merges, stored = self._storage.counts()
        pacer = self._pacer
        return Stats(
            adds=merges + stored,
            merges=merges,
            stored=stored,
            flushed=self._flushed,
            requeued=self._requeued,
            flushes=self._flushes,
            ticks_skipped=self._ticks_skipped,
            overflowed=self._overflowed,
            # A storage that combines records on its own (FLUSH-6) counts what raised there.
            flush_errors=self._flush_errors + getattr(self._storage, "merge_errors", 0),
            early_flushes=self._early_flushes,
            adds_waited=pacer.adds_waited,
            buffer_full_errors=pacer.buffer_full_errors,
            buffered=pacer.buffered(stored),
        )

    # -- shutting down -----------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the flusher, flush until the buffer is empty, then close the output.

        Idempotent, and safe to call from several threads. Waits for the
        consumers (without spinning) while the output is full; while it waits,
        it logs a WARNING every ``_exit.SHUTDOWN_WARNING_INTERVAL`` (5) seconds (CLOSE-6).

        Raises:
            TimeoutError: ``timeout`` seconds passed first; nothing is lost,
                ``add()`` stays refused, and a later ``shutdown()`` continues.
            ReentrantMergeError: called from inside this aggregator's ``merge``;
                or from inside another's, and it could not finish within
                ``kit.CALLBACK_WAIT`` (1) s (then as after ``TimeoutError``).
            ValueError: ``timeout`` is negative.
            DeliveryError: called from a delivery's sink, or blocking the event
                loop a delivery runs in (use ``ashutdown()`` there); SINK-4.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        self._refuse_from_merge("shutdown()")
        self._check_shutdown_caller()
        # From inside another aggregator's merge, what this waits for (a running flush, adds in
        # flight) may be waiting for that merge: wait only so long (REENTRY-1).
        inside = kit.callback_timeout()
        cut_short = inside >= 0 and (timeout is None or timeout > inside)
        try:
            self._shut_down(_exit.Patience(self, inside if cut_short else timeout))
        except TimeoutError:
            if not cut_short:
                raise
            raise ReentrantMergeError(
                f"shutdown() called from inside merge could not finish within {kit.CALLBACK_WAIT} s; "
                "what it waits for may be waiting for this merge, so it stopped rather than risk a "
                "deadlock; nothing was lost, call shutdown() again from outside merge"
            ) from None

    def _shut_down(self, wait: _exit.Patience) -> None:
        if self._closed:
            return
        self._shutting_down = True
        if self._flusher is not None:
            self._flusher.stop()
        self._pacer.closed()
        self._close_storage(wait)
        flusher = self._flusher.thread if self._flusher is not None else None
        if (
            flusher is not None
            and flusher is not threading.current_thread()
            and not wait.until(lambda seconds: _exit.joined(flusher, seconds), _exit.FLUSH)
        ):
            raise TimeoutError("shutdown() timed out waiting for a running flush")
        while True:
            if not wait.until(lambda s: kit.acquire_interruptibly(self._flush_lock, s), _exit.FLUSH):
                raise TimeoutError("shutdown() timed out waiting for a running flush")
            try:
                _, requeued = self._flush_locked()
            finally:
                self._flush_lock.release()
            if not requeued and not len(self._storage):
                break
            if requeued and not wait.until(self._output.wait_for_room, self._room_wait()[0]):
                raise TimeoutError(
                    f"shutdown() timed out: the output is full ({self.pending} pending) "
                    f"and {len(self._storage)} record(s) are still buffered; nothing was lost, "
                    + self._room_wait()[1]
                )
        self._output.close()
        self._close_after_deliveries(wait)  # sets _closed once no delivery runs (SINK-4)

    def _close_storage(self, wait: _exit.Patience) -> None:
        """``storage.close()``, which waits for adds in flight, within ``wait``'s deadline (CLOSE-4).

        It runs in a helper thread, so that a ``merge`` in flight (however slow)
        cannot hold the caller past its timeout; a later ``shutdown()`` waits for
        the same helper instead of starting another.
        """
        stop_adds = getattr(self._storage, "stop_adds", None)
        if stop_adds is not None:
            stop_adds()  # at once: add() is refused even if close() must wait past the timeout
        with self._closer_lock:
            closer = self._closer
            if closer is None:
                closer = self._closer = _exit.Closer(self._storage, type(self).__name__)
        # A first look of up to _exit.CLOSER_GRACE, whatever the timeout: with no add in flight
        # the helper returns in microseconds, and timeout=0 must not depend on when it runs.
        if not closer.done.wait(_exit.CLOSER_GRACE) and not wait.until(closer.done.wait, _exit.MERGE):
            raise TimeoutError(
                "shutdown() timed out waiting for add() calls in flight (a merge still running); "
                "nothing was lost, call shutdown() again"
            )
        if closer.error is not None:
            with self._closer_lock:
                self._closer = None  # let a later shutdown() try again
            raise closer.error

    def __enter__(self) -> BufferedAggregator[K, V]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:  # bound: exit clears globals
        flusher = getattr(self, "_flusher", None)
        if flusher is not None:
            flusher.stop()
        if getattr(self, "_closed", True) or not hasattr(self, "_output"):
            return
        try:
            undelivered = str(len(self._storage) + len(self._output))
        except Exception:  # a storage that cannot count now (interpreter exit, inside merge)
            undelivered = "an unknown number of"
        if undelivered != "0":
            _warn(
                f"{type(self).__name__} dropped with {undelivered} record(s) not delivered; "
                "call shutdown() or use it as a context manager",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("shutting down" if self._shutting_down else "open")
        return (
            f"<{type(self).__name__} {state} buffered={len(self)} pending={self.pending} "
            f"shards={self.shards}>"
        )
