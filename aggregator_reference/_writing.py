"""The writer side of the engine beyond ``add``: ``add_many`` and ``adder``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from functools import partial
from typing import Generic, TypeVar

__all__ = ["Writing"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Writing(Generic[K, V]):
    """What writers call besides ``add``; mixed into :class:`~aggregator_reference.BufferedAggregator`."""

    add: Callable[[K, V], bool]

    def add_many(self, pairs: Iterable[tuple[K, V]]) -> int:
        """``add(key, value)`` for each pair, in order, from this thread; return how many merged (ADD-7).

        Thread-safe, as ``add``. If a pair fails (not a pair, an unhashable
        key, ``merge`` raised, the aggregator closed), the pairs before it stay
        added and the exception propagates with a note naming the pair's index.

        Raises:
            Whatever ``add`` raises for the failing pair; ``TypeError``/``ValueError``
            for an item that is not a ``(key, value)`` pair.
        """
        add = self.add
        merged = 0
        for index, pair in enumerate(pairs):  # an error of the iterable itself propagates as it is
            try:
                key, value = pair
                if add(key, value):
                    merged += 1
            except Exception as exc:
                exc.add_note(f"add_many(): pair {index} failed; the {index} pair(s) before it stay added")
                raise
        return merged

    def adder(self) -> Callable[[K, V], bool]:
        """Return an ``add`` for the calling thread to keep: a new object at each call (ADD-8).

        It takes the same arguments, returns and raises the same as ``add``,
        and is thread-safe as ``add`` is. Give each writer thread its own:
        on free-threaded CPython, threads calling one shared ``add`` object
        all update its reference count, which costs more than the add itself
        once two threads do it; on GIL builds it costs nothing extra.
        """
        add = self.add
        owner, name = getattr(add, "__self__", None), getattr(add, "__name__", None)
        if owner is not None and isinstance(name, str):
            fresh = getattr(owner, name, None)  # a method: bound anew at each access
            if fresh is not add and fresh == add:
                return fresh  # type: ignore[no-any-return]
        return partial(add)
