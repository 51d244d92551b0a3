"""``python -m aggregator_reference bench``: runs, reports every backend, and its ratios add up."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

import aggregator_reference as ar
from aggregator_reference import _bench
from aggregator_reference._bench import consumers, costs, writers
from aggregator_reference._cli import build_parser, main

TINY = ["--writers", "1,2", "--keys", "10", "--adds", "300", "--repeats", "1", "--consumers", "0"]


def test_json_report_covers_every_backend_and_the_baseline() -> None:
    out = io.StringIO()
    assert main(["bench", *TINY, "--flush", "500", "--memory", "500", "--no-ceiling", "--json"], out) == 0
    report = json.loads(out.getvalue())
    seen = {(m["backend"], m["writers"]) for m in report["measurements"]}
    for name in [*ar.backend_names(), _bench.BASELINE]:
        assert {(name, 1), (name, 2)} <= seen
    for m in report["measurements"]:
        assert m["adds"] == 300 * m["writers"]
        assert m["ns_per_add"] == pytest.approx(m["seconds"] / m["adds"] * 1e9)
        if m["backend"] == _bench.BASELINE:
            assert m["vs_baseline"] == pytest.approx(1.0)
        if m["writers"] == 1:
            assert m["scaling"] == pytest.approx(1.0)
    assert set(report["flush"]) == set(ar.backend_names())
    assert all(ratio > 0 for ratio in report["memory"].values())
    assert report["recommendation"].split(":")[0] in ar.backend_names()


def test_table_names_the_interpreter_and_recommends() -> None:
    out = io.StringIO()
    assert main(["bench", *TINY, "--backend", "reference", "--flush", "0"], out) == 0
    text = out.getvalue()
    assert "Python " in text
    assert "reference" in text
    assert "dict" in text
    assert "Recommendation on this machine: reference" in text


def test_floor_breakdown_lists_each_step() -> None:
    out = io.StringIO()
    assert main(["bench", *TINY, "--backend", "reference", "--flush", "0", "--floor"], out) == 0
    text = out.getvalue()
    assert "The floor of a Python add" in text
    assert "method: + Lock acquire/release" in text
    floor = _bench.floor_breakdown(10, 300, 1)
    assert list(floor) == [
        "inline d[k] = merge(d[k], v)",
        "method: the update only",
        "method: + key test, return value",
        "method: + Lock acquire/release",
    ]
    assert all(ns > 0 for ns in floor.values())


def test_consumers_and_add_many_are_measured_for_every_backend() -> None:
    # Fields exist and are positive, in the JSON and the table; their values are the machine's.
    out = io.StringIO()
    assert main(["bench", *TINY, "--flush", "0", "--consumers", "200", "--no-ceiling", "--json"], out) == 0
    consumers = json.loads(out.getvalue())["consumers"]
    assert set(consumers) == set(ar.backend_names())
    for c in consumers.values():
        assert (c["records"], c["keys"]) == (200, 10)
        assert list(c["per_s"]) == list(c["vs_records"]) == ["records", "batches", "arecords", "abatches"]
        assert all(rate > 0 and math.isfinite(rate) for rate in c["per_s"].values())
        assert c["vs_records"]["records"] == pytest.approx(1.0)
        for kind, ratio in c["vs_records"].items():
            assert ratio == pytest.approx(c["per_s"][kind] / c["per_s"]["records"])
        assert c["add_ns"] > 0
        assert c["add_many_ns"] > 0
        assert c["add_many_vs_add"] == pytest.approx(c["add_many_ns"] / c["add_ns"])
        assert c["bounded_ns"] > 0
        assert c["bounded_vs_add"] == pytest.approx(c["bounded_ns"] / c["add_ns"])
    out = io.StringIO()
    assert main(["bench", *TINY, "--backend", "reference", "--flush", "0", "--consumers", "200"], out) == 0
    text = out.getvalue()
    assert "Consumers: records/s taking 200 flushed records" in text
    assert "add_many: time per pair over a loop of add() (200 pairs over 10 keys)" in text
    assert "bounded: add() with max_buffered set (never reached) over add() without" in text
    header = next(line for line in text.splitlines() if line.startswith("backend") and "records()" in line)
    assert header.split() == [
        "backend",
        "records()",
        "batches()",
        "arecords()",
        "abatches()",
        "add_many",
        "bounded",
    ]
    row = [line for line in text.splitlines() if line.startswith("reference")][-1].split()
    assert len(row) == 10
    assert row[-1].endswith("x")
    assert row[-2].endswith("x")


def test_consumers_zero_skips_and_the_default_run_measures_them() -> None:
    out = io.StringIO()
    assert (
        main(["bench", *TINY, "--backend", "reference", "--flush", "0", "--consumers", "0", "--json"], out)
        == 0
    )
    assert json.loads(out.getvalue())["consumers"] == {}
    args = build_parser().parse_args(["bench"])
    assert args.consumers > 0
    report = _bench.run_bench(["reference"], [1], [10], adds=200, repeats=1, flush_records=0)
    assert report.consumers == {}
    assert "Consumers:" not in _bench.format_table(report)


def test_consumer_rate_consumes_every_record() -> None:
    for kind in consumers.CONSUMERS:
        assert consumers.consumer_rate("reference", kind, 50) > 0


def test_bad_counts_are_a_clean_error() -> None:
    out = io.StringIO()
    assert main(["bench", "--writers", "0"], out) == 2
    assert "counts >= 1" in out.getvalue()
    out = io.StringIO()
    assert main(["bench", "--backend", "nope"], out) == 2
    assert "no aggregator backend named 'nope'" in out.getvalue()
    out = io.StringIO()
    assert main(["bench", "--consumers", "-1"], out) == 2
    assert "--consumers and --sink >= 0" in out.getvalue()


def test_the_names_asv_and_the_cli_use_stay_importable_from_bench() -> None:
    # benchmarks/benchmarks.py (run by asv against older commits too) and the CLI import
    # these from _bench, whichever of its modules defines them.
    for name in ("BASELINE", "MERGES", "int_sum", "process_ceiling"):
        assert getattr(_bench, name) is getattr(writers, name)
    for name in ("flush_cost", "memory_ratio", "floor_breakdown"):
        assert getattr(_bench, name) is getattr(costs, name)
    assert callable(_bench.usable_cpus)


def test_process_ceiling_runs_independent_processes() -> None:
    # Only that it runs and yields a ratio: its value is the machine's, checked by benchmarks.
    ceiling = _bench.process_ceiling("reference", 2, 10, adds=2000, repeats=1, merge="python")
    assert math.isfinite(ceiling)
    assert ceiling > 0


def test_peers_are_measured_or_reported_missing() -> None:
    report = _bench.run_bench(["reference"], [1], [10], adds=200, repeats=1, flush_records=0, peers=True)
    names = {m.backend for m in report.measurements}
    for peer in ("otel-counter", "datadog-statsd", "prometheus"):
        assert peer in names or peer in report.skipped


def test_plot_needs_matplotlib_or_draws(tmp_path: Path) -> None:
    report = _bench.run_bench(["reference"], [1, 2], [10], adds=200, repeats=1, flush_records=0)
    target = tmp_path / "bench.png"
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ModuleNotFoundError, match="aggregator-reference\\[plot\\]"):
            _bench.plot(report, str(target))
    else:
        _bench.plot(report, str(target))
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sink_mode_compares_direct_upserts_with_delivery_on_one_workload() -> None:
    out = io.StringIO()
    args = ["bench", *TINY, "--backend", "reference", "--flush", "0", "--sink", "3000", "--sink-keys", "50"]
    assert main([*args, "--json"], out) == 0
    sink = json.loads(out.getvalue())["sink"]
    assert (sink["events"], sink["keys"], sink["backend"]) == (3000, 50, "ReferenceAggregator")
    assert 50 <= sink["buffered_rows"] < 3000  # every key at least once, far fewer than one per event
    assert sink["write_reduction"] == pytest.approx(3000 / sink["buffered_rows"])
    assert 1 <= sink["buffered_transactions"] <= sink["buffered_rows"]
    out = io.StringIO()
    assert main(args, out) == 0
    text = out.getvalue()
    assert "Into SQLite (WAL), 3,000 events over 50 keys, same run:" in text
    assert "one upsert per event:" in text
    assert "fewer rows written" in text


def test_sink_mode_bad_counts_are_a_clean_error() -> None:
    out = io.StringIO()
    assert main(["bench", *TINY, "--sink", "-1"], out) == 2
    assert "--sink >= 0" in out.getvalue()
    out = io.StringIO()
    assert main(["bench", *TINY, "--sink", "10", "--sink-keys", "0"], out) == 2
    assert "--sink-keys must be >= 1" in out.getvalue()
