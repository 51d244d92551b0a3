"""Run the conformance suite: ``python -m aggregator_conformance [--backend NAME ...] [pytest args]``.

Every argument is passed to pytest; ``--backend`` (repeatable) restricts the
run to the named backends, which must be registered in the
``aggregator_reference.backends`` entry-point group. ``--help`` shows the
suite's own options first, then pytest's.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = """\
usage: python -m aggregator_conformance [--backend NAME ...] [--timeout SECONDS] [pytest options]

Check backends of aggregator_reference against its contract (CONTRACT.md, beside this suite).
To test your own backend, register it in the 'aggregator_reference.backends' entry-point
group of your package, install that, and run: python -m aggregator_conformance --backend NAME

suite options:
  --backend NAME     test only this backend (repeatable); default: every installed one
                     (installed now: {installed})
  --timeout SECONDS  time limit per test (pytest-timeout; default {timeout:g}, thread method); a
                     test that overruns it stops the run, naming the test and the clauses it
                     checks, with every thread's stack (a deadlock fails, it never hangs)
  -n auto            run tests in parallel (pytest-xdist)

Every other argument goes to pytest, whose own help follows.
"""


def usage() -> str:
    """The suite's own help, naming the backends installed now."""
    import aggregator_reference as ar

    from ._timeouts import DEFAULT_TIMEOUT

    return USAGE.format(installed=", ".join(ar.backend_names()) or "none", timeout=DEFAULT_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    import pytest

    here = str(Path(__file__).resolve().parent)
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(usage(), flush=True)
    return int(pytest.main([here, "-p", "no:cacheprovider", *args]))


if __name__ == "__main__":
    raise SystemExit(main())
