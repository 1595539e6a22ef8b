"""Rotating MNIST: do a classifier's predictions revert to the OCS as digits rotate?

    python experiments/rotating_mnist.py          # 3 seeds, 13 angles; 4-7 min on 2 CPU cores
    python experiments/rotating_mnist.py --quick  # 1 seed, 4 angles; ~1 min (the tests run it)

Reproduces the core plot of Kang et al., "Deep Neural Networks Tend To Extrapolate Predictably"
(ICLR 2024) on real MNIST digits: train the small CNN, rotate held-out test digits from 0 to
180 degrees, and at each angle record the accuracy, the distance to the optimal constant
solution (KL(p(x) || pi), the paper's measure), the flag rate of an oodmon Detector calibrated
at alpha = 0.05, the AUROC of every oodmon score against the upright test digits, and the
paper's "OOD score" of the rotated set (a weak logistic-regression discriminator).

It repeats everything for a long-tailed training set (class k kept with fraction
ratio^(-k/9)), where the OCS is not uniform and the OCS distance stops being a rescaled
entropy. Writes rotating_mnist.json, rotating_mnist.md and rotating_mnist_*.png under --out.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import _common as common
import numpy as np
import torch
from tqdm import tqdm

from oodmon import OCS, Detector, distance
from oodmon.demo import mnist
from oodmon.scores import compute_score

#: Every score the AUROC is computed for (oodmon's OCS scores and the usual baselines).
SCORE_NAMES = ("ocs_kl", "ocs_kl_reverse", "msp", "energy", "entropy", "max_logit")


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    angles: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))
    split_sizes: dict[str, int] = field(default_factory=lambda: dict(mnist.DEFAULT_SPLIT_SIZES))
    epochs: int = 4  # uniform training set: 3000 digits
    long_tailed_epochs: int = 8  # ~1000 long-tailed digits: 2/3 of the uniform model's steps
    imbalance_ratio: float = 20.0  # most frequent / least frequent class
    batch_size: int = 64
    lr: float = 1e-3
    alpha: float = 0.05  # Detector's target false-alarm rate
    discriminator_alpha: float = 10.0  # the paper's L2 penalty (scikit-learn C = 0.1)
    example_angles: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0, 180.0)
    example_classes: tuple[int, ...] = (4, 6, 0)


QUICK = Config(
    seeds=(0,),
    angles=(0.0, 45.0, 90.0, 180.0),
    epochs=3,
    long_tailed_epochs=5,
)


def long_tailed(indices: torch.Tensor, labels: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep a fraction ``ratio ** (-k / 9)`` of class k (the first ones, in the given order)."""
    keep = []
    for k in range(10):
        members = indices[labels[indices] == k]
        keep.append(members[: max(1, round(len(members) * ratio ** (-k / 9)))])
    return torch.cat(keep)


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
        keys += ("ood_score_features", "ood_score_pixels")
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
        out["accuracy"].append(correct.mean())
        out["kl_mean"].append(kl.mean())
        out["kl_std"].append(kl.std())
        out["flag_rate"].append(flag.mean())
        for s in SCORE_NAMES:
            scores = compute_score(s, logits, ocs).numpy()
            out["auroc"][s].append(common.auroc(upright_scores[s], scores))
        entropy = compute_score("entropy", logits, ocs).numpy()
        out["spearman_kl_entropy"].append(common.spearman(kl, entropy))
        pooled_kl = np.concatenate([-upright_scores["ocs_kl"], kl])
        pooled_h = np.concatenate([upright_scores["entropy"], entropy])
        out["spearman_kl_entropy_pooled"].append(common.spearman(pooled_kl, pooled_h))
        pixels = rotated.reshape(len(rotated), -1).numpy() / 255.0
        for name, id_set, shifted in (
            ("ood_score_pixels", cal_pixels, pixels),
            ("ood_score_features", cal_features, features.numpy()),
        ):
            if discriminate:
                score = common.ood_score(
                    id_set[:half], shifted[:half], shifted[half:], cfg.discriminator_alpha
                )
                out[name].append(score)
        y = test_labels.numpy()
        out["class_accuracy"].append([correct[y == k].mean() for k in range(10)])
        out["class_kl_mean"].append([kl[y == k].mean() for k in range(10)])
        out["class_flag_rate"].append([flag[y == k].mean() for k in range(10)])
        np.add.at(confusion[a], (y, predicted.numpy()), 1)
    return out, confusion


def run_seed(
    data: mnist.MnistData, cfg: Config, seed: int, progress: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    split = mnist.split_indices(len(data), cfg.split_sizes, seed=seed, labels=data.labels)
    variants = {
        "uniform": (split, cfg.epochs),
        "long_tailed": (
            {k: long_tailed(v, data.labels, cfg.imbalance_ratio) for k, v in split.items()},
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
            "confusion": confusion,
            "model": model,
            "detector": detector,
            "test": idx["test"],
        }
    return results, extras


# ---------------------------------------------------------------------- figures


def plot_distance_vs_ood_score(summary: dict[str, Any], angles: list[float], path: Any) -> None:
    """The paper's plot: mean distance to the OCS against how OOD each rotated set is.

    Raw pixels measure the shift independently of the model (primary); the model's own frozen
    features are shown too. The long-tailed model is placed on the pixel OOD score of the same
    rotations (measured on the larger uniform splits).
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    u = summary["uniform"]
    for ax, key, label, variants in (
        (axes[0], "ood_score_pixels", "raw pixels", ("uniform", "long_tailed")),
        (axes[1], "ood_score_features", "the model's frozen features", ("uniform",)),
    ):
        for variant in variants:
            s = summary[variant]
            marker, color = ("o", "C0") if variant == "uniform" else ("s", "C3")
            ax.errorbar(
                u[key]["mean"],
                s["kl_mean"]["mean"],
                xerr=u[key]["std"],
                yerr=s["kl_mean"]["std"],
                fmt=f"{marker}-",
                color=color,
                ms=4,
                lw=1,
                capsize=2,
                label=variant.replace("_", "-") + " training labels",
            )
            for i, angle in enumerate(angles):
                if angle in (0, 45, 90, 180):
                    ax.annotate(
                        f"{angle:g}°",
                        (u[key]["mean"][i], s["kl_mean"]["mean"][i]),
                        textcoords="offset points",
                        xytext=(5, -10) if variant != "uniform" or angle == 0 else (-22, 2),
                        fontsize=8,
                        color=color,
                    )
        ax.set_xlabel(f"OOD score (weak discriminator on {label})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean KL(p(x) || OCS)  [nats]")
    axes[0].legend(fontsize=8)
    fig.suptitle("Rotated MNIST: distance to the OCS against how OOD the rotated digits are")
    common.save_figure(fig, path)


def plot_flags_and_auroc(
    summary: dict[str, Any], angles: list[float], alpha: float, path: Any
) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    u, lt = summary["uniform"], summary["long_tailed"]
    ax = axes[0]
    for s, name, style in ((u, "uniform", "-"), (lt, "long-tailed", "--")):
        _band(ax, angles, s["accuracy"], f"accuracy ({name})", "C2", style)
        _band(ax, angles, s["flag_rate"], f"flag rate ({name})", "C3", style)
    ax.axhline(alpha, color="grey", lw=0.8, ls=":", label=f"alpha = {alpha:g}")
    ax.set_title("accuracy and oodmon flag rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    for ax, s, title in ((axes[1], u, "uniform"), (axes[2], lt, "long-tailed")):
        for i, score in enumerate(SCORE_NAMES):
            _band(ax, angles, s["auroc"][score], score, f"C{i}", "-")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"AUROC, rotated vs upright ({title} labels)")
        ax.set_ylim(0.3, 1.02)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(range(0, 181, 45))
        ax.grid(alpha=0.3)
    common.save_figure(fig, path)


def plot_long_tailed(summary: dict[str, Any], angles: list[float], path: Any) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lt, u = summary["long_tailed"], summary["uniform"]
    for i, score in enumerate(("ocs_kl", "entropy", "msp")):
        _band(axes[0], angles, lt["auroc"][score], f"{score} (long-tailed)", f"C{i}", "-")
        _band(axes[0], angles, u["auroc"][score], f"{score} (uniform)", f"C{i}", ":")
    axes[0].set_title("AUROC: OCS KL vs entropy vs MSP")
    axes[0].legend(fontsize=7)
    for s, name, style in ((u, "uniform", "-"), (lt, "long-tailed", "--")):
        _band(axes[1], angles, s["spearman_kl_entropy_pooled"], name, "C0", style)
    axes[1].set_title("Spearman(KL to OCS, entropy), upright + rotated")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(range(0, 181, 45))
        ax.grid(alpha=0.3)
    common.save_figure(fig, path)


def plot_examples(
    data: mnist.MnistData, extras: dict[str, Any], cfg: Config, path: Any
) -> list[dict[str, Any]]:
    """A grid of example digits at several angles with the seed-0 model's verdicts."""
    import matplotlib.pyplot as plt

    model, detector = extras["model"], extras["detector"]
    test = extras["test"]
    # typical upright digits: the first test digit of each class that is right and not flagged
    upright = detector.predict(
        mnist.predict_logits(model, mnist.to_model_input(data.images[test]))
    ).to_host()
    labels = data.labels[test].numpy()
    typical = (upright.predicted == labels) & ~upright.flag
    picks = [int(test[np.flatnonzero(typical & (labels == k))[0]]) for k in cfg.example_classes]
    rows, cols = len(picks), len(cfg.example_angles)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), squeeze=False)
    examples = []
    for r, index in enumerate(picks):
        for c, angle in enumerate(cfg.example_angles):
            image = mnist.rotate(data.images[index], angle)
            logits = mnist.predict_logits(model, mnist.to_model_input(image))
            verdict = detector.predict(logits).to_host()
            flagged = bool(verdict.flag[0])
            ax = axes[r][c]
            ax.imshow(image.numpy(), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                f"{angle:g}°: pred {verdict.predicted[0]}\nKL {verdict.distance[0]:.2f} "
                f"{'FLAG' if flagged else 'ok'}",
                fontsize=9,
                color="C3" if flagged else "black",
            )
            examples.append(
                {
                    "label": int(data.labels[index]),
                    "angle": angle,
                    "predicted": int(verdict.predicted[0]),
                    "kl": float(verdict.distance[0]),
                    "p_value": float(verdict.p_value[0]),
                    "flag": flagged,
                }
            )
    fig.suptitle(
        "Upright test digits rotated; seed-0 model's prediction, KL to the OCS and oodmon flag"
    )
    common.save_figure(fig, path)
    return examples


def _band(
    ax: Any, x: list[float], stat: dict[str, Any], label: str, color: str, style: str
) -> None:
    mean, std = np.asarray(stat["mean"]), np.asarray(stat["std"])
    ax.plot(x, mean, style, color=color, label=label, lw=1.3, marker=".", ms=4)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)


# ---------------------------------------------------------------------- tables


def markdown(result: dict[str, Any]) -> str:
    angles = result["angles"]
    lines = [
        "# Rotating MNIST: distance to the OCS, flags and AUROC per angle\n",
        f"Data: {result['data']['source']}; split sizes {result['data']['split_sizes']}; "
        f"seeds {result['seeds']}; mean ± std over seeds. Runtime {result['runtime_seconds']:.0f} s"
        f"{' (quick mode)' if result['quick'] else ''}.\n",
        "KL = KL(p(x) || pi) to the OCS in nats (mean over the test digits). Flag rate: Detector "
        f"(ocs_kl) calibrated at alpha = {result['config']['alpha']}. AUROC: rotated vs upright "
        "test digits, higher score = more OOD. OOD score: mean P(rotated) of an L2-regularised "
        f"logistic regression (alpha = {result['config']['discriminator_alpha']}) on raw pixels "
        "(pix, model-independent) or the model's frozen penultimate features (feat); "
        "0.5 = indistinguishable. Spearman(KL, H): rank correlation of the KL to the OCS and "
        "the entropy over upright + rotated test digits (exactly -1 for a uniform OCS).\n",
    ]
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
        headers += ["OOD pix", "OOD feat"] if variant == "uniform" else ["Spearman(KL, H)"]
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
                row += [
                    f"{s['ood_score_pixels']['mean'][i]:.2f}",
                    f"{s['ood_score_features']['mean'][i]:.2f}",
                ]
            else:
                row.append(f"{s['spearman_kl_entropy_pooled']['mean'][i]:.3f}")
            rows.append(row)
        lines.append(common.markdown_table(headers, rows))
    last = len(angles) - 1
    u = result["uniform"]
    confusion = np.asarray(result["uniform_confusion_summed"][last])
    lines.append(f"\n## Per class at {angles[last]:g} degrees (uniform)\n")
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__).parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    progress = not args.no_progress
    start = time.perf_counter()
    data = common.load_data(args)
    per_seed: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        results, extra = run_seed(data, cfg, seed, progress)
        per_seed.append(results)
        extras.append(extra)
    summary = {v: common.summarize_tree([r[v] for r in per_seed]) for v in per_seed[0]}
    suffix = "_quick" if args.quick else ""
    out = args.out
    angles = list(cfg.angles)
    plot_distance_vs_ood_score(
        summary, angles, out / f"rotating_mnist_distance_vs_ood_score{suffix}.png"
    )
    plot_flags_and_auroc(
        summary, angles, cfg.alpha, out / f"rotating_mnist_flags_auroc{suffix}.png"
    )
    plot_long_tailed(summary, angles, out / f"rotating_mnist_long_tailed{suffix}.png")
    examples = plot_examples(
        data, extras[0]["uniform"], cfg, out / f"rotating_mnist_examples{suffix}.png"
    )
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
            "model": "L2-regularised logistic regression (scikit-learn objective, C = 1/alpha)",
            "alpha": cfg.discriminator_alpha,
            "inputs": {
                "ood_score_features": "frozen 128-d penultimate features of the trained SmallCNN",
                "ood_score_pixels": "raw pixels in [0, 1]",
            },
            "primary": "ood_score_pixels (independent of the model under test)",
            "protocol": "upright calibration digits vs rotated test digits (first half of each); "
            "score = mean P(rotated) on the held-out second half of the rotated test digits; "
            "uniform splits only (the long-tailed splits are too small for a stable estimate)",
        },
        "seeds": list(cfg.seeds),
        "angles": angles,
        "scores": list(SCORE_NAMES),
        "uniform": summary["uniform"],
        "long_tailed": summary["long_tailed"],
        "uniform_confusion_summed": sum(e["uniform"]["confusion"] for e in extras).tolist(),
        "long_tailed_confusion_summed": sum(e["long_tailed"]["confusion"] for e in extras).tolist(),
        "examples": examples,
        "environment": common.environment(),
    }
    result["runtime_seconds"] = time.perf_counter() - start
    common.write_json(out / f"rotating_mnist{suffix}.json", result)
    (out / f"rotating_mnist{suffix}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
