"""Every error the label queue raises on purpose, in one hierarchy under :class:`QueueError`.

Each class also derives from the builtin a caller would naturally catch: a missing item is a
``LookupError``, an unreachable server a ``ConnectionError``, a write to a read-only queue a
``PermissionError``; bad input stays a ``ValueError`` (the CLI maps those to exit code 2).
"""

from __future__ import annotations

from oodmon.errors import FormatVersionError, OodmonError

__all__ = [
    "ItemNotFoundError",
    "ItemRejectedError",
    "LeaseError",
    "NotAQueueError",
    "QueueError",
    "QueueUnavailableError",
    "ReadOnlyQueueError",
    "SchemaVersionError",
]


class QueueError(OodmonError):
    """Base class for label-queue errors."""


class SchemaVersionError(QueueError, FormatVersionError):
    """The database was written with another label-queue schema version."""


class QueueUnavailableError(QueueError, ConnectionError):
    """The database could not be reached or is busy (a runtime failure, worth retrying)."""


class ItemRejectedError(QueueError, ValueError):
    """The store refused an item's values (a string it cannot encode, a number out of range).

    Retrying cannot help: the same values fail the same way. A
    :class:`~oodmon.label_queue.QueueWriter` isolates such items and drops them, counted.
    """


class ReadOnlyQueueError(QueueError, PermissionError):
    """A write was attempted on a queue opened with ``read_only=True``."""


class NotAQueueError(QueueError, ValueError):
    """The database exists but is not an oodmon label queue (or not a database at all)."""


class ItemNotFoundError(QueueError, ValueError, LookupError):
    """No item with this id (a ValueError too: the caller named it)."""


class LeaseError(QueueError, ValueError):
    """Another worker holds a live lease on the item, or the item is already labelled."""
