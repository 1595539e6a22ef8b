"""The optional compiled score kernels: same results as the eager scores, off by default, and
a failure to compile falls back to eager (logged once) without changing a result."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

import oodmon
from oodmon import _fused, _native
from oodmon import scores as S

OCS = oodmon.OCS.cross_entropy(counts=[50, 20, 10, 5, 5, 3, 3, 2, 1, 1] * 8)  # K = 80


@pytest.fixture
def compiled() -> Iterator[None]:
    """Kernels on for one test; the process-wide switch and failure state restored after.

    The native kernels, which serve CPU float32 logits first, are off meanwhile.
    """
    saved, native_was_active = dict(_fused._state), _native.native_active()
    _fused.use_compiled(True)
    _fused._state["failed"] = None
    _native.use_native(False)
    yield
    _fused._state.update(saved)
    _native.use_native(native_was_active)


def awkward_logits(rows: int) -> torch.Tensor:
    """Large enough for the fused path, with the rows that break naive formulas."""
    gen = torch.Generator().manual_seed(3)
    z = 3.0 * torch.randn(rows, OCS.num_outputs, generator=gen)
    z[1] += 1e4  # a large offset: everything must stay relative to the row maximum
    z[2] = OCS.log_target.float()  # exactly at the OCS: KL 0
    z[3, 5] = 80.0  # one-hot: entropy ~ 0
    z[4, 7] = float("nan")
    z[5, 0] = float("inf")
    z[6, 2] = -float("inf")
    return z


EAGER_AND_SCORE = [
    ("kl", lambda z: S.kl_to_ocs(z, OCS)),
    ("reverse_kl", lambda z: S.reverse_kl_to_ocs(z, OCS)),
    ("entropy", S.entropy),
    ("neg_log_sum_exp", S.energy),
    ("neg_log_sum_exp", lambda z: S.energy(z, temperature=2.5)),
]


@pytest.mark.parametrize("kernel, score", EAGER_AND_SCORE)
def test_compiled_scores_equal_eager(kernel: str, score, compiled: None) -> None:
    for rows in (1024, 700):  # two batch sizes: one dynamic compilation serves both
        z = awkward_logits(rows)
        assert z.numel() >= S._SINGLE_PASS_MIN_ELEMENTS
        _fused.use_compiled(False)
        eager = score(z)
        _fused.use_compiled(True)
        fused = score(z)
        assert _fused.compiled_active(), _fused._state["failed"]  # the compiled path ran
        assert kernel in _fused._compiled
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=2e-6, equal_nan=True)
        assert torch.equal(torch.isnan(fused), torch.isnan(eager))
    assert torch.isnan(fused[[4, 5]]).all()


def compiler_raising(error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` raises ``error``, and no kernel is compiled yet."""

    def compile(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(_fused, "_compiled", {})


def test_small_batches_and_autograd_stay_eager(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler_raising(AssertionError("compiled where eager was expected"), monkeypatch)
    small = awkward_logits(8)
    assert small.numel() < S._SINGLE_PASS_MIN_ELEMENTS
    S.kl_to_ocs(small, OCS)
    S.entropy(small)
    large = awkward_logits(1024).requires_grad_()
    assert _fused.fused("kl", large, OCS.log_target.float()) is None
    assert _fused.compiled_active() and not _fused._compiled


def test_a_failing_compiler_falls_back_to_eager_once(
    compiled: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    compiler_raising(RuntimeError("no C++ compiler"), monkeypatch)
    z = awkward_logits(1024)
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        first, second = S.entropy(z), S.entropy(z)
    _fused.use_compiled(False)
    torch.testing.assert_close(first, S.entropy(z), equal_nan=True)
    torch.testing.assert_close(second, first, equal_nan=True)
    assert not _fused.compiled_active()
    assert [r.getMessage() for r in caplog.records if "compiled" in r.getMessage()] == [
        "oodmon: compiled score kernels failed (RuntimeError: no C++ compiler); "
        "scores stay eager in this process."
    ]


@pytest.mark.parametrize("value, active", [("", False), ("0", False), ("1", True)])
def test_the_environment_switch(value: str, active: bool) -> None:
    code = "import sys, oodmon.scores, oodmon._fused as f; "
    code += "print(f.compiled_active(), 'torch._dynamo' in sys.modules)"
    env = {**os.environ, "OODMON_COMPILED_SCORES": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == [str(active), "False"], out.stderr
