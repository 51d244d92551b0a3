"""Backend discovery through the ``aggregator_reference.backends`` entry-point group.

Selection order for :func:`create`: the ``backend`` argument, then the
``AGGREGATOR_BACKEND`` environment variable, then :func:`default_backend`.
Plugins are imported only when used; one that fails to import is logged and
skipped by :func:`default_backend`, and never breaks ``import aggregator_reference``.
"""

from __future__ import annotations

import os
import sys
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from ._engine import logger
from ._errors import BackendNotFoundError
from ._types import Aggregator, Merge

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "backend_names",
    "create",
    "default_backend",
    "explain_chosen_backend",
    "explain_default_backend",
    "gil_enabled",
    "load_backend",
]

V = TypeVar("V")

ENTRY_POINT_GROUP = "aggregator_reference.backends"
ENV_VAR = "AGGREGATOR_BACKEND"

#: Preferred backends on a GIL build, fastest first as measured (see the README's table).
GIL_PREFERENCE = ("native", "freethreaded", "reference", "sharded", "striped")
#: Preferred backends when the GIL is disabled. ``native`` is a distribution of its own
#: (backends/native); where it is not installed, ``freethreaded`` comes first.
NOGIL_PREFERENCE = ("native", "freethreaded", "sharded", "striped", "reference")

# Guards _loaded.
_lock = threading.Lock()
_loaded: dict[str, type[Any]] = {}


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the thread that may have held it at the fork is not in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            logger.warning(
                "backend %r is registered twice (%s and %s); using the first",
                ep.name,
                found[ep.name].value,
                ep.value,
            )
            continue
        found.setdefault(ep.name, ep)
    return found


def backend_names() -> list[str]:
    """The names of every registered backend, sorted; none is imported."""
    return sorted(_entry_points())


def load_backend(name: str) -> type[Any]:
    """Import and return the backend class registered as ``name``.

    Raises:
        TypeError: ``name`` is not a string.
        BackendNotFoundError: no such backend, or it failed to import (the
            message lists the installed backends and how to add one).
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    with _lock:
        if name in _loaded:
            return _loaded[name]
    available = _entry_points()
    ep = available.get(name)
    if ep is None:
        raise BackendNotFoundError(
            f"no aggregator backend named {name!r}; installed: {', '.join(sorted(available)) or 'none'}. "
            f"A backend is a package registering 'NAME = \"module:Class\"' in the "
            f"{ENTRY_POINT_GROUP!r} entry-point group; install it (pip install ...) and retry."
        )
    try:
        cls = ep.load()
    except Exception as exc:
        raise BackendNotFoundError(
            f"aggregator backend {name!r} ({ep.value}) is installed but failed to import: "
            f"{type(exc).__name__}: {exc}; installed: {', '.join(sorted(available))}"
        ) from exc
    if not isinstance(cls, type):
        raise BackendNotFoundError(f"aggregator backend {name!r} ({ep.value}) is not a class")
    with _lock:
        _loaded[name] = cls
    return cls


def gil_enabled() -> bool:
    """Whether this interpreter runs with the GIL right now (asked at run time, never assumed)."""
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def explain_default_backend() -> tuple[str, str]:
    """``(name, reason)``: the backend :func:`default_backend` picks and why.

    ``$AGGREGATOR_BACKEND`` plays no part here; :func:`explain_chosen_backend` includes it.
    """
    gil = gil_enabled()
    preference = GIL_PREFERENCE if gil else NOGIL_PREFERENCE
    mode = "the GIL is enabled" if gil else "the GIL is disabled (free-threaded build)"
    order = f"the preference order {'for GIL builds' if gil else 'without the GIL'}: {' > '.join(preference)}"
    installed = _entry_points()
    passed_over: list[str] = []
    for name in preference:
        if name not in installed:
            passed_over.append(f"{name} not installed")
            continue
        try:
            load_backend(name)
        except BackendNotFoundError as exc:
            logger.warning("skipping backend %r: %s", name, exc)
            passed_over.append(f"{name} failed to import")
            continue
        if not passed_over:
            return name, f"{mode}; the first in {order}"
        return name, f"{mode}; the first usable in {order} (skipped: {'; '.join(passed_over)})"
    raise BackendNotFoundError(
        f"none of the backends {', '.join(preference)} is installed and importable; "
        "reinstall aggregator-reference"
    )


def default_backend() -> str:
    """The backend :func:`create` uses when neither ``backend=`` nor ``AGGREGATOR_BACKEND`` says.

    ``native`` where it is installed, else ``freethreaded`` on a free-threaded
    interpreter with the GIL disabled, else the fastest backend on a GIL build
    (see the README).

    Raises:
        BackendNotFoundError: none of the preferred backends can be imported.
    """
    return explain_default_backend()[0]


def explain_chosen_backend() -> tuple[str, str]:
    """``(name, reason)``: the backend ``create(backend=None)`` uses here and why.

    That is ``$AGGREGATOR_BACKEND`` when it is set and not empty, checked by
    importing it; otherwise :func:`explain_default_backend`.

    Raises:
        BackendNotFoundError: the variable names a backend that is not installed
            or fails to import (the message says the name came from it), or no
            preferred backend can be imported.
    """
    named = _backend_from_environment()
    if named is None:
        return explain_default_backend()
    return named, f"from ${ENV_VAR}; without it, {_default_or_why_not()}"


def _backend_from_environment() -> str | None:
    """``$AGGREGATOR_BACKEND``, checked by importing it; ``None`` when unset or empty."""
    named = os.environ.get(ENV_VAR)
    if not named:
        return None
    try:
        load_backend(named)
    except BackendNotFoundError as exc:
        installed = backend_names()
        if named in installed:
            raise BackendNotFoundError(
                f"{ENV_VAR}={named!r} names a backend that cannot be used: {exc}"
            ) from exc
        raise BackendNotFoundError(
            f"{ENV_VAR}={named!r} names no installed backend; installed: {', '.join(installed) or 'none'}; "
            f"unset it to use the default, set it to one of those, or install the package that "
            f"registers {named!r} in the {ENTRY_POINT_GROUP!r} entry-point group"
        ) from None
    return named


def _default_or_why_not() -> str:
    """:func:`default_backend`, or why there is none (for a reason text, which must not raise)."""
    try:
        return default_backend()
    except BackendNotFoundError as exc:
        return f"none: {exc}"


def create(
    merge: Merge[V],
    *,
    backend: str | None = None,
    flush_interval: float | None = 1.0,
    max_pending: int = 1024,
    shards: int | None = None,
    max_buffered: int | None = None,
    max_block: float = 1.0,
    flush_at: int | None = None,
) -> Aggregator[Any, V]:
    """Create an aggregator that combines values per key with ``merge(stored, incoming)``.

    ``backend=None`` means ``$AGGREGATOR_BACKEND`` if set, else :func:`default_backend`.
    ``flush_interval=None`` turns the periodic flusher off (call ``flush()``).
    ``max_buffered`` bounds the records buffered: an ``add()`` of a new key at the
    bound waits up to ``max_block`` seconds for a flush to make room, then raises
    ``BufferFullError``. ``flush_at`` flushes early once that many records are
    buffered. These three are passed to the backend only when set (BUF-1 … BUF-3).

    Raises:
        TypeError, ValueError: an argument is invalid (the message names it).
        BackendNotFoundError: the backend is not installed or fails to import (the
            message lists those that are, and names ``$AGGREGATOR_BACKEND`` when the
            name came from it).
    """
    if backend is None:
        backend = _backend_from_environment() or default_backend()
    cls = load_backend(backend)
    bounds: dict[str, Any] = {}  # only when set: a backend not built on the engine may lack them
    if max_buffered is not None:
        bounds["max_buffered"] = max_buffered
    if max_block != 1.0 or type(max_block) is not float:
        bounds["max_block"] = max_block
    if flush_at is not None:
        bounds["flush_at"] = flush_at
    aggregator: Aggregator[Any, V] = cls(
        merge, flush_interval=flush_interval, max_pending=max_pending, shards=shards, **bounds
    )
    return aggregator
