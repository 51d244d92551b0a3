"""The engine's ``deliver``/``adeliver``: start a :class:`~aggregator_reference.Delivery` (SINK-1..SINK-4)."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._consume import check_batch_arguments
from ._delivery import AsyncSink, Delivery, Retry, Sink, inside_sink, shown
from ._errors import AggregatorClosedError, DeliveryError
from ._exit import DELIVERY, ROOM, Waiting

if TYPE_CHECKING:
    from ._exit import Patience

__all__ = ["Delivering"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: ``Retry()``: 0.1 s, doubling up to 30 s, with jitter. Frozen, so one shared default is safe.
DEFAULT_RETRY = Retry()


def check_delivery_arguments(sink: object, batch_size: object, max_wait: object, retry: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming a bad argument of ``deliver()`` (SINK-1)."""
    if not callable(getattr(sink, "write", None)):
        raise TypeError(f"sink must have a write(batch, batch_id) method, got {type(sink).__name__}")
    try:
        check_batch_arguments(batch_size, max_wait)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("max_size", "batch_size", 1)) from None
    if not isinstance(retry, Retry):
        raise TypeError(f"retry must be an aggregator_reference.Retry, got {type(retry).__name__}")


#: Guards every aggregator's ``_deliveries`` (rarely written: once per ``deliver()``).
_deliveries_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _deliveries_lock
    _deliveries_lock = threading.Lock()  # the thread that may have held it is not in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Delivering(Generic[K, V]):
    """``deliver``/``adeliver``; mixed into :class:`~aggregator_reference.BufferedAggregator`."""

    #: The deliveries started on this aggregator, newest last; replaced, never mutated.
    _deliveries: tuple[Delivery[K, V], ...] = ()
    _closed: bool  # the engine's: set by _close_after_deliveries

    def deliver(
        self,
        sink: Sink[K, V],
        *,
        batch_size: int = 500,
        max_wait: float = 0.5,
        retry: Retry = DEFAULT_RETRY,
    ) -> Delivery[K, V]:
        """Start a thread that writes every flushed record into ``sink``, in batches (SINK-1, SINK-2).

        Batches are as :meth:`batches` gives them (``batch_size`` records, or
        what arrived within ``max_wait`` seconds). A batch whose write raises
        is written again, whole, with the same ``batch_id``, after a back-off
        (``retry``), until it is written: never dropped, never reordered. While
        the sink fails, the output fills and flushes re-queue: ``add`` keeps
        merging (SINK-3). ``shutdown()`` waits for the delivery to write
        everything, then the sink's ``close()``, if any, is called (SINK-4).

        At most one delivery runs per aggregator, so that the records of one
        key reach the sink in order; do not also consume with ``records()``.

        Thread-safe. Returns the :class:`Delivery` handle: its ``stats()``,
        ``wait()`` and the records it holds.

        Raises:
            TypeError, ValueError: a bad argument (the message names it), or a
                sink whose ``write`` is a coroutine function (use :meth:`adeliver`).
            DeliveryError: another delivery of this aggregator is still running.
        """
        for method in ("write", "close"):
            if inspect.iscoroutinefunction(getattr(sink, method, None)):
                raise TypeError(
                    f"sink {sink!r} has an async {method}(): deliver() calls it from a thread and "
                    "cannot await it; call adeliver() from a coroutine instead"
                )
        delivery = self._start_delivery(sink, batch_size, max_wait, retry)
        # A daemon: at exit, a sink that keeps failing must not keep the process alive (LIFE-2
        # logs what it held instead).
        delivery.thread = threading.Thread(
            target=delivery.run, name=f"delivery-{delivery.writer[:8]}", daemon=True
        )
        try:
            delivery.thread.start()
        except BaseException as exc:  # "can't start new thread": it never ran, so it must not count
            self._unregister(delivery, exc)
            raise
        return delivery

    def adeliver(
        self,
        sink: Sink[K, V] | AsyncSink[K, V],
        *,
        batch_size: int = 500,
        max_wait: float = 0.5,
        retry: Retry = DEFAULT_RETRY,
    ) -> Delivery[K, V]:
        """:meth:`deliver` as a task of the running event loop; ``write`` may be a coroutine (SINK-1).

        Call it from a coroutine. Use ``await agg.ashutdown()`` in that loop:
        a blocking ``shutdown()`` there would stop the task it waits for.
        Do not cancel the task (it is kept by the handle): the records of a
        batch it holds would be left only in :meth:`Delivery.held`.

        Raises:
            RuntimeError: no event loop is running in this thread.
            TypeError, ValueError, DeliveryError: as :meth:`deliver` (except that
                ``write`` may be a coroutine function here).
        """
        loop = asyncio.get_running_loop()
        delivery = self._start_delivery(sink, batch_size, max_wait, retry)
        try:
            delivery.task = loop.create_task(delivery.arun(), name=f"delivery-{delivery.writer[:8]}")
        except BaseException as exc:  # a task factory refused it: it never ran, so it must not count
            self._unregister(delivery, exc)
            raise
        return delivery

    def _unregister(self, delivery: Delivery[K, V], error: BaseException) -> None:
        """Forget a delivery that never started; a shutdown already waiting for it stops waiting."""
        delivery.error = error
        delivery._done.set()
        with _deliveries_lock:
            self._deliveries = tuple(d for d in self._deliveries if d is not delivery)

    def _start_delivery(self, sink: Any, batch_size: int, max_wait: float, retry: Retry) -> Delivery[K, V]:
        check_delivery_arguments(sink, batch_size, max_wait, retry)
        with _deliveries_lock:
            if self._closed:
                raise AggregatorClosedError(
                    "deliver() called after shutdown() completed; take what is left in the output "
                    "with drain()"
                )
            running = [d for d in self._deliveries if not d.done]
            if running:
                raise DeliveryError(
                    f"a delivery into {shown(running[0].sink)} is still running on this aggregator; one "
                    "delivery at a time keeps each key's records in order"
                )
            delivery = Delivery(self, sink, batch_size, float(max_wait), retry)  # type: ignore[arg-type]
            self._deliveries = (*self._deliveries, delivery)
        return delivery

    def _deliveries_held(self) -> int:
        """Records taken by deliveries and not yet written."""
        return sum(len(d._held) for d in self._deliveries)

    def _check_shutdown_caller(self, *, in_loop: bool = False) -> None:
        """Refuse a shutdown that would wait for a delivery it stops (SINK-4); before anything waits.

        ``in_loop``: called by ``ashutdown()`` in its event loop, which it does not block.

        Raises:
            DeliveryError: called from the sink's ``write`` or ``close`` (the
                delivery's own thread or task), or, blocking, in the event loop
                that runs a delivery.
        """
        if self._closed:  # nothing to wait for (in a forked child too, LIFE-3)
            return
        here = threading.current_thread()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        task = asyncio.current_task() if loop is not None else None
        marked = inside_sink()
        for delivery in self._deliveries:
            if delivery.done:
                continue
            if delivery is marked or delivery.thread is here or (task is not None and delivery.task is task):
                raise DeliveryError(
                    "shutdown() called from inside the sink's write() or close() (or a task they "
                    "started) would wait for the very delivery that calls it; call it from "
                    "another thread or task"
                )
            if not in_loop and delivery.task is not None and delivery.task.get_loop() is loop:
                raise DeliveryError(
                    f"shutdown() would block the event loop that runs the delivery into "
                    f"{shown(delivery.sink)}, which it waits for; use await agg.ashutdown() there"
                )

    def _stranded_by_deliveries(self) -> str:
        """At exit, after shutdown: what a delivery that ended early left in the output (LIFE-2)."""
        ended = [d for d in self._deliveries if d.error is not None]
        pending: int = self.pending  # type: ignore[attr-defined]
        if not ended or not pending:
            return ""
        return (
            f"its delivery into {shown(ended[-1].sink)} ended early ({type(ended[-1].error).__name__}), "
            f"so the {pending} record(s) pending in the output were not delivered and are lost at "
            "exit; await ashutdown() before the event loop ends, or drain() them"
        )

    def _room_wait(self) -> tuple[Waiting, str]:
        """What ``shutdown()`` waits for while the output is full, and its ``TimeoutError``'s advice.

        With a delivery running, its sink is the consumer: draining the output
        by hand would bypass it (and its order), so the advice is about the sink.
        """
        running = [delivery for delivery in self._deliveries if not delivery.done]
        if not running:
            return ROOM, "drain the output and call shutdown() again"
        delivery = running[0]

        def what() -> str:  # as the delivery fares now: each WARNING asks again
            s = delivery.stats()
            state = (
                f"failing ({s.retries} retries; last: {shown(s.last_error)})" if s.failing else "not failing"
            )
            sink = shown(delivery.sink)
            return f"the delivery into {sink} to take batches from the output (its writes: {state})"

        advice = (
            "see Delivery.stats(); the delivery makes room as the sink takes batches "
            "(records taken by hand would bypass the sink); or pass timeout=..."
        )
        timed_out = f"the output waits for {what()}; call shutdown() again once the sink takes batches"
        return Waiting(what, advice, countable=True), timed_out

    def _close_after_deliveries(self, wait: Patience) -> None:
        """Part of ``shutdown()``, once the output is closed: wait for every delivery, then be closed.

        ``_closed`` is set under the lock that ``deliver()`` takes, once no
        delivery runs: a delivery started meanwhile is waited for too.
        """
        while True:
            for delivery in self._deliveries:
                if not wait.until(delivery.wait, DELIVERY):
                    s = delivery.stats()
                    raise TimeoutError(
                        f"shutdown() timed out waiting for the delivery into {shown(delivery.sink)}: "
                        f"{s.held} record(s) held, {self.pending} pending"  # type: ignore[attr-defined]
                        + (
                            f", writes failing ({s.retries} retries; last: {shown(s.last_error)})"
                            if s.failing
                            else ""
                        )
                        + "; nothing was lost, call shutdown() again"
                    )
            with _deliveries_lock:
                if all(delivery.done for delivery in self._deliveries):
                    self._closed = True
                    return
