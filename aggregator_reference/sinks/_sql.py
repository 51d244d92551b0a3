"""What the SQL sinks share: names, numbers, the merge expression, batch ids and the ledger (SINK-5)."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import _arguments

__all__ = [
    "LEDGER_RETENTION",
    "MAX_IDENTIFIER",
    "MAX_TABLE",
    "PRUNE_EVERY",
    "ConnectedSink",
    "Statements",
    "check_keys",
    "check_name",
    "check_seconds",
    "parse_batch_id",
    "rounds",
]

#: Seconds after which a ledger row no delivery has touched is deleted (7 days).
LEDGER_RETENTION = 7 * 24 * 3600.0
#: The ledger is pruned in the transaction of every this many batches (and of the first).
PRUNE_EVERY = 1000

#: The longest table name (SQLite's sink): a plain identifier of PostgreSQL's length, 63.
MAX_IDENTIFIER = 63
#: The longest table name in PostgreSQL, which cuts names to 63 bytes: ``<table>_incoming`` must fit.
MAX_TABLE = MAX_IDENTIFIER - len("_incoming")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(what: str, name: object, most: int = MAX_IDENTIFIER) -> str:
    """``name`` if it is a plain SQL identifier (letters, digits, _) of at most ``most`` characters.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is not such an identifier (the message says why ``most``).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name) or len(name) > most:
        why = (
            f" (PostgreSQL cuts names to 63 bytes, and the sink also names '<{what}>_incoming' "
            f"and '<{what}>_ledger')"
            if most < MAX_IDENTIFIER
            else ""
        )
        raise ValueError(
            f"{what} must be a plain SQL identifier (a letter or _, then letters, digits or _) "
            f"of at most {most} characters{why}; got {name!r}"
        )
    return name


def check_keys(batch: Sequence[tuple[object, object]]) -> None:
    """Raise ``ValueError`` naming the first ``None`` or NaN key of ``batch``.

    Both are NULL to SQLite (NaN is bound as NULL) and ``None`` is NULL to
    PostgreSQL: a NULL key never merges, and a table an older version made
    without ``NOT NULL`` would keep each as a row of its own. NaN is refused
    in PostgreSQL too, so that a batch means the same in both sinks.
    """
    for index, (key, _) in enumerate(batch):
        if key is None or (isinstance(key, float) and math.isnan(key)):
            raise ValueError(
                f"key {key!r} (record {index} of the batch) is not supported by the SQL sinks: "
                "a NULL key never merges; map it to a real key before adding it"
            )


def check_seconds(name: str, value: object, *, zero: bool = False, finite: bool = False) -> float:
    """``value`` as a float if it is a number of seconds > 0 (>= 0 if ``zero``); else an error naming it.

    At most ``threading.TIMEOUT_MAX`` (a wait); with ``finite``, any finite
    number (a span of time). The engine's own check, with the sinks' defaults.

    Raises:
        TypeError: ``value`` is not an int or float (a bool is not).
        ValueError: ``value`` is out of range (or NaN).
    """
    return _arguments.check_seconds(name, value, positive=not zero, finite=finite)


def parse_batch_id(batch_id: object) -> tuple[str, int]:
    """``"<writer>:<n>"`` -> ``(writer, n)``, as :class:`~aggregator_reference.Delivery` makes them.

    Raises:
        ValueError: ``batch_id`` is not of that form (``n`` an int >= 1).
    """
    if isinstance(batch_id, str):
        writer, _, number = batch_id.rpartition(":")
        if writer and number.isdigit() and int(number) >= 1:
            return writer, int(number)
    raise ValueError(f"batch_id must be '<writer>:<n>' with n >= 1, as deliver() gives it; got {batch_id!r}")


def rounds(batch: Sequence[tuple[object, object]]) -> list[list[tuple[object, object]]]:
    """Split ``batch`` into lists without a repeated key, keeping each key's records in order.

    A batch may hold two records of one key (from two flushes); one SQL
    statement that upserts a set of rows must not touch a row twice.
    """
    out: list[list[tuple[object, object]]] = []
    seen: dict[object, int] = {}
    for record in batch:
        n = seen.get(record[0], 0)
        seen[record[0]] = n + 1
        if n == len(out):
            out.append([])
        out[n].append(record)
    return out


@dataclass(frozen=True)
class Statements:
    """The SQL of one sink: its table, its ledger and its upsert, in one dialect.

    ``merge`` is an SQL expression of ``{stored}`` (the value in the table)
    and ``{incoming}`` (the batch's value), e.g. ``"{stored} + {incoming}"``;
    one expression, so without ``;`` (which would chain another statement).
    The key column is ``NOT NULL``: a second line of defence behind
    :func:`check_keys` (a ``None`` key, or in SQLite a NaN, bound as NULL,
    would raise ``IntegrityError``). ``max_table`` is the longest ``table``.
    """

    table: str
    merge: str
    placeholder: str  # "?" (sqlite3) or "%s" (psycopg)
    max_table: int = MAX_IDENTIFIER

    def __post_init__(self) -> None:
        check_name("table", self.table, self.max_table)
        if not isinstance(self.merge, str):
            raise TypeError(f"merge must be a str SQL expression, got {type(self.merge).__name__}")
        if "{stored}" not in self.merge or "{incoming}" not in self.merge:
            raise ValueError(
                f"merge must be an SQL expression of {{stored}} and {{incoming}}, such as "
                f"'{{stored}} + {{incoming}}'; got {self.merge!r}"
            )
        if ";" in self.merge:
            raise ValueError(f"merge must be one SQL expression, without ';'; got {self.merge!r}")

    @property
    def ledger(self) -> str:
        return f"{self.table}_ledger"

    def create(self, key_type: str, value_type: str, at_type: str) -> list[str]:
        """``CREATE TABLE IF NOT EXISTS`` for the table and its ledger."""
        # NOT NULL: SQLite lets a PRIMARY KEY that is not an INTEGER hold many NULLs, never merged.
        key = " ".join(filter(None, ("key", key_type, "PRIMARY KEY NOT NULL")))
        value = " ".join(filter(None, ("value", value_type)))
        return [
            f'CREATE TABLE IF NOT EXISTS "{self.table}" ({key}, {value})',
            f'CREATE TABLE IF NOT EXISTS "{self.ledger}" '
            f"(writer TEXT PRIMARY KEY, seq INTEGER NOT NULL, at {at_type} NOT NULL)",
        ]

    def claim(self) -> str:
        """Record ``(writer, seq, at)`` in the ledger; returns a row only if ``seq`` is new for ``writer``.

        The first statement of each batch's transaction: a batch whose number
        the ledger already holds for its writer was applied before (its
        acknowledgement was lost) and is skipped. In PostgreSQL the row lock
        also makes a second attempt wait for a first one still committing.
        """
        p = self.placeholder
        return (
            f'INSERT INTO "{self.ledger}" AS ledger (writer, seq, at) VALUES ({p}, {p}, {p}) '
            "ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, at = excluded.at "
            "WHERE ledger.seq < excluded.seq RETURNING seq"
        )

    def prune(self) -> str:
        """Delete the ledger rows not touched since a time (the batch's ``at`` minus the retention)."""
        return f'DELETE FROM "{self.ledger}" WHERE at < {self.placeholder}'

    def upsert(self) -> str:
        """Insert one ``(key, value)`` or merge it into the stored value."""
        p = self.placeholder
        merged = self.merge.replace("{stored}", f'"{self.table}".value').replace(
            "{incoming}", "excluded.value"
        )
        return (
            f'INSERT INTO "{self.table}" (key, value) VALUES ({p}, {p}) '
            f"ON CONFLICT (key) DO UPDATE SET value = {merged}"
        )

    def upsert_from(self, staging: str) -> str:
        """Upsert every row of the table ``staging`` (no key twice) at once, in key order.

        ``ORDER BY key``: every transaction locks the table's rows in one order
        (after its own ledger row), so batches of several processes never deadlock.
        """
        stored = f'"{self.table}".value'
        merged = self.merge.replace("{stored}", stored).replace("{incoming}", "excluded.value")
        return (
            f'INSERT INTO "{self.table}" (key, value) SELECT key, value FROM "{staging}" ORDER BY key '
            f"ON CONFLICT (key) DO UPDATE SET value = {merged}"
        )


class ConnectedSink:
    """What both SQL sinks share: one connection behind ``_lock``, ``before_commit()``, ``close()``."""

    _lock: threading.Lock  # guards _connection
    _connection: Any

    def before_commit(self, batch_id: str) -> None:
        """Called inside each batch's transaction, just before it commits; does nothing.

        A hook for tests and tracing: raising here rolls the batch back.
        """

    def close(self) -> None:
        """Close the connection (a later ``write`` opens a new one). Idempotent."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
