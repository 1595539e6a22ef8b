"""The Monitor's rolling flag rate: a ring buffer of the last N flags.

``stats().window_flag_rate`` must follow recent traffic without a per-sample loop on the
scoring path, so flags are written a batch at a time, as array slices.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FlagWindow"]


class FlagWindow:
    """Ring buffer of the last N flags, written a batch at a time (no per-sample loop)."""

    def __init__(self, size: int) -> None:
        self._flags = np.zeros(size, dtype=bool)
        self._next = 0
        self._filled = 0

    def extend(self, flags: np.ndarray) -> None:
        """Append a batch's flags (1-D bool), overwriting the oldest."""
        size = self._flags.size
        if flags.size >= size:
            self._flags[:] = flags[-size:]
            self._next, self._filled = 0, size
            return
        end = self._next + flags.size
        if end <= size:
            self._flags[self._next : end] = flags
        else:
            first = size - self._next
            self._flags[self._next :] = flags[:first]
            self._flags[: end - size] = flags[first:]
        self._next = end % size
        self._filled = min(self._filled + flags.size, size)

    def rate(self) -> tuple[int, float]:
        """``(flags held, their mean)``; ``(0, nan)`` before any flag."""
        if self._filled == 0:
            return 0, float("nan")
        view = self._flags if self._filled == self._flags.size else self._flags[: self._filled]
        return self._filled, float(view.mean())
