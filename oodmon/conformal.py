"""Conformal p-values: turning an OOD score into a calibrated per-sample decision.

Given n scores of held-out in-distribution data, the conformal p-value of a new score s is

    p(s) = (1 + #{calibration scores >= s}) / (n + 1)

(Bates et al., "Testing for outliers with conformal p-values", Ann. Statist. 2023). On
exchangeable in-distribution traffic, flagging ``p <= alpha`` has a false-alarm rate of at
most alpha. The smallest p-value reachable is ``1 / (n + 1)``, so smaller alphas are refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "benjamini_hochberg",
    "check_alpha",
    "finite_scores",
    "min_calibration_size",
    "p_value_of_rank",
    "p_values",
    "ranked_p_values",
    "score_cutoffs",
    "score_threshold",
]


def min_calibration_size(alpha: float) -> int:
    """Smallest n for which ``p <= alpha`` can ever happen: ``ceil(1 / alpha) - 1``."""
    return max(math.ceil(1.0 / alpha - 1e-12) - 1, 1)


def check_alpha(alpha: float, n: int | None = None) -> float:
    """Validate a target false-alarm rate, and that n calibration scores can reach it.

    Raises:
        ValueError: alpha outside (0, 1), or below ``1 / (n + 1)``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"Expected `alpha` in (0, 1), but got {alpha!r}.")
    if n is not None and alpha < 1.0 / (n + 1):
        raise ValueError(
            f"alpha={alpha:g} is below 1/(n+1) = {1.0 / (n + 1):.3g}, the smallest p-value "
            f"{n} calibration samples can give: no input could ever be flagged. Use at least "
            f"{min_calibration_size(alpha)} in-distribution calibration samples, or a larger alpha."
        )
    return float(alpha)


def p_values(scores: Tensor, calibration_sorted: Tensor) -> Tensor:
    """Conformal p-values of ``scores`` against ascending-sorted calibration scores.

    Args:
        scores: ``[N]`` scores, higher = more OOD; NaN stays NaN.
        calibration_sorted: ``[n]`` calibration scores, sorted ascending, on the same device.

    Returns:
        ``[N]`` p-values in ``[1/(n+1), 1]`` (float64), NaN where the score is NaN.
    """
    return ranked_p_values(scores, calibration_sorted)[0]


def ranked_p_values(scores: Tensor, calibration_sorted: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`p_values`, and the calibration rank each one comes from.

    The rank is ``#{calibration < score}`` (int64, 0 to n) and the p-value is exactly
    ``float64(n + 1 - rank) / float64(n + 1)`` (see :func:`p_value_of_rank`): a p-value
    histogram can be counted from the integer ranks without sorting floats. A NaN score ranks
    ``n`` and keeps a NaN p-value.
    """
    n = calibration_sorted.numel()
    s = finite_scores(scores.to(calibration_sorted.dtype)).contiguous()
    # #{cal >= s} = n - #{cal < s}; searchsorted(side="left") counts #{cal < s}.
    rank = torch.searchsorted(calibration_sorted, s, side="left")
    p = (n + 1 - rank).to(torch.float64).div_(n + 1.0)
    return p.add_(s, alpha=0), rank  # NaN scores give NaN p-values (0 * NaN = NaN)


def p_value_of_rank(n: int) -> np.ndarray:
    """``[n + 1]`` float64: the p-value of each calibration rank 0..n.

    Bit for bit as :func:`ranked_p_values` computes it (the same integer and float64 steps).
    """
    ranks = np.arange(n + 1, dtype=np.int64)
    return (n + 1 - ranks).astype(np.float64) / (n + 1.0)


#: Infinite scores are legitimate extremes (an exact zero probability under the reverse KL);
#: they are clamped to the largest float64 so that p-values stay defined and JSON stays plain.
_SCORE_LIMIT = torch.finfo(torch.float64).max


def finite_scores(scores: Tensor) -> Tensor:
    """``scores`` with +-inf clamped to +-``_SCORE_LIMIT`` (NaN stays NaN: invalid rows)."""
    return scores.clamp(-_SCORE_LIMIT, _SCORE_LIMIT)


def score_threshold(calibration_sorted: Tensor, alpha: float) -> float:
    """The score above which ``p <= alpha``: flag iff ``score > threshold``.

    ``p(s) <= alpha`` iff ``#{cal >= s} <= m`` with ``m = floor(alpha (n + 1)) - 1``, i.e. iff
    s exceeds the (m + 1)-th largest calibration score.
    """
    n = calibration_sorted.numel()
    check_alpha(alpha, n)
    m = math.floor(alpha * (n + 1) + 1e-9) - 1
    return float(calibration_sorted[n - 1 - m].item())


def score_cutoffs(calibration_sorted: Any, p_edges: Sequence[float]) -> list[float]:
    """For each edge e, the score c_e with ``p_value(s) <= e  <=>  s > c_e``, exactly.

    :func:`p_values` computes ``p = float64(1 + k) / float64(n + 1)`` with
    ``k = #{calibration >= s}``; that is increasing in k, so ``p <= e`` holds exactly for
    ``k <= m_e`` (the largest such k), i.e. for scores above the ``(m_e + 1)``-th largest
    calibration score. This lets a p-value histogram be filled from sorted scores alone.

    Returns:
        One cutoff per edge: ``+inf`` where no score reaches it, ``-inf`` where every score
        does (e.g. the ``+Inf`` bucket), else a calibration score.
    """
    cal = torch.as_tensor(calibration_sorted).detach().to("cpu", torch.float64)
    n = cal.numel()
    p_of_k = torch.arange(1, n + 2, dtype=torch.float64).div_(n + 1.0)  # same ops as p_values
    cutoffs: list[float] = []
    for edge in p_edges:
        m = int(torch.searchsorted(p_of_k, torch.tensor([float(edge)], dtype=torch.float64),
                                   side="right").item()) - 1  # fmt: skip
        if m < 0:
            cutoffs.append(math.inf)
        elif m >= n:
            cutoffs.append(-math.inf)
        else:
            cutoff = float(cal[n - 1 - m])
            cutoffs.append(math.inf if cutoff >= _SCORE_LIMIT else cutoff)
    return cutoffs


def benjamini_hochberg(p: Tensor, fdr: float) -> Tensor:
    """Benjamini-Hochberg: which p-values to reject at false discovery rate ``fdr``.

    Controls the expected share of in-distribution samples among the flagged ones, over a
    batch (conformal p-values are PRDS, so BH applies; Bates et al. 2023). NaN p-values are
    never rejected and do not count towards the batch size.

    Returns:
        ``[N]`` bool mask of rejected (flagged) samples.
    """
    if not 0 < fdr < 1:
        raise ValueError(f"Expected `fdr` in (0, 1), but got {fdr!r}.")
    valid = ~torch.isnan(p)
    m = valid.sum()
    filled = torch.where(valid, p, torch.full_like(p, float("inf")))
    order = torch.argsort(filled)
    ranked = filled[order]
    ranks = torch.arange(1, p.numel() + 1, device=p.device, dtype=p.dtype)
    below = ranked <= fdr * ranks / m.clamp_min(1)
    # the largest rank k with p_(k) <= fdr * k / m; everything up to it is rejected
    last = torch.where(below, ranks, torch.zeros_like(ranks)).amax()
    rejected_sorted = ranks <= last
    rejected = torch.zeros_like(valid)
    rejected[order] = rejected_sorted
    return rejected & valid
