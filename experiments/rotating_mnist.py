"""Rotating MNIST: do a classifier's predictions revert to the OCS as digits rotate?

    python experiments/rotating_mnist.py          # 5 seeds, 13 angles (runtime in the .md)
    python experiments/rotating_mnist.py --quick  # 1 seed, 4 angles, small splits (the tests)

Reproduces the core plot of Kang et al., "Deep Neural Networks Tend To Extrapolate Predictably"
(ICLR 2024) on real MNIST digits: train the small CNN, rotate held-out test digits from 0 to
180 degrees, and at each angle record the accuracy, the distance to the optimal constant
solution (KL(p(x) || pi), the paper's measure), the flag rate of an oodmon Detector calibrated
at alpha = 0.05, the AUROC of every oodmon score against the upright test digits, and the
paper's "OOD score" of the rotated set: a weak discriminator with the paper's recipe
(standardised inputs, L2 alpha = 10 on the mean logistic loss) on raw pixels and on the
model's frozen penultimate features, and the rank correlation of KL and OOD score over angles
with a bootstrap interval.

It repeats everything for a long-tailed training set (class k kept with fraction
ratio^(-k/9)), where the OCS is not uniform and the OCS distance stops being a rescaled
entropy. Writes rotating_mnist.json, rotating_mnist.md and rotating_mnist_*.png under --out.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import _common as common
import numpy as np
import torch
from tqdm import tqdm

from oodmon import OCS, Detector, distance
from oodmon.scores import compute_score

mnist = common.mnist

#: Every score the AUROC is computed for (oodmon's OCS scores and the usual baselines).
SCORE_NAMES = ("ocs_kl", "ocs_kl_reverse", "msp", "energy", "entropy", "max_logit")


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    angles: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))
    split_sizes: dict[str, int] = field(default_factory=lambda: dict(mnist.DEFAULT_SPLIT_SIZES))
    epochs: int = 4  # uniform training set: 3000 digits
    long_tailed_epochs: int = 8  # ~1000 long-tailed digits: 2/3 of the uniform model's steps
    imbalance_ratio: float = 20.0  # most frequent / least frequent class
    batch_size: int = 64
    lr: float = 1e-3
    alpha: float = 0.05  # Detector's target false-alarm rate
    discriminator_alpha: float = 10.0  # the paper's L2 penalty on the mean logistic loss
    example_angles: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0, 180.0)
    example_classes: tuple[int, ...] = (4, 7, 6, 0)


QUICK = Config(
    seeds=(0,),
    angles=(0.0, 90.0, 180.0),
    split_sizes={"train": 1500, "calibration": 400, "test": 400},
    epochs=2,
    long_tailed_epochs=4,
)

#: The per-angle OOD scores of each rotated set: (input, discriminator recipe).
OOD_SCORES = {
    "ood_score_pixels": ("pixels", "paper"),
    "ood_score_features": ("features", "paper"),
    "ood_score_pixels_unstandardised_sum": ("pixels", "unstandardised_sum"),
}


def evaluate(
    model: mnist.SmallCNN,
    ocs: OCS,
    detector: Detector,
    cal_images: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: Config,
    desc: str,
    progress: bool,
    discriminate: bool,
) -> tuple[dict[str, Any], np.ndarray]:
    """Every per-angle number for one trained model (one seed, one training set).

    With ``discriminate``, also the OOD score of each rotated set: a weak discriminator between
    upright calibration digits and rotated test digits (first halves), scored on the held-out
    second half of the rotated test digits.
    """
    upright = mnist.predict_logits(model, mnist.to_model_input(test_images))
    upright_scores = {s: compute_score(s, upright, ocs).numpy() for s in SCORE_NAMES}
    half = len(test_images) // 2
    cal_pixels = cal_images.reshape(len(cal_images), -1).numpy() / 255.0
    cal_features = mnist.predict_features(model, mnist.to_model_input(cal_images)).numpy()
    out: dict[str, Any] = {"auroc": {s: [] for s in SCORE_NAMES}}
    keys: tuple[str, ...] = ("accuracy", "kl_mean", "kl_std", "flag_rate")
    if discriminate:
        keys += tuple(OOD_SCORES)
    keys += ("spearman_kl_entropy", "spearman_kl_entropy_pooled")
    keys += ("class_accuracy", "class_kl_mean", "class_flag_rate")
    out.update({k: [] for k in keys})
    confusion = np.zeros((len(cfg.angles), 10, 10), dtype=np.int64)
    for a, angle in enumerate(tqdm(cfg.angles, desc=desc, leave=False, disable=not progress)):
        rotated = mnist.rotate(test_images, angle)
        x = mnist.to_model_input(rotated)
        features = mnist.predict_features(model, x)
        with torch.inference_mode():
            logits = model.head(features)
        predicted = logits.argmax(dim=1)
        correct = (predicted == test_labels).numpy()
        kl = distance(logits, ocs).numpy()
        flag = detector.predict(logits).flag.numpy()
        # plain floats: numpy float32 scalars do not serialise into the per-seed cache
        out["accuracy"].append(float(correct.mean()))
        out["kl_mean"].append(float(kl.mean()))
        out["kl_std"].append(float(kl.std()))
        out["flag_rate"].append(float(flag.mean()))
        for s in SCORE_NAMES:
            scores = compute_score(s, logits, ocs).numpy()
            out["auroc"][s].append(common.auroc(upright_scores[s], scores))
        entropy = compute_score("entropy", logits, ocs).numpy()
        out["spearman_kl_entropy"].append(common.spearman(kl, entropy))
        pooled_kl = np.concatenate([-upright_scores["ocs_kl"], kl])
        pooled_h = np.concatenate([upright_scores["entropy"], entropy])
        out["spearman_kl_entropy_pooled"].append(common.spearman(pooled_kl, pooled_h))
        pixels = rotated.reshape(len(rotated), -1).numpy() / 255.0
        inputs = {"pixels": (cal_pixels, pixels), "features": (cal_features, features.numpy())}
        for name, (space, recipe) in OOD_SCORES.items():
            if discriminate:
                id_set, shifted = inputs[space]
                score = common.ood_score(
                    id_set[:half], shifted[:half], shifted[half:], cfg.discriminator_alpha, recipe
                )
                out[name].append(score)
        y = test_labels.numpy()
        out["class_accuracy"].append([float(correct[y == k].mean()) for k in range(10)])
        out["class_kl_mean"].append([float(kl[y == k].mean()) for k in range(10)])
        out["class_flag_rate"].append([float(flag[y == k].mean()) for k in range(10)])
        np.add.at(confusion[a], (y, predicted.numpy()), 1)
    return out, confusion


def run_seed(data: mnist.MnistData, cfg: Config, seed: int, progress: bool) -> dict[str, Any]:
    """Everything one seed measures, as plain JSON-able values (cached per seed)."""
    split = mnist.split_indices(len(data), cfg.split_sizes, seed=seed, labels=data.labels)
    variants = {
        "uniform": (split, cfg.epochs),
        "long_tailed": (
            {k: common.long_tailed(v, data.labels, cfg.imbalance_ratio) for k, v in split.items()},
            cfg.long_tailed_epochs,
        ),
    }
    results: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for name, (idx, epochs) in variants.items():
        train_labels = data.labels[idx["train"]]
        torch.manual_seed(seed)
        model = mnist.SmallCNN(10)
        mnist.train(
            model,
            mnist.to_model_input(data.images[idx["train"]]),
            train_labels,
            epochs=epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=seed,
            progress=progress,
        )
        ocs = OCS.cross_entropy(train_labels, 10)
        cal_logits = mnist.predict_logits(
            model, mnist.to_model_input(data.images[idx["calibration"]])
        )
        detector = Detector(ocs, alpha=cfg.alpha).fit(cal_logits)
        per_angle, confusion = evaluate(
            model,
            ocs,
            detector,
            data.images[idx["calibration"]],
            data.images[idx["test"]],
            data.labels[idx["test"]],
            cfg,
            f"seed {seed} {name}",
            progress,
            discriminate=name == "uniform",
        )
        results[name] = per_angle
        extras[name] = {
            "sizes": {k: len(v) for k, v in idx.items()},
            "train_class_counts": torch.bincount(train_labels, minlength=10).tolist(),
            "ocs": [round(v, 6) for v in ocs.target.tolist()],
            "confusion": confusion.tolist(),
        }
        if name == "uniform":
            extras["examples"] = example_verdicts(data, model, detector, idx["test"], cfg)
    return {"results": results, "extras": extras}


# ---------------------------------------------------------------------- analysis

#: Scores the reverse KL is compared against on the long-tailed model.
_OTHERS = tuple(n for n in SCORE_NAMES if n != "ocs_kl_reverse")


def correlations(per_seed: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Spearman(KL to the OCS, OOD score) over angles, for each discriminator.

    ``over_angles``: one point per angle (means over seeds), with a percentile bootstrap over
    the angles. ``per_seed``: the same correlation within each seed, with a t-interval.
    """
    u = summary["uniform"]
    out: dict[str, Any] = {}
    for key in OOD_SCORES:
        per = [common.spearman(r["uniform"]["kl_mean"], r["uniform"][key]) for r in per_seed]
        out[key] = {
            "over_angles": common.bootstrap_spearman(u["kl_mean"]["mean"], u[key]["mean"]),
            "per_seed": common.summarize(per),
        }
    return out


def reverse_kl_margins(per_seed: list[dict[str, Any]], angles: list[float]) -> dict[str, Any]:
    """AUROC of ``ocs_kl_reverse`` minus the best other score, over every seed x rotated angle."""
    out: dict[str, Any] = {}
    for variant in ("uniform", "long_tailed"):
        margins = []
        for run in per_seed:
            auroc = run[variant]["auroc"]
            for i, angle in enumerate(angles):
                if angle == 0:
                    continue
                best_other = max(auroc[n][i] for n in _OTHERS)
                margins.append(auroc["ocs_kl_reverse"][i] - best_other)
        m = np.asarray(margins)
        out[variant] = {
            "cells": int(m.size),
            "negative_cells": int((m < 0).sum()),
            "mean": float(m.mean()),
            "min": float(m.min()),
            "max": float(m.max()),
        }
    return out


# ---------------------------------------------------------------------- figures


#: Label offsets (points) of the angles in the distance-vs-OOD-score plot.
_LABEL_OFFSETS = {45.0: (-26, -12), 90.0: (6, 8), 135.0: (-14, 12)}


def plot_distance_vs_ood_score(
    summary: dict[str, Any], angles: list[float], n_seeds: int, path: Any
) -> None:
    """The paper's plot: mean distance to the OCS against how OOD each rotated set is.

    Left: the discriminator on raw pixels (model-independent), with the first round's
    unstandardised, summed-loss discriminator in grey for comparison. Right: on the model's own
    frozen features. The long-tailed model is placed on the OOD score of the same rotations
    measured on the uniform splits.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    u = summary["uniform"]
    panels = (
        (
            axes[0],
            "raw pixels",
            (
                ("ood_score_pixels", "uniform", "o", "C0", "uniform labels"),
                ("ood_score_pixels", "long_tailed", "s", "C3", "long-tailed labels (20:1)"),
                (
                    "ood_score_pixels_unstandardised_sum",
                    "uniform",
                    "^",
                    "0.55",
                    "uniform, first-round discriminator (raw inputs, summed loss)",
                ),
            ),
        ),
        (
            axes[1],
            "the model's frozen features",
            (("ood_score_features", "uniform", "o", "C0", None),),
        ),
    )
    labelled = {0.0, 45.0, 90.0, 135.0, 180.0}
    for ax, where, curves in panels:
        for key, variant, fmt, color, label in curves:
            s = summary[variant]
            x, y = np.asarray(u[key]["mean"]), np.asarray(s["kl_mean"]["mean"])
            ax.errorbar(
                x,
                y,
                xerr=u[key]["ci95"],
                yerr=s["kl_mean"]["ci95"],
                fmt=fmt,
                color=color,
                ms=4,
                lw=1,
                capsize=2,
                label=label,
            )
            if key == "ood_score_pixels_unstandardised_sum":
                continue
            # the 45-135 degree points cluster: label the long-tailed curve at its ends only,
            # and push the uniform labels apart, so no label covers another or a point
            shown = labelled if variant == "uniform" else {0.0, 180.0}
            for i, angle in enumerate(angles):
                if angle in shown:
                    ax.annotate(
                        f"{angle:g}°",
                        (x[i], y[i]),
                        textcoords="offset points",
                        xytext=_LABEL_OFFSETS.get(angle, (4, 5))
                        if variant == "uniform"
                        else (4, -11),
                        fontsize=7,
                        color=color,
                    )
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"OOD score: weak discriminator on {where}\n(0.5 = indistinguishable)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.08)
    axes[0].set_ylabel("mean KL(p(x) || OCS)  [nats]")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        "Rotated MNIST (0-180°, every 15°): distance to the OCS against how OOD the digits are\n"
        f"error bars: {common.interval_note(n_seeds)}",
        fontsize=10,
    )
    fig.tight_layout()
    common.save_figure(fig, path)


def plot_flags_and_auroc(
    summary: dict[str, Any], angles: list[float], alpha: float, n_seeds: int, path: Any
) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    u, lt = summary["uniform"], summary["long_tailed"]
    ax = axes[0]
    for s, name, style in ((u, "uniform", "-"), (lt, "long-tailed", "--")):
        _band(ax, angles, s["accuracy"], f"accuracy ({name})", "C2", style)
        _band(ax, angles, s["flag_rate"], f"flag rate ({name})", "C3", style)
    ax.axhline(alpha, color="grey", lw=0.8, ls=":", label=f"alpha = {alpha:g}")
    ax.set_title("accuracy and oodmon flag rate", fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.17), ncol=2, frameon=False)
    for ax, s, title in ((axes[1], u, "uniform"), (axes[2], lt, "long-tailed")):
        for i, score in enumerate(SCORE_NAMES):
            _band(ax, angles, s["auroc"][score], score, f"C{i}", "-")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"AUROC, rotated vs upright ({title} labels)", fontsize=10)
        ax.set_ylim(0.3, 1.02)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.17), ncol=3, frameon=False)
    for ax in axes:
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(range(0, 181, 45))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Bands: {common.interval_note(n_seeds)}", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def plot_long_tailed(summary: dict[str, Any], angles: list[float], n_seeds: int, path: Any) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    lt, u = summary["long_tailed"], summary["uniform"]
    for i, score in enumerate(("ocs_kl", "ocs_kl_reverse", "entropy", "msp")):
        _band(axes[0], angles, lt["auroc"][score], f"{score} (long-tailed)", f"C{i}", "-")
        _band(axes[0], angles, u["auroc"][score], f"{score} (uniform)", f"C{i}", ":")
    axes[0].set_title("AUROC, rotated vs upright", fontsize=10)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.17), ncol=2, frameon=False)
    for s, name, style in ((u, "uniform labels", "-"), (lt, "long-tailed labels", "--")):
        _band(axes[1], angles, s["spearman_kl_entropy_pooled"], name, "C0", style)
    axes[1].set_title("Spearman(KL to OCS, entropy), upright + rotated digits", fontsize=10)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.17), frameon=False)
    for ax in axes:
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(range(0, 181, 45))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Bands: {common.interval_note(n_seeds)}", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def example_verdicts(
    data: mnist.MnistData,
    model: mnist.SmallCNN,
    detector: Detector,
    test: torch.Tensor,
    cfg: Config,
) -> list[dict[str, Any]]:
    """One model's verdicts on a few typical test digits at several angles (for the figure)."""
    # typical upright digits: the first test digit of each class that is right and not flagged
    upright = detector.predict(
        mnist.predict_logits(model, mnist.to_model_input(data.images[test]))
    ).to_host()
    labels = data.labels[test].numpy()
    typical = (upright.predicted == labels) & ~upright.flag
    picks = [int(test[np.flatnonzero(typical & (labels == k))[0]]) for k in cfg.example_classes]
    examples = []
    for index in picks:
        for angle in cfg.example_angles:
            image = mnist.rotate(data.images[index], angle)
            verdict = detector.predict(
                mnist.predict_logits(model, mnist.to_model_input(image))
            ).to_host()
            examples.append(
                {
                    "index": index,
                    "label": int(data.labels[index]),
                    "angle": angle,
                    "predicted": int(verdict.predicted[0]),
                    "kl": float(verdict.distance[0]),
                    "p_value": float(verdict.p_value[0]),
                    "flag": bool(verdict.flag[0]),
                }
            )
    return examples


def plot_examples(
    data: mnist.MnistData,
    examples: list[dict[str, Any]],
    example_angles: Any,
    seed: int,
    path: Any,
) -> None:
    """A grid of example digits at several angles with one model's verdicts."""
    import matplotlib.pyplot as plt

    rows, cols = len(examples) // len(example_angles), len(example_angles)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), squeeze=False)
    for ax, e in zip(axes.flat, examples, strict=True):
        image = mnist.rotate(data.images[e["index"]], e["angle"])
        ax.imshow(image.numpy(), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
            f"{e['angle']:g}°: pred {e['predicted']}\nKL {e['kl']:.2f} "
            f"{'FLAG' if e['flag'] else 'ok'}",
            fontsize=9,
            color="C3" if e["flag"] else "black",
        )
    fig.suptitle(
        f"Upright test digits rotated; seed-{seed} model's prediction, KL to the OCS and oodmon "
        "flag",
        fontsize=10,
    )
    fig.tight_layout()
    common.save_figure(fig, path)


def _band(
    ax: Any, x: list[float], stat: dict[str, Any], label: str, color: str, style: str
) -> None:
    mean, half = np.asarray(stat["mean"]), np.asarray(stat["ci95"])
    ax.plot(x, mean, style, color=color, label=label, lw=1.3, marker=".", ms=4)
    ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.15, lw=0)


# ---------------------------------------------------------------------- tables


def markdown(result: dict[str, Any]) -> str:
    angles = result["angles"]
    n_seeds = len(result["seeds"])
    lines = [
        "# Rotating MNIST: distance to the OCS, flags and AUROC per angle\n",
        f"Data: {result['data']['source']}; split sizes {result['data']['split_sizes']}; "
        f"seeds {result['seeds']}; {common.interval_note(n_seeds)}. "
        f"Runtime {result['runtime_seconds']:.0f} s"
        f"{' (quick mode)' if result['quick'] else ''}.\n",
        "KL = KL(p(x) || pi) to the OCS in nats (mean over the test digits). Flag rate: Detector "
        f"(ocs_kl) calibrated at alpha = {result['config']['alpha']}. AUROC: rotated vs upright "
        "test digits, higher score = more OOD (means only; per-seed values in the JSON). "
        "OOD score: mean P(rotated) on held-out rotated digits of an L2-regularised logistic "
        "regression (the paper's recipe: standardised inputs, alpha = "
        f"{result['config']['discriminator_alpha']:g} on the mean loss) on raw pixels (pix) or "
        "the model's frozen penultimate features (feat); 'pix, old' is the first round's "
        "discriminator (raw inputs, summed loss, ~1000x weaker penalty); 0.5 = "
        "indistinguishable. Spearman(KL, H): rank correlation of the KL to the OCS and the "
        "entropy over upright + rotated test digits (exactly -1 for a uniform OCS).\n",
        "\n## Rank correlation of KL to the OCS and OOD score over angles\n",
    ]
    rows = []
    for key, (space, recipe) in OOD_SCORES.items():
        c = result["correlations"][key]
        b = c["over_angles"]
        rows.append(
            [
                f"{space}, {recipe}",
                f"{b['rho']:.3f} [{b['low']:.3f}, {b['high']:.3f}]",
                common.pm(c["per_seed"]),
            ]
        )
    lines.append(
        common.markdown_table(
            [
                "discriminator",
                "Spearman over angles (seed means) [95% bootstrap over angles]",
                f"Spearman within each seed ({common.interval_note(n_seeds)})",
            ],
            rows,
        )
    )
    lines.append("\n## ocs_kl_reverse against the best other score (AUROC margin)\n")
    rows = [
        [
            v,
            f"{m['mean']:+.3f}",
            f"{m['min']:+.3f}",
            f"{m['max']:+.3f}",
            f"{m['negative_cells']} of {m['cells']}",
        ]
        for v, m in result["reverse_kl_margins"].items()
    ]
    lines.append(
        common.markdown_table(
            ["labels", "mean margin", "min", "max", "seed x angle cells where it loses"], rows
        )
    )
    for variant, title in (("uniform", "Uniform training labels"), ("long_tailed", "Long-tailed")):
        s = result[variant]
        sizes = result["data"]["variants"][variant]
        lines.append(
            f"\n## {title} (train / calibration / test = {sizes['train']} / "
            f"{sizes['calibration']} / {sizes['test']})\n"
        )
        if variant == "long_tailed":
            counts = result["data"]["train_class_counts"][variant]
            pi = ", ".join(f"{v:.3f}" for v in result["data"]["ocs"][variant])
            lines.append(
                f"Train class counts (seed {result['seeds'][0]}): {counts}; OCS pi = [{pi}].\n"
            )
        headers = ["angle", "accuracy", "KL", "flag rate", *SCORE_NAMES]
        if variant == "uniform":
            headers += ["OOD pix", "OOD feat", "OOD pix, old"]
        else:
            headers += ["Spearman(KL, H)"]
        rows = []
        for i, angle in enumerate(angles):
            row = [
                f"{angle:g}",
                common.pm(s["accuracy"], i),
                common.pm(s["kl_mean"], i, 2),
                common.pm(s["flag_rate"], i),
            ]
            row += [f"{s['auroc'][n]['mean'][i]:.3f}" for n in SCORE_NAMES]
            if variant == "uniform":
                row += [common.pm(s[k], i) for k in OOD_SCORES]
            else:
                row.append(f"{s['spearman_kl_entropy_pooled']['mean'][i]:.3f}")
            rows.append(row)
        lines.append(common.markdown_table(headers, rows))
    last = len(angles) - 1
    u = result["uniform"]
    confusion = np.asarray(result["uniform_confusion_summed"][last])
    lines.append(f"\n## Per class at {angles[last]:g} degrees (uniform, all seeds pooled)\n")
    rows = []
    for k in range(10):
        top = int(confusion[k].argmax())
        share = confusion[k, top] / max(confusion[k].sum(), 1)
        rows.append(
            [
                k,
                f"{u['class_accuracy']['mean'][last][k]:.2f}",
                f"{u['class_kl_mean']['mean'][last][k]:.2f}",
                f"{u['class_flag_rate']['mean'][last][k]:.2f}",
                f"{top} ({share:.0%})",
            ]
        )
    lines.append(
        common.markdown_table(
            ["digit", "accuracy", "KL", "flag rate", "most common prediction"], rows
        )
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def _summed(matrices: Any) -> list[Any]:
    total: list[Any] = np.sum([np.asarray(m) for m in matrices], axis=0).tolist()
    return total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = common.configure(__doc__, argv, QUICK, Config())
    if args.replot:
        result = common.read_result(args, "rotating_mnist")
        return _report(args, result, common.load_data(args))
    with common.reproducible():
        return _run(args, cfg)


def _run(args: Any, cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    data = common.load_data(args)
    runs = common.per_seed_results("rotating_mnist", args, cfg, data, run_seed)
    per_seed: list[dict[str, Any]] = [run["results"] for run in runs]
    extras: list[dict[str, Any]] = [run["extras"] for run in runs]
    summary = {v: common.summarize_tree([r[v] for r in per_seed]) for v in per_seed[0]}
    suffix = "_quick" if args.quick else ""
    angles = list(cfg.angles)
    examples = extras[0]["examples"]
    result: dict[str, Any] = {
        "experiment": "rotating_mnist",
        "quick": args.quick,
        "config": asdict(cfg),
        "data": {
            "source": data.source,
            "n_available": len(data),
            "split_sizes": dict(cfg.split_sizes),
            "stratified": True,
            "variants": {v: extras[0][v]["sizes"] for v in per_seed[0]},
            "train_class_counts": {v: extras[0][v]["train_class_counts"] for v in per_seed[0]},
            "ocs": {v: extras[0][v]["ocs"] for v in per_seed[0]},
        },
        "discriminator": {
            "model": "L2-regularised logistic regression, L-BFGS",
            "alpha": cfg.discriminator_alpha,
            "recipes": {
                "paper": "inputs standardised per dimension (discriminator training set); "
                "objective mean log-loss + alpha/2 ||w||^2",
                "unstandardised_sum": "raw inputs; objective summed log-loss + alpha/2 ||w||^2",
            },
            "scores": {k: {"input": v[0], "recipe": v[1]} for k, v in OOD_SCORES.items()},
            "inputs": {
                "pixels": "raw pixels in [0, 1] (independent of the model under test)",
                "features": "frozen 128-d penultimate features of the trained SmallCNN",
            },
            "primary": "ood_score_pixels (paper recipe, model-independent)",
            "protocol": "first half of the calibration digits (upright) vs first half of the "
            "rotated test digits; score = mean P(rotated) on the held-out second half of the "
            "rotated test digits; uniform splits only",
        },
        "intervals": "ci95 = Student-t 95% interval half-width over seeds; correlations over "
        "angles use a percentile bootstrap over the angles (10,000 resamples)",
        "seeds": list(cfg.seeds),
        "angles": angles,
        "scores": list(SCORE_NAMES),
        "correlations": correlations(per_seed, summary),
        "reverse_kl_margins": reverse_kl_margins(per_seed, angles),
        "uniform": summary["uniform"],
        "long_tailed": summary["long_tailed"],
        "uniform_confusion_summed": _summed(e["uniform"]["confusion"] for e in extras),
        "long_tailed_confusion_summed": _summed(e["long_tailed"]["confusion"] for e in extras),
        "examples": examples,
        "environment": common.environment(),
    }
    result["runtime_seconds"] = time.perf_counter() - start
    common.write_json(args.out / f"rotating_mnist{suffix}.json", result)
    return _report(args, result, data)


def _report(args: Any, result: dict[str, Any], data: mnist.MnistData) -> dict[str, Any]:
    """Figures and Markdown from a result (fresh, or read back with --replot)."""
    suffix = "_quick" if result["quick"] else ""
    out = args.out
    angles = result["angles"]
    n_seeds = len(result["seeds"])
    summary = {v: result[v] for v in ("uniform", "long_tailed")}
    plot_distance_vs_ood_score(
        summary, angles, n_seeds, out / f"rotating_mnist_distance_vs_ood_score{suffix}.png"
    )
    plot_flags_and_auroc(
        summary,
        angles,
        result["config"]["alpha"],
        n_seeds,
        out / f"rotating_mnist_flags_auroc{suffix}.png",
    )
    plot_long_tailed(summary, angles, n_seeds, out / f"rotating_mnist_long_tailed{suffix}.png")
    plot_examples(
        data,
        result["examples"],
        result["config"]["example_angles"],
        result["seeds"][0],
        out / f"rotating_mnist_examples{suffix}.png",
    )
    (out / f"rotating_mnist{suffix}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
