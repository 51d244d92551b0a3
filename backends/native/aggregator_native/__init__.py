"""The ``native`` backend: the ``freethreaded`` storage with its ``add`` compiled.

Every writer thread merges into a buffer of its own, as in
:mod:`aggregator_freethreaded`, whose Python code this backend reuses for
everything but the hot path: ``add`` and the buffers it writes are C
(``_native.c``), so an add costs about what ``d[k] = merge(d[k], v)`` written
inline costs. Nothing mutable is shared per ``add``, on GIL builds and on
free-threaded ones, where the module declares that it runs without the GIL
(the buffers' handshake with a flush uses atomic operations there).

Install it from a checkout with ``pip install ./backends/native`` (needs a C
compiler and the Python headers); without it ``native`` is simply not among
the backends. Thread safety and the order of records are those of
``freethreaded``'s storage, whose docstring says them.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar, cast, final

from aggregator_freethreaded import FreeThreadedStorage

import aggregator_reference as ar
from aggregator_reference import kit

from . import _native

__all__ = ["FREE_THREADED", "NativeAggregator", "NativeStorage"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Whether this build of the module runs with the GIL disabled (free-threaded CPython).
FREE_THREADED = bool(_native.FREE_THREADED)

# Storages alive, for the probe below, weakly: each reference leaves the set as its storage
# dies (from whichever thread drops it; a set's own operations are atomic, also without the
# GIL). Additions are guarded by _live_lock; reentrant: the collector may finalize an
# aggregator (whose finalizer asks the probe) while this thread holds it.
_live: set[weakref.ref[NativeStorage[Any, Any]]] = set()
_live_lock = threading.RLock()


def _after_fork_in_child() -> None:
    """The lock may have been held by a thread that the child does not have."""
    global _live_lock
    _live_lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _held_by_this_thread() -> Iterator[tuple[object, Any]]:
    """What a frame marked with ``kit.holds_locks`` would say, for adds running in C.

    An add marks this thread's buffer busy while it runs ``merge`` (or a key's
    ``__hash__``/``__eq__``): user code that may call back into an aggregator.
    """
    with _live_lock:
        refs = list(_live)  # one step: a loop over the set itself would race removals
    for ref in refs:
        storage = ref()
        if storage is None:
            continue  # dropped meanwhile
        try:
            buffer = storage._core.buffer
        except AttributeError:  # this thread has no buffer there
            continue
        if buffer.busy:
            yield storage, buffer.lock


kit.probe_held_locks(_held_by_this_thread)


class NativeStorage(FreeThreadedStorage[K, V]):
    """A :class:`~aggregator_reference.Storage` of per-thread buffers written by a compiled ``add``.

    Thread safety: as :class:`~aggregator_freethreaded.FreeThreadedStorage`;
    ``add`` runs in C, touching only the calling thread's buffer unless its
    key is at home.
    """

    # The compiled Buffer has every attribute of freethreaded's (see _native.pyi), not its class.
    buffer_type = cast(Any, _native.Buffer)

    def __init__(self, merge: Callable[[V, V], V], shards: int | None = None) -> None:
        # The core refers to this storage weakly (no cycle: a dropped aggregator's records go
        # at once, not at the next full collection) and is closed once the storage is gone.
        this = weakref.ref(self)

        def register() -> Any:
            return _alive(this)._register(adding=True)

        def from_home(buffer: Any, key: K, value: V) -> bool:
            return _alive(this)._add_from_home(buffer, key, value)

        self._core = core = _native.Core(
            merge, register, from_home, kit.refuse_reentrant, kit.refuse_closed, time.perf_counter_ns
        )
        weakref.finalize(self, _close, core)
        super().__init__(merge, shards)
        self._local = cast(Any, core)  # like a threading.local: core.buffer is this thread's buffer
        self.add = core.add
        self.add_many = core.add_many  # type: ignore[method-assign]  # compiled; the engine binds it (ADD-7)
        with _live_lock:
            _live.add(weakref.ref(self, _live.discard))

    # The state the compiled add reads lives in the core; the Python part reaches it here.
    @property
    def _accounts(self) -> tuple[tuple[Any, ...], tuple[int, int]]:
        return self.__accounts

    @_accounts.setter
    def _accounts(self, value: tuple[tuple[Any, ...], tuple[int, int]]) -> None:
        self._core.buffers = value[0]  # first: the core keeps every buffer the storage has
        self.__accounts = value

    @property
    def _closed(self) -> bool:
        return self._core.closed

    @_closed.setter
    def _closed(self, value: bool) -> None:
        self._core.closed = value

    @property
    def _gathers(self) -> int:
        return self._core.gathers

    @_gathers.setter
    def _gathers(self, value: int) -> None:
        self._core.gathers = value

    @property
    def _home(self) -> dict[K, V]:
        return self._core.home

    @_home.setter
    def _home(self, value: dict[K, V]) -> None:
        self._core.home = value


def _alive(this: weakref.ref[NativeStorage[Any, Any]]) -> NativeStorage[Any, Any]:
    storage = this()
    if storage is None:
        kit.refuse_closed("add()")
    return storage


def _close(core: Any) -> None:
    core.closed = True  # an add through a kept reference to add() raises from now on


@final
class NativeAggregator(ar.BufferedAggregator[K, V]):
    """Per-thread buffers filled by a compiled add; the fastest backend where it is installed.

    Entry point ``native``; the shared engine over :class:`NativeStorage`.
    """

    storage_class = NativeStorage
