"""Cautious decisions on rotating MNIST, compared at matched operating points.

    python experiments/cautious_decisions.py          # 5 seeds, 13 angles (runtime in the .md)
    python experiments/cautious_decisions.py --quick  # 1 seed, 3 angles, small splits (the tests)

The decision experiment of Kang et al. (ICLR 2024), on rotated digits instead of CIFAR10-C.
Actions are the 10 digits plus abstain; reward +1 for the right digit, -4 for a wrong one, 0 for
abstaining. Two networks with the same architecture, optimiser and number of epochs:

* a standard cross-entropy classifier (10 outputs);
* a reward-prediction head (11 outputs) regressing the reward of every action with MSE. Its OCS
  is "abstain" (reward 0 beats 5 * 0.1 - 4), so reverting to the OCS means abstaining.

Abstaining is a trade: every policy can buy safety on rotated digits by abstaining more on
upright ones. So the policies are compared along risk-coverage curves (reward and accuracy of
the answered digits against the abstention rate on upright digits, the threshold set on upright
calibration digits) and in a table at the matched point: the reward head's own upright
abstention rate. The abstain rules thresholded are

* standard + MSP: abstain when the max softmax probability is low;
* standard + oodmon: abstain when a Detector (score ``ocs_kl``) flags the input, at
  ``alpha`` = the target rate (conformal p-values from the calibration digits);
* reward head: abstain when the predicted abstain reward minus the best digit's is high (its
  native policy, argmax over the 11 outputs, is the threshold 0).

Also reported: the native rules of the first round (MSP <= c / (c + 1) = 0.8; oodmon at
alpha = 0.05) and an oracle (temperature fitted on *labelled rotated* calibration digits, then
MSP <= 0.8), which no deployed model could use.

Writes cautious_decisions.json, cautious_decisions.md and cautious_decisions*.png under --out.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize
from tqdm import tqdm

from oodmon import OCS, Detector, distance, reward_targets

mnist = common.mnist

ABSTAIN = 10
#: Abstain rules swept along the risk-coverage curves.
CURVES = ("standard_msp", "standard_oodmon", "reward_head")
#: Policies in the matched-point table.
POLICIES = (
    "standard",
    "reward_head_native",
    "standard_msp_matched",
    "standard_oodmon_matched",
    "standard_msp_0.8",
    "standard_oodmon_alpha_0.05",
    "oracle",
)
LABELS = {
    "standard": "standard (argmax, never abstains)",
    "reward_head": "reward head, thresholded",
    "reward_head_native": "reward head, native (argmax of 11 outputs)",
    "standard_msp": "standard + MSP threshold",
    "standard_oodmon": "standard + oodmon flag",
    "standard_msp_matched": "standard + MSP threshold at the matched rate",
    "standard_oodmon_matched": "standard + oodmon flag at alpha = the matched rate",
    "standard_msp_0.8": "standard + MSP <= 0.8 (first round's rule)",
    "standard_oodmon_alpha_0.05": "standard + oodmon flag at alpha = 0.05 (first round's rule)",
    "oracle": "oracle (T fitted on labelled rotated digits, MSP <= 0.8)",
}


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    angles: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))
    split_sizes: dict[str, int] = field(default_factory=lambda: dict(mnist.DEFAULT_SPLIT_SIZES))
    epochs: int = 8  # both networks: equal training budgets
    batch_size: int = 64
    lr: float = 1e-3
    # Both networks are the same SmallCNN without dropout: dropout noise on the penultimate
    # layer makes the MSE head shrink its reward predictions towards its OCS even on upright
    # digits (it abstained on ~80% of them after 6 epochs with dropout 0.5).
    dropout: float = 0.0
    wrong_cost: float = 4.0  # reward -c for a wrong digit, +1 right, 0 abstain
    alpha: float = 0.05  # the first round's oodmon rule
    # target abstention rates on upright digits along the curves (the matched rate is added)
    rates: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    curve_angles: tuple[float, ...] = (0.0, 45.0, 90.0, 180.0)  # panels of the curve figure
    shifted_from: float = 45.0  # "averaged over shifted angles" starts here


QUICK = Config(
    seeds=(0,),
    angles=(0.0, 90.0, 180.0),
    split_sizes={"train": 1500, "calibration": 400, "test": 400},
    epochs=3,
    rates=(0.0, 0.1, 0.3, 0.6),
    curve_angles=(0.0, 90.0),
    shifted_from=90.0,
)


def rewards_of(actions: torch.Tensor, labels: torch.Tensor, wrong_cost: float) -> torch.Tensor:
    """Per-sample reward of the chosen actions (index 10 = abstain)."""
    right = (actions == labels).to(torch.float64)
    answered = (actions != ABSTAIN).to(torch.float64)
    return answered * (right * (1.0 + wrong_cost) - wrong_cost)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` (a 1-D search over log T)."""
    z, y = logits.to(torch.float64), labels

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y).item())

    result = optimize.minimize_scalar(nll, bounds=(-4.0, 6.0), method="bounded")
    return float(math.exp(result.x))


def abstain_scores(
    logits: torch.Tensor, rewards: torch.Tensor, detector: Detector
) -> dict[str, torch.Tensor]:
    """Per rule, a score where higher means "abstain sooner"."""
    return {
        "standard_msp": -torch.softmax(logits, dim=1).amax(dim=1),
        "standard_oodmon": detector.score_outputs(logits),
        "reward_head": rewards[:, ABSTAIN] - rewards[:, :ABSTAIN].max(dim=1).values,
    }


def outcome(chosen: torch.Tensor, labels: torch.Tensor, wrong_cost: float) -> dict[str, float]:
    """Mean reward, abstain rate and accuracy of the answered digits (NaN if none answered)."""
    answered = chosen != ABSTAIN
    right = (chosen == labels) & answered
    n = int(answered.sum().item())
    return {
        "mean_reward": rewards_of(chosen, labels, wrong_cost).mean().item(),
        "abstain_rate": 1.0 - n / len(labels),
        "answered_accuracy": right.sum().item() / n if n else float("nan"),
    }


def train_both(
    data: mnist.MnistData, split: dict[str, torch.Tensor], cfg: Config, seed: int, progress: bool
) -> dict[str, mnist.SmallCNN]:
    train_x = mnist.to_model_input(data.images[split["train"]])
    train_y = data.labels[split["train"]]
    models = {}
    for name, outputs, loss, targets in (
        ("standard", 10, "cross_entropy", train_y),
        ("reward", 11, "mse", reward_targets(train_y, 10, cfg.wrong_cost)),
    ):
        torch.manual_seed(seed)
        model = mnist.SmallCNN(outputs, dropout=cfg.dropout)
        mnist.train(
            model,
            train_x,
            targets,
            loss=loss,  # type: ignore[arg-type]
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=seed,
            progress=progress,
        )
        models[name] = model
    return models


def run_seed(data: mnist.MnistData, cfg: Config, seed: int, progress: bool) -> dict[str, Any]:
    split = mnist.split_indices(len(data), cfg.split_sizes, seed=seed, labels=data.labels)
    models = train_both(data, split, cfg, seed, progress)
    train_y = data.labels[split["train"]]
    ocs = OCS.cross_entropy(train_y, 10)
    reward_ocs = OCS.reward_prediction(train_y, 10, cfg.wrong_cost)
    cal_images, cal_y = data.images[split["calibration"]], data.labels[split["calibration"]]
    test_images, test_y = data.images[split["test"]], data.labels[split["test"]]
    cal_x = mnist.to_model_input(cal_images)
    cal_logits = mnist.predict_logits(models["standard"], cal_x)
    cal_rewards = mnist.predict_logits(models["reward"], cal_x)
    detector = Detector(ocs, alpha=cfg.alpha).fit(cal_logits)
    cal_scores = abstain_scores(cal_logits, cal_rewards, detector)
    # the matched rate: how often the reward head abstains on upright calibration digits
    matched = float((cal_rewards.argmax(dim=1) == ABSTAIN).double().mean().item())
    rates = sorted({*cfg.rates, matched})
    n_cal = len(cal_y)

    def threshold(rule: str, rate: float) -> float:
        """Abstain when the score exceeds this: the upright calibration (1 - rate) quantile."""
        if rate <= 0:
            return math.inf
        return float(np.quantile(cal_scores[rule].numpy(), 1.0 - rate, method="higher"))

    def detector_at(rate: float) -> Detector | None:
        # conformal alpha cannot go below 1 / (n + 1): there the rule never abstains
        return detector.with_alpha(rate) if rate >= 1.0 / (n_cal + 1) else None

    thresholds = {r: {rule: threshold(rule, r) for rule in CURVES} for r in rates}
    detectors = {r: detector_at(r) for r in rates}
    prob_cut = cfg.wrong_cost / (cfg.wrong_cost + 1.0)
    keys = ("mean_reward", "abstain_rate", "answered_accuracy")
    curves: dict[str, Any] = {rule: {k: [[] for _ in rates] for k in keys} for rule in CURVES}
    table: dict[str, Any] = {p: {k: [] for k in keys} for p in POLICIES}
    extra: dict[str, Any] = {
        "accuracy_standard": [],
        "accuracy_reward_head_digits": [],
        "oracle_temperature": [],
        "reward_head_distance_to_ocs": [],
    }
    for angle in tqdm(cfg.angles, desc=f"seed {seed}", leave=False, disable=not progress):
        x = common.rotated_inputs(test_images, angle)
        logits = mnist.predict_logits(models["standard"], x)
        rewards = mnist.predict_logits(models["reward"], x)
        scores = abstain_scores(logits, rewards, detector)
        answer = {
            "standard_msp": logits.argmax(dim=1),
            "standard_oodmon": logits.argmax(dim=1),
            "reward_head": rewards[:, :ABSTAIN].argmax(dim=1),
        }
        abstain = torch.full_like(answer["standard_msp"], ABSTAIN)
        for j, rate in enumerate(rates):
            for rule in CURVES:
                if rule == "standard_oodmon":
                    det = detectors[rate]
                    flag = det.predict(logits).flag if det is not None else None
                else:
                    flag = scores[rule] > thresholds[rate][rule]
                chosen = answer[rule] if flag is None else torch.where(flag, abstain, answer[rule])
                for k, v in outcome(chosen, test_y, cfg.wrong_cost).items():
                    curves[rule][k][j].append(v)
        temperature = fit_temperature(
            mnist.predict_logits(models["standard"], common.rotated_inputs(cal_images, angle)),
            cal_y,
        )
        max_prob = torch.softmax(logits, dim=1).amax(dim=1)
        oracle_prob = torch.softmax(logits / temperature, dim=1).amax(dim=1)
        at_matched = rates.index(matched)
        det_m, argmax = detectors[matched], answer["standard_msp"]
        actions = {
            "standard": argmax,
            "reward_head_native": rewards.argmax(dim=1),
            "standard_msp_matched": torch.where(
                scores["standard_msp"] > thresholds[rates[at_matched]]["standard_msp"],
                abstain,
                argmax,
            ),
            "standard_oodmon_matched": argmax
            if det_m is None
            else torch.where(det_m.predict(logits).flag, abstain, argmax),
            "standard_msp_0.8": torch.where(max_prob <= prob_cut, abstain, argmax),
            "standard_oodmon_alpha_0.05": torch.where(
                detector.predict(logits).flag, abstain, argmax
            ),
            "oracle": torch.where(oracle_prob <= prob_cut, abstain, argmax),
        }
        for policy, chosen in actions.items():
            for k, v in outcome(chosen, test_y, cfg.wrong_cost).items():
                table[policy][k].append(v)
        extra["accuracy_standard"].append((argmax == test_y).double().mean().item())
        extra["accuracy_reward_head_digits"].append(
            (answer["reward_head"] == test_y).double().mean().item()
        )
        extra["oracle_temperature"].append(temperature)
        extra["reward_head_distance_to_ocs"].append(distance(rewards, reward_ocs).mean().item())
    return {
        "matched_rate": matched,
        "rates": rates,
        "curves": curves,
        "table": table,
        "extra": extra,
        "reward_ocs": [round(v, 6) for v in reward_ocs.target.tolist()],
    }


def advantage(per_seed: list[dict[str, Any]], angles: list[float], start: float) -> dict[str, Any]:
    """Reward head (native) minus each matched rule, mean over angles >= start, per seed."""
    shifted = [i for i, a in enumerate(angles) if a >= start]
    out: dict[str, Any] = {}
    for rival in ("standard_msp_matched", "standard_oodmon_matched", "standard"):
        diffs = []
        for run in per_seed:
            head = np.asarray(run["table"]["reward_head_native"]["mean_reward"])[shifted]
            other = np.asarray(run["table"][rival]["mean_reward"])[shifted]
            diffs.append(float((head - other).mean()))
        out[rival] = common.summarize(diffs)
        out[rival]["positive_seeds"] = int(sum(d > 0 for d in diffs))
    return out


# ---------------------------------------------------------------------- figures

_COLORS = {"standard_msp": "C0", "standard_oodmon": "C2", "reward_head": "C1"}


def plot_curves(result: dict[str, Any], path: Any) -> None:
    """Reward and answered accuracy against the upright abstention rate, one panel per angle."""
    import matplotlib.pyplot as plt

    angles, cfg = result["angles"], result["config"]
    panels = [a for a in cfg["curve_angles"] if a in angles]
    n_seeds = len(result["seeds"])
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 6.4), squeeze=False)
    curves = result["curves"]
    rates = np.asarray(result["rates"])
    matched = result["matched_rate"]["mean"]
    for c, angle in enumerate(panels):
        i = angles.index(angle)
        for r, key in enumerate(("mean_reward", "answered_accuracy")):
            ax = axes[r][c]
            for rule in CURVES:
                stat = curves[rule][key]
                mean = np.array([_value(m[i]) for m in stat["mean"]])
                half = np.array([_value(h[i]) for h in stat["ci95"]])
                ax.plot(rates, mean, "-", marker=".", color=_COLORS[rule], label=LABELS[rule])
                ax.fill_between(rates, mean - half, mean + half, color=_COLORS[rule], alpha=0.15)
            native = result["table"]["reward_head_native"][key]
            ax.errorbar(
                [result["native_upright_abstain_rate"]],
                [native["mean"][i]],
                yerr=[native["ci95"][i]],
                fmt="*",
                ms=10,
                color="C3",
                label="reward head, native policy",
            )
            ax.axvline(matched, color="grey", lw=0.8, ls=":", label="matched rate")
            ax.set_title(f"{angle:g}°", fontsize=10)
            ax.grid(alpha=0.3)
            if r == 1:
                ax.set_xlabel("abstention rate on upright digits")
        axes[0][0].set_ylabel("mean reward (+1 / -4 / 0)")
        axes[1][0].set_ylabel("accuracy of answered digits")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8)
    fig.suptitle(
        "Risk-coverage on rotated MNIST: thresholds set on upright calibration digits\n"
        f"bands and bars: {common.interval_note(n_seeds)}",
        fontsize=10,
    )
    fig.tight_layout()
    common.save_figure(fig, path)


def _value(v: float | None) -> float:
    return np.nan if v is None else float(v)


def plot_matched(result: dict[str, Any], path: Any) -> None:
    """Reward and abstain rate against angle at the matched operating point."""
    import matplotlib.pyplot as plt

    angles = result["angles"]
    table = result["table"]
    shown = (
        ("standard", "C7", "-"),
        ("reward_head_native", "C1", "-"),
        ("standard_msp_matched", "C0", "-"),
        ("standard_oodmon_matched", "C2", "--"),
        ("oracle", "C4", ":"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for policy, color, style in shown:
        for ax, key in ((axes[0], "mean_reward"), (axes[1], "abstain_rate")):
            mean = np.asarray(table[policy][key]["mean"], dtype=float)
            half = np.asarray(table[policy][key]["ci95"], dtype=float)
            ax.plot(angles, mean, style, color=color, marker=".", label=LABELS[policy])
            ax.fill_between(angles, mean - half, mean + half, color=color, alpha=0.15, lw=0)
    axes[0].axhline(0.0, color="grey", lw=0.8, ls=":")
    axes[0].set_title("mean reward (+1 right, -4 wrong, 0 abstain)", fontsize=10)
    axes[1].set_title("abstain rate", fontsize=10)
    for ax in axes:
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(range(0, 181, 45))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(
        f"Matched operating point: every rule abstains on {result['matched_rate']['mean']:.0%} "
        "of upright calibration digits (the reward head's own rate)\n"
        f"bands: {common.interval_note(len(result['seeds']))}",
        fontsize=10,
    )
    fig.tight_layout()
    common.save_figure(fig, path)


# ---------------------------------------------------------------------- tables


def markdown(result: dict[str, Any]) -> str:
    angles = result["angles"]
    table = result["table"]
    n_seeds = len(result["seeds"])
    cfg = result["config"]
    m = result["matched_rate"]
    lines = [
        "# Cautious decisions on rotating MNIST, at matched operating points\n",
        f"Data: {result['data']['source']}; split sizes {result['data']['split_sizes']}; "
        f"seeds {result['seeds']}; {common.interval_note(n_seeds)}. Both networks: "
        f"{cfg['epochs']} epochs, Adam lr {cfg['lr']:g}, batch {cfg['batch_size']}, no dropout. "
        f"Runtime {result['runtime_seconds']:.0f} s{' (quick mode)' if result['quick'] else ''}.\n",
        f"Reward +1 right, -{cfg['wrong_cost']:g} wrong, 0 abstain. Matched rate: the reward "
        f"head abstains on {common.pm(m)} of upright calibration digits "
        f"({common.pm(result['native_upright_abstain_rate_stat'])} of upright test digits); the "
        "matched rules abstain on the same share of upright calibration digits. Policies: "
        + "; ".join(f"**{p}** = {LABELS[p]}" for p in POLICIES)
        + ".\n",
        f"\n## Reward head minus each rule, mean reward over angles >= {cfg['shifted_from']:g}\n",
    ]
    rows = [
        [rival, common.pm(a, digits=3), f"{a['positive_seeds']} of {n_seeds}"]
        for rival, a in result["advantage"].items()
    ]
    lines.append(common.markdown_table(["rival", "advantage per digit", "seeds > 0"], rows))
    for key, title in (
        ("mean_reward", "Mean reward"),
        ("abstain_rate", "Abstain rate"),
        ("answered_accuracy", "Accuracy of the answered digits"),
    ):
        lines.append(f"\n## {title}\n")
        rows = [
            [f"{a:g}", *(common.pm(table[p][key], i, 2) for p in POLICIES)]
            for i, a in enumerate(angles)
        ]
        lines.append(common.markdown_table(["angle", *POLICIES], rows))
    e = result["extra"]
    lines.append("\n## Accuracy, oracle temperature, reward head's distance to its OCS\n")
    rows = [
        [
            f"{a:g}",
            common.pm(e["accuracy_standard"], i),
            common.pm(e["accuracy_reward_head_digits"], i),
            f"{e['oracle_temperature']['mean'][i]:.2f}",
            common.pm(e["reward_head_distance_to_ocs"], i, 2),
        ]
        for i, a in enumerate(angles)
    ]
    lines.append(
        common.markdown_table(
            [
                "angle",
                "accuracy (standard)",
                "accuracy (reward head, digits only)",
                "oracle T (mean)",
                "reward head MSE to its OCS",
            ],
            rows,
        )
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = common.configure(__doc__, argv, QUICK, Config())
    if args.replot:
        return _report(args, common.read_result(args, "cautious_decisions"))
    with common.reproducible():
        return _run(args, cfg)


def _run(args: Any, cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    data = common.load_data(args)
    per_seed = common.per_seed_results("cautious_decisions", args, cfg, data, run_seed)
    # each seed has its own matched rate; curves are summarised on the common target grid
    grid = sorted(cfg.rates)
    curves = {
        rule: {
            k: common.summarize(
                [[run["curves"][rule][k][run["rates"].index(r)] for r in grid] for run in per_seed]
            )
            for k in ("mean_reward", "abstain_rate", "answered_accuracy")
        }
        for rule in CURVES
    }
    table = common.summarize_tree([run["table"] for run in per_seed])
    native_rate = common.summarize(
        [run["table"]["reward_head_native"]["abstain_rate"][0] for run in per_seed]
    )
    suffix = "_quick" if args.quick else ""
    angles = list(cfg.angles)
    result: dict[str, Any] = {
        "experiment": "cautious_decisions",
        "quick": args.quick,
        "config": asdict(cfg),
        "data": {
            "source": data.source,
            "n_available": len(data),
            "split_sizes": dict(cfg.split_sizes),
            "stratified": True,
        },
        "intervals": "ci95 = Student-t 95% interval half-width over seeds",
        "seeds": list(cfg.seeds),
        "angles": angles,
        "policies": {p: LABELS[p] for p in POLICIES},
        "matched_rate": common.summarize([run["matched_rate"] for run in per_seed]),
        "native_upright_abstain_rate": native_rate["mean"] if 0.0 in angles else None,
        "native_upright_abstain_rate_stat": native_rate,
        "rates": grid,
        "curves": curves,
        "table": table,
        "advantage": advantage(per_seed, angles, cfg.shifted_from),
        "extra": common.summarize_tree([run["extra"] for run in per_seed]),
        "reward_ocs_seed0": per_seed[0]["reward_ocs"],
        "environment": common.environment(),
    }
    result["runtime_seconds"] = time.perf_counter() - start
    common.write_json(args.out / f"cautious_decisions{suffix}.json", result)
    return _report(args, result)


def _report(args: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Figures and Markdown from a result (fresh, or read back with --replot)."""
    suffix = "_quick" if result["quick"] else ""
    plot_curves(result, args.out / f"cautious_decisions_curves{suffix}.png")
    plot_matched(result, args.out / f"cautious_decisions{suffix}.png")
    (args.out / f"cautious_decisions{suffix}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
