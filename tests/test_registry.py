"""The registry: broken plugins are logged and skipped, never break import."""

from __future__ import annotations

import logging
import operator
import os
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import aggregator_reference as ar
from aggregator_reference import _registry


@pytest.fixture
def broken_plugin(monkeypatch: pytest.MonkeyPatch) -> str:
    real = _registry._entry_points

    def with_broken() -> dict[str, EntryPoint]:
        found = real()
        found["broken"] = EntryPoint("broken", "no_such_module_anywhere:Backend", _registry.ENTRY_POINT_GROUP)
        return found

    monkeypatch.setattr(_registry, "_entry_points", with_broken)
    return "broken"


def test_broken_plugin_is_listed_but_fails_clearly(broken_plugin: str) -> None:
    assert broken_plugin in ar.backend_names()
    with pytest.raises(ar.BackendNotFoundError, match="failed to import"):
        ar.load_backend(broken_plugin)


def test_default_skips_a_broken_preferred_plugin(
    broken_plugin: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_registry, "GIL_PREFERENCE", (broken_plugin, "reference"))
    monkeypatch.setattr(_registry, "NOGIL_PREFERENCE", (broken_plugin, "reference"))
    with caplog.at_level(logging.WARNING, logger="aggregator_reference"):
        name, reason = ar.explain_default_backend()
    assert name == "reference"
    assert "broken failed to import" in reason
    assert any("skipping backend 'broken'" in r.getMessage() for r in caplog.records)


def test_default_reason_says_how_it_was_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "GIL_PREFERENCE", ("reference", "striped"))
    monkeypatch.setattr(_registry, "NOGIL_PREFERENCE", ("reference", "striped"))
    name, reason = ar.explain_default_backend()
    assert name == "reference"
    assert "first in the preference order" in reason
    assert "reference > striped" in reason
    assert "first choice" not in reason


def test_unknown_name_in_the_environment_variable_says_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_registry.ENV_VAR, "nope")
    with pytest.raises(ar.BackendNotFoundError) as caught:
        ar.create(operator.add, flush_interval=None)
    message = str(caught.value)
    assert message.startswith("AGGREGATOR_BACKEND='nope' names no installed backend")
    for name in ar.backend_names():
        assert name in message
    assert "unset it" in message


def test_broken_backend_in_the_environment_variable_says_where_it_came_from(
    broken_plugin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_registry.ENV_VAR, broken_plugin)
    with pytest.raises(ar.BackendNotFoundError, match=r"^AGGREGATOR_BACKEND='broken' .*failed to import"):
        ar.create(operator.add, flush_interval=None)


def test_empty_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_registry.ENV_VAR, "")
    agg = ar.create(operator.add, flush_interval=None)
    try:
        assert type(agg) is ar.load_backend(ar.default_backend())
    finally:
        agg.shutdown()


def test_environment_variable_imports_only_the_backend_it_names() -> None:
    code = (
        "import sys, operator, aggregator_reference as ar;"
        "ar.create(operator.add, flush_interval=None).shutdown();"
        "bad = [m for m in sys.modules if m.startswith(('aggregator_striped', 'aggregator_sharded',"
        " 'aggregator_freethreaded'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, _registry.ENV_VAR: "reference"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_backend_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="backend"):
        ar.create(operator.add, backend=3)  # type: ignore[arg-type]


def test_no_usable_backend_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "GIL_PREFERENCE", ("nothing",))
    monkeypatch.setattr(_registry, "NOGIL_PREFERENCE", ("nothing",))
    with pytest.raises(ar.BackendNotFoundError, match="none of the backends"):
        ar.default_backend()


def test_core_imports_no_backend_and_no_test() -> None:
    import subprocess
    import sys

    code = (
        "import sys, aggregator_reference as ar; ar.create(lambda a, b: a, backend='reference').shutdown();"
        "bad = [m for m in sys.modules if m.startswith(('aggregator_striped', 'aggregator_sharded',"
        " 'aggregator_freethreaded', 'aggregator_conformance', 'conformance', 'pytest', 'hypothesis'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
