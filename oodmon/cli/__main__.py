"""``python -m oodmon.cli``: the same as the ``oodmon`` console script."""

import sys

from oodmon.cli.main import main

sys.exit(main())
