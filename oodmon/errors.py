"""Exceptions that oodmon raises on purpose.

Every error a user can trigger with bad input is a ``ValueError`` (or a subclass) whose
message says what was expected, what came, and what to do.
"""

from __future__ import annotations

__all__ = ["FormatVersionError", "NotFittedError", "OodmonError", "OutputShapeError"]


class OodmonError(Exception):
    """Base class for oodmon's own errors."""


class NotFittedError(OodmonError, ValueError):
    """A fitted object was used before ``fit`` was called."""


class FormatVersionError(OodmonError, ValueError):
    """A saved file or database was written by an incompatible oodmon format version."""


class OutputShapeError(OodmonError, ValueError):
    """Model outputs that cannot be scored as a batch: not ``[N, K]``, or the wrong ``K``.

    Attributes:
        reason: ``"wrong_shape"`` or ``"wrong_width"`` (an invalid-row reason of the Monitor).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
