"""QueueWriter: the Monitor's label-queue sink, writing flagged rows off the inference path.

``Monitor(..., queue=QueueWriter("labels.db"))`` hands the flagged rows of each batch to
:meth:`QueueWriter.submit`, which only appends them to a bounded in-memory buffer and
returns: it never blocks on the database and never raises. A background thread turns the
rows into :class:`~oodmon.label_queue.QueueItem` objects (moving inputs to the host there,
not on the caller's thread) and writes them in batches, one transaction per batch. When the
database is slow or unreachable the thread retries with jittered exponential back-off while
the buffer absorbs new rows; once the buffer is full, new rows are dropped and counted
(``dropped``, returned to the Monitor, which exports it as a metric). Rows the store can
never accept are isolated by splitting the failing batch, dropped and counted, so that they
never hold back the rows after them. ``close()`` flushes within a deadline, and so does
interpreter exit.

Processes: the writer is registered with :mod:`oodmon._lifecycle`, which closes it at
interpreter exit (after the Monitors that feed it) and resets it in a child after
``os.fork()`` (gunicorn ``--preload``): the child gets its own thread and an empty buffer,
and opens its own connection, since the parent's cannot be shared (see :class:`QueueWriter`).

Counters (all cumulative): ``dropped`` (refused by ``submit``: buffer full or closed),
``failed`` (accepted but never written: unconvertible input, or still unwritten at the
close deadline), ``lost`` (both of those, by reason: see
:data:`~oodmon.sinks.QUEUE_LOSS_REASONS`), ``committed_batches`` / ``committed_rows``
(written and committed), ``retries`` (failed write attempts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from oodmon._lifecycle import LogOnce, Stage, forget, track
from oodmon._printable import printable
from oodmon.label_queue.errors import ItemRejectedError, QueueError
from oodmon.label_queue.item import AddResult, QueueItem, npy_bytes
from oodmon.label_queue.store import LabelQueue
from oodmon.label_queue.url import QueueURL, parse_url, scrub
from oodmon.sinks import QUEUE_LOSS_REASONS, DetectorSummary, MetricsSink
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
        retry_initial, retry_max: back-off bounds, in seconds, between failed writes. Every
            pause is drawn at random between half the current bound and the bound (so that
            replicas do not retry a recovering server in lockstep), also while :meth:`close`
            waits.
        close_timeout: default seconds :meth:`close` spends flushing before giving up
            (interpreter exit included).
        metrics: a :class:`~oodmon.sinks.MetricsSink` told the queue depth after every commit
            and every row lost on the writer thread, with its reason (see
            :data:`~oodmon.sinks.QUEUE_LOSS_REASONS`). Rows :meth:`submit` refuses are its
            caller's to report (the Monitor does). Also settable with :meth:`bind_metrics`.

    Failures: a batch the store fails to write for a reason of its own (unreachable, busy,
    locked, read-only) is retried whole, with back-off. A batch the store refuses for its
    *values* (:class:`~oodmon.label_queue.ItemRejectedError`, or a ``ValueError`` /
    ``TypeError`` / ``OverflowError`` from a custom queue) is split in halves until the rows
    it can never accept are alone; those are dropped, counted (``lost["rejected"]``) and
    logged once, and every other row is written.

    After ``os.fork()`` the child's writer starts afresh: its own thread, an empty buffer
    (the parent's rows are the parent's to write) and zeroed counters. It never uses the
    parent's connection: a writer built from a URL drops it (unused and unclosed: closing
    would act on the parent's connection) and opens its own on the first write. A
    :class:`~oodmon.label_queue.LabelQueue` passed in is treated the same way: the child
    opens a new ``LabelQueue`` to the same location (same ``clock``; capacity as stored),
    owned and closed by the writer, and leaves the passed-in object alone. Any other queue
    object is used as it is, so it must itself be safe to use after a fork.

    Raises:
        ValueError: a bad URL or argument, or an SQLite path whose directory does not exist
            (checked here; the database itself is not touched here).
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
        metrics: MetricsSink | None = None,
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
        _check_metrics(metrics)
        if isinstance(queue, (str, os.PathLike)):
            location = parse_url(queue)
            _check_directory(location)
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
            self.url = printable(getattr(queue, "url", type(queue).__name__))
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
        self._metrics = metrics
        self._log_once = LogOnce(logger, prefix=f"oodmon label-queue writer ({self.url}): ")
        self._reset_state()
        self._start()
        track(self, Stage.SINK)

    def _reset_state(self) -> None:
        """Fresh locks, buffer and counters (at start, and in a forked child)."""
        self._cond = threading.Condition(threading.Lock())
        self._wake = threading.Event()  # cuts a back-off pause short once, when close() starts
        self._buffer: deque[Observation] = deque()
        self._buffered = 0
        self._oldest = 0.0  # monotonic arrival time of the oldest buffered row
        self._inflight = 0  # rows taken from the buffer and not yet committed nor lost
        self._flush_requests = 0
        self._closing = False
        self._closed = False
        self._deadline: float | None = None
        self._dropped = 0
        self._failed = 0
        self._lost = dict.fromkeys(QUEUE_LOSS_REASONS, 0)
        self._committed_batches = 0
        self._committed_rows = 0
        self._retries = 0
        self._depth: int | None = None
        self._last_error: str | None = None
        self._store_failing = False  # the latest attempt failed for the store's own reasons
        self._models: set[tuple[str, str]] = set()  # (model, version) pairs seen
        self._reports: list[tuple[str, str, int | None, int, str]] = []  # for the metrics sink

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oodmon-queue-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ QueueSink

    def describe(self, summary: DetectorSummary) -> None:
        """Learn the calibration hash of the Monitor's detector (called once by the Monitor)."""
        if self.calibration is None:
            self.calibration = summary.calibration_hash
        with self._cond:
            self._models.add((summary.model, summary.version))

    def bind_metrics(self, metrics: MetricsSink | None) -> None:
        """Report depth and losses to ``metrics`` from now on (see the ``metrics`` argument)."""
        _check_metrics(metrics)
        self._metrics = metrics

    def submit(self, observation: Observation) -> int:
        """Buffer the rows of ``observation``; never blocks on I/O, never raises.

        Returns:
            How many rows were dropped (buffer full, or the writer closed); the caller
            reports them (the Monitor counts them under ``buffer_full``).
        """
        try:
            n = len(observation)
            if n == 0:
                return 0
            key = (observation.model, observation.version)
            with self._cond:
                if key not in self._models:
                    self._models.add(key)
                if self._closing:
                    self._dropped += n
                    self._lost["closed"] += n
                    return n
                room = self.buffer_rows - self._buffered
                if room <= 0:
                    self._dropped += n
                    self._lost["buffer_full"] += n
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
                self._lost["buffer_full"] += n - kept
                if was_empty or self._buffered >= self.batch_rows:
                    self._cond.notify_all()
                return n - kept
        except Exception as err:  # a sink must never break inference
            self._log_once("submit", f"submit failed ({type(err).__name__}: {printable(err)}).")
            try:
                n = len(observation)
            except Exception:
                n = 0
            with self._cond:
                self._dropped += n
                self._lost["rejected"] += n
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

        Rows still unwritten at the deadline are counted in ``failed`` (and ``lost``) and
        logged with their number. Idempotent.
        """
        self._close(timeout, exiting=False)

    def _close(self, timeout: float | None, *, exiting: bool) -> None:
        wait = self.close_timeout if timeout is None else float(timeout)
        with self._cond:
            first = not self._closed
            if first:
                self._closed = True
                self._closing = True
                self._deadline = time.monotonic() + wait
                self._cond.notify_all()
            else:
                deadline = self._deadline if self._deadline is not None else time.monotonic()
                wait = max(deadline - time.monotonic(), 0.0)
        if first:
            self._wake.set()  # one attempt now rather than at the end of a long pause
        # a write already under way is not interrupted: allow it a moment beyond the deadline
        self._thread.join(wait + 5.0)
        if self._thread.is_alive():
            if exiting:
                self._give_up_at_exit()
            elif first:
                with self._cond:
                    pending = self._buffered + self._inflight
                logger.warning(
                    "oodmon label-queue writer (%s): still writing %.0f s after close(); "
                    "leaving it to finish in the background (%d rows not yet written; they "
                    "are lost, and logged, if the process exits first).",
                    self.url,
                    wait + 5.0,
                    pending,
                )
                return  # still tracked: interpreter exit counts what is left
        self._send_reports()
        forget(self)

    def _close_at_exit(self) -> None:
        """Interpreter exit: :meth:`close` within ``close_timeout``; losses are logged.

        Rows still unwritten when the process exits (buffered, or in a batch whose write has
        not returned) are counted in ``failed`` and logged with their number, once.
        """
        self._close(None, exiting=True)

    def _give_up_at_exit(self) -> None:
        """The process exits while a write has not returned: what it holds is lost."""
        with self._cond:
            if self._closing and not self._thread.is_alive():
                return
            counts = self._count_models(self._buffer)
            lost = self._buffered + self._inflight
            if self._inflight:
                counts[("", "")] = counts.get(("", ""), 0) + self._inflight
            self._buffer.clear()
            self._buffered = self._inflight = 0
            reason = "store_error" if self._store_failing else "closed"
            self._account_loss(reason, counts)
        logger.warning(
            "oodmon label-queue writer (%s): %d rows not written: the process exits while "
            "a write to the store has not returned%s.",
            self.url,
            lost,
            f" ({self._last_error})" if self._store_failing and self._last_error else "",
        )
        self._send_reports()

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
        """Rows accepted but never written.

        Rejected by the store, unconvertible, or unwritten at the close deadline or exit.
        """
        return self._failed

    @property
    def lost(self) -> dict[str, int]:
        """Every row that did not reach the store, by reason (``dropped + failed`` in all)."""
        with self._cond:
            return dict(self._lost)

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
        """Failed write attempts (the store's failures; not the rejected rows' bisection)."""
        return self._retries

    @property
    def buffered(self) -> int:
        """Rows waiting in memory now."""
        return self._buffered

    @property
    def last_error(self) -> str | None:
        """The latest write error or rejected row, password-free and printable.

        A store error is cleared once a batch is committed again; a rejection stays until
        a newer error replaces it.
        """
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
                        f"writer thread error ({type(err).__name__}: {printable(err)}).",
                        exc_info=err,
                    )
                    with self._cond:
                        self._account_loss("store_error", {("", ""): self._inflight})
                finally:
                    with self._cond:
                        self._inflight = 0
                        self._cond.notify_all()
                    self._send_reports()
        finally:
            self._send_reports()
            self._drop_queue()

    def _next_chunk(self) -> list[Observation] | None:
        """Wait (holding ``_cond``) until a batch is due; take it. None means stop."""
        while True:
            now = time.monotonic()
            if self._closing and self._deadline is not None and now >= self._deadline:
                if self._buffered:
                    self._abandon([], "the close() deadline passed")
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

    def _abandon(self, pending: Sequence[Sequence[QueueItem]], why: str) -> None:
        """Give up on every buffered row and on the ``pending`` items (holds ``_cond``).

        Counts them in ``failed`` and ``lost`` (``store_error`` while the store is failing,
        else ``closed``) and logs how many were not written, in one line.
        """
        counts = self._count_models(self._buffer)
        for part in pending:
            for item in part:
                key = (item.model, item.model_version)
                counts[key] = counts.get(key, 0) + 1
        lost = self._buffered + sum(len(part) for part in pending)
        self._buffer.clear()
        self._buffered = 0
        self._inflight = 0
        reason = "store_error" if self._store_failing else "closed"
        self._account_loss(reason, counts)
        logger.warning(
            "oodmon label-queue writer (%s): %d rows not written: %s.", self.url, lost, why
        )

    def _account_loss(self, reason: str, counts: dict[tuple[str, str], int]) -> None:
        """Count rows accepted and then lost (holds ``_cond``); queue their metric reports."""
        for (model, version), n in counts.items():
            if n <= 0:
                continue
            self._failed += n
            self._lost[reason] += n
            if model or version:
                self._reports.append((model, version, None, n, reason))
            else:  # rows whose model is no longer known: the writer's only model, if one
                key = next(iter(self._models)) if len(self._models) == 1 else ("", "")
                if key != ("", ""):
                    self._reports.append((*key, None, n, reason))

    @staticmethod
    def _count_models(observations: Iterable[Observation]) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for observation in observations:
            key = (observation.model, observation.version)
            counts[key] = counts.get(key, 0) + len(observation)
        return counts

    def _send_reports(self) -> None:
        """Hand queued depth and loss reports to the metrics sink (outside the lock)."""
        with self._cond:
            reports, self._reports = self._reports, []
        metrics = self._metrics
        if metrics is None or not reports:
            return
        for model, version, depth, dropped, reason in reports:
            try:
                if dropped:
                    metrics.record_queue(model, version, depth, dropped, reason=reason)
                else:
                    metrics.record_queue(model, version, depth, 0)
            except Exception as err:
                self._log_once(
                    "metrics",
                    f"the metrics sink failed ({type(err).__name__}: {printable(err)}).",
                )

    def _write(self, chunk: list[Observation]) -> None:
        items = self._convert(chunk)
        with self._cond:
            self._inflight = len(items)
        pending: deque[list[QueueItem]] = deque([items] if items else [])
        delay = self.retry_initial
        while pending:
            part = pending[0]
            queue: Writable | None = None
            try:
                queue = self._open_queue()
                result = queue.add(part)
            except Exception as err:
                # opening fails for the store's reasons, never for a row's
                if queue is not None and _is_rejection(err):
                    pending.popleft()
                    if len(part) == 1:
                        self._reject(part[0], err)
                    else:  # isolate the rows the store refuses: split, try each half
                        middle = len(part) // 2
                        pending.appendleft(part[middle:])
                        pending.appendleft(part[:middle])
                    continue
                if self._store_failed(err, pending):
                    return
                self._back_off(delay)
                delay = min(max(delay * 2, 1e-3), self.retry_max)
                continue
            pending.popleft()
            delay = self.retry_initial
            self._committed(part, result)

    def _convert(self, chunk: list[Observation]) -> list[QueueItem]:
        """Queue items of every row; rows that cannot be converted are counted, rejected."""
        items: list[QueueItem] = []
        bad: dict[tuple[str, str], int] = {}
        for observation in chunk:
            key = (observation.model, observation.version)
            made = 0
            try:
                for item in _iter_items(
                    observation, store_inputs=self.store_inputs, calibration=self.calibration
                ):
                    made += 1
                    if item is None:
                        bad[key] = bad.get(key, 0) + 1
                    else:
                        items.append(item)
                    if made % _YIELD_EVERY == 0:
                        # Python work here holds the GIL; an inference thread that released it
                        # (any torch op) would wait up to the 5 ms switch interval to get it
                        # back. A short sleep hands it over at once.
                        time.sleep(_YIELD_SECONDS)
            except (ValueError, TypeError):  # the rows not reached are lost
                bad[key] = bad.get(key, 0) + len(observation) - made
        if bad:
            with self._cond:
                self._account_loss("rejected", bad)
            self._log_once(
                "convert",
                f"{sum(bad.values())} flagged rows could not be turned into queue "
                "items (unsupported input or evidence); they are counted in `failed` "
                "(reason rejected).",
            )
        return items

    def _reject(self, item: QueueItem, err: Exception) -> None:
        """Drop one row the store can never accept: counted, kept as ``last_error``, logged once."""
        message = (
            f"the store rejected row {printable(item.id)!s} of model "
            f"{printable(item.model)}: {self._describe(err).rstrip('.')}"
        )
        with self._cond:
            self._inflight -= 1
            self._last_error = message
            self._account_loss("rejected", {(item.model, item.model_version): 1})
            self._cond.notify_all()
        self._log_once(
            "rejected",
            f"{message}; it is dropped and counted (`failed`, reason rejected), and later "
            "rows go on being written. Further rejections are only counted.",
        )

    def _store_failed(self, err: Exception, pending: Sequence[Sequence[QueueItem]]) -> bool:
        """Count a failed attempt; True when the close deadline passed (all abandoned)."""
        message = self._describe(err)
        self._drop_queue()
        with self._cond:
            self._retries += 1
            self._last_error = message
            self._store_failing = True
            deadline = self._deadline
            if self._closing and deadline is not None and time.monotonic() >= deadline:
                self._abandon(
                    pending, f"the database failed until the close() deadline ({message})"
                )
                return True
        self._log_once(
            f"write:{type(err).__name__}",
            f"writing a batch failed ({message}); retrying with back-off, "
            f"rows are buffered (up to {self.buffer_rows}) and dropped beyond.",
            exc_info=None if isinstance(err, QueueError) else err,
        )
        return False

    def _back_off(self, delay: float) -> None:
        """Pause between half ``delay`` and ``delay`` (random), never past the close deadline."""
        pause = random.uniform(delay / 2, delay)
        with self._cond:
            deadline = self._deadline
        if deadline is not None:
            pause = min(pause, max(deadline - time.monotonic(), 0.0))
        if self._wake.wait(pause):
            self._wake.clear()

    def _committed(self, part: list[QueueItem], result: AddResult) -> None:
        stored = [i for i in result.ids if i is not None]
        with self._cond:
            if self._store_failing and self._last_error is not None:
                logger.info(
                    "oodmon label-queue writer (%s): writing again after %s.",
                    self.url,
                    self._last_error,
                )
                self._last_error = None
            self._store_failing = False
            self._committed_batches += 1
            self._committed_rows += len(stored)
            self._inflight -= len(part)
            self._depth = result.depth
            self._reports.extend((m, v, result.depth, 0, "") for m, v in sorted(self._models))
            self._cond.notify_all()
        if self.on_commit is not None:
            try:
                self.on_commit(stored)
            except Exception as err:
                self._log_once(
                    "on_commit",
                    f"on_commit failed ({type(err).__name__}: {printable(err)}).",
                    exc_info=err,
                )

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
        text = f"{type(err).__name__}: {printable(err)}"
        return scrub(text, self._secret_source) if self._secret_source else text


def _is_rejection(err: Exception) -> bool:
    """Does ``err`` say the store refuses these values (rather than failing on its own)?"""
    if isinstance(err, ItemRejectedError):
        return True
    return isinstance(err, (ValueError, TypeError, OverflowError)) and not isinstance(
        err, QueueError
    )


def _check_metrics(metrics: object) -> None:
    if metrics is not None and not callable(getattr(metrics, "record_queue", None)):
        raise ValueError(
            "Expected `metrics` to be a MetricsSink (with `record_queue`), such as "
            f"oodmon.PrometheusMetrics(), but got {type(metrics).__name__}."
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
