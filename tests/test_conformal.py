"""Conformal p-values, thresholds and multiple testing: checked against brute force and SciPy."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import false_discovery_control

from oodmon.conformal import benjamini_hochberg, p_values


def test_ties_count_as_at_least_as_ood() -> None:
    cal = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    p = p_values(torch.tensor([2.0, 3.5, 0.0, float("nan")]), cal)
    torch.testing.assert_close(p[:3], torch.tensor([4 / 5, 1 / 5, 5 / 5], dtype=torch.float64))
    assert torch.isnan(p[3])


def test_benjamini_hochberg_matches_scipy() -> None:
    gen = np.random.default_rng(9)
    p = np.concatenate([gen.uniform(size=200), gen.uniform(0, 0.002, size=20)])
    p[5] = np.nan
    ours = benjamini_hochberg(torch.tensor(p), 0.1).numpy()
    valid = ~np.isnan(p)
    reference = np.zeros_like(ours)
    reference[valid] = false_discovery_control(p[valid], method="bh") <= 0.1
    assert ours.sum() >= 20
    np.testing.assert_array_equal(ours, reference)
