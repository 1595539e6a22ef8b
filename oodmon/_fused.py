"""Optional fused kernels for the logit scores, compiled with ``torch.compile``.

In eager PyTorch a KL or an entropy over ``[N, K]`` logits takes several passes over memory
(row maximum, exponentiation, products, sums). Inductor fuses them into one kernel: about
one ``log_softmax`` pass at 1024 x 1000 on the CPU, where the eager path takes two to three
(``benchmarks/scores.py --compiled``). Small batches gain nothing (a compiled call's fixed
cost is larger than the whole eager score), so callers use these only from
``scores._SINGLE_PASS_MIN_ELEMENTS`` elements up.

Off by default: :func:`use_compiled` or ``OODMON_COMPILED_SCORES=1`` turns them on. The
first large batch of each score then compiles (seconds, once per process; inductor keeps the
generated code in its on-disk cache for the next process), and ``dynamic=True`` lets one
compilation serve every batch size. If compiling or running ever fails (no C++ compiler, an
unsupported device), the scores log it once and stay eager for the rest of the process: the
result is the same to float32 rounding either way. Importing this module does not import
``torch._dynamo``; the first compiled call does.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["compiled_active", "fused", "use_compiled"]

_log = logging.getLogger("oodmon")
_lock = threading.Lock()
_state: dict[str, Any] = {
    "enabled": os.environ.get("OODMON_COMPILED_SCORES", "").strip() not in ("", "0"),
    "failed": None,  # the error that turned compiled kernels off for this process
}
_compiled: dict[str, Callable[..., Tensor]] = {}


def use_compiled(enabled: bool = True) -> None:
    """Turn the fused kernels on or off for this process (they start off)."""
    _state["enabled"] = bool(enabled)


def compiled_active() -> bool:
    """Whether large logit batches go through the fused kernels now."""
    return bool(_state["enabled"]) and _state["failed"] is None


# Each kernel ends with ``+ 0 * sum_k z_k``: NaN where a row holds NaN or inf, as in the
# eager scores. Everything is relative to the row maximum, as there.


def _kl(z: Tensor, log_pi: Tensor) -> Tensor:
    m = z.amax(dim=-1, keepdim=True)
    d = z - m
    e = torch.exp(d)
    s = e.sum(dim=-1)
    kl = (e * (d - log_pi)).sum(dim=-1) / s - torch.log(s)
    return kl.clamp_min(0.0) + 0.0 * z.sum(dim=-1)


def _reverse_kl(z: Tensor, pi: Tensor, neg_entropy_pi: Tensor) -> Tensor:
    # sum_k pi_k log p_k = sum_k pi_k d_k - log s, since sum_k pi_k = 1
    m = z.amax(dim=-1, keepdim=True)
    d = z - m
    s = torch.exp(d).sum(dim=-1)
    kl = neg_entropy_pi - (d * pi).sum(dim=-1) + torch.log(s)
    return kl.clamp_min(0.0) + 0.0 * z.sum(dim=-1)


def _entropy(z: Tensor) -> Tensor:
    m = z.amax(dim=-1, keepdim=True)
    d = z - m
    e = torch.exp(d)
    s = e.sum(dim=-1)
    return torch.log(s) - (e * d).sum(dim=-1) / s + 0.0 * z.sum(dim=-1)


def _neg_log_sum_exp(z: Tensor) -> Tensor:
    m = z.amax(dim=-1, keepdim=True)
    s = torch.exp(z - m).sum(dim=-1)
    return -(m.squeeze(-1) + torch.log(s)) + 0.0 * z.sum(dim=-1)


KERNELS: dict[str, Callable[..., Tensor]] = {
    "kl": _kl,
    "reverse_kl": _reverse_kl,
    "entropy": _entropy,
    "neg_log_sum_exp": _neg_log_sum_exp,
}


def fused(name: str, z: Tensor, *constants: Tensor) -> Tensor | None:
    """The compiled kernel ``name`` applied to logits ``z``, or None: kernels off, or failed.

    None also for a batch autograd would record (scores are monitoring, not training).
    """
    if not compiled_active() or z.requires_grad:
        return None
    try:
        kernel = _compiled.get(name)
        if kernel is None:
            with _lock:  # one compilation per kernel, however many threads score
                kernel = _compiled.get(name)
                if kernel is None:
                    kernel = torch.compile(KERNELS[name], dynamic=True)
                    _compiled[name] = kernel
        return kernel(z, *constants)
    except Exception as err:  # any compiler or runtime failure: eager from now on
        _state["failed"] = err
        _log.warning(
            "oodmon: compiled score kernels failed (%s: %s); scores stay eager in this process.",
            type(err).__name__,
            err,
        )
        return None
