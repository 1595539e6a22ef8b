"""The ``oodmon`` command line. Placeholder until the CLI issue lands."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("oodmon: CLI not built yet", file=sys.stderr)
    return 2
