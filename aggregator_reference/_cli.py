"""``python -m aggregator_reference``: what is installed, and a short live demo.

Subcommands: ``backends`` (list them), ``demo`` (run the demo: writers count
requests, a delivery writes them into SQLite), ``bench``; with none, the
first two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import operator
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

from ._errors import AggregatorError, BackendNotFoundError
from ._registry import ENV_VAR, backend_names, create, explain_chosen_backend, gil_enabled, load_backend

ENDPOINTS = ("GET /", "GET /items", "POST /items", "GET /health", "DELETE /items")
#: Where the demo writes (``--db``); ``:memory:`` for no file.
DEMO_DB = "aggregator-demo.db"


def describe_backends(out: TextIO) -> None:
    """Print the installed backends, marking the one ``create(backend=None)`` uses here, and why.

    Raises:
        BackendNotFoundError: after the listing, when ``$AGGREGATOR_BACKEND``
            names no usable backend or no preferred backend can be imported.
    """
    chosen: str | None = None
    reason = ""
    problem: BackendNotFoundError | None = None
    try:
        chosen, reason = explain_chosen_backend()
    except BackendNotFoundError as exc:
        problem = exc
    build = "GIL enabled" if gil_enabled() else "free-threaded, GIL disabled"
    out.write(f"Python {sys.version.split()[0]} ({build})\n")
    out.write("Installed backends (entry-point group 'aggregator_reference.backends'):\n")
    for name in backend_names():
        try:
            cls = load_backend(name)
            summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.__name__
        except AggregatorError as exc:
            summary = f"BROKEN: {exc}"
        marker = "*" if name == chosen else " "
        out.write(f"  {marker} {name:<14} {summary}\n")
    if problem is not None:
        raise problem
    out.write(f"Default: {chosen} ({reason}). Override with backend=... or ${ENV_VAR}.\n")


class _Printing:
    """The demo's sink: SQLite, saying what each transaction wrote."""

    def __init__(self, sink: Any, out: TextIO) -> None:
        self.sink, self.out, self.transactions = sink, out, 0

    def write(self, batch: list[tuple[str, int]], batch_id: str) -> None:
        self.sink.write(batch, batch_id)
        self.transactions += 1
        rows = ", ".join(f"{key} +{value}" for key, value in batch)
        self.out.write(f"  transaction {self.transactions:>3}: {len(batch)} row(s) upserted: {rows}\n")

    def close(self) -> None:
        """Called by the delivery once all is written; the demo reads the table, then closes it."""


def run_demo(out: TextIO, backend: str | None, writers: int, adds: int, db: str = DEMO_DB) -> bool:
    """Writers count requests per endpoint into SQLite through a delivery; check the totals by SQL."""
    from .sinks import SQLiteSink

    _drop_demo_tables(db)
    sink: SQLiteSink[str, int] = SQLiteSink(db, table="requests")
    aggregator: Any = create(operator.add, backend=backend, flush_interval=0.2, max_pending=64)
    name = type(aggregator).__name__
    where = "an in-memory SQLite database" if db == ":memory:" else f"SQLite file {db} (table requests)"
    out.write(
        f"\nDemo: {writers} writer threads x {adds} adds over {len(ENDPOINTS)} keys into {name}, "
        f"flushing every 0.2 s; a delivery writes each batch into {where} in one transaction.\n"
    )
    added: list[Counter[str]] = [Counter() for _ in range(writers)]
    printing = _Printing(sink, out)
    delivery = aggregator.deliver(printing, batch_size=100, max_wait=0.05)

    def write(index: int) -> None:
        rng = random.Random(index)
        for i in range(adds):
            endpoint = rng.choice(ENDPOINTS)
            aggregator.add(endpoint, 1)
            added[index][endpoint] += 1
            if i % 10 == 0:
                time.sleep(0.01)  # pace the writers so that the flushes can be watched

    threads = [threading.Thread(target=write, args=(i,), name=f"demo-writer-{i}") for i in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    aggregator.shutdown()  # flushes the rest and waits for the delivery to write it
    elapsed = time.perf_counter() - started
    expected = dict(sum(added, Counter()))
    stats, written = aggregator.stats(), delivery.stats()
    in_table = sink.read()  # SELECT key, value FROM requests
    sink.close()
    ok = in_table == expected
    out.write(
        f"\n{stats.adds} adds became {written.records} rows written in {printing.transactions} "
        f"transactions in {elapsed:.2f} s: {stats.adds / max(1, written.records):.0f}x fewer row writes "
        f"than one upsert per add ({stats.merges} adds merged in memory, {written.retries} writes "
        "retried).\n"
    )
    out.write(
        "Check by SQL query (SELECT key, value FROM requests): OK, every total matches what was added.\n"
        if ok
        else f"Check by SQL query: FAILED, added {expected} but the table holds {in_table}\n"
    )
    return ok


def _drop_demo_tables(db: str) -> None:
    """Drop the demo's table and ledger from an earlier run, so that this run checks its own totals."""
    if db == ":memory:":
        return
    import sqlite3

    connection = sqlite3.connect(db)
    try:
        with connection:
            connection.execute('DROP TABLE IF EXISTS "requests"')
            connection.execute('DROP TABLE IF EXISTS "requests_ledger"')
    finally:
        connection.close()


def run_bench_command(args: argparse.Namespace, out: TextIO) -> int:
    """``bench``: measure, then print a table (or JSON) and draw the plot if asked."""
    from . import _bench

    try:
        writers, keys = _bench.parse_counts(args.writers), _bench.parse_counts(args.keys)
        if args.adds < 1 or args.repeats < 1 or min(args.flush, args.memory, args.consumers, args.sink) < 0:
            raise ValueError(
                "--adds and --repeats must be >= 1, --flush, --memory, --consumers and --sink >= 0"
            )
        if args.sink_keys < 1:
            raise ValueError("--sink-keys must be >= 1")
        for name in args.backend or ():
            load_backend(name)
        report = _bench.run_bench(
            args.backend,
            writers,
            keys,
            args.adds,
            args.repeats,
            merge=args.merge,
            ceiling=args.ceiling,
            flush_records=args.flush,
            memory_records=args.memory,
            consumer_records=args.consumers,
            floor=args.floor,
            peers=args.peers,
            progress=None if args.json or not sys.stderr.isatty() else sys.stderr,
        )
        if args.plot:
            _bench.plot(report, args.plot)
        reduction = None
        if args.sink:
            from ._bench import sink as _bench_sink

            backend = args.backend[0] if args.backend else None  # the first one named, else the default
            reduction = _bench_sink.write_reduction(args.sink, args.sink_keys, backend)
    except (ValueError, AggregatorError, ModuleNotFoundError) as exc:
        out.write(f"error: {exc}\n")
        return 2
    if args.json:
        data = _bench.report_dict(report)
        if reduction is not None:
            data["sink"] = {**dataclasses.asdict(reduction), "write_reduction": reduction.write_reduction}
        json.dump(data, out, indent=2)
        out.write("\n")
    else:
        out.write(_bench.format_table(report) + "\n")
        if reduction is not None:
            from ._bench.sink import format_reduction

            out.write("\n".join(format_reduction(reduction)) + "\n")
        if args.plot:
            out.write(f"plot written to {args.plot}\n")
    return 0


def _merge_names() -> list[str]:
    from ._bench import MERGES

    return list(MERGES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aggregator_reference",
        description="List the installed aggregator backends and run a short live demo.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("backends", help="list the installed backends and the default")
    bench = sub.add_parser(
        "bench",
        help="measure every backend side by side on this machine",
        description="Every installed backend and a bare-dict baseline, side by side, in seconds.",
    )
    bench.add_argument("--backend", action="append", default=None, help="only this backend (repeatable)")
    bench.add_argument("--writers", default="1,2,4,8", help="writer thread counts (default 1,2,4,8)")
    bench.add_argument("--keys", default="100", help="distinct key counts (default 100)")
    bench.add_argument("--adds", type=int, default=30_000, help="adds per writer (default 30000)")
    bench.add_argument(
        "--merge",
        choices=sorted(_merge_names()),
        default="python",
        help="int sum as a Python function (default) or operator.add",
    )
    bench.add_argument("--repeats", type=int, default=3, help="runs per case; the best counts (default 3)")
    bench.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the same work in independent processes (default: only with the GIL disabled)",
    )
    bench.add_argument("--flush", type=int, default=100_000, metavar="N", help="flush N records (0: skip)")
    bench.add_argument("--memory", type=int, default=0, metavar="N", help="memory of N records (0: skip)")
    bench.add_argument(
        "--consumers",
        type=int,
        default=10_000,
        metavar="N",
        help="move N flushed records through records(), batches(), arecords() and abatches(), "
        "and time add_many() of N pairs against add() (0: skip; default 10000)",
    )
    bench.add_argument(
        "--sink",
        type=int,
        default=0,
        metavar="N",
        help="also count N events into SQLite with one upsert each and through deliver() (first "
        "--backend, else the default), same run: rows written, transactions, events/s (0: skip)",
    )
    bench.add_argument(
        "--sink-keys", type=int, default=1000, metavar="K", help="keys of --sink (default 1000)"
    )
    bench.add_argument("--floor", action="store_true", help="also show what each step of an add costs")
    bench.add_argument("--peers", action="store_true", help="add OpenTelemetry, datadog, prometheus_client")
    bench.add_argument("--json", action="store_true", help="print the results as JSON, no table")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="draw throughput against writers (needs matplotlib)"
    )
    demo = sub.add_parser("demo", help="run the live demo")
    for target in (parser, demo):
        target.add_argument("--backend", default=None, help="backend to demo (default: the default)")
        target.add_argument("--writers", type=int, default=4, help="writer threads (default 4)")
        target.add_argument("--adds", type=int, default=2000, help="adds per writer (default 2000)")
        target.add_argument(
            "--db",
            default=DEMO_DB,
            help=f"SQLite file the demo writes into (default {DEMO_DB}; its demo table is replaced); "
            ":memory: for none",
        )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``python -m aggregator_reference``; returns the exit status."""
    stream = sys.stdout if out is None else out
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench_command(args, stream)
    if args.writers < 1 or args.adds < 1:
        stream.write("--writers and --adds must be >= 1\n")
        return 2
    try:
        if args.command in (None, "backends"):
            describe_backends(stream)
        if args.command in (None, "demo"):
            return 0 if run_demo(stream, args.backend, args.writers, args.adds, args.db) else 1
    except AggregatorError as exc:
        stream.write(f"error: {exc}\n")
        return 2
    return 0
