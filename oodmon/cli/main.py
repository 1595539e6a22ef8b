"""The ``oodmon`` command line.

Exit codes: 0 success; 1 a runtime failure (e.g. an unreachable database); 2 bad usage or bad
input (a missing file, a malformed argument); 130 interrupted; 141 the reader of the output
went away (``oodmon score ... | head``), quietly, as Unix tools do. Errors are one line on
stderr, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodmon import __version__
from oodmon.cli import consume as consume_commands
from oodmon.cli import queue as queue_commands
from oodmon.cli import sidecar as sidecar_commands
from oodmon.detector import Detector
from oodmon.errors import OodmonError
from oodmon.ocs import LOSSES, OCS
from oodmon.offline import score_table
from oodmon.scores import INPUT_KINDS, KIND_DESCRIPTIONS, SCORES, kind_mismatch

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The reader of stdout went away: the status of a Unix tool ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


class UsageError(OodmonError, ValueError):
    """Bad command-line input (exit code 2)."""


# ---------------------------------------------------------------------- file loading


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


def cmd_demo(args: argparse.Namespace) -> int:
    """``oodmon demo``: the MNIST demo, end to end."""
    from oodmon.demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``oodmon`` argument parser, with every command."""
    parser = argparse.ArgumentParser(
        prog="oodmon",
        description="Out-of-distribution monitor: flags model outputs that revert to the "
        "optimal constant solution (OCS) of the training loss.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 130 interrupted, "
        "141 output pipe closed.",
    )
    parser.add_argument("--version", action="version", version=f"oodmon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cal = sub.add_parser(
        "calibrate",
        help="build a Detector JSON from saved in-distribution outputs",
        description="Fit a Detector on held-out in-distribution model outputs (.pt or .npy) and "
        "the training labels (or class counts), and save it as JSON.",
    )
    cal.add_argument("--outputs", required=True, help="held-out in-distribution outputs [N, K]")
    cal.add_argument("--key", help="entry to use when a .pt file holds a dict")
    cal.add_argument(
        "--loss", choices=[x for x in LOSSES if x != "custom"], default="cross_entropy"
    )
    cal.add_argument("--labels", help="training labels [N] (.pt or .npy)")
    cal.add_argument(
        "--counts", help="training class counts, comma-separated (instead of --labels)"
    )
    cal.add_argument("--num-classes", type=int, help="number of classes K (with --labels)")
    cal.add_argument("--targets", help="training targets for bce/mse/gaussian_nll heads")
    cal.add_argument("--label-smoothing", type=float, default=0.0)
    cal.add_argument("--wrong-cost", type=float, default=4.0, help="reward_prediction: cost c")
    cal.add_argument(
        "--score", choices=sorted(SCORES), help="OOD score (default: the OCS distance)"
    )
    cal.add_argument("--alpha", type=float, default=0.05, help="target false-alarm rate")
    cal.add_argument("--kind", choices=INPUT_KINDS, default="logits", help="what the outputs hold")
    cal.add_argument("-o", "--output", default="detector.json", help="where to write the JSON")
    cal.set_defaults(handler=cmd_calibrate)

    score = sub.add_parser(
        "score",
        help="score saved or logged outputs with a Detector",
        description="Score model outputs with a Detector; write one verdict per row "
        "(index, --keep columns, score, distance, p_value, flag, invalid, invalid_reason, "
        "predicted). Streams: memory stays flat however large the input. Reads Parquet (a list "
        "column of K numbers, or K numeric columns), JSON Lines (one OIP response, KServe v1 "
        'reply or KServe payload-log CloudEvent per line, or {"outputs": [...]} rows), '
        ".npy and .pt. Rows that cannot be read or scored are written with invalid=true and a "
        "reason, never dropped; an input that cannot be read at all exits 2.",
        epilog="--fdr Q: Benjamini-Hochberg over the WHOLE input (both engines): the input is "
        "read and scored twice, first to count rows per p-value level (n_calibration + 1 "
        "integers, whatever the input size), then to write the flags. --engine ray writes a "
        "directory of Parquet files in input order, without the index column (use --keep).",
    )
    score.add_argument("--detector", required=True, help="Detector JSON from `oodmon calibrate`")
    score.add_argument(
        "--outputs",
        required=True,
        help="model outputs: .parquet, .jsonl, .npy or .pt (or a directory of one format)",
    )
    score.add_argument("--key", help="entry to use when a .pt file holds a dict")
    score.add_argument(
        "--input-format", choices=["parquet", "jsonl", "npy", "pt"], help="default: from suffix"
    )
    score.add_argument(
        "--columns",
        help="Parquet: the list column, K numeric columns a,b,c or a prefix like logit_*; "
        "JSON Lines: the OIP output tensor (default: the only one)",
    )
    score.add_argument("--keep", help="input columns to copy to the output, e.g. id,timestamp")
    score.add_argument("--alpha", type=float, help="override the detector's alpha")
    score.add_argument(
        "--fdr",
        type=float,
        metavar="Q",
        help="flag by Benjamini-Hochberg at false discovery rate Q over the whole input, "
        "instead of p_value <= alpha (reads the input twice; see below)",
    )
    score.add_argument(
        "--format",
        choices=["csv", "jsonl", "parquet"],
        help="default: from -o, else csv",
    )
    score.add_argument("-o", "--output", help="file to write (default: stdout; Ray: a directory)")
    score.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: Ray Data (pip install 'oodmon[ray]')",
    )
    score.add_argument(
        "--ray-address", help="Ray cluster to join, e.g. ray://head:10001 (default: start one)"
    )
    score.add_argument("--concurrency", type=int, help="Ray scoring workers (default: CPUs)")
    score.add_argument("--batch-rows", type=int, help="rows per batch (default: ~16 MiB)")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(handler=cmd_score)

    inspect = sub.add_parser(
        "inspect",
        help="print what a Detector JSON holds",
        description="Print a Detector's loss, OCS, score, alpha, calibration and threshold.",
    )
    inspect.add_argument("detector", help="Detector JSON")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(handler=cmd_inspect)

    queue_commands.register(sub)
    sidecar_commands.register(sub)
    consume_commands.register(sub)

    from oodmon.demo import add_demo_arguments

    demo = sub.add_parser(
        "demo",
        help="train, calibrate and monitor an MNIST model end to end (a couple of minutes)",
        description="The whole product on the embedded MNIST sample: train a small CNN, "
        "calibrate a Detector, wrap the model with Prometheus metrics and an SQLite label "
        "queue, stream in-distribution, rotated and noise traffic, and summarise.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oodmon`` console script; returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("oodmon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except KeyboardInterrupt:
        print("oodmon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`oodmon score ... | head`): end quietly, as Unix tools do,
        # and point stdout at /dev/null so the exit-time flush cannot fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as err:
        if args.debug:
            raise
        code = (
            EXIT_USAGE
            if isinstance(err, (ValueError, FileNotFoundError, IsADirectoryError, PermissionError))
            else EXIT_RUNTIME
        )
        message = " ".join(_describe(err).split()) or type(err).__name__
        print(f"oodmon: error: {message}", file=sys.stderr)
        return code


def _describe(err: BaseException) -> str:
    try:
        return str(err)
    except Exception:
        return type(err).__name__
