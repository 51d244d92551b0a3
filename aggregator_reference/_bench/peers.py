"""The keyed aggregation users would otherwise reach for, measured by ``bench --peers`` where installed.

Each peer is a factory ``peer(keys) -> body``; ``body(sequence)`` adds 1 for
every key in ``sequence`` to one instrument shared by all writer threads.
Labels or attributes are built once per key beforehand, as a careful user would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["available_peers"]

Body = Callable[[list[int]], None]


def _otel(keys: int) -> Body:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    add = provider.get_meter("aggregator-bench").create_counter("requests").add
    attributes = [{"key": key} for key in range(keys)]

    def body(sequence: list[int]) -> None:
        for key in sequence:
            add(1, attributes[key])

    return body


def _datadog(keys: int) -> Body:
    from datadog.dogstatsd.base import DogStatsd

    # Client-side aggregation on; the flushed packets go to the discard port of this host.
    statsd: Any = DogStatsd(
        host="127.0.0.1", port=9, disable_aggregation=False, disable_telemetry=True, flush_interval=0.3
    )
    increment = statsd.increment
    tags = [[f"key:{key}"] for key in range(keys)]

    def body(sequence: list[int]) -> None:
        for key in sequence:
            increment("requests", 1, tags=tags[key])

    return body


def _prometheus(keys: int) -> Body:
    from prometheus_client import CollectorRegistry, Counter

    counter = Counter("requests", "bench", ["key"], registry=CollectorRegistry())
    labels = [str(key) for key in range(keys)]

    def body(sequence: list[int]) -> None:
        for key in sequence:
            counter.labels(labels[key]).inc(1)

    return body


PEERS: dict[str, tuple[str, Callable[[int], Body]]] = {
    "otel-counter": ("opentelemetry.sdk.metrics", _otel),
    "datadog-statsd": ("datadog.dogstatsd.base", _datadog),
    "prometheus": ("prometheus_client", _prometheus),
}


def available_peers() -> tuple[dict[str, Callable[[int], Body]], dict[str, str]]:
    """``(installed peers by name, {missing peer: why})``."""
    import importlib.util

    found: dict[str, Callable[[int], Body]] = {}
    missing: dict[str, str] = {}
    for name, (module, factory) in PEERS.items():
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            found[name] = factory
        else:
            missing[name] = f"{module.split('.')[0]} is not installed"
    return found, missing
