"""``oodmon demo``: the options of the MNIST walkthrough (:mod:`oodmon.demo.walkthrough`).

The walkthrough trains a model, so it imports torch; this module only describes its options,
and the walkthrough is imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from oodmon.cli._lazy import deferred_handler

__all__ = ["DEFAULT_PORT", "register"]

#: Port of the demo's /metrics endpoint on 127.0.0.1.
DEFAULT_PORT = 9465


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``oodmon`` parser's subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="train, calibrate and monitor an MNIST model end to end (a couple of minutes)",
        description="The whole product on the embedded MNIST sample: train a small CNN, "
        "calibrate a Detector, wrap the model with Prometheus metrics and an SQLite label "
        "queue, stream in-distribution, rotated and noise traffic, and summarise.",
    )
    _add_arguments(parser)
    parser.set_defaults(handler=deferred_handler("oodmon.demo.walkthrough:run_demo"))
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``oodmon demo`` options to ``parser``."""
    parser.add_argument("--workdir", default="oodmon-demo", help="where outputs are written")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the trained model is cached (default: WORKDIR/cache)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port for /metrics on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep serving /metrics after the scenario, until Ctrl-C",
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=0.0,
        help="spread each phase over this many seconds, so a dashboard can show the phases "
        "(default 0: as fast as possible)",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="serving batch size")
    parser.add_argument("--alpha", type=float, default=0.05, help="target false-alarm rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="torchvision MNIST root, if present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
