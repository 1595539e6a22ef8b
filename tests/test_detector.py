"""Detector: calibration guarantees, persistence, errors (the p-value math: test_conformal)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import id_logits

from oodmon import OCS, Detector, FormatVersionError, NotFittedError
from oodmon.conformal import min_calibration_size, p_value_of_rank
from oodmon.verdict import HostVerdict

K = 10


def _id_logits(n: int, gen: torch.Generator) -> torch.Tensor:
    """Exchangeable "in-distribution" logits (see conftest.id_logits), from a generator."""
    return id_logits(n, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


@pytest.fixture(scope="module")
def fitted(ocs: OCS) -> Detector:
    return Detector(ocs, alpha=0.05).fit(_id_logits(999, torch.Generator().manual_seed(0)))


def test_p_values_match_brute_force(fitted: Detector) -> None:
    z = _id_logits(300, torch.Generator().manual_seed(1))
    verdict = fitted.predict(z)
    cal = fitted.calibration_scores_.numpy()
    s = verdict.score.double().numpy()
    expected = (1 + (cal[None, :] >= s[:, None]).sum(1)) / (cal.size + 1)
    np.testing.assert_allclose(verdict.p_value.numpy(), expected)
    assert torch.equal(verdict.flag, verdict.p_value <= 0.05)
    assert torch.equal(verdict.flag, verdict.score.double() > fitted.threshold_)
    torch.testing.assert_close(verdict.distance, -verdict.score)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.25])
def test_false_alarm_rate_is_at_most_alpha(ocs: OCS, alpha: float) -> None:
    """On exchangeable in-distribution data the flag rate stays <= alpha (within sampling error),
    and conformal calibration is nearly exact, so it is not far below either."""
    n_cal, n_test, repeats = 499, 400, 60
    rates = []
    for seed in range(repeats):
        gen = torch.Generator().manual_seed(1000 + seed)
        data = _id_logits(n_cal + n_test, gen)
        detector = Detector(ocs, alpha=alpha).fit(data[:n_cal])
        rates.append(detector.predict(data[n_cal:]).flag.double().mean().item())
    mean = float(np.mean(rates))
    # Var of the flag rate: Beta-distributed coverage (calibration) + binomial test noise.
    se = np.sqrt(alpha * (1 - alpha) * (1 / (n_cal + 2) + 1 / n_test) / repeats)
    exact = np.floor(alpha * (n_cal + 1)) / (n_cal + 1)
    assert mean <= alpha + 3 * se
    assert mean >= exact - 3 * se


def test_shifted_data_is_flagged(fitted: Detector, ocs: OCS) -> None:
    near_ocs = ocs.log_target.float().expand(50, K) + 0.05 * torch.randn(50, K)
    assert fitted.predict(near_ocs).flag.float().mean() > 0.9


def test_alpha_below_reachable_is_refused(ocs: OCS) -> None:
    data = _id_logits(50, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"below 1/\(n\+1\).*at least 99 in-distribution"):
        Detector(ocs, alpha=0.01).fit(data)
    assert min_calibration_size(0.01) == 99
    Detector(ocs, alpha=0.01).fit(_id_logits(99, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match=r"`alpha` in \(0, 1\)"):
        Detector(ocs, alpha=0.0)


def test_use_before_fit_says_what_to_call(ocs: OCS) -> None:
    with pytest.raises(NotFittedError, match=r"call `fit\(id_outputs\)`"):
        Detector(ocs).predict(torch.zeros(1, K))
    with pytest.raises(NotFittedError):
        Detector(ocs).save("never.json")


def test_class_count_mismatch_names_both_sizes(fitted: Detector) -> None:
    with pytest.raises(ValueError, match="10 columns.*but got 7"):
        fitted.predict(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="have 7 columns but the OCS has 10 outputs"):
        Detector(fitted.ocs).fit(torch.zeros(200, 7))


def test_invalid_rows_are_never_in_distribution(fitted: Detector) -> None:
    z = _id_logits(4, torch.Generator().manual_seed(3))
    z[2, 0] = float("nan")
    verdict = fitted.predict(z)
    assert verdict.invalid.tolist() == [False, False, True, False]
    assert not verdict.flag[2]
    assert torch.isnan(verdict.p_value[2]) and torch.isnan(verdict.distance[2])
    assert verdict.calibration_rank is not None and int(verdict.calibration_rank[2]) == -1


def test_the_calibration_rank_travels_with_the_verdict(fitted: Detector) -> None:
    z = _id_logits(50, torch.Generator().manual_seed(5))
    z[7, 1] = float("nan")
    host = fitted.predict(z).to_host()
    assert host.calibration_rank is not None and host.calibration_rank.dtype == np.int64
    valid = ~host.invalid
    n = fitted.n_calibration_
    assert np.array_equal(p_value_of_rank(n)[host.calibration_rank[valid]], host.p_value[valid])
    assert host.calibration_rank[7] == -1
    picked = host.take(np.array([7, 3]))
    assert picked.calibration_rank is not None
    assert picked.calibration_rank.tolist() == [-1, host.calibration_rank[3]]
    nothing = HostVerdict.all_invalid(2)
    assert nothing.calibration_rank is not None and nothing.calibration_rank.tolist() == [-1, -1]


def test_calibration_drops_invalid_rows(ocs: OCS) -> None:
    data = _id_logits(300, torch.Generator().manual_seed(4))
    data[:5, 0] = float("inf")
    detector = Detector(ocs).fit(data)
    assert detector.n_calibration_ == 295 and detector.n_dropped_ == 5
    with pytest.raises(ValueError, match="every row was NaN"):
        Detector(ocs).fit(torch.full((30, K), float("nan")))


@pytest.mark.parametrize(
    "score", ["ocs_kl", "ocs_kl_reverse", "msp", "energy", "entropy", "max_logit"]
)
def test_json_round_trip_gives_identical_verdicts(ocs: OCS, score: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(5)
    detector = Detector(ocs, score=score, alpha=0.1, temperature=1.5).fit(_id_logits(400, gen))
    path = detector.save(tmp_path / "detector.json")
    loaded = Detector.load(path)
    z = _id_logits(200, gen)
    a, b = detector.predict(z), loaded.predict(z)
    for field in ("score", "distance", "p_value", "flag", "invalid", "predicted"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert loaded.calibration_hash_ == detector.calibration_hash_
    assert json.loads(path.read_text())["format_version"] == 1


def test_loading_bad_files_is_explained(fitted: Detector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = fitted.to_dict()
    old = dict(data, format_version=0)
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(FormatVersionError, match="recalibrate"):
        Detector.load(tmp_path / "old.json")
    edited = json.loads(json.dumps(data))
    edited["calibration"]["scores"][0] -= 1.0
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="hash does not match"):
        Detector.load(tmp_path / "edited.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Detector.load(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError):
        Detector.load(tmp_path / "missing.json")


def test_with_alpha_reuses_calibration(fitted: Detector) -> None:
    looser = fitted.with_alpha(0.2)
    z = _id_logits(500, torch.Generator().manual_seed(6))
    assert torch.equal(looser.predict(z).p_value, fitted.predict(z).p_value)
    assert looser.predict(z).flag.sum() >= fitted.predict(z).flag.sum()


def test_numpy_probabilities(ocs: OCS) -> None:
    gen = torch.Generator().manual_seed(7)
    probs = _id_logits(300, gen).softmax(-1).numpy()
    detector = Detector(ocs, kind="probs").fit(probs[:200])
    from_logits = Detector(ocs).fit(np.log(probs[:200]))
    torch.testing.assert_close(
        detector.predict(probs[200:]).p_value, from_logits.predict(np.log(probs[200:])).p_value
    )


def test_regression_head_detector() -> None:
    gen = torch.Generator().manual_seed(8)
    targets = torch.randn(500, 2, generator=gen) * 3
    ocs = OCS.mse(targets)
    outputs = targets + torch.randn(500, 2, generator=gen) * 0.5  # a decent regressor
    detector = Detector(ocs).fit(outputs[:300])
    assert detector.score == "ocs_distance"
    verdict = detector.predict(ocs.target.float().expand(20, 2))
    assert verdict.flag.all() and (verdict.predicted == -1).all()


def test_invalid_rows_have_no_predicted_class(fitted: Detector) -> None:
    z = _id_logits(3, torch.Generator().manual_seed(10))
    z[1, 4] = float("nan")
    verdict = fitted.predict(z)
    assert verdict.predicted[1] == -1 and (verdict.predicted[[0, 2]] >= 0).all()


def test_infinite_scores_are_extremes_not_invalid(ocs: OCS, tmp_path) -> None:  # type: ignore[no-untyped-def]
    probs = _id_logits(300, torch.Generator().manual_seed(11)).softmax(-1)
    probs[:3, 0] = 0.0  # an exact zero where pi > 0: the reverse KL is +inf
    probs[:3] /= probs[:3].sum(-1, keepdim=True)
    detector = Detector(ocs, score="ocs_kl_reverse", kind="probs").fit(probs[:200])
    verdict = detector.predict(probs[:3])
    assert not verdict.invalid.any() and torch.isfinite(verdict.p_value).all()
    assert (verdict.p_value == 1.0).all()  # infinitely far from the OCS: most in-distribution
    path = detector.save(tmp_path / "d.json")
    assert "Infinity" not in path.read_text()
    assert torch.equal(Detector.load(path).predict(probs[:3]).p_value, verdict.p_value)


def test_log_probabilities_with_exact_zeros_are_valid(ocs: OCS) -> None:
    from oodmon import scores as S

    p = torch.tensor([[0.7, 0.3] + [0.0] * 8])
    for name in ("ocs_kl", "msp", "entropy"):
        from_probs = S.compute_score(name, p, ocs, kind="probs")
        from_logs = S.compute_score(name, p.log(), ocs, kind="log_probs")
        assert torch.isfinite(from_logs).all(), name
        torch.testing.assert_close(from_logs, from_probs)
    nan_row = torch.full((1, 10), float("nan"))
    assert torch.isnan(S.compute_score("ocs_kl", nan_row, ocs, kind="log_probs")).all()


def test_scores_ignore_the_callers_autocast(fitted: Detector) -> None:
    z = _id_logits(256, torch.Generator().manual_seed(12))
    plain = fitted.predict(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fitted.predict(z)
    assert torch.equal(plain.score, under_autocast.score)
    assert torch.equal(plain.flag, under_autocast.flag)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ocs: Detector(ocs, score="energy", temperature=0), "`temperature` > 0"),
        (
            lambda ocs: Detector(OCS.binary_cross_entropy([[0, 1], [1, 1]]), kind="log_probs"),
            "needs outputs of kind",
        ),
        (lambda ocs: Detector(OCS.mse([[1.0], [2.0]]), kind="probs"), "needs outputs of kind"),
        (lambda ocs: Detector(ocs).fit(torch.zeros(0, 10)), "got 0 rows"),
        (lambda ocs: Detector(ocs, kind="probs").fit(-torch.ones(300, 10)), "match kind='probs'"),
        (lambda ocs: OCS.cross_entropy(counts=[3, 0, 1], floor=0.0), "`floor` > 0"),
        (lambda ocs: OCS.cross_entropy(counts=[3, 1], floor=0.6), r"`floor` in \[0, 1/K\)"),
        (lambda ocs: OCS.binary_cross_entropy([[0, 1]], floor=0.7), r"`floor` in \[0, 0.5\)"),
    ],
)
def test_construction_errors_come_early_and_clear(call, message: str, ocs: OCS) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call(ocs)


def test_numpy_numbers_are_accepted(ocs: OCS) -> None:
    detector = Detector(ocs, alpha=np.float32(0.05))
    assert detector.alpha == pytest.approx(0.05)
    assert OCS.cross_entropy(counts=[3, 1], floor=0).target.min() > 0
    assert OCS.cross_entropy(counts=[3, 1], floor=np.float64(1e-3)).floor == 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_predict_makes_no_host_sync(fitted: Detector) -> None:
    z = _id_logits(256, torch.Generator().manual_seed(13)).cuda()
    fitted.predict(z)  # warm-up: moves the calibration scores and OCS constants once
    torch.cuda.set_sync_debug_mode("error")
    try:
        verdict = fitted.predict(z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert verdict.flag.device == z.device
    reference = fitted.predict(z.cpu())
    assert torch.equal(verdict.flag.cpu(), reference.flag)


def _set(data: dict, path: str, value: object) -> dict:  # type: ignore[type-arg]
    edited = json.loads(json.dumps(data))
    *parents, last = path.split(".")
    node = edited
    for part in parents:
        node = node[part]
    node[last] = value
    return edited


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("ocs.target", [float("nan")] * K, "target to be finite"),
        ("ocs.target", [-0.1] + [1.1 / (K - 1)] * (K - 1), "class probabilities in"),
        ("ocs.target", [0.5] * K, "summing to 1"),
        ("ocs.target", [], "non-empty"),
        ("ocs.floor", -1.0, "floor to be in"),
        ("ocs.num_train", 1e400, "corrupted"),
        ("alpha", float("nan"), "alpha"),
        ("alpha", 1.5, "alpha"),
        ("alpha", -0.05, "alpha"),
        ("temperature", float("inf"), "temperature"),
        ("calibration.scores", [float("nan")] * 999, "finite calibration scores"),
        ("calibration.scores", [0.0] * 5, "Expected 999 calibration scores"),
        ("calibration.n", -1, "calibration.n"),
        ("calibration.n", 1e400, "calibration.n"),
        ("calibration.dropped", "many", "calibration.dropped"),
    ],
)
def test_forged_values_are_refused_at_load(  # type: ignore[no-untyped-def]
    fitted: Detector, tmp_path, path: str, value: object, message: str
) -> None:
    file = tmp_path / "forged.json"
    file.write_text(json.dumps(_set(fitted.to_dict(), path, value)))
    with pytest.raises(ValueError, match=message):
        Detector.load(file)


def test_hostile_json_becomes_a_clear_load_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        Detector.load(deep)
    huge = tmp_path / "huge.json"
    huge.write_text('{"format": "oodmon.detector", "n": ' + "9" * 5000 + "}")
    with pytest.raises(ValueError, match="not a detector"):
        Detector.load(huge)
    monkeypatch.setattr("oodmon.detector.MAX_DETECTOR_BYTES", 2 * 2**20)
    big = tmp_path / "big.json"
    big.write_text(" " * 3 * 2**20)
    with pytest.raises(ValueError, match=r"at most 2 MiB, but .* is 3.0 MiB"):
        Detector.load(big)


def test_a_vector_of_the_wrong_length_is_not_called_columns(fitted: Detector) -> None:
    with pytest.raises(ValueError, match=r"1-D array of 400 values: .* reshape it to \[40, 10\]"):
        fitted.predict(torch.zeros(400))
    with pytest.raises(ValueError, match="1-D array of 7 values: pass a 2-D"):
        fitted.predict(np.zeros(7))


def _long_tailed_counts(ratio: float) -> list[int]:
    return [round(1000 * ratio ** (-k / 9)) for k in range(10)]


def test_default_score_on_long_tailed_labels_advises_the_reverse_kl(caplog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from oodmon.detector import SKEWED_MARGINAL_NATS, marginal_skew

    skewed = OCS.cross_entropy(counts=_long_tailed_counts(20))
    balanced = OCS.cross_entropy(counts=[100] * 10)
    assert marginal_skew(balanced) == pytest.approx(0.0, abs=1e-12)
    assert marginal_skew(skewed) == pytest.approx(0.358, abs=0.002)  # the experiments' split
    assert marginal_skew(OCS.cross_entropy(counts=_long_tailed_counts(3))) < SKEWED_MARGINAL_NATS
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        Detector(balanced)
        Detector(skewed, score="ocs_kl")  # chosen explicitly: no advice
        Detector(skewed, score="ocs_kl_reverse")
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        detector = Detector(skewed)
    assert detector.score == "ocs_kl"  # the default itself is unchanged
    (record,) = caplog.records
    assert "ocs_kl_reverse" in record.getMessage() and "0.36 nats" in record.getMessage()
    caplog.clear()
    logits = torch.randn(200, 10)
    path = detector.fit(logits).save(tmp_path / "d.json")
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        Detector.load(path)  # a saved detector names its score
    assert caplog.records == []
