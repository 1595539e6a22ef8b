"""Background batching for :meth:`Monitor.submit <oodmon.monitor.Monitor.submit>`.

A caller hands over a batch and returns at once. The backlog's room is checked before anything
is copied, the outputs (and inputs) are copied on their device, and a worker
thread lingers briefly for more batches, coalesces compatible ones and hands each coalesced
batch to a callback. The batcher knows nothing about scoring: whoever builds it passes the
callback that processes a batch and the one that records an error.
"""

from __future__ import annotations

import inspect
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Batcher", "ProcessBatch", "RecordError", "nbytes", "row_count", "yield_gil"]

#: ``process(outputs [N, ...], inputs, ids)``: handles one coalesced batch.
ProcessBatch = Callable[[Tensor, Any, "Sequence[str] | None"], object]
#: ``record_error(stage, err)``: counts and logs a failure; may raise (strict mode).
RecordError = Callable[[str, Exception], None]


@dataclass(slots=True)
class _Pending:
    """A submitted batch waiting for the background thread."""

    outputs: Tensor
    inputs: Any
    ids: Sequence[str] | None
    seq: int
    rows: int
    nbytes: int
    ready: Any = None  # a torch.cuda.Event recorded after the copies, on the caller's stream


class Batcher:
    """Queues batches and processes them, coalesced, on one background thread.

    Args:
        process: called on the worker thread with each coalesced batch.
        record_error: called with ``("background", err)`` when ``process`` raises.
        name: names the worker thread.
        max_pending: backlog in rows beyond which batches are refused.
        max_pending_bytes: the same bound in bytes of copied outputs and inputs.
        linger: seconds the worker waits for more batches before processing.
        max_batch_rows: rows that end the linger early.
    """

    def __init__(
        self,
        process: ProcessBatch,
        record_error: RecordError,
        *,
        name: str,
        max_pending: int,
        max_pending_bytes: int,
        linger: float,
        max_batch_rows: int,
    ) -> None:
        # Held weakly: the owner holds the batcher, and a strong reference back would make
        # an unclosed, unreferenced owner (and its thread) live until a cyclic collection.
        self._process_ref = _weak_callable(process)
        self._record_error_ref = _weak_callable(record_error)
        self._name = name
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.linger = linger
        self.max_batch_rows = max_batch_rows
        self.closed = False
        self.reset()

    def reset(self) -> None:
        """Empty backlog, new lock, no thread (at start, and in a forked child)."""
        # batches carry increasing sequence numbers, and flush() waits until the batch that
        # was last when it was called is done
        self._lock = threading.Lock()  # the calling thread takes it bare: a C-level `with`
        self._wakeup = threading.Condition(self._lock)
        self._pending: deque[_Pending] = deque()
        self._pending_rows = 0
        self._pending_bytes = 0
        self._submitted = 0
        self._done = 0
        self._flush_target = 0
        self.worker: threading.Thread | None = None
        # Whether the worker loop runs; the thread clears it on its way out. A flag, not
        # `worker.is_alive()`: that is four Python frames, 13 us on a cold calling thread.
        self._worker_running = False
        self._worker_idle = False

    def on_worker(self) -> bool:
        """True when called from the batcher's own background thread."""
        return threading.current_thread() is self.worker

    def yield_if_worker(self) -> None:
        """On the worker thread, let a waiting inference thread take the GIL now."""
        if self.on_worker():
            yield_gil()

    # ------------------------------------------------------------------ caller side

    def submit(
        self,
        outputs: Tensor,
        inputs: Any,
        ids: Sequence[str] | None,
        *,
        copy_inputs: bool,
        rows: int | None = None,
        size: int | None = None,
    ) -> str | None:
        """Copy and queue a batch; returns why it was refused, or None.

        The room is checked before anything is copied, so a batch the backlog cannot take
        costs no copy; the check under the lock, after copying, is the one that counts
        (another thread may have taken the room meanwhile). One round trip of the bare lock
        per batch: with a model of a millisecond, each step of the calling thread shows in its
        latency (``benchmarks/overhead.py``). The reason is ``"closed"`` or ``"backlog"``.
        ``rows`` and ``size`` are the caller's ``row_count(outputs)`` and the bytes of the
        outputs and inputs, if it has them already.
        """
        rows = row_count(outputs) if rows is None else rows
        size = nbytes(outputs) + nbytes(inputs) if size is None else size
        reason = self._refusal(rows, size)  # read without the lock: a hint, no reservation
        if reason is not None:
            return reason
        x = outputs.clone()
        if copy_inputs and isinstance(inputs, (Tensor, np.ndarray)):
            inputs = inputs.clone() if isinstance(inputs, Tensor) else inputs.copy()
        item = _Pending(x, inputs, ids, 0, rows, size, _copies_done_event(x) if x.is_cuda else None)
        with self._lock:
            reason = self._refusal(rows, size)
            if reason is not None:
                return reason
            self._pending_rows += rows
            self._pending_bytes += size
            self._submitted += 1
            item.seq = self._submitted
            self._pending.append(item)
            if not self._worker_running:
                self._start_worker()
            elif self._worker_idle or self._pending_rows >= self.max_batch_rows:
                self._wakeup.notify_all()  # a lingering worker needs no wake-up per batch
        return None

    def _refusal(self, rows: int, size: int) -> str | None:
        """Why a batch cannot be queued now (hold ``_wakeup``), or None."""
        if self.closed:
            return "closed"
        if (
            self._pending_rows + rows > self.max_pending
            or self._pending_bytes + size > self.max_pending_bytes
        ):
            return "backlog"
        return None

    def _release(self, item: _Pending) -> None:
        """Give back the room a batch reserved (hold ``_wakeup``)."""
        self._pending_rows -= item.rows
        self._pending_bytes -= item.nbytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch submitted before this call has been processed.

        Returns False on timeout, and at once on the worker thread (it cannot wait for itself).
        """
        if self.on_worker():
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wakeup:
            target = self._submitted
            self._flush_target = max(self._flush_target, target)
            self._wakeup.notify_all()
            while self._done < target:
                if not self._worker_running or not self.worker.is_alive():  # type: ignore[union-attr]
                    self._start_worker()  # never wait on a thread that is gone
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wakeup.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Refuse new batches and stop the worker (call :meth:`flush` first to drain)."""
        with self._wakeup:
            self.closed = True
            self._wakeup.notify_all()
        worker = self.worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _start_worker(self) -> None:
        """Start the background thread.

        It holds the batcher only weakly while idle, so an unclosed, unreferenced owner is
        collected and its thread ends.
        """
        self.worker = threading.Thread(
            target=_work, args=(weakref.ref(self),), name=f"oodmon-monitor-{self._name}",
            daemon=True,
        )  # fmt: skip
        self._worker_running = True
        self.worker.start()

    def _next_batch(self, idle_timeout: float) -> list[_Pending] | None:
        """Wait for submissions and linger for more; None when idle for ``idle_timeout``."""
        with self._wakeup:
            if not self._pending and not self.closed:
                self._worker_idle = True
                self._wakeup.wait(idle_timeout)
                self._worker_idle = False
            if not self._pending:
                return None
            deadline = time.monotonic() + self.linger
            while (
                not self.closed
                and self._flush_target <= self._done
                and self._pending_rows < self.max_batch_rows
                and (remaining := deadline - time.monotonic()) > 0
            ):
                self._wakeup.wait(remaining)
            batch = list(self._pending)
            self._pending.clear()
            for item in batch:
                self._release(item)
            return batch

    def _finish_batch(self, batch: list[_Pending]) -> None:
        with self._wakeup:
            self._done = max(self._done, batch[-1].seq)
            self._wakeup.notify_all()

    def _process_pending(self, batch: list[_Pending]) -> None:
        for item in batch:
            _wait_for_copies(item)
        # Coalesce compatible batches (same width, device, dtype) into one processing call.
        groups: dict[tuple[Any, ...], list[_Pending]] = {}
        for item in batch:
            x = item.outputs
            key = (tuple(x.shape[1:]) if x.ndim == 2 else ("odd", id(item)), x.device, x.dtype)
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            yield_gil()
            try:
                if len(items) == 1:
                    self._process(items[0].outputs, items[0].inputs, items[0].ids)
                    continue
                sizes = [row_count(it.outputs) for it in items]
                outputs = torch.cat([it.outputs for it in items])
                inputs = _concat_inputs([it.inputs for it in items], sizes)
                ids = _concat_ids([it.ids for it in items], sizes)
                self._process(outputs, inputs, ids)
            except Exception as err:
                self._record_error("background", err)

    def _process(self, outputs: Tensor, inputs: Any, ids: Sequence[str] | None) -> None:
        process = self._process_ref()
        if process is not None:
            process(outputs, inputs, ids)

    def _record_error(self, stage: str, err: Exception) -> None:
        record_error = self._record_error_ref()
        if record_error is not None:
            record_error(stage, err)


def _weak_callable(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A weak reference to a bound method; plain functions are held as they are."""
    if inspect.ismethod(fn):
        return weakref.WeakMethod(fn)
    return lambda: fn


def _work(ref: weakref.ReferenceType[Batcher]) -> None:
    """The background thread: process pending batches until closed or collected."""
    try:
        _work_loop(ref)
    finally:
        batcher = ref()
        if batcher is not None and batcher.worker is threading.current_thread():
            batcher._worker_running = False  # the next submit or flush starts another


def _work_loop(ref: weakref.ReferenceType[Batcher]) -> None:
    while True:
        batcher = ref()
        if batcher is None:
            return
        batch = batcher._next_batch(idle_timeout=1.0)
        if batch is None:
            if batcher.closed:
                return
            del batcher  # idle: let an unreferenced owner be collected
            continue
        try:
            batcher._process_pending(batch)
        except Exception as err:  # the callbacks guard themselves; this is a last resort
            batcher._record_error("background", err)
        finally:
            batcher._finish_batch(batch)
        del batcher


def yield_gil() -> None:
    """Let a waiting inference thread take the GIL now.

    Without this, a thread that needs the GIL while the worker runs Python waits for the
    interpreter's switch interval (5 ms), which shows up directly in the model's p99 latency.
    """
    time.sleep(0)


def row_count(x: Any) -> int:
    """Rows of a tensor or array (a 0-d value counts as one)."""
    return int(x.shape[0]) if x.ndim >= 1 else 1


def nbytes(inputs: Any) -> int:
    """Bytes a copy of a tensor or array takes (0 for anything else)."""
    if isinstance(inputs, Tensor):
        return inputs.nbytes
    if isinstance(inputs, np.ndarray):
        return inputs.nbytes
    return 0


def _copies_done_event(x: Tensor) -> Any:
    """For a CUDA tensor, an event after the caller's copies.

    The worker scores on another stream and must not read the copies before the caller's
    stream has written them.
    """
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(x.device))
    return event


def _wait_for_copies(item: _Pending) -> None:
    if item.ready is None:
        return
    stream = torch.cuda.current_stream(item.outputs.device)
    stream.wait_event(item.ready)
    # tell the caching allocator these tensors are now also used on the worker's stream
    item.outputs.record_stream(stream)
    if isinstance(item.inputs, Tensor) and item.inputs.device.type == "cuda":
        item.inputs.record_stream(stream)


def _concat_inputs(chunks: list[Any], sizes: list[int]) -> Any:
    if all(c is None for c in chunks):
        return None
    if all(isinstance(c, Tensor) for c in chunks):
        shapes = {tuple(c.shape[1:]) for c in chunks}
        devices = {c.device for c in chunks}
        if len(shapes) == 1 and len(devices) == 1:
            return torch.cat(chunks)
    rows: list[Any] = []
    for chunk, size in zip(chunks, sizes, strict=True):
        if chunk is None:
            rows.extend([None] * size)
        else:
            rows.extend(chunk[i] for i in range(size))
    return rows


def _concat_ids(chunks: list[Sequence[str] | None], sizes: list[int]) -> list[Any] | None:
    if all(c is None for c in chunks):
        return None
    ids: list[Any] = []
    for chunk, size in zip(chunks, sizes, strict=True):
        ids.extend([None] * size if chunk is None else list(chunk))
    return ids
