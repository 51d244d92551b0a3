"""``python -m aggregator_reference``: the newcomer's main job."""

from __future__ import annotations

import io
import subprocess
import sys

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


def test_demo_checks_zero_loss() -> None:
    out = io.StringIO()
    assert main(["demo", "--backend", "reference", "--writers", "3", "--adds", "50"], out) == 0
    text = out.getvalue()
    assert "150 adds became" in text
    assert "Zero loss: OK" in text
    assert "flushed" in text


def test_unknown_backend_is_a_clean_error() -> None:
    out = io.StringIO()
    assert main(["demo", "--backend", "nope"], out) == 2
    assert "no aggregator backend named 'nope'" in out.getvalue()


def test_module_runs_as_a_program() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aggregator_reference", "--writers", "2", "--adds", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Installed backends" in result.stdout
    assert "Zero loss: OK" in result.stdout
