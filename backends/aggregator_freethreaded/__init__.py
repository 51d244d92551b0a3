"""The ``freethreaded`` backend: every writer thread merges into a buffer of its own.

Built for interpreters where threads really run in parallel (CPython built
with ``--disable-gil``): ``add`` shares nothing mutable between writers, not a
dict, not a lock, not a counter. Each thread's buffer is registered, so a
flush also reaches the buffers of threads that have exited (and drops them
once empty). Partial records of one key from different threads are merged at
flush, and by ``get`` and ``snapshot``, which move every record into one shared
dict, the *home*, where re-queued records wait too (``len`` only counts). An
``add`` whose key is not in its thread's buffer but at home takes the record
from home into that buffer and merges into it (ADD-1), so with one writer
thread ``add`` returns ``True`` exactly when the key is buffered. It returns
``False`` when only another thread holds a partial record for the key, and
``stats().stored`` counts partial records.

Order (ADD-5, KEY-1): records at home are older than every partial; a partial
taken from home is the oldest of its key; other partials are combined in the
order their first add happened (a ``time.perf_counter_ns()`` stamp, one
system-wide monotonic clock, taken when an ``add`` stores a new partial), and
the key object kept is the earliest one.

On a GIL build the buffer needs no lock at all: the owner marks its buffer
busy while it adds, and a flush that detaches a busy buffer waits for it.
"""

from __future__ import annotations

import logging
import sysconfig
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Generic, TypeVar, final

import aggregator_reference as ar
from aggregator_reference import kit

__all__ = ["FREE_THREADED_BUILD", "FreeThreadedAggregator", "FreeThreadedStorage"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

#: Whether this CPython was built with ``--disable-gil`` (the GIL may still be on at run time).
FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

logger = logging.getLogger("aggregator_reference")

_now = time.perf_counter_ns
#: The stamp of a partial taken from home: older than any other partial of its key.
_FROM_HOME = -1
#: The stamp of a record at home (not stored): older than every partial.
_HOME = -2


@final
class _Buffer(Generic[K, V]):
    """One thread's records.

    ``state`` is ``(records, stamps)``: the records, and the stamp of the add
    that stored each one, in the records' insertion order (the owner never
    deletes a record); it is replaced whole, so that a flush takes both at once.
    Only the owner thread writes ``busy``, ``merges``, ``stored``, and writes
    into ``state``'s dict and list; other threads replace ``state`` (taking the
    records out) only while holding the storage's ``_shared`` lock, and on
    free-threaded builds also ``lock``, which the owner holds for the whole of
    each ``add``.
    """

    __slots__ = ("busy", "lock", "merges", "owner", "state", "stored")

    def __init__(self, owner: threading.Thread) -> None:
        self.state: tuple[dict[K, V], list[int]] = ({}, [])
        self.lock = threading.Lock()
        self.busy = False  # the owner is inside add(), or inside a merge run on its behalf
        self.merges = 0
        self.stored = 0
        self.owner = owner


@final
class _Pairs(Mapping[K, V]):
    """Records kept as pairs, for keys that may not hash: iterating never hashes a key."""

    def __init__(self, pairs: list[tuple[K, V]]) -> None:
        self._pairs = pairs

    def __getitem__(self, key: K) -> V:
        for stored, value in self._pairs:
            if stored == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[K]:
        return (key for key, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def items(self) -> Any:
        return list(self._pairs)


def _wait_until_idle(buffer: _Buffer[Any, Any]) -> None:
    """GIL builds: wait for the owner to leave ``add()`` (one merge at most), sleeping, not spinning hot."""
    pause = 0.0
    while buffer.busy:
        time.sleep(pause)
        pause = min(0.001, pause * 2 or 1e-6)


@final
class FreeThreadedStorage(Generic[K, V]):
    """A :class:`~aggregator_reference.Storage` of per-thread buffers around one shared home.

    Thread safety: ``add`` touches only the calling thread's buffer (and, on
    free-threaded builds, that buffer's uncontended lock), except when its key
    is at home. ``_shared`` (an ``RLock``) guards ``_home``, ``_home_keys``,
    ``_transit``, ``_orphans`` and ``_accounts``, and is held by ``detach``,
    ``requeue``, ``close``, the reads, and an ``add`` that takes a record from
    home; with it held, a buffer's ``lock`` may be taken, one at a time (lock
    order: ``_shared``, then a buffer's ``lock``). ``get``, ``snapshot`` and
    ``len`` from inside ``merge`` raise ``ReentrantMergeError``, and so does
    ``add`` of any key (the thread's buffer is busy).
    """

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        self._merge = merge
        self._local = threading.local()
        self._closed = False
        # Guards everything below; held by add() only to take a record from home.
        self._shared = threading.RLock()
        self._home: dict[K, V] = {}  # re-queued and read records: older than any buffer's data
        self._home_keys: dict[K, K] = {}  # key -> the key object stored at home (KEY-1)
        self._transit: tuple[Mapping[K, V], ...] = ()  # detached, not yet settled
        # Older halves of records split because merge raised (FLUSH-6), oldest first.
        self._orphans: list[tuple[K, V]] = []
        # (buffers, (merges, stored) of dropped buffers), replaced whole so counts() needs no lock.
        self._accounts: tuple[tuple[_Buffer[K, V], ...], tuple[int, int]] = ((), (0, 0))
        #: Merges that raised while partial records were combined, logged (FLUSH-6).
        self.merge_errors = 0
        self.add: Callable[[K, V], bool] = self._add_locked if FREE_THREADED_BUILD else self._add_gil

    @property
    def shards(self) -> int:
        """The number of per-thread buffers right now."""
        return max(1, len(self._accounts[0]))

    # -- the hot path ------------------------------------------------------------

    def _register(self) -> _Buffer[K, V]:
        buffer: _Buffer[K, V] = _Buffer(threading.current_thread())
        with self._shared:
            buffers, retired = self._accounts
            self._accounts = ((*buffers, buffer), retired)
        self._local.buffer = buffer
        return buffer

    @kit.holds_locks
    def _add_gil(self, key: K, value: V, /) -> bool:
        """``add`` on GIL builds: no lock; ``busy`` tells a flush to wait."""
        try:
            buffer: _Buffer[K, V] = self._local.buffer
        except AttributeError:
            buffer = self._register()
        if buffer.busy:
            kit.refuse_reentrant("add()")
        buffer.busy = True
        try:
            if self._closed:
                kit.refuse_closed("add()")
            data, stamps = buffer.state
            if key in data:
                data[key] = self._merge(data[key], value)
                buffer.merges += 1
                return True
            home = self._home
            if not (home and key in home):
                data[key] = value
                stamps.append(_now())
                buffer.stored += 1
                return False
        finally:
            buffer.busy = False
        return self._add_from_home(buffer, key, value)

    @kit.holds_locks
    def _add_locked(self, key: K, value: V, /) -> bool:
        """``add`` on free-threaded builds: the buffer's own lock, contended only by a flush or a read."""
        try:
            buffer: _Buffer[K, V] = self._local.buffer
        except AttributeError:
            buffer = self._register()
        held = buffer.lock
        if not held.acquire(False):
            kit.finish_acquire(held, "add()")
        try:
            if self._closed:
                kit.refuse_closed("add()")
            data, stamps = buffer.state
            if key in data:
                data[key] = self._merge(data[key], value)
                buffer.merges += 1
                return True
            home = self._home
            if not (home and key in home):
                data[key] = value
                stamps.append(_now())
                buffer.stored += 1
                return False
        finally:
            held.release()
        return self._add_from_home(buffer, key, value)

    @kit.holds_locks
    def _add_from_home(self, buffer: _Buffer[K, V], key: K, value: V) -> bool:
        """The rest of an ``add`` whose key is at home: take that record into this thread's buffer.

        Off the hot path: once per key after each re-queue or read. The record
        becomes the oldest partial of its key, under the key object stored first.
        """
        held = buffer.lock
        with self._shared, held:
            buffer.busy = True
            try:
                if self._closed:
                    kit.refuse_closed("add()")
                data, stamps = buffer.state
                home = self._home
                if key in home:
                    merged = self._merge(home[key], value)  # if it raises, home keeps the record
                    original = self._home_keys.pop(key, key)
                    del home[key]
                    data[original] = merged
                    stamps.append(_FROM_HOME)
                    buffer.merges += 1
                    return True
                data[key] = value  # a flush took it meanwhile
                stamps.append(_now())
                buffer.stored += 1
                return False
            finally:
                buffer.busy = False

    # -- moving records between buffers ----------------------------------------------

    def _own(self, call: str) -> _Buffer[K, V]:
        """The calling thread's buffer, refusing a call from inside a merge this thread is running."""
        try:
            buffer: _Buffer[K, V] = self._local.buffer
        except AttributeError:
            return self._register()
        if buffer.busy or (FREE_THREADED_BUILD and kit.held_by_this_thread(buffer.lock)):
            kit.refuse_reentrant(call)
        return buffer

    def _take(self, buffer: _Buffer[K, V], me: _Buffer[K, V]) -> tuple[dict[K, V], list[int]]:
        """Take every record out of a buffer (with ``_shared`` and ``me.lock`` held)."""
        if buffer is me:
            taken, me.state = me.state, ({}, [])
        elif FREE_THREADED_BUILD:
            with buffer.lock:
                taken, buffer.state = buffer.state, ({}, [])
        else:
            taken, buffer.state = buffer.state, ({}, [])
            _wait_until_idle(buffer)  # an add may still be writing into ``taken``
        return taken

    def _fold(self, into: dict[K, V], stamps: dict[K, int], records: dict[K, V], order: list[int]) -> None:
        """Combine one buffer's ``records`` into ``into``, the partial whose first add came first on the left.

        A record whose ``merge`` raises splits (FLUSH-6): its older half waits in
        ``_orphans`` and is delivered first. A record whose key's
        ``__hash__``/``__eq__`` raises becomes an orphan as a whole.
        """
        merge = self._merge
        pairs = list(records.items())
        for index, (key, value) in enumerate(pairs):
            stamp = order[index] if index < len(order) else 0
            try:
                if key not in into:
                    into[key] = value
                    stamps[key] = stamp
                elif stamp < stamps.get(key, _HOME):  # this partial began first: it goes left
                    stored = into.pop(key)
                    try:
                        into[key] = merge(value, stored)
                    except BaseException:
                        into[key] = stored
                        raise
                    stamps[key] = stamp
                else:
                    into[key] = merge(into[key], value)
            except Exception:
                self._split(into, stamps, key, value, stamp)
            except BaseException:  # KeyboardInterrupt: keep what is left, then let it through
                self._orphans.extend(pairs[index:])
                raise

    def _split(self, into: dict[K, V], stamps: dict[K, int], key: K, value: V, stamp: int) -> None:
        """Keep both halves of a record ``merge`` could not combine, older first; log and count it."""
        self.merge_errors += 1
        logger.error(
            "freethreaded: merge raised while combining two threads' records of key %r; "
            "the record splits in two, both are delivered, older first",
            key,
            exc_info=True,
        )
        try:
            if key in into and stamp >= stamps.get(key, _HOME):
                self._orphans.append((key, into[key]))  # the older half goes first
                into[key] = value
                return
        except Exception:
            pass
        self._orphans.append((key, value))

    @kit.holds_locks
    def _with_own_merging(self, me: _Buffer[K, V], work: Callable[[], T]) -> T:
        """Run ``work`` (it calls ``merge``) with ``me`` locked and busy, so that calls back are refused."""
        held = me.lock
        with held:
            me.busy = True
            try:
                return work()
            finally:
                me.busy = False

    def _gather(self, me: _Buffer[K, V]) -> dict[K, V]:
        """Take every record out, home's first; drop the emptied buffers of exited threads.

        Called with ``_shared`` held. A ``BaseException`` from ``merge``
        (``KeyboardInterrupt``) leaves what was gathered at home and what was
        being folded among the orphans, then propagates: nothing is lost.
        """

        def gather() -> dict[K, V]:
            gathered, self._home, self._home_keys = self._home, {}, {}
            stamps: dict[K, int] = {}  # first-add stamps of gathered records; none for home's
            adopted: list[int] | None = None  # the stamps of a buffer's dict adopted whole
            buffers, (merges, stored) = self._accounts
            kept = []
            try:
                for buffer in buffers:
                    # Asked before taking: a thread seen dead can add nothing after the take.
                    alive = buffer is me or buffer.owner.is_alive()
                    records, order = self._take(buffer, me)
                    if not gathered:
                        gathered, adopted = records, order  # nothing older: adopt the dict
                    elif records:
                        if adopted is not None:  # stamps by key, only once a second buffer needs them
                            stamps, adopted = dict(zip(gathered, adopted, strict=False)), None
                        self._fold(gathered, stamps, records, order)
                    if alive:
                        kept.append(buffer)
                    else:
                        merges, stored = merges + buffer.merges, stored + buffer.stored
            except BaseException:
                self._home_at(gathered)  # the buffers not reached keep their records
                raise
            self._accounts = (tuple(kept), (merges, stored))
            return gathered

        return self._with_own_merging(me, gather)

    def _home_at(self, records: dict[K, V]) -> None:
        """Make ``records`` the home (their key objects are the ones stored first)."""
        self._home = records
        self._home_keys = {key: key for key in records}

    def _consolidate(self, me: _Buffer[K, V]) -> None:
        """Move every record home, partials combined, for a read. Called with ``_shared`` held."""
        self._home_at(self._gather(me))

    def _others(self) -> list[Mapping[K, V]]:
        return [*self._transit, _Pairs(self._orphans)]

    # -- reads ---------------------------------------------------------------------

    def get(self, key: K, default: Any, /) -> Any:
        hash(key)  # an unhashable key fails before anything moves
        me = self._own("get()")  # before _shared: a flush holding it may be waiting for this thread
        with self._shared:
            self._consolidate(me)
            return kit.lookup(self._home, self._others(), key, default)

    def snapshot(self) -> dict[K, V]:
        me = self._own("snapshot()")
        with self._shared:
            self._consolidate(me)
            return kit.visible_records(self._home, self._others())

    def __len__(self) -> int:
        """Counts the keys without merging anything (the engine's finalizer calls it too)."""
        self._own("len()")
        with self._shared:
            keys: set[K] = set(self._home)
            for buffer in self._accounts[0]:
                keys.update(list(buffer.state[0]))  # one call copies it: its owner may be adding
            for chunk in self._others():
                keys.update(chunk)
            return len(keys)

    # -- flushing ------------------------------------------------------------------

    def detach(self) -> list[Mapping[K, V]]:
        me = self._own("flush()")
        with self._shared:
            gathered = self._gather(me)
            orphans, self._orphans = self._orphans, []
            chunks: list[Mapping[K, V]] = [_Pairs(orphans)] if orphans else []  # older halves first
            if gathered:
                chunks.append(gathered)
            self._transit = tuple(chunks)
            return chunks

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        me = self._own("flush()")
        with self._shared:
            if isinstance(chunk, _Pairs):
                # Halves of split records: merging them back could only fail again and
                # reorder them; the engine delivers them past max_pending (FLUSH-6).
                failed: list[tuple[K, V]] = kit.Unsettled(leftover)
            else:
                failed = self._with_own_merging(me, lambda: self._requeue_home(leftover))
            self._transit = tuple(c for c in self._transit if c is not chunk)
            return failed

    def _requeue_home(self, leftover: list[tuple[K, V]]) -> kit.Unsettled[K, V]:
        """Put ``leftover`` back at home, older first, remembering each record's key object."""
        home, keys = self._home, self._home_keys
        failed = kit.requeue_into(home, leftover, self._merge)
        unsettled = {id(key) for key, _ in failed}
        for key, _ in leftover:
            if id(key) not in unsettled:
                keys[key] = key  # requeue_into stored the leftover's (older) key object
        return failed

    def stop_adds(self) -> None:
        self._closed = True  # every add reads it while its buffer is busy or locked

    def close(self) -> None:
        self._own("shutdown()")
        with self._shared:
            self._closed = True
            for buffer in self._accounts[0]:  # wait for every add in flight
                if FREE_THREADED_BUILD:
                    with buffer.lock:
                        pass
                else:
                    _wait_until_idle(buffer)

    def counts(self) -> tuple[int, int]:
        buffers, (merges, stored) = self._accounts
        for buffer in buffers:
            merges += buffer.merges
            stored += buffer.stored
        return merges, stored


@final
class FreeThreadedAggregator(ar.BufferedAggregator[K, V]):
    """Per-thread buffers, no shared lock or dict on the add path; scales on free-threaded CPython.

    Entry point ``freethreaded``; the shared engine over :class:`FreeThreadedStorage`.
    """

    storage_class = FreeThreadedStorage
