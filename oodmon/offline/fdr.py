"""Benjamini-Hochberg over a whole table in flat memory.

A conformal p-value can only take the n + 1 values ``(k + 1) / (n + 1)``, n the calibration
size. So the BH cut over any number of rows follows exactly from a count of rows per value:
``n + 1`` integers, whatever the table's length. A first pass over the input fills the counts
(:func:`p_value_counts`), :func:`bh_cutoff` finds the cut, and the second pass flags
``p_value <= cutoff``: the same rows :func:`oodmon.conformal.benjamini_hochberg` would reject
over the whole table at once, without holding its p-values.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bh_cutoff", "p_value_counts"]


def p_value_counts(p_value: np.ndarray, n_calibration: int) -> np.ndarray:
    """Rows per conformal p-value level: ``counts[k]`` = #{p == (k + 1) / (n + 1)}.

    Args:
        p_value: ``[N]`` conformal p-values against ``n_calibration`` scores; NaN (invalid
            rows) are not counted, as BH leaves them out.
        n_calibration: the number of calibration scores ``n``; p-values lie on the grid
            ``(k + 1) / (n + 1)``.

    Returns:
        ``[n + 1]`` int64 counts; add them up over batches.
    """
    valid = p_value[~np.isnan(p_value)]
    k = np.rint(valid * (n_calibration + 1)).astype(np.int64) - 1
    return np.bincount(k, minlength=n_calibration + 1).astype(np.int64)


def bh_cutoff(counts: np.ndarray, n_calibration: int, fdr: float) -> float:
    """The p-value cut of Benjamini-Hochberg at level ``fdr``: reject iff ``p <= cutoff``.

    BH rejects the r smallest p-values, r the largest rank with ``p_(r) <= fdr * r / m``.
    Within a level of tied p-values the largest rank is the one to test, so it suffices to
    test each level at its cumulative count.

    Returns:
        The cut, or 0.0 (nothing rejected: p-values are at least ``1 / (n + 1)``).
    """
    if not 0 < fdr < 1:
        raise ValueError(f"Expected `fdr` in (0, 1), but got {fdr!r}.")
    m = int(counts.sum())
    if m == 0:
        return 0.0
    # the same float64 operations as oodmon.conformal.p_values, so ``p <= cutoff`` is exact
    levels = np.arange(1, n_calibration + 2, dtype=np.float64) / (n_calibration + 1.0)
    ranks = np.cumsum(counts)
    passing = (counts > 0) & (levels <= fdr * ranks / m)
    if not passing.any():
        return 0.0
    return float(levels[np.flatnonzero(passing)[-1]])
