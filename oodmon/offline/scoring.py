"""Score one :class:`~oodmon.offline.rows.RowBatch`: the function every engine calls.

The single-process path and each Ray worker run exactly this on their batches, so the two
give the same verdicts. Scoring is row-wise (a row's verdict depends on that row and the
calibration only), which is what makes batching, and sharding across workers, invisible.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from oodmon.detector import Detector
from oodmon.offline.rows import INVALID_REASONS, RowBatch, reason_code
from oodmon.verdict import HostVerdict

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["VERDICT_COLUMNS", "ScoredBatch", "empty_batch", "score_batch"]

#: The verdict columns every output carries, after ``index`` and the ``--keep`` columns.
VERDICT_COLUMNS = ("score", "distance", "p_value", "flag", "invalid", "invalid_reason", "predicted")

_NONFINITE = reason_code("nonfinite")


@dataclass(frozen=True)
class ScoredBatch:
    """A batch with its verdict.

    ``reasons`` are uint8 codes (0 = valid), see
    :data:`~oodmon.offline.rows.INVALID_REASONS`; ``keep`` the passthrough columns.
    """

    verdict: HostVerdict
    reasons: np.ndarray
    keep: dict[str, Any]

    def __len__(self) -> int:
        return len(self.verdict)

    def reason_counts(self) -> dict[str, int]:
        """Invalid rows per reader reason, for the reasons that occur."""
        counts = np.bincount(self.reasons, minlength=len(INVALID_REASONS) + 1)
        return {name: int(counts[i + 1]) for i, name in enumerate(INVALID_REASONS) if counts[i + 1]}

    def to_arrow(self, first_index: int | None = None) -> pa.Table:
        """The batch as an Arrow table.

        Columns: ``index`` (when ``first_index`` is given), the kept columns, then
        :data:`VERDICT_COLUMNS`; NaN scores of invalid rows become nulls.
        """
        import pyarrow as pa

        v = self.verdict
        columns: dict[str, Any] = {}
        if first_index is not None:
            columns["index"] = pa.array(np.arange(first_index, first_index + len(self)))
        for name, values in self.keep.items():
            columns[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else (
                pa.array(values, type=pa.string()))  # fmt: skip
        for name, values in (("score", v.score), ("distance", v.distance), ("p_value", v.p_value)):
            columns[name] = pa.array(values, mask=np.isnan(values))
        columns["flag"] = pa.array(v.flag)
        columns["invalid"] = pa.array(v.invalid)
        columns["invalid_reason"] = pa.DictionaryArray.from_arrays(
            pa.array(self.reasons.astype(np.int8) - 1, mask=self.reasons == 0),
            pa.array(INVALID_REASONS, type=pa.string()),
        )
        columns["predicted"] = pa.array(v.predicted)
        return pa.table(columns)


def score_batch(detector: Detector, rows: RowBatch, p_cutoff: float | None = None) -> ScoredBatch:
    """Score a batch.

    Args:
        detector: a fitted Detector.
        rows: the batch; rows the reader could not read are NaN and stay invalid.
        p_cutoff: flag ``p_value <= p_cutoff`` instead of ``<= alpha`` (the
            Benjamini-Hochberg cut of :mod:`oodmon.offline.fdr`).

    Returns:
        The verdict, with every invalid row given a reason (``nonfinite`` unless the reader
        had one).
    """
    if len(rows) == 0:
        verdict = HostVerdict.all_invalid(0)
    else:
        with torch.inference_mode(), warnings.catch_warnings():
            # zero-copy Arrow buffers are read-only; predict never writes to its input
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            verdict = detector.predict(torch.from_numpy(rows.outputs)).to_host()
    reasons = rows.reasons
    # a row the reader could not read is NaN and so scores invalid; the OR makes that a rule
    invalid = verdict.invalid | (reasons != 0)
    if invalid.any():
        reasons = np.where(invalid & (reasons == 0), _NONFINITE, reasons).astype(np.uint8)
    flag = verdict.flag if p_cutoff is None else verdict.p_value <= p_cutoff
    verdict = HostVerdict(
        score=verdict.score,
        distance=verdict.distance,
        p_value=verdict.p_value,
        flag=flag & ~invalid,
        invalid=invalid,
        predicted=verdict.predicted,
        calibration_rank=verdict.calibration_rank,
    )
    return ScoredBatch(verdict, reasons, rows.keep)


def empty_batch(keep: tuple[str, ...] = ()) -> ScoredBatch:
    """A batch of no rows (it gives an empty output its header or schema)."""
    return ScoredBatch(HostVerdict.all_invalid(0), np.zeros(0, np.uint8), {k: [] for k in keep})
