"""Waits that end: a call that may never return runs in a daemon thread with a bound.

A backend with a wedged lock blocks whoever touches it, forever; a helper of
the suite that waits for it must fail with the stacks that show why, and leave
the stuck thread behind as a daemon, so that it neither hangs the run nor keeps
the process alive.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import TypeVar

__all__ = ["call_bounded", "format_stack", "format_stacks", "peek"]

T = TypeVar("T")

#: How many threads' stacks a report shows at most (a stress test may run a thousand).
MAX_STACKS = 12

_RUNNER_PARTS = frozenset({"_pytest", "pluggy", "pytest", "execnet", "xdist"})
_LAUNCHER = str(Path(__file__).with_name("__main__.py"))
#: The name of :func:`peek`'s threads, left out of stack dumps.
_PEEK = "conformance: peek"


def _is_runner(filename: str) -> bool:
    """Whether a frame belongs to the machinery that runs tests, not to a test or a backend."""
    return (
        filename.startswith("<frozen ")
        or filename == _LAUNCHER
        or any(part in _RUNNER_PARTS for part in Path(filename).parts)
    )


def format_stack(thread: threading.Thread, frame: FrameType) -> str:
    """``thread``'s stack from ``frame``, most recent call last, without the test runner's outer frames."""
    summary = traceback.extract_stack(frame)
    outer = 0
    while outer < len(summary) - 1 and _is_runner(summary[outer].filename):
        outer += 1
    hidden = f" ({outer} outer frames of the test runner hidden)" if outer else ""
    lines = "".join(traceback.format_list(summary[outer:]))
    return f"--- Stack of thread {thread.name!r}, most recent call last{hidden} ---\n{lines}"


def format_stacks(first: Iterable[threading.Thread] = (), *, limit: int = MAX_STACKS) -> str:
    """The stacks of the threads in ``first``, then of every other but this one (at most ``limit``)."""
    frames = sys._current_frames()
    here = threading.get_ident()
    leading = list(first)
    others = [t for t in threading.enumerate() if t not in leading and t.name != _PEEK]
    shown = [t for t in leading + others if t.ident in frames and t.ident != here]
    parts = [format_stack(thread, frames[thread.ident]) for thread in shown[:limit] if thread.ident]
    if len(shown) > limit:
        parts.append(f"--- and {len(shown) - limit} more thread(s), not shown ---\n")
    return "".join(parts)


def call_bounded(
    target: Callable[[], T], seconds: float, what: str, state: Callable[[], str] | None = None
) -> T:
    """Return ``target()``, run in a daemon thread, or raise what it raised.

    Raises ``AssertionError`` when it has not returned after ``seconds``: the
    message names ``what``, adds ``state()`` (which must not wait on the
    backend either) and the stacks of every thread, the stuck one first.
    """
    outcome: dict[str, T] = {}
    failure: list[BaseException] = []

    def body() -> None:
        try:
            outcome["value"] = target()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"conformance: {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        detail = f"; {state()}" if state is not None else ""
        raise AssertionError(
            f"{what} did not return within {seconds:g} s: the backend is wedged "
            f"(a lock that is never released?){detail}. The stuck thread is left running as a "
            f"daemon.\n{format_stacks([thread])}"
        )
    if failure:
        raise failure[0]
    return outcome["value"]


def peek(read: Callable[[], object], seconds: float = 1.0) -> str:
    """``str(read())`` if it returns within ``seconds``; otherwise (or if it raises) says why not."""
    answer: list[str] = []

    def body() -> None:
        try:
            answer.append(str(read()))
        except Exception as exc:
            answer.append(f"unknown ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=body, name=_PEEK, daemon=True)
    thread.start()
    thread.join(seconds)
    return answer[0] if answer else "unknown (it waits too)"
