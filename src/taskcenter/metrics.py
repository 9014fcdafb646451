"""Prometheus metrics of one process (owned by the runtime; no module-level registry)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """Counters and histograms the dispatcher and the API update; ``render()`` gives the text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.attempts = Counter(
            "taskcenter_attempts", "Attempts made, by outcome.", ["outcome"], registry=self.registry
        )
        self.attempt_seconds = Histogram(
            "taskcenter_attempt_duration_seconds",
            "Duration of attempts (request sent to response read).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.finished = Counter(
            "taskcenter_tasks_finished",
            "Tasks reaching a final state, by status.",
            ["status"],
            registry=self.registry,
        )
        self.claimed = Counter(
            "taskcenter_tasks_claimed", "Tasks claimed by this process.", registry=self.registry
        )
        self.created = Counter(
            "taskcenter_tasks_created", "Tasks created through this process.", registry=self.registry
        )
        self.in_flight = Gauge(
            "taskcenter_in_flight", "Attempts in flight in this process.", registry=self.registry
        )
        self.events_dropped = Counter(
            "taskcenter_events_dropped",
            "Lifecycle events dropped because their handlers could not keep up, by event.",
            ["event"],
            registry=self.registry,
        )
        self.queue = Gauge(
            "taskcenter_tasks",
            "Tasks in the database by status (read at scrape time).",
            ["status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(Collector):
    """A registry's families without prometheus-client's ``*_created`` series (each counter's and histogram's
    creation time, per label set): nothing reads them here, and they doubled the page. Filtered here rather than
    with ``prometheus_client.disable_created_metrics()``, a process-wide switch that would change the metrics of
    an application embedding taskcenter as a library too."""

    _TYPES = frozenset({"counter", "histogram", "summary"})

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.type in self._TYPES:
                created = family.name + "_created"
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = [s for s in family.samples if s.name != created]
                family = kept
            yield family
