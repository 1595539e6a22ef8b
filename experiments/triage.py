"""Does OOD-first labelling pay? Label-budget curves on rotating MNIST.

    python experiments/triage.py          # 3 seeds x 5 budgets x 5 strategies; ~7 CPU-minutes
    python experiments/triage.py --quick  # 1 seed, 2 budgets; ~40 CPU-seconds (the tests run it)

A small CNN is trained on upright digits. Production then sends an unlabelled pool that is half
upright, half rotated by 30-180 degrees, and a labeller can afford k labels. Which k? Five
strategies pick them:

* ``oodmon``: the real label queue's claim order. The pool's model outputs go through an oodmon
  Detector (ocs_kl, calibrated on held-out upright digits); every row's verdict is put into a
  LabelQueue on a temporary SQLite file and ``claim(k)`` says which items get labelled (the
  queue's priority: ascending p-value, then distance to the OCS).
* ``random``: k pool items uniformly at random.
* ``least_confident``: the k lowest maximum softmax probabilities (MSP).
* ``entropy``: the k highest predictive entropies.
* ``random_rotated``: k rotated items at random, a reference that knows which items are shifted.

Every strategy's k labelled items go through one fixed fine-tuning recipe (see ``Config``):
start from the upright model, freeze its convolutions, and train the fully connected head for a
fixed number of steps on batches that draw half from the original training digits and half
from the k labelled items. Accuracy is measured on held-out test digits rotated by 30-180
degrees and on the same digits upright (does the model forget?). Writes triage.json, triage.md
and triage.png (``*_quick.*`` with --quick) under --out.

With the balanced MNIST sample the OCS is (near) uniform, so KL(p || pi) = log K - H(p) and the
queue's order is, by that identity, the entropy order: the ``entropy`` column is the check.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from oodmon import OCS, Detector, LabelQueue
from oodmon.demo import mnist
from oodmon.label_queue import QueueItem

STRATEGIES = ("oodmon", "random", "least_confident", "entropy", "random_rotated")
LABELS = {
    "oodmon": "oodmon queue order (most OOD first)",
    "random": "random",
    "least_confident": "least confident (lowest MSP)",
    "entropy": "highest entropy",
    "random_rotated": "random among rotated (reference)",
}


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int, ...] = (25, 50, 100, 200, 400)
    # the 5,000-digit sample: train the model, calibrate the detector, the production pool
    # (half upright, half rotated) and the test digits (evaluated rotated and upright)
    split_sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 1500, "calibration": 500, "pool": 2000, "test": 1000}
    )
    min_angle: float = 30.0
    max_angle: float = 180.0
    epochs: int = 4  # the upright model
    batch_size: int = 64
    lr: float = 1e-3
    alpha: float = 0.05  # the Detector's flag level (the queue orders every row by p-value)
    threads: int = 1  # torch threads: the runtimes in the header are for one core
    # the one fine-tuning recipe, the same for every strategy and budget
    finetune_steps: int = 150
    finetune_half_batch: int = 32  # per step: this many training digits + this many labelled
    finetune_lr: float = 1e-3


QUICK = Config(
    seeds=(0,),
    budgets=(25, 100),
    split_sizes={"train": 1000, "calibration": 300, "pool": 600, "test": 400},
    epochs=3,
    finetune_steps=80,
)


# ---------------------------------------------------------------------- data


def rotate_each(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate uint8 digits ``[N, 28, 28]`` by one angle each (degrees, counter-clockwise)."""
    return torch.stack(
        [mnist.rotate(image, float(a)) for image, a in zip(images, angles, strict=True)]
    )


def random_angles(n: int, cfg: Config, generator: torch.Generator) -> Tensor:
    span = cfg.max_angle - cfg.min_angle
    return cfg.min_angle + span * torch.rand(n, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------- the frozen trunk


def trunk(model: mnist.SmallCNN, x: Tensor) -> Tensor:
    """The convolutional part of :class:`SmallCNN` (before its first dropout): ``[N, 9216]``."""
    with torch.no_grad():
        out = [
            torch.flatten(F.max_pool2d(F.relu(model.conv2(F.relu(model.conv1(b)))), 2), 1)
            for b in x.split(512)
        ]
    return torch.cat(out)


def head_logits(model: mnist.SmallCNN, z: Tensor) -> Tensor:
    """The fully connected part of :class:`SmallCNN` on trunk outputs ``z``."""
    return model.head(F.relu(model.fc1(model.drop1(z))))


def predict_head(model: mnist.SmallCNN, z: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return head_logits(model, z)


def finetune(
    base: mnist.SmallCNN,
    z_train: Tensor,
    y_train: Tensor,
    z_new: Tensor,
    y_new: Tensor,
    cfg: Config,
    seed: int,
) -> mnist.SmallCNN:
    """The fixed recipe: Adam on the head, half of each batch old digits, half the k new ones."""
    model = copy.deepcopy(base)
    params = [*model.fc1.parameters(), *model.fc2.parameters()]
    optimiser = torch.optim.Adam(params, lr=cfg.finetune_lr)
    generator = torch.Generator().manual_seed(seed)
    half = cfg.finetune_half_batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        model.train()
        for _ in range(cfg.finetune_steps):
            old = torch.randint(len(y_train), (half,), generator=generator)
            new = torch.randint(len(y_new), (half,), generator=generator)
            z = torch.cat([z_train[old], z_new[new]])
            y = torch.cat([y_train[old], y_new[new]])
            loss = F.cross_entropy(head_logits(model, z), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return model.eval()


# ---------------------------------------------------------------------- strategies


def queue_order(
    detector: Detector, logits: Tensor, images: Tensor, budget: int, path: Path
) -> list[int]:
    """The pool items a real LabelQueue hands out first: ``claim(budget)`` on a fresh file."""
    verdict = detector.predict(logits).to_host()
    items = [
        QueueItem.create(
            model="mnist-cnn",
            version="upright",
            p_value=float(verdict.p_value[i]),
            distance=float(verdict.distance[i]),
            score=float(verdict.score[i]),
            predicted=int(verdict.predicted[i]),
            input=images[i].numpy(),
            store_input=False,  # hashed for dedupe; the index is the reference
            reference=f"pool/{i}",
            id=f"pool-{i}",
            calibration=detector.calibration_hash_,
        )
        for i in range(len(images))
    ]
    with LabelQueue(path, capacity=len(items)) as queue:
        result = queue.add(items)
        if result.added != len(items):
            raise RuntimeError(f"Expected every pool item queued, but got {result}.")
        claimed = queue.claim(budget, worker="triage")
    return [int(item.id.removeprefix("pool-")) for item in claimed]


def rankings(
    logits: Tensor, rotated: np.ndarray, generator: torch.Generator
) -> dict[str, np.ndarray]:
    """The baselines' full orders over the pool (first = labelled first)."""
    probs = logits.softmax(dim=1)
    msp = probs.max(dim=1).values.numpy()
    entropy = -(probs * logits.log_softmax(dim=1)).sum(dim=1).numpy()
    rotated_idx = np.flatnonzero(rotated)
    return {
        "random": torch.randperm(len(logits), generator=generator).numpy(),
        "least_confident": np.argsort(msp, kind="stable"),
        "entropy": np.argsort(-entropy, kind="stable"),
        "random_rotated": rotated_idx[torch.randperm(len(rotated_idx), generator=generator)],
    }


# ---------------------------------------------------------------------- one seed


def run_seed(data: mnist.MnistData, cfg: Config, seed: int, progress: bool) -> dict[str, Any]:
    split = mnist.split_indices(len(data), cfg.split_sizes, seed=seed, labels=data.labels)
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.images, data.labels

    torch.manual_seed(seed)
    model = mnist.SmallCNN(10)
    y_train = labels[split["train"]]
    mnist.train(
        model,
        mnist.to_model_input(images[split["train"]]),
        y_train,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        progress=progress,
    )
    ocs = OCS.cross_entropy(y_train, 10)
    detector = Detector(ocs, alpha=cfg.alpha).fit(
        mnist.predict_logits(model, mnist.to_model_input(images[split["calibration"]]))
    )

    # the production pool: first half upright, second half rotated
    pool_images = images[split["pool"]].clone()
    n_pool = len(pool_images)
    rotated = np.arange(n_pool) >= n_pool // 2
    pool_angles = torch.zeros(n_pool, dtype=torch.float64)
    pool_angles[rotated] = random_angles(int(rotated.sum()), cfg, generator)
    pool_images[rotated] = rotate_each(pool_images[rotated], pool_angles[rotated])
    y_pool = labels[split["pool"]]

    test_upright = images[split["test"]]
    test_angles = random_angles(len(test_upright), cfg, generator)
    test_rotated = rotate_each(test_upright, test_angles)
    y_test = labels[split["test"]]

    z_train = trunk(model, mnist.to_model_input(images[split["train"]]))
    z_pool = trunk(model, mnist.to_model_input(pool_images))
    z_rot = trunk(model, mnist.to_model_input(test_rotated))
    z_up = trunk(model, mnist.to_model_input(test_upright))
    pool_logits = predict_head(model, z_pool)

    def accuracy(m: mnist.SmallCNN, z: Tensor) -> float:
        return float((predict_head(m, z).argmax(dim=1) == y_test).double().mean())

    out: dict[str, Any] = {
        "base": {"rotated": accuracy(model, z_rot), "upright": accuracy(model, z_up)},
        "pool_flag_rate": {
            "upright": float(detector.predict(pool_logits[~rotated]).flag.double().mean()),
            "rotated": float(detector.predict(pool_logits[rotated]).flag.double().mean()),
        },
    }
    orders = rankings(pool_logits, rotated, generator)
    per_strategy: dict[str, dict[str, list[float]]] = {
        s: {"rotated": [], "upright": [], "labelled_rotated": [], "labelled_angle": []}
        for s in STRATEGIES
    }
    bar = tqdm(
        total=len(STRATEGIES) * len(cfg.budgets),
        desc=f"seed {seed} fine-tune",
        disable=not progress,
    )
    with tempfile.TemporaryDirectory(prefix="oodmon-triage-") as tmp:
        for b, budget in enumerate(cfg.budgets):
            path = Path(tmp) / f"queue-{budget}.db"
            chosen = {
                "oodmon": np.asarray(queue_order(detector, pool_logits, pool_images, budget, path))
            }
            chosen.update({name: order[:budget] for name, order in orders.items()})
            for s, strategy in enumerate(STRATEGIES):
                picked = torch.as_tensor(chosen[strategy], dtype=torch.int64)
                if len(picked) != budget:
                    raise RuntimeError(f"{strategy} picked {len(picked)} items, not {budget}.")
                tuned = finetune(
                    model,
                    z_train,
                    y_train,
                    z_pool[picked],
                    y_pool[picked],
                    cfg,
                    seed=seed * 1000 + b * 10 + s,
                )
                record = per_strategy[strategy]
                record["rotated"].append(accuracy(tuned, z_rot))
                record["upright"].append(accuracy(tuned, z_up))
                record["labelled_rotated"].append(float(rotated[picked.numpy()].mean()))
                record["labelled_angle"].append(float(pool_angles[picked].mean()))
                bar.update(1)
    bar.close()
    out["strategies"] = per_strategy
    return out


# ---------------------------------------------------------------------- summaries


def labels_to_reach(budgets: list[int], accuracy: list[float], target: float) -> float | None:
    """Labels needed to reach ``target`` on a mean curve (linear in log k), or None if never."""
    for i, acc in enumerate(accuracy):
        if acc >= target:
            if i == 0:
                return float(budgets[0])
            lo, hi = math.log(budgets[i - 1]), math.log(budgets[i])
            frac = (target - accuracy[i - 1]) / (acc - accuracy[i - 1])
            return float(math.exp(lo + frac * (hi - lo)))
    return None


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """Labels each strategy needs to match random's rotated accuracy at its largest budget."""
    budgets = result["budgets"]
    s = result["summary"]["strategies"]
    target = s["random"]["rotated"]["mean"][-1]
    return {
        "target_rotated_accuracy": target,
        "labels_needed": {
            name: labels_to_reach(budgets, s[name]["rotated"]["mean"], target)
            for name in STRATEGIES
        },
    }


def markdown(result: dict[str, Any]) -> str:
    budgets = result["budgets"]
    s = result["summary"]
    base = s["base"]
    lines = [
        "# Does OOD-first labelling pay? Rotating MNIST label budgets\n",
        f"Data: {result['data']['source']}; split sizes {result['data']['split_sizes']} (pool "
        f"half upright, half rotated {result['config']['min_angle']:g}-"
        f"{result['config']['max_angle']:g} degrees); seeds {result['seeds']}; mean ± std "
        f"(sample std) over seeds. Runtime {result['runtime_seconds']:.0f} s wall, "
        f"{result['cpu_seconds']:.0f} s CPU on {result['config']['threads']} thread(s)"
        f"{' (quick mode)' if result['quick'] else ''}.\n",
        "Fine-tuning recipe (identical for every strategy): freeze the convolutions of the "
        f"upright model, train the fully connected head for {result['config']['finetune_steps']}"
        f" Adam steps (lr {result['config']['finetune_lr']:g}), each batch "
        f"{result['config']['finetune_half_batch']} original training digits + "
        f"{result['config']['finetune_half_batch']} of the k labelled pool items.\n",
        f"Before fine-tuning (k = 0): rotated accuracy {common.pm(base['rotated'])}, upright "
        f"{common.pm(base['upright'])}. Detector flag rate (alpha = {result['config']['alpha']})"
        f" on the pool: upright {common.pm(s['pool_flag_rate']['upright'])}, rotated "
        f"{common.pm(s['pool_flag_rate']['rotated'])}.\n",
    ]
    for key, title in (
        ("rotated", "Accuracy on rotated test digits"),
        ("upright", "Accuracy on upright test digits (forgetting check)"),
        ("labelled_rotated", "Share of the labelled items that are rotated"),
    ):
        lines.append(f"\n## {title}\n")
        rows = [
            [LABELS[name]] + [common.pm(s["strategies"][name][key], i) for i in range(len(budgets))]
            for name in STRATEGIES
        ]
        lines.append(common.markdown_table(["strategy", *(f"k = {k}" for k in budgets)], rows))
    h = result["headline"]
    lines.append("\n## Labels needed\n")
    lines.append(
        f"Rotated accuracy that random labelling reaches with {budgets[-1]} labels: "
        f"{h['target_rotated_accuracy']:.3f}. Labels each strategy needs to reach it (mean "
        "curve, interpolated linearly in log k; '-' = not reached within the budgets):\n"
    )
    rows = [
        [LABELS[name], "-" if v is None else f"{v:.0f}"] for name, v in h["labels_needed"].items()
    ]
    lines.append(common.markdown_table(["strategy", "labels"], rows))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    budgets = result["budgets"]
    s = result["summary"]
    colors = {
        "oodmon": "tab:red",
        "random": "tab:gray",
        "least_confident": "tab:blue",
        "entropy": "tab:green",
        "random_rotated": "black",
    }
    styles = {"random_rotated": "--"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("rotated", "accuracy on rotated test digits"),
        ("upright", "accuracy on upright test digits"),
        ("labelled_rotated", "share of labelled items that are rotated"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, name in enumerate(STRATEGIES):
            stat = s["strategies"][name][key]
            # a small horizontal offset keeps overlapping error bars apart
            x = np.asarray(budgets, dtype=float) * (1 + 0.025 * (i - 2))
            ax.errorbar(
                x,
                stat["mean"],
                yerr=stat["std"],
                color=colors[name],
                ls=styles.get(name, "-"),
                marker="o",
                ms=3,
                lw=1.2,
                capsize=2,
                label=LABELS[name],
            )
        if key in ("rotated", "upright"):
            ax.axhline(
                s["base"][key]["mean"],
                color="tab:orange",
                lw=0.8,
                ls=":",
                label="before fine-tuning (k = 0)",
            )
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(k) for k in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labels (k)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="lower center",
        ncol=3,
        bbox_to_anchor=(0.5, -0.12),
        frameon=False,
        fontsize=9,
    )
    fig.suptitle(
        f"Rotating MNIST: which k pool items to label? mean ± 1 std over "
        f"{len(result['seeds'])} seed(s) (error bars)",
        fontsize=11,
    )
    common.save_figure(fig, path)


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = common.configure(__doc__, argv, QUICK, Config())
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = common.load_data(args)
    try:
        per_seed = [run_seed(data, cfg, seed, not args.no_progress) for seed in cfg.seeds]
    finally:
        torch.set_num_threads(threads)  # callers (the tests) keep their own setting
    suffix = "_quick" if args.quick else ""
    result: dict[str, Any] = {
        "experiment": "triage",
        "quick": args.quick,
        "config": asdict(cfg),
        "data": {
            "source": data.source,
            "n_available": len(data),
            "split_sizes": dict(cfg.split_sizes),
            "stratified": True,
        },
        "seeds": list(cfg.seeds),
        "budgets": list(cfg.budgets),
        "strategies": dict(LABELS),
        "summary": common.summarize_tree(per_seed),
        "environment": common.environment(),
    }
    result["headline"] = headline(result)
    result["runtime_seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start
    plot(result, args.out / f"triage{suffix}.png")
    common.write_json(args.out / f"triage{suffix}.json", result)
    (args.out / f"triage{suffix}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
