"""The freethreaded storage's parts: per-thread buffers, pair chunks, waits, the order of pieces."""

from __future__ import annotations

import logging
import sys
import sysconfig
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, MutableSequence
from typing import Any, ClassVar, Generic, NoReturn, TypeVar, final

import aggregator_reference as ar
from aggregator_reference import kit

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Whether this CPython was built with ``--disable-gil`` (the GIL may still be on at run time).
FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

logger = logging.getLogger("aggregator_reference")

#: A buffer's records and the stamp of the add that stored each, in insertion order (an
#: ``array("q")``: 8 bytes a record, where a list of ints costs 40).
State = tuple[dict[K, V], MutableSequence[int]]

_now = time.perf_counter_ns
#: The stamp of a partial taken from home: older than any other partial of its key.
_FROM_HOME = -1
#: The stamp of a record at home (not stored): older than every partial.
_HOME = -2
#: A buffer's ``allowed`` while the engine sets no bound (BUF-1).
UNLIMITED = sys.maxsize


class _ThreadMark:
    """Lives as long as its thread's state: the interpreter drops it once the thread has ended."""

    __slots__ = ("__weakref__",)


_marks = threading.local()  # each thread's _ThreadMark


def this_threads_mark() -> weakref.ref[Any]:
    """A weak reference to the calling thread's mark: dead once the thread has ended.

    Not ``Thread.is_alive()``: that says ``False`` for the main thread in
    ``atexit`` handlers, which may still add.
    """
    try:
        mark = _marks.mark
    except AttributeError:
        _marks.mark = mark = _ThreadMark()
    return weakref.ref(mark)


@final
class Buffer(Generic[K, V]):
    """One thread's records.

    ``state`` is ``(records, stamps)``: the records, and the stamp of the add
    that stored each one, in the records' insertion order (the owner never
    deletes a record); it is replaced whole, so that a flush takes both at once.
    Only the owner thread writes ``busy``, ``merges``, ``stored``, and writes
    into ``state``'s dict and stamps; other threads replace ``state`` (taking the
    records out) only while holding the storage's ``_shared`` lock, and on
    free-threaded builds also ``lock``, which the owner holds for the whole of
    each ``add``. ``allowed`` is written under the engine's bound lock (BUF-1).
    """

    __slots__ = ("_mark", "allowed", "busy", "lock", "merges", "state", "stored", "stranded")

    #: Whether the owner holds ``lock`` for the whole of each add (free-threaded builds), so
    #: that others take ``lock`` to keep it out; else they watch ``busy``. A compiled buffer
    #: that marks ``busy`` with atomic operations says ``False`` on every build.
    locked: ClassVar[bool] = FREE_THREADED_BUILD

    @staticmethod
    def new_state() -> State[Any, Any]:
        """An empty state, what a taker leaves in place of the one it takes.

        The stamps are an ``array("q")``; a compiled buffer keeps them in a type of its own.
        """
        return {}, array("q")

    def __init__(self, allowed: int) -> None:
        #: ``stored`` up to which the owner may store new records without asking the
        #: engine (BUF-1); written by the owner and, to revoke, by a flush.
        self.allowed = allowed
        self.state: State[K, V] = self.new_state()
        #: GIL builds: states taken out by a read or flush that then gave up waiting for the
        #: add in flight (which may still write into them), older than ``state``; guarded by
        #: the storage's ``_shared``, never touched by the owner.
        self.stranded: list[State[K, V]] = []
        self.lock = threading.Lock()
        self.busy = False  # the owner is inside add(), or inside a merge run on its behalf
        self.merges = 0
        self.stored = 0
        self._mark = this_threads_mark()  # made by the owner thread

    @property
    def alive(self) -> bool:
        """Whether the owner thread may still add (a flush drops the buffers of ended threads)."""
        return self._mark() is not None


@final
class Pairs(Mapping[K, V]):
    """Records kept as pairs, for keys that may not hash: iterating never hashes a key.

    A key is found as a dict finds it (KEY-1): by identity first (a NaN is
    itself), then by ``==``; a key whose ``__eq__`` raises matches nothing but
    itself, so one such key never breaks a look-up of another.
    """

    def __init__(self, pairs: list[tuple[K, V]]) -> None:
        self._pairs = pairs

    def __getitem__(self, key: K) -> V:
        for stored, value in self._pairs:
            if same_key(stored, key):
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[K]:
        return (key for key, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def items(self) -> Any:
        return list(self._pairs)


def same_key(stored: object, key: object) -> bool:
    """Whether ``key`` is ``stored`` as a dict would tell (KEY-1); a comparison that raises says no."""
    if stored is key:
        return True
    try:
        return bool(stored == key)
    except Exception:
        return False


def wait_until_idle(buffer: Buffer[Any, Any], deadline: float | None) -> bool:
    """GIL builds: wait for the owner to leave ``add()``, sleeping; ``False`` once past ``deadline``."""
    pause = 0.0
    while buffer.busy:
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(0.001, pause * 2 or 1e-6)
    return True


def refuse_wait(call: str) -> NoReturn:
    raise ar.ReentrantMergeError(
        f"{call} called from inside merge waited {kit.CALLBACK_WAIT} s for a thread that may be "
        "waiting for this one; refused rather than risk a deadlock"
    )


def first_stamps(
    gathered: dict[K, V], adopted: MutableSequence[int] | None, home_keys: dict[K, K]
) -> dict[K, tuple[int, K]]:
    """The first-add stamp and key object of each gathered record: home's, or an adopted buffer's."""
    firsts: dict[K, tuple[int, K]] = {}
    for index, key in enumerate(gathered):
        stamp = _HOME if adopted is None else adopted[index] if index < len(adopted) else 0
        try:
            firsts[key] = (stamp, home_keys.get(key, key))
        except Exception:  # a key whose hash fails now: its pieces are combined as home's
            pass
    return firsts


def combine(
    pieces: list[tuple[int, int, K, V]],
    merge: Callable[[V, V], V],
    orphans: list[tuple[K, V]],
    on_error: Callable[[object], None],
) -> tuple[K, V]:
    """Merge one key's pieces, oldest first; return the record, under the key added first.

    A ``merge`` that raises splits the record (FLUSH-6): what was combined
    so far waits in ``orphans``, delivered first, and the piece goes on.
    A ``BaseException`` leaves every piece not combined among the orphans
    too, in order, and propagates.
    """
    pieces.sort(key=lambda piece: piece[:2])
    first = pieces[0][2]
    record = pieces[0][3]
    for index in range(1, len(pieces)):
        value = pieces[index][3]
        try:
            record = merge(record, value)
        except Exception:
            on_error(first)
            orphans.append((first, record))
            record = value
        except BaseException:
            orphans.append((first, record))
            orphans.extend((first, piece[3]) for piece in pieces[index:])
            raise
    return first, record


def place(
    gathered: dict[K, V],
    firsts: dict[K, tuple[int, K]],
    extra: dict[K, list[tuple[int, int, K, V]]],
    records: dict[K, V],
    order: MutableSequence[int],
    *,
    orphans: list[tuple[K, V]],
    on_error: Callable[[object], None],
) -> None:
    """Put one buffer's records into ``gathered``, or in ``extra`` where the key is there already."""
    pairs = list(records.items())
    for index, (key, value) in enumerate(pairs):
        stamp = order[index] if index < len(order) else 0
        try:
            if key in gathered:
                pieces = extra.get(key)
                if pieces is None:
                    extra[key] = pieces = []
                pieces.append((stamp, len(pieces), key, value))
            else:
                firsts[key] = (stamp, key)  # first: a hash failing here leaves nothing half placed
                gathered[key] = value
        except Exception:  # its __hash__/__eq__ raised: a record of its own
            on_error(key)
            orphans.append((key, value))


def take(
    buffer: Buffer[K, V], me: Buffer[K, V], deadline: float | None, *, block: bool = True
) -> list[State[K, V]] | None:
    """Take every record out of ``buffer``, oldest state first (the storage's ``_shared`` held).

    ``me`` is the caller's own buffer, locked and busy. Waits for an add in
    flight in ``buffer``, until ``deadline`` if set, then refuses; with
    ``block=False``, returns ``None`` at once instead when an add is in flight.
    """
    if buffer is me:
        taken, me.state = me.state, me.new_state()
    elif buffer.locked:
        if not buffer.lock.acquire(False):
            if not block:
                return None
            wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
            if not kit.acquire_interruptibly(buffer.lock, wait):
                refuse_wait("a read or flush")
        try:
            taken, buffer.state = buffer.state, buffer.new_state()
        finally:
            buffer.lock.release()
    else:
        if buffer.busy and not block:
            return None
        taken, buffer.state = buffer.state, buffer.new_state()
        try:
            idle = wait_until_idle(buffer, deadline)
        except BaseException:  # an interrupt while it waited (THREAD-2): keep ``taken`` as below
            buffer.stranded.append(taken)
            raise
        if not idle:
            # The add in flight may still write into ``taken``, and a later add may have
            # begun on the new state: keep both, ``taken`` for a gather that sees it idle.
            buffer.stranded.append(taken)
            refuse_wait("a read or flush")
    states, buffer.stranded = [*buffer.stranded, taken], []  # idle was seen: none is written now
    return states


def wait_for_adds(buffers: Iterable[Buffer[Any, Any]]) -> None:
    """Wait for every add in flight in ``buffers`` to return."""
    for buffer in buffers:
        if buffer.locked:
            with buffer.lock:
                pass
        else:
            wait_until_idle(buffer, None)


def count_keys(home: Mapping[K, V], buffers: Iterable[Buffer[K, V]], others: Iterable[Mapping[K, V]]) -> int:
    """The number of distinct keys, without merging anything (the storage's ``_shared`` held)."""
    keys: set[K] = set(home)
    for buffer in buffers:
        for records, _ in (*buffer.stranded, buffer.state):
            keys.update(list(records))  # one call copies it: an add may be writing
    for chunk in others:
        keys.update(chunk)
    return len(keys)
