"""``python -m aggregator_reference``: see :mod:`aggregator_reference._cli`."""

from ._cli import main

raise SystemExit(main())
