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
Outputs that cannot be scored (NaN/inf rows, wrong width) are counted as ``invalid`` with a
reason and never treated as in-distribution.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from oodmon.detector import Detector
from oodmon.sinks import DetectorSummary, MetricsSink, QueueSink
from oodmon.verdict import HostVerdict, Observation, Verdict

logger = logging.getLogger("oodmon")

#: Rows waiting for the background thread beyond which new batches are dropped (and counted).
DEFAULT_MAX_PENDING = 65_536


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
        return sum(self.invalid.values())

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())


class _FlagWindow:
    """Ring buffer of the last N flags, written a batch at a time (no per-sample loop)."""

    def __init__(self, size: int) -> None:
        self._flags = np.zeros(size, dtype=bool)
        self._next = 0
        self._filled = 0

    def extend(self, flags: np.ndarray) -> None:
        size = self._flags.size
        if flags.size >= size:
            self._flags[:] = flags[-size:]
            self._next, self._filled = 0, size
            return
        end = self._next + flags.size
        if end <= size:
            self._flags[self._next : end] = flags
        else:
            first = size - self._next
            self._flags[self._next :] = flags[:first]
            self._flags[: end - size] = flags[first:]
        self._next = end % size
        self._filled = min(self._filled + flags.size, size)

    def rate(self) -> tuple[int, float]:
        if self._filled == 0:
            return 0, float("nan")
        view = self._flags if self._filled == self._flags.size else self._flags[: self._filled]
        return self._filled, float(view.mean())


@dataclass
class _Pending:
    outputs: Tensor
    inputs: Any
    ids: Sequence[str] | None


class Monitor:
    """Scores a model's outputs with a fitted Detector and reports them to sinks.

    Args:
        detector: a fitted :class:`~oodmon.detector.Detector`.
        name: model name (a metric label: keep it to a small fixed set).
        version: model version (a metric label).
        metrics: a :class:`~oodmon.sinks.MetricsSink`, e.g. ``oodmon.metrics.PrometheusMetrics``.
        queue: a :class:`~oodmon.sinks.QueueSink` that receives flagged rows.
        on_flag: called with the :class:`~oodmon.verdict.Observation` of the flagged rows of
            each batch that has any.
        window: how many recent rows ``stats().window_flag_rate`` covers.
        strict: re-raise monitoring errors instead of counting them (for tests).
        max_pending: background backlog, in rows, beyond which submitted rows are skipped.
        linger: seconds the background thread waits for more submissions before scoring,
            so that many small batches are scored as one (cheaper per row).
        max_batch_rows: rows that end the linger early.

    Raises:
        NotFittedError: the detector is not fitted.
        ValueError: empty name or version, or a bad window size.
    """

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
        linger: float = 0.02,
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
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"Expected `window` to be a positive integer, but got {window!r}.")
        self.detector = detector
        self.name = name
        self.version = version
        self.metrics = metrics
        self.queue = queue
        self.on_flag = on_flag
        self.strict = strict
        self.max_pending = max_pending
        self.linger = float(linger)
        self.max_batch_rows = int(max_batch_rows)

        self._lock = threading.Lock()
        self._seen = 0
        self._flagged = 0
        self._invalid: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._skipped = 0
        self._window = _FlagWindow(window)
        self._logged_kinds: set[str] = set()

        # background scoring for submit()
        self._pending: deque[_Pending] = deque()
        self._pending_rows = 0
        self._in_flight = 0
        self._worker_idle = False
        self._flush_requested = False
        self._wakeup = threading.Condition(threading.Lock())
        self._worker: threading.Thread | None = None
        self._closed = False

        if metrics is not None:
            self._guard("describe", metrics.describe, self.summary())
        _live_monitors.add(self)
        _register_exit_hook()

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
            scored at all (wrong shape or width, or a monitoring error; see ``stats()``).
        """
        try:
            x = self._as_outputs(outputs)
            return self._process(x, inputs, ids)
        except Exception as err:
            self._record_error("observe", err)
            return None

    # ------------------------------------------------------------------ background path

    def submit(self, outputs: Any, inputs: Any = None, ids: Sequence[str] | None = None) -> None:
        """Queue a batch for background scoring and return at once; never raises.

        The outputs are copied (on their device, asynchronously) so later in-place changes by
        the caller cannot alter what is scored. Batches beyond ``max_pending`` rows are
        skipped and counted in ``stats().skipped``.
        """
        try:
            if self._closed:
                raise RuntimeError("submit() on a closed Monitor")
            x = self._as_outputs(outputs).clone()
            rows = int(x.shape[0]) if x.ndim == 2 else 1
            with self._wakeup:
                if self._pending_rows + rows > self.max_pending:
                    with self._lock:
                        self._skipped += rows
                    skipped = True
                else:
                    skipped = False
                    self._pending.append(_Pending(x, inputs, ids))
                    self._pending_rows += rows
                    if self._worker is None:
                        self._start_worker()
                    elif self._worker_idle or self._pending_rows >= self.max_batch_rows:
                        self._wakeup.notify()  # a lingering worker needs no wake-up per batch
            if skipped and self.metrics is not None:
                self._guard(
                    "metrics.record_skipped",
                    self.metrics.record_skipped,
                    self.name,
                    self.version,
                    rows,
                )
        except Exception as err:
            self._record_error("submit", err)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted batch has been scored. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wakeup:
            self._flush_requested = True
            self._wakeup.notify_all()
            while self._pending or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wakeup.wait(remaining)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Score what is pending, stop the background thread, and close the queue sink."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        with self._wakeup:
            self._wakeup.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
        if self.queue is not None:
            self._guard("queue.close", self.queue.close)
        _live_monitors.discard(self)

    def _start_worker(self) -> None:
        self._worker = threading.Thread(
            target=self._work, name=f"oodmon-monitor-{self.name}", daemon=True
        )
        self._worker.start()

    def _work(self) -> None:
        # One intra-op thread here (an OpenMP setting local to this thread): scoring is
        # light, and a second thread team would spin against the model's own forward pass.
        torch.set_num_threads(1)
        while True:
            with self._wakeup:
                while not self._pending and not self._closed:
                    self._worker_idle = True
                    self._wakeup.wait()
                self._worker_idle = False
                if not self._pending and self._closed:
                    return
                # Linger so that a stream of small batches is scored as one.
                deadline = time.monotonic() + self.linger
                while (
                    not self._closed
                    and not self._flush_requested
                    and self._pending_rows < self.max_batch_rows
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self._wakeup.wait(remaining)
                self._flush_requested = False
                batch = list(self._pending)
                self._pending.clear()
                self._pending_rows = 0
                self._in_flight = len(batch)
            try:
                self._process_pending(batch)
            except Exception as err:  # _process guards itself; this is a last resort
                self._record_error("background", err)
            finally:
                with self._wakeup:
                    self._in_flight = 0
                    self._wakeup.notify_all()

    def _process_pending(self, batch: list[_Pending]) -> None:
        # Coalesce compatible batches (same width, device, dtype) into one scoring call.
        groups: dict[tuple[Any, ...], list[_Pending]] = {}
        for item in batch:
            x = item.outputs
            key = (tuple(x.shape[1:]) if x.ndim == 2 else ("odd", id(item)), x.device, x.dtype)
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            try:
                if len(items) == 1:
                    self._process(items[0].outputs, items[0].inputs, items[0].ids)
                    continue
                outputs = torch.cat([it.outputs for it in items])
                inputs = _concat_inputs(
                    [it.inputs for it in items], [len(it.outputs) for it in items]
                )
                ids = _concat_ids([it.ids for it in items], [len(it.outputs) for it in items])
                self._process(outputs, inputs, ids)
            except Exception as err:
                self._record_error("background", err)

    # ------------------------------------------------------------------ shared core

    def _process(self, x: Tensor, inputs: Any, ids: Sequence[str] | None) -> Verdict | None:
        start = time.perf_counter()
        if ids is not None and x.ndim >= 1 and len(ids) != x.shape[0]:
            raise ValueError(f"Expected {x.shape[0]} `ids` (one per row), but got {len(ids)}.")
        reason = self._shape_problem(x)
        verdict: Verdict | None = None
        if reason is not None:
            rows = int(x.shape[0]) if x.ndim >= 1 else 1
            host = HostVerdict.all_invalid(rows)
            reasons = {reason: rows}
        else:
            verdict = self.detector.predict(x)
            host = verdict.to_host()  # the one device-to-host copy of this batch
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

    def _shape_problem(self, x: Tensor) -> str | None:
        if x.ndim != 2:
            return "wrong_shape"
        if x.shape[1] != self.detector.num_outputs:
            self._log_once(
                "wrong_width",
                f"oodmon monitor {self.name!r}: model outputs have {x.shape[1]} columns but the "
                f"detector expects {self.detector.num_outputs}; rows counted as invalid.",
            )
            return "wrong_width"
        return None

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
            self._record_error(stage, err)
            return None

    def _record_error(self, stage: str, err: Exception) -> None:
        kind = type(err).__name__
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1
        self._log_once(
            f"{stage}:{kind}",
            f"oodmon monitor {self.name!r}: {stage} failed ({kind}: {err}); "
            "inference continues, further errors of this kind are only counted.",
            exc_info=err,
        )
        if self.metrics is not None:
            with contextlib.suppress(Exception):  # a broken metrics sink must not recurse
                self.metrics.record_error(self.name, self.version, kind)
        if self.strict:
            raise err

    def _log_once(self, key: str, message: str, exc_info: BaseException | None = None) -> None:
        with self._lock:
            if key in self._logged_kinds:
                return
            self._logged_kinds.add(key)
        logger.warning(message, exc_info=exc_info)

    @staticmethod
    def _as_outputs(outputs: Any) -> Tensor:
        if isinstance(outputs, Tensor):
            x = outputs.detach()
        elif isinstance(outputs, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(outputs))
        else:
            x = torch.as_tensor(np.asarray(outputs))
        return x.unsqueeze(0) if x.ndim == 1 else x

    # ------------------------------------------------------------------ reporting

    def stats(self, flush: bool = True) -> MonitorStats:
        """Running totals; by default waits for pending background batches first."""
        if flush:
            self.flush()
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


def _concat_inputs(chunks: list[Any], sizes: list[int]) -> Any:
    if all(c is None for c in chunks):
        return None
    if all(isinstance(c, Tensor) for c in chunks):
        shapes = {tuple(c.shape[1:]) for c in chunks}
        devices = {c.device for c in chunks}
        if len(shapes) == 1 and len(devices) == 1:
            return torch.cat(chunks)
    rows: list[Any] = []
    for chunk, size in zip(chunks, sizes, strict=True):
        if chunk is None:
            rows.extend([None] * size)
        else:
            rows.extend(chunk[i] for i in range(size))
    return rows


def _concat_ids(chunks: list[Sequence[str] | None], sizes: list[int]) -> list[Any] | None:
    if all(c is None for c in chunks):
        return None
    ids: list[Any] = []
    for chunk, size in zip(chunks, sizes, strict=True):
        ids.extend([None] * size if chunk is None else list(chunk))
    return ids


_live_monitors: weakref.WeakSet[Monitor] = weakref.WeakSet()
_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Register the exit flush on first use: atexit runs hooks last-in first-out, so monitors
    (built after their queue sinks) are flushed before the sinks' own exit hooks run."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_live_monitors)
        _exit_hook_registered = True


def _close_live_monitors() -> None:
    """Interpreter exit: score what is pending and flush the queue sinks."""
    for monitor in list(_live_monitors):
        with contextlib.suppress(Exception):
            monitor.close(timeout=10.0)
