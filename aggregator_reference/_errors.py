"""Exceptions raised by aggregators and the backend registry.

Every exception derives from :class:`AggregatorError`, and each subclass also
inherits the builtin it refines, so ``except RuntimeError`` or
``except LookupError`` keeps working for callers that do not know this library.
"""

from __future__ import annotations

__all__ = [
    "AggregatorClosedError",
    "AggregatorError",
    "BackendNotFoundError",
    "BufferFullError",
    "DeliveryError",
    "ReentrantMergeError",
]


class AggregatorError(Exception):
    """Base class of every error this library raises on purpose."""


class AggregatorClosedError(AggregatorError, RuntimeError):
    """Raised by ``add()`` and ``flush()`` once ``shutdown()`` has begun."""


class ReentrantMergeError(AggregatorError, RuntimeError):
    """Raised when ``merge`` calls ``add``, ``flush`` or ``shutdown`` of the aggregator that is calling it."""


class BufferFullError(AggregatorError):
    """Raised by ``add()`` of a new key when ``max_buffered`` records stayed buffered for ``max_block`` s.

    Nothing was stored; the message names the records buffered and the bound (BUF-1).
    """


class DeliveryError(AggregatorError, RuntimeError):
    """Raised by ``deliver()`` while another delivery of the same aggregator is still running."""


class BackendNotFoundError(AggregatorError, LookupError):
    """Raised when a backend name is not registered; the message lists the installed ones."""
