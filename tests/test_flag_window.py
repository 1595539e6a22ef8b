"""FlagWindow: the Monitor's rolling flag rate, against a naive list of every flag."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oodmon._flag_window import FlagWindow


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(1, 20),
    chunks=st.lists(st.lists(st.booleans(), min_size=0, max_size=45), min_size=1, max_size=8),
)
def test_flag_window_matches_naive(size: int, chunks: list[list[bool]]) -> None:
    window, history = FlagWindow(size), []
    for chunk in chunks:
        window.extend(np.array(chunk, dtype=bool))
        history.extend(chunk)
    n, rate = window.rate()
    recent = history[-size:]
    assert n == len(recent)
    if recent:
        assert rate == pytest.approx(np.mean(recent))
    else:
        assert np.isnan(rate)
