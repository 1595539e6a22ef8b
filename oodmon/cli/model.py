"""The model commands of ``oodmon``: ``calibrate``, ``score`` and ``inspect``.

They read tensors and Detector files, so they import torch; :mod:`oodmon.cli.main` imports
this module only when one of them runs, which keeps ``oodmon --version``, ``--help`` and the
queue commands free of torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodmon.cli.main import EXIT_OK
from oodmon.detector import Detector
from oodmon.errors import OodmonError
from oodmon.ocs import OCS
from oodmon.offline import score_table
from oodmon.scores import KIND_DESCRIPTIONS, kind_mismatch

__all__ = [
    "UsageError",
    "build_ocs",
    "check_kind",
    "cmd_calibrate",
    "cmd_inspect",
    "cmd_score",
    "first_line",
    "load_array",
    "load_detector",
    "parse_counts",
]


class UsageError(OodmonError, ValueError):
    """Bad command-line input (exit code 2)."""


def load_array(path: str | Path, what: str, key: str | None = None) -> torch.Tensor:
    """Load a tensor saved with ``torch.save`` (``.pt``) or ``numpy.save`` (``.npy``).

    Args:
        path: the file.
        what: what the file should hold, for error messages ("outputs", "labels").
        key: for a ``.pt`` file holding a dict, the entry to use.

    Raises:
        FileNotFoundError: no such file.
        UsageError: unknown suffix, unreadable file, or not an array.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file not found: {file}")
    suffix = file.suffix.lower()
    try:
        if suffix == ".npy":
            data: Any = np.load(file, allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            data = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise UsageError(f"Expected a .pt or .npy file for {what}, but got {file.name!r}.")
    except UsageError:
        raise
    except Exception as err:
        # torch's own text spans several lines; the first says what went wrong
        raise UsageError(
            f"Could not read {what} from {file}: {first_line(err)} (--debug shows the rest)"
        ) from err
    if isinstance(data, dict):
        if key is None and _looks_like_state_dict(data):
            raise UsageError(
                f"{file} looks like a model's state_dict (parameters such as "
                f"{_state_dict_example(data)!r}), not saved {what}: run the model on the data "
                f"and save what it returns, e.g. `torch.save(model(x).detach(), {file.name!r})`."
            )
        if key is None and len(data) == 1:
            key = next(iter(data))
        if key not in data:
            keys = sorted(map(str, data))
            shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
            raise UsageError(
                f"{file} holds a dict with {len(keys)} keys ({shown}) and "
                + ("no --key was given" if key is None else f"no key {key!r}")
                + f": name the entry that holds the {what} with --key."
            )
        data = data[key]
    if isinstance(data, np.ndarray):
        if data.dtype.kind not in "fiu":
            raise UsageError(
                f"Expected real numbers ({what}) in {file}, but it holds NumPy dtype "
                f"{data.dtype}; save a float or integer array."
            )
        return torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        if data.dtype == torch.bool or data.is_complex() or data.layout != torch.strided:
            raise UsageError(
                f"Expected real numbers ({what}) in {file}, but it holds a {data.dtype} tensor"
                f"{'' if data.layout == torch.strided else f' with layout {data.layout}'}; "
                "save a dense float or integer tensor."
            )
        return data
    raise UsageError(f"Expected an array of {what} in {file}, but found {type(data).__name__}.")


_PARAMETER_SUFFIXES = (".weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked")


def _looks_like_state_dict(data: dict[Any, Any]) -> bool:
    """A dict of tensors named like module parameters (``fc.weight``, ``bn.running_var``)."""
    names = [k for k in data if isinstance(k, str) and k.endswith(_PARAMETER_SUFFIXES)]
    return len(names) >= 2 and all(isinstance(v, torch.Tensor) for v in data.values())


def _state_dict_example(data: dict[Any, Any]) -> str:
    return next(k for k in data if isinstance(k, str) and k.endswith(_PARAMETER_SUFFIXES))


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type name if it has none)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def parse_counts(text: str) -> list[int]:
    """``"50,30,20"`` -> ``[50, 30, 20]``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise UsageError(
            f"Expected --counts as comma-separated integers like 50,30,20, but got {text!r}."
        ) from err


# ---------------------------------------------------------------------- commands


def build_ocs(args: argparse.Namespace) -> OCS:
    """The OCS described by ``calibrate``'s --loss / --labels / --counts / --targets."""
    loss = args.loss
    if loss in ("cross_entropy", "reward_prediction"):
        if (args.labels is None) == (args.counts is None):
            raise UsageError(
                f"--loss {loss} needs exactly one of --labels FILE or --counts N,N,..."
            )
        labels = None if args.labels is None else load_array(args.labels, "labels")
        counts = None if args.counts is None else parse_counts(args.counts)
        num_classes = args.num_classes
        if labels is not None and num_classes is None:
            raise UsageError(
                "--labels needs --num-classes K (classes absent from the labels count)."
            )
        if loss == "cross_entropy":
            return OCS.cross_entropy(
                labels, num_classes, counts=counts, label_smoothing=args.label_smoothing
            )
        return OCS.reward_prediction(labels, num_classes, args.wrong_cost, counts=counts)
    if args.targets is None:
        raise UsageError(f"--loss {loss} needs --targets FILE (the training targets).")
    targets = load_array(args.targets, "targets")
    if loss == "binary_cross_entropy":
        return OCS.binary_cross_entropy(targets)
    if loss == "mse":
        return OCS.mse(targets)
    if loss == "gaussian_nll":
        return OCS.gaussian_nll(targets)
    raise UsageError(
        f"--loss {loss} cannot be calibrated from the command line; use OCS.fit in Python."
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``oodmon calibrate``: fit a Detector on saved outputs and save it as JSON."""
    ocs = build_ocs(args)
    outputs = load_array(args.outputs, "outputs", args.key)
    check_kind(outputs, ocs, args.kind, "pass `--kind {fix}` (what the outputs hold)")
    detector = Detector(ocs, score=args.score, alpha=args.alpha, kind=args.kind).fit(outputs)
    path = detector.save(args.output)
    print(
        f"wrote {path}: {detector.ocs.loss} detector, score {detector.score}, alpha "
        f"{detector.alpha:g}, {detector.n_calibration_} calibration samples"
        + (f" ({detector.n_dropped_} NaN/inf rows dropped)" if detector.n_dropped_ else "")
        + f", threshold {detector.threshold_:.6g}, hash {detector.calibration_hash_}"
    )
    return EXIT_OK


def check_kind(outputs: torch.Tensor, ocs: OCS, kind: str, advice: str) -> None:
    """Refuse softmax outputs that look like another kind than ``kind`` (all would flag).

    ``advice`` names the fix; ``{fix}`` in it becomes the kind the outputs look like.
    """
    if ocs.loss != "cross_entropy" or outputs.ndim != 2 or not outputs.is_floating_point():
        return
    looks = kind_mismatch(outputs, kind, rows=64)
    if looks is None:
        return
    raise UsageError(
        f"Expected outputs of kind {kind!r}, but they look like {KIND_DESCRIPTIONS[looks]}: "
        f"{advice.format(fix=looks)}."
    )


def _first_rows(path: str, key: str | None, rows: int = 64) -> torch.Tensor | None:
    """The first rows of a ``.npy`` / ``.pt`` input, for the kind check before scoring.

    A ``.npy`` file is memory-mapped (only these rows are read); other formats stream through
    :func:`oodmon.score_table` and are not peeked at.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".npy" and Path(path).is_file():
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim != 2 or array.dtype.kind != "f":
            return None  # score_table reports what is wrong with it
        return torch.from_numpy(np.array(array[:rows]))
    if suffix == ".pt" and Path(path).is_file():
        return load_array(path, "outputs", key)[:rows]
    return None


def load_detector(path: str) -> Detector:
    """Load a Detector JSON, with a clear error when the file is missing."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"detector file not found: {file}")
    return Detector.load(file)


def cmd_score(args: argparse.Namespace) -> int:
    """``oodmon score``: one verdict per row of saved outputs, as CSV or JSON Lines."""
    detector = load_detector(args.detector)
    first_rows = _first_rows(args.outputs, args.key)
    if first_rows is not None:
        check_kind(
            first_rows, detector.ocs, detector.kind,
            "score the raw logits, or calibrate a detector on these outputs with "
            "`oodmon calibrate --kind {fix}`",
        )  # fmt: skip
    summary = score_table(
        args.outputs,
        detector,
        args.output,
        columns=args.columns,
        keep=args.keep,
        key=args.key,
        input_format=args.input_format,
        output_format=args.format,
        batch_rows=args.batch_rows,
        alpha=args.alpha,
        fdr=args.fdr,
        progress=not args.no_progress,
        engine=args.engine,
        ray_address=args.ray_address,
        concurrency=args.concurrency,
    )
    if args.output:
        rule = (
            f"BH at FDR {summary.fdr:g}: p_value <= {summary.p_cutoff:.6g}"
            if summary.fdr is not None
            else f"alpha {summary.alpha:g}"
        )
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.invalid_reasons.items()))
        skipped = f"; {summary.skipped} records without outputs skipped" if summary.skipped else ""
        print(
            f"wrote {summary.rows} verdicts to {args.output}: {summary.flagged} flagged, "
            f"{summary.invalid} invalid{f' ({reasons})' if reasons else ''} ({rule}){skipped}",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """``oodmon inspect``: what a Detector JSON holds, as a table or JSON."""
    detector = load_detector(args.detector)
    if args.json:
        summary = detector.to_dict()
        summary["calibration"] = {k: v for k, v in summary["calibration"].items() if k != "scores"}
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    ocs = detector.ocs
    cal = detector.calibration_scores_.numpy()
    quantiles = np.quantile(cal, [0.0, 0.05, 0.5, 0.95, 1.0])
    target = ocs.target.tolist()
    shown = ", ".join(f"{v:.4g}" for v in target[:12]) + (", ..." if len(target) > 12 else "")
    lines = [
        ("file", args.detector),
        ("loss", ocs.loss),
        ("outputs", f"{detector.num_outputs} ({detector.kind})"),
        ("OCS", f"[{shown}]"),
        ("trained on", f"{ocs.num_train} targets"),
        ("score", f"{detector.score}  (higher = more OOD)"),
        ("alpha", f"{detector.alpha:g}  (target false-alarm rate)"),
        ("calibration", f"{detector.n_calibration_} samples, {detector.n_dropped_} dropped"),
        ("threshold", f"flag when score > {detector.threshold_:.6g}"),
        ("score quantiles", "  ".join(f"{q:.4g}" for q in quantiles) + "  (0/5/50/95/100%)"),
        ("hash", detector.calibration_hash_),
    ]
    if ocs.label_smoothing:
        lines.insert(4, ("label smoothing", f"{ocs.label_smoothing:g}"))
    width = max(len(k) for k, _ in lines)
    for key, val in lines:
        print(f"{key:<{width}}  {val}")
    return EXIT_OK
