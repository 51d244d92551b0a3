"""When the flusher runs and how much may wait for it: the flusher thread, BUF-1 … BUF-3.

Written once for every backend. Without ``max_buffered`` and ``flush_at`` the
hot path is untouched: ``add`` stays the storage's own bound method. With
them, a storage that offers ``limit_new_records`` (see :class:`Pacer`) asks
:meth:`Pacer.admit` only once per several new records of a thread; any other
storage gets :meth:`Pacer.add` in front of its ``add``, which reads the
storage's counters once per call.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _kit as kit
from ._errors import AggregatorClosedError, BufferFullError
from ._types import Storage

if TYPE_CHECKING:
    from ._engine import BufferedAggregator

__all__ = ["Flusher", "Pacer"]

_MISSING = object()
#: Longest wait of an add for a consumer to take from a full output before it looks again.
_SLICE = 0.1


class Flusher:
    """The background flusher thread: a tick every ``interval`` seconds, or at once when woken.

    Holds its aggregator only weakly, so that it can be dropped. ``interval``
    ``None`` means it runs only when woken (BUF-3).
    """

    def __init__(self, aggregator: BufferedAggregator[Any, Any], interval: float | None) -> None:
        self.stopped = False
        self._woken = threading.Event()
        self.thread = threading.Thread(
            target=self._run,
            args=(weakref.ref(aggregator), interval),
            name=f"{type(aggregator).__name__}-flusher",
            daemon=True,
        )

    def _run(self, ref: weakref.ref[BufferedAggregator[Any, Any]], interval: float | None) -> None:
        woken = self._woken
        while True:
            early = woken.wait(interval)
            woken.clear()
            if self.stopped:  # after clear(): a stop that set the event is never missed
                return
            aggregator = ref()
            if aggregator is None:
                return
            aggregator._tick(early)
            del aggregator

    def wake(self) -> None:
        """Run a flush now (it is skipped, FLUSH-4, if one is running)."""
        self._woken.set()

    def stop(self) -> None:
        """End the thread after the flush it may be running; never waits."""
        self.stopped = True
        self._woken.set()


class Pacer:
    """``max_buffered``, ``max_block`` and ``flush_at`` of one aggregator (BUF-1 … BUF-3).

    Counts buffered records without reading the storage on the hot path: the
    length measured after the last flush, plus the records ``stored`` since
    (``storage.counts()``, which never waits). A storage that offers
    ``limit_new_records(admit)`` and ``revoke()`` does better: before it
    stores a new record it spends an allowance of its calling thread, and
    only when that is spent calls ``admit(grant)`` (holding none of its
    locks), which calls ``grant(n)`` with the next allowance or raises, and
    returns what to call once the record is stored (or ``None``);
    ``revoke()`` (called after each flush) spends every thread's allowance. The allowances handed out
    since the last flush count as buffered, so the bound holds (BUF-2).

    Thread safety: every method may be called from any thread; ``_room``
    guards the measures and counters below it and is notified after each flush.
    """

    def __init__(
        self,
        aggregator: BufferedAggregator[Any, Any],
        storage: Storage[Any, Any],
        max_buffered: int | None,
        max_block: float,
        flush_at: int | None,
    ) -> None:
        self._name = type(aggregator).__name__
        self._aggregator = weakref.ref(aggregator)
        self._storage = storage
        self.max_buffered = max_buffered
        self.max_block = max_block
        self.flush_at = flush_at
        self._room = threading.Condition(threading.Lock())
        self._length = 0  # records buffered after the last flush (an upper estimate)
        # _length - storage.counts()[1] then: buffered ~ _base + stored now. One attribute, so
        # that a reader without the lock never pairs an old length with a new count.
        self._base = 0
        self._granted = 0  # allowances handed out since the last flush
        self.adds_waited = self.buffer_full_errors = 0
        #: Whether there is a bound at all; without one ``add`` is the storage's own.
        self.bounded = max_buffered is not None or flush_at is not None
        # _add() at or above this estimate takes the slow path: the next new record would
        # bring the buffer to flush_at, or it is at max_buffered.
        bounds = (max_buffered, None if flush_at is None else flush_at - 1)
        self._slow_from = min((b for b in bounds if b is not None), default=0)
        self.revoke: Callable[[], None] | None = None
        self.add: Callable[[Any, Any], bool] = storage.add
        limit = getattr(storage, "limit_new_records", None)
        if self.bounded and limit is not None:
            self.revoke = storage.revoke  # type: ignore[attr-defined]
            limit(self.admit)
        elif self.bounded:
            self.add = self._add

    # -- measuring -----------------------------------------------------------------

    def buffered(self, stored: int | None = None) -> int:
        """The estimate of the records buffered (STAT-1's ``buffered``); never waits for a merge.

        ``stored``: ``storage.counts()[1]``, if the caller has just read it.
        """
        if stored is None:
            stored = self._storage.counts()[1]
        return max(0, self._base + stored)

    def after_flush(self) -> None:
        """Measure the buffer anew and wake the adds waiting for room. With the flush lock held.

        The storage is measured before taking ``_room``: a ``merge`` holding a
        storage lock may be asking for room (an ``add`` from inside merge).
        Then, with ``_room`` held, the allowances are revoked and the records
        stored since the measure began are added to it: some may be counted
        twice, none is missed (BUF-2).
        """
        mark = self._storage.counts()[1]
        length = len(self._storage)
        with self._room:
            if self.revoke is not None:
                self.revoke()  # never waits (Storage): safe with _room held
            stored = self._storage.counts()[1]  # after revoke(): no allowance is left to spend
            self._length = length + stored - mark
            self._base = self._length - stored
            self._granted = 0
            self._room.notify_all()

    def closed(self) -> None:
        """Shutdown began: wake the adds waiting for room (they raise ``AggregatorClosedError``)."""
        with self._room:
            self._room.notify_all()

    # -- admitting new records -----------------------------------------------------

    def _wake_flusher(self) -> None:
        """Wake the flusher: it flushes once more, even if it is flushing now (what it took
        may predate the record that asks), and a wake while it is still waking is one flush."""
        aggregator = self._aggregator()
        if aggregator is not None and aggregator._flusher is not None:
            aggregator._flusher.wake()

    def _estimate(self) -> int:
        """What :meth:`admit` counts: the measure plus the allowances handed out (``_room`` held)."""
        if self.revoke is None:
            return self.buffered()
        return self._length + self._granted

    def admit(self, grant: Callable[[int], None] | None = None) -> Callable[[], None] | None:
        """Let the calling thread store new records: ``grant(n)`` for ``n >= 1`` of them.

        ``grant`` runs with ``_room`` held, so that no flush revokes the
        allowance between counting it and the storage setting it. At
        ``max_buffered``, waits up to ``max_block`` seconds for room. Returns
        what the caller must call once it has stored the record (or failed
        to): when it brings the buffer to ``flush_at``, the wake-up of the
        flusher, which must not flush before the record is there (BUF-3).

        Raises:
            BufferFullError: no room came within ``max_block`` seconds.
            AggregatorClosedError: ``shutdown()`` began while it waited.
        """
        with self._room:
            self._wait_for_room()
            buffered = self._estimate()
            threads = max(1, self._storage.shards)
            # A share of the room left, so that the other threads find some too.
            room = self.max_buffered - buffered if self.max_buffered is not None else self.flush_at or 1
            allowance = max(1, room // (2 * threads))
            after = None
            if self.flush_at is not None:
                if buffered + 1 >= self.flush_at:  # this record brings the buffer to flush_at
                    after = self._wake_flusher
                else:  # ask again for the record that does
                    allowance = min(allowance, self.flush_at - 1 - buffered)
            self._granted += allowance
            if grant is not None:
                grant(allowance)
            return after

    def _wait_for_room(self) -> None:
        """Return once a new record may be stored (``_room`` held); see :meth:`admit`."""
        limit = self.max_buffered
        if limit is None or self._estimate() < limit:
            return
        if self.revoke is not None:  # allowances of idle or exited threads: count what is stored
            self.revoke()
            self._length, self._granted = self._base + self._storage.counts()[1], 0
            if self._estimate() < limit:
                return
        self._wake_flusher()  # at once, even when max_block is 0
        patience = self.max_block
        if (inside := kit.callback_timeout()) >= 0:  # inside a merge holding locks (REENTRY-1):
            # of this aggregator, the flush would need them: no wait; of another, only so long.
            patience = 0.0 if kit.holding_locks_of(self._storage) else min(patience, inside)
        deadline = time.monotonic() + patience
        waited = False
        while True:
            if self._shutting_down():
                raise AggregatorClosedError("add() was waiting for room when shutdown() began")
            if self._estimate() < limit:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not waited:
                waited = True
                self.adds_waited += 1
            if self._output_full():
                # A flush now would only re-queue: wait for a consumer, a slice at a time so
                # that a shutdown beginning meanwhile is seen (_room is not held meanwhile).
                self._room.release()
                try:
                    self._wait_for_output(min(remaining, _SLICE))
                finally:
                    self._room.acquire()
                continue
            self._wake_flusher()  # again after each flush that made no room
            self._room.wait(remaining)
        self.buffer_full_errors += 1
        raise BufferFullError(
            f"{self._name}: the buffer holds {self._estimate()} record(s), max_buffered={limit}; "
            f"no flush made room within max_block={self.max_block:g} s (are the consumers "
            "keeping up?); nothing was stored"
        )

    def _output_full(self) -> bool:
        aggregator = self._aggregator()
        return aggregator is not None and aggregator.pending >= aggregator.max_pending

    def _wait_for_output(self, seconds: float) -> None:
        aggregator = self._aggregator()
        if aggregator is not None:
            aggregator._output.wait_for_room(seconds)

    def _shutting_down(self) -> bool:
        aggregator = self._aggregator()
        return aggregator is None or aggregator._shutting_down

    def _add(self, key: Any, value: Any, /) -> bool:
        """``add`` for a storage without ``limit_new_records``: one estimate per call."""
        if self._base + self._storage.counts()[1] < self._slow_from:
            return self._storage.add(key, value)
        if self._storage.get(key, _MISSING) is not _MISSING:  # a merge: always accepted (BUF-1)
            return self._storage.add(key, value)
        after = self.admit()
        try:
            return self._storage.add(key, value)
        finally:
            if after is not None:
                after()
