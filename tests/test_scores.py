"""Scores: reference equality, the sign contract, invariants, NaN handling, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oodmon import OCS, SCORES, distance
from oodmon import scores as S

K = 10


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    return torch.randn(512, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3


@pytest.fixture(scope="module")
def imbalanced() -> OCS:
    return OCS.cross_entropy(counts=[50, 30, 20, 10, 8, 6, 4, 3, 2, 1])


# ---------------------------------------------------------------- reference implementations


def test_baselines_equal_pytorch_ood(logits: torch.Tensor) -> None:
    detector = pytest.importorskip("pytorch_ood.detector")
    z = logits.float()
    torch.testing.assert_close(S.msp(z), detector.MaxSoftmax.score(z), atol=1e-5, rtol=0)
    torch.testing.assert_close(S.energy(z), detector.EnergyBased.score(z), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(
        S.energy(z, temperature=2.5), detector.EnergyBased.score(z, t=2.5), atol=1e-5, rtol=1e-6
    )
    torch.testing.assert_close(S.entropy(z), detector.Entropy.score(z), atol=1e-5, rtol=0)
    torch.testing.assert_close(S.max_logit(z), detector.MaxLogit.score(z), atol=1e-5, rtol=0)


def _naive_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def test_kl_matches_naive_formula(logits: torch.Tensor, imbalanced: OCS) -> None:
    p = logits.softmax(-1)
    pi = imbalanced.target.expand_as(p)
    torch.testing.assert_close(S.kl_to_ocs(logits, imbalanced), _naive_kl(p, pi))
    torch.testing.assert_close(S.reverse_kl_to_ocs(logits, imbalanced), _naive_kl(pi, p))
    # every input kind gives the same answer
    for kind, x in (("probs", p), ("log_probs", p.log())):
        torch.testing.assert_close(S.kl_to_ocs(x, imbalanced, kind), _naive_kl(p, pi))
        torch.testing.assert_close(S.reverse_kl_to_ocs(x, imbalanced, kind), _naive_kl(pi, p))
        torch.testing.assert_close(S.entropy(x, kind), S.entropy(logits))
        torch.testing.assert_close(S.msp(x, kind), S.msp(logits))


def test_uniform_prior_kl_is_log_k_minus_entropy(logits: torch.Tensor) -> None:
    uniform = OCS.cross_entropy(counts=[7] * K)
    torch.testing.assert_close(S.kl_to_ocs(logits, uniform), math.log(K) - S.entropy(logits))
    assert float(S.kl_to_ocs(logits, uniform).max()) <= math.log(K) + 1e-9


def test_bernoulli_and_gaussian_kl_match_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(5)
    y = (torch.rand(200, 3, generator=gen) < 0.3).double()
    ocs = OCS.binary_cross_entropy(y)
    z = torch.randn(64, 3, generator=gen, dtype=torch.float64) * 2
    dists = torch.distributions
    expected = dists.kl_divergence(
        dists.Bernoulli(logits=z), dists.Bernoulli(probs=ocs.target.expand_as(z))
    ).sum(-1)
    torch.testing.assert_close(distance(z, ocs), expected)
    torch.testing.assert_close(distance(z.sigmoid(), ocs, "probs"), expected)

    targets = torch.randn(300, 2, generator=gen, dtype=torch.float64) * 2 + 1
    gocs = OCS.gaussian_nll(targets)
    assert gocs.variance is not None
    mu = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    var = torch.rand(64, 2, generator=gen, dtype=torch.float64) + 0.1
    expected = dists.kl_divergence(
        dists.Normal(mu, var.sqrt()), dists.Normal(gocs.target, gocs.variance.sqrt())
    ).sum(-1)
    torch.testing.assert_close(distance(torch.cat([mu, var], 1), gocs), expected)


def test_mse_distance() -> None:
    ocs = OCS.mse(torch.tensor([[0.0, 2.0], [2.0, 4.0]]))
    out = torch.tensor([[1.0, 3.0], [3.0, 3.0]])
    torch.testing.assert_close(distance(out, ocs), torch.tensor([0.0, 2.0]))


def _float64_reference(name: str, z: torch.Tensor, ocs: OCS, temperature: float) -> torch.Tensor:
    """The textbook formulas in float64, independent of oodmon's single-pass arithmetic."""
    z = z.double()
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    pi, log_pi = ocs.target.double(), ocs.log_target.double()
    formulas = {
        "kl": lambda: (p * (log_p - log_pi)).sum(-1),
        "reverse_kl": lambda: (pi * (log_pi - log_p)).sum(-1),
        "entropy": lambda: -torch.xlogy(p, p).sum(-1),
        "energy": lambda: -temperature * torch.logsumexp(z / temperature, -1),
        "msp": lambda: -p.amax(-1),
    }
    return formulas[name]()


_SINGLE_PASS = {
    "kl": lambda z, ocs, t: S.kl_to_ocs(z, ocs),
    "reverse_kl": lambda z, ocs, t: S.reverse_kl_to_ocs(z, ocs),
    "entropy": lambda z, ocs, t: S.entropy(z),
    "energy": lambda z, ocs, t: S.energy(z, t),
    "msp": lambda z, ocs, t: S.msp(z),
}


def _logit_batch(style: str, k: int, ocs: OCS, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(128, k, generator=gen, dtype=torch.float64)
    assert (128 * k >= S._SINGLE_PASS_MIN_ELEMENTS) == (k == 1000)
    if style == "extreme":  # near one-hot rows, logits in the hundreds
        z = z * 300
    elif style == "shifted":  # a large constant on every logit must not cost precision
        z = z * 3 + 1000
    elif style == "near_ocs":  # distances of 1e-7..1e-3 nats: where cancellation would show
        z = ocs.log_target + 1e-3 * z + 7
    elif style == "peaked":
        z = z * 3
        z[:, 0] += 40
    else:
        z = z * 3
    return z.float()


@pytest.mark.parametrize("name", sorted(_SINGLE_PASS))
@pytest.mark.parametrize("k", [2, 10, 1000])
@pytest.mark.parametrize("style", ["normal", "extreme", "shifted", "near_ocs", "peaked"])
@pytest.mark.parametrize("prior", ["random", "tiny"])
def test_single_pass_scores_match_a_float64_reference(
    name: str, k: int, style: str, prior: str
) -> None:
    gen = torch.Generator().manual_seed(k * 7 + len(style))
    counts = torch.randint(1, 100, (k,), generator=gen)
    if prior == "tiny":  # one class at pi ~ 1e-11, kept by a low floor
        counts = counts * 10**9
        counts[0] = 1
    ocs = OCS.cross_entropy(counts=counts, floor=1e-12)
    z = _logit_batch(style, k, ocs, gen)  # k=1000: the single-pass branch; 2, 10: log_softmax
    z[5, 0] = float("-inf")  # a -inf logit makes its row invalid, as any non-finite value
    temperature = 2.5 if name == "energy" and style == "normal" else 1.0
    got = _SINGLE_PASS[name](z, ocs, temperature)
    expected = _float64_reference(name, z, ocs, temperature)
    assert got.dtype == torch.float32
    assert torch.isnan(got[5])
    keep = torch.arange(len(z)) != 5
    # float32 keeps 1e-5 relative; where the value itself is ~1e-6 nats (at the OCS) the
    # floor is a few float32 ulps of log K + log(1 / pi_min), as for the two-pass formulas
    torch.testing.assert_close(got[keep].double(), expected[keep], rtol=1e-5, atol=5e-6)
    # float64 inputs give float64 results to float64 precision
    torch.testing.assert_close(
        _SINGLE_PASS[name](z.double(), ocs, temperature)[keep], expected[keep],
        rtol=1e-10, atol=1e-10,
    )  # fmt: skip


# ---------------------------------------------------------------- sign contract


def _cases() -> list[tuple[str, OCS, torch.Tensor, torch.Tensor]]:
    """(score, OCS, an output at the OCS, a confident far-from-OCS output) per applicable pair."""
    ce = OCS.cross_entropy(counts=[40, 30, 20, 10])
    confident = torch.tensor([[12.0, -4.0, -4.0, -4.0]])
    bce = OCS.binary_cross_entropy([[0, 1], [1, 1], [0, 1], [0, 0]])
    mse = OCS.mse([[1.0, 2.0], [3.0, 4.0]])
    gauss = OCS.gaussian_nll([[1.0], [3.0], [2.0]])
    assert gauss.variance is not None
    reward = OCS.reward_prediction([0, 1, 1, 2], 3)
    at = {
        "cross_entropy": (ce, ce.log_target.float().unsqueeze(0), confident),
        "binary_cross_entropy": (
            bce,
            torch.logit(bce.target).float().unsqueeze(0),
            torch.tensor([[9.0, -9.0]]),
        ),
        "mse": (mse, mse.target.float().unsqueeze(0), torch.tensor([[9.0, -9.0]])),
        "gaussian_nll": (
            gauss,
            torch.cat([gauss.target, gauss.variance]).float().unsqueeze(0),
            torch.tensor([[9.0, 0.01]]),
        ),
        "reward_prediction": (
            reward,
            reward.target.float().unsqueeze(0),
            torch.tensor([[1.0, -4.0, -4.0, 0.0]]),
        ),
    }
    cases = []
    for name, spec in SCORES.items():
        for loss in spec.losses:
            if loss in at:
                ocs, near, far = at[loss]
                cases.append((name, ocs, near, far))
    return cases


@pytest.mark.parametrize(("name", "ocs", "near", "far"), _cases(), ids=lambda v: str(v)[:20])
def test_every_registered_score_says_higher_is_more_ood(
    name: str, ocs: OCS, near: torch.Tensor, far: torch.Tensor
) -> None:
    near_score = S.compute_score(name, near, ocs)
    far_score = S.compute_score(name, far, ocs)
    assert near_score.shape == far_score.shape == (1,)
    assert float(near_score) > float(far_score), f"{name}: an output at the OCS must score higher"


def test_every_registered_score_is_covered_by_the_contract() -> None:
    covered = {case[0] for case in _cases()}
    assert covered == set(SCORES)


@pytest.mark.parametrize(("name", "ocs", "near", "far"), _cases(), ids=lambda v: str(v)[:20])
def test_negated_distance_field_is_true_exactly_for_minus_distance(
    name: str, ocs: OCS, near: torch.Tensor, far: torch.Tensor
) -> None:
    outputs = torch.cat([near, far, 0.5 * (near + far)])
    score = S.compute_score(name, outputs, ocs)
    is_minus_distance = torch.equal(score, -distance(outputs, ocs))
    assert SCORES[name].negated_distance == is_minus_distance


@pytest.mark.parametrize(("name", "ocs", "near", "far"), _cases(), ids=lambda v: str(v)[:20])
def test_input_kinds_field_is_what_the_score_accepts(
    name: str, ocs: OCS, near: torch.Tensor, far: torch.Tensor
) -> None:
    accepted = SCORES[name].kinds_for(ocs.loss)
    assert set(accepted) <= set(S.INPUT_KINDS) and "logits" in accepted
    for kind in S.INPUT_KINDS:
        if kind in accepted:
            S.check_score(name, ocs, kind)
        else:
            with pytest.raises(ValueError, match="kind"):
                S.check_score(name, ocs, kind)


# ---------------------------------------------------------------- invariants (property tests)

finite_logits = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.lists(
        st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=4, max_size=4),
        min_size=n,
        max_size=n,
    )
)


@settings(max_examples=60, deadline=None)
@given(rows=finite_logits, seed=st.integers(0, 2**16))
def test_kl_properties(rows: list[list[float]], seed: int) -> None:
    ocs = OCS.cross_entropy(counts=[5, 3, 1, 1])
    z = torch.tensor(rows, dtype=torch.float64)
    for reverse in (False, True):
        d = distance(z, ocs, reverse=reverse)
        assert (d >= 0).all()
        perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(distance(z[perm], ocs, reverse=reverse), d[perm])
        alone = torch.cat([distance(row.unsqueeze(0), ocs, reverse=reverse) for row in z])
        torch.testing.assert_close(alone, d)
    at_ocs = ocs.log_target.unsqueeze(0) + torch.tensor(rows[0][0], dtype=torch.float64)
    assert distance(at_ocs, ocs).item() == pytest.approx(0.0, abs=1e-9)
    assert distance(at_ocs, ocs, reverse=True).item() == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- invalid rows, kinds, dtypes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "rows, layout",
    [(4, "row-major"), (4, "column-major"), (4000, "row-major"), (4000, "column-major")],
)
def test_nonfinite_rows_give_nan_and_leave_others_alone(
    bad: float, rows: int, layout: str, imbalanced: OCS
) -> None:
    # The NaN marks come from ``x @ 0`` inside BLAS: both memory layouts (BLAS's two GEMV
    # paths) and both sides of the single-pass size must propagate ``0 * inf`` as NaN.
    z = torch.randn(rows, K, generator=torch.Generator().manual_seed(1))
    if layout == "column-major":
        z = z.T.contiguous().T
    z_bad = z.clone()  # keeps the layout
    assert z_bad.is_contiguous() == (layout == "row-major")
    bad_rows = [1, rows - 1]
    z_bad[1, 3] = bad
    z_bad[rows - 1, K - 1] = bad
    good = [i for i in range(rows) if i not in bad_rows]
    for name in SCORES:
        clean = S.compute_score(name, z, imbalanced)
        dirty = S.compute_score(name, z_bad, imbalanced)
        assert torch.isnan(dirty[bad_rows]).all(), f"{name} scored a row holding {bad}"
        torch.testing.assert_close(dirty[good], clean[good])


def test_logit_only_scores_refuse_probabilities(imbalanced: OCS) -> None:
    p = torch.full((2, K), 0.1)
    for name in ("energy", "max_logit"):
        with pytest.raises(ValueError, match="needs outputs of kind"):
            S.compute_score(name, p, imbalanced, kind="probs")
    with pytest.raises(ValueError, match="`kind` to be one of"):
        S.msp(p, kind="softmax")  # type: ignore[arg-type]


def test_wrong_width_and_wrong_loss_are_explained(imbalanced: OCS) -> None:
    with pytest.raises(ValueError, match="Expected outputs with 10 columns.*got 7"):
        distance(torch.zeros(2, 7), imbalanced)
    with pytest.raises(ValueError, match="use `oodmon.distance`"):
        S.kl_to_ocs(torch.zeros(2, 2), OCS.mse([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="applies to"):
        S.compute_score("msp", torch.zeros(2, 2), OCS.mse([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="one of"):
        S.compute_score("nope", torch.zeros(2, K), imbalanced)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype, logits: torch.Tensor, imbalanced: OCS) -> None:
    z = logits[:64].to(dtype)
    reference = {name: S.compute_score(name, z.double(), imbalanced) for name in SCORES}
    for name in SCORES:
        got = S.compute_score(name, z, imbalanced)
        assert got.dtype in (torch.float32, torch.float64)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), reference[name], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_make_no_host_sync(logits: torch.Tensor, imbalanced: OCS) -> None:
    z = logits.float().cuda()
    S.compute_score("ocs_kl", z, imbalanced)  # warm-up: moves the OCS once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in SCORES:
            out = S.compute_score(name, z, imbalanced)
            assert out.device == z.device
        distance(z, imbalanced, reverse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_kind_mismatch_tells_probabilities_from_logits() -> None:
    from oodmon.scores import kind_mismatch

    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits.softmax(-1)
    log_probs = logits.log_softmax(-1)
    assert kind_mismatch(logits, "logits") is None
    assert kind_mismatch(log_probs, "logits") is None  # log-probabilities are logits
    assert kind_mismatch(probs, "logits") == "probs"
    assert kind_mismatch(probs.half(), "logits") == "probs"
    assert kind_mismatch(probs, "probs") is None
    assert kind_mismatch(logits, "probs") == "logits"
    assert kind_mismatch(log_probs, "probs") == "log_probs"
    assert kind_mismatch(log_probs, "log_probs") is None
    assert kind_mismatch(probs, "log_probs") == "probs"
    mixed = probs.clone()
    mixed[0] = logits[0]  # one row of the expected kind: not called a mismatch
    assert kind_mismatch(mixed, "probs") is None
    assert kind_mismatch(torch.full((4, 10), float("nan")), "logits") is None
    assert kind_mismatch(torch.zeros(4, 10), "logits") is None  # uniform logits
