"""A prometheus_client Histogram that takes a whole batch of observations in one call.

client_python has no batch API: ``observe`` is one Python call per sample (about 2 us), 8 ms
for a batch of 4096. :meth:`BatchHistogram.observe_batch` counts a batch per bucket with
NumPy and adds the counts in a fixed number of Python calls, whatever the batch size.

Counting: ``observe`` puts x in the first bucket with ``x <= bound``, so the cumulative count
at bound b is ``#{x <= b}``: ``searchsorted(sort(batch), bounds, side="right")``. NumPy's SIMD
sort makes that cheaper than searching every sample among the bounds (``searchsorted(bounds,
batch)`` is a branchy binary search per sample, about 4x slower at 4096 samples).

Where the counts go, chosen once per child (``mode``):

* ``"memory"`` (single-process, the usual case): a NumPy array of cumulative counts and a
  float sum under one lock, added to the client's own samples at exposition (``_child_samples``
  is overridden and only adjusts the values of the ``_bucket``, ``_count`` and ``_sum`` samples
  the client produced, so names, labels, ``_created`` and the text/OpenMetrics formats remain
  the client's). A batch costs one lock and two additions, not one call per bucket.
* ``"values"`` (multiprocess mode, where the client reads mmap files, not ``_child_samples``):
  one ``inc`` per non-empty bucket on the client's per-bucket value objects (``_buckets[i]``,
  not cumulative) and one on ``_sum``: the very objects ``observe`` writes, so every worker's
  file holds exactly what per-sample ``observe`` would have written.
* ``"observe"``: a per-sample ``observe`` loop, if a future client changes the internals the
  other modes rely on (checked at construction, logged once): slow but correct.

A custom collector could not work in multiprocess mode, hence the subclass. The internals are
private, so ``tests/test_metrics.py`` compares ``observe_batch`` with per-sample ``observe`` in
every mode, single-process and multiprocess, and a client upgrade that changes their meaning
fails a test rather than a dashboard.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client import Histogram

__all__ = ["BatchHistogram", "multiprocess_enabled"]

logger = logging.getLogger("oodmon")

_MODES = ("memory", "values", "observe")
_warned = False


def multiprocess_enabled() -> bool:
    """Whether client_python's multiprocess mode is on (its own test, on the environment)."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


def _multiprocess(child: Any) -> bool:
    if multiprocess_enabled():
        return True
    # A value class without the flag is treated as multiprocess: the "values" mode is right
    # in both modes, the "memory" mode only in a single process.
    return getattr(child._sum, "_multiprocess", True) is not False


def _has_values(child: Any) -> bool:
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    total = getattr(child, "_sum", None)
    return (
        isinstance(buckets, list)
        and isinstance(bounds, list)
        and len(buckets) == len(bounds) > 0
        and all(callable(getattr(b, "inc", None)) for b in buckets)
        and callable(getattr(total, "inc", None))
    )


def _has_expected_samples(child: Any) -> bool:
    try:
        samples = list(Histogram._child_samples(child))
        names = [s.name for s in samples]
        replace_ok = all(callable(getattr(s, "_replace", None)) for s in samples)
    except Exception:
        return False
    return (
        replace_ok
        and names[: len(child._upper_bounds)] == ["_bucket"] * len(child._upper_bounds)
        and names.count("_bucket") == len(child._upper_bounds)
        and names.count("_count") == 1
        and names.count("_sum") == (1 if child._upper_bounds[0] >= 0 else 0)
    )


class BatchHistogram(Histogram):
    """A Histogram with :meth:`observe_batch`; everything else is the client's Histogram."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._bounds = np.asarray(self._upper_bounds, dtype=np.float64)
        self._batch_lock = threading.Lock()
        self._batch_cumulative = np.zeros(len(self._upper_bounds), dtype=np.float64)
        self._batch_sum = 0.0
        if not _has_values(self):
            self.mode = "observe"
        elif _multiprocess(self) or not _has_expected_samples(self):
            self.mode = "values"
        else:
            self.mode = "memory"
        if self.mode == "observe":
            global _warned
            if not _warned:
                _warned = True
                logger.warning(
                    "oodmon: this prometheus-client's Histogram internals are not the ones "
                    "oodmon batches into; histograms fall back to one observe() per sample."
                )

    def observe_batch(self, values: np.ndarray, total: float | None = None) -> None:
        """Observe every value of a 1-D float array, as ``observe`` would one by one.

        Args:
            values: ``[N]`` finite floats (NaN would land in no bucket, as with ``observe``;
                the caller filters them out).
            total: ``values.sum()`` if the caller has it already.
        """
        self._raise_if_not_observable()
        if values.size == 0:
            return
        if self.mode == "observe":
            for value in values.tolist():
                self.observe(value)
            return
        self.observe_sorted(np.sort(values), total)

    @property
    def bounds(self) -> np.ndarray:
        """Upper bounds of the buckets, ending with +Inf."""
        return self._bounds

    @property
    def batched(self) -> bool:
        """Whether pre-counted batches can be added (False in the per-sample fallback)."""
        return self.mode != "observe"

    def observe_sorted(self, values: np.ndarray, total: float | None = None) -> None:
        """:meth:`observe_batch` for finite values already sorted ascending (no sort)."""
        if values.size == 0:
            return
        if not self.batched:
            self.observe_batch(values, total)
            return
        cumulative = np.searchsorted(values, self._bounds, side="right")
        self.observe_cumulative(cumulative, float(values.sum()) if total is None else total)

    def observe_cumulative(self, cumulative: np.ndarray, total: float) -> None:
        """Add pre-counted observations.

        ``cumulative[i]`` values were ``<=`` bound ``i`` (the last bound is +Inf, so the last
        entry is the count) and they summed to ``total``.

        Raises:
            RuntimeError: in the per-sample fallback (check :attr:`batched` first).
        """
        self._raise_if_not_observable()
        if not self.batched:
            raise RuntimeError("pre-counted observations need the batched histogram mode")
        amount = float(total)
        if self.mode == "memory":
            with self._batch_lock:
                self._batch_cumulative += cumulative
                self._batch_sum += amount
            return
        previous = 0
        for i, count in enumerate(np.asarray(cumulative).tolist()):
            if count != previous:
                self._buckets[i].inc(float(count - previous))
                previous = count
        self._sum.inc(amount)

    def _child_samples(self) -> Iterable[Any]:
        samples = super()._child_samples()
        if self.mode != "memory":
            return samples
        with self._batch_lock:
            cumulative = self._batch_cumulative.tolist()
            total = self._batch_sum
        adjusted = []
        bucket = 0
        for sample in samples:
            if sample.name == "_bucket":
                sample = sample._replace(value=sample.value + cumulative[bucket])
                bucket += 1
            elif sample.name == "_count":
                sample = sample._replace(value=sample.value + cumulative[-1])
            elif sample.name == "_sum":
                sample = sample._replace(value=sample.value + total)
            adjusted.append(sample)
        return tuple(adjusted)
