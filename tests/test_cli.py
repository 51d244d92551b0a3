"""``python -m aggregator_reference``: the newcomer's main job."""

from __future__ import annotations

import io
import subprocess
import sys

import aggregator_reference as ar
from aggregator_reference._cli import main


def test_lists_backends_and_the_default_with_a_reason() -> None:
    out = io.StringIO()
    assert main(["backends"], out) == 0
    text = out.getvalue()
    for name in ar.backend_names():
        assert name in text
    default, reason = ar.explain_default_backend()
    assert f"Default: {default} ({reason})" in text


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
