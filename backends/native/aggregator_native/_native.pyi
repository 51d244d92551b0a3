"""Types of the compiled part (``_native.c``)."""

import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, NoReturn, TypeVar

K = TypeVar("K")
V = TypeVar("V")

FREE_THREADED: Final[int]

class Stamps:
    """First-add stamps of a buffer's records, 8 bytes each: a sequence of ints."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> int: ...
    def append(self, stamp: int, /) -> None: ...

class Buffer(Generic[K, V]):
    """One thread's records; the attributes of ``aggregator_freethreaded``'s ``Buffer``."""

    state: tuple[dict[K, V], Stamps]
    stranded: list[tuple[dict[K, V], Stamps]]
    busy: bool
    allowed: int
    merges: int
    stored: int
    @property
    def locked(self) -> bool: ...
    @property
    def alive(self) -> bool: ...
    @property
    def lock(self) -> threading.Lock: ...
    def __init__(self, allowed: int) -> None: ...
    @staticmethod
    def new_state() -> tuple[dict[Any, Any], Stamps]: ...

class Core(Generic[K, V]):
    """One storage's add, and the state it reads."""

    buffer: Buffer[K, V]
    buffers: tuple[Buffer[K, V], ...]
    home: dict[K, V]
    gathers: int
    closed: bool
    def __init__(
        self,
        merge: Callable[[V, V], V],
        register: Callable[[], Buffer[K, V]],
        from_home: Callable[[Any, K, V], bool],
        refuse_reentrant: Callable[[str], NoReturn],
        refuse_closed: Callable[[str], NoReturn],
        clock: Callable[[], int],
    ) -> None: ...
    def add(self, key: K, value: V, /) -> bool: ...
    def add_many(self, pairs: Iterable[tuple[K, V]], /) -> int: ...
