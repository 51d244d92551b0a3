"""The consumer side of the engine: records, batches, drain, and their asyncio forms."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._arguments import check_seconds

if TYPE_CHECKING:
    from ._output import Output

__all__ = ["Consuming", "check_batch_arguments"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def check_batch_arguments(max_size: object, max_wait: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming a bad ``max_size`` or ``max_wait`` (OUT-5)."""
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, got {type(max_size).__name__}")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    check_seconds("max_wait", max_wait)


class Consuming(Generic[K, V]):
    """What consumers call; mixed into :class:`~aggregator_reference.BufferedAggregator`.

    Every record leaves the output once, to exactly one consumer, whatever mix
    of these runs at once in threads and event loops (OUT-2, OUT-6).
    """

    _output: Output[tuple[K, V]]

    if TYPE_CHECKING:

        def shutdown(self, timeout: float | None = None) -> None: ...

        def _check_shutdown_caller(self, *, in_loop: bool = False) -> None: ...

    def records(self) -> Iterator[tuple[K, V]]:
        """Yield flushed records as they arrive; end once shut down and drained.

        Blocks while the output is empty. Several consumers may iterate at
        once; each record goes to exactly one of them. Thread-safe.
        """
        output = self._output
        while True:
            ok, item = output.get()
            if not ok:
                return
            yield cast("tuple[K, V]", item)

    def batches(self, max_size: int = 500, max_wait: float = 0.5) -> Iterator[list[tuple[K, V]]]:
        """Yield lists of flushed records: ``max_size`` of them, or what arrived within ``max_wait``.

        A batch is yielded when it holds ``max_size`` records, or ``max_wait``
        seconds after its oldest record entered the output, whichever comes
        first; the iterator ends once shut down and drained (OUT-5). Records
        stay in the output until their batch is yielded. Thread-safe.

        Raises:
            TypeError, ValueError: ``max_size`` is not an int >= 1, or
                ``max_wait`` not a number of seconds >= 0 (raised here, not at
                the first ``next()``).
        """
        check_batch_arguments(max_size, max_wait)
        return self._batches(max_size, float(max_wait))

    def _batches(self, max_size: int, max_wait: float) -> Iterator[list[tuple[K, V]]]:
        output = self._output
        while True:
            batch = output.get_batch(max_size, max_wait)
            if batch is None:
                return
            yield batch

    def drain(self, limit: int | None = None) -> list[tuple[K, V]]:
        """Take up to ``limit`` records (all when ``None``) from the output now, without blocking.

        Raises:
            TypeError, ValueError: ``limit`` is not ``None`` or an int >= 0.
        """
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int):
                raise TypeError(f"limit must be an int or None, got {type(limit).__name__}")
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
        return self._output.take(limit)

    # -- asyncio ---------------------------------------------------------------

    async def arecords(self) -> AsyncIterator[tuple[K, V]]:
        """``records()`` for an event loop: ``async for key, value in agg.arecords()``.

        Never blocks the loop: while the output is empty the task waits on a
        future that the next flush resolves (OUT-6). Cancelling it loses
        nothing: a record is taken only when it is handed over.
        """
        output = self._output
        loop = asyncio.get_running_loop()
        while True:
            got = output.get_now()
            if got is not None:
                ok, item = got
                if not ok:
                    return
                yield cast("tuple[K, V]", item)
                continue
            await _wait(output, loop, 1, None)

    def abatches(self, max_size: int = 500, max_wait: float = 0.5) -> AsyncIterator[list[tuple[K, V]]]:
        """``batches()`` for an event loop: ``async for batch in agg.abatches(...)`` (OUT-5, OUT-6).

        Raises:
            TypeError, ValueError: as :meth:`batches`, here rather than at the first step.
        """
        check_batch_arguments(max_size, max_wait)
        return self._abatches(max_size, float(max_wait))

    async def _abatches(self, max_size: int, max_wait: float) -> AsyncIterator[list[tuple[K, V]]]:
        output = self._output
        loop = asyncio.get_running_loop()
        while True:
            batch = output.batch_now(max_size, max_wait)
            if batch is None:
                return
            if isinstance(batch, list):
                yield batch
                continue
            if batch == float("inf"):  # empty: any arrival starts the batch's max_wait
                await _wait(output, loop, 1, None)
            else:
                await _wait(output, loop, min(max_size, output.maxsize), batch)  # full: due

    async def ashutdown(self, timeout: float | None = None) -> None:
        """``shutdown()`` for an event loop: it runs in the loop's default executor.

        The loop stays free meanwhile, so consumers in it keep draining. If
        the awaiting task is cancelled, the shutdown goes on in that thread.

        Raises:
            As :meth:`~aggregator_reference.BufferedAggregator.shutdown`.
        """
        self._check_shutdown_caller(in_loop=True)
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown, timeout)


async def _wait(
    output: Output[Any], loop: asyncio.AbstractEventLoop, fewer_than: int, timeout: float | None
) -> None:
    """Park until an item arrives, the output closes, or ``timeout`` seconds pass."""
    future = output.waiter(loop, fewer_than)
    if future is None:
        return
    try:
        await asyncio.wait((future,), timeout=timeout)
    finally:
        if not future.done():
            future.cancel()
            output.forget(future)
