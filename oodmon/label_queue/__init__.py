"""The label queue: flagged inputs waiting for a human label, most OOD first.

A :class:`LabelQueue` stores items durably (SQLite file or PostgreSQL) with dedupe,
capacity and claims; a :class:`QueueWriter` fills one from a Monitor, off the inference
path; :func:`export_queue` writes Label Studio tasks or JSON Lines. The modules, bottom up:

- ``errors``: the error hierarchy; ``url``: locations and password redaction;
  ``item``: the stored values; ``_sql``: schema and SQL text;
- ``sqlite``, ``postgres``: the two backends; ``_admit``: dedupe, capacity and eviction;
- ``store``: :class:`LabelQueue`;
- ``export``: Label Studio and JSON Lines;
- ``writer``: :class:`QueueWriter`, with ``_items`` (rows -> items), ``_delivery`` (retries,
  bisection of refused batches) and ``_ledger`` (where every row went).
"""

from typing import TYPE_CHECKING

from oodmon._lazy_exports import lazy_exports
from oodmon.label_queue.errors import (
    ItemNotFoundError,
    ItemRejectedError,
    LeaseError,
    NotAQueueError,
    QueueError,
    QueueUnavailableError,
    ReadOnlyQueueError,
    SchemaVersionError,
)
from oodmon.label_queue.export import FORMATS, export_queue, write_items
from oodmon.label_queue.item import (
    STATUSES,
    AddResult,
    QueueItem,
    QueueStats,
    finite_or_none,
    format_utc,
    npy_bytes,
)
from oodmon.label_queue.store import DEFAULT_CAPACITY, SCHEMA_VERSION, LabelQueue
from oodmon.label_queue.url import redact_url

if TYPE_CHECKING:
    from oodmon.label_queue.writer import QueueWriter, observation_items

# The writer serves a Monitor and imports torch; the queue commands never need it.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"QueueWriter": "oodmon.label_queue.writer", "observation_items": "oodmon.label_queue.writer"},
    globals(),
)

__all__ = [
    "DEFAULT_CAPACITY",
    "FORMATS",
    "SCHEMA_VERSION",
    "STATUSES",
    "AddResult",
    "ItemNotFoundError",
    "ItemRejectedError",
    "LabelQueue",
    "LeaseError",
    "NotAQueueError",
    "QueueError",
    "QueueItem",
    "QueueStats",
    "QueueUnavailableError",
    "QueueWriter",
    "ReadOnlyQueueError",
    "SchemaVersionError",
    "export_queue",
    "finite_or_none",
    "format_utc",
    "npy_bytes",
    "observation_items",
    "redact_url",
    "write_items",
]
