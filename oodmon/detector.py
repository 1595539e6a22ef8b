"""Detector: an OOD score calibrated on in-distribution data into per-sample decisions.

``Detector(ocs).fit(id_outputs)`` scores held-out in-distribution outputs and keeps them;
``predict(outputs)`` turns new outputs into a :class:`~oodmon.verdict.Verdict` with conformal
p-values and flags at the chosen false-alarm rate. A fitted detector saves to plain JSON (no
pickle) with a format version, and loads on any device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oodmon import conformal
from oodmon._atomic import atomic_write
from oodmon.errors import FormatVersionError, NotFittedError, OutputShapeError
from oodmon.ocs import OCS
from oodmon.scores import (
    INPUT_KINDS,
    InputKind,
    ScoreSpec,
    as_batch,
    batch_distance,
    check_score,
    default_score,
)
from oodmon.verdict import Verdict

logger = logging.getLogger("oodmon")

#: KL(label marginal || uniform), in nats, above which the default forward KL is a poor score.
#: On 20:1 long-tailed MNIST labels (0.36 nats) it ranked rotated digits at AUROC 0.60-0.65
#: against 0.86-0.88 for ``ocs_kl_reverse`` (experiments/long_tailed_ocs.py); a 4-5:1
#: head-to-tail profile is about 0.1 nats.
SKEWED_MARGINAL_NATS = 0.1

__all__ = [
    "DETECTOR_FORMAT_VERSION",
    "MAX_DETECTOR_BYTES",
    "SKEWED_MARGINAL_NATS",
    "Detector",
    "marginal_skew",
]

#: Version of the JSON layout written by :meth:`Detector.save`.
DETECTOR_FORMAT_VERSION = 1

#: Largest detector file :meth:`Detector.load` reads (a 1M-sample calibration is ~25 MiB).
MAX_DETECTOR_BYTES = 64 * 2**20


class Detector:
    """Flags outputs whose score is unusually OOD compared with in-distribution data.

    Args:
        ocs: the optimal constant solution of the model's training loss.
        score: a name from :data:`oodmon.scores.SCORES`; by default ``"ocs_kl"`` for
            classifiers and ``"ocs_distance"`` for other heads. With imbalanced training labels
            pass ``"ocs_kl_reverse"`` (the default logs this advice; see
            :data:`SKEWED_MARGINAL_NATS`).
        alpha: target false-alarm rate on in-distribution traffic, in (0, 1).
        kind: what the model outputs: ``"logits"`` (raw outputs), ``"probs"`` or ``"log_probs"``.
        temperature: temperature for the energy score.

    Fitted attributes (set by :meth:`fit`):
        calibration_scores_: ``[n]`` float64 calibration scores, sorted ascending.
        n_calibration_: n, after dropping invalid rows.
        n_dropped_: calibration rows dropped because they were NaN/inf.
        threshold_: flag iff ``score > threshold_`` (equivalently ``p_value <= alpha``).
        calibration_hash_: short hash of the calibration scores, to tie metrics and label-queue
            items to the exact calibration they were judged by.
    """

    ocs: OCS
    score: str
    alpha: float
    kind: InputKind
    temperature: float
    calibration_scores_: Tensor
    n_calibration_: int
    n_dropped_: int
    threshold_: float
    calibration_hash_: str
    _spec: ScoreSpec

    def __init__(
        self,
        ocs: OCS,
        score: str | None = None,
        alpha: float = 0.05,
        kind: InputKind = "logits",
        temperature: float = 1.0,
    ) -> None:
        if not isinstance(ocs, OCS):
            raise ValueError(f"Expected `ocs` to be an oodmon.OCS, but got {type(ocs).__name__}.")
        if kind not in INPUT_KINDS:
            raise ValueError(f"Expected `kind` to be one of {INPUT_KINDS}, but got {kind!r}.")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not 0 < temperature < float("inf")
        ):
            raise ValueError(f"Expected `temperature` > 0, but got {temperature!r}.")
        self.ocs = ocs
        self.score = score if score is not None else default_score(ocs)
        if score is None:
            _advise_on_skewed_marginal(ocs, self.score)
        self.alpha = conformal.check_alpha(alpha)
        self.kind: InputKind = kind
        self.temperature = float(temperature)
        self._spec = check_score(self.score, ocs, kind)
        self._device_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ fitting

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) has run."""
        return "calibration_scores_" in self.__dict__

    @property
    def num_outputs(self) -> int:
        """Output width the detector expects."""
        return self.ocs.num_outputs

    def fit(self, id_outputs: Any) -> Detector:
        """Calibrate on held-out in-distribution outputs (not the training set).

        Args:
            id_outputs: ``[n, num_outputs]`` outputs of the model on in-distribution data
                it was not trained on (tensor or array).

        Returns:
            self.

        Raises:
            ValueError: wrong width, no valid rows, or too few rows for ``alpha``.
        """
        try:
            x = as_batch(id_outputs, self.num_outputs)
        except OutputShapeError as err:
            if err.reason != "wrong_width" or not _is_matrix(id_outputs):
                raise
            raise OutputShapeError(
                f"The calibration outputs have {_width(id_outputs)} columns but the OCS has "
                f"{self.num_outputs} outputs ({self.ocs.loss}): build the OCS with the model's "
                "own number of outputs (its class count: `num_classes`, `counts`, or "
                "`oodmon calibrate --num-classes`/`--counts`).",
                err.reason,
            ) from None
        if x.shape[0] == 0:
            raise ValueError("Expected in-distribution outputs to calibrate on, but got 0 rows.")
        scores = conformal.finite_scores(self._score(x).detach().to("cpu", torch.float64))
        valid = ~torch.isnan(scores)
        n_valid = int(valid.sum().item())
        if n_valid == 0:
            if bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"Every calibration row scored NaN although the outputs are finite: do they "
                    f"match kind={self.kind!r}? Probabilities must lie in [0, 1] and "
                    "log-probabilities be <= 0; raw model outputs are kind='logits'."
                )
            raise ValueError(
                "Expected finite in-distribution outputs to calibrate on, "
                "but every row was NaN/inf."
            )
        conformal.check_alpha(self.alpha, n_valid)
        self._set_calibration(torch.sort(scores[valid]).values, dropped=int((~valid).sum().item()))
        return self

    def _set_calibration(self, sorted_scores: Tensor, dropped: int) -> None:
        self.calibration_scores_ = sorted_scores
        self.n_calibration_ = int(sorted_scores.numel())
        self.n_dropped_ = dropped
        self.threshold_ = conformal.score_threshold(sorted_scores, self.alpha)
        digest = hashlib.sha256(sorted_scores.numpy().astype("<f8").tobytes())
        digest.update(json.dumps(self._config(), sort_keys=True).encode())
        self.calibration_hash_ = digest.hexdigest()[:16]
        self._device_cache = {}

    def with_alpha(self, alpha: float) -> Detector:
        """The same calibration at another false-alarm rate (no refit needed)."""
        self._require_fitted("with_alpha")
        other = Detector(self.ocs, self.score, alpha, self.kind, self.temperature)
        conformal.check_alpha(alpha, self.n_calibration_)
        other._set_calibration(self.calibration_scores_, self.n_dropped_)
        return other

    # ------------------------------------------------------------------ prediction

    def score_outputs(self, outputs: Any) -> Tensor:
        """``[N]`` scores (higher = more OOD), on the outputs' device; NaN for invalid rows."""
        return self._score(self._check_outputs(outputs))

    def p_values(self, scores: Tensor) -> Tensor:
        """Conformal p-values ``[N]`` (float64) for scores from :meth:`score_outputs`."""
        self._require_fitted("p_values")
        return conformal.p_values(scores, self._calibration_on(scores.device))

    def predict(self, outputs: Any) -> Verdict:
        """Score, p-value and flag every row of a batch of outputs.

        Args:
            outputs: ``[N, num_outputs]`` (or ``[num_outputs]``) tensor or array.

        Returns:
            A Verdict whose tensors live on the outputs' device.

        Raises:
            NotFittedError: before :meth:`fit`.
            ValueError: the output width does not match the detector.
        """
        self._require_fitted("predict")
        x = self._check_outputs(outputs)
        with _full_precision(x):
            score = self._spec.compute(x, self.ocs, self.kind, self.temperature)
            # the OCS scores are negated distances already: don't compute them twice
            negated = self._spec.negated_distance
            dist = -score if negated else batch_distance(x, self.ocs, self.kind)
        p, rank = conformal.ranked_p_values(score, self._calibration_on(score.device))
        invalid = torch.isnan(score)
        flag = p <= self.alpha  # an invalid row's p-value is NaN, and NaN <= alpha is False
        return Verdict(
            score=score,
            distance=dist,
            p_value=p,
            flag=flag,
            invalid=invalid,
            predicted=self._predicted(x, invalid),
            calibration_rank=rank.masked_fill_(invalid, -1),
        )

    def _predicted(self, x: Tensor, invalid: Tensor) -> Tensor:
        """The argmax class, or -1 where there is none.

        None for regression heads and invalid rows: an argmax over NaN is meaningless and
        must not pass for a prediction.
        """
        if self.ocs.loss in ("cross_entropy", "reward_prediction"):
            return x.argmax(dim=-1).masked_fill(invalid, -1)
        return torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)

    def _score(self, x: Tensor) -> Tensor:
        with _full_precision(x):
            return self._spec.compute(x, self.ocs, self.kind, self.temperature)

    def _check_outputs(self, outputs: Any) -> Tensor:
        """The batch's one shape and dtype check (the score kernels check nothing)."""
        try:
            return as_batch(outputs, self.num_outputs)
        except OutputShapeError as err:
            if err.reason != "wrong_width" or not _is_matrix(outputs):
                raise
            raise OutputShapeError(
                f"{err} Is this the model the detector was calibrated for?", err.reason
            ) from None

    def _calibration_on(self, device: torch.device) -> Tensor:
        key = (device, torch.float64)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self.calibration_scores_.to(device)
            self._device_cache[key] = cached
        return cached

    def _require_fitted(self, method: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This Detector is not fitted yet: call `fit(id_outputs)` with held-out "
                f"in-distribution outputs (or `Detector.load(path)`) before `{method}`."
            )

    # ------------------------------------------------------------------ persistence

    def _config(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "alpha": self.alpha,
            "kind": self.kind,
            "temperature": self.temperature,
            "ocs": self.ocs.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with a format version. Requires a fitted detector."""
        self._require_fitted("to_dict")
        return {
            "format": "oodmon.detector",
            "format_version": DETECTOR_FORMAT_VERSION,
            **self._config(),
            "calibration": {
                "n": self.n_calibration_,
                "dropped": self.n_dropped_,
                "hash": self.calibration_hash_,
                "threshold": self.threshold_,
                "scores": self.calibration_scores_.tolist(),
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Detector:
        """Inverse of :meth:`to_dict`.

        Raises:
            FormatVersionError: written by another format version.
            ValueError: not a detector dict, or a corrupted one.
        """
        if not isinstance(data, dict) or data.get("format") != "oodmon.detector":
            raise ValueError(
                "Expected a detector written by `Detector.save` (format 'oodmon.detector')."
            )
        version = data.get("format_version")
        if version != DETECTOR_FORMAT_VERSION:
            raise FormatVersionError(
                f"Expected detector format version {DETECTOR_FORMAT_VERSION}, but the file has "
                f"{version!r}; recalibrate with `oodmon calibrate` using this oodmon version."
            )
        try:
            detector = cls(
                OCS.from_dict(data["ocs"]),
                score=data["score"],
                alpha=data["alpha"],
                kind=data["kind"],
                temperature=data.get("temperature", 1.0),
            )
            cal = data["calibration"]
            scores = torch.tensor(cal["scores"], dtype=torch.float64)
            expected_n = _whole_number(cal["n"], "calibration.n")
            dropped = _whole_number(cal.get("dropped", 0), "calibration.dropped")
        except FormatVersionError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise ValueError(f"The detector dict is incomplete or corrupted: {err}") from err
        if scores.ndim != 1 or scores.numel() != expected_n:
            raise ValueError(
                f"Expected {expected_n} calibration scores (calibration.n), but the file holds "
                f"{scores.numel()}: it was edited or corrupted; recalibrate."
            )
        if expected_n == 0 or not bool(torch.isfinite(scores).all()):
            raise ValueError(
                "Expected finite calibration scores, but the file holds none or NaN/inf "
                "values: it was edited or corrupted; recalibrate."
            )
        if not bool((scores[1:] >= scores[:-1]).all()):
            raise ValueError(
                "Expected the calibration scores sorted ascending, but they are not: the file "
                "was edited or corrupted; recalibrate."
            )
        conformal.check_alpha(detector.alpha, expected_n)
        detector._set_calibration(scores, dropped=dropped)
        if detector.calibration_hash_ != cal.get("hash"):
            raise ValueError(
                "The detector's calibration hash does not match its scores: the file was edited "
                "or corrupted; recalibrate."
            )
        return detector

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically (a crash never leaves a half-written detector)."""
        target = Path(path)
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        with atomic_write(target) as stream:
            stream.write(text)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Detector:
        """Read a detector saved with :meth:`save`; tensors land on the CPU and move lazily.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not valid JSON or not a detector (FormatVersionError for old formats).
        """
        file = Path(path)
        size = file.stat().st_size
        if size > MAX_DETECTOR_BYTES:
            raise ValueError(
                f"Expected a detector file of at most {MAX_DETECTOR_BYTES / 2**20:g} MiB, but "
                f"{path} is {size / 2**20:.1f} MiB: it is not a detector written by "
                "`Detector.save` (those hold one number per calibration sample)."
            )
        text = file.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        except RecursionError as err:
            raise ValueError(f"{path} is not a detector: its JSON is nested too deeply.") from err
        except ValueError as err:  # e.g. an integer with too many digits
            raise ValueError(f"{path} is not a detector: {err}") from err
        try:
            return cls.from_dict(data)
        except RecursionError as err:
            raise ValueError(f"{path} is not a detector: its JSON is nested too deeply.") from err

    def __repr__(self) -> str:
        fitted = f", n_calibration={self.n_calibration_}" if self.is_fitted else ", not fitted"
        return (
            f"Detector(loss={self.ocs.loss!r}, score={self.score!r}, alpha={self.alpha:g}, "
            f"kind={self.kind!r}{fitted})"
        )


def _is_matrix(outputs: Any) -> bool:
    """Whether outputs are 2-D (their width, not their shape, is what is wrong)."""
    return len(getattr(outputs, "shape", ())) == 2


def _width(outputs: Any) -> int:
    return int(outputs.shape[1])


def _whole_number(value: Any, name: str) -> int:
    """A non-negative integer field of a saved detector."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{name}` to be an integer >= 0, but got {value!r:.40}.")
    return value


def _full_precision(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """Score outside any autocast region of the caller.

    Calibration ran in full precision, and matrix products in bfloat16 would shift scores by
    hundredths of a nat.
    """
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return contextlib.nullcontext()
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def marginal_skew(ocs: OCS) -> float:
    """KL(OCS || uniform) in nats for a cross-entropy OCS (0 for balanced labels), else 0."""
    if ocs.loss != "cross_entropy":
        return 0.0
    target = ocs.target.double()
    k = target.numel()
    positive = target[target > 0]
    return float((positive * (positive * k).log()).sum())


def _advise_on_skewed_marginal(ocs: OCS, score: str) -> None:
    """Log once per Detector built with the default score on long-tailed labels (see above)."""
    skew = marginal_skew(ocs)
    if score == "ocs_kl" and math.isfinite(skew) and skew > SKEWED_MARGINAL_NATS:
        logger.warning(
            "oodmon: the training labels are imbalanced (KL to uniform %.2f nats); the default "
            "score ocs_kl then ranks shifted inputs poorly (confident head-class outputs sit "
            "close to the label marginal). Pass score='ocs_kl_reverse' (oodmon calibrate "
            "--score ocs_kl_reverse), which ranked best on long-tailed MNIST.",
            skew,
        )
