"""Deliveries at the edges (SINK-1, SINK-4, OUT-5): shutdown from the sink, deliver after shutdown,
a full output, a blocking shutdown in the delivery's own loop, a closed loop, a thread that does
not start, a sink that changes its batch, an async ``close``.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import threading
import warnings
from collections import Counter
from typing import Any

import pytest

import aggregator_reference as ar

from ._waits import call_bounded
from .conftest import Factory, shutdown_collecting
from .test_delivery import FAST, LIMIT, ClosingLedger, Ledger, Records, folded


@pytest.mark.clause("SINK-4")
def test_shutdown_from_inside_the_sinks_write_is_refused(make: Factory) -> None:
    agg = make(max_pending=4)
    refused: list[BaseException | None] = []

    class CallsShutdown(ClosingLedger):
        def write(self, batch: Records, batch_id: str, /) -> None:
            if not refused:
                try:
                    agg.shutdown(timeout=LIMIT)  # the delivery's own thread: it would wait for itself
                    refused.append(None)
                except BaseException as exc:
                    refused.append(exc)
            super().write(batch, batch_id)

    sink = CallsShutdown()
    for key in range(3):
        agg.add(key, 1)
    delivery = agg.deliver(sink, max_wait=0, retry=FAST)
    agg.flush()
    assert call_bounded(lambda: wait_for(lambda: bool(refused)), LIMIT, "the sink's write")
    assert isinstance(refused[0], ar.DeliveryError), refused
    assert "write" in str(refused[0])
    assert not agg.closed
    for key in range(3, 6):
        agg.add(key, 1)
    call_bounded(agg.shutdown, LIMIT, "shutdown() from outside the sink")
    assert agg.closed
    assert delivery.done
    assert sink.totals == dict.fromkeys(range(6), 1)


@pytest.mark.clause("SINK-1", "SINK-4")
def test_deliver_after_shutdown_completed_is_refused_and_drain_still_works(make: Factory) -> None:
    agg = make(max_pending=8)
    for key in range(3):
        agg.add(key, 1)
    agg.shutdown()  # nobody consumed: the records wait in the closed output (CLOSE-1)
    with pytest.raises(ar.AggregatorClosedError, match=r"drain\(\)"):
        agg.deliver(ClosingLedger())
    assert sorted(agg.drain()) == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.clause("SINK-4")
def test_a_delivery_started_while_shutdown_waits_is_waited_for(make: Factory) -> None:
    agg = make(max_pending=2)
    for key in range(6):
        agg.add(key, 1)
    with pytest.raises(TimeoutError):
        agg.shutdown(timeout=0.2)  # no consumer: the output is full
    sink = ClosingLedger()
    delivery = agg.deliver(sink, max_wait=0, retry=FAST)
    call_bounded(agg.shutdown, LIMIT, "shutdown() with a delivery started after a timeout")
    assert delivery.done
    assert sink.closes == 1
    assert sink.totals == dict.fromkeys(range(6), 1)


@pytest.mark.clause("OUT-5")
@pytest.mark.parametrize("consumer", ["batches", "deliver"])
def test_a_batch_larger_than_the_output_goes_out_once_the_output_is_full(
    make: Factory, consumer: str
) -> None:
    # No more records can arrive while the output is full: waiting max_wait only stalls flushes.
    agg = make(max_pending=4)
    for key in range(4):
        agg.add(key, 1)
    agg.flush()
    if consumer == "batches":
        batch = call_bounded(lambda: next(agg.batches(max_size=100, max_wait=60)), 5.0, "batches()")
        assert sorted(batch) == [(k, 1) for k in range(4)]
        shutdown_collecting(agg)
        return
    sink = Ledger()
    agg.deliver(sink, batch_size=100, max_wait=60, retry=FAST)
    assert call_bounded(lambda: wait_for(lambda: len(sink.totals) == 4), 5.0, "the delivery")
    agg.shutdown(timeout=LIMIT)


@pytest.mark.clause("SINK-4", "OUT-6")
def test_a_blocking_shutdown_in_the_deliverys_own_loop_is_refused_at_once(make: Factory) -> None:
    agg = make()
    sink = ClosingLedger()

    async def main() -> BaseException | None:
        agg.adeliver(sink, max_wait=0, retry=FAST)
        agg.add("k", 1)
        error = None
        try:
            agg.shutdown(timeout=3)  # would block the loop the delivery runs in
        except RuntimeError as exc:
            error = exc
        await agg.ashutdown()
        return error

    error = call_bounded(lambda: asyncio.run(main()), LIMIT, "the event loop")
    assert error is not None
    assert not isinstance(error, TimeoutError), "it waited instead of refusing at once"
    assert "ashutdown" in str(error)
    assert sink.totals == {"k": 1}


@pytest.mark.clause("SINK-4")
def test_a_delivery_whose_loop_was_closed_counts_as_ended(make: Factory) -> None:
    agg = make()
    first = ClosingLedger()
    loop = asyncio.new_event_loop()

    async def start() -> Any:
        return agg.adeliver(first, max_wait=0, retry=FAST)

    delivery = loop.run_until_complete(start())
    loop.close()  # the task never ran to its end
    for key in range(3):
        agg.add(key, 1)
    second = ClosingLedger()
    call_bounded(lambda: agg.deliver(second, max_wait=0, retry=FAST), LIMIT, "deliver()")
    call_bounded(lambda: agg.shutdown(timeout=LIMIT), LIMIT + 1, "shutdown()")
    assert delivery.done
    assert isinstance(delivery.error, RuntimeError)
    assert Counter(second.totals) + Counter(folded(delivery.held())) == dict.fromkeys(range(3), 1)


@pytest.mark.clause("SINK-1")
def test_a_delivery_thread_that_does_not_start_leaves_nothing_registered(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agg = make()
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name.startswith("delivery-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        agg.deliver(ClosingLedger())
    monkeypatch.undo()
    agg.add("k", 1)
    sink = ClosingLedger()
    agg.deliver(sink, max_wait=0, retry=FAST)  # not refused as "another delivery is running"
    call_bounded(lambda: agg.shutdown(timeout=LIMIT), LIMIT + 1, "shutdown()")
    assert sink.totals == {"k": 1}


@pytest.mark.clause("SINK-2")
def test_a_sink_that_changes_its_batch_gets_the_same_records_on_retry(make: Factory) -> None:
    agg = make()
    seen: list[Records] = []

    class Shrinks:
        def write(self, batch: Records, batch_id: str, /) -> None:
            seen.append(list(batch))
            if len(seen) == 1:
                batch.clear()  # a sink that consumes its argument, then fails
                raise ConnectionError("dropped")

    for key in range(5):
        agg.add(key, 1)
    agg.flush()
    delivery = agg.deliver(Shrinks(), max_wait=0, retry=FAST)
    call_bounded(lambda: agg.shutdown(timeout=LIMIT), LIMIT + 1, "shutdown()")
    assert len(seen) == 2
    assert seen[1] == seen[0]
    assert sorted(seen[1]) == [(k, 1) for k in range(5)]
    assert delivery.stats().records == 5


@pytest.mark.clause("SINK-1", "SINK-4")
def test_deliver_refuses_a_sink_whose_close_is_a_coroutine_function(make: Factory) -> None:
    class AsyncClose(Ledger):
        async def close(self) -> None:
            pass

    agg = make()
    with pytest.raises(TypeError, match=r"async close\(\).*adeliver\(\)"):
        agg.deliver(AsyncClose())
    agg.deliver(ClosingLedger())  # nothing registered


def wait_for(condition: Any, seconds: float = LIMIT) -> bool:
    """Poll ``condition()`` every millisecond for up to ``seconds``; its last value."""
    done = threading.Event()
    for _ in range(int(seconds * 1000)):
        if condition():
            return True
        done.wait(0.001)
    return bool(condition())


_ = operator  # the module's merges come from the shared sinks


@pytest.mark.clause("SINK-4", "CLOSE-6")
def test_a_shutdown_waiting_on_a_failing_delivery_says_so(
    make: Factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from aggregator_reference import _exit

    monkeypatch.setattr(_exit, "SHUTDOWN_WARNING_INTERVAL", 0.05)
    agg = make(max_pending=2)
    healthy = threading.Event()
    sink = ClosingLedger(healthy=healthy)
    for key in range(8):  # more than the output holds: shutdown waits for room
        agg.add(key, 1)
    agg.deliver(sink, batch_size=2, max_wait=0, retry=FAST)
    try:
        with caplog.at_level("WARNING", logger="aggregator_reference"), pytest.raises(TimeoutError) as raised:
            agg.shutdown(timeout=0.3)
        # Draining by hand would bypass the sink (and its order): the advice is about the delivery.
        for text in [
            str(raised.value),
            *(r.getMessage() for r in caplog.records if "shutdown()" in r.getMessage()),
        ]:
            assert "delivery" in text, text
            assert "SinkDown" in text, text
            assert "drain" not in text, text
    finally:
        healthy.set()
    call_bounded(lambda: agg.shutdown(timeout=LIMIT), LIMIT + 1, "shutdown() once the sink healed")
    assert sink.totals == dict.fromkeys(range(8), 1)


@pytest.mark.clause("SINK-4", "CLOSE-6")
def test_a_shutdown_warning_says_how_the_delivery_fares_when_it_is_logged(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sink starts failing only after shutdown() has begun to wait and said so once: the
    # warnings after that must say it fails (they said "not failing" all along, at random on 3.13t).
    from aggregator_reference import _exit

    monkeypatch.setattr(_exit, "SHUTDOWN_WARNING_INTERVAL", 0.05)
    said: list[str] = []
    first_warning = threading.Event()

    class Listen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())
            if "shutdown() has waited" in said[-1]:
                first_warning.set()

    class FailsOnceWarned(ClosingLedger):
        def write(self, batch: Records, batch_id: str, /) -> None:
            first_warning.wait(10)
            super().write(batch, batch_id)

    agg = make(max_pending=2)
    healthy = threading.Event()
    sink = FailsOnceWarned(healthy=healthy)
    for key in range(8):  # more than the output holds: shutdown waits for room
        agg.add(key, 1)
    listen = Listen(logging.WARNING)
    logger = logging.getLogger("aggregator_reference")
    logger.addHandler(listen)
    try:
        agg.deliver(sink, batch_size=2, max_wait=0, retry=FAST)
        with pytest.raises(TimeoutError):
            agg.shutdown(timeout=2)
    finally:
        logger.removeHandler(listen)
        first_warning.set()
        healthy.set()
    failed = next(i for i, text in enumerate(said) if "failed 1 time(s)" in text)
    later = [text for text in said[failed:] if "shutdown() has waited" in text]
    assert later, f"no shutdown() warning after the first failed write: {said}"
    for text in later:
        assert "SinkDown" in text, text
    call_bounded(lambda: agg.shutdown(timeout=LIMIT), LIMIT + 1, "shutdown() once the sink healed")
    assert sink.totals == dict.fromkeys(range(8), 1)


class UnprintableError(Exception):
    """A sink's error whose ``repr()`` raises: user code in every message that names it."""

    def __repr__(self) -> str:
        raise RuntimeError("repr() of the sink's error raised")


@pytest.mark.clause("SINK-4", "CLOSE-4", "CLOSE-6")
def test_a_sink_error_that_cannot_be_printed_does_not_change_how_shutdown_waits(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aggregator_reference import _exit

    monkeypatch.setattr(_exit, "SHUTDOWN_WARNING_INTERVAL", 0.05)
    healthy = threading.Event()

    class Unprintable(ClosingLedger):
        def __repr__(self) -> str:
            raise RuntimeError("repr() of the sink raised")

        def write(self, batch: Records, batch_id: str, /) -> None:
            if not healthy.is_set():
                raise UnprintableError
            super().write(batch, batch_id)

    agg = make(max_pending=2)
    sink = Unprintable(healthy=healthy)
    for key in range(8):  # more than the output holds: shutdown waits for room, and warns
        agg.add(key, 1)
    agg.deliver(sink, batch_size=2, max_wait=0, retry=FAST)
    try:
        with pytest.raises(TimeoutError) as raised:
            agg.shutdown(timeout=0.5)
        assert "UnprintableError" in str(raised.value)
    finally:
        healthy.set()
    call_bounded(lambda: agg.shutdown(timeout=LIMIT), LIMIT + 1, "shutdown() once the sink healed")
    assert sink.totals == dict.fromkeys(range(8), 1)


@pytest.mark.clause("SINK-1", "SINK-4")
def test_a_delivery_thread_that_does_not_start_does_not_hold_up_a_shutdown_under_way(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agg = make()
    agg.add("k", 1)
    start = threading.Thread.start
    outcome: list[BaseException | None] = []

    def shut_down() -> None:
        try:
            agg.shutdown(timeout=3)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    stopper = threading.Thread(target=shut_down, daemon=True)

    def refuse(thread: threading.Thread) -> None:
        if thread.name.startswith("delivery-"):  # a shutdown begins while it is registered
            start(stopper)
            threading.Event().wait(0.3)
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        agg.deliver(ClosingLedger())
    monkeypatch.undo()
    stopper.join(LIMIT)
    assert outcome == [None], f"the shutdown under way waited for a delivery that never ran: {outcome}"
    assert agg.drain() == [("k", 1)]


@pytest.mark.clause("SINK-4")
def test_an_adeliver_task_cancelled_before_its_first_step_counts_as_ended(make: Factory) -> None:
    agg = make()
    first, second = ClosingLedger(), ClosingLedger()

    async def main() -> Any:
        delivery = agg.adeliver(first, max_wait=0, retry=FAST)
        assert delivery.task is not None
        delivery.task.cancel()  # a TaskGroup or asyncio.timeout may do this before it ever runs
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert delivery.done
        agg.adeliver(second, max_wait=0, retry=FAST)  # not "still running"
        agg.add("k", 1)
        await agg.ashutdown(timeout=LIMIT)
        return delivery

    delivery = call_bounded(lambda: asyncio.run(main()), LIMIT + 2, "the event loop")
    assert isinstance(delivery.error, asyncio.CancelledError)
    assert second.totals == {"k": 1}
    assert first.events == []


@pytest.mark.clause("SINK-4")
def test_shutdown_from_a_task_the_sinks_write_starts_is_refused(make: Factory) -> None:
    agg = make()
    outcome: list[BaseException | None] = []

    class SpawnsShutdown(ClosingLedger):
        async def write(self, batch: Records, batch_id: str, /) -> None:  # type: ignore[override]
            if not outcome:
                try:
                    await asyncio.create_task(agg.ashutdown(timeout=2))  # a task of its own
                    outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)
            self.apply(batch, batch_id)

    sink = SpawnsShutdown()

    async def main() -> None:
        agg.adeliver(sink, max_wait=0, retry=FAST)
        agg.add("k", 1)
        agg.flush()
        while not outcome:
            await asyncio.sleep(0.001)
        await agg.ashutdown(timeout=LIMIT)

    call_bounded(lambda: asyncio.run(main()), LIMIT + 2, "the event loop")
    assert isinstance(outcome[0], ar.DeliveryError), outcome
    assert sink.totals == {"k": 1}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.clause("SINK-4", "LIFE-3")
def test_a_process_forked_inside_the_sinks_write_can_shut_down_its_copy(make: Factory) -> None:
    agg = make()
    children: list[int] = []

    class Forks(ClosingLedger):
        def write(self, batch: Records, batch_id: str, /) -> None:
            if not children:
                pid = os.fork()
                if pid == 0:  # the child: its copy is closed (LIFE-3), so shutdown() returns
                    try:
                        agg.shutdown(timeout=1)
                        code = 0
                    except BaseException:
                        code = 1
                    os._exit(code)
                children.append(pid)
            super().write(batch, batch_id)

    sink = Forks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads running
        agg.deliver(sink, max_wait=0, retry=FAST)
        agg.add("k", 1)
        call_bounded(lambda: agg.shutdown(timeout=LIMIT), LIMIT + 1, "shutdown()")
    _, status = os.waitpid(children[0], 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's shutdown() of its copy raised"
    assert sink.totals == {"k": 1}


@pytest.mark.clause("SINK-1")
def test_an_adeliver_task_that_cannot_be_created_leaves_nothing_registered(make: Factory) -> None:
    agg = make()
    sink = ClosingLedger()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def refuse(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> Any:
            coro.close()
            raise RuntimeError("no more tasks")

        loop.set_task_factory(refuse)
        with pytest.raises(RuntimeError, match="no more tasks"):
            agg.adeliver(ClosingLedger())
        loop.set_task_factory(None)
        agg.adeliver(sink, max_wait=0, retry=FAST)  # not "still running"
        agg.add("k", 1)
        await agg.ashutdown(timeout=LIMIT)

    call_bounded(lambda: asyncio.run(main()), LIMIT + 2, "the event loop")
    assert sink.totals == {"k": 1}
