"""Cautious decisions on rotating MNIST: a loss whose OCS is "abstain" makes a model cautious.

    python experiments/cautious_decisions.py          # 3 seeds, 13 angles; 4-5 min on 2 CPU cores
    python experiments/cautious_decisions.py --quick  # 1 seed, 4 angles; ~1 min (the tests run it)

The decision experiment of Kang et al. (ICLR 2024), on rotated digits instead of CIFAR10-C.
Actions are the 10 digits plus abstain; reward +1 for the right digit, -4 for a wrong one, 0 for
abstaining. Policies compared at each angle (mean reward and abstain rate on the test digits):

* standard: a cross-entropy classifier, argmax, never abstains;
* reward prediction: 11 outputs regressing the reward vector with MSE; argmax over predicted
  rewards. Its OCS is "abstain" (reward 0 beats 5 * 0.1 - 4), so reverting to the OCS on
  unfamiliar inputs means abstaining, without anyone choosing a threshold;
* standard + oodmon: the standard classifier, abstaining when an oodmon Detector (ocs_kl,
  alpha = 0.05, calibrated on upright digits) flags the input;
* standard + MSP: abstain when the max softmax probability is at most c / (c + 1) = 0.8 (T = 1);
* oracle: the same rule after temperature scaling fitted on *labelled rotated* calibration
  digits at each angle (information no deployed model has).

Writes cautious_decisions.json, cautious_decisions.md and cautious_decisions*.png under --out.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize
from tqdm import tqdm

from oodmon import OCS, Detector, distance, reward_targets
from oodmon.demo import mnist

POLICIES = ("standard", "reward_prediction", "standard_oodmon", "standard_msp", "oracle")
LABELS = {
    "standard": "standard (argmax)",
    "reward_prediction": "reward prediction (OCS = abstain)",
    "standard_oodmon": "standard + oodmon flag",
    "standard_msp": "standard + MSP <= 0.8 (T = 1)",
    "oracle": "oracle (T fitted on rotated, MSP <= 0.8)",
}
ABSTAIN = 10


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    angles: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))
    split_sizes: dict[str, int] = field(default_factory=lambda: dict(mnist.DEFAULT_SPLIT_SIZES))
    epochs: int = 4
    reward_epochs: int = 8  # the MSE head needs more passes before it answers upright digits
    batch_size: int = 64
    lr: float = 1e-3
    # Both networks are the same SmallCNN without dropout, so that only the loss differs:
    # dropout noise on the penultimate layer makes the MSE head shrink its reward predictions
    # towards the OCS even on upright digits (it abstained on ~80% of them after 6 epochs).
    dropout: float = 0.0
    wrong_cost: float = 4.0  # reward -c for a wrong digit, +1 right, 0 abstain
    alpha: float = 0.05


QUICK = Config(seeds=(0,), angles=(0.0, 45.0, 90.0, 180.0), epochs=2, reward_epochs=3)


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


def run_seed(data: mnist.MnistData, cfg: Config, seed: int, progress: bool) -> dict[str, Any]:
    split = mnist.split_indices(len(data), cfg.split_sizes, seed=seed, labels=data.labels)
    train_x = mnist.to_model_input(data.images[split["train"]])
    train_y = data.labels[split["train"]]
    models = {}
    for name, outputs, loss, targets, epochs in (
        ("standard", 10, "cross_entropy", train_y, cfg.epochs),
        ("reward", 11, "mse", reward_targets(train_y, 10, cfg.wrong_cost), cfg.reward_epochs),
    ):
        torch.manual_seed(seed)
        model = mnist.SmallCNN(outputs, dropout=cfg.dropout)
        mnist.train(
            model,
            train_x,
            targets,
            loss=loss,  # type: ignore[arg-type]
            epochs=epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=seed,
            progress=progress,
        )
        models[name] = model
    ocs = OCS.cross_entropy(train_y, 10)
    reward_ocs = OCS.reward_prediction(train_y, 10, cfg.wrong_cost)
    cal_images, cal_y = data.images[split["calibration"]], data.labels[split["calibration"]]
    test_images, test_y = data.images[split["test"]], data.labels[split["test"]]
    detector = Detector(ocs, alpha=cfg.alpha).fit(
        mnist.predict_logits(models["standard"], mnist.to_model_input(cal_images))
    )
    threshold = cfg.wrong_cost / (cfg.wrong_cost + 1.0)
    out: dict[str, Any] = {
        "mean_reward": {p: [] for p in POLICIES},
        "abstain_rate": {p: [] for p in POLICIES},
        "answered_accuracy": {p: [] for p in POLICIES},
        "accuracy": {"standard": [], "reward_prediction": []},
        "oracle_temperature": [],
        "reward_model_distance_mean": [],
        "reward_model_distance_std": [],
        "reward_model_abstain_reward_mean": [],
    }
    for angle in tqdm(cfg.angles, desc=f"seed {seed}", leave=False, disable=not progress):
        x = common.rotated_inputs(test_images, angle)
        logits = mnist.predict_logits(models["standard"], x)
        predicted_rewards = mnist.predict_logits(models["reward"], x)
        argmax = logits.argmax(dim=1)
        abstain = torch.full_like(argmax, ABSTAIN)
        max_prob = torch.softmax(logits, dim=1).amax(dim=1)
        temperature = fit_temperature(
            mnist.predict_logits(models["standard"], common.rotated_inputs(cal_images, angle)),
            cal_y,
        )
        oracle_prob = torch.softmax(logits / temperature, dim=1).amax(dim=1)
        actions = {
            "standard": argmax,
            "reward_prediction": predicted_rewards.argmax(dim=1),
            "standard_oodmon": torch.where(detector.predict(logits).flag, abstain, argmax),
            "standard_msp": torch.where(max_prob <= threshold, abstain, argmax),
            "oracle": torch.where(oracle_prob <= threshold, abstain, argmax),
        }
        for policy, chosen in actions.items():
            answered = chosen != ABSTAIN
            out["mean_reward"][policy].append(
                rewards_of(chosen, test_y, cfg.wrong_cost).mean().item()
            )
            out["abstain_rate"][policy].append(1.0 - answered.double().mean().item())
            right = (chosen == test_y) & answered
            # accuracy among answered inputs; 1.0 by convention when everything is abstained
            acc = right.sum().item() / answered.sum().item() if answered.any() else 1.0
            out["answered_accuracy"][policy].append(acc)
        out["accuracy"]["standard"].append((argmax == test_y).double().mean().item())
        digit_guess = predicted_rewards[:, :ABSTAIN].argmax(dim=1)
        out["accuracy"]["reward_prediction"].append((digit_guess == test_y).double().mean().item())
        out["oracle_temperature"].append(temperature)
        dist = distance(predicted_rewards, reward_ocs)
        out["reward_model_distance_mean"].append(dist.mean().item())
        out["reward_model_distance_std"].append(dist.std().item())
        out["reward_model_abstain_reward_mean"].append(predicted_rewards[:, ABSTAIN].mean().item())
    out["_reward_ocs"] = [round(v, 6) for v in reward_ocs.target.tolist()]
    return out


def plot(summary: dict[str, Any], angles: list[float], path: Any) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, policy in enumerate(POLICIES):
        for ax, key in ((axes[0], "mean_reward"), (axes[1], "abstain_rate")):
            mean = np.asarray(summary[key][policy]["mean"])
            std = np.asarray(summary[key][policy]["std"])
            style = "--" if policy == "oracle" else "-"
            ax.plot(angles, mean, style, color=f"C{i}", marker=".", label=LABELS[policy])
            ax.fill_between(angles, mean - std, mean + std, color=f"C{i}", alpha=0.15, lw=0)
    axes[0].axhline(0.0, color="grey", lw=0.8, ls=":")
    axes[0].set_title("mean reward (+1 right, -4 wrong, 0 abstain)")
    axes[1].set_title("abstain rate")
    axes[0].legend(fontsize=7)
    d = summary["reward_model_distance_mean"]
    mean, std = np.asarray(d["mean"]), np.asarray(d["std"])
    axes[2].plot(angles, mean, "-", color="C1", marker=".", label="MSE to its OCS")
    axes[2].fill_between(angles, mean - std, mean + std, color="C1", alpha=0.15, lw=0)
    axes[2].set_title("reward-prediction model: distance to its OCS")
    axes[2].set_ylabel("mean squared distance")
    for ax in axes:
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(range(0, 181, 45))
        ax.grid(alpha=0.3)
    common.save_figure(fig, path)


def markdown(result: dict[str, Any]) -> str:
    angles = result["angles"]
    s = result["summary"]
    lines = [
        "# Cautious decisions on rotating MNIST\n",
        f"Data: {result['data']['source']}; split sizes {result['data']['split_sizes']}; "
        f"seeds {result['seeds']}; mean ± std over seeds. Runtime {result['runtime_seconds']:.0f} s"
        f"{' (quick mode)' if result['quick'] else ''}.\n",
        f"Reward +1 right, -{result['config']['wrong_cost']:g} wrong, 0 abstain. Policies: "
        + "; ".join(f"**{p}** = {LABELS[p]}" for p in POLICIES)
        + ".\n",
        "\n## Mean reward\n",
    ]
    rows = [
        [f"{a:g}", *(common.pm(s["mean_reward"][p], i, 2) for p in POLICIES)]
        for i, a in enumerate(angles)
    ]
    lines.append(common.markdown_table(["angle", *POLICIES], rows))
    lines.append("\n## Abstain rate\n")
    rows = [
        [f"{a:g}", *(common.pm(s["abstain_rate"][p], i, 2) for p in POLICIES)]
        for i, a in enumerate(angles)
    ]
    lines.append(common.markdown_table(["angle", *POLICIES], rows))
    lines.append("\n## Accuracy, oracle temperature, reward model's distance to its OCS\n")
    rows = [
        [
            f"{a:g}",
            common.pm(s["accuracy"]["standard"], i),
            common.pm(s["accuracy"]["reward_prediction"], i),
            f"{s['oracle_temperature']['mean'][i]:.2f}",
            common.pm(s["reward_model_distance_mean"], i, 2),
            f"{s['reward_model_abstain_reward_mean']['mean'][i]:.2f}",
        ]
        for i, a in enumerate(angles)
    ]
    lines.append(
        common.markdown_table(
            [
                "angle",
                "accuracy (standard)",
                "accuracy (reward model, digits only)",
                "oracle T",
                "reward model MSE to OCS",
                "predicted abstain reward",
            ],
            rows,
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__).parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    start = time.perf_counter()
    data = common.load_data(args)
    per_seed = [run_seed(data, cfg, seed, not args.no_progress) for seed in cfg.seeds]
    reward_ocs = per_seed[0].pop("_reward_ocs")
    for run in per_seed[1:]:
        run.pop("_reward_ocs")
    summary = common.summarize_tree(per_seed)
    suffix = "_quick" if args.quick else ""
    plot(summary, list(cfg.angles), args.out / f"cautious_decisions{suffix}.png")
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
        "seeds": list(cfg.seeds),
        "angles": list(cfg.angles),
        "policies": {p: LABELS[p] for p in POLICIES},
        "reward_ocs_seed0": reward_ocs,
        "summary": summary,
        "environment": common.environment(),
    }
    result["runtime_seconds"] = time.perf_counter() - start
    common.write_json(args.out / f"cautious_decisions{suffix}.json", result)
    (args.out / f"cautious_decisions{suffix}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
