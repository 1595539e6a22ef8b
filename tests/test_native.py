"""The native row kernels for CPU logits: the eager scores' results to float32 rounding
(NaN rows included, any strides, both lane layouts), used only where they serve, and a
failing kernel falls back to eager (logged once) without changing a result."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oodmon
from oodmon import _native
from oodmon import scores as S

if not _native.native_available():
    if os.environ.get("CI"):  # CI builds the package with a C compiler: the kernels must be there
        raise AssertionError("oodmon._native_scores was not built; `pip install -e .` compiles it")
    pytest.skip("built without a C compiler: no native kernels", allow_module_level=True)

from oodmon import _native_scores

T = TypeVar("T")
OCS10 = oodmon.OCS.cross_entropy(counts=[50, 20, 10, 5, 5, 3, 3, 2, 1, 1])


def ocs_for(width: int) -> oodmon.OCS:
    return oodmon.OCS.cross_entropy(counts=list(range(1, width + 1)))


#: score name -> function of (logits, ocs)
SCORES: dict[str, Callable[[torch.Tensor, oodmon.OCS], torch.Tensor]] = {
    "msp": lambda z, ocs: S.msp(z),
    "max_logit": lambda z, ocs: S.max_logit(z),
    "energy": lambda z, ocs: S.energy(z),
    "energy_t2.5": lambda z, ocs: S.energy(z, temperature=2.5),
    "energy_t0.3": lambda z, ocs: S.energy(z, temperature=0.3),
    "entropy": lambda z, ocs: S.entropy(z),
    "kl": lambda z, ocs: S.kl_to_ocs(z, ocs),
    "reverse_kl": lambda z, ocs: S.reverse_kl_to_ocs(z, ocs),
}


@pytest.fixture
def restored_state() -> Iterator[None]:
    assert _native.native_active()
    yield
    _native.use_native(True)


def eager(fn: Callable[[], T]) -> T:
    _native.use_native(False)
    try:
        return fn()
    finally:
        _native.use_native(True)


def assert_same_as_eager(name: str, z: torch.Tensor, ocs: oodmon.OCS) -> None:
    fn = SCORES[name]
    native = fn(z, ocs)
    reference = eager(lambda: fn(z, ocs))
    assert native.dtype == reference.dtype and native.shape == reference.shape
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=2e-6, equal_nan=True)


def awkward_logits(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Logits with the rows that break naive formulas."""
    gen = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(rows, width, generator=gen)
    if rows >= 9:
        z[1] += 1e4  # everything must stay relative to the row maximum
        z[2] = ocs_for(width).log_target.float()  # exactly at the OCS: KL 0
        z[3, 0] = 120.0  # one-hot: entropy ~ 0, and exponents far below -87
        z[4, -1] = float("nan")
        z[5, 0] = float("inf")
        z[6, width // 2] = -float("inf")
        z[7] = -1e30  # a constant row of huge magnitude
        z[8] = 0.0
    return z


@pytest.mark.parametrize("name", sorted(SCORES))
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 256, 301])
@pytest.mark.parametrize("width", [1, 2, 10, 31, 32, 33, 64, 65, 1000])
def test_native_scores_equal_the_eager_ones(name: str, rows: int, width: int) -> None:
    assert_same_as_eager(name, awkward_logits(rows, width), ocs_for(width))


@pytest.mark.parametrize("name", sorted(SCORES))
def test_any_strides(name: str) -> None:
    base = awkward_logits(64, 20, seed=5)
    layouts = {
        "column-major": base.t().contiguous().t(),
        "every other column": awkward_logits(64, 40, seed=6)[:, ::2],
        "every third row": awkward_logits(192, 20, seed=7)[::3],
        "one row repeated": base[10:11].expand(33, 20),
        "an offset view": awkward_logits(70, 20, seed=8)[6:],
        "wide, every other column": awkward_logits(64, 80, seed=9)[:, 1::2],
        "wide, column-major": awkward_logits(64, 40, seed=10).t().contiguous().t(),
        # more columns than the eight-row blocks keep gathered: the rest are gathered again
        "wider, column-major": awkward_logits(20, 100, seed=15).t().contiguous().t(),
        "wide, an offset view": awkward_logits(70, 40, seed=14)[6:, 3:],
    }
    for layout, z in layouts.items():
        assert not z.is_contiguous() or layout == "an offset view", layout
        assert_same_as_eager(name, z, ocs_for(z.shape[1]))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    width=st.integers(1, 80),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 80.0, 1e3]),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(SCORES)),
)
def test_random_batches_agree(rows: int, width: int, scale: float, seed: int, name: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(rows, width, generator=gen)
    assert_same_as_eager(name, z, ocs_for(width))


def test_the_kernels_serve_float32_cpu_logits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Spy:
        def __getattr__(self, name: str) -> Callable[..., object]:
            calls.append(name)
            return getattr(_native_scores, name)

    monkeypatch.setattr(_native, "_kernels", Spy())
    small = awkward_logits(16, 10)
    S.kl_to_ocs(small, OCS10)
    assert calls == ["kl"]
    calls.clear()
    S.kl_to_ocs(small.double(), OCS10)  # float64: eager
    S.kl_to_ocs(torch.softmax(small.nan_to_num(), 1), OCS10, kind="probs")  # not logits
    S.msp(small[:0])  # no rows: asked, and the kernel leaves the empty batch to eager
    assert calls == ["msp"] and S.msp(small[:0]).shape == (0,)
    calls.clear()
    large = awkward_logits(4096, 10)  # 40,960 elements
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        S.entropy(large)  # the single-threaded sweep beats two threads' eager passes
        torch.set_num_threads(4)
        S.entropy(large)  # more threads: PyTorch's own kernels
        S.msp(small)  # a small batch is served whatever the threads
    finally:
        torch.set_num_threads(threads)
    assert calls == ["entropy", "msp"]


def test_a_monitor_scores_with_the_kernels_and_gets_the_eager_verdicts() -> None:
    z = awkward_logits(200, 10, seed=11)
    calibration = 2.0 * torch.randn(500, 10, generator=torch.Generator().manual_seed(12))
    for score in ("ocs_kl", "msp", "energy", "entropy", "max_logit", "ocs_kl_reverse"):
        detector = oodmon.Detector(OCS10, score=score, alpha=0.05).fit(calibration)
        native = detector.predict(z)
        reference = eager(lambda d=detector: d.predict(z))  # type: ignore[misc]
        torch.testing.assert_close(native.score, reference.score, rtol=1e-5, atol=2e-6,
                                   equal_nan=True)  # fmt: skip
        assert torch.equal(native.flag, reference.flag), score


def test_a_failing_kernel_is_logged_once_and_the_scores_stay_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, restored_state: None
) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Callable[..., object]:
            def fail(*args: object) -> object:
                raise RuntimeError("kernel exploded")

            return fail

    monkeypatch.setattr(_native, "_kernels", Broken())
    z = awkward_logits(32, 10)
    expected_kl, expected_entropy = eager(lambda: (S.kl_to_ocs(z, OCS10), S.entropy(z)))
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        first = S.kl_to_ocs(z, OCS10)
        second = S.entropy(z)
    torch.testing.assert_close(first, expected_kl, equal_nan=True)
    torch.testing.assert_close(second, expected_entropy, equal_nan=True)
    warnings = [r for r in caplog.records if "native score kernels failed" in r.getMessage()]
    assert len(warnings) == 1 and "kernel exploded" in warnings[0].getMessage()
    assert not _native.native_active()


def test_a_tensor_numpy_cannot_view_goes_eager_and_leaves_the_kernels_on() -> None:
    sparse = awkward_logits(8, 10).nan_to_num(0.0, 0.0, 0.0).to_sparse()
    assert _native.native("msp", sparse) is None
    assert _native.native_active()


def test_off_by_environment_or_call(restored_state: None) -> None:
    assert _native.native_active()
    S.use_native(False)  # the public switch, beside S.use_compiled
    assert not _native.native_active()
    assert _native.native("kl", awkward_logits(8, 10), OCS10.host_constant("log_target")) is None
    _native.use_native(True)
    assert _native.native_active()
    code = "import oodmon._native as n; print(n.native_available(), n.native_active())"
    env = {**os.environ, "OODMON_NATIVE_SCORES": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "False"]


def test_the_bindings_check_their_arguments() -> None:
    z = np.zeros((4, 3), np.float32)
    log_pi = np.full(3, -np.log(3.0), np.float32)
    assert _native_scores.kl(z, log_pi) is not None
    assert _native_scores.kl(z.astype(np.float64), log_pi) is None  # another dtype: eager
    assert _native_scores.msp(np.zeros(3, np.float32)) is None  # 1-D: eager
    assert _native_scores.msp(np.zeros((3, 0), np.float32)) is None  # no columns: eager
    with pytest.raises(ValueError, match="one per column"):
        _native_scores.kl(z, log_pi[:2])
    with pytest.raises(TypeError, match="number of arguments"):
        _native_scores.kl(z)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _native_scores.msp([[1.0, 2.0]])  # no buffer


def test_threads_score_at_once_with_the_interpreter_lock_released() -> None:
    z = awkward_logits(3000, 10, seed=13)  # 30,000 elements: still the native path
    expected = S.kl_to_ocs(z, OCS10)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def score() -> None:
        try:
            for _ in range(50):
                results.append(S.kl_to_ocs(z, OCS10))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=score) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 200
    for result in results:
        assert torch.equal(result.nan_to_num(-1.0), expected.nan_to_num(-1.0))
