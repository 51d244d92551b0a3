"""``python -m aggregator_reference``: the newcomer's main job."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import aggregator_reference as ar
from aggregator_reference._cli import main


def marked(text: str) -> list[str]:
    """The backends the listing marks with ``*`` (the one ``create(backend=None)`` uses)."""
    return [line.split()[1] for line in text.splitlines() if line.startswith("  * ")]


def test_lists_backends_and_the_default_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGGREGATOR_BACKEND", raising=False)
    out = io.StringIO()
    assert main(["backends"], out) == 0
    text = out.getvalue()
    for name in ar.backend_names():
        assert name in text
    default, reason = ar.explain_default_backend()
    assert f"Default: {default} ({reason})" in text
    assert marked(text) == [default]


def test_listing_marks_the_backend_the_environment_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    fallback = ar.default_backend()
    chosen = next(name for name in ar.backend_names() if name != fallback)
    monkeypatch.setenv("AGGREGATOR_BACKEND", chosen)
    out = io.StringIO()
    assert main(["backends"], out) == 0
    text = out.getvalue()
    assert marked(text) == [chosen]
    assert f"Default: {chosen} (from $AGGREGATOR_BACKEND" in text
    assert fallback in text.split("Default:", 1)[1]  # what unsetting it would give


def test_listing_with_an_unknown_environment_name_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_BACKEND", "nope")
    out = io.StringIO()
    assert main(["backends"], out) == 2
    text = out.getvalue()
    assert marked(text) == []
    for name in ar.backend_names():
        assert name in text
    assert "error: AGGREGATOR_BACKEND='nope' names no installed backend" in text


def test_demo_delivers_into_sqlite_and_checks_the_totals_by_sql(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    for _ in range(2):  # a second run replaces the first one's table and checks its own totals
        out = io.StringIO()
        args = ["demo", "--backend", "reference", "--writers", "3", "--adds", "50", "--db", str(db)]
        assert main(args, out) == 0
        text = out.getvalue()
        assert "150 adds became" in text
        assert "row(s) upserted" in text
        assert "Check by SQL query (SELECT key, value FROM requests): OK" in text
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT sum(value) FROM requests").fetchone() == (150,)


def test_demo_in_memory_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert main(["demo", "--writers", "2", "--adds", "20", "--db", ":memory:"], out) == 0
    assert "in-memory SQLite database" in out.getvalue()
    assert "Check by SQL query (SELECT key, value FROM requests): OK" in out.getvalue()
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_a_clean_error() -> None:
    out = io.StringIO()
    assert main(["demo", "--backend", "nope"], out) == 2
    assert "no aggregator backend named 'nope'" in out.getvalue()


def test_module_runs_as_a_program(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aggregator_reference", "--writers", "2", "--adds", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Installed backends" in result.stdout
    assert "Check by SQL query (SELECT key, value FROM requests): OK" in result.stdout
    assert (tmp_path / "aggregator-demo.db").is_file()
