"""One gather of the freethreaded storage: every buffer's records, each key's pieces combined in order."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, MutableSequence
from typing import Generic, TypeVar, final

from aggregator_reference import kit

from ._parts import _HOME, Buffer, Pairs, State, combine, first_stamps, logger, place, same_key, take

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

#: One key's pieces: (first-add stamp, arrival index, key object, record).
Piece = tuple[int, int, K, V]


@final
class Gathering(Generic[K, V]):
    """Collects the records of home and of each buffer taken, then combines each key's pieces.

    The order of a key's pieces (ADD-5, KEY-1): home's record (re-queued or
    read, older than any partial), the piece an add took from home, then the
    partials in the order of their first add. Placing runs no ``merge`` and
    works on copies: when it raises, nothing has changed and the caller puts
    what it took back. Combining runs ``merge``: when it stops half way,
    :meth:`abandon` keeps each key's newest piece in what was gathered and
    sends its older pieces to the orphans, oldest first, so that they go out
    ahead of it. Used by one thread, with the storage's ``_shared`` held.
    """

    def __init__(self, home: dict[K, V], home_keys: dict[K, K], on_error: Callable[[object], None]) -> None:
        self.gathered = dict(home)  # a copy (no key is hashed): home stays as it was until the end
        self._home_keys = home_keys
        self._on_error = on_error
        #: Records whose key's hash raised an ``Exception`` while placed: logged, records of their own.
        self.split: list[tuple[K, V]] = []
        self._firsts: dict[K, tuple[int, K]] | None = None  # stamp and key object of each gathered record
        self._adopted: MutableSequence[int] | None = None  # the stamps of a buffer's dict adopted whole
        self._extra: dict[K, list[Piece[K, V]]] = {}  # pieces of keys found twice
        self._combining: list[list[Piece[K, V]]] = []  # pieces out of extra and gathered
        self._unjoined: list[Piece[K, V]] | None = None  # out of extra, not yet joined

    def place(self, states: list[State[K, V]]) -> None:
        """Place the states taken (records and their stamps), one buffer's oldest first; no merge runs."""
        for records, order in states:
            if not records:
                continue  # nothing to place: no key needs hashing for it
            if not self.gathered:
                self.gathered, self._adopted = dict(records), order  # nothing older: adopt a copy
                continue
            if self._firsts is None:
                self._firsts = first_stamps(self.gathered, self._adopted, self._home_keys)
            place(
                self.gathered,
                self._firsts,
                self._extra,
                records,
                order,
                orphans=self.split,
                on_error=self._on_error,
            )

    def _join_one(self, pieces: list[Piece[K, V]]) -> None:
        """Move the gathered record of the key of ``pieces`` into them; nothing changes if it raises."""
        key = pieces[0][2]
        firsts = self._firsts
        stamp, first = firsts.get(key, (_HOME, key)) if firsts is not None else (_HOME, key)
        pieces.append((stamp, -1, first, self.gathered.pop(key)))
        self._combining.append(pieces)

    def _join(self) -> list[list[Piece[K, V]]]:
        """Join every key found more than once with its gathered record (hashing each key)."""
        extra = self._extra
        while extra:
            _, pieces = extra.popitem()  # no hash: a key whose hash fails now stays out of extra
            self._unjoined = pieces
            self._join_one(pieces)
            self._unjoined = None
        return self._combining

    def combined(self, merge: Callable[[V, V], V], orphans: list[tuple[K, V]]) -> dict[K, V]:
        """Combine the pieces of every key found more than once; return every record.

        A ``merge`` that raises splits a key's record into ``orphans`` (FLUSH-6).
        """
        gathered = self.gathered
        combining = self._join()
        while combining:
            pieces = combining.pop()
            try:
                first, record = combine(pieces, merge, orphans, self._on_error)
            except BaseException:  # combine() orphaned every piece, in order: the newest stays home
                _home_newest(gathered, orphans)
                raise
            try:
                gathered[first] = record
            except Exception:  # its hash failed now: a record of its own
                orphans.append((first, record))
            except BaseException:
                orphans.append((first, record))
                raise
        return gathered

    def abandon(self, orphans: list[tuple[K, V]]) -> dict[K, V]:
        """After combining stopped: each key not combined keeps its newest piece; return what was gathered.

        A key whose own hash fails now cannot be joined with its gathered
        (older) record: its newer pieces go to the orphans (FLUSH-5 exempts it).
        """
        waiting = list(self._extra.values())
        if self._unjoined is not None:
            waiting.append(self._unjoined)
        self._extra.clear()
        for pieces in waiting:
            try:
                self._join_one(pieces)
            except BaseException:
                pieces.sort(key=lambda piece: piece[:2])
                orphans.extend((piece[2], piece[3]) for piece in pieces)
        for pieces in self._combining:
            pieces.sort(key=lambda piece: piece[:2])
            first = pieces[0][2]
            orphans.extend((first, piece[3]) for piece in pieces)
            _home_newest(self.gathered, orphans)
        return self.gathered


def _home_newest(gathered: dict[K, V], orphans: list[tuple[K, V]]) -> None:
    """Move the last orphan (a key's newest piece) back into ``gathered``, if its key hashes now."""
    key, newest = orphans.pop()
    try:
        gathered[key] = newest
    except BaseException:  # its hash fails: it stays an orphan, last
        orphans.append((key, newest))


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


class Gatherer(Generic[K, V]):
    """The freethreaded storage's gathers: taking every buffer's records and moving them home.

    A base of :class:`~aggregator_freethreaded.FreeThreadedStorage`, whose
    docstring says which lock guards each attribute named below.
    """

    _merge: Callable[[V, V], V]
    _home: dict[K, V]
    _home_keys: dict[K, K]
    _transit: tuple[Mapping[K, V], ...]
    _orphans: list[tuple[K, V]]
    _taken_home: set[K]
    _deadline: float | None
    _gathers: int
    _accounts: tuple[tuple[Buffer[K, V], ...], tuple[int, int]]
    merge_errors: int

    def _log_split(self, key: object) -> None:
        self.merge_errors += 1
        logger.error(
            "freethreaded: merge raised while combining records of key %r from several threads; "
            "the record splits in two, both are delivered, older first",
            key,
            exc_info=True,
        )

    @kit.holds_locks
    def _with_own_merging(self, me: Buffer[K, V], work: Callable[[], T]) -> T:
        """Run ``work`` (it calls ``merge``) with ``me`` locked and busy, so that calls back are refused."""
        held = me.lock
        with held:
            me.busy = True
            try:
                return work()
            finally:
                me.busy = False

    def _gather(self, me: Buffer[K, V], *, home: bool = False) -> dict[K, V]:
        """Take every record out and combine each key's pieces (:class:`Gathering` says in which order).

        Drops the buffers of exited threads. Called with ``_shared`` held. If
        it raises, what was gathered goes back home, pieces not combined go to
        the orphans in order, and buffers not reached keep theirs: nothing is lost.
        """

        def gather() -> dict[K, V]:
            self._gathers += 1  # odd: an add that misses its buffer must ask under _shared
            try:
                gathered = gathered_all()
                if home:  # for a read: the records go home before adds may look there again
                    self._home_at(gathered)
                return gathered
            finally:
                self._gathers += 1

        def gathered_all() -> dict[K, V]:
            buffers, (merges, stored) = self._accounts
            kept, taken = [], []
            try:
                # Buffers with no add in flight first, then wait for the others: a writer
                # descheduled mid-add delays the flush once, not once per such buffer.
                for block, group in ((False, buffers), (True, later := [])):
                    for buffer in group:
                        # Asked before taking: a thread seen dead can add nothing after the take.
                        alive = buffer is me or buffer.alive
                        states = take(buffer, me, self._deadline, block=block)
                        if states is None:
                            later.append(buffer)
                            continue
                        taken.append((buffer, states))
                        if alive:
                            kept.append(buffer)
                        else:
                            merges, stored = merges + buffer.merges, stored + buffer.stored
                gathering = Gathering(self._home, self._home_keys, self._log_split)
                gathering.place([state for _, states in taken for state in states])
            except BaseException:  # no merge ran, nothing changed: every state goes back, in order
                for buffer, states in taken:
                    buffer.stranded[:0] = states
                raise
            self._home, self._home_keys, self._taken_home = {}, {}, set()
            self._accounts = (tuple(kept), (merges, stored))
            orphans = self._orphans
            orphans.extend(gathering.split)
            try:
                return gathering.combined(self._merge, orphans)
            except BaseException:
                self._home_at(gathering.abandon(orphans))
                raise

        return self._with_own_merging(me, gather)

    def _home_at(self, records: dict[K, V]) -> None:
        """Make ``records`` the home (their key objects are the ones stored first)."""
        self._home = records
        self._home_keys = {key: key for key in records}

    def _consolidate(self, me: Buffer[K, V]) -> None:
        """Move every record home, partials combined, for a read. Called with ``_shared`` held."""
        self._gather(me, home=True)

    def _others(self) -> list[Mapping[K, V]]:
        return [*self._transit, Pairs(self._orphans)]
