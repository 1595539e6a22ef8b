"""The ``oodmon`` command line.

Exit codes: 0 success; 1 a runtime failure (e.g. an unreachable database); 2 bad usage or bad
input (a missing file, a malformed argument); 130 interrupted; 141 the reader of the output
went away (``oodmon score ... | head``), quietly, as Unix tools do. Errors are one line on
stderr, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from oodmon import __version__
from oodmon.cli import consume as consume_commands
from oodmon.cli import demo as demo_commands
from oodmon.cli import queue as queue_commands
from oodmon.cli import sidecar as sidecar_commands
from oodmon.cli._lazy import DeferredChoices, deferred_handler

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The reader of stdout went away: the status of a Unix tool ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141

# Option choices that live in torch-importing modules, read when first checked or shown; an
# option with such choices names a metavar, or argparse would read them to build the parser.
_LOSSES = DeferredChoices("oodmon.ocs", "LOSSES", lambda names: [x for x in names if x != "custom"])
_SCORES = DeferredChoices("oodmon.scores", "SCORES")
_KINDS = DeferredChoices("oodmon.scores", "INPUT_KINDS", tuple)


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
        "--loss",
        choices=_LOSSES,
        default="cross_entropy",
        metavar="LOSS",
        help="the training loss, one of %(choices)s (default %(default)s)",
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
        "--score",
        choices=_SCORES,
        metavar="SCORE",
        help="OOD score, one of %(choices)s (default: the OCS distance)",
    )
    cal.add_argument("--alpha", type=float, default=0.05, help="target false-alarm rate")
    cal.add_argument(
        "--kind",
        choices=_KINDS,
        default="logits",
        metavar="KIND",
        help="what the outputs hold, one of %(choices)s (default %(default)s)",
    )
    cal.add_argument("-o", "--output", default="detector.json", help="where to write the JSON")
    cal.set_defaults(handler=deferred_handler("oodmon.cli.model:cmd_calibrate"))

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
    score.set_defaults(handler=deferred_handler("oodmon.cli.model:cmd_score"))

    inspect = sub.add_parser(
        "inspect",
        help="print what a Detector JSON holds",
        description="Print a Detector's loss, OCS, score, alpha, calibration and threshold.",
    )
    inspect.add_argument("detector", help="Detector JSON")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(handler=deferred_handler("oodmon.cli.model:cmd_inspect"))

    queue_commands.register(sub)
    sidecar_commands.register(sub)
    consume_commands.register(sub)
    demo_commands.register(sub)
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
