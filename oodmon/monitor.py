"""Monitor: watches a model's outputs in production and feeds metrics and the label queue.

Two entry points:

* :meth:`Monitor.observe` scores a batch now and returns its :class:`~oodmon.verdict.Verdict`,
  for serving code that wants the per-sample decision (any framework: tensors or NumPy).
* :meth:`Monitor.submit` hands a batch to a background thread and returns at once; the thread
  scores many small batches together. This is what :func:`oodmon.wrap` uses, so that
  monitoring costs the forward pass almost nothing, even at batch size 1, and the only
  device-to-host copy happens off the inference path.

Either way, monitoring never breaks inference: an exception inside monitoring is counted in
``stats().errors``, logged once per kind, and swallowed (``strict=True`` re-raises, for tests).
Outputs that cannot be scored (NaN/inf rows, wrong width, bool/complex dtype, sparse, nested
or meta tensors) are counted as ``invalid`` with a reason and never treated as in-distribution.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from oodmon._batcher import Batcher, row_count
from oodmon._flag_window import FlagWindow
from oodmon._lifecycle import LogOnce, Stage, forget, track
from oodmon._output_checks import (
    KIND_MISMATCH,
    as_outputs,
    kind_mismatch_warning,
    mismatched_extras,
    plain_batch,
    safe_row_count,
    unscorable,
    unscorable_warning,
    wrong_width_warning,
)
from oodmon.detector import Detector
from oodmon.errors import OutputShapeError
from oodmon.sinks import DetectorSummary, MetricsSink, QueueSink, check_queue_sink
from oodmon.verdict import HostVerdict, Observation, Verdict

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_PENDING_BYTES",
    "KIND_MISMATCH",
    "Monitor",
    "MonitorStats",
]

logger = logging.getLogger("oodmon")

#: Rows waiting for the background thread beyond which new batches are dropped (and counted).
DEFAULT_MAX_PENDING = 65_536
#: The same bound in bytes of copied outputs and inputs (256 MiB).
DEFAULT_MAX_PENDING_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MonitorStats:
    """Running totals of a Monitor.

    Attributes:
        seen: rows observed (valid or not).
        flagged: rows flagged as OOD.
        invalid: rows that could not be scored, per reason.
        errors: monitoring failures, per exception kind.
        skipped: rows never scored because the background backlog was full.
        window_size: how many of the most recent valid rows ``window_flag_rate`` covers.
        window_flag_rate: flag rate over the last ``window_size`` valid rows (NaN if none).
    """

    seen: int = 0
    flagged: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    window_size: int = 0
    window_flag_rate: float = float("nan")

    @property
    def invalid_total(self) -> int:
        """Invalid rows over every reason."""
        return sum(self.invalid.values())

    @property
    def errors_total(self) -> int:
        """Monitoring failures over every exception kind."""
        return sum(self.errors.values())


class Monitor:
    """Scores a model's outputs with a fitted Detector and reports them to sinks.

    Args:
        detector: a fitted :class:`~oodmon.detector.Detector`.
        name: model name (a metric label: keep it to a small fixed set).
        version: model version (a metric label).
        metrics: a :class:`~oodmon.sinks.MetricsSink`, e.g. ``oodmon.metrics.PrometheusMetrics``.
        queue: a :class:`~oodmon.sinks.QueueSink` that receives flagged rows, such as
            ``oodmon.QueueWriter(path_or_url)``. A queue location (a path, a URL) or a
            ``LabelQueue`` is not a sink: wrap it in ``oodmon.QueueWriter``.
        on_flag: called with the :class:`~oodmon.verdict.Observation` of the flagged rows of
            each batch that has any (on the background thread for submitted batches).
        window: how many recent rows ``stats().window_flag_rate`` covers.
        strict: re-raise monitoring errors instead of counting them (for tests). Errors on the
            background thread are re-raised by the next :meth:`flush` or :meth:`stats`.
        max_pending: background backlog, in rows, beyond which submitted rows are skipped.
        max_pending_bytes: the same bound in bytes of copied outputs and inputs, so that a
            backlog of large inputs cannot exhaust (device) memory.
        linger: seconds the background thread waits for more submissions before scoring,
            so that many small batches are scored as one (cheaper per row).
        max_batch_rows: rows that end the linger early.

    Raises:
        NotFittedError: the detector is not fitted.
        ValueError: empty name or version, a bad size or duration, or a ``queue`` that is
            not a queue sink.
    """

    detector: Detector
    name: str
    version: str
    metrics: MetricsSink | None
    queue: QueueSink | None
    on_flag: Callable[[Observation], None] | None
    strict: bool
    max_pending: int
    max_pending_bytes: int
    linger: float
    max_batch_rows: int
    _window_size: int
    _batcher: Batcher

    def __init__(
        self,
        detector: Detector,
        name: str,
        version: str,
        metrics: MetricsSink | None = None,
        queue: QueueSink | None = None,
        on_flag: Callable[[Observation], None] | None = None,
        *,
        window: int = 1000,
        strict: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        linger: float = 0.1,
        max_batch_rows: int = 4096,
    ) -> None:
        if not isinstance(detector, Detector):
            raise ValueError(
                f"Expected `detector` to be an oodmon.Detector, but got {type(detector).__name__}."
            )
        detector._require_fitted("Monitor")
        for arg, value in (("name", name), ("version", version)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"Expected `{arg}` to be a non-empty string, but got {value!r}.")
        for arg, number in (
            ("window", window),
            ("max_pending", max_pending),
            ("max_pending_bytes", max_pending_bytes),
            ("max_batch_rows", max_batch_rows),
        ):
            if not isinstance(number, numbers.Integral) or isinstance(number, bool) or number < 1:
                raise ValueError(f"Expected `{arg}` to be a positive integer, but got {number!r}.")
        if not isinstance(linger, numbers.Real) or not 0 <= linger <= 3600:
            raise ValueError(f"Expected `linger` in seconds in [0, 3600], but got {linger!r}.")
        check_queue_sink(queue)
        if on_flag is not None and not callable(on_flag):
            raise ValueError(f"Expected `on_flag` to be callable, but got {on_flag!r}.")
        self.detector = detector
        self.name = name
        self.version = version
        self.metrics = metrics
        self.queue = queue
        self.on_flag = on_flag
        self.strict = strict
        self.max_pending = int(max_pending)
        self.max_pending_bytes = int(max_pending_bytes)
        self.linger = float(linger)
        self.max_batch_rows = int(max_batch_rows)
        self._window_size = int(window)
        self._batcher = Batcher(
            self._process,
            self.record_error,
            name=name,
            max_pending=self.max_pending,
            max_pending_bytes=self.max_pending_bytes,
            linger=self.linger,
            max_batch_rows=self.max_batch_rows,
        )
        self._reset_state()

        if metrics is not None:
            self._guard("describe", metrics.describe, self.summary())
        if queue is not None and callable(getattr(queue, "describe", None)):
            self._guard("queue.describe", queue.describe, self.summary())
        if metrics is not None and callable(getattr(queue, "bind_metrics", None)):
            # a sink that loses rows after submit() (store errors, close) reports them itself
            self._guard("queue.bind_metrics", queue.bind_metrics, metrics)
        track(self, Stage.PRODUCER)

    def _reset_state(self) -> None:
        """Fresh counters, locks and backlog (at start, and in a forked child)."""
        self._lock = threading.Lock()
        self._seen = 0
        self._flagged = 0
        self._invalid: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._skipped = 0
        self._window = FlagWindow(self._window_size)
        self._log_once = LogOnce(logger)
        self._deferred_error: Exception | None = None
        self._batcher.reset()

    def summary(self) -> DetectorSummary:
        """What sinks may know about this monitor's detector (all values bounded)."""
        d = self.detector
        return DetectorSummary(
            model=self.name,
            version=self.version,
            score=d.score,
            alpha=d.alpha,
            threshold=d.threshold_,
            calibration_size=d.n_calibration_,
            calibration_hash=d.calibration_hash_,
            num_outputs=d.num_outputs,
            loss=d.ocs.loss,
            calibration_scores=d.calibration_scores_,
        )

    # ------------------------------------------------------------------ synchronous path

    def observe(
        self, outputs: Any, inputs: Any = None, ids: Sequence[str] | None = None
    ) -> Verdict | None:
        """Score a batch now, update statistics and sinks, and return the verdict.

        Args:
            outputs: ``[N, K]`` (or ``[K]``) tensor or NumPy array of logits or
                probabilities, as the detector was told (``Detector(kind=...)``).
            inputs: the N inputs, kept for flagged rows in the label queue (optional).
            ids: N caller ids, kept with flagged rows (optional).

        Returns:
            The Verdict (tensors on the outputs' device), or None when the batch could not be
            scored at all (wrong shape or width, a closed monitor, or a monitoring error;
            ``stats()`` says which). Inputs or ids of the wrong length are dropped (and
            counted as an error); the outputs are still scored.
        """
        try:
            x = self._scorable_outputs(outputs)
            if x is None:
                return None
            rows = row_count(x)
            if self._closed:
                self._count_skipped(rows, "closed")
                return None
            inputs, ids = self._matched_extras(rows, inputs, ids)
            return self._process(x, inputs, ids)
        except Exception as err:
            self.record_error("observe", err)
            return None

    # ------------------------------------------------------------------ background path

    def submit(
        self,
        outputs: Any,
        inputs: Any = None,
        ids: Sequence[str] | None = None,
        *,
        copy_inputs: bool = True,
    ) -> None:
        """Queue a batch for background scoring and return at once; never raises.

        The outputs, and tensor or array inputs unless ``copy_inputs=False``, are copied (on
        their device, asynchronously) so that a caller reusing its buffers cannot alter what
        is scored or queued. Batches beyond ``max_pending`` rows or ``max_pending_bytes``, or
        submitted after :meth:`close`, are skipped (and counted in ``stats().skipped``); the
        room is checked before anything is copied, so such a batch costs no copy.
        """
        try:
            plain = plain_batch(outputs, inputs, ids)
            if plain is not None:  # the common batch: nothing to convert or drop
                x = outputs
                rows, size = plain
            else:
                x = self._scorable_outputs(outputs)
                if x is None:
                    return
                rows = row_count(x)
                inputs, ids = self._matched_extras(rows, inputs, ids)
                size = None
            reason = self._batcher.submit(
                x, inputs, ids, copy_inputs=copy_inputs, rows=rows, size=size
            )
            if reason is not None:
                self._count_skipped(rows, reason)
        except Exception as err:
            self.record_error("submit", err)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch submitted before this call has been scored.

        Returns False on timeout, and at once when called from the monitor's own background
        thread (from ``on_flag`` or a sink), which cannot wait for itself. With
        ``strict=True``, re-raises the first error the background thread met.
        """
        done = self._batcher.flush(timeout)
        if self.strict and self._deferred_error is not None and not self._batcher.on_worker():
            err, self._deferred_error = self._deferred_error, None
            raise err
        return done

    def close(self, timeout: float | None = 30.0) -> None:
        """Score what is pending, stop the background thread, and close the queue sink.

        Later ``submit``/``observe`` calls are skipped and counted, never raised.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._batcher.close(timeout)
            if self.queue is not None:
                self._guard("queue.close", self.queue.close, timeout)
            forget(self)

    @property
    def _closed(self) -> bool:
        return self._batcher.closed

    def _close_at_exit(self) -> None:
        """Interpreter exit: score what is pending and flush the queue sink."""
        self.close(timeout=10.0)

    def _reset_after_fork(self) -> None:
        """Start afresh in a forked child (gunicorn --preload).

        The parent's thread, locks and pending batches do not exist in the child.
        """
        self._reset_state()

    def _matched_extras(
        self, rows: int, inputs: Any, ids: Sequence[str] | None
    ) -> tuple[Any, Sequence[str] | None]:
        """Inputs and ids, or None for either whose length does not match the outputs."""
        inputs, ids, problems = mismatched_extras(rows, inputs, ids)
        for stage, err in problems:
            self.record_error(stage, err)
        return inputs, ids

    def _count_skipped(self, rows: int, reason: str) -> None:
        with self._lock:
            self._skipped += rows
        if reason == "closed":
            self._log_once("closed", f"oodmon monitor {self.name!r}: batches after close() "
                                     "are skipped (counted in stats().skipped).")  # fmt: skip
        if self.metrics is not None:
            self._guard(
                "metrics.record_skipped", self.metrics.record_skipped, self.name, self.version,
                rows,
            )  # fmt: skip

    # ------------------------------------------------------------------ shared core

    def _process(self, x: Tensor, inputs: Any, ids: Sequence[str] | None) -> Verdict | None:
        start = time.perf_counter()
        verdict: Verdict | None = None
        try:
            verdict = self.detector.predict(x)  # checks the batch's shape and width, once
        except OutputShapeError as err:
            if err.reason == "wrong_width":
                self._log_once(
                    "wrong_width", wrong_width_warning(self.name, x, self.detector.num_outputs)
                )
            rows = row_count(x)
            host = HostVerdict.all_invalid(rows)
            reasons = {err.reason: rows}
        else:
            host = verdict.to_host()  # the one device-to-host copy of this batch
            self._check_kind(x)
            self._batcher.yield_if_worker()
            nonfinite = int(host.invalid.sum())
            reasons = {"nonfinite": nonfinite} if nonfinite else {}
        observation = Observation(
            model=self.name,
            version=self.version,
            verdict=host,
            invalid_reasons=reasons,
            scoring_seconds=time.perf_counter() - start,
            inputs=inputs,
            ids=ids,
        )
        self._update_stats(host, reasons)
        self._dispatch(observation)
        return verdict

    def _scorable_outputs(self, outputs: Any) -> Tensor | None:
        """The outputs as a tensor, or None after counting them invalid when they cannot be.

        Bool, complex and non-numeric outputs, tensors without dense data (sparse, nested,
        meta) and ragged nested lists are a model's answer all the same: they count in
        ``seen`` as invalid rows with a reason, not as monitoring errors.
        """
        reason, detail = unscorable(outputs)
        if reason is None:
            x = as_outputs(outputs)
            # a tensor or array keeps its dtype and layout; anything else is checked as converted
            if not isinstance(outputs, (Tensor, np.ndarray)):
                reason, detail = unscorable(x)
            if reason is None:
                return x
        rows = safe_row_count(outputs)
        if self._closed:
            self._count_skipped(rows, "closed")
            return None
        self._log_once(reason, unscorable_warning(self.name, reason, detail))
        host = HostVerdict.all_invalid(rows)
        reasons = {reason: rows}
        self._update_stats(host, reasons)
        self._dispatch(
            Observation(model=self.name, version=self.version, verdict=host,
                        invalid_reasons=reasons)
        )  # fmt: skip
        return None

    def _check_kind(self, x: Tensor) -> None:
        """Warn (once) and count when softmax outputs look like another kind than expected."""
        message = kind_mismatch_warning(x, self.detector, self.name)
        if message is None:
            return
        with self._lock:
            self._errors[KIND_MISMATCH] = self._errors.get(KIND_MISMATCH, 0) + 1
        self._log_once(KIND_MISMATCH, message)
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.record_error(self.name, self.version, KIND_MISMATCH)

    def _update_stats(self, host: HostVerdict, reasons: dict[str, int]) -> None:
        valid = ~host.invalid
        with self._lock:
            self._seen += len(host)
            self._flagged += int(host.flag.sum())
            for reason, count in reasons.items():
                self._invalid[reason] = self._invalid.get(reason, 0) + count
            self._window.extend(host.flag[valid])

    def _dispatch(self, observation: Observation) -> None:
        if self.metrics is not None:
            self._guard("metrics.record", self.metrics.record, observation)
        flagged = np.flatnonzero(observation.verdict.flag)
        if flagged.size == 0:
            return
        self._batcher.yield_if_worker()
        subset = observation.take(flagged)
        if self.queue is not None:
            dropped = self._guard("queue.submit", self.queue.submit, subset)
            if self.metrics is not None:
                depth = self._guard("queue.depth", self.queue.depth)
                self._guard(
                    "metrics.record_queue",
                    self.metrics.record_queue,
                    self.name,
                    self.version,
                    depth,
                    int(dropped or 0),
                )
        if self.on_flag is not None:
            self._guard("on_flag", self.on_flag, subset)

    def _guard(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:
            self.record_error(stage, err)
            return None

    def warn_once(self, key: str, message: str) -> None:
        """Log ``message`` as a warning, once per ``key`` for this monitor (thread-safe).

        For code that feeds the monitor (:func:`oodmon.wrap`, a custom wrapper or receiver),
        so that its warnings repeat no more than the monitor's own.
        """
        self._log_once(key, message)

    def record_error(self, stage: str, err: Exception) -> None:
        """Count and log a monitoring failure met at ``stage``; never raises (but ``strict``).

        Counted in ``stats().errors`` by exception kind and exported to the metrics sink,
        logged once per stage and kind. For the monitor's own failures, and for code that
        feeds it (:func:`oodmon.wrap`), which must not break inference either.

        Raises:
            Exception: ``err`` itself, with ``strict=True`` and outside the background
                thread (there, the next :meth:`flush` or :meth:`stats` re-raises it).
        """
        kind = type(err).__name__
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1
        # the error path must not raise: an exception's own __str__ may fail, and so may a
        # logging handler
        with contextlib.suppress(Exception):
            self._log_once(
                f"{stage}:{kind}",
                f"oodmon monitor {self.name!r}: {stage} failed ({kind}: {_describe(err)}); "
                "inference continues, further errors of this kind are only counted.",
                exc_info=err,
            )
        if self.metrics is not None:
            with contextlib.suppress(Exception):  # a broken metrics sink must not recurse
                self.metrics.record_error(self.name, self.version, kind)
        if self.strict:
            if self._batcher.on_worker():
                # the worker must live on; flush() and stats() re-raise it for the caller
                if self._deferred_error is None:
                    self._deferred_error = err
            else:
                raise err

    # ------------------------------------------------------------------ reporting

    def stats(self, flush: bool = True, timeout: float | None = 30.0) -> MonitorStats:
        """Running totals; by default waits (up to ``timeout`` s) for submitted batches first."""
        if flush:
            self.flush(timeout)
        with self._lock:
            size, rate = self._window.rate()
            return MonitorStats(
                seen=self._seen,
                flagged=self._flagged,
                invalid=dict(self._invalid),
                errors=dict(self._errors),
                skipped=self._skipped,
                window_size=size,
                window_flag_rate=rate,
            )

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor(name={self.name!r}, version={self.version!r}, detector={self.detector!r})"


def _describe(err: BaseException) -> str:
    """``str(err)``, or a placeholder when the exception cannot even be formatted."""
    try:
        return str(err)
    except Exception:
        return "<the error message could not be formatted>"
