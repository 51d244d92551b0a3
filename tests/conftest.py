"""Fixtures of the repository's own tests: a real PostgreSQL server for the sink tests."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from .postgres_server import HOW_TO_ENABLE, PostgresServer, find_programs

_tables = itertools.count()


def native_or_skip() -> ModuleType:
    """The compiled backend's package; skips without it, fails where tox built it.

    ``AGGREGATOR_REQUIRE_NATIVE=1`` (tox sets it) makes its absence an error.
    """
    try:
        import aggregator_native
    except ImportError as exc:
        message = f"aggregator_native is not installed ({exc}): pip install ./backends/native"
        if os.environ.get("AGGREGATOR_REQUIRE_NATIVE") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return aggregator_native


def fork_while_held(lock: Any, work: Callable[[], int]) -> int | None:
    """Fork while another thread holds ``lock``; the child exits with what ``work()`` returns.

    In the child nobody will release ``lock`` (LIFE-3's case). The child restores
    SIGALRM's default action (not pytest-timeout's handler, which would turn a
    hang into an exception) and dies of it after 10 s: a child that waited for
    the lock reports ``-signal.SIGALRM``; one whose ``work`` raised, 3. Returns
    the child's exit code, or ``None`` if it still ran after 30 s (it is killed).
    """
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10), "the holding thread never took the lock"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a threaded process
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by its exit code
            code = 3
            try:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(10)
                code = work()
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        if not done[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        return os.waitstatus_to_exitcode(done[1])
    finally:
        release.set()
        holder.join(10)


def _unavailable() -> str | None:
    """Why no server can be started here, or ``None``."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        return f"psycopg is not importable ({exc})"
    if find_programs() is None:
        return "initdb/pg_ctl not found"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test process (one per xdist worker), removed at the end."""
    why = _unavailable()
    if why is not None:
        message = f"{why}. {HOW_TO_ENABLE}"
        if os.environ.get("AGGREGATOR_REQUIRE_POSTGRES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    programs = find_programs()
    assert programs is not None
    server = PostgresServer(programs)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(request: pytest.FixtureRequest, postgres_server: PostgresServer) -> str:
    """The connection string of the session's PostgreSQL server."""
    request.node.add_marker("postgres")  # counted by pytest_terminal_summary
    return postgres_server.dsn


@pytest.fixture
def table() -> str:
    """A table name no other test of this process uses."""
    return f"t{os.getpid()}_{next(_tables)}"


_postgres_outcomes: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and "postgres" in report.keywords:
        _postgres_outcomes[report.outcome] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line saying whether the PostgreSQL tests ran against a real server (CI quotes it)."""
    if _postgres_outcomes:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(_postgres_outcomes.items()))
        terminalreporter.write_line(f"PostgreSQL sink tests against a real server: {counts}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: the test uses the PostgreSQL server (tests/conftest.py)")
