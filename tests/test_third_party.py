"""A third party runs the installed conformance suite against its own backend, without this checkout."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent

THIRD_PARTY_BACKEND = '''
"""A third party's backend, registered through its own dist-info entry point."""
import aggregator_reference as ar


class ThirdPartyAggregator(ar.BufferedAggregator):
    """A third party's backend: the shared engine over a storage it chose."""

    storage_class = ar.ReferenceStorage
'''

DEADLOCKING_BACKEND = '''
"""A naive third party's backend: one plain Lock taken with ``with``, no ``kit`` helpers.

A ``merge`` that calls ``flush()`` or ``add()`` of the same key waits for the lock
its own thread holds: a deadlock, which the suite must report, not hang on.
"""
import threading

import aggregator_reference as ar


class DeadlockingStorage:
    shards = 1

    def __init__(self, merge, shards=None):
        self._merge = merge
        self._lock = threading.Lock()
        self._data = {}
        self._transit = {}
        self._closed = False
        self._merges = self._stored = 0

    def add(self, key, value, /):
        with self._lock:
            if self._closed:
                raise ar.AggregatorClosedError("add() after shutdown() began")
            if key in self._data:
                self._data[key] = self._merge(self._data[key], value)
                self._merges += 1
                return True
            self._data[key] = value
            self._stored += 1
            return False

    def get(self, key, default, /):
        with self._lock:
            return self._data.get(key, self._transit.get(key, default))

    def snapshot(self):
        with self._lock:
            return {**self._transit, **self._data}

    def __len__(self):
        with self._lock:
            return len(self._transit.keys() | self._data.keys())

    def detach(self):
        with self._lock:
            if not self._data:
                return []
            self._transit, self._data = self._data, {}
            return [self._transit]

    def requeue(self, chunk, leftover, /):
        with self._lock:
            for key, value in leftover:
                self._data[key] = self._merge(value, self._data[key]) if key in self._data else value
            self._transit = {}
            return []

    def close(self):
        with self._lock:
            self._closed = True

    def counts(self):
        return self._merges, self._stored


class DeadlockingAggregator(ar.BufferedAggregator):
    storage_class = DeadlockingStorage
'''


def install_backend(where: Path, module: str, source: str, name: str, attribute: str) -> None:
    """Make ``module`` importable from ``where`` and register it as backend ``name``, as pip would."""
    (where / f"{module}.py").write_text(textwrap.dedent(source))
    info = where / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[aggregator_reference.backends]\n{name} = {module}:{attribute}\n"
    )


def installed_suite() -> Path | None:
    """The installed ``aggregator_conformance``, if it is this checkout's suite.

    An editable install copies the suite into site-packages when it is
    installed and never again, so there it may be stale; tox installs a wheel
    built from this checkout.
    """
    spec = importlib.util.find_spec("aggregator_conformance")
    if spec is None or spec.origin is None:
        return None
    installed = Path(spec.origin).parent
    for ours in (REPOSITORY / "conformance").glob("*.py"):
        theirs = installed / ours.name
        if not theirs.is_file() or theirs.read_bytes() != ours.read_bytes():
            return None
    return installed


def lay_out_suite(where: Path) -> None:
    """Unless this checkout's suite is installed, put it under ``where`` as the wheel lays it out.

    pyproject.toml ships ``conformance/`` as ``aggregator_conformance`` with
    ``spec/CONTRACT.md`` inside it; ``where`` comes first on the subprocess's path.
    """
    if installed_suite() is not None:
        return
    suite = where / "aggregator_conformance"
    shutil.copytree(REPOSITORY / "conformance", suite, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPOSITORY / "spec" / "CONTRACT.md", suite / "CONTRACT.md")


def run_suite(where: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m aggregator_conformance ARGS`` in ``where``, as a third party runs it: no configuration."""
    env = {**os.environ, "PYTHONPATH": str(where), "HYPOTHESIS_PROFILE": "ci"}
    env.pop("PYTEST_TIMEOUT", None)
    env.pop("PYTEST_ADDOPTS", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "aggregator_conformance", *args],
            capture_output=True,
            text=True,
            cwd=where,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:  # say how far it got
        output = [
            part.decode() if isinstance(part, bytes) else part or ""
            for part in (expired.stdout, expired.stderr)
        ]
        pytest.fail(
            f"the suite ran past {timeout} s; its output so far:\n{output[0][-4000:]}{output[1][-2000:]}"
        )


@pytest.mark.skipif(
    installed_suite() is None,
    reason="this checkout's conformance suite is not installed as a package (editable checkout); "
    "tox installs it",
)
@pytest.mark.timeout(900)
def test_installed_suite_runs_against_a_third_party_backend(tmp_path: Path) -> None:
    install_backend(tmp_path, "thirdparty_backend", THIRD_PARTY_BACKEND, "thirdparty", "ThirdPartyAggregator")
    # The whole suite, serially (about 70 s alone on 2 cores): a test of it that hangs fails at
    # its own 120 s limit with every stack, well before this test's limit would hide them.
    result = run_suite(tmp_path, "--backend", "thirdparty", "-q", "-x", "--timeout", "120", timeout=800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    assert " failed" not in result.stdout


@pytest.mark.parametrize("mode", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_deadlocking_backend_fails_the_run_naming_the_test(tmp_path: Path, mode: list[str]) -> None:
    lay_out_suite(tmp_path)
    install_backend(tmp_path, "deadlocking_backend", DEADLOCKING_BACKEND, "mine", "DeadlockingAggregator")
    selected = "test_mutating_calls_from_merge_raise and flush"
    result = run_suite(tmp_path, "--backend", "mine", "--timeout", "5", "-k", selected, *mode, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "TIMEOUT " in output, output[-4000:]
    assert "test_mutating_calls_from_merge_raise[mine-flush] after 5 s" in output, output[-4000:]
    assert "it checks REENTRY-1, ADD-4" in output, output[-4000:]
    # Every thread's stack, down to the line where the backend waits for its own lock.
    assert "--- Stack of thread 'MainThread'" in output, output[-4000:]
    assert 'deadlocking_backend.py", line' in output, output[-4000:]
    assert "with self._lock:" in output, output[-4000:]
    if mode:  # the failure summary of the crashed worker carries the whole report
        crash = re.search(r"worker 'gw\d+' crashed while running '(.*)'\n", result.stdout)
        assert crash is not None, output[-4000:]
        assert crash[1].endswith("test_mutating_calls_from_merge_raise[mine-flush]"), output[-4000:]
        assert "it checks REENTRY-1, ADD-4" in result.stdout[crash.end() :], output[-4000:]


def test_a_run_that_configures_nothing_has_a_time_limit_per_test(tmp_path: Path) -> None:
    lay_out_suite(tmp_path)
    result = run_suite(tmp_path, "--backend", "reference", "--co", "-k", "no_such_test", timeout=120)
    assert "timeout: 300.0s" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
    assert "timeout method: thread" in result.stdout, result.stdout[-4000:]


def test_help_shows_the_suite_options_before_pytest_options(tmp_path: Path) -> None:
    lay_out_suite(tmp_path)
    result = run_suite(tmp_path, "--help", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    ours = result.stdout.index("usage: python -m aggregator_conformance")
    assert ours < result.stdout.index("--backend NAME") < result.stdout.index("usage: ", ours + 1)
    assert "installed now: " in result.stdout
