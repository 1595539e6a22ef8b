"""OCS: closed forms, the numerical fallback that must agree with them, validation, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodmon import OCS, FormatVersionError, distance, reward_targets

K = 5


@pytest.fixture
def labels() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # imbalanced on purpose: the OCS must be the marginal, not uniform
    probs = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08])
    return torch.multinomial(probs, 2000, replacement=True, generator=gen)


def test_cross_entropy_is_label_marginal(labels: torch.Tensor) -> None:
    ocs = OCS.cross_entropy(labels, K)
    expected = torch.bincount(labels, minlength=K).double() / labels.numel()
    torch.testing.assert_close(ocs.target, expected)
    assert ocs.num_train == 2000
    assert ocs.num_outputs == K


def test_counts_and_labels_agree(labels: torch.Tensor) -> None:
    counts = torch.bincount(labels, minlength=K)
    assert OCS.cross_entropy(counts=counts) == OCS.cross_entropy(labels, K)
    assert OCS.cross_entropy(counts=counts.tolist(), num_classes=K) == OCS.cross_entropy(labels, K)


def test_label_smoothing_formula(labels: torch.Tensor) -> None:
    eps = 0.1
    pi = OCS.cross_entropy(labels, K).target
    smoothed = OCS.cross_entropy(labels, K, label_smoothing=eps).target
    torch.testing.assert_close(smoothed, (1 - eps) * pi + eps / K)


def test_unseen_class_gets_documented_floor_and_finite_distance() -> None:
    ocs = OCS.cross_entropy(torch.tensor([0, 0, 1, 1]), 3)
    assert ocs.target[2].item() == pytest.approx(1e-6, rel=1e-3)
    assert ocs.target.sum().item() == pytest.approx(1.0)
    confident_in_unseen = torch.tensor([[-10.0, -10.0, 10.0]])
    d = distance(confident_in_unseen, ocs)
    assert torch.isfinite(d).all()
    # about log(1 / floor): large, but finite and documented
    assert d.item() == pytest.approx(math.log(1 / 1e-6), rel=0.01)


def test_other_closed_forms() -> None:
    gen = torch.Generator().manual_seed(1)
    multi = (torch.rand(500, 4, generator=gen) < torch.tensor([0.1, 0.5, 0.7, 0.9])).double()
    torch.testing.assert_close(OCS.binary_cross_entropy(multi).target, multi.mean(0))
    y = torch.randn(500, 3, generator=gen, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(OCS.mse(y).target, y.mean(0))
    gauss = OCS.gaussian_nll(y)
    torch.testing.assert_close(gauss.target, y.mean(0))
    assert gauss.variance is not None
    torch.testing.assert_close(gauss.variance, y.var(0, unbiased=False))
    assert gauss.num_outputs == 6


def test_reward_prediction_is_five_pi_minus_four(labels: torch.Tensor) -> None:
    ocs = OCS.reward_prediction(labels, K, wrong_cost=4.0)
    pi = torch.bincount(labels, minlength=K).double() / labels.numel()
    torch.testing.assert_close(ocs.target[:K], 5 * pi - 4)
    assert ocs.target[K].item() == 0.0
    # reverting to the OCS means abstaining: every label action is worse than abstain
    assert int(ocs.target.argmax()) == K
    rewards = reward_targets(labels, K, 4.0)
    torch.testing.assert_close(rewards.double().mean(0), ocs.target)


# ---------------------------------------------------------------- numeric fallback


def test_fit_matches_cross_entropy(labels: torch.Tensor) -> None:
    fitted = OCS.fit(F.cross_entropy, labels, K)
    torch.testing.assert_close(
        fitted.target.softmax(0), OCS.cross_entropy(labels, K).target, atol=1e-4, rtol=0
    )


def test_fit_matches_label_smoothing(labels: torch.Tensor) -> None:
    fitted = OCS.fit(lambda o, y: F.cross_entropy(o, y, label_smoothing=0.2), labels, K)
    closed = OCS.cross_entropy(labels, K, label_smoothing=0.2).target
    torch.testing.assert_close(fitted.target.softmax(0), closed, atol=1e-4, rtol=0)


def test_fit_matches_binary_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(2)
    y = (torch.rand(800, 3, generator=gen) < torch.tensor([0.2, 0.5, 0.85])).double()
    fitted = OCS.fit(F.binary_cross_entropy_with_logits, y, 3)
    closed = OCS.binary_cross_entropy(y).target
    torch.testing.assert_close(fitted.target.sigmoid(), closed, atol=1e-4, rtol=0)


def test_fit_matches_mse() -> None:
    y = torch.randn(300, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fitted = OCS.fit(F.mse_loss, y, 4)
    torch.testing.assert_close(fitted.target, OCS.mse(y).target, atol=1e-4, rtol=0)


def test_fit_matches_gaussian_nll() -> None:
    y = torch.randn(400, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = y * torch.tensor([0.5, 3.0]) + torch.tensor([1.0, -2.0])

    def nll(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # mean head and log-variance head (keeps the variance positive while optimising)
        return F.gaussian_nll_loss(out[:, :2], target, out[:, 2:].exp(), full=True)

    fitted = OCS.fit(nll, y, 4)
    closed = OCS.gaussian_nll(y)
    assert closed.variance is not None
    torch.testing.assert_close(fitted.target[:2], closed.target, atol=1e-4, rtol=0)
    torch.testing.assert_close(fitted.target[2:].exp(), closed.variance, atol=1e-4, rtol=1e-4)


def test_fit_matches_reward_prediction(labels: torch.Tensor) -> None:
    rewards = reward_targets(labels, K, 4.0).double()
    fitted = OCS.fit(F.mse_loss, rewards, K + 1)
    closed = OCS.reward_prediction(labels, K, 4.0).target
    torch.testing.assert_close(fitted.target, closed, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: OCS.cross_entropy([], 3), "non-empty `labels`"),
        (lambda: OCS.cross_entropy([0, 1, 3], 3), r"`labels` in \[0, 3\).*\[0, 3\]"),
        (lambda: OCS.cross_entropy([0, -1], 3), r"`labels` in \[0, 3\)"),
        (lambda: OCS.cross_entropy([0.5, 1.0], 3), "integer class `labels`"),
        (lambda: OCS.cross_entropy([0, 1], 0), "`num_classes` to be a positive integer"),
        (lambda: OCS.cross_entropy([0, 1], 2.0), "`num_classes` to be a positive integer"),
        (lambda: OCS.cross_entropy(counts=[3, -1, 2]), "`counts` to be non-negative integers"),
        (lambda: OCS.cross_entropy(counts=[3, 1.5]), "`counts` to be non-negative integers"),
        (lambda: OCS.cross_entropy(counts=[0, 0]), "sum to more than 0"),
        (lambda: OCS.cross_entropy(counts=[1, 2], num_classes=3), "Expected 3 `counts`"),
        (lambda: OCS.cross_entropy([0], 2, counts=[1, 1]), "exactly one of `labels` or `counts`"),
        (lambda: OCS.cross_entropy([0], 2, label_smoothing=1.0), "`label_smoothing`"),
        (lambda: OCS.mse([[1.0], [float("nan")]]), "finite `targets`"),
        (lambda: OCS.binary_cross_entropy([[0.0], [float("nan")]]), "finite `targets`"),
        (lambda: OCS.binary_cross_entropy([[0.0], [2.0]]), r"`targets` in \[0, 1\]"),
        (lambda: OCS.gaussian_nll([[1.0]]), "at least 2 `targets`"),
        (lambda: OCS.gaussian_nll([[1.0], [float("inf")]]), "finite `targets`"),
        (lambda: OCS.reward_prediction([0, 1], 2, wrong_cost=-1), "`wrong_cost`"),
        (lambda: OCS.fit(F.mse_loss, torch.tensor([[float("nan")]]), 1), "finite `targets`"),
        (lambda: OCS.fit(F.mse_loss, torch.zeros(0, 1), 1), "non-empty `targets`"),
    ],
)
def test_bad_input_gets_clear_value_error(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize(
    "ocs",
    [
        OCS.cross_entropy([0, 1, 1, 2], 4, label_smoothing=0.05),
        OCS.binary_cross_entropy([[0, 1], [1, 1]]),
        OCS.mse([[1.0, 2.0], [3.0, 5.0]]),
        OCS.gaussian_nll([[1.0], [2.0], [4.0]]),
        OCS.reward_prediction([0, 1, 1], 2),
        OCS.fit(F.mse_loss, torch.tensor([[1.0], [3.0]]), 1),
    ],
    ids=lambda o: o.loss,
)
def test_json_round_trip_is_exact(ocs: OCS) -> None:
    text = json.dumps(ocs.to_dict())
    back = OCS.from_json(text)
    assert back == ocs
    assert torch.equal(back.target, ocs.target.double())


def test_format_version_mismatch_is_explained() -> None:
    data = OCS.cross_entropy([0, 1], 2).to_dict()
    data["format_version"] = 99
    with pytest.raises(FormatVersionError, match="format version 1, but got 99"):
        OCS.from_dict(data)
    with pytest.raises(ValueError, match="oodmon.ocs"):
        OCS.from_dict({"loss": "mse"})


def test_numpy_inputs_are_accepted() -> None:
    ocs = OCS.cross_entropy(np.array([0, 1, 1, 2]), 3)
    torch.testing.assert_close(ocs.target, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
