"""The public protocols: what users call (:class:`Aggregator`), what a backend supplies (:class:`Storage`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar, overload, runtime_checkable

if TYPE_CHECKING:
    from ._delivery import AsyncSink, Delivery, Retry, Sink

__all__ = ["Aggregator", "Merge", "Stats", "Storage"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")

Merge = Callable[[V, V], V]
"""``merge(stored, incoming) -> merged``: combines a newer value into the buffered record."""


@dataclass(frozen=True)
class Stats:
    """A snapshot of an aggregator's counters (see ``spec/CONTRACT.md``, STAT-1).

    Each field counts since construction and only ever grows.

    Attributes:
        adds: successful ``add()`` calls (``merges + stored``).
        merges: ``add()`` calls that merged into an existing record.
        stored: ``add()`` calls that stored a new record.
        flushed: records handed to the output by flushes.
        requeued: records a flush could not hand off because the output was
            full, and put back into the buffer.
        flushes: flushes that ran (periodic, manual and during shutdown).
        ticks_skipped: periodic ticks skipped because a flush was still running.
        overflowed: records delivered past ``max_pending`` because putting them
            back failed (``merge`` or the key's ``__hash__``/``__eq__`` raised).
        flush_errors: exceptions raised inside a flush and logged.
        early_flushes: flushes the flusher ran before its tick because the
            buffer reached ``flush_at`` or ``max_buffered``.
        adds_waited: ``add()`` calls that waited for room (``max_buffered``).
        buffer_full_errors: how many ``BufferFullError`` were raised.
        buffered: not a counter: an estimate of the records buffered now,
            exact with one writer thread until a read or a flush by another
            thread, otherwise an upper estimate that the next flush corrects.
    """

    adds: int
    merges: int
    stored: int
    flushed: int
    requeued: int
    flushes: int
    ticks_skipped: int
    overflowed: int
    flush_errors: int
    early_flushes: int = 0
    adds_waited: int = 0
    buffer_full_errors: int = 0
    buffered: int = 0


@runtime_checkable
class Aggregator(Protocol[K, V]):
    """What every backend offers; create one with :func:`aggregator_reference.create`.

    The contract is ``spec/CONTRACT.md``; clause ids are given in brackets.
    Every method is safe to call from any thread.
    """

    def add(self, key: K, value: V, /) -> bool:
        """Merge ``value`` into the record for ``key``, or store it as a new record [ADD-1].

        Returns ``True`` when merged, ``False`` when stored.

        Raises:
            TypeError: ``key`` is unhashable; nothing is stored [ADD-3].
            AggregatorClosedError: ``shutdown()`` has begun [CLOSE-2].
            ReentrantMergeError: called from inside this aggregator's ``merge`` [REENTRY-1].
            Exception: whatever ``merge`` raised; the record stays as it was [ADD-4].
        """
        ...

    def add_many(self, pairs: Iterable[tuple[K, V]]) -> int:
        """``add`` each pair in order; return how many merged [ADD-7]."""
        ...

    def adder(self) -> Callable[[K, V], bool]:
        """An ``add`` for the calling thread to keep: a new object at each call [ADD-8]."""
        ...

    def flush(self) -> int:
        """Hand every buffered record to the output; return how many were handed off [FLUSH-1].

        Records that do not fit are re-queued [FLUSH-2]. Waits for a running flush.

        Raises:
            AggregatorClosedError: ``shutdown()`` has begun.
            ReentrantMergeError: called from inside this aggregator's ``merge``.
        """
        ...

    def records(self) -> Iterator[tuple[K, V]]:
        """Block for flushed records; end once shut down and drained [OUT-2]."""
        ...

    def drain(self, limit: int | None = None) -> list[tuple[K, V]]:
        """Take up to ``limit`` records from the output now, without blocking [OUT-3]."""
        ...

    def batches(self, max_size: int = 500, max_wait: float = 0.5) -> Iterator[list[tuple[K, V]]]:
        """Block for batches of flushed records; end once shut down and drained [OUT-5]."""
        ...

    def arecords(self) -> AsyncIterator[tuple[K, V]]:
        """``records()`` for asyncio, never blocking the loop [OUT-6]."""
        ...

    def abatches(self, max_size: int = 500, max_wait: float = 0.5) -> AsyncIterator[list[tuple[K, V]]]:
        """``batches()`` for asyncio, never blocking the loop [OUT-6]."""
        ...

    async def ashutdown(self, timeout: float | None = None) -> None:
        """``shutdown()`` for asyncio [OUT-6]."""
        ...

    def deliver(
        self, sink: Sink[K, V], *, batch_size: int = 500, max_wait: float = 0.5, retry: Retry = ...
    ) -> Delivery[K, V]:
        """Start a thread writing every flushed record into ``sink``, retrying, never dropping [SINK-1]."""
        ...

    def adeliver(
        self,
        sink: Sink[K, V] | AsyncSink[K, V],
        *,
        batch_size: int = 500,
        max_wait: float = 0.5,
        retry: Retry = ...,
    ) -> Delivery[K, V]:
        """:meth:`deliver` as a task of the running event loop [SINK-1]."""
        ...

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...
    def get(self, key: K, default: object = None) -> object:
        """The buffered record for ``key``, or ``default`` [READ-1]."""
        ...

    def snapshot(self) -> dict[K, V]:
        """A copy of the buffered records [READ-1]."""
        ...

    def __len__(self) -> int:
        """How many keys are buffered [READ-1]."""
        ...

    @property
    def pending(self) -> int:
        """Records waiting in the output; stale as soon as it is read [OUT-4]."""
        ...

    @property
    def shards(self) -> int:
        """How many independently locked parts the buffer has."""
        ...

    @property
    def closed(self) -> bool:
        """``True`` once ``shutdown()`` has completed."""
        ...

    def stats(self) -> Stats:
        """The counters [STAT-1]."""
        ...

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the flusher, flush until empty, close the output [CLOSE-1].

        Raises:
            TimeoutError: the output stayed full past ``timeout``; nothing is
                lost and a later ``shutdown()`` continues [CLOSE-4].
            ReentrantMergeError: called from inside this aggregator's ``merge``.
        """
        ...

    def __enter__(self) -> Aggregator[K, V]: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Storage(Protocol[K, V]):
    """What a backend supplies: where records live, how they merge, detach and come back.

    The engine (:class:`aggregator_reference.BufferedAggregator`) does the rest:
    flusher thread, output, shutdown, statistics. A storage is constructed as
    ``Storage(merge, shards)``, ``shards`` being ``None`` (backend's choice) or a
    positive power of two (a hint; report what is used in :attr:`shards`).

    Every method may be called from any thread at any time, except that the
    engine never runs ``detach``/``requeue`` of two flushes at once.

    Optional, for ``max_buffered``/``flush_at`` (BUF-1 … BUF-3) at no cost per
    ``add``: ``limit_new_records(admit)`` and ``revoke()``. After the first,
    before storing a new record, a thread spends its allowance; when it is
    spent, the thread calls ``admit(grant)`` holding none of the storage's
    locks, then tries again, and once that has stored the record (or
    failed), calls what ``admit`` returned unless it is ``None``; ``admit``
    calls ``grant(n)`` to allow ``n`` more new records to that thread, or
    raises (``BufferFullError``, ``AggregatorClosedError``), and then nothing
    may be stored. ``revoke()``
    spends every thread's allowance; the engine calls it after each flush,
    holding the lock ``admit`` runs under, so it must not wait for anything.
    Without them the engine checks the bound in front of ``add``.

    Optional, for speed: ``add_many(pairs)``, doing all that ADD-7 says
    (the note naming a failing pair's index included); the engine binds it
    as the aggregator's ``add_many`` whenever it binds the storage's ``add``.
    """

    @property
    def shards(self) -> int:
        """How many independently locked parts the storage has (an attribute will do)."""
        ...

    def add(self, key: K, value: V, /) -> bool:
        """As :meth:`Aggregator.add`; the engine binds it directly as the aggregator's ``add``.

        Must raise ``AggregatorClosedError`` once :meth:`close` has returned,
        and ``ReentrantMergeError`` when called from inside a ``merge`` it is running.
        """
        ...

    def get(self, key: K, default: object, /) -> object:
        """The buffered record for ``key``, including records detached and not yet requeued."""
        ...

    def snapshot(self) -> dict[K, V]:
        """A copy of every buffered record, detached ones included (buffered value wins)."""
        ...

    def __len__(self) -> int:
        """How many distinct keys :meth:`snapshot` would hold."""
        ...

    def detach(self) -> list[Mapping[K, V]]:
        """Take every record out of the buffer for a flush, as chunks with disjoint keys.

        No ``add`` may write into a chunk once it is returned (wait for adds in
        flight). Reads keep showing the chunks until :meth:`requeue` is called
        for them. Raises ``ReentrantMergeError`` when called from a ``merge``.
        """
        ...

    def requeue(self, chunk: Mapping[K, V], leftover: list[tuple[K, V]], /) -> list[tuple[K, V]]:
        """Settle a chunk after hand-off: all of it reached the output except ``leftover``.

        Put ``leftover`` back into the buffer as ``merge(leftover_value, newer)``
        where newer data arrived, then stop showing ``chunk``. Must work after
        :meth:`close`. Returns the pairs that could not be put back (their
        ``merge`` or key ``__hash__``/``__eq__`` raised); the engine delivers those.
        """
        ...

    def close(self) -> None:
        """From now on ``add`` raises ``AggregatorClosedError``; return once no ``add`` is in flight.

        The engine runs it in a helper thread, so that ``shutdown(timeout=...)``
        stays bounded while a slow ``merge`` is in flight. A storage may also
        offer ``stop_adds()``: the same refusal, returning at once without
        waiting; the engine calls it first, so that ``add`` is refused as soon
        as ``shutdown()`` begins even when ``close`` has to wait (CLOSE-2, CLOSE-4),
        and in a child process after ``os.fork()``, so that a reference to
        ``add`` kept from before the fork refuses too (LIFE-3).
        """
        ...

    def counts(self) -> tuple[int, int]:
        """``(merges, stored)`` so far; must not wait for a lock that ``merge`` may be holding.

        A storage that runs ``merge`` on its own (combining partial records,
        FLUSH-6) may also have a ``merge_errors`` attribute: how many of those
        raised and were logged. ``stats().flush_errors`` includes it.
        """
        ...
