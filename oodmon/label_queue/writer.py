"""QueueWriter: the Monitor's label-queue sink, writing flagged rows off the inference path.

``Monitor(..., queue=QueueWriter("labels.db"))`` hands the flagged rows of each batch to
:meth:`QueueWriter.submit`, which only appends them to a bounded in-memory buffer and
returns: it never blocks on the database and never raises. Once the buffer is full, new
rows are dropped and counted (returned to the Monitor, which exports them as a metric). A
background thread takes batches from the buffer and hands them to the store, one
transaction per batch; ``close()`` flushes within a deadline, and so does interpreter exit
(after the Monitors that feed it: see :mod:`oodmon._lifecycle`, which also resets the
writer in a forked child). This module is that accept-buffer-hand-over loop; around it:

- ``_items``: flagged rows -> :class:`~oodmon.label_queue.QueueItem` (on the writer thread);
- ``_delivery``: the connection, retries with jittered back-off while the store fails, and
  bisection of a batch the store refuses, so that a bad row never holds back the rest;
- ``_ledger``: where every row went (``dropped``, ``failed``, ``lost`` by reason, commits)
  and the depth and loss reports owed to the metrics sink.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from oodmon._lifecycle import LogOnce, Stage, forget, track
from oodmon._printable import printable
from oodmon.label_queue._delivery import StoreConnection, Writable, back_off, deliver
from oodmon.label_queue._items import convert_rows, most_ood, observation_items
from oodmon.label_queue._ledger import (
    ModelKey,
    WriterLedger,
    check_metrics,
    count_items,
    count_rows,
    send_reports,
)
from oodmon.label_queue.errors import QueueError
from oodmon.label_queue.item import AddResult, QueueItem
from oodmon.sinks import DetectorSummary, MetricsSink
from oodmon.verdict import Observation

__all__ = ["QueueWriter", "Writable", "observation_items"]

logger = logging.getLogger("oodmon")


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
        check_metrics(metrics)
        self._connection = StoreConnection(queue, capacity=capacity)
        self.url = self._connection.url
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
        self._cond = threading.Condition(threading.Lock())  # guards the buffer and the ledger
        self._wake = threading.Event()  # cuts a back-off pause short once, when close() starts
        self._buffer: deque[Observation] = deque()
        self._buffered = 0
        self._oldest = 0.0  # monotonic arrival time of the oldest buffered row
        self._inflight = 0  # rows taken from the buffer and not yet committed nor lost
        self._flush_requests = 0
        self._closing = False
        self._closed = False
        self._deadline: float | None = None
        self._ledger = WriterLedger()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oodmon-queue-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ QueueSink

    def describe(self, summary: DetectorSummary) -> None:
        """Learn the calibration hash of the Monitor's detector (called once by the Monitor)."""
        if self.calibration is None:
            self.calibration = summary.calibration_hash
        with self._cond:
            self._ledger.models.add((summary.model, summary.version))

    def bind_metrics(self, metrics: MetricsSink | None) -> None:
        """Report depth and losses to ``metrics`` from now on (see the ``metrics`` argument)."""
        check_metrics(metrics)
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
                self._ledger.models.add(key)
                if self._closing:
                    self._ledger.refused(n, "closed")
                    return n
                room = self.buffer_rows - self._buffered
                if room <= 0:
                    self._ledger.refused(n, "buffer_full")
                    return n
                if n > room:
                    observation = most_ood(observation, room)
                kept = len(observation)
                was_empty = self._buffered == 0
                if was_empty:
                    self._oldest = time.monotonic()
                self._buffer.append(observation)
                self._buffered += kept
                self._ledger.refused(n - kept, "buffer_full")
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
                self._ledger.refused(n, "rejected")
            return n

    def depth(self) -> int | None:
        """Queued items in the database after the last committed batch (no I/O), or None."""
        return self._ledger.depth

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
            error = self._ledger.last_error if self._ledger.store_failing else None
            self._abandon(
                "the process exits while a write to the store has not returned"
                + (f" ({error})" if error else ""),
                {("", ""): self._inflight},  # their models are the writer thread's to know
            )
        self._send_reports()

    def _reset_after_fork(self) -> None:
        """In a forked child: a new thread, locks and buffer; never the parent's connection."""
        was_closing = self._closing
        self._reset_state()
        self._log_once.reset()
        self._connection.after_fork()  # our own connection on the next write
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
        return f"QueueWriter({self.url!r}, buffered={self._buffered}, dropped={self.dropped})"

    # ------------------------------------------------------------------ counters

    @property
    def dropped(self) -> int:
        """Rows refused by :meth:`submit` (buffer full, or the writer closed)."""
        return self._ledger.dropped

    @property
    def failed(self) -> int:
        """Rows accepted but never written.

        Rejected by the store, unconvertible, or unwritten at the close deadline or exit.
        """
        return self._ledger.failed

    @property
    def lost(self) -> dict[str, int]:
        """Every row that did not reach the store, by reason (``dropped + failed`` in all)."""
        with self._cond:
            return dict(self._ledger.lost)

    @property
    def committed_batches(self) -> int:
        """Transactions committed."""
        return self._ledger.committed_batches

    @property
    def committed_rows(self) -> int:
        """Rows committed (merged duplicates count; rows a full queue rejected do not)."""
        return self._ledger.committed_rows

    @property
    def retries(self) -> int:
        """Failed write attempts (the store's failures; not the rejected rows' bisection)."""
        return self._ledger.retries

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
        return self._ledger.last_error

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
                        self._ledger.lose("store_error", {("", ""): self._inflight})
                finally:
                    with self._cond:
                        self._inflight = 0
                        self._cond.notify_all()
                    self._send_reports()
        finally:
            self._send_reports()
            self._connection.drop()

    def _next_chunk(self) -> list[Observation] | None:
        """Wait (holding ``_cond``) until a batch is due; take it. None means stop."""
        while True:
            now = time.monotonic()
            if self._closing and self._deadline is not None and now >= self._deadline:
                if self._buffered:
                    self._abandon("the close() deadline passed", {})
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

    def _abandon(self, why: str, unfinished: dict[ModelKey, int]) -> None:
        """Give up on every buffered row and the ``unfinished`` ones taken (holds ``_cond``).

        Counts them in ``failed`` and ``lost`` (``store_error`` while the store is failing,
        else ``closed``) and logs how many were not written, in one line.
        """
        counts = count_rows(self._buffer)
        for key, n in unfinished.items():
            counts[key] = counts.get(key, 0) + n
        lost = self._buffered + sum(unfinished.values())
        self._buffer.clear()
        self._buffered = 0
        self._inflight = 0
        self._ledger.lose(self._ledger.loss_reason, counts)
        logger.warning(
            "oodmon label-queue writer (%s): %d rows not written: %s.", self.url, lost, why
        )

    def _send_reports(self) -> None:
        """Hand queued depth and loss reports to the metrics sink (outside the lock)."""
        with self._cond:
            reports = self._ledger.take_reports()
        send_reports(reports, self._metrics, self._log_once)

    def _write(self, chunk: list[Observation]) -> None:
        """Convert ``chunk`` and hand it to the store (see :func:`deliver`)."""
        items, bad = convert_rows(
            chunk, store_inputs=self.store_inputs, calibration=self.calibration
        )
        with self._cond:
            self._inflight = len(items)
            if bad:
                self._ledger.lose("rejected", bad)
        if bad:
            self._log_once(
                "convert",
                f"{sum(bad.values())} flagged rows could not be turned into queue "
                "items (unsupported input or evidence); they are counted in `failed` "
                "(reason rejected).",
            )
        deliver(
            items,
            self._connection,
            committed=self._committed,
            rejected=self._reject,
            failed=self._store_failed,
            back_off=self._back_off,
            retry_initial=self.retry_initial,
            retry_max=self.retry_max,
        )

    def _reject(self, item: QueueItem, err: Exception) -> None:
        """Drop one row the store can never accept: counted, kept as ``last_error``, logged once."""
        message = (
            f"the store rejected row {printable(item.id)!s} of model "
            f"{printable(item.model)}: {self._connection.describe(err).rstrip('.')}"
        )
        with self._cond:
            self._inflight -= 1
            self._ledger.rejected(item, message)
            self._cond.notify_all()
        self._log_once(
            "rejected",
            f"{message}; it is dropped and counted (`failed`, reason rejected), and later "
            "rows go on being written. Further rejections are only counted.",
        )

    def _store_failed(self, err: Exception, pending: Sequence[Sequence[QueueItem]]) -> bool:
        """Count a failed attempt; True when the close deadline passed (all abandoned)."""
        message = self._connection.describe(err)
        with self._cond:
            self._ledger.store_failed(message)
            deadline = self._deadline
            if self._closing and deadline is not None and time.monotonic() >= deadline:
                why = f"the database failed until the close() deadline ({message})"
                self._abandon(why, count_items(itertools.chain.from_iterable(pending)))
                return True
        self._log_once(
            f"write:{type(err).__name__}",
            f"writing a batch failed ({message}); retrying with back-off, "
            f"rows are buffered (up to {self.buffer_rows}) and dropped beyond.",
            exc_info=None if isinstance(err, QueueError) else err,
        )
        return False

    def _back_off(self, delay: float) -> None:
        """Pause before the next attempt (see :func:`back_off`), never past the close deadline."""
        with self._cond:
            deadline = self._deadline
        back_off(delay, self._wake, deadline)

    def _committed(self, part: list[QueueItem], result: AddResult) -> None:
        stored = [i for i in result.ids if i is not None]
        with self._cond:
            recovered = self._ledger.committed(len(stored), result.depth)
            if recovered is not None:
                logger.info(
                    "oodmon label-queue writer (%s): writing again after %s.", self.url, recovered
                )
            self._inflight -= len(part)
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
