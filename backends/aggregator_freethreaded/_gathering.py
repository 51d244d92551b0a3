"""One gather of the freethreaded storage: every buffer's records, each key's pieces combined in order."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, final

from ._parts import _HOME, combine, first_stamps, place

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: One key's pieces: (first-add stamp, arrival index, key object, record).
Piece = tuple[int, int, K, V]


@final
class Gathering(Generic[K, V]):
    """Collects the records of home and of each buffer taken, then combines each key's pieces.

    The order of a key's pieces (ADD-5, KEY-1): home's record (re-queued or
    read, older than any partial), the piece an add took from home, then the
    partials in the order of their first add. Nothing is lost when it stops
    half way: :meth:`abandon` sends every piece not combined to the orphans, in
    order, and returns what was gathered. Used by one thread, with the
    storage's ``_shared`` held.
    """

    def __init__(
        self,
        home: dict[K, V],
        home_keys: dict[K, K],
        orphans: list[tuple[K, V]],
        on_error: Callable[[object], None],
    ) -> None:
        self.gathered = home
        self._home_keys = home_keys
        self._orphans = orphans
        self._on_error = on_error
        self._firsts: dict[K, tuple[int, K]] | None = None  # stamp and key object of each gathered record
        self._adopted: list[int] | None = None  # the stamps of a buffer's dict adopted whole
        self._extra: dict[K, list[Piece[K, V]]] = {}  # pieces of keys found twice
        self._unplaced: list[tuple[dict[K, V], list[int]]] = []  # taken, not yet placed
        self._combining: list[list[Piece[K, V]]] = []  # pieces out of extra and gathered

    def take(self, states: list[tuple[dict[K, V], list[int]]]) -> None:
        """Place the states taken (records and their stamps); one buffer's oldest first."""
        unplaced = self._unplaced = states
        while unplaced:
            if not unplaced[0][0]:
                unplaced.pop(0)  # nothing to place: no key needs hashing for it
                continue
            if not self.gathered:
                self.gathered, self._adopted = unplaced.pop(0)  # nothing older: adopt it
                continue
            if self._firsts is None:
                self._firsts = first_stamps(self.gathered, self._adopted, self._home_keys)
            records, order = unplaced.pop(0)
            place(
                self.gathered,
                self._firsts,
                self._extra,
                records,
                order,
                orphans=self._orphans,
                on_error=self._on_error,
            )

    def _join(self) -> list[list[Piece[K, V]]]:
        """Move the gathered record of each key found more than once into that key's pieces."""
        gathered, firsts = self.gathered, self._firsts
        self._combining = combining = list(self._extra.values())
        self._extra.clear()
        for pieces in combining:
            key = pieces[0][2]
            stamp, first = firsts.get(key, (_HOME, key)) if firsts is not None else (_HOME, key)
            pieces.append((stamp, -1, first, gathered.pop(key)))
        return combining

    def combined(self, merge: Callable[[V, V], V]) -> dict[K, V]:
        """Combine the pieces of every key found more than once; return every record."""
        gathered = self.gathered
        combining = self._join()
        while combining:  # combine() orphans its own pieces if interrupted
            first, record = combine(combining.pop(), merge, self._orphans, self._on_error)
            try:
                gathered[first] = record
            except Exception:  # its hash failed now: a record of its own
                self._orphans.append((first, record))
        return gathered

    def abandon(self) -> dict[K, V]:
        """After an exception: pieces not combined go to the orphans in order; return what was gathered.

        A key's pieces go out with its oldest, the gathered record, ahead of
        them (older first): only a key whose own hash fails now keeps that one
        home, the next flush's orphans going first.
        """
        for records, _ in self._unplaced:
            self._orphans.extend(records.items())
        if self._extra:
            try:
                self._join()
            except BaseException:  # a key's hash failed: the keys before it are joined
                pass
        for pieces in self._combining:
            pieces.sort(key=lambda piece: piece[:2])
            self._orphans.extend((piece[2], piece[3]) for piece in pieces)
        return self.gathered


def ahead_of_orphans(leftover: list[tuple[K, V]], orphans: list[tuple[K, V]]) -> list[tuple[K, V]]:
    """Move the pairs of ``leftover`` whose key is among ``orphans`` to their front; return the rest.

    For a flush's re-queue: orphans made meanwhile are newer than what it
    held (FLUSH-6, older first). Compares keys with ``==`` only (they may not hash).
    """

    def split_meanwhile(key: K) -> bool:
        return any(orphan == key for orphan, _ in orphans)

    ahead = [pair for pair in leftover if split_meanwhile(pair[0])]
    if not ahead:
        return leftover
    orphans[:0] = ahead
    moved = {id(pair) for pair in ahead}
    return [pair for pair in leftover if id(pair) not in moved]
