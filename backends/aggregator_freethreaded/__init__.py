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

import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar, final

import aggregator_reference as ar
from aggregator_reference import kit

__all__ = ["FREE_THREADED_BUILD", "FreeThreadedAggregator", "FreeThreadedStorage"]

from ._gathering import Gatherer, settle_among_orphans
from ._many import AddingMany
from ._parts import (
    _FROM_HOME,
    FREE_THREADED_BUILD,
    UNLIMITED,
    Buffer,
    Pairs,
    _now,
    count_keys,
    refuse_wait,
    wait_for_adds,
)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FreeThreadedStorage(AddingMany[K, V], Gatherer[K, V]):
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

    ``add_many`` (:class:`._many.AddingMany`) merges a list's pairs in runs
    under one busy mark. A compiled backend may subclass it to replace
    ``add``, ``add_many`` and ``buffer_type`` (``aggregator_native`` does);
    nothing else is meant to be overridden.
    """

    #: Makes the calling thread's buffer: ``buffer_type(allowed)``.
    buffer_type: Callable[[int], Buffer[Any, Any]] = Buffer

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
        self._taken_home: set[K] = set()  # keys whose record an add took from home since the last gather
        self._deadline: float | None = None  # how long a caller inside user code may wait (_locked)
        self._gathers = 0  # gathers begun and ended: odd while one runs (adds read it, unlocked)
        # (buffers, (merges, stored) of dropped buffers), replaced whole so counts() needs no lock.
        self._accounts: tuple[tuple[Buffer[K, V], ...], tuple[int, int]] = ((), (0, 0))
        #: Merges that raised while partial records were combined, logged (FLUSH-6).
        self.merge_errors = 0
        # The engine's admission of new records (BUF-1), once it limits them; buffers then
        # start with no allowance.
        self._admit: Callable[[Callable[[int], None]], Callable[[], None] | None] | None = None
        self.add: Callable[[K, V], bool] = self._add_locked if FREE_THREADED_BUILD else self._add_gil

    @property
    def shards(self) -> int:
        """The number of per-thread buffers right now."""
        return max(1, len(self._accounts[0]))

    # -- the hot path ------------------------------------------------------------

    def _register(self, adding: bool = False) -> Buffer[K, V]:
        if adding and self._closed:  # before _shared: in a forked child a missing thread may hold it
            kit.refuse_closed("add()")
        allowed = UNLIMITED if self._admit is None else 0
        buffer: Buffer[K, V] = self.buffer_type(allowed)
        with self._locked("add()"):
            buffers, retired = self._accounts
            self._accounts = ((*buffers, buffer), retired)
        self._local.buffer = buffer
        return buffer

    @contextmanager
    def _locked(self, call: str) -> Iterator[None]:
        """Hold ``_shared``; from inside user code (a merge, maybe another aggregator's), only so long.

        Such a caller may hold what the holder of ``_shared`` waits for (its
        buffer, in the middle of an add); so it waits at most
        ``kit.CALLBACK_WAIT`` for ``_shared`` and for the buffers it takes
        (``self._deadline``, guarded by ``_shared``), then is refused (REENTRY-1).
        """
        wait = kit.callback_timeout()
        deadline = None if wait < 0 else time.monotonic() + wait
        shared = self._shared
        if not shared.acquire(False) and not kit.acquire_interruptibly(shared, wait):
            refuse_wait(call)
        outer, self._deadline = self._deadline, deadline if self._deadline is None else self._deadline
        try:
            yield
        finally:
            self._deadline = outer
            shared.release()

    @kit.holds_locks
    def _add_gil(self, key: K, value: V, /) -> bool:
        """``add`` on GIL builds: no lock; ``busy`` tells a flush to wait."""
        try:
            buffer: Buffer[K, V] = self._local.buffer
        except AttributeError:
            buffer = self._register(adding=True)
        if buffer.busy:
            kit.refuse_reentrant("add()")
        held = buffer.lock  # not taken: named so that a wait from inside merge is bounded (kit)
        buffer.busy = True
        try:
            if self._closed:
                kit.refuse_closed("add()")
            data, stamps = buffer.state
            if key in data:
                data[key] = self._merge(data[key], value)
                buffer.merges += 1
                return True
            gathers = self._gathers  # odd while a gather runs: home is elsewhere then
            home = self._home
            elsewhere = buffer.stranded or (home and key in home)  # older states, re-queued records
            if not elsewhere and not gathers & 1 and gathers == self._gathers:
                # Counted before it is stored, so that a flush that revokes the allowance
                # (BUF-2) either sees it counted or makes this check fail.
                buffer.stored = count = buffer.stored + 1
                if count <= buffer.allowed:
                    try:
                        data[key] = value
                    except BaseException:  # the key's hash raised this time: nothing stored
                        buffer.stored = count - 1
                        raise
                    stamps.append(_now())
                    return False
                buffer.stored = count - 1
        finally:
            buffer.busy = False
        del held
        return self._add_from_home(buffer, key, value)

    @kit.holds_locks
    def _add_locked(self, key: K, value: V, /) -> bool:
        """``add`` on free-threaded builds: the buffer's own lock, contended only by a flush or a read."""
        try:
            buffer: Buffer[K, V] = self._local.buffer
        except AttributeError:
            buffer = self._register(adding=True)
        held = buffer.lock
        if not held.acquire(False):
            kit.finish_acquire(held, "add()", closed=self._closed)
        try:
            if self._closed:
                kit.refuse_closed("add()")
            data, stamps = buffer.state
            if key in data:
                data[key] = self._merge(data[key], value)
                buffer.merges += 1
                return True
            gathers = self._gathers  # odd while a gather runs: home is elsewhere then
            home = self._home
            elsewhere = buffer.stranded or (home and key in home)  # older states, re-queued records
            if not elsewhere and not gathers & 1 and gathers == self._gathers:
                # Counted before it is stored, so that a flush that revokes the allowance
                # (BUF-2) either sees it counted or makes this check fail.
                buffer.stored = count = buffer.stored + 1
                if count <= buffer.allowed:
                    try:
                        data[key] = value
                    except BaseException:  # the key's hash raised this time: nothing stored
                        buffer.stored = count - 1
                        raise
                    stamps.append(_now())
                    return False
                buffer.stored = count - 1
        finally:
            held.release()
        del held  # released: the rest is not user code holding this lock
        return self._add_from_home(buffer, key, value)

    @kit.holds_locks
    def _add_from_home(self, buffer: Buffer[K, V], key: K, value: V) -> bool:
        """The rest of an ``add`` whose key is at home: take that record into this thread's buffer.

        Off the hot path: once per key after each re-queue or read. The record
        becomes the key's piece taken from home, combined right after home's
        record at the next gather; at most one such piece per key exists between
        two gathers (a second would not know its place), so a later add stores a
        new partial instead.
        """
        with self._locked("add()"):  # before binding held: this call is not from inside merge
            held = buffer.lock
            with held:
                merged = self._add_from_home_locked(buffer, key, value)
            del held
        if merged is not None:
            return merged
        admit = self._admit
        assert admit is not None  # only an allowance that is spent gets here

        def grant(allowance: int) -> None:
            buffer.allowed = buffer.stored + allowance

        after = admit(grant)  # may wait for a flush, or raise BufferFullError: nothing stored yet
        try:
            return self.add(key, value)
        finally:
            if after is not None:
                after()  # the record is in: now the flusher may run (BUF-3)

    def _add_from_home_locked(self, buffer: Buffer[K, V], key: K, value: V) -> bool | None:
        """:meth:`_add_from_home` with ``_shared`` and the buffer's lock held.

        ``None``: nothing done, the key needs a new record and the thread's allowance is spent.
        """
        buffer.busy = True
        try:
            if self._closed:
                kit.refuse_closed("add()")
            data, stamps = buffer.state
            for records, _ in buffer.stranded:  # older states a refused read left: the key may be there
                if key in records:
                    records[key] = self._merge(records[key], value)
                    buffer.merges += 1
                    return True
            home = self._home
            if key in home and key not in self._taken_home:
                stored = home[key]
                merged = self._merge(stored, value)  # if it raises, home keeps the record
                original = self._home_keys.get(key, key)
                self._taken_home.add(original)  # hashes before anything moves
                del home[key]
                try:
                    data[original] = merged
                except BaseException:
                    home[original] = stored  # a key whose hash failed: put it back first
                    raise
                stamps.append(_FROM_HOME)
                buffer.merges += 1
                return True
            buffer.stored = count = buffer.stored + 1  # counted first, as on the hot path
            if count > buffer.allowed:
                buffer.stored = count - 1
                return None
            try:
                data[key] = value  # a flush took it meanwhile, or a piece of it is out already
            except BaseException:
                buffer.stored = count - 1
                raise
            stamps.append(_now())
            return False
        finally:
            buffer.busy = False

    # -- moving records between buffers ----------------------------------------------

    def _own(self, call: str) -> Buffer[K, V]:
        """The calling thread's buffer, refusing a call from inside a merge this thread is running."""
        try:
            buffer: Buffer[K, V] = self._local.buffer
        except AttributeError:
            return self._register()
        if buffer.busy or (buffer.locked and kit.held_by_this_thread(buffer.lock)):
            kit.refuse_reentrant(call)
        return buffer

    # -- reads ---------------------------------------------------------------------

    def get(self, key: K, default: Any, /) -> Any:
        hash(key)  # an unhashable key fails before anything moves
        me = self._own("get()")  # before _shared: a flush holding it may be waiting for this thread
        with self._locked("get()"):
            self._consolidate(me)
            return kit.lookup(self._home, self._others(), key, default)

    def snapshot(self) -> dict[K, V]:
        me = self._own("snapshot()")
        with self._locked("snapshot()"):
            self._consolidate(me)
            return kit.visible_records(self._home, self._others())

    def __len__(self) -> int:
        """Counts the keys without merging anything (the engine's finalizer calls it too)."""
        self._own("len()")
        with self._locked("len()"):
            return count_keys(self._home, self._accounts[0], self._others())

    # -- flushing ------------------------------------------------------------------

    def detach(self) -> list[Mapping[K, V]]:
        me = self._own("flush()")
        with self._locked("flush()"):
            gathered = self._gather(me)
            orphans, self._orphans = self._orphans, []
            chunks: list[Mapping[K, V]] = [Pairs(orphans)] if orphans else []  # older halves first
            if gathered:
                chunks.append(gathered)
            self._transit = tuple(chunks)
            return chunks

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        me = self._own("flush()")
        with self._locked("flush()"):
            if isinstance(chunk, Pairs):
                # Halves of split records, already logged and counted: merging them back could
                # fail again and reorder them; the engine delivers them past max_pending (FLUSH-6).
                halves: kit.Unsettled[K, V] = kit.Unsettled(leftover)
                halves.counted = True
                failed: list[tuple[K, V]] = halves
            else:
                failed = self._with_own_merging(me, lambda: self._requeue_home(leftover))
            self._transit = tuple(c for c in self._transit if c is not chunk)
            return failed

    def _requeue_home(self, leftover: list[tuple[K, V]]) -> kit.Unsettled[K, V]:
        """Put ``leftover`` back at home, older first, remembering each record's key object.

        A record whose key split while this flush held it (a read's gather put
        newer halves among the orphans) merges into the oldest of those halves
        instead, or, if that merge raises, goes ahead of them: older first (FLUSH-6).
        """
        if self._orphans:
            leftover, stopped = settle_among_orphans(leftover, self._orphans, self._merge, self._log_split)
            if stopped is not None:  # deliver them, run nothing more
                return stopped
        home, keys = self._home, self._home_keys
        failed = kit.requeue_into(home, leftover, self._merge)
        unsettled = {id(key) for key, _ in failed}
        for key, _ in leftover:
            if id(key) not in unsettled:
                keys[key] = key  # requeue_into stored the leftover's (older) key object
        return failed

    def limit_new_records(self, admit: Callable[[Callable[[int], None]], Callable[[], None] | None]) -> None:
        """From now on a thread stores new records only within an allowance the engine grants (BUF-1).

        A thread whose allowance is spent calls ``admit(grant)``, holding no
        lock of this storage; the engine calls ``grant(n)`` for ``n`` more, or
        raises; what it returns is called once the record is stored.
        """
        with self._locked("create()"):
            self._admit = admit
            self.revoke()

    def revoke(self) -> None:
        """Spend every thread's allowance (the engine calls it after each flush, BUF-2)."""
        for buffer in self._accounts[0]:
            buffer.allowed = buffer.stored

    def stop_adds(self) -> None:
        self._closed = True  # every add reads it while its buffer is busy or locked

    def close(self) -> None:
        self._own("shutdown()")
        with self._locked("shutdown()"):
            self._closed = True
            wait_for_adds(self._accounts[0])

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
