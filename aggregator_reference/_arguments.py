"""The checks of the engine's constructor arguments (ARG-1)."""

from __future__ import annotations

import sys
import threading

__all__ = ["check_arguments", "check_bounds", "check_seconds"]


def check_arguments(merge: object, flush_interval: object, max_pending: object, shards: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad constructor argument."""
    if not callable(merge):
        raise TypeError(f"merge must be callable, got {type(merge).__name__}")
    if flush_interval is not None:
        if isinstance(flush_interval, bool) or not isinstance(flush_interval, (int, float)):
            raise TypeError(
                f"flush_interval must be a number of seconds or None, got {type(flush_interval).__name__}"
            )
        if not (0 < flush_interval <= threading.TIMEOUT_MAX):
            raise ValueError(
                f"flush_interval must be > 0 seconds and at most threading.TIMEOUT_MAX "
                f"({threading.TIMEOUT_MAX:g}), got {flush_interval!r}"
            )
    if isinstance(max_pending, bool) or not isinstance(max_pending, int):
        raise TypeError(f"max_pending must be an int, got {type(max_pending).__name__}")
    if max_pending < 1:
        raise ValueError(f"max_pending must be >= 1, got {max_pending}")
    if shards is not None:
        if isinstance(shards, bool) or not isinstance(shards, int):
            raise TypeError(f"shards must be an int or None, got {type(shards).__name__}")
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a positive power of two, got {shards}")


def check_bounds(max_buffered: object, max_block: object, flush_at: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad bound (BUF-1, BUF-3)."""
    for name, value in (("max_buffered", max_buffered), ("flush_at", flush_at)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")
    check_seconds("max_block", max_block)


def check_seconds(name: str, value: object, *, positive: bool = False, finite: bool = False) -> float:
    """``value`` as a float if it is a wait in seconds that ``Lock.acquire`` takes; else an error naming it.

    ``positive``: 0 is refused too. ``finite``: any finite number of seconds
    (a span of time, not a wait), not only up to ``threading.TIMEOUT_MAX``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    most = sys.float_info.max if finite else threading.TIMEOUT_MAX
    if not ((value > 0 if positive else value >= 0) and value <= most):
        bound = "finite" if finite else f"at most threading.TIMEOUT_MAX ({threading.TIMEOUT_MAX:g})"
        raise ValueError(f"{name} must be {'>' if positive else '>='} 0 seconds and {bound}, got {value!r}")
    return float(value)
