"""BH from p-value level counts gives exactly the rows conformal.benjamini_hochberg rejects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodmon.conformal import benjamini_hochberg, p_values
from oodmon.offline.fdr import bh_cutoff, p_value_counts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fdr", [0.01, 0.1, 0.3])
def test_counts_give_the_same_rejections_as_sorting(seed: int, fdr: float) -> None:
    rng = np.random.default_rng(seed)
    n_cal = int(rng.integers(20, 400))
    calibration = torch.sort(torch.from_numpy(rng.normal(size=n_cal))).values
    shift = rng.uniform(0, 3)  # some tables hold many OOD rows, some none
    scores = np.concatenate([rng.normal(size=500), rng.normal(shift, 1, size=100)])
    scores[rng.integers(0, 600, size=5)] = np.nan  # invalid rows take no part
    p = p_values(torch.from_numpy(scores), calibration).numpy()
    counts = sum(p_value_counts(part, n_cal) for part in np.array_split(p, 7))
    assert counts.sum() == np.count_nonzero(~np.isnan(p))
    flagged = p <= bh_cutoff(counts, n_cal, fdr)
    np.testing.assert_array_equal(flagged, benjamini_hochberg(torch.from_numpy(p), fdr).numpy())


def test_no_rows_or_no_rejections_flag_nothing() -> None:
    assert bh_cutoff(np.zeros(11, np.int64), 10, 0.1) == 0.0
    counts = np.zeros(11, np.int64)
    counts[-1] = 50  # every p-value is 1
    assert bh_cutoff(counts, 10, 0.1) == 0.0
    with pytest.raises(ValueError, match="fdr"):
        bh_cutoff(counts, 10, 1.5)
