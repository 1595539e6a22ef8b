"""Overlap reading, scoring and writing: each stage on its own thread, bounded queues between.

Parquet decoding and encoding and torch's kernels all release the GIL, so on two cores a
read-score-write run takes about as long as its slowest stage instead of the sum of the three.
The queues hold at most ``depth`` batches, which keeps memory flat. An error in any stage
stops the others and is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["BackgroundConsumer", "prefetch"]

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` on a background thread, ``depth`` items ahead of the consumer."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as err:  # handed to the consumer, which raises it
            buffer.put(_Failure(err))

    thread = threading.Thread(target=produce, name="oodmon-offline-read", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class BackgroundConsumer(Generic[T]):
    """Feed ``consume`` from a background thread; :meth:`close` waits and re-raises its error."""

    def __init__(self, consume: Callable[[T], None], depth: int = 2) -> None:
        self._consume = consume
        self._buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="oodmon-offline-write", daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        """Queue an item; raises the consumer's error as soon as there is one."""
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._buffer.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until everything queued is consumed; raise the consumer's error, if any."""
        if self._thread.is_alive():
            self._buffer.put(_DONE)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._buffer.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # drain after a failure so that put() never blocks forever
            try:
                self._consume(item)
            except BaseException as err:
                self._error = err
