"""What does a classifier trained on long-tailed labels revert to: the label marginal, or uniform?

    python experiments/long_tailed_ocs.py          # 5 seeds, 4 training recipes (runtime in .md)
    python experiments/long_tailed_ocs.py --quick  # 1 seed, 2 recipes, small splits (the tests)

The OCS of cross-entropy is the training label marginal pi, and oodmon's default score is the
KL to it. On the 20:1 long-tailed split of rotating_mnist.py, that score ranked rotated digits
poorly (AUROC 0.67 at 90 degrees against 0.86 for entropy). One suspect: the network does not
revert to pi at all. This script trains the same network with several recipes and, for each,

* feeds it inputs that carry no digit (blank images at near-black levels; uniform pixel noise)
  and faded digits, and measures how far the mean output is from pi and from uniform;
* reads the last layer's bias: softmax(b) is what the head outputs for all-zero features;
* measures an OCS *from the model*: the mean softmax output on the blank probe images
  (:func:`ocs_from_model_outputs`), and compares, by AUROC against clean test digits, the
  forward and reverse KL to pi, the same two to the measured OCS, entropy, MSP and energy.

Recipes: Adam (the rotating_mnist.py model), Adam with the last-layer bias initialised at
log pi, SGD with momentum and weight decay, and Adam trained twice as long.

Writes long_tailed_ocs.json, long_tailed_ocs.md and long_tailed_ocs.png under --out.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from oodmon import OCS
from oodmon.scores import compute_score

mnist = common.mnist


@dataclass(frozen=True)
class Recipe:
    optimiser: str = "adam"  # "adam" or "sgd"
    lr: float = 1e-3
    epochs: int = 8
    weight_decay: float = 0.0
    bias_at_log_prior: bool = False


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    split_sizes: dict[str, int] = field(default_factory=lambda: dict(mnist.DEFAULT_SPLIT_SIZES))
    imbalance_ratio: float = 20.0
    batch_size: int = 64
    recipes: dict[str, Recipe] = field(
        default_factory=lambda: {
            "adam": Recipe(),
            "adam_bias_log_prior": Recipe(bias_at_log_prior=True),
            "sgd_weight_decay": Recipe(optimiser="sgd", lr=0.05, weight_decay=5e-4),
            "adam_2x_longer": Recipe(epochs=16),
        }
    )
    blank_levels: int = 16  # constant images at levels in [0, blank_max]
    blank_max: float = 0.15
    noise_images: int = 256
    fade_factor: float = 0.1
    angles: tuple[float, ...] = (45.0, 90.0, 180.0)
    eval_noise_sigma: float = 0.5  # Gaussian pixel noise on test digits, an evaluation shift


QUICK = Config(
    seeds=(0,),
    split_sizes={"train": 1500, "calibration": 400, "test": 400},
    recipes={
        "adam": Recipe(epochs=4),
        "adam_bias_log_prior": Recipe(epochs=4, bias_at_log_prior=True),
    },
    noise_images=64,
    angles=(90.0,),
)

#: AUROC columns: (label, score name, which OCS).
SCORES = (
    ("KL(p‖pi)", "ocs_kl", "prior"),
    ("KL(pi‖p)", "ocs_kl_reverse", "prior"),
    ("KL(p‖measured)", "ocs_kl", "measured"),
    ("KL(measured‖p)", "ocs_kl_reverse", "measured"),
    ("entropy", "entropy", "prior"),
    ("msp", "msp", "prior"),
    ("energy", "energy", "prior"),
)


def ocs_from_model_outputs(logits: torch.Tensor, floor: float = 1e-6) -> OCS:
    """A cross-entropy OCS measured from a model: its mean softmax output on probe inputs.

    The probes should carry no class evidence (blank or noise images); the result is what
    the model predicts when it knows nothing, which is what its outputs drift to. This is the
    API oodmon could offer as ``OCS.from_model_outputs(outputs)``.
    """
    mean = torch.softmax(logits.to(torch.float64), dim=1).mean(dim=0)
    floored = mean.clamp_min(floor)
    return OCS(loss="cross_entropy", target=floored / floored.sum(), num_train=len(logits))


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two probability vectors, natural log."""
    p, q = p.to(torch.float64), q.to(torch.float64)
    return float((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum())


def train(
    model: mnist.SmallCNN,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    prior: torch.Tensor,
    batch_size: int,
    seed: int,
) -> mnist.SmallCNN:
    """mnist.train with a choice of optimiser, weight decay and last-layer bias initialisation."""
    if recipe.bias_at_log_prior:
        with torch.no_grad():
            model.fc2.bias.copy_(prior.log().to(torch.float32))
    if recipe.optimiser == "sgd":
        optimiser: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay
        )
    else:
        optimiser = torch.optim.Adam(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
    n = len(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(recipe.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                batch = order[start : start + batch_size]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    return model.eval()


def probes(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """Inputs without a digit, as pixel images in [0, 1]."""
    g = torch.Generator().manual_seed(10_000 + seed)
    levels = torch.linspace(0.0, cfg.blank_max, cfg.blank_levels)
    return {
        "blank": levels.view(-1, 1, 1).expand(-1, 28, 28).clone(),
        "uniform_noise": torch.rand(cfg.noise_images, 28, 28, generator=g),
    }


def run_seed(data: mnist.MnistData, cfg: Config, seed: int, progress: bool) -> dict[str, Any]:
    split = mnist.split_indices(len(data), cfg.split_sizes, seed=seed, labels=data.labels)
    idx = {k: common.long_tailed(v, data.labels, cfg.imbalance_ratio) for k, v in split.items()}
    train_y = data.labels[idx["train"]]
    prior_ocs = OCS.cross_entropy(train_y, 10)
    prior = prior_ocs.target
    uniform = torch.full((10,), 0.1, dtype=prior.dtype)
    train_x = mnist.to_model_input(data.images[idx["train"]])
    test_px = data.images[idx["test"]].to(torch.float32) / 255.0
    g = torch.Generator().manual_seed(20_000 + seed)
    shifted = {f"rotated {a:g}°": mnist.rotate(test_px, a) for a in cfg.angles}
    shifted[f"noise sd {cfg.eval_noise_sigma:g}"] = (
        test_px + cfg.eval_noise_sigma * torch.randn(test_px.shape, generator=g)
    ).clamp(0, 1)
    shifted[f"faded x{cfg.fade_factor:g}"] = test_px * cfg.fade_factor
    probe_px = probes(cfg, seed)
    out: dict[str, Any] = {}
    for name, recipe in tqdm(
        cfg.recipes.items(), desc=f"seed {seed}", leave=False, disable=not progress
    ):
        torch.manual_seed(seed)
        model = train(mnist.SmallCNN(10), train_x, train_y, recipe, prior, cfg.batch_size, seed)

        def logits_of(px: torch.Tensor, model: mnist.SmallCNN = model) -> torch.Tensor:
            return mnist.predict_logits(model, mnist.to_model_input(px)).to(torch.float64)

        clean = logits_of(test_px)
        probe_logits = {k: logits_of(v) for k, v in probe_px.items()}
        probe_logits[f"faded x{cfg.fade_factor:g}"] = logits_of(
            shifted[f"faded x{cfg.fade_factor:g}"]
        )
        measured = ocs_from_model_outputs(probe_logits["blank"])
        bias = torch.softmax(model.fc2.bias.detach().to(torch.float64), dim=0)
        reverts: dict[str, Any] = {
            "last_layer_bias": {"kl_to_prior": kl(bias, prior), "kl_to_uniform": kl(bias, uniform)}
        }
        for probe, z in probe_logits.items():
            mean = torch.softmax(z, dim=1).mean(dim=0)
            reverts[probe] = {
                "kl_to_prior": kl(mean, prior),
                "kl_to_uniform": kl(mean, uniform),
                "head_class_share": float(mean[0]),
                "tail_class_share": float(mean[9]),
            }
        ocs_of = {"prior": prior_ocs, "measured": measured}
        clean_scores = {
            label: compute_score(score, clean, ocs_of[which]).numpy()
            for label, score, which in SCORES
        }
        auroc: dict[str, list[float]] = {label: [] for label, _, _ in SCORES}
        for px in shifted.values():
            z = logits_of(px)
            for label, score, which in SCORES:
                s = compute_score(score, z, ocs_of[which]).numpy()
                auroc[label].append(common.auroc(clean_scores[label], s))
        out[name] = {
            "accuracy": float((clean.argmax(dim=1) == data.labels[idx["test"]]).double().mean()),
            "reverts": reverts,
            "measured_ocs": measured.target.tolist(),
            "measured_kl_to_prior": kl(measured.target, prior),
            "measured_kl_to_uniform": kl(measured.target, uniform),
            "auroc": auroc,
        }
    out["_prior"] = prior.tolist()
    out["_shifts"] = list(shifted)
    out["_sizes"] = {k: len(v) for k, v in idx.items()}
    return out


# ---------------------------------------------------------------------- figures and tables


def plot(result: dict[str, Any], path: Any) -> None:
    import matplotlib.pyplot as plt

    recipes = list(result["recipes"])
    s = result["summary"]
    prior = np.asarray(result["prior"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ax = axes[0]
    x = np.arange(10)
    ax.plot(x, prior, "k-", lw=2, label="label marginal pi (the OCS)")
    ax.axhline(0.1, color="grey", ls=":", lw=1, label="uniform")
    for i, name in enumerate(recipes):
        m = np.asarray(s[name]["measured_ocs"]["mean"])
        h = np.asarray(s[name]["measured_ocs"]["ci95"])
        ax.errorbar(
            x + (i - 1.5) * 0.08,
            m,
            yerr=h,
            fmt="o-",
            ms=3,
            lw=1,
            capsize=2,
            color=f"C{i}",
            label=f"output on blank images: {name}",
        )
    ax.set_xticks(x)
    ax.set_xlabel("class (digit 0 = head, 9 = tail)")
    ax.set_ylabel("probability")
    ax.set_title("What the model predicts on blank images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.17), ncol=2, frameon=False)
    ax = axes[1]
    labels = [label for label, _, _ in SCORES]
    shift = result["shifts"].index("rotated 90°") if "rotated 90°" in result["shifts"] else 0
    width = 0.8 / len(recipes)
    for i, name in enumerate(recipes):
        m = [s[name]["auroc"][label]["mean"][shift] for label in labels]
        h = [s[name]["auroc"][label]["ci95"][shift] for label in labels]
        ax.bar(
            np.arange(len(labels)) + (i - (len(recipes) - 1) / 2) * width,
            m,
            width,
            yerr=h,
            capsize=2,
            color=f"C{i}",
            label=name,
        )
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("AUROC")
    ax.set_title(f"AUROC, {result['shifts'][shift]} vs clean test digits", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(
        "Long-tailed MNIST (20:1): what the model reverts to, and which score ranks best\n"
        f"error bars: {common.interval_note(len(result['seeds']))}",
        fontsize=10,
    )
    fig.tight_layout()
    common.save_figure(fig, path)


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    n_seeds = len(result["seeds"])
    prior = ", ".join(f"{v:.3f}" for v in result["prior"])
    lines = [
        "# Long-tailed MNIST: what the model reverts to\n",
        f"Data: {result['data']['source']}; long-tailed splits (ratio "
        f"{result['config']['imbalance_ratio']:g}) of sizes {result['data']['sizes']}; seeds "
        f"{result['seeds']}; {common.interval_note(n_seeds)}. Runtime "
        f"{result['runtime_seconds']:.0f} s{' (quick mode)' if result['quick'] else ''}.\n",
        f"pi (seed {result['seeds'][0]}) = [{prior}]; KL(pi || uniform) = "
        f"{result['kl_prior_uniform']:.3f} nats. Blank: constant images at "
        f"{result['config']['blank_levels']} levels in [0, {result['config']['blank_max']:g}]; "
        "the measured OCS is the mean softmax output on them.\n",
        "\n## Where outputs go without evidence: KL(mean output ‖ pi) and KL(mean output ‖ "
        "uniform), nats\n",
    ]
    probes = list(s[next(iter(result["recipes"]))]["reverts"])
    headers = ["recipe", "accuracy"]
    for p in probes:
        headers += [f"{p}: to pi", f"{p}: to uniform"]
    rows = []
    for name in result["recipes"]:
        r = s[name]["reverts"]
        row = [name, common.pm(s[name]["accuracy"])]
        for p in probes:
            row += [
                common.pm(r[p]["kl_to_prior"], digits=2),
                common.pm(r[p]["kl_to_uniform"], digits=2),
            ]
        rows.append(row)
    lines.append(common.markdown_table(headers, rows))
    lines.append("\n## Head (digit 0) and tail (digit 9) share of the mean output\n")
    headers = ["recipe"] + [f"{p}: 0 / 9" for p in probes if p != "last_layer_bias"]
    rows = []
    for name in result["recipes"]:
        r = s[name]["reverts"]
        rows.append(
            [name]
            + [
                f"{r[p]['head_class_share']['mean']:.3f} / {r[p]['tail_class_share']['mean']:.3f}"
                for p in probes
                if p != "last_layer_bias"
            ]
        )
    lines.append(common.markdown_table(headers, rows))
    lines.append(
        f"\n(pi gives {result['prior'][0]:.3f} / {result['prior'][9]:.3f}; "
        "uniform 0.100 / 0.100.)\n"
    )
    for shift_i, shift in enumerate(result["shifts"]):
        lines.append(f"\n## AUROC, {shift} vs clean test digits\n")
        rows = [
            [name, *(common.pm(s[name]["auroc"][label], shift_i) for label, _, _ in SCORES)]
            for name in result["recipes"]
        ]
        lines.append(common.markdown_table(["recipe", *(label for label, _, _ in SCORES)], rows))
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = common.configure(__doc__, argv, QUICK, Config())
    if args.replot:
        return _report(args, common.read_result(args, "long_tailed_ocs"))
    with common.reproducible():
        return _run(args, cfg)


def _run(args: Any, cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    data = common.load_data(args)
    per_seed = common.per_seed_results("long_tailed_ocs", args, cfg, data, run_seed)
    first = per_seed[0]
    meta = {k: first[k] for k in ("_prior", "_shifts", "_sizes")}
    for run in per_seed:
        for k in meta:
            run.pop(k)
    prior = torch.tensor(meta["_prior"])
    result: dict[str, Any] = {
        "experiment": "long_tailed_ocs",
        "quick": args.quick,
        "config": asdict(cfg),
        "data": {"source": data.source, "sizes": meta["_sizes"]},
        "intervals": "ci95 = Student-t 95% interval half-width over seeds",
        "seeds": list(cfg.seeds),
        "recipes": {k: asdict(v) for k, v in cfg.recipes.items()},
        "prior": meta["_prior"],
        "kl_prior_uniform": kl(prior, torch.full((10,), 0.1)),
        "shifts": meta["_shifts"],
        "summary": common.summarize_tree(per_seed),
        "environment": common.environment(),
    }
    result["runtime_seconds"] = time.perf_counter() - start
    common.write_json(args.out / f"long_tailed_ocs{'_quick' if args.quick else ''}.json", result)
    return _report(args, result)


def _report(args: Any, result: dict[str, Any]) -> dict[str, Any]:
    suffix = "_quick" if result["quick"] else ""
    plot(result, args.out / f"long_tailed_ocs{suffix}.png")
    (args.out / f"long_tailed_ocs{suffix}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
