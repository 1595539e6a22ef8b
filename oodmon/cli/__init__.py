"""The ``oodmon`` command line: one module per command group.

- ``main``: the parser and :func:`main` (the console script). A command's module is imported
  only when the command runs (``_lazy``), so ``--version``, ``--help`` and the queue commands
  never import torch;
- ``model``: ``calibrate``, ``score`` and ``inspect`` (detector files and saved outputs);
- ``queue``: ``oodmon queue ls|stats|export|claim|done|release|push|pull``;
- ``sidecar``: ``oodmon sidecar``, the CloudEvents receiver for model servers' payload logs;
- ``consume``: ``oodmon consume``, the Kafka consumer-group scorer of payload logs;
- ``demo``: the options of ``oodmon demo`` (the walkthrough lives in :mod:`oodmon.demo`).
"""

from oodmon.cli.main import main

__all__ = ["main"]
