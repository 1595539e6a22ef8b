"""The face a new user meets first: ``oodmon demo`` and the MNIST test bed behind it.

* :mod:`oodmon.demo.walkthrough`: the ``oodmon demo`` command, end to end on real digits.
* :mod:`oodmon.demo.mnist`: digits, rotations and a small CNN, shared with the experiments
  and the benchmarks.
"""

from oodmon.demo.walkthrough import run_demo

__all__ = ["run_demo"]
