"""Optimal constant solutions (OCS): the prediction a loss rewards when the input is ignored.

The OCS of a loss L over training targets y_1..y_N is ``c* = argmin_c (1/N) sum_i L(c, y_i)``.
Kang et al. ("Deep Neural Networks Tend To Extrapolate Predictably", ICLR 2024) observe that
a network's outputs drift towards it as inputs move away from the training distribution, so
"the output sits close to the OCS" is evidence that the input is out of distribution.

Each constructor below builds the OCS of one common loss in closed form; :meth:`OCS.fit`
finds it numerically for any differentiable loss.

Zero-probability floor: a class (or label) never seen in training has OCS probability 0,
which would make KL distances infinite or undefined. Probabilities are therefore clamped to
at least ``floor`` (default ``1e-6``) and renormalised; the floor is stored with the OCS.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from oodmon.errors import FormatVersionError

__all__ = [
    "DEFAULT_FLOOR",
    "LOSSES",
    "OCS",
    "OCS_FORMAT_VERSION",
    "LossName",
    "reward_targets",
]

LossName = Literal[
    "cross_entropy", "binary_cross_entropy", "mse", "gaussian_nll", "reward_prediction", "custom"
]
LOSSES: tuple[str, ...] = (
    "cross_entropy",
    "binary_cross_entropy",
    "mse",
    "gaussian_nll",
    "reward_prediction",
    "custom",
)

#: Version of the dict/JSON layout written by :meth:`OCS.to_dict`.
OCS_FORMAT_VERSION = 1
DEFAULT_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class OCS:
    """The optimal constant solution of a training loss.

    Attributes:
        loss: which loss this is the OCS of.
        target: the constant prediction, in the space the loss compares with targets:
            class probabilities ``[K]`` (cross-entropy), positive rates ``[L]`` (binary
            cross-entropy), mean target ``[D]`` (MSE, Gaussian NLL), mean reward per action
            ``[K+1]`` (reward prediction), or the raw constant output (custom losses).
        variance: ``[D]`` target variance, for Gaussian NLL only.
        label_smoothing: the label smoothing the cross-entropy OCS includes.
        num_train: how many training targets it was computed from.
        floor: smallest probability kept, so that unseen classes give finite distances.
        wrong_cost: the penalty for a wrong action, for reward prediction only.
    """

    loss: str
    target: Tensor
    variance: Tensor | None = None
    label_smoothing: float = 0.0
    num_train: int = 0
    floor: float = DEFAULT_FLOOR
    wrong_cost: float = 0.0

    @functools.cached_property
    def num_outputs(self) -> int:
        """Width of the model output this OCS expects (``2 * D`` for Gaussian NLL heads).

        Cached: every score of a batch checks it.
        """
        width = int(self.target.shape[-1])
        return 2 * width if self.loss == "gaussian_nll" else width

    @property
    def log_target(self) -> Tensor:
        """``log(target)`` for probability-valued OCS (cross-entropy)."""
        return torch.log(self.target)

    @property
    def _neg_entropy(self) -> Tensor:
        """``sum_k target_k log target_k`` (0-dim): the constant term of ``KL(target || p)``."""
        return torch.dot(self.target, self.log_target)

    def constant_on(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A constant (``target``, ``log_target``, ``_neg_entropy``, ``variance``), cached.

        Scoring runs per batch; moving (and taking the log of) the same small vector every
        time would cost a few kernel launches per batch for nothing.
        """
        cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = self.__dict__.setdefault(
            "_constants", {}
        )
        key = (name, device, dtype)
        value = cache.get(key)
        if value is None:
            source = getattr(self, name)
            if source is None:
                raise ValueError(f"This {self.loss} OCS has no {name}.")
            value = source.to(device=device, dtype=dtype)
            cache[key] = value
        return value

    def host_constant(self, name: str) -> np.ndarray:
        """A constant as a float32 NumPy array on the host, cached: the native kernels' form."""
        cache: dict[str, np.ndarray] = self.__dict__.setdefault("_host_constants", {})
        value = cache.get(name)
        if value is None:
            value = self.constant_on(name, torch.device("cpu"), torch.float32).numpy()
            cache[name] = value
        return value

    # ------------------------------------------------------------------ constructors

    @classmethod
    def cross_entropy(
        cls,
        labels: Any = None,
        num_classes: int | None = None,
        *,
        counts: Any = None,
        label_smoothing: float = 0.0,
        floor: float = DEFAULT_FLOOR,
    ) -> OCS:
        """OCS of softmax cross-entropy: the training label marginal.

        With label smoothing ``eps`` over K classes the OCS is ``(1 - eps) * pi + eps / K``.

        Args:
            labels: ``[N]`` integer class labels in ``[0, num_classes)``.
            num_classes: K. Required with ``labels``; optional with ``counts``.
            counts: ``[K]`` non-negative integer class counts, instead of ``labels``.
            label_smoothing: ``eps`` in ``[0, 1)``.
            floor: smallest class probability kept (see module docstring).

        Raises:
            ValueError: empty or out-of-range labels, bad counts, bad smoothing.
        """
        eps = _check_fraction("label_smoothing", label_smoothing, upper_open=True)
        class_counts = _class_counts(labels, num_classes, counts)
        k = class_counts.numel()
        prior = class_counts / class_counts.sum()
        prior = (1.0 - eps) * prior + eps / k
        if float(floor) == 0 and bool((prior == 0).any()):
            raise ValueError(
                "Expected `floor` > 0 when a class never occurs in training (its OCS "
                "probability would be 0 and every KL to the OCS infinite), but got floor=0."
            )
        return cls(
            loss="cross_entropy",
            target=_floor_probabilities(prior, floor),
            label_smoothing=eps,
            num_train=int(class_counts.sum().item()),
            floor=float(floor),
        )

    @classmethod
    def binary_cross_entropy(cls, targets: Any, *, floor: float = DEFAULT_FLOOR) -> OCS:
        """OCS of sigmoid binary cross-entropy (multi-label heads): each label's positive rate.

        Args:
            targets: ``[N, L]`` targets in ``[0, 1]`` (hard 0/1 labels or soft targets).
            floor: smallest rate kept, so that no label's rate is exactly 0 or 1.

        Raises:
            ValueError: empty, non-finite or out-of-range targets.
        """
        if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or not 0 <= floor < 0.5:
            raise ValueError(f"Expected `floor` in [0, 0.5), but got {floor!r}.")
        y = _as_float_matrix("targets", targets)
        if (y < 0).any() or (y > 1).any():
            raise ValueError(
                "Expected `targets` in [0, 1] for binary cross-entropy, but got values in "
                f"[{y.min().item():g}, {y.max().item():g}]."
            )
        rate = y.mean(dim=0).clamp(floor, 1.0 - floor)
        return cls(
            loss="binary_cross_entropy", target=rate, num_train=y.shape[0], floor=float(floor)
        )

    @classmethod
    def mse(cls, targets: Any) -> OCS:
        """OCS of mean squared error: the mean target, per output.

        Args:
            targets: ``[N]`` or ``[N, D]`` real targets.
        """
        y = _as_float_matrix("targets", targets)
        return cls(loss="mse", target=y.mean(dim=0), num_train=y.shape[0])

    @classmethod
    def gaussian_nll(cls, targets: Any, *, min_variance: float = 1e-6) -> OCS:
        """OCS of the Gaussian negative log-likelihood: ``N(mean of y, variance of y)``.

        The model is expected to output ``[mean_1..mean_D, var_1..var_D]`` (width ``2 * D``).

        Args:
            targets: ``[N]`` or ``[N, D]`` real targets, N >= 2.
            min_variance: lower bound on the OCS variance (constant targets have variance 0).
        """
        y = _as_float_matrix("targets", targets)
        if y.shape[0] < 2:
            raise ValueError(
                "Expected at least 2 `targets` for a Gaussian NLL OCS (it needs a variance), "
                f"but got {y.shape[0]}."
            )
        variance = y.var(dim=0, unbiased=False).clamp_min(min_variance)
        return cls(
            loss="gaussian_nll", target=y.mean(dim=0), variance=variance, num_train=y.shape[0]
        )

    @classmethod
    def reward_prediction(
        cls,
        labels: Any = None,
        num_classes: int | None = None,
        wrong_cost: float = 4.0,
        *,
        counts: Any = None,
    ) -> OCS:
        """OCS of a reward-prediction head with K label actions and one abstain action.

        Each action's reward is known from the label: +1 for the right label, ``-wrong_cost``
        for a wrong one, 0 for abstaining. A head trained with MSE on this reward vector has
        OCS ``(1 + c) * pi_k - c`` for label k and 0 for abstain, so reverting to the OCS
        means abstaining whenever every ``pi_k < c / (1 + c)``.

        Args:
            labels: ``[N]`` integer labels in ``[0, num_classes)``.
            num_classes: K (the head has K + 1 outputs; the last one is abstain).
            wrong_cost: c > 0.
            counts: ``[K]`` class counts, instead of ``labels``.
        """
        if not (
            isinstance(wrong_cost, (int, float)) and math.isfinite(wrong_cost) and wrong_cost > 0
        ):
            raise ValueError(
                f"Expected `wrong_cost` to be a positive number, but got {wrong_cost!r}."
            )
        class_counts = _class_counts(labels, num_classes, counts)
        prior = class_counts / class_counts.sum()
        rewards = torch.cat([(1.0 + wrong_cost) * prior - wrong_cost, prior.new_zeros(1)])
        return cls(
            loss="reward_prediction",
            target=rewards,
            num_train=int(class_counts.sum().item()),
            wrong_cost=float(wrong_cost),
        )

    @classmethod
    def fit(
        cls,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        targets: Any,
        num_outputs: int,
        *,
        init: Any = None,
        max_iter: int = 500,
        tolerance: float = 1e-12,
    ) -> OCS:
        """Numerical OCS of any differentiable loss: ``argmin_c mean_i loss_fn(c, y_i)``.

        The constant ``c`` is a raw model output of width ``num_outputs`` (logits for a
        cross-entropy loss, for instance). It is found with L-BFGS in float64, so it agrees
        with the closed forms to about 1e-6 where those exist.

        Args:
            loss_fn: ``loss_fn(outputs [N, num_outputs], targets) -> loss`` (scalar mean or
                ``[N]``), e.g. ``torch.nn.functional.cross_entropy``.
            targets: the training targets, in whatever form ``loss_fn`` takes.
            num_outputs: width of the constant prediction.
            init: optional ``[num_outputs]`` starting point (zeros by default).
            max_iter: L-BFGS iterations.
            tolerance: gradient tolerance.

        Returns:
            An OCS with ``loss="custom"`` whose ``target`` is the optimal raw output. Its
            distance is the mean squared difference in raw output space. For a loss that
            ignores some output directions (softmax cross-entropy ignores a constant added
            to every logit) that distance depends on them: use the closed form instead.
        """
        if not callable(loss_fn):
            raise ValueError(
                f"Expected `loss_fn` to be callable, but got {type(loss_fn).__name__}."
            )
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(
                f"Expected `num_outputs` to be a positive integer, but got {num_outputs!r}."
            )
        y = torch.as_tensor(np.asarray(targets)) if not isinstance(targets, Tensor) else targets
        if y.numel() == 0:
            raise ValueError("Expected non-empty `targets`, but got an empty array.")
        if y.is_floating_point():
            if not torch.isfinite(y).all():
                raise ValueError("Expected finite `targets`, but got NaN or inf values.")
            y = y.to(torch.float64)
        n = y.shape[0]
        start = torch.zeros(num_outputs, dtype=torch.float64)
        if init is not None:
            start = torch.as_tensor(init, dtype=torch.float64).reshape(num_outputs).clone()
        c = start.requires_grad_(True)
        optimiser = torch.optim.LBFGS(
            [c],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=tolerance,
            tolerance_change=1e-15,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimiser.zero_grad()
            value = loss_fn(c.unsqueeze(0).expand(n, num_outputs), y)
            value = value.mean()
            value.backward()
            return value

        optimiser.step(closure)
        optimum = c.detach()
        if not torch.isfinite(optimum).all():
            raise ValueError("The numerical OCS diverged: `loss_fn` has no finite minimiser here.")
        return cls(loss="custom", target=optimum, num_train=int(n))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict (floats as Python floats, exact for float32/64)."""
        return {
            "format": "oodmon.ocs",
            "format_version": OCS_FORMAT_VERSION,
            "loss": self.loss,
            "target": [float(v) for v in self.target.detach().cpu().to(torch.float64).tolist()],
            "variance": None
            if self.variance is None
            else [float(v) for v in self.variance.detach().cpu().to(torch.float64).tolist()],
            "label_smoothing": self.label_smoothing,
            "num_train": self.num_train,
            "floor": self.floor,
            "wrong_cost": self.wrong_cost,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OCS:
        """Inverse of :meth:`to_dict`.

        Raises:
            FormatVersionError: the dict was written by another format version.
            ValueError: the dict is not an OCS.
        """
        if not isinstance(data, dict) or data.get("format") != "oodmon.ocs":
            raise ValueError("Expected a dict written by `OCS.to_dict` (format 'oodmon.ocs').")
        version = data.get("format_version")
        if version != OCS_FORMAT_VERSION:
            raise FormatVersionError(
                f"Expected OCS format version {OCS_FORMAT_VERSION}, but got {version!r}; "
                "rebuild the OCS with this oodmon version."
            )
        if data.get("loss") not in LOSSES:
            raise ValueError(
                f"Expected `loss` to be one of {LOSSES}, but got {data.get('loss')!r}."
            )
        variance = data.get("variance")
        try:
            ocs = cls(
                loss=data["loss"],
                target=torch.tensor(data["target"], dtype=torch.float64),
                variance=None if variance is None else torch.tensor(variance, dtype=torch.float64),
                label_smoothing=float(data.get("label_smoothing", 0.0)),
                num_train=int(data.get("num_train", 0)),
                floor=float(data.get("floor", DEFAULT_FLOOR)),
                wrong_cost=float(data.get("wrong_cost", 0.0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise ValueError(f"The OCS dict is incomplete or corrupted: {err}.") from err
        _check_loaded(ocs)
        return ocs

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> OCS:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OCS):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        shown = ", ".join(f"{v:.4g}" for v in self.target[:6].tolist())
        more = ", ..." if self.target.numel() > 6 else ""
        return f"OCS(loss={self.loss!r}, target=[{shown}{more}], num_train={self.num_train})"


def reward_targets(labels: Any, num_classes: int, wrong_cost: float = 4.0) -> Tensor:
    """The reward vector a reward-prediction head regresses, one row per label.

    Args:
        labels: ``[N]`` integer labels in ``[0, num_classes)``.
        num_classes: K.
        wrong_cost: c; a wrong label action earns ``-c``, the right one ``+1``, abstain 0.

    Returns:
        ``[N, K + 1]`` float32 rewards; the last column (abstain) is 0.
    """
    y = _as_labels(labels, num_classes)
    rewards = torch.full((y.numel(), num_classes + 1), -float(wrong_cost))
    rewards[:, num_classes] = 0.0
    rewards[torch.arange(y.numel()), y] = 1.0
    return rewards


# ---------------------------------------------------------------------- validation helpers


#: How far a loaded cross-entropy OCS may sum from 1 (it is saved as float64).
_SUM_TOLERANCE = 1e-6


def _check_loaded(ocs: OCS) -> None:
    """Refuse an OCS read from a file whose values no constructor could have produced.

    A forged or corrupted file must fail at load time, not flag (or invalidate) every row.
    """

    def bad(what: str, got: str) -> ValueError:
        return ValueError(
            f"Expected the OCS's `{what}`, but got {got}: the file was edited or corrupted; "
            "rebuild the OCS (recalibrate)."
        )

    t = ocs.target
    if t.ndim != 1 or t.numel() == 0:
        raise bad("target to be a non-empty list of numbers", f"shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise bad("target to be finite", "NaN or inf values")
    if ocs.loss == "cross_entropy":
        total = float(t.sum())
        if bool((t <= 0).any()) or bool((t > 1).any()) or abs(total - 1) > _SUM_TOLERANCE:
            raise bad(
                "target to be class probabilities in (0, 1] summing to 1",
                f"values in [{float(t.min()):g}, {float(t.max()):g}] summing to {total:.9g}",
            )
    if ocs.loss == "binary_cross_entropy" and (bool((t < 0).any()) or bool((t > 1).any())):
        raise bad("target to be positive rates in [0, 1]", f"values in "
                  f"[{float(t.min()):g}, {float(t.max()):g}]")  # fmt: skip
    v = ocs.variance
    if (ocs.loss == "gaussian_nll") != (v is not None):
        raise bad("variance to be given for gaussian_nll only", f"variance={v!r}")
    if v is not None and (
        v.shape != t.shape or not bool(torch.isfinite(v).all()) or bool((v <= 0).any())
    ):
        raise bad(f"variance to be {t.numel()} finite positive numbers", f"{v.tolist()!r:.80}")
    if not (math.isfinite(ocs.label_smoothing) and 0 <= ocs.label_smoothing < 1):
        raise bad("label_smoothing to be in [0, 1)", repr(ocs.label_smoothing))
    if not (math.isfinite(ocs.floor) and 0 <= ocs.floor < 0.5):
        raise bad("floor to be in [0, 0.5)", repr(ocs.floor))
    if ocs.num_train < 0:
        raise bad("num_train to be >= 0", repr(ocs.num_train))
    if not (math.isfinite(ocs.wrong_cost) and ocs.wrong_cost >= 0):
        raise bad("wrong_cost to be a finite number >= 0", repr(ocs.wrong_cost))


def _check_fraction(name: str, value: float, *, upper_open: bool) -> float:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    ok = ok and (value < 1 if upper_open else value <= 1)
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"Expected `{name}` to be a number in {bound}, but got {value!r}.")
    return float(value)


def _as_labels(labels: Any, num_classes: int | None) -> Tensor:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"Expected `num_classes` to be a positive integer, but got {num_classes!r}."
        )
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.detach().cpu().reshape(-1)
    if y.numel() == 0:
        raise ValueError("Expected non-empty `labels`, but got an empty array.")
    if y.is_floating_point():
        if not torch.isfinite(y).all() or (y != y.round()).any():
            raise ValueError(
                "Expected integer class `labels`, but got non-integer or NaN values; "
                "pass class indices, not probabilities or one-hot rows."
            )
        y = y.to(torch.int64)
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"Expected integer class `labels`, but got dtype {y.dtype}.")
    y = y.to(torch.int64)
    low, high = int(y.min().item()), int(y.max().item())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Expected `labels` in [0, {num_classes}) for num_classes={num_classes}, "
            f"but got values in [{low}, {high}]."
        )
    return y


def _class_counts(labels: Any, num_classes: int | None, counts: Any) -> Tensor:
    if (labels is None) == (counts is None):
        raise ValueError(
            "Expected exactly one of `labels` or `counts`, but got "
            f"{'both' if labels is not None else 'neither'}."
        )
    if labels is not None:
        y = _as_labels(labels, num_classes)
        assert num_classes is not None  # checked by _as_labels
        return torch.bincount(y, minlength=num_classes).to(torch.float64)
    c = counts if isinstance(counts, Tensor) else torch.as_tensor(np.asarray(counts))
    c = c.detach().cpu().reshape(-1).to(torch.float64)
    if c.numel() == 0:
        raise ValueError("Expected non-empty `counts`, but got an empty array.")
    if not torch.isfinite(c).all() or (c < 0).any() or (c != c.round()).any():
        raise ValueError(
            "Expected `counts` to be non-negative integers, but got "
            f"{[float(v) for v in c[:10].tolist()]}{' ...' if c.numel() > 10 else ''}."
        )
    if num_classes is not None and c.numel() != num_classes:
        raise ValueError(f"Expected {num_classes} `counts` (num_classes), but got {c.numel()}.")
    if c.sum() <= 0:
        raise ValueError("Expected `counts` to sum to more than 0, but every count is 0.")
    return c


def _floor_probabilities(prob: Tensor, floor: float) -> Tensor:
    valid = isinstance(floor, numbers.Real) and not isinstance(floor, bool)
    if not (valid and 0 <= floor < 1.0 / prob.numel()):
        raise ValueError(
            f"Expected `floor` in [0, 1/K) = [0, {1.0 / prob.numel():g}), but got {floor!r}."
        )
    floored = prob.clamp_min(floor)
    return floored / floored.sum()


def _as_float_matrix(name: str, values: Any) -> Tensor:
    y = (
        values
        if isinstance(values, Tensor)
        else torch.as_tensor(np.asarray(values, dtype=np.float64))
    )
    y = y.detach().cpu().to(torch.float64)
    if y.ndim == 1:
        y = y.unsqueeze(1)
    if y.ndim != 2:
        raise ValueError(
            f"Expected `{name}` of shape [N] or [N, D], but got shape {tuple(y.shape)}."
        )
    if y.shape[0] == 0:
        raise ValueError(f"Expected non-empty `{name}`, but got an empty array.")
    if not torch.isfinite(y).all():
        raise ValueError(f"Expected finite `{name}`, but got NaN or inf values.")
    return y
