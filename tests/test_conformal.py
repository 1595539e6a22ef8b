"""Conformal p-values, thresholds and multiple testing: checked against brute force and SciPy."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import false_discovery_control

from oodmon.conformal import benjamini_hochberg, p_value_of_rank, p_values, ranked_p_values


def test_ties_count_as_at_least_as_ood() -> None:
    cal = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    p = p_values(torch.tensor([2.0, 3.5, 0.0, float("nan")]), cal)
    torch.testing.assert_close(p[:3], torch.tensor([4 / 5, 1 / 5, 5 / 5], dtype=torch.float64))
    assert torch.isnan(p[3])


def test_ranks_give_the_p_values_bit_for_bit() -> None:
    # a sink counts p-value buckets by rank: the lookup must be the p-value, not a rounding
    for n in (1, 19, 999, 1000, 12_345):
        cal = torch.sort(torch.randn(n, dtype=torch.float64)).values
        scores = torch.cat([cal, cal + 1e-9, torch.tensor([-1e300, 1e300, float("nan")])])
        p, rank = ranked_p_values(scores, cal)
        torch.testing.assert_close(p, p_values(scores, cal), rtol=0, atol=0, equal_nan=True)
        valid = ~torch.isnan(p)
        assert int(rank[~valid].item()) == n  # a NaN score ranks above every one
        assert rank.dtype == torch.int64 and int(rank.min()) == 0
        lookup = p_value_of_rank(n)[rank[valid].numpy()]
        assert np.array_equal(lookup, p[valid].numpy())  # exactly, not approximately
        assert np.array_equal(rank[valid].numpy(), (cal[None, :] < scores[valid, None]).sum(1))


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
