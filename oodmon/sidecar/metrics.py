"""The sidecar's own metric families and refusal reasons (besides :data:`oodmon.metrics.METRICS`).

Metric names and label values are API: they live here, in one place, so that the routing,
the scoring and the ASGI application count with the same series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from oodmon.events import EVENT_REASONS

__all__ = ["REJECT_REASONS", "SIDECAR_METRICS", "SidecarCounters"]

#: Why an event or request is refused (a closed set: these are metric labels).
REJECT_REASONS: tuple[str, ...] = (
    *EVENT_REASONS,
    "bad_payload",  # not an OIP / KServe v1 payload, a malformed tensor, or no such output
    "unknown_model",  # no detector for the event's model
    "wrong_shape",  # outputs that are not [N, K]
    "wrong_width",  # outputs whose K differs from the detector's
    "nonfinite",  # rows with NaN/inf outputs (scored as invalid; the rest are answered)
    "too_large",  # body over the size limit
    "not_found",  # a path the sidecar does not serve
    "method_not_allowed",
    "internal",  # a failure inside the sidecar (logged)
)

#: The sidecar's own metric families (besides :data:`oodmon.metrics.METRICS`).
SIDECAR_METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "oodmon_sidecar_events_total",
        "counter",
        ("type",),
        "Inference CloudEvents received and decoded, by kind (request, response).",
    ),
    (
        "oodmon_sidecar_rejected_total",
        "counter",
        ("reason",),
        "Requests answered with a 4xx/5xx error, by reason.",
    ),
    (
        "oodmon_sidecar_join_evicted_total",
        "counter",
        ("kind", "reason"),
        "Held requests (kind=request) or flagged responses waiting for their request "
        "(kind=response) evicted from the join buffer (reason full or expired).",
    ),
    (
        "oodmon_sidecar_join_entries",
        "gauge",
        (),
        "Entries held in the request/response join buffer.",
    ),
    (
        "oodmon_sidecar_forwarded_total",
        "counter",
        ("outcome",),
        "Verdict events forwarded to --reply-url (outcome ok, failed, dropped).",
    ),
)


class SidecarCounters:
    """The :data:`SIDECAR_METRICS` families on one registry, every series at 0 from the start.

    Args:
        registry: where to register them (the sidecar's own registry).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(*_spec("oodmon_sidecar_events_total", registry))
        self.rejected = Counter(*_spec("oodmon_sidecar_rejected_total", registry))
        self.evicted = Counter(*_spec("oodmon_sidecar_join_evicted_total", registry))
        self.join_entries = Gauge(*_spec("oodmon_sidecar_join_entries", registry))
        self.forwarded = Counter(*_spec("oodmon_sidecar_forwarded_total", registry))
        for reason in REJECT_REASONS:  # every series exists at 0 from the first scrape
            self.rejected.labels(reason)
        for kind in ("request", "response"):
            self.events.labels(kind)
            for why in ("full", "expired"):
                self.evicted.labels(kind, why)
        for outcome in ("ok", "failed", "dropped"):
            self.forwarded.labels(outcome)


def _spec(name: str, registry: CollectorRegistry) -> tuple[Any, ...]:
    for family, _, labels, help_text in SIDECAR_METRICS:
        if family == name:
            metric = family.removesuffix("_total")
            return metric, help_text, labels, "", "", "", registry
    raise KeyError(name)
