"""A sink wrapper that fails some writes, before or after the commit, for the sink tests."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

__all__ = ["Flaky"]


class Flaky:
    """Wraps a sink: about ``rate`` of writes fail, half before the commit and half after it."""

    def __init__(self, sink: Any, rate: float, seed: int) -> None:
        self.sink = sink
        self.rate = rate
        self.random = random.Random(seed)
        self.failed = Counter[str]()
        sink.before_commit = self._before_commit

    def _before_commit(self, batch_id: str) -> None:
        if self.random.random() < self.rate / 2:
            self.failed["before commit"] += 1
            raise OSError(f"injected: connection lost before committing {batch_id}")

    def write(self, batch: list[tuple[Any, Any]], batch_id: str) -> None:
        self.sink.write(batch, batch_id)
        if self.random.random() < self.rate / 2:
            self.failed["after commit"] += 1
            raise OSError(f"injected: acknowledgement of {batch_id} lost after the commit")

    def close(self) -> None:
        self.sink.close()

    def __repr__(self) -> str:
        return f"Flaky({self.sink!r})"
