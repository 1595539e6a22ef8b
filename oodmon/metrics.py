"""Prometheus metrics for a Monitor, and the ways to expose them.

:class:`PrometheusMetrics` is a :class:`~oodmon.sinks.MetricsSink` built on
``prometheus_client``: hand it to ``Monitor(metrics=...)`` and every observed batch updates
counters of traffic, flags and invalid outputs, histograms of the distance to the OCS, of the
conformal p-values and of the scoring time, and gauges describing the calibrated detector.
:data:`METRICS` lists every family (name, type, labels, meaning); the README's table is made
from it.

Exposition: :func:`serve` starts a small HTTP server on 127.0.0.1 (another address is an
explicit choice); :func:`make_wsgi_app` and :func:`make_asgi_app` embed ``/metrics`` in an
existing server. All three pick client_python's multiprocess collector when
``PROMETHEUS_MULTIPROC_DIR`` is set, so several gunicorn/uvicorn workers add up to one view;
:func:`prepare_multiprocess_dir` and :func:`child_exit` are the gunicorn hooks that mode needs
(see ``grafana/examples/gunicorn.conf.py``).

Labels: ``model`` and ``model_version`` on every family (keep them to a small fixed set: one
series per value), ``reason`` on flags (the detector's score name) and on invalid outputs
(one of :data:`~oodmon.verdict.INVALID_REASONS`, or ``"other"``) and on label-queue losses
(one of :data:`~oodmon.sinks.QUEUE_LOSS_REASONS`, or ``"other"``), ``kind`` on monitor errors
(an exception class name). Nothing per request or per input ever becomes a label.
"""

from __future__ import annotations

import errno
import glob
import itertools
import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import prometheus_client
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.registry import Collector

from oodmon._batch_histogram import BatchHistogram, multiprocess_enabled
from oodmon.conformal import p_value_of_rank, score_cutoffs
from oodmon.scores import SCORES
from oodmon.sinks import QUEUE_LOSS_REASONS, DetectorSummary
from oodmon.verdict import INVALID_REASONS, HostVerdict, Observation

logger = logging.getLogger("oodmon")

#: Upper bounds of ``oodmon_ocs_distance`` buckets. For cross-entropy the distance is
#: KL(p || pi) in nats, at most ``log(1 / min_k pi_k)``: log 10 = 2.30 for 10 balanced classes,
#: log 1000 = 6.91 for 1000, and 13.8 for a class at the default OCS floor of 1e-6. The bounds
#: are fine near 0 (where OOD outputs land: at the OCS the distance is 0), 0.25 nats apart up
#: to 2.5 (ImageNet-scale models sit above; the paper's CIFAR-10 model moves from 2.15 on clean
#: to 1.45 nats on corrupted data), coarser up to 7 nats, and 10 and 14 for imbalanced priors.
#: They are fixed, not derived from the detector, because one family serves every model and
#: version in a process, and ``sum by (le)`` across replicas needs identical bounds everywhere.
#: Regression heads (MSE distance, in squared output units) should pass ``distance_buckets``.
DEFAULT_DISTANCE_BUCKETS: tuple[float, ...] = (
    0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 10.0, 14.0,
)  # fmt: skip

#: Upper bounds of ``oodmon_p_value`` buckets: fine around the usual alphas (0.001 to 0.1),
#: then deciles, so that the uniform shape expected on in-distribution traffic is visible.
DEFAULT_P_VALUE_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip

#: Upper bounds of ``oodmon_scoring_seconds`` buckets: scoring a batch takes 0.1 ms to seconds.
DEFAULT_SCORING_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

#: ``reason`` on ``oodmon_flagged_total`` when a batch arrives for a model that was never
#: described (the sink used without a Monitor).
_UNKNOWN_SCORE = "unknown"
#: ``reason`` on ``oodmon_invalid_outputs_total`` for a reason outside ``INVALID_REASONS``.
_OTHER_REASON = "other"

_MODEL_LABELS = ("model", "model_version")


@dataclass(frozen=True)
class MetricSpec:
    """One metric family as scraped.

    Attributes:
        name: the name in the exposition (counters end in ``_total``; a histogram's samples
            add ``_bucket``, ``_sum`` and ``_count``).
        type: ``"counter"``, ``"gauge"`` or ``"histogram"``.
        labels: label names.
        help: meaning, also the HELP line.
        multiprocess_mode: how client_python merges a gauge across worker processes.
    """

    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    multiprocess_mode: str | None = None


#: Every metric family the exporter defines. Names are API: change them only with a
#: CHANGELOG entry.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "oodmon_predictions_total", "counter", _MODEL_LABELS,
        "Model outputs (rows) the monitor observed, valid or not.",
    ),
    MetricSpec(
        "oodmon_flagged_total", "counter", (*_MODEL_LABELS, "reason"),
        "Rows flagged as out-of-distribution (conformal p-value <= alpha); reason is the "
        "detector's score name.",
    ),
    MetricSpec(
        "oodmon_invalid_outputs_total", "counter", (*_MODEL_LABELS, "reason"),
        "Rows that could not be scored (nonfinite, wrong_width, wrong_shape, wrong_dtype, "
        "wrong_layout, other).",
    ),
    MetricSpec(
        "oodmon_monitor_errors_total", "counter", (*_MODEL_LABELS, "kind"),
        "Monitoring failures (inference went on); kind is the exception class name, or "
        "OutputKindMismatch for batches that look like another kind of output than the "
        "detector expects.",
    ),
    MetricSpec(
        "oodmon_monitor_skipped_total", "counter", _MODEL_LABELS,
        "Rows never scored because the monitor's background backlog was full (inference went "
        "on; the monitor could not keep up).",
    ),
    MetricSpec(
        "oodmon_label_queue_dropped_total", "counter", (*_MODEL_LABELS, "reason"),
        "Flagged rows that never reached the label queue's store; reason: buffer_full, "
        "closed (writer closed or process exiting), store_error (the store failed until the "
        "close deadline), rejected (the store can never accept the row).",
    ),
    MetricSpec(
        "oodmon_ocs_distance", "histogram", _MODEL_LABELS,
        "Distance of valid rows' outputs to the optimal constant solution (nats of KL for "
        "cross-entropy heads); small = close to the OCS = more OOD.",
    ),
    MetricSpec(
        "oodmon_p_value", "histogram", _MODEL_LABELS,
        "Conformal p-values of valid rows against the in-distribution calibration set; "
        "uniform on in-distribution traffic; its count is the number of scored rows.",
    ),
    MetricSpec(
        "oodmon_scoring_seconds", "histogram", _MODEL_LABELS,
        "Wall time the monitor spent scoring one batch.",
    ),
    MetricSpec(
        "oodmon_alpha_ratio", "gauge", _MODEL_LABELS,
        "Calibrated target false-alarm rate (the detector's alpha).",
        multiprocess_mode="livemostrecent",
    ),
    MetricSpec(
        "oodmon_score_threshold", "gauge", _MODEL_LABELS,
        "Calibrated score threshold: rows scoring above it are flagged.",
        multiprocess_mode="livemostrecent",
    ),
    MetricSpec(
        "oodmon_detector_info", "gauge",
        (*_MODEL_LABELS, "score", "loss", "calibration_size", "calibration_hash"),
        "1 for the detector (score, loss, calibration) a live monitor uses.",
        multiprocess_mode="livemax",
    ),
    MetricSpec(
        "oodmon_label_queue_depth", "gauge", _MODEL_LABELS,
        "Items waiting in the label queue, as last seen.",
        multiprocess_mode="livemostrecent",
    ),
)  # fmt: skip

#: The exposed name of every family, for checks that dashboards and rules use real metrics.
METRIC_NAMES: tuple[str, ...] = tuple(spec.name for spec in METRICS)

_SPECS = {spec.name: spec for spec in METRICS}


def metrics_table() -> str:
    """The README's Markdown table of every metric (name, type, labels, meaning)."""
    lines = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels)
        lines.append(f"| `{spec.name}` | {spec.type} | {labels} | {spec.help} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the sink


@dataclass
class _Series:
    """The label-bound children of one (model, model_version), so a batch skips ``labels()``."""

    predictions: Any
    flagged: Any
    invalid: dict[str, Any]
    dropped: dict[str, Any]
    skipped: Any
    distance: BatchHistogram
    p_value: BatchHistogram
    scoring: Any
    queue_depth: Any = None  # created on the first queue report: no queue, no depth series
    # With an OCS score (distance == -score), p <= bound_i  <=>  distance < p_cutoffs[i]:
    # the p-value buckets are counted from the same sort as the distance buckets.
    p_cutoffs: np.ndarray | None = None
    p_always: np.ndarray | None = None
    # Any other score: the p-value and the p-value bucket of each calibration rank 0..n, so
    # the p-value buckets are counted from the verdict's integer ranks (a bincount, no sort).
    p_of_rank: np.ndarray | None = None
    p_bucket_of_rank: np.ndarray | None = None


def _check_buckets(
    name: str, buckets: Sequence[float] | None, default: Sequence[float]
) -> list[float]:
    if buckets is None:
        return list(default)
    values = [float(b) for b in buckets]
    increasing = all(a < b for a, b in itertools.pairwise(values))
    if not values or not increasing or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"Expected `{name}` to be a non-empty, strictly increasing sequence of finite "
            f"numbers (+Inf is added), but got {buckets!r}."
        )
    return values


class PrometheusMetrics:
    """A MetricsSink that exports a Monitor's batches as Prometheus metrics.

    One instance registers every family in :data:`METRICS` once, and can serve any number of
    Monitors (they differ by ``model`` / ``model_version``). Updating the metrics for a batch
    is a fixed number of Python calls whatever the batch size: counters take one ``inc`` each
    and histograms are filled with NumPy (see :mod:`oodmon._batch_histogram`).

    Only valid rows with a finite value enter the distance and p-value histograms, so
    ``oodmon_p_value_count`` counts the scored rows, the denominator of the flag ratio.

    Works unchanged in client_python's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set
    before the process imports prometheus_client): every gauge has a ``multiprocess_mode``
    (alpha, threshold and queue depth: the most recent value of a live worker; detector info:
    1 if any live worker uses that detector), and no custom collector is involved.

    Args:
        registry: where to register the families; None means prometheus_client's default
            ``REGISTRY``. Tests pass a fresh ``CollectorRegistry()``.
        distance_buckets: upper bounds for ``oodmon_ocs_distance`` (default
            :data:`DEFAULT_DISTANCE_BUCKETS`, made for KL in nats).
        p_value_buckets: upper bounds for ``oodmon_p_value``.
        scoring_seconds_buckets: upper bounds for ``oodmon_scoring_seconds``.

    Raises:
        ValueError: bucket bounds that are not strictly increasing finite numbers.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        distance_buckets: Sequence[float] | None = None,
        p_value_buckets: Sequence[float] | None = None,
        scoring_seconds_buckets: Sequence[float] | None = None,
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        self.distance_buckets = _check_buckets(
            "distance_buckets", distance_buckets, DEFAULT_DISTANCE_BUCKETS
        )
        self.p_value_buckets = _check_buckets(
            "p_value_buckets", p_value_buckets, DEFAULT_P_VALUE_BUCKETS
        )
        self.scoring_seconds_buckets = _check_buckets(
            "scoring_seconds_buckets", scoring_seconds_buckets, DEFAULT_SCORING_SECONDS_BUCKETS
        )
        buckets = {
            "oodmon_ocs_distance": self.distance_buckets,
            "oodmon_p_value": self.p_value_buckets,
            "oodmon_scoring_seconds": self.scoring_seconds_buckets,
        }
        families: dict[str, Any] = {}
        for spec in METRICS:
            common: dict[str, Any] = {"labelnames": spec.labels, "registry": self.registry}
            if spec.type == "counter":
                families[spec.name] = Counter(spec.name, spec.help, **common)
            elif spec.type == "histogram":
                kind = Histogram if spec.name == "oodmon_scoring_seconds" else BatchHistogram
                families[spec.name] = kind(
                    spec.name, spec.help, buckets=buckets[spec.name], **common
                )
            else:
                common["multiprocess_mode"] = spec.multiprocess_mode
                families[spec.name] = Gauge(spec.name, spec.help, **common)
        self._predictions: Counter = families["oodmon_predictions_total"]
        self._flagged: Counter = families["oodmon_flagged_total"]
        self._invalid: Counter = families["oodmon_invalid_outputs_total"]
        self._errors: Counter = families["oodmon_monitor_errors_total"]
        self._dropped: Counter = families["oodmon_label_queue_dropped_total"]
        self._skipped: Counter = families["oodmon_monitor_skipped_total"]
        self._distance: BatchHistogram = families["oodmon_ocs_distance"]
        self._p_value: BatchHistogram = families["oodmon_p_value"]
        self._scoring: Histogram = families["oodmon_scoring_seconds"]
        self._alpha: Gauge = families["oodmon_alpha_ratio"]
        self._threshold: Gauge = families["oodmon_score_threshold"]
        self._info: Gauge = families["oodmon_detector_info"]
        self._queue_depth: Gauge = families["oodmon_label_queue_depth"]

        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        self._info_labels: dict[tuple[str, str], tuple[str, ...]] = {}

    # ------------------------------------------------------------------ MetricsSink

    def describe(self, summary: DetectorSummary) -> None:
        """Publish the detector's alpha, threshold and identity, and create its series at 0.

        Creating every bounded series up front (flags, each invalid reason, queue drops,
        histograms) means ``rate()`` and the alerts see the first increment, not only later ones.
        """
        if not isinstance(summary, DetectorSummary):
            raise ValueError(
                "Expected `summary` to be an oodmon.sinks.DetectorSummary, but got "
                f"{type(summary).__name__}."
            )
        key = (summary.model, summary.version)
        info = (
            *key,
            summary.score,
            summary.loss,
            str(summary.calibration_size),
            summary.calibration_hash,
        )
        series = self._build_series(*key, reason=summary.score)
        spec = SCORES.get(summary.score)
        if (
            spec is not None
            and spec.negated_distance  # distance == -score exactly: one sort serves both
            and summary.calibration_scores is not None
            and series.p_value.batched
            and series.distance.batched
        ):
            cutoffs = np.asarray(
                score_cutoffs(summary.calibration_scores, series.p_value.bounds.tolist())
            )
            series.p_cutoffs = -cutoffs  # score > c  <=>  distance < -c
            series.p_always = cutoffs == -np.inf
        elif summary.calibration_size > 0 and series.p_value.batched:
            # p <= bound_i  <=>  p lands in bucket i or below; the p-values are those of
            # conformal.ranked_p_values bit for bit, so the lookup is exact
            series.p_of_rank = p_value_of_rank(summary.calibration_size)
            series.p_bucket_of_rank = np.searchsorted(
                series.p_value.bounds, series.p_of_rank, side="left"
            )
        with self._lock:
            self._series[key] = series
            previous = self._info_labels.get(key)
            if previous is not None and previous != info:
                # A recalibrated detector replaces the old identity. Multiprocess mode cannot
                # remove label sets, so the old one drops to 0 there.
                if multiprocess_enabled():
                    self._info.labels(*previous).set(0)
                else:
                    self._info.remove(*previous)
            self._info_labels[key] = info
        self._alpha.labels(*key).set(summary.alpha)
        self._threshold.labels(*key).set(summary.threshold)
        self._info.labels(*info).set(1)

    def record(self, observation: Observation) -> None:
        """Count one observed batch; constant Python work plus vectorised NumPy."""
        series = self._series_for(observation.model, observation.version)
        verdict = observation.verdict
        series.predictions.inc(len(verdict))
        flagged = int(np.count_nonzero(verdict.flag))
        if flagged:
            series.flagged.inc(flagged)
        for reason, count in observation.invalid_reasons.items():
            if count:
                self._invalid_child(series, observation, reason).inc(count)
        invalid = np.asarray(verdict.invalid, dtype=bool)
        any_invalid = bool(invalid.any())
        if series.p_cutoffs is not None:
            _observe_with_one_sort(series, verdict.distance, verdict.p_value, invalid, any_invalid)
        else:
            _observe_valid(series.distance, verdict.distance, invalid, any_invalid)
            if not _observe_ranks(series, verdict, invalid, any_invalid):
                _observe_valid(series.p_value, verdict.p_value, invalid, any_invalid)
        series.scoring.observe(observation.scoring_seconds)

    def record_error(self, model: str, version: str, kind: str) -> None:
        """Count one monitoring failure of exception class ``kind``."""
        self._errors.labels(model, version, kind).inc()

    def record_skipped(self, model: str, version: str, rows: int) -> None:
        """Count rows the monitor could not score because its backlog was full."""
        self._series_for(model, version).skipped.inc(rows)

    def record_queue(
        self,
        model: str,
        version: str,
        depth: int | None,
        dropped: int,
        reason: str = "buffer_full",
    ) -> None:
        """Set the label-queue depth (if known) and count lost rows under ``reason``."""
        series = self._series_for(model, version)
        if depth is not None:
            if series.queue_depth is None:
                series.queue_depth = self._queue_depth.labels(model, version)
            series.queue_depth.set(depth)
        if dropped:
            child = series.dropped.get(reason)
            if child is None:  # keep the label bounded whatever the caller sends
                child = self._dropped.labels(model, version, _OTHER_REASON)
            child.inc(dropped)

    # ------------------------------------------------------------------ internals

    def _series_for(self, model: str, version: str) -> _Series:
        series = self._series.get((model, version))
        if series is None:
            with self._lock:
                series = self._series.get((model, version))
                if series is None:
                    series = self._build_series(model, version, reason=_UNKNOWN_SCORE)
                    self._series[(model, version)] = series
        return series

    def _build_series(self, model: str, version: str, reason: str) -> _Series:
        key = (model, version)
        series = _Series(
            predictions=self._predictions.labels(*key),
            flagged=self._flagged.labels(*key, reason),
            invalid={r: self._invalid.labels(*key, r) for r in INVALID_REASONS},
            dropped={r: self._dropped.labels(*key, r) for r in QUEUE_LOSS_REASONS},
            skipped=self._skipped.labels(*key),
            distance=self._distance.labels(*key),
            p_value=self._p_value.labels(*key),
            scoring=self._scoring.labels(*key),
        )
        return series

    def _invalid_child(self, series: _Series, observation: Observation, reason: str) -> Any:
        child = series.invalid.get(reason)
        if child is None:  # keep the label bounded whatever the Monitor sends
            child = self._invalid.labels(observation.model, observation.version, _OTHER_REASON)
        return child

    def __repr__(self) -> str:
        return f"PrometheusMetrics(models={sorted(self._series)})"


def _observe_with_one_sort(
    series: _Series,
    distance: np.ndarray,
    p_value: np.ndarray,
    invalid: np.ndarray,
    any_invalid: bool,
) -> None:
    """Fill both histograms from one sort of the valid rows' distances (OCS scores only).

    The p-value buckets come from :func:`oodmon.conformal.score_cutoffs`, exactly: a valid
    row's p-value is at most ``bound_i`` iff its distance is below ``p_cutoffs[i]``. Infinite
    distances (valid rows whose score was clamped) count for p-values but, as in
    :func:`_observe_valid`, not in the distance histogram.
    """
    assert series.p_cutoffs is not None and series.p_always is not None
    if any_invalid:
        distance, p_value = distance[~invalid], p_value[~invalid]
    if distance.size == 0:
        return
    ordered = np.sort(distance)
    cumulative = np.searchsorted(ordered, series.p_cutoffs, side="left")
    cumulative[series.p_always] = ordered.size
    series.p_value.observe_cumulative(cumulative, float(p_value.sum()))
    low = int(np.searchsorted(ordered, -np.inf, side="right"))
    high = int(np.searchsorted(ordered, np.inf, side="left"))
    series.distance.observe_sorted(ordered[low:high])


def _observe_ranks(
    series: _Series, verdict: HostVerdict, invalid: np.ndarray, any_invalid: bool
) -> bool:
    """Fill the p-value histogram from the valid rows' calibration ranks; False if it cannot.

    It cannot without ranks, or when they do not come from the described calibration (a
    verdict built by hand, or a detector swapped without a new
    :meth:`PrometheusMetrics.describe`): the largest rank must give its row's p-value, which
    a rank above 0 does for one calibration size only (and ranks of 0 all mean p = 1). The
    caller then sorts the p-values instead.
    """
    table, buckets = series.p_of_rank, series.p_bucket_of_rank
    rank, p_value = verdict.calibration_rank, verdict.p_value
    if table is None or buckets is None or rank is None:
        return False
    if any_invalid:
        rank, p_value = rank[~invalid], p_value[~invalid]
    if rank.size == 0:
        return True
    top = int(rank.argmax())
    if not (0 <= rank[top] < table.size and table[rank[top]] == p_value[top]):
        return False
    counts = np.bincount(buckets.take(rank), minlength=series.p_value.bounds.size)
    series.p_value.observe_cumulative(np.cumsum(counts), float(p_value.sum()))
    return True


def _observe_valid(
    histogram: BatchHistogram, values: np.ndarray, invalid: np.ndarray, any_invalid: bool
) -> None:
    """Observe the finite values of valid rows; NaN and inf never reach a histogram."""
    total = float(values.sum())
    if not any_invalid and math.isfinite(total):  # a finite sum: every value is finite
        histogram.observe_batch(values, total)
        return
    keep = ~invalid & np.isfinite(values)
    histogram.observe_batch(values[keep])


# ---------------------------------------------------------------------- exposition


def exposition_registry(registry: Collector | None = None) -> Collector:
    """The registry to expose: the given one, the merged worker files, or the default.

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) and without an explicit
    ``registry``, a fresh registry whose ``MultiProcessCollector`` reads every worker's files
    at each scrape; otherwise prometheus_client's default ``REGISTRY``.
    """
    if registry is not None:
        return registry
    if multiprocess_enabled():
        merged = CollectorRegistry()
        _multiprocess.MultiProcessCollector(merged)
        return merged
    return REGISTRY


def make_wsgi_app(registry: Collector | None = None) -> Callable[..., Any]:
    """A WSGI app serving the metrics, to mount at ``/metrics`` in an existing server."""
    return prometheus_client.make_wsgi_app(exposition_registry(registry))


def make_asgi_app(registry: Collector | None = None) -> Callable[..., Any]:
    """An ASGI app serving the metrics (FastAPI/Starlette: ``app.mount("/metrics", ...)``)."""
    return prometheus_client.make_asgi_app(exposition_registry(registry))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood stderr."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """A running metrics endpoint started by :func:`serve`; ``close()`` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.addr: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])

    @property
    def url(self) -> str:
        """The address of the ``/metrics`` page."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricsServer(url={self.url!r})"


def serve(port: int, addr: str = "127.0.0.1", registry: Collector | None = None) -> MetricsServer:
    """Serve the metrics over HTTP from a daemon thread.

    Args:
        port: TCP port; 0 picks a free one (read it back from ``.port``).
        addr: address to bind. The default is loopback only, so nothing is exposed beyond the
            host by accident; pass ``"0.0.0.0"`` (or a specific interface) to let a Prometheus
            on another machine scrape it.
        registry: what to expose (see :func:`exposition_registry`).

    Returns:
        A :class:`MetricsServer`; call ``close()`` (or use it as a context manager) to stop.

    Raises:
        ValueError: a port outside 0..65535.
        OSError: the address cannot be bound (port in use, unknown address); the message
            names ``addr:port``.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"Expected `port` to be an integer in [0, 65535], but got {port!r}.")
    try:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

        class _Server(_ThreadingWSGIServer):
            address_family = family

        server = make_server(
            addr, port, make_wsgi_app(registry), _Server, handler_class=_QuietHandler
        )
    except OSError as err:
        where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        why = err.strerror or str(err)
        hint = (
            "another process is listening there: choose another port, or 0 for a free one"
            if err.errno == errno.EADDRINUSE
            else "check the address and the port"
        )
        raise OSError(err.errno, f"Cannot serve metrics on {where}: {why}; {hint}.") from err
    thread = threading.Thread(
        target=server.serve_forever, name="oodmon-metrics-server", daemon=True
    )
    thread.start()
    return MetricsServer(server, thread)


# ---------------------------------------------------------------------- multiprocess mode


def prepare_multiprocess_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Create the multiprocess directory and delete files a previous run left there.

    Call it once before any worker starts (gunicorn's ``on_starting`` hook): stale ``.db``
    files would be added to this run's counters and slow every scrape down.

    Args:
        path: the directory; by default ``PROMETHEUS_MULTIPROC_DIR``.

    Raises:
        ValueError: no path given and ``PROMETHEUS_MULTIPROC_DIR`` is not set.
    """
    target = path if path is not None else os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not target:
        raise ValueError(
            "Expected a directory for multiprocess metrics, but `path` is None and "
            "PROMETHEUS_MULTIPROC_DIR is not set; set it before the server starts."
        )
    directory = Path(target)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.db")):
        os.remove(stale)
    return directory


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Forget a dead worker's live gauges (alpha, threshold, detector info, queue depth).

    Its counters and histograms stay, so totals never go backwards when a worker restarts.
    """
    _multiprocess.mark_process_dead(pid, None if path is None else os.fspath(path))


def child_exit(server: Any, worker: Any) -> None:
    """Gunicorn ``child_exit`` hook: ``child_exit = oodmon.metrics.child_exit`` in the config."""
    mark_process_dead(worker.pid)


__all__ = [
    "DEFAULT_DISTANCE_BUCKETS",
    "DEFAULT_P_VALUE_BUCKETS",
    "DEFAULT_SCORING_SECONDS_BUCKETS",
    "METRICS",
    "METRIC_NAMES",
    "MetricSpec",
    "MetricsServer",
    "PrometheusMetrics",
    "child_exit",
    "exposition_registry",
    "make_asgi_app",
    "make_wsgi_app",
    "mark_process_dead",
    "metrics_table",
    "prepare_multiprocess_dir",
    "serve",
]
