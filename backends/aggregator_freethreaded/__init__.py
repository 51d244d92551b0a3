"""The ``freethreaded`` backend: every writer thread merges into a buffer of its own.

Built for interpreters where threads really run in parallel (CPython built
with ``--disable-gil``): ``add`` shares nothing mutable between writers, not a
dict, not a lock, not a counter. Each thread's buffer is registered, so a
flush also reaches the buffers of threads that have exited (and drops them
once empty). Partial records of one key from different threads are merged at
flush and by the reads, which move every partial record into the reading
thread's own buffer (so ``add`` returns ``False`` when only another thread
holds a record for the key, and ``stats().stored`` counts partial records).

On a GIL build the buffer needs no lock at all: the owner marks its buffer
busy while it adds, and a flush that detaches a busy buffer waits for it.
"""

from __future__ import annotations

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


@final
class _Buffer(Generic[K, V]):
    """One thread's records.

    Only the owner thread writes ``busy``, ``merges``, ``stored``, and writes
    into ``data``; other threads replace ``data`` (taking the records out)
    only while holding the storage's ``_shared`` lock, and on free-threaded
    builds also ``lock``, which the owner holds for the whole of each ``add``.
    """

    __slots__ = ("busy", "data", "lock", "merges", "owner", "stored")

    def __init__(self, owner: threading.Thread) -> None:
        self.data: dict[K, V] = {}
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
    """A :class:`~aggregator_reference.Storage` of per-thread buffers.

    Thread safety: ``add`` touches only the calling thread's buffer (and, on
    free-threaded builds, that buffer's uncontended lock). ``_shared`` (an
    ``RLock``) guards ``_home``, ``_transit``, ``_orphans`` and ``_accounts``,
    and is held by ``detach``/``requeue``/``close`` and the reads, never by
    ``add``; with it held, a buffer's ``lock`` may be taken, one at a time.
    Reads from inside ``merge`` raise ``ReentrantMergeError`` (they would have
    to move the record that ``merge`` is working on).
    """

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        self._merge = merge
        self._local = threading.local()
        self._closed = False
        # Guards everything below; never held by add().
        self._shared = threading.RLock()
        self._home: dict[K, V] = {}  # re-queued records: older than any buffer's data
        self._transit: tuple[Mapping[K, V], ...] = ()  # detached, not yet settled
        self._orphans: list[tuple[K, V]] = []  # partials whose merge raised while moving them
        # (buffers, (merges, stored) of dropped buffers), replaced whole so counts() needs no lock.
        self._accounts: tuple[tuple[_Buffer[K, V], ...], tuple[int, int]] = ((), (0, 0))
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
            data = buffer.data
            if key in data:
                data[key] = self._merge(data[key], value)
                buffer.merges += 1
                return True
            data[key] = value
            buffer.stored += 1
            return False
        finally:
            buffer.busy = False

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
            data = buffer.data
            if key in data:
                data[key] = self._merge(data[key], value)
                buffer.merges += 1
                return True
            data[key] = value
            buffer.stored += 1
            return False
        finally:
            held.release()

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

    def _take(self, buffer: _Buffer[K, V]) -> dict[K, V]:
        """Take every record out of another thread's buffer (with ``_shared`` held)."""
        if FREE_THREADED_BUILD:
            with buffer.lock:
                taken, buffer.data = buffer.data, {}
            return taken
        taken, buffer.data = buffer.data, {}
        _wait_until_idle(buffer)  # an add may still be writing into ``taken``
        return taken

    def _fold(self, into: dict[K, V], records: Mapping[K, V]) -> None:
        """Merge ``records`` (newer) into ``into`` (older).

        A record whose ``merge`` or key ``__hash__``/``__eq__`` raises becomes an
        orphan: kept aside, delivered as a record of its own by the next flush.
        """
        merge = self._merge
        for key, value in records.items():
            try:
                if key in into:
                    into[key] = merge(into[key], value)
                else:
                    into[key] = value
            except Exception:
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
        """Take every record out, merged older first; drop the emptied buffers of exited threads.

        Older first means: re-queued records, then the buffers in registry
        order. The registry is kept so that a buffer holding records gathered
        by a read comes first (see :meth:`_consolidated`): every other
        buffer's records are newer than those. Called with ``_shared`` held.
        """

        def gather() -> dict[K, V]:
            gathered, self._home = self._home, {}
            buffers, (merges, stored) = self._accounts
            kept = []
            for buffer in buffers:
                # Asked before taking: a thread seen dead can add nothing after the take.
                alive = buffer is me or buffer.owner.is_alive()
                if buffer is me:
                    taken, me.data = me.data, {}
                else:
                    taken = self._take(buffer)
                if gathered:
                    self._fold(gathered, taken)
                else:
                    gathered = taken  # nothing older: adopt the dict instead of copying it
                if alive:
                    kept.append(buffer)
                else:
                    merges, stored = merges + buffer.merges, stored + buffer.stored
            self._accounts = (tuple(kept), (merges, stored))
            return gathered

        return self._with_own_merging(me, gather)

    def _consolidated(self, me: _Buffer[K, V]) -> _Buffer[K, V]:
        """Move every record into the calling thread's buffer, for a read; return that buffer.

        That buffer then holds the oldest records of every thread, so it moves
        to the front of the registry. Called with ``_shared`` held.
        """
        gathered = self._gather(me)
        with me.lock:
            me.data = gathered
        buffers, retired = self._accounts
        self._accounts = ((me, *(b for b in buffers if b is not me)), retired)
        return me

    def _others(self) -> list[Mapping[K, V]]:
        return [*self._transit, _Pairs(self._orphans)]

    # -- reads ---------------------------------------------------------------------

    def get(self, key: K, default: Any, /) -> Any:
        hash(key)  # an unhashable key fails before anything moves
        me = self._own("get()")  # before _shared: a flush holding it may be waiting for this thread
        with self._shared:
            self._consolidated(me)
            return kit.lookup(me.data, self._others(), key, default)

    def snapshot(self) -> dict[K, V]:
        me = self._own("snapshot()")
        with self._shared:
            self._consolidated(me)
            return kit.visible_records(me.data, self._others())

    def __len__(self) -> int:
        me = self._own("len()")
        with self._shared:
            self._consolidated(me)
            return kit.count_visible(me.data, self._others())

    # -- flushing ------------------------------------------------------------------

    def detach(self) -> list[Mapping[K, V]]:
        me = self._own("flush()")
        with self._shared:
            gathered = self._gather(me)
            orphans, self._orphans = self._orphans, []
            chunks: list[Mapping[K, V]] = [gathered] if gathered else []
            if orphans:
                chunks.append(_Pairs(orphans))
            self._transit = tuple(chunks)
            return chunks

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        me = self._own("flush()")
        with self._shared:
            failed = self._with_own_merging(me, lambda: kit.requeue_into(self._home, leftover, self._merge))
            self._transit = tuple(c for c in self._transit if c is not chunk)
            return failed

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
