"""Native row kernels for the logit scores on the CPU (``_native_scores.c``).

At B=256, K=10 a ``log_softmax`` takes 11-17 us on the CPU, nearly all of it the fixed cost
of one PyTorch call, and an eager score makes two to five such calls. The C kernels make each
score one call and one sweep over the batch, with no ``[N, K]`` temporary: at B=1024,
K=1000 a single-threaded sweep is 1.5-3x faster than the eager passes on two threads
(``benchmarks/scores.py``).

They serve float32 logits on the CPU: small batches always, larger ones while PyTorch runs on
at most two threads (``scores._native_score``). The package builds them when a C compiler is
there. Without them, with ``OODMON_NATIVE_SCORES=0`` or after
``oodmon.scores.use_native(False)``, the scores run eager, with the same results to
float32 rounding (``tests/test_native.py``). If a kernel ever fails, that is logged once and
the scores stay eager for the rest of the process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

try:
    from oodmon import _native_scores as _kernels
except ImportError:  # built without a C compiler: the eager path serves every batch
    _kernels = None  # type: ignore[assignment]

__all__ = ["native", "native_active", "native_available", "use_native"]

_log = logging.getLogger("oodmon")
_enabled = os.environ.get("OODMON_NATIVE_SCORES", "1").strip() != "0"
#: Whether the kernels serve now: built, enabled, not failed. One read per batch.
_active = _kernels is not None and _enabled


def native_available() -> bool:
    """Whether the package was built with the native kernels."""
    return _kernels is not None


def use_native(enabled: bool = True) -> None:
    """Turn the native kernels on or off for this process (on by default when built).

    Turning them on also clears an earlier failure.
    """
    global _enabled, _active
    _enabled = bool(enabled)
    _active = _kernels is not None and _enabled


def native_active() -> bool:
    """Whether CPU batches of float32 logits go through the native kernels now."""
    return _active


def native(name: str, x: Tensor, *constants: Any) -> Tensor | None:
    """The kernel ``name`` on the ``[N, K]`` logits ``x``, or None where it does not serve.

    None: kernels off or absent, not float32, not on the CPU, or a batch the kernel leaves
    to the eager path (no rows, no columns). ``constants`` are float32 NumPy arrays or floats
    (``OCS.host_constant``).
    """
    global _active
    if not _active or x.dtype is not torch.float32 or not x.is_cpu:
        return None
    try:
        array = x.numpy()
    except Exception:  # a tensor NumPy cannot view (sparse, say): the eager path's to judge
        return None
    try:
        rows = getattr(_kernels, name)(array, *constants)
    except Exception as err:  # a kernel or binding failure: eager from now on
        _active = False
        _log.warning(
            "oodmon: native score kernels failed (%s: %s); scores stay eager in this process.",
            type(err).__name__,
            err,
        )
        return None
    return None if rows is None else torch.frombuffer(rows, dtype=torch.float32)
