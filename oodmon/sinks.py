"""The small interfaces the Monitor feeds, and in-memory versions for tests.

A Monitor hands every observed batch to a :class:`MetricsSink` and the flagged rows to a
:class:`QueueSink`. Both are called on the inference path, so implementations must be cheap
and must not block: anything slow (a database, a network) belongs on a background thread.
The Monitor catches and counts every exception they raise, so a broken sink never breaks
inference.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from oodmon.verdict import Observation

__all__ = [
    "QUEUE_LOSS_REASONS",
    "DetectorSummary",
    "InMemoryMetrics",
    "InMemoryQueue",
    "MetricsSink",
    "QueueSink",
    "check_queue_sink",
]


#: Why a flagged row never reached the label queue's store (``reason`` of
#: ``oodmon_label_queue_dropped_total``): ``buffer_full`` (refused by the writer's full
#: buffer), ``closed`` (refused after, or unwritten at, the writer's close deadline or
#: process exit while the store still worked), ``store_error`` (the store kept failing
#: until the close deadline), ``rejected`` (the store can never accept the row: a string
#: it cannot encode, an input that cannot be converted).
QUEUE_LOSS_REASONS = ("buffer_full", "closed", "store_error", "rejected")


@dataclass(frozen=True)
class DetectorSummary:
    """What a sink may want to know about the detector behind a Monitor (bounded values)."""

    model: str
    version: str
    score: str
    alpha: float
    threshold: float
    calibration_size: int
    calibration_hash: str
    num_outputs: int
    loss: str
    #: The sorted calibration scores (a read-only tensor), for sinks that count p-values
    #: from scores (:func:`oodmon.conformal.score_cutoffs`); not a label.
    calibration_scores: Any = field(default=None, compare=False, repr=False)


@runtime_checkable
class MetricsSink(Protocol):
    """Receives every batch the Monitor observes."""

    def describe(self, summary: DetectorSummary) -> None:
        """Called once when a Monitor is built, before any batch."""

    def record(self, observation: Observation) -> None:
        """Called once per observed batch (all rows, valid or not)."""

    def record_error(self, model: str, version: str, kind: str) -> None:
        """Called when monitoring itself failed; ``kind`` is an exception class name."""

    def record_skipped(self, model: str, version: str, rows: int) -> None:
        """Called when submitted rows are dropped unscored because the backlog is full."""

    def record_queue(
        self,
        model: str,
        version: str,
        depth: int | None,
        dropped: int,
        reason: str = "buffer_full",
    ) -> None:
        """Called after flagged rows were handed to the queue sink, or lost on the way.

        The Monitor calls it after each hand-over (``dropped``: rows the sink refused, its
        buffer being full); a :class:`~oodmon.label_queue.QueueWriter` given the sink calls
        it after each commit (the fresh depth) and for the rows it loses later.

        Args:
            model: the monitor's model name.
            version: the monitor's model version.
            depth: items waiting in the label queue as last seen, or None if unknown.
            dropped: flagged rows lost, to add to a counter.
            reason: why they were lost, one of :data:`QUEUE_LOSS_REASONS`.
        """


@runtime_checkable
class QueueSink(Protocol):
    """Receives the flagged rows of each batch, for the label queue.

    A sink may also define ``describe(summary: DetectorSummary)``; the Monitor calls it once,
    so that queued items can name the calibration that judged them.
    """

    def submit(self, observation: Observation) -> int:
        """Hand over flagged rows without blocking. Returns how many rows were dropped."""

    def depth(self) -> int | None:
        """Items waiting in the queue as last seen (no I/O), or None if not known yet."""

    def close(self, timeout: float | None = None) -> None:
        """Flush what is buffered (giving up after ``timeout`` seconds) and release resources."""


def check_queue_sink(queue: object) -> None:
    """Refuse what is not a queue sink (None passes), and say what to pass instead.

    Duck-typed (a sink has ``submit``), so that the Monitor does not import the label queue.

    Raises:
        ValueError: ``queue`` has no ``submit``: a queue location, or a ``LabelQueue``.
    """
    if queue is None or callable(getattr(queue, "submit", None)):
        return
    if isinstance(queue, (str, os.PathLike)):
        raise ValueError(
            f"Expected `queue` to be a queue sink (an object with `submit`), but got the "
            f"location {os.fspath(queue)!r}; pass `oodmon.QueueWriter({os.fspath(queue)!r})`, "
            "which writes flagged rows to it in the background."
        )
    kind = type(queue).__name__
    raise ValueError(
        f"Expected `queue` to be a queue sink (an object with `submit`), but got a {kind}; "
        f"pass `oodmon.QueueWriter(<the {kind}'s path or URL>)`, which writes flagged rows "
        "in the background (a LabelQueue is for reading and labelling the queue)."
    )


class InMemoryMetrics:
    """A MetricsSink that keeps plain totals, for tests and for ``Monitor.stats``-like checks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.summary: DetectorSummary | None = None
        self.batches = 0
        self.seen = 0
        self.flagged = 0
        self.invalid: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.skipped = 0
        self.queue_depth: int | None = None
        self.queue_dropped = 0
        self.queue_lost: dict[str, int] = {}

    def describe(self, summary: DetectorSummary) -> None:
        """Keep the summary."""
        self.summary = summary

    def record(self, observation: Observation) -> None:
        """Add the batch to the totals."""
        with self._lock:
            self.batches += 1
            self.seen += len(observation)
            self.flagged += int(observation.verdict.flag.sum())
            for reason, count in observation.invalid_reasons.items():
                self.invalid[reason] = self.invalid.get(reason, 0) + count

    def record_error(self, model: str, version: str, kind: str) -> None:
        """Count one failure of ``kind``."""
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def record_skipped(self, model: str, version: str, rows: int) -> None:
        """Count skipped rows."""
        with self._lock:
            self.skipped += rows

    def record_queue(
        self,
        model: str,
        version: str,
        depth: int | None,
        dropped: int,
        reason: str = "buffer_full",
    ) -> None:
        """Keep the depth (when known) and count the dropped rows, by reason."""
        with self._lock:
            if depth is not None:
                self.queue_depth = depth
            self.queue_dropped += dropped
            if dropped:
                self.queue_lost[reason] = self.queue_lost.get(reason, 0) + dropped


class InMemoryQueue:
    """A QueueSink that keeps flagged observations in a bounded list, for tests."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.capacity = capacity
        self.observations: list[Observation] = []
        self.rows = 0
        self.dropped = 0
        self.closed = False

    def submit(self, observation: Observation) -> int:
        """Keep the rows that fit; returns how many were dropped."""
        with self._lock:
            n = len(observation)
            room = max(self.capacity - self.rows, 0)
            if n > room:
                self.dropped += n - room
                if room == 0:
                    return n
                observation = observation.take(np.arange(room))
            self.observations.append(observation)
            self.rows += len(observation)
            return n - len(observation)

    def depth(self) -> int | None:
        """Rows kept."""
        return self.rows

    def close(self, timeout: float | None = None) -> None:
        """Mark the sink closed."""
        self.closed = True
