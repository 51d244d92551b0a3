"""The PostgreSQL sink: psycopg 3, one transaction per batch (SINK-5). Imported only when used."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any, Generic, Literal, TypeVar, final

from ._sql import (
    LEDGER_RETENTION,
    MAX_TABLE,
    PRUNE_EVERY,
    ConnectedSink,
    Statements,
    check_keys,
    check_seconds,
    parse_batch_id,
    rounds,
)

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PostgresSink needs psycopg 3: pip install 'aggregator-reference[postgres]' "
        "(on a free-threaded Python, pip install psycopg with the system's libpq)"
    ) from exc

__all__ = ["PostgresSink"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: libpq's TCP keepalives, unless the dsn sets them: a dead peer is noticed in about 25 s.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
#: The session's timeouts the sink sets to ``statement_timeout``, unless the connection request does.
_TIMEOUTS = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
#: The longest connect_timeout libpq takes (seconds) and statement_timeout PostgreSQL takes (ms).
_INT_MAX = 2**31 - 1


@final
class PostgresSink(ConnectedSink, Generic[K, V]):
    """Upsert batches into a PostgreSQL table, each batch exactly once (SINK-5).

    As :class:`~aggregator_reference.sinks.SQLiteSink`: one transaction per
    batch that first claims the batch's number in the ledger
    ``<table>_ledger`` (skipping a batch applied before), then upserts with
    ``ON CONFLICT (key) DO UPDATE SET value = <merge>``; ``merge`` is an SQL
    expression of ``{stored}`` and ``{incoming}`` (a sum by default;
    ``"GREATEST({stored}, {incoming})"`` keeps the largest). The table
    ``(key <key_type> PRIMARY KEY, value <value_type>)`` and the ledger are
    created if missing. Many processes on many machines may deliver into one
    table: the ledger row of a batch's writer is locked by its transaction,
    so a retry waits for an attempt still committing and then skips it.

    ``method`` says how the records travel: ``"copy"`` (the default: ``COPY``
    into a temporary table, then one ``INSERT ... SELECT ... ON CONFLICT``) or
    ``"executemany"`` (psycopg's ``executemany`` of the upsert). Measured on
    this project's machine with ``tools/bench_postgres_methods.py``
    (PostgreSQL 15 on loopback, psycopg 3.3, a busy machine): COPY took
    0.40-0.60x the time per record of executemany for batches of 500 (the
    default ``batch_size``) and 0.30-0.53x for 5000; for batches of 100,
    0.98-1.36x (three runs).

    Keys are merged when they are equal for ``key_type``, even when they
    differ in Python (``'a'`` and ``'a '`` in ``BPCHAR``, two floats one
    ``REAL``): a ``COPY`` round the server refuses for such keys
    (``CardinalityViolation``) is rolled back to a savepoint and upserted
    row by row. ``None`` and NaN keys are not supported (as in SQLiteSink):
    ``write`` refuses a batch holding one with a ``ValueError`` naming the
    key, before its transaction, at every retry; the key is also
    ``NOT NULL``. ``table`` has at most 54 characters, so that
    ``<table>_incoming`` fits PostgreSQL's 63.

    No wait is unbounded: the connection uses TCP keepalives (unless ``dsn``
    sets its own) and the session's ``lock_timeout``, ``statement_timeout``
    and ``idle_in_transaction_session_timeout`` are ``statement_timeout``
    seconds (at most about 24.8 days) unless ``dsn`` sets them (in
    ``options``). A retry waiting on the ledger row of an attempt whose
    connection is half-open raises (the delivery retries it) instead of
    blocking for ever, and the server ends that attempt's transaction once
    it has been idle that long, freeing the row for the next retry.

    The ledger is pruned as SQLiteSink's: rows untouched for
    ``ledger_retention`` seconds are deleted every ``PRUNE_EVERY`` batches.

    Thread safety: ``write`` and ``close`` may be called from any thread; a
    lock makes them take turns on the one connection, opened at the first
    write and again after a failed one.

    Raises (from the constructor):
        TypeError, ValueError: a bad argument (the message names it).
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "aggregates",
        merge: str = "{stored} + {incoming}",
        key_type: str = "TEXT",
        value_type: str = "BIGINT",
        method: Literal["copy", "executemany"] = "copy",
        connect_timeout: float = 10.0,
        statement_timeout: float = 60.0,
        ledger_retention: float = LEDGER_RETENTION,
    ) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str (a libpq connection string or URI), got {type(dsn).__name__}")
        if method not in ("copy", "executemany"):
            raise ValueError(f"method must be 'copy' or 'executemany', got {method!r}")
        for name, sql_type in (("key_type", key_type), ("value_type", value_type)):
            if not isinstance(sql_type, str) or not sql_type.replace(" ", "").isalnum():
                raise ValueError(f"{name} must be an SQL type name such as 'BIGINT', got {sql_type!r}")
        self.dsn = dsn
        self.table = table
        self.method = method
        self.key_type, self.value_type = key_type, value_type
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self.statement_timeout = check_seconds("statement_timeout", statement_timeout)
        self.ledger_retention = check_seconds("ledger_retention", ledger_retention, finite=True)
        self._sql = Statements(table, merge, "%s", MAX_TABLE)
        self._lock = threading.Lock()  # guards _connection and _written
        self._connection: psycopg.Connection[Any] | None = None
        self._written = 0

    def __repr__(self) -> str:
        return f"PostgresSink(table={self.table!r}, method={self.method!r})"

    def _open(self) -> psycopg.Connection[Any]:
        """A new connection with keepalives, whose statements, lock waits and idle transactions end
        after statement_timeout (where the dsn does not say otherwise)."""
        given = psycopg.conninfo.conninfo_to_dict(self.dsn)
        keepalives = {name: value for name, value in _KEEPALIVES.items() if name not in given}
        seconds = max(1, min(round(self.connect_timeout), _INT_MAX))
        connection = psycopg.connect(
            psycopg.conninfo.make_conninfo(self.dsn, connect_timeout=seconds, **keepalives)
        )
        try:
            milliseconds = str(max(1, min(round(self.statement_timeout * 1000), _INT_MAX)))
            # Those the connection request (the dsn's options, PGOPTIONS) set are the client's: kept.
            connection.execute(
                "SELECT set_config(name, %s, false) FROM pg_settings "
                "WHERE name = ANY(%s) AND source <> 'client'",
                (milliseconds, list(_TIMEOUTS)),
            )
            connection.commit()
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            connection = self._open()
            try:
                with connection.transaction():
                    # Two processes creating the same table at once: one waits for the other.
                    connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                    for statement in self._sql.create(self.key_type, self.value_type, "DOUBLE PRECISION"):
                        connection.execute(statement)  # built from checked names
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
            psycopg.Error: the server refused or the connection broke; the
                transaction was rolled back (or its outcome is unknown: a retry
                with the same ``batch_id`` is then applied at most once).
        """
        writer, number = parse_batch_id(batch_id)
        check_keys(batch)
        with self._lock:
            connection = self._connect()
            try:
                self._apply(connection, batch, batch_id, writer, number)
            except BaseException:
                connection.close()  # a broken or unknown state: the next write reconnects
                self._connection = None
                raise

    def _apply(
        self,
        connection: psycopg.Connection[Any],
        batch: list[tuple[K, V]],
        batch_id: str,
        writer: str,
        number: int,
    ) -> None:
        now = time.time()
        with connection.transaction(), connection.cursor() as cursor:
            cursor.execute(self._sql.claim(), (writer, number, now))
            if cursor.fetchone() is None:
                raise psycopg.Rollback  # applied before; its acknowledgement was lost
            if self._written % PRUNE_EVERY == 0:
                cursor.execute(self._sql.prune(), (now - self.ledger_retention,))
            if self.method == "executemany":
                cursor.executemany(self._sql.upsert(), batch)
            else:
                self._copy(cursor, batch)
            self.before_commit(batch_id)
        if connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            self._written += 1

    def _copy(self, cursor: psycopg.Cursor[Any], batch: list[tuple[K, V]]) -> None:
        staging = f"{self.table}_incoming"
        cursor.execute(
            f'CREATE TEMPORARY TABLE IF NOT EXISTS "{staging}" '
            f"(key {self.key_type}, value {self.value_type}) ON COMMIT DELETE ROWS"
        )
        for part in rounds(batch):  # a key twice in one INSERT ... ON CONFLICT is refused
            try:
                with cursor.connection.transaction():  # a savepoint
                    with cursor.copy(f'COPY "{staging}" (key, value) FROM STDIN') as copy:
                        for record in part:
                            copy.write_row(record)
                    cursor.execute(self._sql.upsert_from(staging))
                    cursor.execute(f'TRUNCATE "{staging}"')
            except psycopg.errors.CardinalityViolation:
                # Keys distinct in Python, equal for key_type ('a', 'a ' in BPCHAR): one at a time.
                cursor.executemany(self._sql.upsert(), part)

    def read(self) -> dict[Any, Any]:
        """Every ``key: value`` in the table now, in a connection of its own (for checks and demos)."""
        with self._open() as connection:
            rows = connection.execute(f'SELECT key, value FROM "{self.table}"').fetchall()
        return dict(rows)
