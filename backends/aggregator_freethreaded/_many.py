"""``add_many`` of the freethreaded storage: merges into the thread's buffer in runs (ADD-7)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aggregator_reference as ar
from aggregator_reference import kit

if TYPE_CHECKING:
    import threading

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Pairs merged in one run at most: a flush or read that finds the run's buffer busy waits
#: for the rest of the run, as it waits for one ``add``.
RUN = 64


class AddingMany(Generic[K, V]):
    """``add_many`` for :class:`~aggregator_freethreaded.FreeThreadedStorage`.

    A list or tuple of pairs is added in runs: one pair through ``add`` (which
    makes the thread's buffer, takes records from home and stores new ones),
    then the pairs after it whose key is in the thread's buffer are merged
    there under one busy mark (GIL builds) or one hold of the buffer's lock
    (free-threaded builds), up to :data:`RUN` of them, counted once at the end
    of the run. No user code but ``merge`` and the keys' ``__hash__``/``__eq__``
    runs inside a run, as inside one ``add``: an iterable that is not a list
    or tuple (a generator may run any code) is added one ``add`` at a time,
    and so is a pair that is not a tuple. A run reads a copy of its part of
    the list: a ``merge`` that changes the list meanwhile changes later runs.
    """

    _local: threading.local
    _merge: Callable[[V, V], V]
    _closed: bool
    add: Callable[[K, V], bool]

    @kit.holds_locks
    def add_many(self, pairs: Iterable[tuple[K, V]], /) -> int:
        """``add`` each pair in order from this thread; return how many merged (ADD-7)."""
        if type(pairs) is not list and type(pairs) is not tuple:
            return ar.BufferedAggregator.add_many(self, pairs)  # type: ignore[arg-type]  # add() each
        items: list[Any] | tuple[Any, ...] = pairs
        add, merge = self.add, self._merge
        merged = index = 0
        try:
            while index < len(items):
                key, value = items[index]
                if add(key, value):
                    merged += 1
                index += 1
                buffer = self._local.buffer  # add() made it
                held = buffer.lock  # named so that a wait from inside merge is bounded (kit)
                if not buffer.locked:
                    buffer.busy = True
                elif not held.acquire(False):  # a flush or read has it: the next pair by add()
                    del held
                    continue
                run = 0
                try:
                    data = buffer.state[0]
                    for pair in items[index : index + RUN]:  # a copy: merge may change the list
                        if type(pair) is not tuple or self._closed:
                            break
                        key, value = pair
                        if key not in data:
                            break
                        data[key] = merge(data[key], value)
                        run += 1
                finally:
                    index += run
                    buffer.merges += run
                    merged += run
                    if buffer.locked:
                        held.release()
                    else:
                        buffer.busy = False
                del held
        except Exception as exc:
            exc.add_note(f"add_many(): pair {index} failed; the {index} pair(s) before it stay added")
            raise
        return merged
