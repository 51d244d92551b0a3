"""One gather of the freethreaded storage: every buffer's records, each key's pieces combined in order."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, final

from aggregator_reference import kit

from ._parts import _HOME, combine, first_stamps, place, same_key

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


def settle_among_orphans(
    leftover: list[tuple[K, V]],
    orphans: list[tuple[K, V]],
    merge: Callable[[V, V], V],
    on_split: Callable[[object], None],
) -> tuple[list[tuple[K, V]], kit.Unsettled[K, V] | None]:
    """Merge each pair of ``leftover`` into the oldest orphan of its key; return the others.

    For a flush's re-queue: orphans made meanwhile (a read split the key,
    FLUSH-6) are newer than what the flush held, so ``merge(leftover, half)``
    takes the oldest half's place (FLUSH-2), under the leftover's key object,
    the older one (KEY-1). A merge that raises splits the key once more:
    ``on_split`` logs and counts it, and the pair goes ahead of the orphans,
    older first. Returns the pairs whose key has no orphan, to re-queue at
    home, and ``None``; or, when a ``BaseException`` stopped it, no pairs and
    every pair not settled, ``interrupt`` set if it is not an ``Exception``
    (FLUSH-5): deliver them.
    """
    rest: list[tuple[K, V]] = []
    ahead: list[tuple[K, V]] = []  # pairs whose merge into their key's half raised
    for index, pair in enumerate(leftover):
        try:
            settled = _into_oldest_half(pair, orphans, merge, on_split, ahead)
        except BaseException as exc:  # nothing more runs: what is not settled is delivered
            orphans[:0] = ahead
            stopped: kit.Unsettled[K, V] = kit.Unsettled([*rest, *leftover[index:]])
            stopped.interrupt = None if isinstance(exc, Exception) else exc
            return [], stopped
        if not settled:
            rest.append(pair)
    orphans[:0] = ahead
    return rest, None


def _into_oldest_half(
    pair: tuple[K, V],
    orphans: list[tuple[K, V]],
    merge: Callable[[V, V], V],
    on_split: Callable[[object], None],
    ahead: list[tuple[K, V]],
) -> bool:
    """Merge ``pair`` into the oldest orphan of its key, or add it to ``ahead`` if that merge raises.

    Returns whether the key has an orphan; keys match as in a dict, identity
    first (a NaN is only itself, KEY-1), and a comparison that raises is no
    match: that pair is re-queued at home like any other.
    """
    key, value = pair
    at = next((index for index, (orphan, _) in enumerate(orphans) if same_key(orphan, key)), None)
    if at is None:
        return False
    try:
        orphans[at] = (key, merge(value, orphans[at][1]))
    except Exception:
        on_split(key)
        ahead.append(pair)
    return True
