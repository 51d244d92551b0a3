"""Exit and shutdown as users meet them: LIFE-2 (interpreter exit), CLOSE-6 (a waiting shutdown warns)."""

from __future__ import annotations

import logging
import operator
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from aggregator_reference import _exit

from .conftest import Factory, StallingMerge, fold_records

#: Seconds a child interpreter gets to exit before the test fails: far above any bound it uses.
CHILD_LIMIT = 60.0

PREAMBLE = """
import operator, sys, threading
import aggregator_reference as ar

agg = ar.create(operator.add, backend=sys.argv[1], flush_interval=None, max_pending=4)
"""

CONSUMER_LEFT_RUNNING = (
    PREAMBLE
    + """
for i in range(20):
    agg.add(i, 1)

def consume():
    for key, value in agg.records():
        print(key, value, flush=True)
    print("records() ended", flush=True)

threading.Thread(target=consume, name="consumer").start()  # not a daemon: exit joins it
# The script ends here: no shutdown(), no join.
"""
)

NO_CONSUMER = (
    PREAMBLE
    + """
for i in range(10):
    agg.add(i, 1)
ar.set_exit_timeout(0.5)
print("script ended", flush=True)
"""
)

MERGE_STUCK = """
import sys, threading
import aggregator_reference as ar

in_merge = threading.Event()

def merge(stored, incoming):
    if incoming == 2:
        in_merge.set()
        threading.Event().wait()  # never returns
    return stored + incoming

agg = ar.create(merge, backend=sys.argv[1], flush_interval=None)

def write():  # both adds in one thread, so that the second merges into the first (ADD-2)
    agg.add("k", 1)
    agg.add("k", 2)

def consume():
    for key, value in agg.records():
        print(key, value, flush=True)
    print("records() ended", flush=True)

threading.Thread(target=consume, name="consumer").start()  # not a daemon: exit joins it
threading.Thread(target=write, daemon=True).start()
in_merge.wait()
ar.set_exit_timeout(0.5)
"""

SHUT_DOWN_ALREADY = """
import operator, sys
import aggregator_reference as ar

agg = ar.create(operator.add, backend=sys.argv[1], flush_interval=None)
for i in range(3):
    agg.add(i, 1)
agg.shutdown()  # its 3 records stay in the output, never consumed: the caller's choice
print("script ended", flush=True)
"""


SINK_DOWN = """
import operator, sys, threading
import aggregator_reference as ar

class Down:
    def write(self, batch, batch_id):
        raise ConnectionError("the database is down")

agg = ar.create(operator.add, backend=sys.argv[1], flush_interval=None, max_pending=3)
for i in range(8):
    agg.add(i, 1)
agg.flush()  # 3 go to the output, 5 are re-queued
delivery = agg.deliver(Down(), batch_size=2, max_wait=0, retry=ar.Retry(first=0.01, maximum=0.05))
while delivery.stats().retries == 0:
    threading.Event().wait(0.01)
ar.set_exit_timeout(0.5)
print("held", delivery.stats().held, flush=True)
"""


DELIVERY_CANCELLED = """
import asyncio, operator, sys
import aggregator_reference as ar

class Sink:
    def write(self, batch, batch_id):
        print("wrote", len(batch), flush=True)

agg = ar.create(operator.add, backend=sys.argv[1], flush_interval=None, max_pending=1000)

async def main():
    agg.adeliver(Sink(), max_wait=60)  # waits for a full batch or a minute
    for i in range(5):
        agg.add(i, 1)
    agg.flush()
    await asyncio.sleep(0.05)
    # No ashutdown(): asyncio.run cancels the delivery's task when main returns.

asyncio.run(main())
print("script ended", flush=True)
"""

# An atexit handler runs after threading has marked the main thread as ended: adds from
# there, while another thread flushes, must reach the output like any other (THREAD-1).
ADDS_FROM_ATEXIT = """
import atexit, operator, sys, threading, time
import aggregator_reference as ar

box = {}
stop = threading.Event()

def flush_often():  # a daemon thread started before exit: it keeps running during atexit
    while not stop.is_set():
        if "agg" in box:
            box["agg"].flush()
        time.sleep(0.001)

threading.Thread(target=flush_often, daemon=True).start()

def late():
    agg = ar.create(operator.add, backend=sys.argv[1], flush_interval=None, max_pending=10**6)
    box["agg"] = agg
    for i in range(300):
        agg.add(i % 7, 1)
        if i % 50 == 49:
            time.sleep(0.02)  # flushes run meanwhile
    stop.set()
    agg.shutdown(timeout=10)
    print("delivered", sum(value for _, value in agg.drain()), flush=True)

atexit.register(late)
"""

# Aggregators dropped with records in reference cycles: the collector finalizes them (LIFE-1)
# at any allocation, also one made while the same thread is inside the backend's own code.
COLLECTED_IN_CYCLES = """
import gc, sys, warnings
import aggregator_reference as ar

warnings.simplefilter("ignore", ResourceWarning)

class Holder:
    pass

gc.set_threshold(1, 1, 1)  # collect at almost every allocation
for i in range(300):
    holder = Holder()
    holder.me = holder
    holder.agg = ar.create(lambda a, b: a + b, backend=sys.argv[1], flush_interval=None)
    holder.agg.add("k", 1)
    holder.agg.get("k")
    del holder
print("done", flush=True)
"""


def child_env() -> dict[str, str]:
    """This process's environment for a child: the same import path, no warning filters."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("PYTHONWARNINGS", None)
    return env


def run_child(script: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter with ``argv`` as ``sys.argv[1:]``; fail if it hangs."""
    command = [sys.executable, "-c", script, *argv]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=CHILD_LIMIT)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            raise AssertionError(
                f"the script did not exit within {CHILD_LIMIT:g} s (a thread that keeps it alive: "
                f"blocked in records(), or a stuck flusher?)\nstdout:\n{stdout}\nstderr:\n{stderr}"
            ) from None
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


@pytest.mark.clause("LIFE-2")
def test_exit_delivers_every_record_to_a_consumer_left_running(backend_name: str) -> None:
    child = run_child(CONSUMER_LEFT_RUNNING, backend_name)
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines[-1:] == ["records() ended"], child.stdout
    assert sorted(lines[:-1], key=lambda line: int(line.split()[0])) == [f"{i} 1" for i in range(20)]
    assert "not delivered" not in child.stderr, child.stderr


@pytest.mark.clause("LIFE-2")
def test_exit_without_a_consumer_warns_with_counts(backend_name: str) -> None:
    child = run_child(NO_CONSUMER, backend_name)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "script ended\n"
    # max_pending=4 of 10 keys reached the output; 6 stayed buffered.
    assert re.search(r"4 record\(s\) pending in the output, 6 key\(s\) still buffered", child.stderr), (
        child.stderr
    )
    assert "set_exit_timeout" in child.stderr, child.stderr


@pytest.mark.clause("LIFE-2")
def test_exit_ends_a_consumers_loop_even_when_the_bound_passes(backend_name: str) -> None:
    child = run_child(MERGE_STUCK, backend_name)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[-1:] == ["records() ended"], child.stdout
    assert "not shut down within the exit bound of 0.5 s" in child.stderr, child.stderr
    assert "0 record(s) pending in the output" in child.stderr, child.stderr


@pytest.mark.clause("LIFE-2", "SINK-4")
def test_exit_counts_what_a_failing_delivery_held(backend_name: str) -> None:
    child = run_child(SINK_DOWN, backend_name)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "held 2\n"
    # The delivery holds 2 of the 8 records, its sink down; exit's shutdown flushes 2 of the 5
    # buffered into the room that left in the output (3 pending), and 3 stay buffered: all counted.
    assert re.search(
        r"3 record\(s\) pending in the output, 2 record\(s\) held by a delivery whose sink did not "
        r"take them, 3 key\(s\) still buffered",
        child.stderr,
    ), child.stderr


@pytest.mark.clause("LIFE-2", "SINK-4")
def test_exit_warns_about_records_a_delivery_that_ended_early_left_behind(backend_name: str) -> None:
    child = run_child(DELIVERY_CANCELLED, backend_name)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "script ended\n"
    # Exit's shutdown completes (the output has room), but nobody is left to take the 5 records.
    assert re.search(r"5 record\(s\) pending in the output", child.stderr), child.stderr
    assert "delivery" in child.stderr.split("pending in the output")[0].rsplit("\n", 1)[-1], child.stderr


@pytest.mark.clause("LIFE-2")
def test_exit_skips_an_aggregator_already_shut_down(backend_name: str) -> None:
    child = run_child(SHUT_DOWN_ALREADY, backend_name)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "script ended\n"
    assert "aggregator" not in child.stderr.lower(), child.stderr


class _Counter(logging.Handler):
    """Sets ``enough`` once ``count`` WARNINGs that contain ``about`` have been logged."""

    def __init__(self, count: int) -> None:
        super().__init__(logging.WARNING)
        self.count = count
        self.about = ""
        self.enough = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.about in record.getMessage():
            self.count -= 1
        if self.count <= 0:
            self.enough.set()


@pytest.fixture
def warnings_seen(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[_Counter]:
    """A waiting shutdown warns every 10 ms; the handler says when it has warned twice (``about`` what)."""
    monkeypatch.setattr(_exit, "SHUTDOWN_WARNING_INTERVAL", 0.01)
    counter = _Counter(2)
    logger = logging.getLogger("aggregator_reference")
    logger.addHandler(counter)
    with caplog.at_level(logging.WARNING, logger="aggregator_reference"):
        yield counter
    logger.removeHandler(counter)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "aggregator_reference" and r.levelno == logging.WARNING
    ]


@pytest.mark.clause("CLOSE-6")
def test_a_shutdown_waiting_for_a_consumer_warns_with_counts(
    make: Factory, warnings_seen: _Counter, caplog: pytest.LogCaptureFixture
) -> None:
    warnings_seen.about = "a consumer to make room"  # not the wait for close(), which may come first
    agg = make(operator.add, max_pending=2)
    for i in range(10):
        agg.add(i, 1)
    delivered: dict[int, int] = {}
    consumer = threading.Thread(target=fold_records, args=(agg, delivered), daemon=True)
    with ThreadPoolExecutor(1) as pool:
        shutting = pool.submit(agg.shutdown)
        try:
            seen = warnings_seen.enough.wait(30)
            waited = not shutting.done()
        finally:
            consumer.start()  # the consumer comes only now, so that shutdown() had to wait
        shutting.result(30)
    consumer.join(30)
    assert seen, "shutdown() waited without a WARNING"
    assert waited
    assert delivered == dict.fromkeys(range(10), 1)
    said = _warnings(caplog)
    assert len(said) >= 2
    # The first may be about close() still returning (the helper thread that runs it can
    # be a moment late, on 3.13t above all); the wait for room must be said too.
    room = [text for text in said if "a consumer to make room" in text]
    assert room, said
    assert "2 record(s) pending in the output, 8 key(s) buffered" in room[0], room[0]
    assert "records() or drain()" in room[0], room[0]
    assert "timeout=" in room[0], room[0]


@pytest.mark.clause("CLOSE-6", "CLOSE-4")
def test_a_shutdown_waiting_for_a_merge_warns(
    make: Factory, warnings_seen: _Counter, caplog: pytest.LogCaptureFixture
) -> None:
    merge = StallingMerge(bound=30)
    in_merge, release = merge.entered, merge.release

    warnings_seen.about = "merge is still running"
    agg = make(merge)
    with ThreadPoolExecutor(1) as writer, ThreadPoolExecutor(1) as stopper:
        writer.submit(agg.add, "k", 1).result()
        adding = writer.submit(agg.add, "k", 2)
        assert in_merge.wait(30)
        shutting = stopper.submit(agg.shutdown)
        seen = warnings_seen.enough.wait(30)
        release.set()
        assert seen, "shutdown() waited for a merge without a WARNING"
        assert adding.result(30) is True
        shutting.result(30)
    assert agg.drain() == [("k", 3)]
    said = _warnings(caplog)
    assert "merge is still running" in said[0], said[0]
    assert "not counted" in said[0], said[0]
    assert "0 record(s) pending in the output" in said[0], said[0]
    assert "timeout=" in said[0], said[0]


@pytest.mark.clause("THREAD-1", "FLUSH-1")
def test_adds_from_an_atexit_handler_while_flushes_run_are_all_delivered(backend_name: str) -> None:
    # threading.main_thread().is_alive() is False there: a backend that drops the buffers of
    # threads it believes ended lost most of them (freethreaded) or freed one in use (native).
    child = run_child(ADDS_FROM_ATEXIT, backend_name)
    assert child.returncode == 0, f"exit status {child.returncode}\n{child.stderr}"
    assert child.stdout == "delivered 300\n", child.stdout + child.stderr


@pytest.mark.clause("LIFE-1", "THREAD-1")
def test_aggregators_collected_in_cycles_while_others_are_made_never_deadlock(backend_name: str) -> None:
    # native's finalizer (len of its storage) re-entered a lock its own code held when the
    # collector ran inside that code: the thread waited for itself.
    child = run_child(COLLECTED_IN_CYCLES, backend_name)
    assert child.returncode == 0, f"exit status {child.returncode}\n{child.stderr}"
    assert child.stdout == "done\n", child.stdout + child.stderr
