"""The SQL sinks (SINK-5): upserts, the ledger, effectively-once delivery, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import math
import operator
import random
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

import aggregator_reference as ar
from aggregator_reference.sinks import SQLiteSink
from aggregator_reference.sinks._sql import parse_batch_id, rounds

from .flaky_sink import Flaky

pytestmark = pytest.mark.timeout(120)

SinkFactory = Callable[..., Any]
Method = Literal["copy", "executemany"]
FAST = ar.Retry(first=0.001, maximum=0.01)


@pytest.fixture(params=["sqlite", "postgres-executemany", "postgres-copy"])
def make_sink(request: pytest.FixtureRequest, tmp_path: Path, table: str) -> SinkFactory:
    """``make_sink(**options)``: a sink of the kind under test, on a table of this test's own."""
    if request.param == "sqlite":
        path = tmp_path / "sink.db"
        return lambda **options: SQLiteSink(path, **{"table": table, **options})
    dsn = request.getfixturevalue("postgres_dsn")
    from aggregator_reference.sinks import PostgresSink

    method = request.param.removeprefix("postgres-")
    return lambda **options: PostgresSink(dsn, **{"table": table, "method": method, **options})


def test_a_batch_is_upserted_with_the_merge_expression(make_sink: SinkFactory) -> None:
    sink = make_sink()
    sink.write([("a", 1), ("b", 2)], "w:1")
    sink.write([("a", 10), ("c", 5), ("a", 100)], "w:2")  # a key twice in one batch (two flushes)
    assert sink.read() == {"a": 111, "b": 2, "c": 5}
    sink.close()
    function = "max" if isinstance(sink, SQLiteSink) else "GREATEST"
    largest = make_sink(table=f"{sink.table}_max", merge=f"{function}({{stored}}, {{incoming}})")
    largest.write([("a", 3), ("a", 1)], "w:1")
    largest.write([("a", 2)], "w:2")
    assert largest.read() == {"a": 3}
    largest.close()


def test_a_batch_id_already_in_the_ledger_is_skipped(make_sink: SinkFactory) -> None:
    sink = make_sink()
    sink.write([("a", 1)], "w:1")
    sink.write([("a", 1)], "w:1")  # the retry after a lost acknowledgement
    sink.write([("a", 1)], "v:1")  # another writer's first batch
    sink.write([("a", 1)], "w:2")
    sink.write([("a", 1)], "w:1")  # older than the ledger's w:2
    assert sink.read() == {"a": 3}
    sink.close()
    again = make_sink()  # a new connection (or process) sees the same ledger
    again.write([("a", 1)], "w:2")
    assert again.read() == {"a": 3}
    again.close()


def test_a_failure_before_commit_rolls_the_whole_batch_back(make_sink: SinkFactory) -> None:
    sink = make_sink()
    armed = [True]

    def before_commit(batch_id: str) -> None:
        if armed.pop() if armed else False:
            raise OSError("connection lost before commit")

    sink.before_commit = before_commit
    with pytest.raises(OSError, match="before commit"):
        sink.write([("a", 1), ("b", 1)], "w:1")
    assert sink.read() == {}
    sink.write([("a", 1), ("b", 1)], "w:1")  # the retry applies it, once
    assert sink.read() == {"a": 1, "b": 1}
    sink.close()


def test_bad_batch_ids_and_names_are_refused(make_sink: SinkFactory) -> None:
    sink = make_sink()
    for bad in ("w", "w:0", ":1", "w:x", 7):
        with pytest.raises(ValueError, match="batch_id"):
            sink.write([("a", 1)], bad)
    sink.close()
    with pytest.raises(ValueError, match="table"):
        make_sink(table='x"; DROP TABLE y; --')
    with pytest.raises(ValueError, match="stored"):
        make_sink(merge="value + 1")
    with pytest.raises(TypeError, match="merge"):
        make_sink(merge=1)


def test_the_ledger_keeps_one_row_per_writer_and_prunes_old_ones(make_sink: SinkFactory) -> None:
    sink = make_sink(ledger_retention=3600.0)
    sink.write([("a", 1)], "old:1")
    sink.write([("a", 1)], "new:1")
    sink.write([("a", 1)], "new:2")
    sink.close()
    ledger = f"{sink.table}_ledger"
    _execute(sink, f"UPDATE \"{ledger}\" SET at = at - 7200 WHERE writer = 'old'")
    assert _rows(sink, f'SELECT writer, seq FROM "{ledger}" ORDER BY writer') == [("new", 2), ("old", 1)]
    pruning = make_sink(ledger_retention=3600.0)  # its first batch prunes
    pruning.write([("a", 1)], "third:1")
    assert _rows(pruning, f'SELECT writer FROM "{ledger}" ORDER BY writer') == [("new",), ("third",)]
    pruning.close()


def _rows(sink: Any, query: str) -> list[tuple[Any, ...]]:
    if isinstance(sink, SQLiteSink):
        import sqlite3

        with sqlite3.connect(sink.path) as connection:
            return connection.execute(query).fetchall()
    import psycopg

    with psycopg.connect(sink.dsn) as connection:
        return connection.execute(query).fetchall()


def _execute(sink: Any, statement: str) -> None:
    if isinstance(sink, SQLiteSink):
        import sqlite3

        with sqlite3.connect(sink.path) as connection:
            connection.execute(statement)
        return
    import psycopg

    with psycopg.connect(sink.dsn) as connection:
        connection.execute(statement)


def test_delivery_through_failures_before_and_after_commit_is_exact(
    make_sink: SinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink()
    flaky = Flaky(sink, rate=0.3, seed=1)
    agg = ar.create(operator.add, flush_interval=0.005, max_pending=32)
    delivery = agg.deliver(flaky, batch_size=16, max_wait=0.005, retry=FAST)
    expected: Counter[str] = Counter()
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        mine: Counter[str] = Counter()
        for _ in range(3000):
            key = f"k{rng.randrange(200)}"
            agg.add(key, 1)
            mine[key] += 1
        with lock:
            expected.update(mine)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a writer did not finish in 60 s"
    agg.shutdown(timeout=60)
    stats = delivery.stats()
    assert stats.done
    assert stats.held == 0
    assert not stats.failing
    assert flaky.failed["before commit"] > 0
    assert flaky.failed["after commit"] > 0
    assert stats.retries == sum(flaky.failed.values())
    assert sink.read() == dict(expected)  # applied exactly once, whatever failed
    assert sum(expected.values()) == 12000


def test_parse_batch_id_and_rounds() -> None:
    assert parse_batch_id("ab:cd:12") == ("ab:cd", 12)
    assert rounds([("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]) == [
        [("a", 1), ("b", 1)],
        [("a", 2), ("b", 2)],
        [("a", 3)],
    ]


def test_sqlite_in_memory_and_repr(tmp_path: Path) -> None:
    sink: SQLiteSink[str, int] = SQLiteSink(":memory:")
    sink.write([("a", 1)], "w:1")
    assert sink.read() == {"a": 1}
    assert "aggregates" in repr(sink)
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError, match="busy_timeout"):
        SQLiteSink(tmp_path / "x.db", busy_timeout=-1)


def test_importing_the_sinks_does_not_import_psycopg() -> None:
    import subprocess
    import sys

    code = "import sys, aggregator_reference.sinks; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_a_none_or_nan_key_is_refused_instead_of_adding_rows(make_sink: SinkFactory) -> None:
    """SINK-5: ``key`` is the primary key; NULL (None, and NaN, which SQLite binds as NULL) never merges:
    ``write`` refuses the batch before its transaction, naming the key, at every retry."""
    sink = make_sink()
    sink.write([("a", 1)], "w:1")
    for number, key in enumerate([None, math.nan], 2):
        for _ in range(2):  # a retry fails the same way: nothing of the batch is applied
            with pytest.raises(ValueError, match=rf"key {key!r}"):
                sink.write([("a", 1), (key, 1)], f"w:{number}")
    assert _rows(sink, f'SELECT key, value FROM "{sink.table}"') == [("a", 1)]
    sink.write([("a", 1)], "w:2")  # the ledger never saw the refused batches
    assert sink.read() == {"a": 2}
    sink.close()
    # The second line of defence: the key column the sink creates is NOT NULL.
    if isinstance(sink, SQLiteSink):
        columns = _rows(sink, f"SELECT name, \"notnull\" FROM pragma_table_info('{sink.table}')")
        assert ("key", 1) in columns
    else:
        columns_of = "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = %s"
        assert ("key", "NO") in _rows(sink, columns_of.replace("%s", f"'{sink.table}'"))


def test_sqlite_refuses_none_and_nan_keys_in_a_table_an_older_version_created(tmp_path: Path) -> None:
    """SINK-5: a table made without ``NOT NULL`` on its key (by an older version) would take None/NaN
    keys as separate NULL rows, silently; ``write`` refuses them itself, naming the key."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.execute('CREATE TABLE "t" (key PRIMARY KEY, value)')
    connection.close()
    sink: Any = SQLiteSink(path, table="t")
    sink.write([("a", 1)], "w:1")
    for number, key in enumerate([None, math.nan], 2):
        for _ in range(2):
            with pytest.raises(ValueError, match=rf"key {key!r}"):
                sink.write([(key, 1)], f"w:{number}")
    assert sink.read() == {"a": 1}
    sink.close()


def test_a_table_name_leaves_room_for_the_ledger_and_staging_names(
    make_sink: SinkFactory, table: str
) -> None:
    """SINK-5: PostgreSQL cuts names to 63 bytes, so ``<table>_incoming`` must fit: 54 at most there;
    SQLite has no such limit, and its sink takes the 63 characters it always took."""
    most, why = (63, "") if isinstance(make_sink(), SQLiteSink) else (54, ".*_incoming")
    with pytest.raises(ValueError, match=rf"table.*{most}{why}"):
        make_sink(table="t" * (most + 1))
    longest = table.ljust(most, "x")
    sink = make_sink(table=longest)
    sink.write([("a", 1)], "w:1")
    sink.write([("a", 1)], "w:1")  # skipped: the ledger <table>_ledger holds it
    sink.write([("a", 1)], "w:2")
    assert sink.read() == {"a": 2}
    sink.close()


def test_a_merge_of_several_statements_is_refused(make_sink: SinkFactory) -> None:
    """SINK-5: ``merge`` is one SQL expression; a ``;`` could chain statements (COPY's upsert is unbound)."""
    with pytest.raises(ValueError, match="merge"):
        make_sink(merge="{stored} + {incoming}; CREATE TABLE pwned (x int)")


@pytest.mark.parametrize("method", ["copy", "executemany"])
def test_keys_equal_only_for_the_column_type_are_merged(
    postgres_dsn: str, table: str, method: Method
) -> None:
    """SINK-5: keys distinct in Python but equal for the key's SQL type are merged, by COPY too."""
    from aggregator_reference.sinks import PostgresSink

    padded: Any = PostgresSink(postgres_dsn, table=table, key_type="BPCHAR", method=method)
    padded.write([("a", 1), ("b", 1), ("a ", 2)], "w:1")  # 'a' = 'a ' in BPCHAR
    padded.write([("a  ", 4), ("b", 1)], "w:2")
    assert padded.read() == {"a": 7, "b": 2}
    padded.close()
    real: Any = PostgresSink(postgres_dsn, table=f"{table}_real", key_type="REAL", method=method)
    real.write([(0.1, 1), (0.5, 1), (0.1 + 1e-12, 2)], "w:1")  # one REAL
    assert sorted(real.read().values()) == [1, 3]
    real.close()


@pytest.mark.parametrize("method", ["copy", "executemany"])
def test_a_write_waiting_on_a_locked_ledger_row_times_out(
    postgres_dsn: str, table: str, method: Method
) -> None:
    """SINK-5, SINK-2: a write blocked by an attempt that never ends (a half-open connection) raises
    after ``statement_timeout``, so the delivery retries, instead of waiting forever."""
    import psycopg

    from aggregator_reference.sinks import PostgresSink

    sink: Any = PostgresSink(postgres_dsn, table=table, method=method, statement_timeout=1.0)
    sink.write([("a", 1)], "w:1")
    parameters = sink._connection.info.get_parameters()
    assert (parameters["keepalives"], parameters["keepalives_idle"]) == ("1", "10")
    assert (parameters["keepalives_interval"], parameters["keepalives_count"]) == ("5", "3")
    raised: list[BaseException] = []

    def write() -> None:
        try:
            sink.write([("a", 1)], "w:2")
        except BaseException as exc:
            raised.append(exc)

    with psycopg.connect(postgres_dsn) as holder:  # the first attempt of w:2, stuck
        holder.execute(f'SELECT seq FROM "{table}_ledger" WHERE writer = %s FOR UPDATE', ("w",))
        thread = threading.Thread(target=write)
        thread.start()
        thread.join(30)
        blocked = thread.is_alive()
        holder.rollback()
    thread.join(30)
    assert not blocked, "the write waited on the locked ledger row for 30 s"
    assert len(raised) == 1
    assert isinstance(raised[0], psycopg.OperationalError)  # LockNotAvailable or QueryCanceled
    sink.close()
    # The retry, once the lock is free, by a sink with the default timeout (a 1 s limit could
    # cancel it on a loaded machine); the ledger is in the table, so it is applied once.
    retry: Any = PostgresSink(postgres_dsn, table=table, method=method)
    retry.write([("a", 1)], "w:2")
    retry.write([("a", 1)], "w:2")
    assert retry.read() == {"a": 2}
    retry.close()


def test_timeouts_and_the_retention_are_checked(tmp_path: Path) -> None:
    """SINK-5: each number is named when wrong; none is accepted that would fail every write."""
    too_long = threading.TIMEOUT_MAX * 2
    path = tmp_path / "x.db"
    sqlite: Any = SQLiteSink  # called with wrong types on purpose
    for bad in (-1, math.inf, math.nan, too_long):
        with pytest.raises(ValueError, match="busy_timeout"):
            sqlite(path, busy_timeout=bad)
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="ledger_retention"):
            sqlite(path, ledger_retention=bad)
    for name in ("busy_timeout", "ledger_retention"):
        for wrong in (None, "10", True):
            with pytest.raises(TypeError, match=name):
                sqlite(path, **{name: wrong})
    sqlite(path, busy_timeout=0, ledger_retention=1e300).close()
    pytest.importorskip("psycopg")
    from aggregator_reference import sinks

    postgres: Any = sinks.PostgresSink  # called with wrong types on purpose
    dsn = "host=127.0.0.1 port=1"
    for name in ("connect_timeout", "statement_timeout", "ledger_retention"):
        for bad in (0, -1, math.inf, math.nan):
            with pytest.raises(ValueError, match=name):
                postgres(dsn, **{name: bad})
        for wrong in (None, "10", True):
            with pytest.raises(TypeError, match=name):
                postgres(dsn, **{name: wrong})
    for name in ("connect_timeout", "statement_timeout"):
        with pytest.raises(ValueError, match=name):
            postgres(dsn, **{name: too_long})
        postgres(dsn, **{name: threading.TIMEOUT_MAX})


def test_sqlite_commits_are_durable_and_long_busy_timeouts_wait(tmp_path: Path) -> None:
    """SINK-5: a commit ``write`` saw succeed survives a power failure (WAL with synchronous=FULL);
    a busy_timeout past SQLite's ~24.8 days waits that long, not zero."""
    sink: Any = SQLiteSink(tmp_path / "sink.db", busy_timeout=threading.TIMEOUT_MAX)
    sink.write([("a", 1)], "w:1")
    connection = sink._connection
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert connection.execute("PRAGMA busy_timeout").fetchone() == (2**31 - 1,)  # milliseconds
    sink.close()


@pytest.mark.parametrize("method", ["copy", "executemany"])
def test_a_transaction_an_attempt_left_open_is_ended_by_the_server(
    postgres_dsn: str, table: str, method: Method
) -> None:
    """SINK-5, SINK-2: the sink's sessions set ``idle_in_transaction_session_timeout``, so the
    transaction of an attempt whose client vanished (half-open) is ended by the server and its
    ledger row lock freed: a retry succeeds after a few tries instead of failing for hours."""
    import psycopg

    from aggregator_reference.sinks import PostgresSink

    sink: Any = PostgresSink(postgres_dsn, table=table, method=method, statement_timeout=1.0)
    sink.write([("a", 1)], "w:1")
    assert _show(sink._connection, "idle_in_transaction_session_timeout") == "1s"
    orphan = sink._open()  # the first attempt of w:2, on a sink session, then left idle in transaction
    orphan.execute(sink._sql.claim(), ("w", 2, 0.0))
    orphan.execute(sink._sql.upsert(), ("a", 1))
    failures: list[psycopg.OperationalError] = []
    for _ in range(8):  # each try waits at most lock_timeout (1 s)
        try:
            sink.write([("a", 1)], "w:2")
            break
        except psycopg.OperationalError as exc:  # LockNotAvailable or QueryCanceled
            failures.append(exc)
    else:
        pytest.fail(f"the orphaned transaction kept the ledger row locked through 8 tries: {failures[-1]}")
    orphan.close()
    sink.write([("a", 1)], "w:2")  # applied once: the orphan's upsert was rolled back
    assert sink.read() == {"a": 2}
    sink.close()


def _show(connection: Any, name: str) -> str:
    """The session's setting ``name``; ends the transaction SHOW began (the sink's write expects none)."""
    value: str = connection.execute(f"SHOW {name}").fetchone()[0]
    connection.rollback()
    return value


def test_timeouts_the_dsn_sets_are_kept(postgres_dsn: str, table: str) -> None:
    """SINK-5: the sink's timeouts are defaults; a dsn's own ``options`` win."""
    import psycopg

    from aggregator_reference.sinks import PostgresSink

    options = "-c statement_timeout=5000 -c idle_in_transaction_session_timeout=7000"
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, options=options)
    sink: Any = PostgresSink(dsn, table=table, statement_timeout=1.0)
    sink.write([("a", 1)], "w:1")
    names = ("statement_timeout", "idle_in_transaction_session_timeout", "lock_timeout")
    shown = {name: _show(sink._connection, name) for name in names}
    assert shown == {
        "statement_timeout": "5s",
        "idle_in_transaction_session_timeout": "7s",
        "lock_timeout": "1s",  # not in the dsn: the sink's
    }
    sink.close()
