"""A concurrency-safe, in-memory aggregation buffer.

Writers call ``add(key, value)``; values for one key are combined with the
user's ``merge(stored, incoming)``; a background flusher hands every record to
a bounded output that consumers drain with ``records()`` or ``drain()``.
Nothing is ever dropped. The contract is ``spec/CONTRACT.md``.

>>> import operator, aggregator_reference as ar
>>> with ar.create(operator.add, backend="reference", flush_interval=None) as agg:
...     agg.add("hits", 1), agg.add("hits", 2)
(False, True)
>>> agg.drain()
[('hits', 3)]
"""

from __future__ import annotations

from . import _kit as kit
from ._delivery import AsyncSink, Delivery, DeliveryStats, Retry, Sink
from ._engine import BufferedAggregator
from ._errors import (
    AggregatorClosedError,
    AggregatorError,
    BackendNotFoundError,
    BufferFullError,
    DeliveryError,
    ReentrantMergeError,
)
from ._exit import set_exit_timeout
from ._reference import ReferenceAggregator, ReferenceStorage
from ._registry import (
    ENTRY_POINT_GROUP,
    backend_names,
    create,
    default_backend,
    explain_default_backend,
    gil_enabled,
    load_backend,
)
from ._types import Aggregator, Merge, Stats, Storage

__all__ = [
    "ENTRY_POINT_GROUP",
    "Aggregator",
    "AggregatorClosedError",
    "AggregatorError",
    "AsyncSink",
    "BackendNotFoundError",
    "BufferFullError",
    "BufferedAggregator",
    "Delivery",
    "DeliveryError",
    "DeliveryStats",
    "Merge",
    "ReentrantMergeError",
    "ReferenceAggregator",
    "ReferenceStorage",
    "Retry",
    "Sink",
    "Stats",
    "Storage",
    "backend_names",
    "create",
    "default_backend",
    "explain_default_backend",
    "gil_enabled",
    "kit",
    "load_backend",
    "set_exit_timeout",
]

__version__ = "0.1.0"
