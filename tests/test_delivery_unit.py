"""``Retry``, the back-off of a delivery (SINK-2): its validation and the waits it gives."""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from typing import Any

import pytest

import aggregator_reference as ar

BAD_FIELDS: list[tuple[str, Any, type[Exception]]] = [
    ("first", "0.1", TypeError),
    ("first", None, TypeError),
    ("first", True, TypeError),
    ("maximum", False, TypeError),
    ("maximum", [30], TypeError),
    ("factor", True, TypeError),
    ("factor", "2", TypeError),
    ("first", math.nan, ValueError),
    ("first", math.inf, ValueError),
    ("maximum", math.inf, ValueError),
    ("maximum", math.nan, ValueError),
    ("factor", math.inf, ValueError),
    ("factor", -math.inf, ValueError),
    ("first", 0, ValueError),
    ("first", 0.0, ValueError),
    ("first", -1, ValueError),
    ("factor", 0.5, ValueError),
    ("factor", 0, ValueError),
]


@pytest.mark.parametrize(("field", "value", "error"), BAD_FIELDS)
def test_a_bad_field_raises_naming_it(field: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"Retry.{field}"):
        ar.Retry(**{field: value})


def test_maximum_below_first_raises_naming_maximum() -> None:
    with pytest.raises(ValueError, match=r"Retry\.maximum"):
        ar.Retry(first=2, maximum=1)
    with pytest.raises(ValueError, match=r"Retry\.maximum"):
        ar.Retry(maximum=0.05)  # below the default first, 0.1


@pytest.mark.parametrize("field", ["first", "maximum"])
def test_a_number_too_big_for_a_float_raises_a_value_error_naming_it(field: str) -> None:
    # Finite, but no wait can last that long: refused like any other bad value, not with OverflowError.
    with pytest.raises(ValueError, match=f"Retry.{field}"):
        ar.Retry(**{"first": 1, "maximum": 1, field: 10**400})


def test_every_retry_that_constructs_gives_waits_a_thread_can_wait() -> None:
    # The delivery waits with threading.Event().wait(delay), which raises OverflowError past
    # threading.TIMEOUT_MAX: that would end the delivery on a failed write instead of retrying it.
    try:
        retry = ar.Retry(first=1e12, maximum=1e12)
    except ValueError:
        return  # refused at construction, as max_block and flush_interval are (ARG-1)
    assert retry.delay(1) <= threading.TIMEOUT_MAX


def test_the_boundary_values_are_accepted_and_the_record_is_frozen() -> None:
    retry = ar.Retry(first=1, maximum=1, factor=1)
    assert (retry.first, retry.maximum, retry.factor) == (1, 1, 1)
    assert ar.Retry() == ar.Retry(first=0.1, maximum=30.0, factor=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.first = 2  # type: ignore[misc]


RETRIES = [
    ar.Retry(),
    ar.Retry(first=0.001, maximum=0.005),
    ar.Retry(first=1, maximum=1000, factor=10),
    ar.Retry(first=0.5, maximum=0.5, factor=3),
    ar.Retry(first=0.2, maximum=60, factor=1),
    ar.Retry(first=0.01, maximum=1e9, factor=1.5),
]


@pytest.mark.parametrize("retry", RETRIES, ids=repr)
@pytest.mark.parametrize("failures", [1, 2, 3, 5, 10, 20, 40, 60])
def test_the_nth_wait_lies_between_half_and_all_of_its_ceiling(retry: ar.Retry, failures: int) -> None:
    ceiling = min(retry.maximum, retry.first * retry.factor ** (failures - 1))
    waits = [retry.delay(failures) for _ in range(200)]
    assert all(ceiling / 2 <= wait <= ceiling for wait in waits), (ceiling, min(waits), max(waits))
    # Jitter: 200 draws all in one half of the range would be a chance of 2 ** -200.
    assert min(waits) < 0.75 * ceiling < max(waits), "the waits are not spread (no jitter?)"


def ceiling_of(retry: ar.Retry, failures: int) -> float:
    """``min(maximum, first * factor ** (failures - 1))``, computed without overflowing."""
    if retry.factor > 1 and (failures - 1) * math.log(retry.factor) >= math.log(retry.maximum / retry.first):
        return retry.maximum
    return min(retry.maximum, retry.first * retry.factor ** (failures - 1))


@pytest.mark.parametrize("retry", RETRIES, ids=repr)
@pytest.mark.parametrize("failures", [1024, 1025, 10**6, sys.maxsize, 10**100])
def test_a_huge_count_of_failures_waits_at_most_maximum(retry: ar.Retry, failures: int) -> None:
    ceiling = ceiling_of(retry, failures)
    assert ceiling == (retry.maximum if retry.factor > 1 else retry.first)
    for _ in range(50):
        wait = retry.delay(failures)  # no OverflowError, however large factor ** failures would be
        assert ceiling / 2 <= wait <= ceiling


@pytest.mark.parametrize("failures", [2000, 10**4, 10**6])
def test_a_factor_close_to_one_still_grows_to_maximum(failures: int) -> None:
    # 1.001 ** 1023 is about 2.8: the waits reach maximum only after some 5,700 failures in a row.
    retry = ar.Retry(first=0.1, maximum=30, factor=1.001)
    ceiling = ceiling_of(retry, failures)
    waits = [retry.delay(failures) for _ in range(50)]
    assert all(ceiling / 2 <= wait <= ceiling for wait in waits), (ceiling, min(waits), max(waits))


def test_the_first_wait_starts_at_first_and_grows_by_factor() -> None:
    retry = ar.Retry(first=1, maximum=100, factor=2)
    assert 0.5 <= retry.delay(1) <= 1
    assert 2 <= retry.delay(3) <= 4
    assert 50 <= retry.delay(8) <= 100  # 2 ** 7 = 128, capped at maximum
