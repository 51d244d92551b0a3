"""Helpers for writing a :class:`~aggregator_reference.Storage` (public as ``aggregator_reference.kit``).

None of them takes a lock: call them with the lock that guards the dicts held.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

from ._errors import AggregatorClosedError, ReentrantMergeError

__all__ = [
    "CLOSED",
    "MERGING",
    "OPEN",
    "count_visible",
    "lookup",
    "refuse",
    "requeue_into",
    "visible_records",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


#: Storage states: a storage refuses ``add`` whenever its state is not ``OPEN``.
OPEN, MERGING, CLOSED = 0, 1, 2


def refuse(state: int, call: str) -> NoReturn:
    """Raise the error for calling ``call`` in ``state`` (``MERGING`` or ``CLOSED``)."""
    if state == MERGING:
        raise ReentrantMergeError(f"{call} called from inside merge of the same aggregator")
    raise AggregatorClosedError(f"{call} called after shutdown() began")


def requeue_into(
    data: dict[K, V], leftover: Iterable[tuple[K, V]], merge: Callable[[V, V], V]
) -> list[tuple[K, V]]:
    """Put ``leftover`` back into ``data``, older first: ``merge(leftover_value, newer)``.

    Returns the pairs that could not be put back because ``merge`` or the
    key's ``__hash__``/``__eq__`` raised; ``data`` keeps its newer record then.
    """
    failed: list[tuple[K, V]] = []
    for key, value in leftover:
        try:
            if key in data:
                merged = merge(value, data[key])
                del data[key]  # so the record keeps the older key object (KEY-1)
            else:
                merged = value
            data[key] = merged
        except Exception:
            failed.append((key, value))
    return failed


def lookup(data: Mapping[K, V], transit: Iterable[Mapping[K, V]], key: K, default: Any) -> Any:
    """``data[key]``, else the first detached chunk holding ``key``, else ``default``."""
    if key in data:
        return data[key]
    for chunk in transit:
        if key in chunk:
            return chunk[key]
    return default


def visible_records(data: Mapping[K, V], transit: Iterable[Mapping[K, V]]) -> dict[K, V]:
    """Detached chunks overlaid by the live ``data`` (the buffered value wins)."""
    result: dict[K, V] = {}
    for chunk in transit:
        result.update(chunk)
    result.update(data)
    return result


def count_visible(data: Mapping[K, V], transit: Iterable[Mapping[K, V]]) -> int:
    """``len(visible_records(data, transit))`` without building the dict when nothing is detached."""
    chunks = [chunk for chunk in transit if chunk]
    if not chunks:
        return len(data)
    return len(visible_records(data, chunks))
