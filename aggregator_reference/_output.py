"""The bounded output between the flusher and the consumers."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["Output"]

T = TypeVar("T")


class Output(Generic[T]):
    """A bounded FIFO that many consumers take from and one flush at a time puts into.

    Unlike :class:`queue.Queue` it never blocks a producer: :meth:`offer` puts
    what fits and says how many, so the caller can re-queue the rest.

    Thread safety: every method may be called from any thread. All state is
    guarded by ``_mutex``; no user code runs while it is held.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._closed = False
        # Guards _items and _closed.
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
            self._items.extend(taken)
            self._not_empty.notify(len(taken))
            return len(taken)

    def force(self, items: Iterable[T]) -> None:
        """Append ``items`` even past ``maxsize`` (for records that must not wait in the buffer)."""
        with self._mutex:
            before = len(self._items)
            self._items.extend(items)
            self._not_empty.notify(len(self._items) - before)

    def take(self, limit: int | None = None) -> list[T]:
        """Remove and return up to ``limit`` items (all when ``None``) without blocking."""
        with self._mutex:
            count = len(self._items) if limit is None else min(limit, len(self._items))
            taken = [self._items.popleft() for _ in range(count)]
            if taken:
                self._not_full.notify_all()
            return taken

    def get(self) -> tuple[bool, T | None]:
        """Block for the next item: ``(True, item)``, or ``(False, None)`` once closed and empty."""
        with self._mutex:
            while not self._items:
                if self._closed:
                    return False, None
                self._not_empty.wait()
            item = self._items.popleft()
            self._not_full.notify_all()
            return True, item

    def wait_for_room(self, timeout: float) -> bool:
        """Block until the output has room; ``False`` if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._mutex:
            while len(self._items) >= self.maxsize:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._not_full.wait(remaining)
            return True

    def close(self) -> None:
        """No more items will come; wake every waiting consumer."""
        with self._mutex:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
