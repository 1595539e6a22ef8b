"""The ``oodmon`` console script's entry point, outside the ``oodmon`` package.

Importing anything under ``oodmon`` imports torch first (seconds). A Ctrl-C in those seconds
raised ``KeyboardInterrupt`` in the console script's own import line, which Python reports
with a traceback. This module imports nothing heavy, so it can catch that interrupt and end
with one line and exit code 130, like an interrupt at any later point.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Import the command line (and torch) and run it; exit 130 on Ctrl-C during imports."""
    try:
        from oodmon.cli.main import main as run
    except KeyboardInterrupt:
        print("oodmon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run(argv)
