"""The scores' per-thread scratch buffers change nothing but the allocations."""

from __future__ import annotations

import threading

import pytest
import torch

from oodmon import OCS, SCORES, _scratch
from oodmon.scores import compute_score

LOGIT_SCORES = sorted(
    n
    for n, spec in SCORES.items()
    if "cross_entropy" in spec.losses and "logits" in spec.kinds_for("cross_entropy")
)


@pytest.fixture
def pi() -> OCS:
    return OCS.cross_entropy(counts=[300, 200, 100, 50, 50, 40, 30, 20, 5, 5] * 100)


def _logits(seed: int, rows: int = 64, cols: int = 1000) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("name", LOGIT_SCORES)
def test_scores_are_identical_with_and_without_scratch(name, pi, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    x = _logits(0)
    x[3, 7] = float("nan")  # NaN rows are still marked
    with_scratch = compute_score(name, x, pi, "logits")
    monkeypatch.setattr(_scratch, "MAX_ELEMENTS", 0)
    without = compute_score(name, x, pi, "logits")
    torch.testing.assert_close(with_scratch, without, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(with_scratch[3]) and torch.isfinite(with_scratch[:3]).all()


@pytest.mark.parametrize("name", LOGIT_SCORES)
def test_a_result_is_not_a_view_of_the_scratch_buffer(name, pi) -> None:  # type: ignore[no-untyped-def]
    first = compute_score(name, _logits(1), pi, "logits")
    kept = first.clone()
    compute_score(name, _logits(2), pi, "logits")  # reuses every buffer of this thread
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_scratch_is_skipped_under_autograd_and_off_the_cpu() -> None:
    x = torch.randn(64, 1000, requires_grad=True)
    assert _scratch.scratch(x, "d") is None
    with torch.no_grad():
        assert _scratch.scratch(x, "d") is not None
    assert _scratch.scratch(torch.empty(0, 10), "d") is None
    assert _scratch.scratch(torch.empty(256, 10), "d") is None  # small: the heap serves it
    big = torch.empty(_scratch.MAX_ELEMENTS + 1, dtype=torch.float16)
    assert _scratch.scratch(big, "d") is None
    meta = torch.empty(64, 1000, device="meta")
    assert _scratch.scratch(meta, "d") is None


def test_a_score_of_a_tensor_that_requires_grad_still_works(pi) -> None:  # type: ignore[no-untyped-def]
    x = _logits(3)
    expected = compute_score("ocs_kl", x, pi, "logits")
    got = compute_score("ocs_kl", x.clone().requires_grad_(), pi, "logits")
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0)


def test_threads_keep_their_own_buffers(pi) -> None:  # type: ignore[no-untyped-def]
    inputs = [_logits(10 + i, rows=256) for i in range(4)]
    expected = [compute_score("ocs_kl", x, pi, "logits") for x in inputs]
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        results[i] = [compute_score("ocs_kl", inputs[i], pi, "logits") for _ in range(30)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        for value in got:
            torch.testing.assert_close(value, expected[i], rtol=0, atol=0)
