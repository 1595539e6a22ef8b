"""OOD scores: pure, batched functions of model outputs, one value per sample.

Sign convention (the only one in oodmon): **higher score = more out-of-distribution.**
Distances to the optimal constant solution (OCS) are therefore negated when used as scores:
an output close to the OCS is the OOD signal. Every score registered in :data:`SCORES` obeys
this, and a contract test checks it.

Inputs are raw outputs ("logits") unless the caller says ``kind="probs"`` or
``kind="log_probs"``; oodmon never guesses. Rows containing NaN or inf give NaN, which later
stages treat as invalid, never as in-distribution. Half-precision inputs are computed in
float32. Nothing here synchronises with the device or loops over samples in Python.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from oodmon._fused import fused, use_compiled
from oodmon._native import native, use_native
from oodmon._scratch import scratch
from oodmon.errors import OutputShapeError
from oodmon.ocs import LOSSES, OCS

__all__ = [
    "INPUT_KINDS",
    "KIND_DESCRIPTIONS",
    "SCORES",
    "InputKind",
    "ScoreSpec",
    "as_batch",
    "batch_distance",
    "check_score",
    "compute_score",
    "default_score",
    "distance",
    "energy",
    "entropy",
    "kind_mismatch",
    "kl_to_ocs",
    "max_logit",
    "msp",
    "reverse_kl_to_ocs",
    "use_compiled",
    "use_native",
]

InputKind = Literal["logits", "probs", "log_probs"]
INPUT_KINDS: tuple[str, ...] = ("logits", "probs", "log_probs")

#: Floating dtypes the scores compute in as they are (half precision is upcast).
_FULL_PRECISION = frozenset({torch.float32, torch.float64})


# ---------------------------------------------------------------------- input handling


def as_batch(outputs: Any, num_outputs: int | None = None) -> Tensor:
    """The one shape and dtype check: ``[N, K]`` floating tensor, upcast from half precision.

    Every public score and :meth:`Detector.predict <oodmon.detector.Detector.predict>` call
    this once at their boundary; the registered kernels assume its result.

    Args:
        outputs: ``[N, K]`` or ``[K]`` tensor, array or nested list.
        num_outputs: the width ``K`` required, or None for any.

    Returns:
        A detached floating tensor (no copy unless it had to be converted or upcast).

    Raises:
        OutputShapeError: not two-dimensional (``reason="wrong_shape"``) or not ``K`` columns
            wide (``reason="wrong_width"``).
    """
    if (  # the common case, in a few attribute reads: small batches pay for every step
        isinstance(outputs, Tensor)
        and outputs.ndim == 2
        and outputs.dtype in _FULL_PRECISION
        and not outputs.requires_grad
        and (num_outputs is None or outputs.shape[1] == num_outputs)
    ):
        return outputs
    if not isinstance(outputs, Tensor):
        outputs = torch.as_tensor(np.asarray(outputs))
    if outputs.ndim == 1:
        if num_outputs is not None and outputs.shape[0] != num_outputs:
            # a vector is taken as one row; say so rather than call its length "columns"
            n = int(outputs.shape[0])
            hint = (
                f"if it holds {n // num_outputs} rows back to back, reshape it to "
                f"[{n // num_outputs}, {num_outputs}]"
                if n % num_outputs == 0
                else "pass a 2-D [N, K] array with one row per sample"
            )
            raise OutputShapeError(
                f"Expected outputs of shape [N, {num_outputs}] (or one row of {num_outputs} "
                f"values), but got a 1-D array of {n} values: {hint}.",
                reason="wrong_width",
            )
        outputs = outputs.unsqueeze(0)
    if outputs.ndim != 2:
        k = "K" if num_outputs is None else num_outputs
        raise OutputShapeError(
            f"Expected outputs of shape [N, {k}], but got shape {tuple(outputs.shape)}.",
            reason="wrong_shape",
        )
    if num_outputs is not None and outputs.shape[1] != num_outputs:
        raise OutputShapeError(
            f"Expected outputs with {num_outputs} columns (the OCS has {num_outputs} "
            f"outputs), but got {outputs.shape[1]}.",
            reason="wrong_width",
        )
    if not outputs.is_floating_point() or outputs.dtype in (torch.float16, torch.bfloat16):
        outputs = outputs.to(torch.float32)
    return outputs.detach()


#: How far a row's total probability may be from 1 and still look like a distribution
#: (float16 softmax outputs sum to 1 within about 1e-3).
_KIND_TOLERANCE = 2e-3

#: What each input kind looks like, for messages.
KIND_DESCRIPTIONS = {
    "probs": "probabilities (rows >= 0 summing to 1)",
    "log_probs": "log-probabilities (rows <= 0 whose exp sums to 1)",
    "logits": "raw logits (rows that are not a probability distribution)",
}


def _row_kinds(x: Tensor) -> list[str]:
    """What each finite row of a small ``[n, K]`` sample looks like.

    Computed on the host with NumPy: the Monitor checks every batch, and on a few rows each
    PyTorch operation's fixed cost is several times NumPy's (this check cost more than
    scoring a batch of one when it ran a dozen PyTorch operations).
    """
    a = x.detach().to("cpu", torch.float64).numpy()
    low, high = a.min(axis=1), a.max(axis=1)  # NaN and inf show in both
    kinds = []
    for i in np.flatnonzero(np.isfinite(low) & np.isfinite(high)).tolist():
        # raw logits have both signs, and most rows stop at the first test
        if low[i] >= 0 and abs(a[i].sum() - 1) <= _KIND_TOLERANCE:
            kinds.append("probs")
        elif high[i] <= 0 and abs(high[i] + math.log(np.exp(a[i] - high[i]).sum())) <= (
            _KIND_TOLERANCE
        ):
            kinds.append("log_probs")
        else:
            kinds.append("logits")
    return kinds


def kind_mismatch(outputs: Tensor, kind: str, rows: int = 4) -> str | None:
    """The kind softmax outputs look like when it is not ``kind``, else None.

    Scoring probabilities as logits (or the reverse) silently pushes every row towards the
    OCS and flags it, so callers check a few rows of each batch. Only the first ``rows`` rows
    are read (a small device-to-host copy). A batch is called mismatched only when none of
    its finite sampled rows looks like ``kind``; log-probabilities pass for logits, which
    they are.

    Args:
        outputs: ``[N, K]`` outputs of a softmax classifier.
        kind: the kind the detector expects.
        rows: how many rows to look at.

    Returns:
        ``"probs"``, ``"log_probs"`` or ``"logits"`` (see :data:`KIND_DESCRIPTIONS`), or None.
    """
    seen = _row_kinds(outputs[:rows])
    # log-probabilities are logits already (log_softmax leaves them unchanged)
    accepted = {kind, "log_probs"} if kind == "logits" else {kind}
    if not seen or accepted.intersection(seen):
        return None
    return max(set(seen), key=seen.count)


def _check_kind(kind: str, allowed: tuple[str, ...] = INPUT_KINDS) -> None:
    if kind not in allowed:
        raise ValueError(f"Expected `kind` to be one of {allowed}, but got {kind!r}.")


def _log_probs(x: Tensor, kind: str) -> Tensor:
    """Log class probabilities ``[N, K]`` from logits, probabilities or log-probabilities."""
    if kind == "logits":
        out = scratch(x, "log_p")
        return torch.log_softmax(x, dim=-1) if out is None else torch.log_softmax(x, -1, out=out)
    if kind == "probs":
        return torch.log(x)
    return x


def _zero_log0(log_p: Tensor, kind: str) -> Tensor:
    """Make ``p * log p`` vanish where ``p = 0``.

    Only probability inputs can hold exact zeros; log_softmax of finite logits is always
    finite, so logits skip this pass.
    """
    if kind == "logits":
        return log_p
    return torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p)


#: Below this many elements a batch is cheaper through log_softmax (fewer kernel launches,
#: which dominate small batches) than through the single exponentiation pass; above it, the
#: passes over memory dominate. Measured crossover on CPU: 256 x 10 is 20% faster the first
#: way, 1024 x 1000 30% faster the second. Float32 logits on the CPU go to the native
#: kernels instead when they are built (``_native_score``).
_SINGLE_PASS_MIN_ELEMENTS = 32_768


def _centred_exp(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``d = z - max_k z_k``, ``e = exp(d)`` (``[N, K]``) and ``s = sum_k e_k`` (``[N]``).

    The one exponentiation pass of the logit scores. Everything is relative to the row's
    maximum, so float32 results do not depend on a constant added to the logits (a
    ``p . z - max z`` formula would lose about ``eps * |max z|`` to cancellation), and
    ``log s`` lies in ``[0, log K]``. ``d`` is the caller's to overwrite.
    """
    d, e = scratch(z, "d"), scratch(z, "e")
    if d is None or e is None:
        d = z - z.amax(dim=-1, keepdim=True)
        e = torch.exp(d)
    else:
        torch.sub(z, z.amax(dim=-1, keepdim=True), out=d)
        torch.exp(d, out=e)
    return d, e, e.sum(dim=-1)


def _log_sum_exp(z: Tensor) -> Tensor:
    """``logsumexp(z)`` over the last dimension from one fused log-softmax pass.

    At the row's argmax ``log_softmax(z) = -log s`` with ``s = sum_k exp(z_k - max z)``, so
    ``logsumexp(z) = max z + log s = max z - max_k log_softmax(z)_k``: one log-softmax kernel
    and two row maxima, where ``torch.logsumexp`` takes more passes and an ``[N, K]``
    temporary (and, at 256 x 10, 40% more time).
    """
    return z.amax(dim=-1).sub_(_log_probs(z, "logits").amax(dim=-1))


def _softmax(z: Tensor) -> Tensor:
    """``softmax(z)`` over the last dimension, into this thread's scratch buffer if it can."""
    out = scratch(z, "softmax")
    return torch.softmax(z, dim=-1) if out is None else torch.softmax(z, -1, out=out)


def _native_score(kernel: str, x: Tensor, *constants: Any) -> Tensor | None:
    """The native kernel's score of a batch of logits (``_native.py``), else None.

    Small batches always: one call instead of two to five. Larger ones while PyTorch runs
    on at most two threads: the single-threaded sweep is then 1.5-3x faster than the eager
    passes (``benchmarks/scores.py``), while many threads outrun it.
    """
    if x.numel() < _SINGLE_PASS_MIN_ELEMENTS or torch.get_num_threads() <= 2:
        return native(kernel, x, *constants)
    return None


def _invalidate(score: Tensor, x: Tensor, kind: str = "logits", sign: float = 1.0) -> Tensor:
    """``sign * score``, NaN where a row of ``x`` holds NaN or inf; no host sync.

    For log-probabilities, -inf is the log of an exact zero and stays valid.

    ``sign * score + 0 * rowsum(x)``: ``0 * inf`` and ``0 * NaN`` are NaN, so the added term
    is NaN exactly in the rows with a non-finite value and 0 elsewhere. (A finite row whose
    sum overflows, |logits| ~ 1e38, is marked too; such outputs are broken anyway.) Small
    batches, where the fixed cost of each PyTorch operation dominates, do it in one BLAS call,
    ``addmv(score, x, zeros)``, where ``x @ 0`` carries the same NaN; large ones with a row sum,
    which reads memory faster than a GEMV.
    """
    if kind == "log_probs":
        x = torch.nan_to_num(x, nan=float("nan"), posinf=float("inf"), neginf=0.0)
    if x.numel() < _SINGLE_PASS_MIN_ELEMENTS:
        return torch.addmv(score, x, _zeros(x.shape[-1], x.device, x.dtype), beta=sign)
    return torch.add(score if sign == 1.0 else score.mul(sign), x.sum(dim=-1), alpha=0)


@functools.lru_cache(maxsize=64)
def _zeros(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A cached read-only vector of ``k`` zeros (the NaN marks of :func:`_invalidate`)."""
    return torch.zeros(k, device=device, dtype=dtype)


# ---------------------------------------------------------------------- baselines


def msp(outputs: Tensor, kind: InputKind = "logits") -> Tensor:
    """Negated maximum softmax probability (Hendrycks and Gimpel, 2017): ``-max_k p_k``.

    Args:
        outputs: ``[N, K]`` logits (or probabilities / log-probabilities per ``kind``).
        kind: what ``outputs`` hold: ``"logits"``, ``"probs"`` or ``"log_probs"``.

    Returns:
        ``[N]`` score in ``[-1, -1/K]``; higher = more OOD.
    """
    _check_kind(kind)
    return _msp(as_batch(outputs), kind)


def _msp(x: Tensor, kind: str) -> Tensor:
    if kind == "logits":
        if (score := _native_score("msp", x)) is not None:
            return score
        top = _softmax(x).amax(dim=-1)  # one fused pass, like log_softmax
    elif kind == "probs":
        top = x.amax(dim=-1)
    else:
        top = x.amax(dim=-1).exp()
    return _invalidate(top, x, kind, sign=-1.0)


def max_logit(outputs: Tensor) -> Tensor:
    """Negated maximum logit (Hendrycks et al., 2022): ``-max_k z_k``. Logits only.

    Returns:
        ``[N]`` score; higher = more OOD.
    """
    return _max_logit(as_batch(outputs))


def _max_logit(x: Tensor) -> Tensor:
    if (score := _native_score("max_logit", x)) is not None:
        return score
    return _invalidate(x.amax(dim=-1), x, sign=-1.0)


def energy(outputs: Tensor, temperature: float = 1.0) -> Tensor:
    """Energy score (Liu et al., 2020): ``-T * logsumexp(z / T)``. Logits only.

    Returns:
        ``[N]`` score; higher = more OOD.
    """
    if not temperature > 0:
        raise ValueError(f"Expected `temperature` > 0, but got {temperature!r}.")
    return _energy(as_batch(outputs), temperature)


def _energy(x: Tensor, temperature: float) -> Tensor:
    if (score := _native_score("neg_log_sum_exp", x, temperature)) is not None:
        return score
    scaled = x if temperature == 1.0 else x / temperature
    if x.numel() >= _SINGLE_PASS_MIN_ELEMENTS:
        energy = fused("neg_log_sum_exp", scaled)
        if energy is not None:
            return energy if temperature == 1.0 else energy.mul_(temperature)
    return _invalidate(_log_sum_exp(scaled), x, sign=-temperature)


def entropy(outputs: Tensor, kind: InputKind = "logits") -> Tensor:
    """Shannon entropy of the predicted distribution, in nats: ``-sum_k p_k log p_k``.

    Returns:
        ``[N]`` score in ``[0, log K]``; higher = more OOD.
    """
    _check_kind(kind)
    return _entropy(as_batch(outputs), kind)


def _entropy(x: Tensor, kind: str) -> Tensor:
    if kind == "logits" and (score := _native_score("entropy", x)) is not None:
        return score
    if kind == "logits" and x.numel() >= _SINGLE_PASS_MIN_ELEMENTS:
        h = fused("entropy", x)
        if h is not None:
            return h
        # H = log s - sum_k e_k d_k / s: both terms are >= 0, so nothing cancels
        d, e, s = _centred_exp(x)
        h = torch.log(s).sub_(d.mul_(e).sum(dim=-1).div_(s))
        return _invalidate(h, x)
    log_p = _log_probs(x, kind)
    p = x if kind == "probs" else log_p.exp()
    h = torch.linalg.vecdot(p, _zero_log0(log_p, kind)).neg_()
    # from logits a NaN or inf makes the row's log_softmax NaN, and a -inf logit gives
    # 0 * -inf = NaN in the product: such rows are NaN already
    return h if kind == "logits" else _invalidate(h, x, kind)


# ---------------------------------------------------------------------- distances to the OCS


def kl_to_ocs(outputs: Tensor, ocs: OCS, kind: InputKind = "logits") -> Tensor:
    """``KL(p(x) || pi)`` in nats: the paper's distance to the cross-entropy OCS.

    At most ``log(1 / min_k pi_k)``; for uniform ``pi`` over K classes, ``log K - H(p)``.

    Args:
        outputs: ``[N, K]`` logits (or probabilities / log-probabilities per ``kind``).
        ocs: a cross-entropy OCS.
        kind: what ``outputs`` hold: ``"logits"``, ``"probs"`` or ``"log_probs"``.

    Returns:
        ``[N]`` non-negative distances; 0 exactly at the OCS.
    """
    _check_kind(kind)
    _require_loss(ocs, ("cross_entropy",), "kl_to_ocs")
    return _kl_to_ocs(as_batch(outputs, ocs.num_outputs), ocs, kind)


def _kl_to_ocs(x: Tensor, ocs: OCS, kind: str) -> Tensor:
    if (
        kind == "logits"
        and (score := _native_score("kl", x, ocs.host_constant("log_target"))) is not None
    ):
        return score
    log_pi = ocs.constant_on("log_target", x.device, x.dtype)
    if kind == "logits" and x.numel() >= _SINGLE_PASS_MIN_ELEMENTS:
        kl = fused("kl", x, log_pi)
        if kl is not None:
            return kl
        # With d = z - max z, e = exp(d), s = sum e:
        # KL = sum_k e_k (d_k - log pi_k) / s - log s  (one exponentiation, no log-softmax)
        d, e, s = _centred_exp(x)
        cross = e @ log_pi  # a GEMV: no [N, K] temporary
        kl = d.mul_(e).sum(dim=-1).sub_(cross).div_(s).sub_(torch.log(s))
        return _invalidate(kl.clamp_min_(0.0), x)
    log_p = _log_probs(x, kind)
    p = x if kind == "probs" else log_p.exp()
    # sum_k p_k (log p_k - log pi_k) = p . log p - p @ log pi  (the GEMV avoids a [N, K] temp)
    kl = torch.addmv(torch.linalg.vecdot(p, _zero_log0(log_p, kind)), p, log_pi, alpha=-1)
    kl.clamp_min_(0.0)
    return kl if kind == "logits" else _invalidate(kl, x, kind)  # NaN rows: as in _entropy


def reverse_kl_to_ocs(outputs: Tensor, ocs: OCS, kind: InputKind = "logits") -> Tensor:
    """``KL(pi || p(x))`` in nats, the reverse direction: one log-softmax pass and a GEMV.

    ``sum_k pi_k log pi_k - log p(x) @ pi``; from logits ``log p = log_softmax(z)``, which
    equals ``logsumexp(z) - z @ pi - H(pi)`` without its cancellation for large logits.
    """
    _check_kind(kind)
    _require_loss(ocs, ("cross_entropy",), "reverse_kl_to_ocs")
    return _reverse_kl_to_ocs(as_batch(outputs, ocs.num_outputs), ocs, kind)


def _reverse_kl_to_ocs(x: Tensor, ocs: OCS, kind: str) -> Tensor:
    if kind == "logits":
        constants = ocs.host_constant("target"), ocs.host_constant("_neg_entropy")
        if (score := _native_score("reverse_kl", x, *constants)) is not None:
            return score
    pi = ocs.constant_on("target", x.device, x.dtype)
    neg_entropy_pi = ocs.constant_on("_neg_entropy", x.device, x.dtype)
    if kind == "logits" and x.numel() >= _SINGLE_PASS_MIN_ELEMENTS:
        kl = fused("reverse_kl", x, pi, neg_entropy_pi)
        if kl is not None:
            return kl
    kl = torch.addmv(neg_entropy_pi, _log_probs(x, kind), pi, alpha=-1)
    return _invalidate(kl.clamp_min_(0.0), x, kind)


def _bernoulli_kl_to_ocs(x: Tensor, ocs: OCS, kind: str) -> Tensor:
    """Per-label Bernoulli KL to the positive rates, summed over labels (multi-label heads).

    ``sum_l q_l log(q_l / r_l) + (1 - q_l) log((1 - q_l) / (1 - r_l))`` with ``q = sigmoid(z)``.
    ``kind="probs"`` takes per-label probabilities; ``"log_probs"`` is not defined here.
    """
    rate = ocs.constant_on("target", x.device, x.dtype)
    if kind == "logits":
        log_q, log_not_q = F.logsigmoid(x), F.logsigmoid(-x)
    else:
        log_q, log_not_q = torch.log(x), torch.log1p(-x)
    q, not_q = log_q.exp(), log_not_q.exp()
    kl = (
        torch.xlogy(q, q)
        - q * torch.log(rate)
        + torch.xlogy(not_q, not_q)
        - not_q * torch.log1p(-rate)
    )
    return _invalidate(kl.sum(dim=-1).clamp_min(0.0), x)


def _mse_to_ocs(x: Tensor, ocs: OCS) -> Tensor:
    """Mean squared difference to the OCS over all outputs (MSE, reward and custom heads)."""
    target = ocs.constant_on("target", x.device, x.dtype)
    return _invalidate((x - target).square().mean(dim=-1), x)


def _gaussian_kl_to_ocs(x: Tensor, ocs: OCS) -> Tensor:
    """``KL(N(mu(x), s2(x)) || N(ybar, v))`` summed over the D targets (Gaussian NLL heads).

    The outputs are ``[mean_1..mean_D, var_1..var_D]``; a non-positive variance makes the row
    NaN (invalid).
    """
    assert ocs.variance is not None  # a gaussian_nll OCS always has one
    d = x.shape[-1] // 2
    mu, s2 = x[:, :d], x[:, d:]
    mean = ocs.constant_on("target", x.device, x.dtype)
    var = ocs.constant_on("variance", x.device, x.dtype)
    s2 = torch.where(s2 > 0, s2, torch.full_like(s2, float("nan")))
    kl = 0.5 * (torch.log(var / s2) + (s2 + (mu - mean).square()) / var - 1.0)
    return _invalidate(kl.sum(dim=-1).clamp_min(0.0), x)


def distance(
    outputs: Tensor, ocs: OCS, kind: InputKind = "logits", *, reverse: bool = False
) -> Tensor:
    """The paper's distance to the OCS, chosen by the OCS's loss.

    ============================  ===============================================
    loss                          distance
    ============================  ===============================================
    cross_entropy                 ``KL(softmax(z) || pi)`` (``reverse=True``: ``KL(pi || p)``)
    binary_cross_entropy          summed per-label Bernoulli KL
    mse, reward_prediction,       mean squared difference to the OCS
    custom
    gaussian_nll                  ``KL(N(mu, s2) || N(ybar, v))``
    ============================  ===============================================

    Args:
        outputs: ``[N, num_outputs]`` model outputs (a ``[num_outputs]`` vector is one row).
        ocs: the optimal constant solution of the training loss.
        kind: what ``outputs`` hold, for probability heads.
        reverse: use ``KL(OCS || output)`` (cross-entropy only).

    Returns:
        ``[N]`` non-negative distances (0 at the OCS); NaN for rows with NaN/inf.
    """
    if reverse and ocs.loss != "cross_entropy":
        raise ValueError(
            f"Expected a cross-entropy OCS with `reverse=True`, but got loss {ocs.loss!r}."
        )
    if ocs.loss == "cross_entropy":
        return reverse_kl_to_ocs(outputs, ocs, kind) if reverse else kl_to_ocs(outputs, ocs, kind)
    if not isinstance(ocs, OCS):
        raise ValueError(f"Expected `ocs` to be an oodmon.OCS, but got {type(ocs).__name__}.")
    _check_kind(kind, ("logits", "probs") if ocs.loss == "binary_cross_entropy" else INPUT_KINDS)
    return batch_distance(as_batch(outputs, ocs.num_outputs), ocs, kind)


def batch_distance(x: Tensor, ocs: OCS, kind: str) -> Tensor:
    """:func:`distance` of a batch that passed :func:`as_batch` (checks nothing again)."""
    if ocs.loss == "cross_entropy":
        return _kl_to_ocs(x, ocs, kind)
    if ocs.loss == "binary_cross_entropy":
        return _bernoulli_kl_to_ocs(x, ocs, kind)
    if ocs.loss == "gaussian_nll":
        return _gaussian_kl_to_ocs(x, ocs)
    return _mse_to_ocs(x, ocs)


def _require_loss(ocs: OCS, losses: tuple[str, ...], name: str) -> None:
    if not isinstance(ocs, OCS):
        raise ValueError(f"Expected `ocs` to be an oodmon.OCS, but got {type(ocs).__name__}.")
    if ocs.loss not in losses:
        raise ValueError(
            f"Expected an OCS for one of {losses} in `{name}`, but got loss {ocs.loss!r}; "
            "use `oodmon.distance`, which picks the right distance for each loss."
        )


# ---------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ScoreSpec:
    """A registered OOD score: how to compute it and what it applies to.

    Attributes:
        name: registry key, used in Detector JSON and metric labels.
        compute: ``(outputs, ocs, kind, temperature) -> [N]``, higher = more OOD, for outputs
            that passed :func:`as_batch` (the kernel checks nothing itself).
        losses: OCS losses it applies to.
        kinds: input kinds it accepts.
        summary: one line for ``--help`` and docs.
        negated_distance: the score is exactly ``-distance(outputs, ocs, kind)``, so a verdict's
            distance is ``-score`` and one sort of either serves both.
        kinds_by_loss: narrower input kinds for some losses (raw regression outputs have no
            probabilities), or None when ``kinds`` holds for every loss.
    """

    name: str
    compute: Callable[[Tensor, OCS, str, float], Tensor]
    losses: tuple[str, ...]
    kinds: tuple[str, ...]
    summary: str
    negated_distance: bool = False
    kinds_by_loss: Mapping[str, tuple[str, ...]] | None = None

    def kinds_for(self, loss: str) -> tuple[str, ...]:
        """The input kinds this score accepts for an OCS of ``loss``."""
        if self.kinds_by_loss is not None and loss in self.kinds_by_loss:
            return self.kinds_by_loss[loss]
        return self.kinds


_CLASSIFIER_LOSSES = ("cross_entropy",)

SCORES: dict[str, ScoreSpec] = {
    spec.name: spec
    for spec in (
        ScoreSpec(
            "ocs_distance",
            lambda x, ocs, kind, t: -batch_distance(x, ocs, kind),
            LOSSES,
            INPUT_KINDS,
            "negated distance to the OCS for the OCS's loss (the paper's measure)",
            negated_distance=True,
            kinds_by_loss={
                "binary_cross_entropy": ("logits", "probs"),
                "mse": ("logits",),
                "gaussian_nll": ("logits",),
                "reward_prediction": ("logits",),
                "custom": ("logits",),
            },
        ),
        ScoreSpec(
            "ocs_kl",
            lambda x, ocs, kind, t: -_kl_to_ocs(x, ocs, kind),
            _CLASSIFIER_LOSSES,
            INPUT_KINDS,
            "negated KL(p(x) || pi) to the training label marginal",
            negated_distance=True,
        ),
        ScoreSpec(
            "ocs_kl_reverse",
            lambda x, ocs, kind, t: -_reverse_kl_to_ocs(x, ocs, kind),
            _CLASSIFIER_LOSSES,
            INPUT_KINDS,
            "negated KL(pi || p(x))",
        ),
        ScoreSpec(
            "msp",
            lambda x, ocs, kind, t: _msp(x, kind),
            _CLASSIFIER_LOSSES,
            INPUT_KINDS,
            "negated maximum softmax probability",
        ),
        ScoreSpec(
            "entropy",
            lambda x, ocs, kind, t: _entropy(x, kind),
            _CLASSIFIER_LOSSES,
            INPUT_KINDS,
            "entropy of the predicted distribution",
        ),
        ScoreSpec(
            "energy",
            lambda x, ocs, kind, t: _energy(x, t),
            _CLASSIFIER_LOSSES,
            ("logits",),
            "negated temperature-scaled logsumexp of the logits",
        ),
        ScoreSpec(
            "max_logit",
            lambda x, ocs, kind, t: _max_logit(x),
            _CLASSIFIER_LOSSES,
            ("logits",),
            "negated maximum logit",
        ),
    )
}


def default_score(ocs: OCS) -> str:
    """The paper's score for this OCS: ``ocs_kl`` for classifiers, ``ocs_distance`` otherwise."""
    return "ocs_kl" if ocs.loss == "cross_entropy" else "ocs_distance"


def check_score(name: str, ocs: OCS, kind: str) -> ScoreSpec:
    """Look up a score and check that it applies to this OCS and input kind.

    Raises:
        ValueError: unknown score, or one that does not fit the loss or input kind.
    """
    spec = SCORES.get(name)
    if spec is None:
        raise ValueError(f"Expected `score` to be one of {sorted(SCORES)}, but got {name!r}.")
    if spec.kinds_by_loss is not None and kind not in spec.kinds_for(ocs.loss):
        raise ValueError(
            f"The distance for {ocs.loss!r} heads needs outputs of kind "
            f"{spec.kinds_for(ocs.loss)}, but got kind={kind!r}."
        )
    if ocs.loss not in spec.losses:
        raise ValueError(
            f"Score {name!r} applies to {spec.losses} heads, but the OCS is for "
            f"{ocs.loss!r}; use score='ocs_distance'."
        )
    if kind not in spec.kinds:
        raise ValueError(
            f"Score {name!r} needs outputs of kind {spec.kinds}, but got kind={kind!r}."
        )
    return spec


def compute_score(
    name: str,
    outputs: Tensor,
    ocs: OCS,
    kind: InputKind = "logits",
    temperature: float = 1.0,
) -> Tensor:
    """Compute the registered score ``name`` (higher = more OOD) for a batch of outputs."""
    spec = check_score(name, ocs, kind)
    return spec.compute(as_batch(outputs, ocs.num_outputs), ocs, kind, temperature)
