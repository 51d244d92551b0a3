"""A third party runs the installed conformance suite against its own backend, without this checkout."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

THIRD_PARTY_BACKEND = '''
"""A third party's backend, registered through its own dist-info entry point."""
import aggregator_reference as ar


class ThirdPartyAggregator(ar.BufferedAggregator):
    """A third party's backend: the shared engine over a storage it chose."""

    storage_class = ar.ReferenceStorage
'''


@pytest.mark.skipif(
    importlib.util.find_spec("aggregator_conformance") is None,
    reason="the conformance suite is not installed as a package (editable checkout); tox installs it",
)
def test_installed_suite_runs_against_a_third_party_backend(tmp_path: Path) -> None:
    (tmp_path / "thirdparty_backend.py").write_text(textwrap.dedent(THIRD_PARTY_BACKEND))
    info = tmp_path / "thirdparty_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[aggregator_reference.backends]\nthirdparty = thirdparty_backend:ThirdPartyAggregator\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HYPOTHESIS_PROFILE": "ci"}
    result = subprocess.run(
        [sys.executable, "-m", "aggregator_conformance", "--backend", "thirdparty", "-q", "-x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    assert " failed" not in result.stdout
