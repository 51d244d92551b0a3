"""On a free-threaded interpreter, nothing we import may turn the GIL back on."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

import aggregator_reference as ar

FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

pytestmark = pytest.mark.skipif(not FREE_THREADED_BUILD, reason="needs a free-threaded (--disable-gil) build")

EVERYTHING = [
    "aggregator_reference",
    "aggregator_striped",
    "aggregator_sharded",
    "aggregator_freethreaded",
    "hypothesis",
    "hypothesis.stateful",
    "pytest",
    "xdist",
    "pytest_timeout",
]


def test_gil_stays_disabled_in_this_test_run() -> None:
    assert os.environ.get("PYTHON_GIL") != "0", "PYTHON_GIL=0 would hide an extension re-enabling the GIL"
    for name in ar.backend_names():
        ar.load_backend(name)
    assert ar.gil_enabled() is False


def test_gil_stays_disabled_after_importing_everything() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    code = f"import sys; import {', '.join(EVERYTHING)}; print(sys._is_gil_enabled())"
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", result.stderr


def test_a_per_thread_backend_is_the_default() -> None:
    expected = "native" if "native" in ar.backend_names() else "freethreaded"
    assert ar.default_backend() == expected
