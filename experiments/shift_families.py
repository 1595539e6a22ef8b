"""Which shifts make an MNIST classifier revert to the OCS, and which do not?

    python experiments/shift_families.py          # 5 seeds, 8 families (runtime in the .md)
    python experiments/shift_families.py --quick  # 1 seed, 2 severities, small splits (the tests)

Rotation is one shift. Kang et al. (ICLR 2024) report that predictions revert to the OCS under
many shifts, but move *away* from it under shifts that raise the network's feature norms
(iterated-FGSM adversarial MNIST, impulse noise on UTKFace). This script trains the small CNN
on upright digits and, for each family of shifted test inputs over increasing severity,
records the mean KL to the OCS, the mean norm of the penultimate features, the accuracy, the
flag rate of an oodmon Detector (``ocs_kl``, alpha = 0.05) and the AUROC of every registered
oodmon score (``oodmon.SCORES``) against the clean test digits.

Families: Gaussian noise, Gaussian blur, fade (contrast towards the black background),
brightness, inversion, blank (constant) images, scikit-learn's 8x8 digits upscaled to 28x28
(a natural shift that ships with the package) and iterated-FGSM adversarial digits.

Writes shift_families.json, shift_families.md and shift_families*.png under --out.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import oodmon
from oodmon import OCS, Detector, distance
from oodmon.scores import compute_score

mnist = common.mnist

#: Every registered score that applies to a cross-entropy OCS.
SCORE_NAMES = tuple(n for n, s in oodmon.SCORES.items() if "cross_entropy" in s.losses)


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    split_sizes: dict[str, int] = field(default_factory=lambda: dict(mnist.DEFAULT_SPLIT_SIZES))
    epochs: int = 4  # the uniform model of rotating_mnist.py (dropout 0.5)
    batch_size: int = 64
    lr: float = 1e-3
    alpha: float = 0.05
    # severities per family, in pixel units of images in [0, 1]
    noise_sigma: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    blur_sigma: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)
    fade_factor: tuple[float, ...] = (0.6, 0.3, 0.15, 0.05)
    brightness: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    inversion: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # mix towards 1 - x
    blank_level: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    fgsm_eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    fgsm_steps: int = 10
    fgsm_digits: int = 300  # the attack costs fgsm_steps backward passes per digit and eps
    sklearn_digits: int = 1000


QUICK = Config(
    seeds=(0,),
    split_sizes={"train": 1500, "calibration": 400, "test": 400},
    epochs=2,
    noise_sigma=(0.25, 1.0),
    blur_sigma=(1.0, 3.0),
    fade_factor=(0.3, 0.05),
    brightness=(0.4, 0.8),
    inversion=(0.5, 1.0),
    blank_level=(0.0, 1.0),
    fgsm_eps=(0.1, 0.3),
    fgsm_steps=5,
    fgsm_digits=100,
    sklearn_digits=400,
)


# ---------------------------------------------------------------------- shifts (pixels in [0, 1])


def gaussian_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius 3 sigma, zero padding = the black background)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    y = x.unsqueeze(1)
    y = F.conv2d(y, k.view(1, 1, 1, -1), padding=(0, radius))
    y = F.conv2d(y, k.view(1, 1, -1, 1), padding=(radius, 0))
    return y.squeeze(1)


def sklearn_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (values 0-16) upscaled to 20x20 and centred in 28x28.

    MNIST digits sit in a 20x20 box centred in the 28x28 frame, so the upscaled digits have
    MNIST's size and position but a different writer population, resolution and stroke.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed))[:n]
    images = torch.as_tensor(digits.images, dtype=torch.float32)[order] / 16.0
    big = F.interpolate(images.unsqueeze(1), size=(20, 20), mode="bilinear", align_corners=False)
    return F.pad(big, (4, 4, 4, 4)).squeeze(1).clamp(0.0, 1.0), torch.as_tensor(
        digits.target, dtype=torch.int64
    )[order]


def iterated_fgsm(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int
) -> torch.Tensor:
    """Untargeted iterated FGSM in pixel space: ``steps`` signed-gradient steps of eps / 4,
    each projected back into the L-inf ball of radius eps and into [0, 1]."""
    model.eval()
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(mnist.to_model_input(adv)), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + (eps / 4) * grad.sign()
            adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0.0, 1.0)
    return adv.detach()


def families(
    cfg: Config,
) -> dict[str, tuple[tuple[float, ...], Callable[..., tuple[torch.Tensor, torch.Tensor | None]]]]:
    """Family -> (severities, ``make(x, y, model, severity, seed) -> (images, labels)``)."""

    def keep(fn: Callable[[torch.Tensor, float, int], torch.Tensor]) -> Callable[..., Any]:
        return lambda x, y, model, s, seed: (fn(x, s, seed), y)

    def blank(x: torch.Tensor, y: torch.Tensor, model: Any, s: float, seed: int) -> Any:
        return torch.full_like(x, s), None  # no digit: accuracy is undefined

    def adversarial(x: torch.Tensor, y: torch.Tensor, model: Any, s: float, seed: int) -> Any:
        n = cfg.fgsm_digits
        return iterated_fgsm(model, x[:n], y[:n], s, cfg.fgsm_steps), y[:n]

    def natural(x: torch.Tensor, y: torch.Tensor, model: Any, s: float, seed: int) -> Any:
        return sklearn_digits(cfg.sklearn_digits, seed)

    return {
        "gaussian_noise": (cfg.noise_sigma, keep(gaussian_noise)),
        "blur": (cfg.blur_sigma, keep(lambda x, s, seed: blur(x, s))),
        "fade": (cfg.fade_factor, keep(lambda x, s, seed: x * s)),
        "brightness": (cfg.brightness, keep(lambda x, s, seed: (x + s).clamp(0.0, 1.0))),
        "inversion": (cfg.inversion, keep(lambda x, s, seed: (1 - s) * x + s * (1 - x))),
        "blank": (cfg.blank_level, blank),
        "sklearn_digits": ((1.0,), natural),
        "fgsm": (cfg.fgsm_eps, adversarial),
    }


SEVERITY_NAMES = {
    "gaussian_noise": "noise sd",
    "blur": "blur sd (px)",
    "fade": "contrast factor",
    "brightness": "added brightness",
    "inversion": "inversion mix",
    "blank": "constant level",
    "sklearn_digits": "(one set)",
    "fgsm": "L-inf eps",
}


# ---------------------------------------------------------------------- one seed


def measure(
    model: mnist.SmallCNN,
    ocs: OCS,
    detector: Detector,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    clean_scores: dict[str, np.ndarray],
) -> dict[str, Any]:
    x = mnist.to_model_input(images)
    features = mnist.predict_features(model, x)
    with torch.inference_mode():
        logits = model.head(features)
    verdict = detector.predict(logits)
    flag = verdict.flag.numpy()
    predicted = logits.argmax(dim=1)
    out: dict[str, Any] = {
        "kl_mean": distance(logits, ocs).mean().item(),
        "feature_norm": features.norm(dim=1).mean().item(),
        "flag_rate": float(flag.mean()),
        "auroc": {
            s: common.auroc(clean_scores[s], compute_score(s, logits, ocs).numpy())
            for s in SCORE_NAMES
        },
    }
    nan = float("nan")
    if labels is None:
        out.update(accuracy=nan, accuracy_flagged=nan, accuracy_unflagged=nan)
    else:
        correct = (predicted == labels).numpy()
        out["accuracy"] = float(correct.mean())
        out["accuracy_flagged"] = float(correct[flag].mean()) if flag.any() else nan
        out["accuracy_unflagged"] = float(correct[~flag].mean()) if (~flag).any() else nan
    return out


def run_seed(data: mnist.MnistData, cfg: Config, seed: int, progress: bool) -> dict[str, Any]:
    split = mnist.split_indices(len(data), cfg.split_sizes, seed=seed, labels=data.labels)
    train_y = data.labels[split["train"]]
    torch.manual_seed(seed)
    model = mnist.SmallCNN(10)
    mnist.train(
        model,
        mnist.to_model_input(data.images[split["train"]]),
        train_y,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        progress=progress,
    )
    ocs = OCS.cross_entropy(train_y, 10)
    detector = Detector(ocs, alpha=cfg.alpha).fit(
        mnist.predict_logits(model, mnist.to_model_input(data.images[split["calibration"]]))
    )
    test_x = data.images[split["test"]].to(torch.float32) / 255.0
    test_y = data.labels[split["test"]]
    clean_logits = mnist.predict_logits(model, mnist.to_model_input(test_x))
    clean_scores = {s: compute_score(s, clean_logits, ocs).numpy() for s in SCORE_NAMES}
    n = cfg.fgsm_digits
    out: dict[str, Any] = {
        "clean": measure(model, ocs, detector, test_x, test_y, clean_scores),
        # the attacked digits are the first n: compare them with themselves, unattacked
        "clean_fgsm_subset": measure(model, ocs, detector, test_x[:n], test_y[:n], clean_scores),
    }
    items = families(cfg)
    bar = tqdm(
        total=sum(len(s) for s, _ in items.values()),
        desc=f"seed {seed}",
        leave=False,
        disable=not progress,
    )
    for family, (severities, make) in items.items():
        per: list[dict[str, Any]] = []
        for severity in severities:
            images, labels = make(test_x, test_y, model, severity, seed)
            per.append(measure(model, ocs, detector, images, labels, clean_scores))
            bar.update(1)
        # list of dicts -> dict of per-severity lists, so seeds summarise leaf by leaf
        out[family] = _transpose(per)
    bar.close()
    return out


def _transpose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    first = rows[0]
    return {
        k: _transpose([r[k] for r in rows]) if isinstance(first[k], dict) else [r[k] for r in rows]
        for k in first
    }


def verdicts(per_seed: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Per family: does the KL to the OCS fall (revert) at the highest severity?

    The per-seed change of the mean KL against the clean digits, with a t-interval: "reverts"
    when the whole interval is below 0, "moves away" when above, else "no clear change".
    """
    out: dict[str, Any] = {}
    for family in families(cfg):
        ref = "clean_fgsm_subset" if family == "fgsm" else "clean"
        change = [run[family]["kl_mean"][-1] - run[ref]["kl_mean"] for run in per_seed]
        norm = [run[family]["feature_norm"][-1] / run[ref]["feature_norm"] for run in per_seed]
        s = common.summarize(change)
        low, high = s["mean"] - s["ci95"], s["mean"] + s["ci95"]
        word = "reverts" if high < 0 else "moves away" if low > 0 else "no clear change"
        out[family] = {
            "kl_change_at_max_severity": s,
            "feature_norm_ratio_at_max_severity": common.summarize(norm),
            "verdict": word,
        }
    return out


# ---------------------------------------------------------------------- figures


def plot_families(result: dict[str, Any], path: Any) -> None:
    import matplotlib.pyplot as plt

    names = list(result["severities"])
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    clean = result["summary"]["clean"]
    log_k = math.log(10)
    for ax, family in zip(axes.flat, names, strict=False):
        s = result["summary"][family]
        sev = result["severities"][family]
        x = np.arange(len(sev))
        for key, label, color, scale in (
            ("kl_mean", "KL to OCS / log 10", "C0", log_k),
            ("accuracy", "accuracy", "C2", 1.0),
            ("flag_rate", "oodmon flag rate", "C3", 1.0),
        ):
            mean = np.array([np.nan if v is None else v for v in s[key]["mean"]]) / scale
            half = np.array([np.nan if v is None else v for v in s[key]["ci95"]]) / scale
            ax.errorbar(
                x, mean, yerr=half, fmt="o-", color=color, ms=3, lw=1.2, capsize=2, label=label
            )
        ax.axhline(
            clean["kl_mean"]["mean"] / log_k,
            color="C0",
            lw=0.8,
            ls=":",
            label="KL / log 10 on clean digits",
        )
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in sev], fontsize=8)
        ax.set_xlabel(SEVERITY_NAMES[family], fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{family}: {result['verdicts'][family]['verdict']}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8)
    fig.suptitle(
        "Shift families on MNIST: KL to the OCS, accuracy and flag rate against severity\n"
        f"(title: does the KL fall at the highest severity?); error bars: "
        f"{common.interval_note(len(result['seeds']))}",
        fontsize=10,
    )
    fig.tight_layout()
    common.save_figure(fig, path)


def plot_norms(result: dict[str, Any], path: Any) -> None:
    """KL change against feature-norm ratio, one point per family and severity."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    clean = result["summary"]["clean"]
    markers = "os^vD<>P"
    for i, family in enumerate(result["severities"]):
        s = result["summary"][family]
        norm = np.asarray(s["feature_norm"]["mean"]) / clean["feature_norm"]["mean"]
        kl = np.asarray(s["kl_mean"]["mean"]) - clean["kl_mean"]["mean"]
        ax.plot(
            norm, kl, marker=markers[i % len(markers)], ls="-", lw=0.8, color=f"C{i}", label=family
        )
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("mean penultimate feature norm / clean digits' (log scale)")
    ax.set_ylabel("mean KL to OCS minus clean digits' [nats]")
    ax.set_title(
        "Below 0: predictions revert to the OCS. Lines join severities;\n"
        f"means over {len(result['seeds'])} seed(s) (intervals in shift_families.md)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


# ---------------------------------------------------------------------- tables


def markdown(result: dict[str, Any]) -> str:
    n_seeds = len(result["seeds"])
    summary = result["summary"]
    lines = [
        "# Shift families: which shifts revert to the OCS\n",
        f"Data: {result['data']['source']}; split sizes {result['data']['split_sizes']}; "
        f"seeds {result['seeds']}; {common.interval_note(n_seeds)}. Runtime "
        f"{result['runtime_seconds']:.0f} s{' (quick mode)' if result['quick'] else ''}.\n",
        "KL = mean KL(p(x) || pi) in nats; norm = mean L2 norm of the penultimate features; "
        f"flag = share flagged by the Detector (ocs_kl, alpha = {result['config']['alpha']}); "
        "acc. of flagged = accuracy of the flagged inputs (a flag is not an error); AUROC "
        "against the clean test digits, higher score = more OOD. Blank inputs have no label "
        "(accuracy n/a). "
        f"FGSM: {result['config']['fgsm_steps']} steps of eps / 4 on the first "
        f"{result['config']['fgsm_digits']} test digits.\n",
        "\n## Verdicts (highest severity against clean digits; FGSM against the same digits "
        "unattacked)\n",
    ]
    rows = [
        [
            family,
            v["verdict"],
            common.pm(v["kl_change_at_max_severity"], digits=2),
            common.pm(v["feature_norm_ratio_at_max_severity"], digits=2),
        ]
        for family, v in result["verdicts"].items()
    ]
    lines.append(
        common.markdown_table(["family", "verdict", "KL change (nats)", "feature norm ratio"], rows)
    )
    c = summary["clean"]
    lines.append(
        f"\nClean test digits: accuracy {common.pm(c['accuracy'])}, "
        f"KL {common.pm(c['kl_mean'], digits=2)}, "
        f"feature norm {common.pm(c['feature_norm'], digits=1)}, "
        f"flag rate {common.pm(c['flag_rate'])}.\n"
    )
    for family, severities in result["severities"].items():
        s = summary[family]
        lines.append(f"\n## {family}\n")
        headers = [SEVERITY_NAMES[family], "accuracy", "KL", "norm", "flag", "acc. of flagged"]
        headers += list(SCORE_NAMES)
        rows = []
        for i, sev in enumerate(severities):
            rows.append(
                [
                    f"{sev:g}",
                    common.pm(s["accuracy"], i, 2),
                    common.pm(s["kl_mean"], i, 2),
                    common.pm(s["feature_norm"], i, 1),
                    common.pm(s["flag_rate"], i, 2),
                    common.pm(s["accuracy_flagged"], i, 2),
                    *(common.pm(s["auroc"][n], i, 2) for n in SCORE_NAMES),
                ]
            )
        lines.append(common.markdown_table(headers, rows))
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = common.configure(__doc__, argv, QUICK, Config())
    if args.replot:
        return _report(args, common.read_result(args, "shift_families"))
    with common.reproducible():
        return _run(args, cfg)


def _run(args: Any, cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    data = common.load_data(args)
    per_seed = common.per_seed_results("shift_families", args, cfg, data, run_seed)
    result: dict[str, Any] = {
        "experiment": "shift_families",
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
        "scores": list(SCORE_NAMES),
        "severities": {f: list(s) for f, (s, _) in families(cfg).items()},
        "summary": common.summarize_tree(per_seed),
        "verdicts": verdicts(per_seed, cfg),
        "environment": common.environment(),
    }
    result["runtime_seconds"] = time.perf_counter() - start
    common.write_json(args.out / f"shift_families{'_quick' if args.quick else ''}.json", result)
    return _report(args, result)


def _report(args: Any, result: dict[str, Any]) -> dict[str, Any]:
    suffix = "_quick" if result["quick"] else ""
    plot_families(result, args.out / f"shift_families{suffix}.png")
    plot_norms(result, args.out / f"shift_families_norms{suffix}.png")
    (args.out / f"shift_families{suffix}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
