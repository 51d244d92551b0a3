"""Fixtures of the repository's own tests: a real PostgreSQL server for the sink tests."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
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
