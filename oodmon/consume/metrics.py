"""The consumer's own metric families (beside the Monitor's), on one registry per member.

Metric names and labels are API: :data:`CONSUMER_METRICS` lists them, the README's table is
generated from it, and :class:`ConsumerMetrics` registers them with every series present.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge

from oodmon.consume.decode import REJECT_REASONS
from oodmon.metrics import MetricSpec, PrometheusMetrics

__all__ = ["CONSUMER_METRICS", "ConsumerMetrics", "consumer_metrics_table"]

#: The consumer's own metric families, beside the Monitor's (:data:`oodmon.metrics.METRICS`).
CONSUMER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "oodmon_consumer_messages_total", "counter", ("topic",),
        "Kafka messages this consumer read (scored, held as requests, or rejected).",
    ),
    MetricSpec(
        "oodmon_consumer_rejected_total", "counter", ("reason",),
        "Messages skipped and committed because they could not be scored; reason is one of "
        "not_json, missing_headers, bad_event, unknown_type, bad_payload, wrong_shape, "
        "unknown_model, too_many_models.",
    ),
    MetricSpec(
        "oodmon_consumer_dead_letters_total", "counter", (),
        "Rejected messages delivered to the dead-letter topic.",
    ),
    MetricSpec(
        "oodmon_consumer_join_evicted_total", "counter", (),
        "Requests dropped from the join buffer before their response came (their responses "
        "are scored without inputs).",
    ),
    MetricSpec(
        "oodmon_consumer_commits_total", "counter", (),
        "Batches whose offsets were committed (after scoring, metrics and the label queue).",
    ),
    MetricSpec(
        "oodmon_consumer_lag", "gauge", ("topic", "partition"),
        "Messages between this consumer's position and the end of each partition it owns.",
    ),
)  # fmt: skip


def consumer_metrics_table() -> str:
    """The README's Markdown table of the consumer's own metric families."""
    lines = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for spec in CONSUMER_METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        lines.append(f"| `{spec.name}` | {spec.type} | {labels} | {spec.help} |")
    return "\n".join(lines) + "\n"


class ConsumerMetrics:
    """Every family one consumer exports, on its own registry (one ``/metrics`` per member).

    Args:
        registry: where to register; a fresh ``CollectorRegistry()`` by default, so that
            several consumers in one process (tests) stay apart.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.monitor = PrometheusMetrics(self.registry)
        specs = {spec.name: spec for spec in CONSUMER_METRICS}

        def counter(name: str) -> Counter:
            spec = specs[name]
            return Counter(spec.name, spec.help, spec.labels, registry=self.registry)

        self.messages = counter("oodmon_consumer_messages_total")
        self.rejected = counter("oodmon_consumer_rejected_total")
        self.dead_letters = counter("oodmon_consumer_dead_letters_total")
        self.join_evicted = counter("oodmon_consumer_join_evicted_total")
        self.commits = counter("oodmon_consumer_commits_total")
        lag = specs["oodmon_consumer_lag"]
        self.lag = Gauge(lag.name, lag.help, lag.labels, registry=self.registry)
        for reason in REJECT_REASONS:  # every reason at 0, so rate() sees the first one
            self.rejected.labels(reason)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """Record the lag of one owned partition."""
        self.lag.labels(topic, str(partition)).set(lag)

    def forget_partition(self, topic: str, partition: int) -> None:
        """A partition moved to another member: its lag is that member's to report now."""
        with contextlib.suppress(KeyError):
            self.lag.remove(topic, str(partition))
