"""How a batch reaches the store: the writer's connection, retries, and poison-row bisection.

Two kinds of failure need opposite answers. A store that fails on its own (unreachable,
busy, locked, read-only) gets the same batch again, after a jittered back-off, on a fresh
connection. A store that refuses a batch for its *values* will refuse it forever, so the
batch is split in halves until the rows it can never accept are alone, and only those are
given up. :func:`deliver` runs that loop; :class:`StoreConnection` is the connection it
opens, drops after a failure, and never shares with a forked child.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from oodmon._printable import printable
from oodmon.label_queue.errors import ItemRejectedError, QueueError
from oodmon.label_queue.item import AddResult, QueueItem
from oodmon.label_queue.store import LabelQueue
from oodmon.label_queue.url import QueueURL, parse_url, scrub

__all__ = ["StoreConnection", "Writable", "back_off", "deliver", "is_rejection"]

#: Queues opened by a parent process and inherited by a forked child. The child never uses
#: them (a connection cannot be shared across processes) and never closes them either:
#: closing acts on the parent's connection (SQLite file handles; a PostgreSQL session's
#: socket). Kept referenced so that garbage collection does not close them in the child.
_INHERITED_QUEUES: list[object] = []


class Writable(Protocol):
    """What the writer needs from a queue: :class:`~oodmon.label_queue.LabelQueue` has it."""

    def add(self, items: Sequence[QueueItem]) -> AddResult:
        """Store ``items`` in one transaction."""

    def close(self) -> None:
        """Release the connection."""


class StoreConnection:
    """The queue a writer writes to: opened lazily, re-opened after failures, fork-aware.

    Args:
        queue: a queue URL or path (opened on first use, and re-opened after each failure),
            or an open queue object (used as is and never closed here).
        capacity: the queue's capacity, when it is opened from a URL.

    Raises:
        ValueError: a bad URL, a read-only or non-queue object, or an SQLite path whose
            directory does not exist (the database itself is not touched here).
    """

    def __init__(self, queue: str | os.PathLike[str] | Writable, *, capacity: int | None) -> None:
        self._queue: Writable | None
        self._factory: Callable[[], Writable] | None
        if isinstance(queue, (str, os.PathLike)):
            location = parse_url(queue)
            _check_directory(location)
            self.url = location.redacted
            self._secret = location.target
            self._factory = lambda: LabelQueue(location.target, capacity=capacity)
            self._queue = None
        else:
            if not callable(getattr(queue, "add", None)):
                raise ValueError(
                    "Expected `queue` to be a URL, a path or a LabelQueue, but got "
                    f"{type(queue).__name__}."
                )
            if getattr(queue, "read_only", False):
                raise ValueError("Expected a writable label queue, but it was opened read-only.")
            self.url = printable(getattr(queue, "url", type(queue).__name__))
            self._secret = ""
            self._factory = None
            self._queue = queue

    def open(self) -> Writable:
        """The queue, opened now if it is not open.

        Raises:
            Exception: whatever opening the store raises (always the store's own failure).
        """
        if self._queue is None:
            if self._factory is None:  # pragma: no cover - _queue is set when not owned
                raise QueueError("The writer has no queue to write to.")
            self._queue = self._factory()
        return self._queue

    def drop(self) -> None:
        """Close a queue opened here (it is re-opened on the next attempt); never raises."""
        if self._factory is not None and self._queue is not None:
            queue, self._queue = self._queue, None
            with contextlib.suppress(Exception):
                queue.close()

    def describe(self, err: Exception) -> str:
        """``err`` as one printable line, without the store's password."""
        text = f"{type(err).__name__}: {printable(err)}"
        return scrub(text, self._secret) if self._secret else text

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connection, open our own on next use.

        A :class:`~oodmon.label_queue.LabelQueue` passed in is replaced by a new one to the
        same location (same ``clock``; capacity as stored), owned from now on; the passed-in
        object is left alone. Any other queue object is kept: it must be fork-safe itself.
        """
        inherited = self._queue
        if isinstance(inherited, LabelQueue) and self._factory is None:
            location, clock = inherited.location, inherited.clock
            self._factory = lambda: LabelQueue(location.target, clock=clock)
            self._secret = location.target
        if self._factory is not None:
            self._queue = None
            if inherited is not None:
                _INHERITED_QUEUES.append(inherited)


def deliver(
    items: list[QueueItem],
    connection: StoreConnection,
    *,
    committed: Callable[[list[QueueItem], AddResult], None],
    rejected: Callable[[QueueItem, Exception], None],
    failed: Callable[[Exception, Sequence[Sequence[QueueItem]]], bool],
    back_off: Callable[[float], None],
    retry_initial: float,
    retry_max: float,
) -> None:
    """Write ``items`` until each is committed or rejected, or ``failed`` says give up.

    Args:
        items: the rows of one batch, written in one transaction when the store takes them.
        connection: where to write; dropped after each failure of the store's own.
        committed: told each part the store committed, with its result.
        rejected: told each row the store refuses alone (it is not retried).
        failed: told each failure of the store's own, with the parts still pending;
            True gives them all up (the caller counts them) and ends the delivery.
        back_off: pauses up to the given seconds before the next attempt.
        retry_initial: the first back-off bound, in seconds; it doubles after each
            failure and starts over after a commit.
        retry_max: the largest back-off bound, in seconds.
    """
    pending: deque[list[QueueItem]] = deque([items] if items else [])
    delay = retry_initial
    while pending:
        part = pending[0]
        queue: Writable | None = None
        try:
            queue = connection.open()
            result = queue.add(part)
        except Exception as err:
            # opening fails for the store's reasons, never for a row's
            if queue is not None and is_rejection(err):
                pending.popleft()
                if len(part) == 1:
                    rejected(part[0], err)
                else:  # isolate the rows the store refuses: split, try each half
                    middle = len(part) // 2
                    pending.appendleft(part[middle:])
                    pending.appendleft(part[:middle])
                continue
            connection.drop()
            if failed(err, pending):
                return
            back_off(delay)
            delay = min(max(delay * 2, 1e-3), retry_max)
            continue
        pending.popleft()
        delay = retry_initial
        committed(part, result)


def back_off(delay: float, wake: threading.Event, deadline: float | None) -> None:
    """Pause between half ``delay`` and ``delay`` seconds, never past ``deadline``.

    The pause is drawn at random so that replicas do not retry a recovering server in
    lockstep. ``wake`` cuts it short (once: it is cleared), so that ``close()`` gets an
    attempt at once rather than at the end of a long pause.
    """
    pause = random.uniform(delay / 2, delay)
    if deadline is not None:
        pause = min(pause, max(deadline - time.monotonic(), 0.0))
    if wake.wait(pause):
        wake.clear()


def is_rejection(err: Exception) -> bool:
    """Does ``err`` say the store refuses these values (rather than failing on its own)?"""
    if isinstance(err, ItemRejectedError):
        return True
    return isinstance(err, (ValueError, TypeError, OverflowError)) and not isinstance(
        err, QueueError
    )


def _check_directory(location: QueueURL) -> None:
    """Fail fast on an SQLite path that cannot be created: its directory is missing."""
    if location.backend != "sqlite" or location.target == ":memory:":
        return
    directory = Path(location.target).parent
    if not directory.is_dir():
        raise ValueError(
            f"Expected the directory of the label queue {printable(location.redacted)} to "
            f"exist, but {printable(directory)} does not: create it first, or choose another "
            "path."
        )
