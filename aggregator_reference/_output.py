"""The bounded output between the flusher and the consumers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["Output"]

T = TypeVar("T")


def _ready(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Output(Generic[T]):
    """A bounded FIFO that many consumers take from and one flush at a time puts into.

    Unlike :class:`queue.Queue` it never blocks a producer: :meth:`offer` puts
    what fits and says how many, so the caller can re-queue the rest.

    Consumers in threads wait on a condition; consumers in event loops
    register a future (:meth:`waiter`) that an arrival or :meth:`close`
    resolves through ``loop.call_soon_threadsafe``: nothing polls.

    Thread safety: every method may be called from any thread. All state is
    guarded by ``_mutex``; no user code runs while it is held.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        # When the items arrived, oldest first: [monotonic time, how many of the items are left].
        self._arrivals: deque[list[float]] = deque()
        self._closed = False
        # Threads waiting in wait_for_room(): a take notifies _not_full only if there are any.
        self._room_waiters = 0
        # Futures of event-loop consumers waiting for items, each with its loop.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        # Guards everything above.
        self._mutex = threading.Lock()
        # Notified when items arrive or the output closes (consumers wait on it).
        self._not_empty = threading.Condition(self._mutex)
        # Notified when items are taken or the output closes (shutdown waits on it).
        self._not_full = threading.Condition(self._mutex)

    def __len__(self) -> int:
        """Items waiting now; stale as soon as it returns."""
        return len(self._items)

    def offer(self, items: list[T]) -> int:
        """Append as many of ``items`` as fit under ``maxsize``, in order; return how many."""
        with self._mutex:
            room = self.maxsize - len(self._items)
            if room <= 0 or not items:
                return 0
            taken = items if room >= len(items) else items[:room]
            self._arrived(taken)
            return len(taken)

    def force(self, items: Iterable[T]) -> None:
        """Append ``items`` even past ``maxsize`` (for records that must not wait in the buffer)."""
        with self._mutex:
            self._arrived(list(items))

    def _arrived(self, items: list[T]) -> None:
        """Append ``items`` and wake every consumer (with ``_mutex`` held)."""
        if not items:
            return
        self._items.extend(items)
        self._arrivals.append([time.monotonic(), len(items)])
        # All of them: a batch consumer woken too early must not swallow the wakeup of another.
        self._not_empty.notify_all()
        self._wake_loops()

    def _wake_loops(self) -> None:
        for loop, future in self._waiters:
            try:
                loop.call_soon_threadsafe(_ready, future)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass
        self._waiters.clear()

    def _pop_one(self) -> T:
        """:meth:`_pop` of one item, without building a list: ``records()`` calls it per record."""
        item = self._items.popleft()
        oldest = self._arrivals[0]
        oldest[1] -= 1
        if not oldest[1]:
            self._arrivals.popleft()
        if self._room_waiters:
            self._not_full.notify_all()
        return item

    def _pop(self, count: int) -> list[T]:
        """Remove the ``count`` oldest items (with ``_mutex`` held); wake whoever waits for room."""
        items, arrivals = self._items, self._arrivals
        taken = [items.popleft() for _ in range(count)]
        while count:
            oldest = arrivals[0]
            used = min(count, int(oldest[1]))
            oldest[1] -= used
            count -= used
            if not oldest[1]:
                arrivals.popleft()
        if taken and self._room_waiters:
            self._not_full.notify_all()
        return taken

    def take(self, limit: int | None = None) -> list[T]:
        """Remove and return up to ``limit`` items (all when ``None``) without blocking."""
        with self._mutex:
            return self._pop(len(self._items) if limit is None else min(limit, len(self._items)))

    def get(self) -> tuple[bool, T | None]:
        """Block for the next item: ``(True, item)``, or ``(False, None)`` once closed and empty."""
        with self._mutex:
            while not self._items:
                if self._closed:
                    return False, None
                self._not_empty.wait()
            return True, self._pop_one()

    def batch_now(self, max_size: int, max_wait: float) -> list[T] | float | None:
        """A batch if one is due now, else how long until one may be; ``None`` once closed and empty.

        A batch is due when ``max_size`` items wait, when the output is full
        (no more can arrive until some are taken), when the oldest waited
        ``max_wait`` seconds, or when the output is closed. Returns the batch
        (a non-empty list), or the seconds to wait before asking again
        (``float('inf')`` while empty), or ``None``.
        """
        with self._mutex:
            return self._batch_locked(max_size, max_wait)

    def _batch_locked(self, max_size: int, max_wait: float) -> list[T] | float | None:
        if not self._items:
            return None if self._closed else float("inf")
        left = self._arrivals[0][0] + max_wait - time.monotonic()
        waiting = len(self._items)
        if waiting >= max_size or waiting >= self.maxsize or self._closed or left <= 0:
            return self._pop(min(max_size, len(self._items)))
        return left

    def get_batch(self, max_size: int, max_wait: float) -> list[T] | None:
        """Block for the next batch (see :meth:`batch_now`); ``None`` once closed and empty."""
        with self._mutex:
            while True:
                batch = self._batch_locked(max_size, max_wait)
                if not isinstance(batch, float):
                    return batch
                self._not_empty.wait(None if batch == float("inf") else batch)

    def get_now(self) -> tuple[bool, T | None] | None:
        """The next item now: ``(True, item)``; ``(False, None)`` once closed and empty; else ``None``."""
        with self._mutex:
            if self._items:
                return True, self._pop_one()
            return (False, None) if self._closed else None

    def waiter(self, loop: asyncio.AbstractEventLoop, fewer_than: int) -> asyncio.Future[None] | None:
        """A future that the next arrival or :meth:`close` resolves, from any thread.

        ``None`` (nothing to wait for) if ``fewer_than`` items or more wait
        already, or the output is closed. Call it from ``loop``'s thread.
        """
        with self._mutex:
            if len(self._items) >= fewer_than or self._closed:
                return None
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
            return future

    def forget(self, future: asyncio.Future[None]) -> None:
        """Stop waking ``future`` (its consumer stopped waiting: timed out or cancelled)."""
        with self._mutex:
            self._waiters = [(loop, f) for loop, f in self._waiters if f is not future]

    def wait_for_room(self, timeout: float) -> bool:
        """Block until the output has room; ``False`` if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._mutex:
            while len(self._items) >= self.maxsize:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._room_waiters += 1
                try:
                    self._not_full.wait(remaining)
                finally:
                    self._room_waiters -= 1
            return True

    def close(self) -> None:
        """No more items will come; wake every waiting consumer."""
        with self._mutex:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
            self._wake_loops()

    def abandon(self) -> None:
        """In a child process after ``os.fork()``: drop every item (the parent's) and close.

        Only the forking thread exists there: the mutex may be held by a thread
        that is gone, so it is replaced, never waited for. A consumer started
        before the fork ends at once, delivering nothing twice (LIFE-3).
        """
        self._mutex = threading.Lock()
        self._not_empty = threading.Condition(self._mutex)
        self._not_full = threading.Condition(self._mutex)
        self._items.clear()
        self._arrivals.clear()
        self._waiters = []
        self._room_waiters = 0
        self._closed = True
