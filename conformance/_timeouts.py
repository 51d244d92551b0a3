"""How a run ends when a backend hangs: the per-test limit, its report, and threads left running.

pytest-timeout supplies the limit (``--timeout``, the ``timeout`` ini option,
``@pytest.mark.timeout``); this module adds what a third party's first run needs:

* Defaults for a run that configured nothing: :data:`DEFAULT_TIMEOUT` seconds
  per test, and the thread method, the only one that stops a test blocked on a
  lock that is never released (the signal method raises in the main thread,
  whose teardown then blocks on the same lock).
* The report when the limit fires: the test's node id, the clauses it cites,
  its captured output and every thread's stack; then ``os._exit(1)``, as
  pytest-timeout's thread method does, since a wedged thread cannot be stopped.
* Under pytest-xdist the worker's own output is lost, so the worker leaves the
  report in a file and the controller adds it to the "worker crashed" failure.
* At exit, a thread that a test started and left running (a consumer of an
  aggregator that never shut down) would keep the process alive forever: it
  is reported with its stack and the process exits instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from ._waits import format_stacks

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXIT_STATUS",
    "add_report_to_crash",
    "cancel_timer",
    "check_threads_at_exit",
    "configure",
    "configure_worker",
    "note_threads_left",
    "remove_reports",
    "set_timer",
    "timeout_report",
    "timeout_summary",
]

#: Seconds per test when the user configured none: the repository's ``timeout``
#: in pyproject.toml. Most tests take well under a second; the slowest set their own.
DEFAULT_TIMEOUT = 300.0
#: How long the exit check waits for threads that tests left running to end on their own.
EXIT_GRACE = 10.0
#: At most this many thread stacks in a timeout report (a stress test may run a thousand).
MAX_STACKS = 50
#: The key in xdist's ``workerinput`` naming the folder where workers leave timeout reports.
REPORTS_KEY = "aggregator_conformance_timeout_reports"

_TIMER = pytest.StashKey[threading.Timer]()
_REPORTS = pytest.StashKey[Path]()
_LEFT = pytest.StashKey[dict[threading.Thread, str]]()
#: The session's exit status, kept for :func:`check_threads_at_exit`.
EXIT_STATUS = pytest.StashKey[int]()


def configure(config: pytest.Config) -> None:
    """Apply the defaults; call before pytest-timeout's own ``pytest_configure`` reads the options."""
    config.stash[_LEFT] = {}
    manager = config.pluginmanager
    if not manager.has_plugin("timeout"):
        if manager.is_blocked("timeout"):
            return  # -p no:timeout: the user chose to run without a per-test limit
        raise pytest.UsageError(
            "the conformance suite needs pytest-timeout, so that a deadlocked backend fails "
            "instead of hanging: pip install 'aggregator-reference[conformance]'"
        )
    if (
        config.getoption("timeout") is None
        and not os.environ.get("PYTEST_TIMEOUT")
        and not config.getini("timeout")
    ):
        config.option.timeout = DEFAULT_TIMEOUT
    if config.getoption("timeout_method") is None and not config.getini("timeout_method"):
        config.option.timeout_method = "thread"


def clauses_of(item: pytest.Item) -> list[str]:
    """The contract clauses ``item`` cites with ``@pytest.mark.clause``, in order."""
    return [c for mark in item.iter_markers("clause") for c in mark.args]


def timeout_summary(item: pytest.Item, seconds: float) -> str:
    """One line: which test overran, by how much, and which clauses it checks."""
    clauses = ", ".join(clauses_of(item)) or "no clause"
    return f"TIMEOUT {item.nodeid} after {seconds:g} s; it checks {clauses}"


def timeout_report(item: pytest.Item, seconds: float, captured: tuple[str, str] = ("", "")) -> str:
    """What the run prints when ``item`` overruns ``seconds``: name, clauses, output, every stack."""
    clauses = ", ".join(clauses_of(item)) or "no clause"
    rule = "+" * 30 + " Timeout " + "+" * 30
    parts = [
        f"\n{rule}\n",
        f"{item.nodeid} did not finish within {seconds:g} s (pytest-timeout, thread method).\n",
        f"It checks {clauses} of the contract (CONTRACT.md beside the suite, spec/ in its repository).\n",
        "A thread waiting for a lock that another never releases is the usual cause; "
        "every thread's stack follows.\n",
    ]
    for name, text in zip(("stdout", "stderr"), captured, strict=True):
        if text:
            parts.append(f"~~~ Captured {name} ~~~\n{text}\n")
    parts.append(format_stacks([threading.main_thread()], limit=MAX_STACKS))
    parts.append(f"{rule}\n{timeout_summary(item, seconds)}.\n")
    return "".join(parts)


def set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """Start the thread-method timer for ``item``; ``None`` leaves other methods to pytest-timeout."""
    if settings.method != "thread":
        return None
    timer = threading.Timer(settings.timeout, _on_timeout, (item, settings))
    timer.name = f"conformance timeout: {item.nodeid}"
    timer.daemon = True
    item.stash[_TIMER] = timer
    timer.start()
    return True


def cancel_timer(item: pytest.Item) -> bool | None:
    """Stop ``item``'s timer; ``None`` when it has none of ours (pytest-timeout's then runs)."""
    timer = item.stash.get(_TIMER, None)
    if timer is None:
        return None
    del item.stash[_TIMER]
    timer.cancel()
    timer.join()
    return True


def _on_timeout(item: pytest.Item, settings: Any) -> None:
    """The timer fired: report, then end the process (a wedged thread cannot be interrupted)."""
    timeout_plugin = item.config.pluginmanager.getplugin("timeout")
    if not settings.disable_debugger_detection and timeout_plugin and timeout_plugin.is_debugging():
        return
    try:
        captured = ("", "")
        capman = item.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
            captured = capman.read_global_capture()
        report = timeout_report(item, settings.timeout, captured)
        workerinput: dict[str, Any] | None = getattr(item.config, "workerinput", None)
        if workerinput is None:
            end = "The run stops here: a deadlocked thread cannot be interrupted.\n"
            item.config.get_terminal_writer().write(report + end, flush=True)
        else:
            # The worker's stdout goes nowhere and its stderr is the user's terminal: a line
            # there now, the whole report in the controller's failure for this crashed worker.
            sys.stderr.write(f"\n{timeout_summary(item, settings.timeout)}; the worker exits\n")
            if REPORTS_KEY in workerinput:
                folder = Path(workerinput[REPORTS_KEY])
                (folder / f"{workerinput['workerid']}.txt").write_text(report, encoding="utf-8")
    except Exception:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def configure_worker(node: Any) -> None:
    """xdist controller: tell each worker where to leave a timeout report."""
    config: pytest.Config = node.config
    if _REPORTS not in config.stash:
        config.stash[_REPORTS] = Path(tempfile.mkdtemp(prefix="aggregator-conformance-"))
    node.workerinput[REPORTS_KEY] = str(config.stash[_REPORTS])


def add_report_to_crash(report: Any) -> None:
    """xdist controller: put the timeout report a crashed worker left into its failure."""
    node = getattr(report, "node", None)
    if node is None:
        return
    folder = node.config.stash.get(_REPORTS, None)
    if folder is None:
        return
    left = folder / f"{node.gateway.id}.txt"
    if left.is_file():
        report.longrepr = f"{report.longrepr}\n{left.read_text(encoding='utf-8')}"


def note_threads_left(item: pytest.Item, before: set[threading.Thread]) -> None:
    """Remember the non-daemon threads ``item`` started and left running (checked at exit)."""
    left = item.config.stash.get(_LEFT, None)
    if left is None:
        return
    for thread in threading.enumerate():
        if thread not in before and not thread.daemon and thread.is_alive():
            left.setdefault(thread, item.nodeid)


def check_threads_at_exit(config: pytest.Config, exitstatus: int) -> None:
    """If threads that tests left running do not end within :data:`EXIT_GRACE`, report them and exit.

    Such a thread (a consumer blocked on ``records()`` of an aggregator that never
    shut down) would otherwise keep the interpreter from exiting, forever. The
    exit status is the session's, or 1 if it had passed.
    """
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller kills it if it does not exit
    left = config.stash.get(_LEFT, {})
    deadline = time.monotonic() + EXIT_GRACE
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread for thread in left if thread.is_alive()]
    if not stuck:
        return
    lines = "".join(f"  {thread.name!r}, started by {left[thread]}\n" for thread in stuck)
    sys.stderr.write(
        f"\n{len(stuck)} thread(s) that tests started are still running {EXIT_GRACE:g} s after the "
        f"run, and would keep this process alive forever:\n{lines}"
        f"Exiting now instead. Their stacks:\n{format_stacks(stuck, limit=len(stuck))}"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exitstatus or 1)


def remove_reports(config: pytest.Config) -> None:
    """xdist controller: remove the folder for timeout reports, if one was made."""
    folder = config.stash.get(_REPORTS, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
