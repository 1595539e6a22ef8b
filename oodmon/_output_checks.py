"""What a Monitor can score: the checks on a batch's outputs, inputs and ids at its boundary.

A model's answer is counted whatever it is: outputs no score can read (bool or complex
dtype, sparse, nested or meta tensors, ragged lists) become invalid rows with a reason, not
monitoring errors; inputs or ids of the wrong length are dropped and the outputs scored all
the same; softmax outputs that look like another kind than the detector expects are warned
about. These checks never raise for what a model returns, so they are kept apart from the
Monitor's "score, count, dispatch" and shared by its two entry points.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from oodmon._batcher import row_count
from oodmon.detector import Detector
from oodmon.scores import KIND_DESCRIPTIONS, kind_mismatch

__all__ = [
    "KIND_MISMATCH",
    "as_outputs",
    "kind_mismatch_warning",
    "mismatched_extras",
    "plain_batch",
    "safe_row_count",
    "unscorable",
    "unscorable_warning",
    "wrong_width_warning",
]

#: ``stats().errors`` key (and ``kind`` label of ``oodmon_monitor_errors_total``) counting
#: batches whose outputs look like another kind than the detector expects.
KIND_MISMATCH = "OutputKindMismatch"


def as_outputs(outputs: Any) -> Tensor:
    """Outputs as a ``[N, K]`` tensor (a 1-D output is one row); no copy when possible."""
    if isinstance(outputs, Tensor):
        x = outputs.detach() if outputs.requires_grad else outputs  # detach() costs a call
    elif isinstance(outputs, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(outputs))
    else:
        x = torch.as_tensor(np.asarray(outputs))
    return x.unsqueeze(0) if x.ndim == 1 else x


#: Tensor dtypes a score can read (bool and complex are refused below).
_PLAIN_DTYPES = frozenset(
    (torch.float32, torch.float16, torch.bfloat16, torch.float64,
     torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
)  # fmt: skip


def _dense_plain(x: Tensor) -> bool:
    """A dense tensor of a dtype a score can read: the common case, in four attribute reads."""
    return (
        x.dtype in _PLAIN_DTYPES and x.layout is torch.strided and not x.is_nested and not x.is_meta
    )


def unscorable(outputs: Any) -> tuple[str | None, str]:
    """``(invalid reason, what the outputs are)`` for outputs no score can read, else None."""
    try:
        if isinstance(outputs, Tensor):
            if _dense_plain(outputs):
                return None, ""
            if outputs.is_nested:
                return "wrong_layout", "as a nested tensor"
            if outputs.layout != torch.strided:
                return "wrong_layout", f"with layout {outputs.layout}"
            if outputs.device.type == "meta":
                return "wrong_layout", "on the meta device (no data)"
            if outputs.dtype == torch.bool or outputs.is_complex():
                return "wrong_dtype", f"of dtype {outputs.dtype}"
        elif isinstance(outputs, np.ndarray):
            if outputs.dtype.kind not in "fiu":
                return "wrong_dtype", f"of NumPy dtype {outputs.dtype}"
        elif isinstance(outputs, (list, tuple)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                array = np.asarray(outputs)
            if array.dtype.kind not in "fiu":
                return "wrong_dtype", f"holding {array.dtype} values"
    except ValueError:  # a ragged nested list
        return "wrong_layout", "as a ragged nested list"
    except Exception:  # anything else is reported by the usual error path
        pass
    return None, ""


def plain_batch(outputs: Any, inputs: Any, ids: Sequence[str] | None) -> tuple[int, int] | None:
    """``(rows, bytes to copy)`` of the common batch, else None.

    The common batch needs no conversion and no check beyond these attribute reads: a 2-D
    dense tensor of a plain dtype that autograd does not track, no ids, and no inputs or a
    tensor of as many rows. :meth:`Monitor.submit <oodmon.monitor.Monitor.submit>` takes it
    without the general path's conversions and checks. On a calling thread whose caches the
    model's forward has just flushed, each attribute read costs 1-5 us, so each one is read
    once (``benchmarks/overhead.py``).
    """
    if (
        ids is not None
        or not isinstance(outputs, Tensor)
        or outputs.requires_grad
        or not _dense_plain(outputs)
    ):
        return None
    shape = outputs.shape
    if len(shape) != 2:
        return None
    rows = shape[0]
    if inputs is None:
        return rows, outputs.nbytes
    if isinstance(inputs, Tensor):
        input_shape = inputs.shape
        if input_shape and input_shape[0] == rows:
            return rows, outputs.nbytes + inputs.nbytes
    return None


def unscorable_warning(name: str, reason: str, detail: str) -> str:
    """The warning for outputs :func:`unscorable` refused (``detail``: what they are)."""
    return (
        f"oodmon monitor {name!r}: model outputs {detail} cannot be scored; rows "
        f"counted as invalid ({reason}). Pass dense floating outputs (logits)."
    )


def safe_row_count(outputs: Any) -> int:
    """Rows in outputs that may not be a tensor at all (1 when it cannot be told)."""
    try:
        if isinstance(outputs, Tensor) and outputs.is_nested:
            return int(outputs.size(0))
        shape = getattr(outputs, "shape", None)
        if shape is not None:
            return int(shape[0]) if len(shape) >= 2 else 1
        if isinstance(outputs, (list, tuple)) and outputs:
            nested = isinstance(outputs[0], (list, tuple, Tensor, np.ndarray))
            return len(outputs) if nested else 1
        return 1
    except Exception:
        return 1


def mismatched_extras(
    rows: int, inputs: Any, ids: Sequence[str] | None
) -> tuple[Any, Sequence[str] | None, list[tuple[str, ValueError]]]:
    """Inputs and ids, None for either whose length does not match the ``rows`` outputs.

    Returns:
        ``(inputs, ids, problems)``: ``problems`` holds ``(stage, error)`` for each one
        dropped, for the Monitor to count as monitoring errors.
    """
    problems: list[tuple[str, ValueError]] = []
    if ids is not None and len(ids) != rows:
        message = f"Expected {rows} `ids` (one per output row), but got {len(ids)}"
        problems.append(("ids", ValueError(f"{message}; ids dropped for this batch.")))
        ids = None
    if inputs is not None:
        count = row_count(inputs) if isinstance(inputs, (Tensor, np.ndarray)) else None
        if count is None and hasattr(inputs, "__len__"):
            count = len(inputs)
        if count != rows:
            message = f"Expected {rows} `inputs` (one per output row), but got {count}"
            problems.append(("inputs", ValueError(f"{message}; inputs dropped for this batch.")))
            inputs = None
    return inputs, ids, problems


def kind_mismatch_warning(x: Tensor, detector: Detector, name: str) -> str | None:
    """The warning when softmax outputs look like another kind than ``detector`` expects.

    Probabilities scored as logits sit close to the OCS and every row is flagged; only a
    few rows are read. None when they look right, for a non-softmax detector, and when
    the check itself fails (a check must never cost the batch).
    """
    if detector.ocs.loss != "cross_entropy":
        return None
    try:
        looks = kind_mismatch(x, detector.kind)
    except Exception:
        return None
    if looks is None:
        return None
    return (
        f"oodmon monitor {name!r}: the outputs look like {KIND_DESCRIPTIONS[looks]}, "
        f"but the detector expects kind={detector.kind!r}, so its verdicts are "
        f"meaningless (most rows get flagged). Build the Detector with kind={looks!r} "
        f"(`oodmon calibrate --kind {looks}`), or pass what it expects. Counted in "
        f"stats().errors[{KIND_MISMATCH!r}]."
    )


def wrong_width_warning(name: str, x: Tensor, expected: int) -> str:
    """The warning for output rows of another width than the detector's ``expected``."""
    return (
        f"oodmon monitor {name!r}: model output rows have {x.shape[1]} values but "
        f"the detector expects {expected} (a 1-D output is one row; "
        "pass [N, K] for a batch); rows counted as invalid."
    )
