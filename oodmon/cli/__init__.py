"""The ``oodmon`` command line: one module per command group.

- ``main``: the parser, :func:`main` (the console script), and the detector commands
  ``calibrate``, ``score``, ``inspect`` and ``demo``;
- ``queue``: ``oodmon queue ls|stats|export|claim|done|release``;
- ``sidecar``: ``oodmon sidecar``, the CloudEvents receiver for model servers' payload logs;
- ``consume``: ``oodmon consume``, the Kafka consumer-group scorer of payload logs.
"""

from oodmon.cli.main import main

__all__ = ["main"]
