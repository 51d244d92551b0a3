"""Delivery: a managed consumer that writes batches into a sink, retrying, never dropping (SINK-1..SINK-4)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, final, runtime_checkable

from ._arguments import check_seconds

if TYPE_CHECKING:
    from ._engine import BufferedAggregator

__all__ = ["AsyncSink", "Delivery", "DeliveryStats", "Retry", "Sink"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger("aggregator_reference")


def shown(thing: object, text: Callable[[object], str] = repr) -> str:
    """``repr(thing)`` (or ``text(thing)``) for a message: a user's method that raises must not end a wait."""
    try:
        return str(text(thing))
    except Exception:
        return f"<{type(thing).__qualname__} object whose {text.__name__}() raised>"


@runtime_checkable
class Sink(Protocol[K, V]):
    """Where :meth:`~aggregator_reference.BufferedAggregator.deliver` writes batches.

    ``write(batch, batch_id)`` applies a list of ``(key, value)`` records, or
    raises. A batch that raised is written again, whole and with the same
    ``batch_id``, until a write returns (SINK-2); a sink that remembers the
    ids it applied (in the same transaction as the batch) applies each batch
    exactly once. ``batch_id`` is ``"<writer>:<n>"``: ``writer`` is unique to
    one :class:`Delivery` (a random UUID) and ``n`` counts its batches from 1,
    so ids never repeat across processes and machines, and once batch ``n``
    of a writer has been acknowledged no batch ``m <= n`` of it is written
    again. A sink may also have ``close()``, called once after its last batch.

    ``write`` is called from one thread (or task) at a time, the delivery's own.
    """

    def write(self, batch: list[tuple[K, V]], batch_id: str, /) -> None: ...


@runtime_checkable
class AsyncSink(Protocol[K, V]):
    """:class:`Sink` for an event loop: ``write`` (and ``close``, if any) may be coroutines."""

    def write(self, batch: list[tuple[K, V]], batch_id: str, /) -> Awaitable[None]: ...


@final
@dataclass(frozen=True)
class Retry:
    """How long a delivery waits before writing a failed batch again: exponential back-off with jitter.

    The ``n``-th wait in a row (from 0) lasts a random time between half and
    all of ``min(maximum, first * factor ** n)`` seconds; the jitter keeps many
    processes that failed together from retrying together. A write that
    succeeds starts the count again.

    Raises:
        TypeError: a field is not a number.
        ValueError: ``first`` or ``maximum`` is not > 0 seconds and at most
            ``threading.TIMEOUT_MAX``, ``maximum < first``, or ``factor`` is
            not finite and >= 1.
    """

    first: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("first", "maximum", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Retry.{name} must be a number, got {type(value).__name__}")
        for name in ("first", "maximum"):  # a wait a thread can wait: Event.wait() takes it
            check_seconds(f"Retry.{name}", getattr(self, name), positive=True)
        if self.maximum < self.first:
            raise ValueError(f"Retry.maximum must be >= first ({self.first!r}), got {self.maximum!r}")
        if not 1 <= self.factor < math.inf:
            raise ValueError(f"Retry.factor must be >= 1 and finite, got {self.factor!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` (>= 1) failed writes of one batch in a row."""
        ceiling = float(self.maximum)
        if self.factor > 1:
            # first * factor ** (failures - 1), in logarithms: no overflow, however many failures.
            log_ceiling = math.log(self.first) + (failures - 1) * math.log(self.factor)
            if log_ceiling < math.log(self.maximum):
                ceiling = math.exp(log_ceiling)
        elif self.first < self.maximum:
            ceiling = float(self.first)
        return random.uniform(ceiling / 2, ceiling)  # jitter, not cryptography


@final
@dataclass(frozen=True)
class DeliveryStats:
    """A snapshot of one delivery's counters (SINK-3).

    Attributes:
        batches: batches written (each counted once, however often it was retried).
        records: records in those batches.
        retries: failed writes (each followed by a wait and a retry of the same batch).
        held: records taken from the output and not yet written: the batch
            being written or waiting for its retry; 0 when idle.
        last_error: the exception of the last failed write, ``None`` if none failed;
            kept after later writes succeed.
        failing: whether the batch held now has failed at least once.
        done: whether the delivery has ended (the aggregator shut down and
            every record written, or the sink raised a ``BaseException``).
    """

    batches: int
    records: int
    retries: int
    held: int
    last_error: BaseException | None
    failing: bool
    done: bool


@final
class Delivery(Generic[K, V]):
    """A running delivery: its consumer takes batches from the output and writes them into the sink.

    Create one with :meth:`~aggregator_reference.BufferedAggregator.deliver`
    (a thread) or ``adeliver`` (a task of the running event loop).

    Thread safety: every method may be called from any thread. The counters
    are written only by the delivery's own thread or task; ``stats()`` reads
    them without a lock, so its fields may come from two moments a write apart.
    """

    def __init__(
        self,
        aggregator: BufferedAggregator[K, V],
        sink: Sink[K, V] | AsyncSink[K, V],
        batch_size: int,
        max_wait: float,
        retry: Retry,
    ) -> None:
        self.sink = sink
        self.writer = uuid.uuid4().hex
        self._aggregator = aggregator
        self._batch_size = batch_size
        self._max_wait = max_wait
        self._retry = retry
        self._batches = self._records = self._retries = 0
        self._held: list[tuple[K, V]] = []
        self._failures = 0  # failed writes of the batch held now
        self._last_error: BaseException | None = None
        self._done = threading.Event()  # set once the consumer has ended, whatever the reason
        self._ending = threading.Lock()  # makes _end() run once, from whichever thread sees it first
        self.error: BaseException | None = None  # the BaseException that ended it early, if any
        self.thread: threading.Thread | None = None  # the consumer of deliver()
        self.task: asyncio.Task[None] | None = None  # the consumer of adeliver()

    def __repr__(self) -> str:
        s = self.stats()
        state = "done" if s.done else ("failing" if s.failing else "running")
        return f"<Delivery {state} into {self.sink!r}: {s.batches} batches, {s.held} held>"

    @property
    def done(self) -> bool:
        """Whether the delivery has ended (see :attr:`DeliveryStats.done`).

        A task that finished without running to its end (cancelled before its
        first step), or whose event loop was closed before it ended, counts as
        ended: its :attr:`error` says so; :meth:`held` has what it held.
        """
        task = self.task
        if not self._done.is_set() and task is not None:
            if task.done():
                why: BaseException = (
                    asyncio.CancelledError() if task.cancelled() else RuntimeError("its task ended early")
                )
                self._end(why, trace=False)
            elif task.get_loop().is_closed():
                self._end(RuntimeError("its event loop was closed before the delivery ended"), trace=False)
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the delivery has ended or ``timeout`` seconds passed; return :attr:`done`.

        It ends after the aggregator's ``shutdown()`` once every record is
        written; use ``shutdown()`` itself to wait for that.
        """
        if self.task is None:
            return self._done.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:  # a task's loop may close under it: look now and then
            slice_ = 1.0 if self.task.get_loop().is_running() else 0.1
            left = slice_ if deadline is None else min(slice_, deadline - time.monotonic())
            if left <= 0:
                return False
            self._done.wait(left)
        return True

    def stats(self) -> DeliveryStats:
        """The counters now (see :class:`DeliveryStats`)."""
        return DeliveryStats(
            batches=self._batches,
            records=self._records,
            retries=self._retries,
            held=len(self._held),
            last_error=self._last_error,
            failing=self._failures > 0,
            done=self._done.is_set(),
        )

    def held(self) -> list[tuple[K, V]]:
        """A copy of the records taken from the output and not yet written (see :attr:`DeliveryStats.held`).

        After the delivery ended early (a ``BaseException`` from the sink, see
        :attr:`error`), these are the records it could not write: nothing else holds them.
        """
        return list(self._held)

    def _forsake(self, parent: int) -> None:
        """In a child made by ``os.fork()``: end this copy, whose consumer stayed in the parent (LIFE-3).

        Its held records are the parent's (that delivery writes them); its locks
        may have been held by a thread the child does not have, so they are new.
        """
        if not self._done.is_set():
            self.error = RuntimeError(
                f"this delivery's consumer is in the parent process (pid {parent}): a delivery "
                "does not cross os.fork(); start one on an aggregator the child creates"
            )
        self._held = []
        self._ending = threading.Lock()
        done = threading.Event()
        done.set()
        self._done = done
        self.task = None  # the parent's event loop: never to run here

    # -- the consumer ----------------------------------------------------------

    def _next_id(self) -> str:
        return f"{self.writer}:{self._batches + 1}"

    def _failed(self, exc: Exception, batch_id: str) -> float:
        """Count a failed write of the held batch, log it, and return how long to wait."""
        self._failures += 1
        self._retries += 1
        self._last_error = exc
        delay = self._retry.delay(self._failures)
        log = logger.warning if self._failures == 1 or self._failures % 10 == 0 else logger.debug
        log(
            "delivery into %s: batch %s (%d record(s)) failed %d time(s) (%s: %s); retrying in %.2f s",
            shown(self.sink),
            batch_id,
            len(self._held),
            self._failures,
            type(exc).__name__,
            shown(exc, str),
            delay,
        )
        return delay

    def _written(self) -> None:
        self._batches += 1
        self._records += len(self._held)
        self._held = []
        self._failures = 0

    def run(self) -> None:
        """The delivery thread: write each batch until it is written; close the sink at the end."""
        try:
            for batch in self._aggregator.batches(self._batch_size, self._max_wait):
                self._held = batch
                batch_id = self._next_id()
                while True:
                    try:  # a copy: the batch is kept whole for a retry and held(), whatever write does
                        result: object = self._call(self.sink.write, list(batch), batch_id)
                    except Exception as exc:
                        threading.Event().wait(self._failed(exc, batch_id))
                        continue
                    if inspect.isawaitable(result):  # never run here: the batch was not written
                        getattr(result, "close", lambda: None)()  # no "never awaited" warning
                        raise TypeError(
                            f"sink {self.sink!r}: write() returned an awaitable, which a delivery "
                            "thread cannot await; use adeliver() from a coroutine"
                        )
                    self._written()
                    break
            close = getattr(self.sink, "close", None)
            if close is not None:
                self._call(close)
        except BaseException as exc:
            self._end(exc)
        finally:
            self._done.set()

    async def arun(self) -> None:
        """The delivery task: :meth:`run` for an event loop (``write``/``close`` may be coroutines)."""
        try:
            async for batch in self._aggregator.abatches(self._batch_size, self._max_wait):
                self._held = batch
                batch_id = self._next_id()
                while True:
                    token = _in_sink.set(self)  # in this task's context: the await runs in it too
                    try:
                        result = self.sink.write(list(batch), batch_id)
                        if inspect.isawaitable(result):
                            await result
                    except Exception as exc:
                        await asyncio.sleep(self._failed(exc, batch_id))
                        continue
                    finally:
                        _in_sink.reset(token)
                    self._written()
                    break
            close = getattr(self.sink, "close", None)
            if close is not None:
                token = _in_sink.set(self)
                try:
                    result = close()
                    if inspect.isawaitable(result):
                        await result
                finally:
                    _in_sink.reset(token)
        except BaseException as exc:
            self._end(exc)
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._done.set()

    def _call(self, method: Any, *args: Any) -> Any:
        """``method(*args)`` of the sink, marked as this delivery's (see :func:`inside_sink`).

        Set in the calling context, so that tasks (and ``asyncio.to_thread``)
        that ``write`` starts are marked too; plain threads are not.
        """
        token = _in_sink.set(self)
        try:
            return method(*args)
        finally:
            _in_sink.reset(token)

    def _end(self, exc: BaseException, *, trace: bool = True) -> None:
        """The consumer ends early, once: keep the error and say what it leaves behind (SINK-4).

        Logged before ``done`` is set, so that whoever sees it done sees the log too.
        """
        with self._ending:
            if self._done.is_set():
                return  # ended already (its loop closed, say), then its coroutine was closed
            self.error = exc
            logger.error(
                "delivery into %s stopped by %s%s: %d record(s) taken from the output were not "
                "written (Delivery.held() returns them); records still buffered or pending stay in "
                "the aggregator",
                shown(self.sink),
                type(exc).__name__,
                f" ({shown(exc, str)})" if shown(exc, str) else "",
                len(self._held),
                exc_info=trace and not isinstance(exc, (asyncio.CancelledError, GeneratorExit)),
            )
            self._done.set()


#: The delivery whose sink's ``write``/``close`` this context runs in (SINK-4).
_in_sink: contextvars.ContextVar[Delivery[Any, Any] | None] = contextvars.ContextVar(
    "aggregator_reference_in_sink", default=None
)


def inside_sink() -> Delivery[Any, Any] | None:
    """The delivery whose sink is running in this context (a thread, task, or what they started)."""
    return _in_sink.get()
