"""What an aggregator becomes in a child process after ``os.fork()`` (LIFE-3)."""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

from . import _kit
from ._errors import AggregatorClosedError
from ._pacing import Pacer

if TYPE_CHECKING:
    from ._engine import BufferedAggregator

__all__ = ["disown"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ForkedStorage(Generic[K, V]):
    """The storage of an aggregator inherited through ``fork()``: empty, refusing every add."""

    shards = 1

    def __init__(self, parent: int) -> None:
        self._parent = parent

    def add(self, key: K, value: V, /) -> NoReturn:
        raise AggregatorClosedError(
            f"add() on an aggregator inherited from the parent process (pid {self._parent}) "
            f"through os.fork(); in this child process (pid {os.getpid()}) it is closed and its "
            "copied records belong to the parent: create a new aggregator in the child"
        )

    def get(self, key: K, default: object, /) -> object:
        hash(key)
        return default

    def snapshot(self) -> dict[K, V]:
        return {}

    def __len__(self) -> int:
        return 0

    def detach(self) -> list[Mapping[K, V]]:
        return []

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        return leftover

    def close(self) -> None:
        pass

    def counts(self) -> tuple[int, int]:
        return 0, 0


def disown(aggregators: Iterable[BufferedAggregator[Any, Any]], parent: int) -> None:
    """In the child: drop the parent's records (no warning), and close each aggregator for good.

    Runs in the child right after ``fork()``, where only the forking thread
    exists: every lock the copies hold may be held by a thread that is not
    here, so each is replaced, never waited for.
    """
    _kit._forked_from = parent  # an add kept from before the fork says why it is refused
    for aggregator in aggregators:
        # A reference to the old storage's add kept before the fork (``add = agg.add``) must
        # refuse too; stop_adds() returns at once (a close() could wait for a missing thread).
        stop_adds = getattr(aggregator._storage, "stop_adds", None)
        if stop_adds is not None:
            stop_adds()
        storage: ForkedStorage[Any, Any] = ForkedStorage(parent)
        aggregator._storage = storage
        aggregator.add = storage.add
        aggregator.__dict__.pop("add_many", None)  # the engine's, which calls add
        aggregator._output.abandon()  # its records are the parent's; consumers begun end at once
        for delivery in aggregator._deliveries:
            delivery._forsake(parent)  # its thread is in the parent: wait() returns at once here
        aggregator._flush_lock = threading.Lock()
        aggregator._closer_lock = threading.Lock()
        aggregator._closer = None
        aggregator._flusher = None
        aggregator._pacer = Pacer(aggregator, storage, None, 0.0, None)
        aggregator._shutting_down = True
        aggregator._closed = True
