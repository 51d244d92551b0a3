"""PostgresSink's two methods side by side: time per record of ``copy`` and ``executemany``.

Run from a checkout with PostgreSQL's programs installed (Debian's ``postgresql``)
and psycopg: ``python tools/bench_postgres_methods.py``. It starts a throwaway
server on loopback (tests/postgres_server.py), writes the same batches of
100, 500 and 5000 distinct keys with each method, best of 3, and stops it.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from postgres_server import PostgresServer, find_programs

from aggregator_reference.sinks import PostgresSink


def main() -> None:
    programs = find_programs()
    if programs is None:
        raise SystemExit("initdb/pg_ctl not found: apt-get install postgresql")
    server = PostgresServer(programs)
    server.start()
    try:
        for size in (100, 500, 5000):
            rng = random.Random(0)
            batches = [
                list({f"k{rng.randrange(10000)}": 1 for _ in range(size)}.items())
                for _ in range(max(4, 40000 // size))
            ]
            records = sum(len(b) for b in batches)
            best: dict[str, float] = {}
            for repeat in range(3):
                for method in ("executemany", "copy"):
                    sink: PostgresSink[str, int] = PostgresSink(
                        server.dsn, table=f"b_{method}_{size}_{repeat}", method=method
                    )
                    sink.write([("warm", 1)], "w:1")
                    started = time.perf_counter()
                    for number, batch in enumerate(batches, 2):
                        sink.write(batch, f"w:{number}")
                    seconds = time.perf_counter() - started
                    best[method] = min(best.get(method, float("inf")), seconds / records * 1e6)
                    sink.close()
            print(
                f"batches of {size}: executemany {best['executemany']:.1f} us/record, "
                f"copy {best['copy']:.1f} us/record, "
                f"copy/executemany {best['copy'] / best['executemany']:.2f}"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
