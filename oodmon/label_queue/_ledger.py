"""The writer's ledger: where every row it was handed went, and what the metrics sink hears.

A :class:`~oodmon.label_queue.QueueWriter` promises that every row is either committed or
counted as lost with a reason (:data:`~oodmon.sinks.QUEUE_LOSS_REASONS`), and that the
metrics sink is told the queue depth and each loss under the right model. That bookkeeping
is kept here, apart from the buffering and the writes that feed it. The ledger is not
thread-safe on its own: the writer holds its lock around every call (and reads of
:attr:`WriterLedger.lost`), and sends the reports outside it with :func:`send_reports`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from oodmon._lifecycle import LogOnce
from oodmon._printable import printable
from oodmon.label_queue.item import QueueItem
from oodmon.sinks import QUEUE_LOSS_REASONS, MetricsSink
from oodmon.verdict import Observation

__all__ = [
    "ModelKey",
    "QueueReport",
    "WriterLedger",
    "check_metrics",
    "count_items",
    "count_rows",
    "send_reports",
]

#: ``(model, version)``: what rows are counted under.
ModelKey = tuple[str, str]


class QueueReport(NamedTuple):
    """One call due to ``MetricsSink.record_queue``: a depth, or ``dropped`` rows lost."""

    model: str
    version: str
    depth: int | None
    dropped: int
    reason: str


class WriterLedger:
    """Counters of a writer, by outcome, with the metric reports they owe (caller locks)."""

    def __init__(self) -> None:
        self.dropped = 0  # refused by submit
        self.failed = 0  # accepted, never written
        self.lost = dict.fromkeys(QUEUE_LOSS_REASONS, 0)
        self.committed_batches = 0
        self.committed_rows = 0
        self.retries = 0
        self.depth: int | None = None
        self.last_error: str | None = None
        self.store_failing = False  # the latest attempt failed for the store's own reasons
        self.models: set[ModelKey] = set()  # (model, version) pairs seen
        self._reports: list[QueueReport] = []

    @property
    def loss_reason(self) -> str:
        """Why rows given up now are lost: the store is failing, or the writer closed."""
        return "store_error" if self.store_failing else "closed"

    def refused(self, n: int, reason: str) -> None:
        """``n`` rows :meth:`QueueWriter.submit` did not accept (its caller reports them)."""
        self.dropped += n
        self.lost[reason] += n

    def lose(self, reason: str, counts: dict[ModelKey, int]) -> None:
        """Count rows accepted and then lost, per model; queue their metric reports."""
        for (model, version), n in counts.items():
            if n <= 0:
                continue
            self.failed += n
            self.lost[reason] += n
            if model or version:
                self._reports.append(QueueReport(model, version, None, n, reason))
            else:  # rows whose model is no longer known: the writer's only model, if one
                key = next(iter(self.models)) if len(self.models) == 1 else ("", "")
                if key != ("", ""):
                    self._reports.append(QueueReport(*key, None, n, reason))

    def rejected(self, item: QueueItem, message: str) -> None:
        """One row the store can never accept: lost (``rejected``), kept as ``last_error``."""
        self.last_error = message
        self.lose("rejected", {(item.model, item.model_version): 1})

    def store_failed(self, message: str) -> None:
        """A write attempt failed for the store's own reasons (it will be retried)."""
        self.retries += 1
        self.last_error = message
        self.store_failing = True

    def committed(self, rows: int, depth: int | None) -> str | None:
        """A batch of ``rows`` stored rows committed; returns the store error it ends, if any."""
        recovered = self.last_error if self.store_failing else None
        if recovered is not None:
            self.last_error = None
        self.store_failing = False
        self.committed_batches += 1
        self.committed_rows += rows
        self.depth = depth
        self._reports.extend(QueueReport(m, v, depth, 0, "") for m, v in sorted(self.models))
        return recovered

    def take_reports(self) -> list[QueueReport]:
        """The reports queued so far (for :func:`send_reports`, outside the lock)."""
        reports, self._reports = self._reports, []
        return reports


def send_reports(
    reports: Iterable[QueueReport], metrics: MetricsSink | None, log_once: LogOnce
) -> None:
    """Hand depth and loss reports to ``metrics``; a failing sink is logged once, not raised."""
    if metrics is None:
        return
    for report in reports:
        try:
            if report.dropped:
                metrics.record_queue(
                    report.model, report.version, report.depth, report.dropped, reason=report.reason
                )
            else:
                metrics.record_queue(report.model, report.version, report.depth, 0)
        except Exception as err:
            log_once(
                "metrics", f"the metrics sink failed ({type(err).__name__}: {printable(err)})."
            )


def count_rows(observations: Iterable[Observation]) -> dict[ModelKey, int]:
    """Rows per ``(model, version)``."""
    counts: dict[ModelKey, int] = {}
    for observation in observations:
        key = (observation.model, observation.version)
        counts[key] = counts.get(key, 0) + len(observation)
    return counts


def count_items(items: Iterable[QueueItem]) -> dict[ModelKey, int]:
    """Items per ``(model, version)``."""
    counts: dict[ModelKey, int] = {}
    for item in items:
        key = (item.model, item.model_version)
        counts[key] = counts.get(key, 0) + 1
    return counts


def check_metrics(metrics: object) -> None:
    """Refuse a ``metrics`` argument that is not a metrics sink.

    Raises:
        ValueError: ``metrics`` has no ``record_queue``.
    """
    if metrics is not None and not callable(getattr(metrics, "record_queue", None)):
        raise ValueError(
            "Expected `metrics` to be a MetricsSink (with `record_queue`), such as "
            f"oodmon.PrometheusMetrics(), but got {type(metrics).__name__}."
        )
