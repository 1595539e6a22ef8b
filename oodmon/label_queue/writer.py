"""QueueWriter: the Monitor's label-queue sink, writing flagged rows off the inference path.

``Monitor(..., queue=QueueWriter("labels.db"))`` hands the flagged rows of each batch to
:meth:`QueueWriter.submit`, which only appends them to a bounded in-memory buffer and
returns: it never blocks on the database and never raises. A background thread turns the
rows into :class:`~oodmon.label_queue.QueueItem` objects (moving inputs to the host there,
not on the caller's thread) and writes them in batches, one transaction per batch. When the
database is slow or unreachable the thread retries with exponential back-off while the
buffer absorbs new rows; once the buffer is full, new rows are dropped and counted
(``dropped``, returned to the Monitor, which exports it as a metric). ``close()`` flushes
within a deadline, and so does interpreter exit.

Processes: the writer is registered with :mod:`oodmon._lifecycle`, which closes it at
interpreter exit (after the Monitors that feed it) and resets it in a child after
``os.fork()`` (gunicorn ``--preload``): the child gets its own thread and an empty buffer,
and opens its own connection, since the parent's cannot be shared (see :class:`QueueWriter`).

Counters (all cumulative): ``dropped`` (refused by ``submit``: buffer full or closed),
``failed`` (accepted but never written: unconvertible input, or still unwritten at the
close deadline), ``committed_batches`` / ``committed_rows`` (written and committed),
``retries`` (failed write attempts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from oodmon._lifecycle import LogOnce, Stage, forget, track
from oodmon.label_queue.errors import QueueError
from oodmon.label_queue.item import AddResult, QueueItem, npy_bytes
from oodmon.label_queue.store import LabelQueue
from oodmon.label_queue.url import parse_url, scrub
from oodmon.sinks import DetectorSummary
from oodmon.verdict import Observation

__all__ = ["QueueWriter", "Writable", "observation_items"]

logger = logging.getLogger("oodmon")

#: Queues opened by a parent process and inherited by a forked child. The child never uses
#: them (a connection cannot be shared across processes) and never closes them either:
#: closing acts on the parent's connection (SQLite file handles; a PostgreSQL session's
#: socket). Kept referenced so that garbage collection does not close them in the child.
_INHERITED_QUEUES: list[object] = []

# The writer thread pauses this long every _YIELD_EVERY rows it converts (see _write).
_YIELD_EVERY = 32
_YIELD_SECONDS = 1e-4


class Writable(Protocol):
    """What the writer needs from a queue: :class:`~oodmon.label_queue.LabelQueue` has it."""

    def add(self, items: Sequence[QueueItem]) -> AddResult:
        """Store ``items`` in one transaction."""

    def close(self) -> None:
        """Release the connection."""


class QueueWriter:
    """A non-blocking :class:`~oodmon.sinks.QueueSink` that fills a :class:`LabelQueue`.

    Args:
        queue: a queue URL or path (opened, and re-opened after failures, on the writer
            thread), or an open queue object (used as is and left open by :meth:`close`).
        buffer_rows: rows held in memory while waiting for the database; beyond, new rows
            are dropped and counted. When a batch only partly fits, its most-OOD rows are kept.
        batch_rows: rows written per transaction at most.
        flush_interval: seconds a row may wait for a fuller batch before it is written.
        store_inputs: False keeps only references: a ``str`` input, else the row's id. The
            input, when given, is still hashed so duplicates are recognised.
        calibration: the detector's calibration hash, stored with every item (it ends up in
            Label Studio's ``model_version``). A Monitor fills it in through :meth:`describe`
            when it is not given.
        capacity: the queue's capacity, when the writer opens it from a URL.
        on_commit: called on the writer thread with the stored ids of each committed batch.
        retry_initial, retry_max: back-off bounds, in seconds, between failed writes.
        close_timeout: default seconds :meth:`close` spends flushing before giving up
            (interpreter exit included).

    After ``os.fork()`` the child's writer starts afresh: its own thread, an empty buffer
    (the parent's rows are the parent's to write) and zeroed counters. It never uses the
    parent's connection: a writer built from a URL drops it (unused and unclosed: closing
    would act on the parent's connection) and opens its own on the first write. A
    :class:`~oodmon.label_queue.LabelQueue` passed in is treated the same way: the child
    opens a new ``LabelQueue`` to the same location (same ``clock``; capacity as stored),
    owned and closed by the writer, and leaves the passed-in object alone. Any other queue
    object is used as it is, so it must itself be safe to use after a fork.

    Raises:
        ValueError: a bad URL or argument (checked here; the database is not touched here).
    """

    def __init__(
        self,
        queue: str | os.PathLike[str] | Writable,
        *,
        buffer_rows: int = 10_000,
        batch_rows: int = 256,
        flush_interval: float = 0.5,
        store_inputs: bool = True,
        calibration: str | None = None,
        capacity: int | None = None,
        on_commit: Callable[[list[str]], None] | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 10.0,
        close_timeout: float = 30.0,
    ) -> None:
        for name, value in (("buffer_rows", buffer_rows), ("batch_rows", batch_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        for name, number in (
            ("flush_interval", flush_interval),
            ("retry_initial", retry_initial),
            ("retry_max", retry_max),
            ("close_timeout", close_timeout),
        ):
            if not isinstance(number, (int, float)) or not number >= 0:
                raise ValueError(f"Expected `{name}` >= 0 seconds, but got {number!r}.")
        if isinstance(queue, (str, os.PathLike)):
            location = parse_url(queue)
            self.url = location.redacted
            self._secret_source = location.target
            self._factory: Callable[[], Writable] | None = lambda: LabelQueue(
                location.target, capacity=capacity
            )
            self._queue: Writable | None = None
        else:
            if not callable(getattr(queue, "add", None)):
                raise ValueError(
                    "Expected `queue` to be a URL, a path or a LabelQueue, but got "
                    f"{type(queue).__name__}."
                )
            if getattr(queue, "read_only", False):
                raise ValueError("Expected a writable label queue, but it was opened read-only.")
            self.url = str(getattr(queue, "url", type(queue).__name__))
            self._secret_source = ""
            self._factory = None
            self._queue = queue
        self.buffer_rows = buffer_rows
        self.batch_rows = batch_rows
        self.flush_interval = float(flush_interval)
        self.store_inputs = store_inputs
        self.calibration = calibration
        self.on_commit = on_commit
        self.retry_initial = float(retry_initial)
        self.retry_max = float(retry_max)
        self.close_timeout = float(close_timeout)
        self._log_once = LogOnce(logger, prefix=f"oodmon label-queue writer ({self.url}): ")
        self._reset_state()
        self._start()
        track(self, Stage.SINK)

    def _reset_state(self) -> None:
        """Fresh locks, buffer and counters (at start, and in a forked child)."""
        self._cond = threading.Condition(threading.Lock())
        self._stop = threading.Event()  # interrupts back-off sleeps on close
        self._buffer: deque[Observation] = deque()
        self._buffered = 0
        self._oldest = 0.0  # monotonic arrival time of the oldest buffered row
        self._inflight = 0
        self._flush_requests = 0
        self._closing = False
        self._closed = False
        self._deadline: float | None = None
        self._dropped = 0
        self._failed = 0
        self._committed_batches = 0
        self._committed_rows = 0
        self._retries = 0
        self._depth: int | None = None
        self._last_error: str | None = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oodmon-queue-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ QueueSink

    def describe(self, summary: DetectorSummary) -> None:
        """Learn the calibration hash of the Monitor's detector (called once by the Monitor)."""
        if self.calibration is None:
            self.calibration = summary.calibration_hash

    def submit(self, observation: Observation) -> int:
        """Buffer the rows of ``observation``; never blocks on I/O, never raises.

        Returns:
            How many rows were dropped (buffer full, or the writer closed).
        """
        try:
            n = len(observation)
            if n == 0:
                return 0
            with self._cond:
                room = 0 if self._closing else self.buffer_rows - self._buffered
                if room <= 0:
                    self._dropped += n
                    return n
                if n > room:
                    observation = _most_ood(observation, room)
                kept = len(observation)
                was_empty = self._buffered == 0
                if was_empty:
                    self._oldest = time.monotonic()
                self._buffer.append(observation)
                self._buffered += kept
                self._dropped += n - kept
                if was_empty or self._buffered >= self.batch_rows:
                    self._cond.notify_all()
                return n - kept
        except Exception as err:  # a sink must never break inference
            self._log_once("submit", f"submit failed ({type(err).__name__}: {err}).")
            try:
                n = len(observation)
            except Exception:
                n = 0
            with self._cond:
                self._dropped += n
            return n

    def depth(self) -> int | None:
        """Queued items in the database after the last committed batch (no I/O), or None."""
        return self._depth

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything buffered now. Returns False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flush_requests += 1
            self._cond.notify_all()
            try:
                while self._buffered or self._inflight:
                    if not self._thread.is_alive():
                        return False
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining if remaining is not None else 1.0)
                return True
            finally:
                self._flush_requests -= 1

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout`` seconds (default ``close_timeout``), then stop.

        Rows still unwritten at the deadline are counted in ``failed``. Idempotent.
        """
        wait = self.close_timeout if timeout is None else float(timeout)
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            self._deadline = time.monotonic() + wait
            self._cond.notify_all()
        self._stop.set()
        # a write already under way is not interrupted: allow it a moment beyond the deadline
        self._thread.join(wait + 5.0)
        if self._thread.is_alive():
            with self._cond:
                pending = self._buffered + self._inflight
            logger.warning(
                "oodmon label-queue writer (%s): still writing %.0f s after close(); "
                "leaving it to finish in the background (%d rows not written yet; they are "
                "lost if the process exits first).",
                self.url,
                wait + 5.0,
                pending,
            )
        forget(self)

    def _close_at_exit(self) -> None:
        """Interpreter exit: :meth:`close` within ``close_timeout``; losses are logged.

        Rows still unwritten at the deadline are counted in ``failed`` and logged with
        their number (buffered and in-flight rows alike).
        """
        self.close()

    def _reset_after_fork(self) -> None:
        """In a forked child: a new thread, locks and buffer; never the parent's connection."""
        was_closing = self._closing
        inherited = self._queue
        self._reset_state()
        self._log_once.reset()
        if isinstance(inherited, LabelQueue) and self._factory is None:
            # a LabelQueue passed in: the child opens its own to the same location
            location, clock = inherited.location, inherited.clock
            self._factory = lambda: LabelQueue(location.target, clock=clock)
            self._secret_source = location.target
        if self._factory is not None:  # open our own connection on the next write
            self._queue = None
            if inherited is not None:
                _INHERITED_QUEUES.append(inherited)
        if was_closing:  # closed (or closing) in the parent: closed here too, no thread
            self._closing = self._closed = True
            forget(self)
            return
        self._start()

    def __enter__(self) -> QueueWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QueueWriter({self.url!r}, buffered={self._buffered}, dropped={self._dropped})"

    # ------------------------------------------------------------------ counters

    @property
    def dropped(self) -> int:
        """Rows refused by :meth:`submit` (buffer full, or the writer closed)."""
        return self._dropped

    @property
    def failed(self) -> int:
        """Rows accepted but never written (unconvertible, or unwritten at the close deadline)."""
        return self._failed

    @property
    def committed_batches(self) -> int:
        """Transactions committed."""
        return self._committed_batches

    @property
    def committed_rows(self) -> int:
        """Rows committed (merged duplicates count; rows a full queue rejected do not)."""
        return self._committed_rows

    @property
    def retries(self) -> int:
        """Failed write attempts."""
        return self._retries

    @property
    def buffered(self) -> int:
        """Rows waiting in memory now."""
        return self._buffered

    @property
    def last_error(self) -> str | None:
        """The latest write error, password-free, or None once a batch was committed."""
        return self._last_error

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    chunk = self._next_chunk()
                if chunk is None:
                    return
                try:
                    self._write(chunk)
                except Exception as err:  # last resort: the thread must not die
                    self._log_once(
                        "writer",
                        f"writer thread error ({type(err).__name__}: {err}).",
                        exc_info=err,
                    )
                    with self._cond:
                        self._failed += sum(len(o) for o in chunk)
                finally:
                    with self._cond:
                        self._inflight = 0
                        self._cond.notify_all()
        finally:
            self._drop_queue()

    def _next_chunk(self) -> list[Observation] | None:
        """Wait (holding ``_cond``) until a batch is due; take it. None means stop."""
        while True:
            now = time.monotonic()
            if self._closing and self._deadline is not None and now >= self._deadline:
                if self._buffered:
                    self._abandon_buffer("close() deadline passed")
                return None
            if self._buffered == 0:
                if self._closing:
                    return None
                self._cond.wait()
                continue
            due = self._oldest + self.flush_interval
            if (
                self._buffered >= self.batch_rows
                or self._closing
                or self._flush_requests
                or now >= due
            ):
                break
            self._cond.wait(due - now)
        chunk: list[Observation] = []
        need = self.batch_rows
        while need and self._buffer:
            head = self._buffer[0]
            if len(head) <= need:
                chunk.append(self._buffer.popleft())
                need -= len(head)
            else:
                chunk.append(head.take(np.arange(need)))
                self._buffer[0] = head.take(np.arange(need, len(head)))
                need = 0
        taken = self.batch_rows - need
        self._buffered -= taken
        self._inflight = taken
        return chunk

    def _abandon_buffer(self, why: str, in_flight: int = 0) -> None:
        """Give up on every buffered row, and on ``in_flight`` rows taken from the buffer.

        Holds ``_cond``. Counts them all in ``failed`` and logs how many were not written.
        """
        lost = self._buffered + in_flight
        self._buffer.clear()
        self._buffered = 0
        self._failed += lost
        logger.warning(
            "oodmon label-queue writer (%s): %d rows not written: %s.", self.url, lost, why
        )

    def _write(self, chunk: list[Observation]) -> None:
        items: list[QueueItem] = []
        bad = 0
        for observation in chunk:
            try:
                for item in _iter_items(
                    observation, store_inputs=self.store_inputs, calibration=self.calibration
                ):
                    if item is None:
                        bad += 1
                    else:
                        items.append(item)
                    if (len(items) + bad) % _YIELD_EVERY == 0:
                        # Python work here holds the GIL; an inference thread that released it
                        # (any torch op) would wait up to the 5 ms switch interval to get it
                        # back. A short sleep hands it over at once.
                        time.sleep(_YIELD_SECONDS)
            except (ValueError, TypeError):
                bad += len(observation)
        if bad:
            with self._cond:
                self._failed += bad
            self._log_once(
                "convert",
                f"{bad} flagged rows could not be turned into queue "
                "items (unsupported input or evidence); they are counted in `failed`.",
            )
        delay = self.retry_initial
        while items:
            try:
                queue = self._open_queue()
                result = queue.add(items)
            except Exception as err:
                message = self._describe(err)
                self._drop_queue()
                with self._cond:
                    self._retries += 1
                    self._last_error = message
                    deadline = self._deadline
                    if self._closing and deadline is not None and time.monotonic() >= deadline:
                        self._abandon_buffer(
                            f"the database failed until the close() deadline ({message})",
                            in_flight=len(items),
                        )
                        return
                self._log_once(
                    f"write:{type(err).__name__}",
                    f"writing a batch failed ({message}); retrying with back-off, "
                    f"rows are buffered (up to {self.buffer_rows}) and dropped beyond.",
                    exc_info=None if isinstance(err, QueueError) else err,
                )
                pause = delay
                if deadline is not None:
                    pause = min(pause, max(deadline - time.monotonic(), 0.0))
                self._stop.wait(pause)
                delay = min(max(delay * 2, 1e-3), self.retry_max)
                continue
            stored = [i for i in result.ids if i is not None]
            with self._cond:
                if self._last_error is not None:
                    logger.info(
                        "oodmon label-queue writer (%s): writing again after %s.",
                        self.url,
                        self._last_error,
                    )
                self._committed_batches += 1
                self._committed_rows += len(stored)
                self._depth = result.depth
                self._last_error = None
            if self.on_commit is not None:
                try:
                    self.on_commit(stored)
                except Exception as err:
                    self._log_once(
                        "on_commit",
                        f"on_commit failed ({type(err).__name__}: {err}).",
                        exc_info=err,
                    )
            return

    def _open_queue(self) -> Writable:
        if self._queue is None:
            if self._factory is None:  # pragma: no cover - _queue is set when not owned
                raise QueueError("The writer has no queue to write to.")
            self._queue = self._factory()
        return self._queue

    def _drop_queue(self) -> None:
        """Close a queue this writer opened (it is re-opened on the next attempt)."""
        if self._factory is not None and self._queue is not None:
            queue, self._queue = self._queue, None
            with contextlib.suppress(Exception):
                queue.close()

    def _describe(self, err: Exception) -> str:
        text = f"{type(err).__name__}: {err}"
        return scrub(text, self._secret_source) if self._secret_source else text


def observation_items(
    observation: Observation, *, store_inputs: bool = True, calibration: str | None = None
) -> tuple[list[QueueItem], int]:
    """Queue items for every row of an Observation (inputs moved to the host here).

    Args:
        observation: flagged rows as the Monitor hands them over.
        store_inputs: False keeps only references (a ``str`` input, else the row's id).
        calibration: calibration hash stored with each item.

    Returns:
        The items, and how many rows could not be converted (skipped).

    Raises:
        ValueError: the inputs or ids do not have one entry per row.
    """
    items = list(_iter_items(observation, store_inputs=store_inputs, calibration=calibration))
    good = [item for item in items if item is not None]
    return good, len(items) - len(good)


def _iter_items(
    observation: Observation, *, store_inputs: bool, calibration: str | None
) -> Iterator[QueueItem | None]:
    """One item per row, or None for a row that cannot be stored."""
    n = len(observation)
    verdict = observation.verdict
    rows = _input_rows(observation.inputs, n)
    ids = observation.ids
    if ids is not None and len(ids) != n:
        raise ValueError(f"Expected {n} ids (one per row), but got {len(ids)}.")
    # rows of one array share their .npy header: encode it once (same bytes as np.save)
    header = None
    if isinstance(rows, np.ndarray) and rows.dtype.kind in "biufc" and n:
        first = np.ascontiguousarray(rows[0])
        header = npy_bytes(first)[: -first.nbytes or None]
    for i in range(n):
        item_id = None if ids is None or ids[i] is None else str(ids[i])
        value = rows[i]
        reference = None
        npy = None
        if isinstance(value, str):
            reference, value = value, None
        elif header is not None:
            npy, value = header + np.ascontiguousarray(value).tobytes(), None
        if not store_inputs and reference is None:
            reference = item_id
        try:
            yield QueueItem.create(
                model=observation.model,
                version=observation.version,
                p_value=float(verdict.p_value[i]),
                distance=float(verdict.distance[i]),
                score=float(verdict.score[i]),
                predicted=int(verdict.predicted[i]),
                input=value,
                input_npy=npy,
                reference=reference,
                store_input=store_inputs,
                id=item_id,
                timestamp=observation.timestamp,
                calibration=calibration,
            )
        except (ValueError, TypeError):
            yield None


def _input_rows(inputs: Any, n: int) -> Sequence[Any]:
    if inputs is None:
        return [None] * n
    if isinstance(inputs, torch.Tensor):
        t = inputs.detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.to(torch.float32)
        inputs = t.cpu().numpy()  # the one device-to-host copy, on the writer thread
    if isinstance(inputs, np.ndarray) and inputs.ndim == 0:
        raise ValueError("Expected one input per row, but got a 0-d array.")
    if len(inputs) != n:
        raise ValueError(f"Expected {n} inputs (one per row), but got {len(inputs)}.")
    return inputs


def _most_ood(observation: Observation, keep: int) -> Observation:
    """The ``keep`` most-OOD rows (smallest p-value, then distance), in their original order."""
    verdict = observation.verdict
    order = np.lexsort((verdict.distance, verdict.p_value))[:keep]
    return observation.take(np.sort(order))
