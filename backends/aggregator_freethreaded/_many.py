"""``add_many`` of the freethreaded storage: merges into the thread's buffer in runs (ADD-7)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
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

#: What :meth:`AddingMany._run` returns when the pairs ran out.
_END: Any = object()


class AddingMany(Generic[K, V]):
    """``add_many`` for :class:`~aggregator_freethreaded.FreeThreadedStorage`.

    A list or tuple of pairs is added in runs: one pair through ``add`` (which
    makes the thread's buffer, takes records from home and stores new ones),
    then the pairs after it whose key is in the thread's buffer are merged
    there under one busy mark (GIL builds) or one hold of the buffer's lock
    (free-threaded builds), up to :data:`RUN` of them, counted once at the end
    of the run. No user code but ``merge`` and the keys' ``__hash__``/``__eq__``
    runs inside a run, as inside one ``add``, and the list is read as a loop
    of ``add`` reads it (a ``merge`` may change it). Any other iterable (a
    generator runs code of its own) is added one ``add`` at a time, and so is
    a pair that is not a tuple. Only the run is marked as holding a lock
    (:func:`~aggregator_reference.kit.holds_locks`): code that produces or
    unpacks the pairs is the caller's, and may flush or shut down.
    """

    _local: threading.local
    _merge: Callable[[V, V], V]
    _closed: bool
    add: Callable[[K, V], bool]

    def add_many(self, pairs: Iterable[tuple[K, V]], /) -> int:
        """``add`` each pair in order from this thread; return how many merged (ADD-7)."""
        if type(pairs) is not list and type(pairs) is not tuple:
            return ar.BufferedAggregator.add_many(self, pairs)  # type: ignore[arg-type]  # add() each
        add = self.add
        iterator = iter(pairs)  # a list's or tuple's: runs no code of the caller's
        merged = index = 0
        ran = [0]  # pairs merged by the last run, also when it raised
        try:
            pair = next(iterator, _END)
            while pair is not _END:
                key, value = pair
                if add(key, value):
                    merged += 1
                index += 1
                pair = self._run(iterator, ran)
                index += ran[0]
                merged += ran[0]
                ran[0] = 0
        except Exception as exc:
            index += ran[0]  # the run that raised merged these before the failing pair
            exc.add_note(f"add_many(): pair {index} failed; the {index} pair(s) before it stay added")
            raise
        return merged

    @kit.holds_locks
    def _run(self, iterator: Iterator[Any], ran: list[int]) -> Any:
        """Merge the next pairs into this thread's buffer while their key is there, up to RUN.

        Returns the pair it stopped at, not added (or ``_END``); ``ran[0]`` is
        how many it merged, also when a merge raised.
        """
        buffer = self._local.buffer  # the add() just before made it
        held = buffer.lock  # named so that a wait from inside merge is bounded (kit)
        if not buffer.locked:
            buffer.busy = True
        elif not held.acquire(False):  # a flush or read has it: the next pair by add()
            del held
            return next(iterator, _END)
        merge = self._merge
        run = 0
        try:
            data = buffer.state[0]
            for pair in iterator:
                if type(pair) is not tuple or self._closed:
                    return pair
                key, value = pair
                if key not in data:
                    return pair
                data[key] = merge(data[key], value)
                run += 1
                if run == RUN:
                    return next(iterator, _END)
            return _END
        finally:
            ran[0] = run
            buffer.merges += run
            if buffer.locked:
                held.release()
            else:
                buffer.busy = False
