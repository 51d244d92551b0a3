"""Sinks: where :meth:`~aggregator_reference.BufferedAggregator.deliver` writes batches (SINK-5).

- :class:`SQLiteSink`: the standard library's ``sqlite3``; the embedded default.
- :class:`PostgresSink`: PostgreSQL through psycopg 3, an optional extra
  (``pip install 'aggregator-reference[postgres]'``), imported only when used.

Both apply each batch in one transaction together with its ``batch_id`` in a
ledger table, so a batch retried after a lost acknowledgement is applied
exactly once. Any object with ``write(batch, batch_id)`` is a sink too
(:class:`aggregator_reference.Sink`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._sqlite import SQLiteSink

if TYPE_CHECKING:
    from ._postgres import PostgresSink

__all__ = ["PostgresSink", "SQLiteSink"]


def __getattr__(name: str) -> Any:
    if name == "PostgresSink":  # psycopg is imported only by those who use it
        from ._postgres import PostgresSink

        return PostgresSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
