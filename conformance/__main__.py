"""Run the conformance suite: ``python -m aggregator_conformance [--backend NAME ...] [pytest args]``.

Every argument is passed to pytest; ``--backend`` (repeatable) restricts the
run to the named backends, which must be registered in the
``aggregator_reference.backends`` entry-point group.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import pytest

    here = str(Path(__file__).resolve().parent)
    args = list(sys.argv[1:] if argv is None else argv)
    return int(pytest.main([here, "-p", "no:cacheprovider", *args]))


if __name__ == "__main__":
    raise SystemExit(main())
