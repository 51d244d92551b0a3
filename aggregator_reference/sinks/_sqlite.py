"""The SQLite sink: the standard library's ``sqlite3``, one transaction per batch (SINK-5)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Hashable
from typing import Any, Generic, TypeVar, final

from ._sql import (
    LEDGER_RETENTION,
    PRUNE_EVERY,
    ConnectedSink,
    Statements,
    check_keys,
    check_seconds,
    parse_batch_id,
)

__all__ = ["SQLiteSink"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: SQLite's busy timeout is an int of milliseconds; a longer one would wrap round to no wait at all.
_BUSY_TIMEOUT_MAX = (2**31 - 1) / 1000


@final
class SQLiteSink(ConnectedSink, Generic[K, V]):
    """Upsert batches into a SQLite table, each batch exactly once (SINK-5).

    Each batch is one transaction: it first records its ``batch_id`` in the
    ledger table ``<table>_ledger`` (one row per writer: the number of its
    last batch applied), and skips the batch if the ledger already holds that
    number (a retry after a commit whose acknowledgement was lost); then it
    upserts every record::

        INSERT INTO <table> (key, value) VALUES (?, ?)
        ON CONFLICT (key) DO UPDATE SET value = <merge>

    ``merge`` is an SQL expression of ``{stored}`` and ``{incoming}``, a sum
    by default; ``"max({stored}, {incoming})"`` keeps the largest. The table
    ``(key PRIMARY KEY NOT NULL, value)`` and the ledger are created if
    missing. The database is opened in WAL mode, so readers never block the
    writer and several processes may write into one file (each waits up to
    ``busy_timeout`` seconds for the others' transactions; SQLite waits at
    most about 24.8 days). With ``synchronous=FULL`` a batch whose ``write``
    returned is durable: its commit survives a crash or a power failure
    (``NORMAL`` in WAL mode could lose the last commits, which the delivery
    would never send again).

    ``path`` ``":memory:"`` keeps the table in the sink's own connection:
    ``close()`` discards it.

    Keys and values must be types ``sqlite3`` binds (str, int, float, bytes,
    None); anything else makes ``write`` raise, and a delivery retries it.
    ``None`` and NaN keys are not supported: SQLite stores both as NULL,
    and NULL keys never merge. ``write`` refuses a batch holding one with a
    ``ValueError`` naming the key, before its transaction, at every retry
    (the delivery reports it as its last error) -- in a table an older
    version made without ``NOT NULL`` on the key too. ``table`` has at most
    63 characters.

    The ledger keeps one row per delivery that ever wrote; rows no delivery
    has touched for ``ledger_retention`` seconds (7 days) are deleted, in the
    first batch's transaction and every ``PRUNE_EVERY`` (1000) batches after.
    A delivery that cannot write for longer than that could apply its
    current batch twice.

    Thread safety: ``write`` and ``close`` may be called from any thread; a
    lock makes them take turns on the one connection.

    Raises (from the constructor):
        TypeError, ValueError: a bad argument (the message names it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "aggregates",
        merge: str = "{stored} + {incoming}",
        busy_timeout: float = 30.0,
        ledger_retention: float = LEDGER_RETENTION,
    ) -> None:
        self.path = os.fspath(path)
        self._sql = Statements(table, merge, "?")
        self.table = table
        self.busy_timeout = check_seconds("busy_timeout", busy_timeout, zero=True)
        self.ledger_retention = check_seconds("ledger_retention", ledger_retention, finite=True)
        self._lock = threading.Lock()  # guards _connection and _written
        self._connection: sqlite3.Connection | None = None
        self._written = 0  # transactions that applied a batch, for pruning

    def __repr__(self) -> str:
        return f"SQLiteSink({self.path!r}, table={self.table!r})"

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            # isolation_level=None: no implicit transactions; each batch says BEGIN IMMEDIATE.
            connection = sqlite3.connect(
                self.path,
                timeout=min(self.busy_timeout, _BUSY_TIMEOUT_MAX),
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                if self.path != ":memory:":
                    connection.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk once COMMIT returns (the delivery then forgets the batch).
                connection.execute(
                    "PRAGMA synchronous=FULL" if self.path != ":memory:" else "PRAGMA synchronous=OFF"
                )
                for statement in self._sql.create("", "", "REAL"):
                    connection.execute(statement)
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    def write(self, batch: list[tuple[K, V]], batch_id: str, /) -> None:
        """Apply ``batch`` in one transaction, unless the ledger shows ``batch_id`` applied already.

        Raises:
            ValueError: ``batch_id`` is not ``"<writer>:<n>"``, or a key is
                ``None`` or NaN; nothing of the batch was applied.
            sqlite3.Error: the database refused (locked past ``busy_timeout``,
                disk full...); nothing of the batch was applied.
        """
        writer, number = parse_batch_id(batch_id)
        check_keys(batch)
        with self._lock:
            connection = self._connect()
            now = time.time()
            connection.execute("BEGIN IMMEDIATE")
            try:
                if not connection.execute(self._sql.claim(), (writer, number, now)).fetchall():
                    connection.execute("ROLLBACK")
                    return  # applied before; its acknowledgement was lost
                if self._written % PRUNE_EVERY == 0:
                    connection.execute(self._sql.prune(), (now - self.ledger_retention,))
                connection.executemany(self._sql.upsert(), batch)
                self.before_commit(batch_id)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            self._written += 1

    def read(self) -> dict[Any, Any]:
        """Every ``key: value`` in the table now (for checks and demos); waits for a write in progress."""
        with self._lock:
            rows = self._connect().execute(f'SELECT key, value FROM "{self.table}"').fetchall()
        return dict(rows)
