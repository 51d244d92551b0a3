"""``adder()`` (ADD-8) over a third party's storage whose ``add`` is not a method."""

from __future__ import annotations

import operator
from typing import Any

import aggregator_reference as ar


class ClosureAddStorage:
    """The reference storage with ``add`` an instance attribute: a closure, bound to nothing."""

    def __init__(self, merge: Any, shards: int | None) -> None:
        inner: Any = ar.ReferenceStorage(merge, shards)
        self._inner = inner
        self.add = lambda key, value, /: inner.add(key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)


class ClosureAddAggregator(ar.BufferedAggregator[Any, Any]):
    storage_class = ClosureAddStorage


def test_adder_of_a_storage_whose_add_is_no_method_is_still_an_object_of_its_own() -> None:
    agg = ClosureAddAggregator(operator.add, flush_interval=None)
    first, second = agg.adder(), agg.adder()
    assert first is not second
    assert first is not agg.add
    assert (first("k", 1), second("k", 2)) == (False, True)
    agg.shutdown()
    assert agg.drain() == [("k", 3)]
