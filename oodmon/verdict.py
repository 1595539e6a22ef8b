"""The per-sample answer of a Detector, and its host-side copy that sinks consume.

A :class:`Verdict` holds tensors on the model's device, so that producing it never waits
for the device. An :class:`Observation` is the same information after the one batched
device-to-host copy, plus what the Monitor knows about the batch (model, version, inputs,
ids, timing). Sinks (metrics, label queue, callbacks) only ever see Observations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["INVALID_REASONS", "HostVerdict", "Observation", "Verdict"]

#: Reasons a row can be invalid. The set is closed so that metric labels stay bounded.
#: ``wrong_dtype``: bool, complex or non-numeric outputs; ``wrong_layout``: outputs with no
#: dense data to read (sparse, nested, or on the meta device) or a ragged nested list.
INVALID_REASONS = ("nonfinite", "wrong_width", "wrong_shape", "wrong_dtype", "wrong_layout")


@dataclass(frozen=True)
class Verdict:
    """Per-sample OOD evidence for a batch of N model outputs.

    Attributes:
        score: ``[N]`` float, the detector's OOD score; higher = more OOD. NaN when invalid.
        distance: ``[N]`` float, distance to the optimal constant solution (nats for
            cross-entropy). NaN when invalid. Small distance = close to the OCS = more OOD.
        p_value: ``[N]`` float in ``(0, 1]``, conformal p-value of the score against the
            in-distribution calibration set. NaN when invalid.
        flag: ``[N]`` bool, ``p_value <= alpha``. Invalid rows are never flagged as OOD here;
            they are reported through ``invalid`` instead.
        invalid: ``[N]`` bool, the row could not be scored (NaN/inf outputs).
        predicted: ``[N]`` int64, the model's predicted class (argmax), or -1 where a loss has
            no notion of class (regression heads).
        calibration_rank: ``[N]`` int64, how many calibration scores lie below the row's
            score, so that ``p_value == (n + 1 - rank) / (n + 1)`` exactly; -1 when invalid.
            Sinks count p-value histograms from it without sorting floats. None when the
            verdict was built without it.
    """

    score: Tensor
    distance: Tensor
    p_value: Tensor
    flag: Tensor
    invalid: Tensor
    predicted: Tensor
    calibration_rank: Tensor | None = None

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def to_host(self) -> HostVerdict:
        """Copy to host numpy arrays with at most one batched device-to-host transfer.

        CPU tensors are viewed without copying; device tensors are packed into one float64
        block and copied once (float64 holds int64 class indices and ranks exactly below 2**53).
        """
        fields = [self.score, self.distance, self.p_value, self.flag, self.invalid, self.predicted]
        if self.calibration_rank is not None:
            fields.append(self.calibration_rank)
        if self.score.device.type == "cpu":
            score, distance, p_value, flag, invalid, predicted, *rank = (t.numpy() for t in fields)
            return HostVerdict(
                score=score.astype(np.float64, copy=False),
                distance=distance.astype(np.float64, copy=False),
                p_value=p_value,
                flag=flag,
                invalid=invalid,
                predicted=predicted,
                calibration_rank=rank[0] if rank else None,
            )
        host = torch.stack([t.to(torch.float64) for t in fields]).cpu().numpy()
        return HostVerdict(
            score=host[0],
            distance=host[1],
            p_value=host[2],
            flag=host[3].astype(bool),
            invalid=host[4].astype(bool),
            predicted=host[5].astype(np.int64),
            calibration_rank=host[6].astype(np.int64) if len(fields) > 6 else None,
        )


@dataclass(frozen=True)
class HostVerdict:
    """A :class:`Verdict` as numpy arrays on the host (same fields, same meaning)."""

    score: np.ndarray
    distance: np.ndarray
    p_value: np.ndarray
    flag: np.ndarray
    invalid: np.ndarray
    predicted: np.ndarray
    calibration_rank: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def take(self, index: np.ndarray) -> HostVerdict:
        """Rows at ``index`` (an integer array or boolean mask)."""
        rank = self.calibration_rank
        return HostVerdict(
            score=self.score[index],
            distance=self.distance[index],
            p_value=self.p_value[index],
            flag=self.flag[index],
            invalid=self.invalid[index],
            predicted=self.predicted[index],
            calibration_rank=None if rank is None else rank[index],
        )

    @classmethod
    def all_invalid(cls, n: int) -> HostVerdict:
        """A verdict for ``n`` rows that could not be scored at all (e.g. wrong width)."""
        nan = np.full(n, np.nan)
        none = np.full(n, -1, dtype=np.int64)
        return cls(
            score=nan,
            distance=nan.copy(),
            p_value=nan.copy(),
            flag=np.zeros(n, dtype=bool),
            invalid=np.ones(n, dtype=bool),
            predicted=none,
            calibration_rank=none.copy(),
        )


@dataclass(frozen=True)
class Observation:
    """One observed batch as the sinks see it: host arrays plus batch context.

    Attributes:
        model: model name (bounded: it becomes a metric label).
        version: model version (bounded: it becomes a metric label).
        verdict: the per-row evidence on the host.
        invalid_reasons: count of invalid rows per reason, keys from ``INVALID_REASONS``.
        scoring_seconds: wall time the Monitor spent scoring this batch.
        inputs: the caller's inputs for these rows (tensor, array or list), or None.
        ids: the caller's ids for these rows, or None.
        timestamp: Unix time at which the batch was observed.
    """

    model: str
    version: str
    verdict: HostVerdict
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    scoring_seconds: float = 0.0
    inputs: Any = None
    ids: Sequence[str] | None = None
    timestamp: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return len(self.verdict)

    def take(self, index: np.ndarray) -> Observation:
        """The rows at ``index`` (integer array), inputs and ids included."""
        inputs = self.inputs
        if inputs is not None:
            if isinstance(inputs, Tensor):
                inputs = inputs[torch.as_tensor(index, device=inputs.device, dtype=torch.long)]
            elif isinstance(inputs, np.ndarray):
                inputs = inputs[index]
            else:
                inputs = [inputs[int(i)] for i in index]
        ids = None if self.ids is None else [self.ids[int(i)] for i in index]
        reasons: dict[str, int] = {}
        return Observation(
            model=self.model,
            version=self.version,
            verdict=self.verdict.take(index),
            invalid_reasons=reasons,
            scoring_seconds=self.scoring_seconds,
            inputs=inputs,
            ids=ids,
            timestamp=self.timestamp,
        )
