"""Process lifecycle for objects that own a background thread.

A Monitor and a QueueWriter each run a thread and hold buffered rows. Two process events
concern them both, and are handled here once:

- interpreter exit: buffered rows must be written, producers before the sinks they feed
  (a Monitor's last batch ends up in its QueueWriter, so the Monitor closes first);
- ``os.fork()`` (gunicorn ``--preload``): the child inherits the objects but not their
  threads, and their locks may be held by a thread that no longer exists, so every tracked
  object starts afresh in the child.

Warnings about a failing sink repeat on every batch; :class:`LogOnce` keeps one line per
kind of failure, under a lock so two threads cannot both log it.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import logging
import os
import threading
import weakref
from typing import Protocol

__all__ = ["LogOnce", "Managed", "Stage", "forget", "track"]


class Stage(enum.IntEnum):
    """Exit order: lower stages are closed first."""

    PRODUCER = 0  # feeds sinks (Monitor)
    SINK = 1  # fed by producers (QueueWriter)


class Managed(Protocol):
    """What a tracked object provides."""

    def _close_at_exit(self) -> None:
        """Write what is buffered, within a bounded time; called once at interpreter exit."""

    def _reset_after_fork(self) -> None:
        """Start afresh in a forked child: new locks, a new thread, the parent's rows gone."""


_tracked: dict[Stage, weakref.WeakSet[Managed]] = {stage: weakref.WeakSet() for stage in Stage}


def track(obj: Managed, stage: Stage) -> None:
    """Flush ``obj`` at exit (in stage order) and reset it in forked children."""
    _tracked[stage].add(obj)


def forget(obj: Managed) -> None:
    """Stop tracking ``obj`` (after it closed)."""
    for objects in _tracked.values():
        objects.discard(obj)


def _close_all_at_exit() -> None:
    for stage in sorted(Stage):
        for obj in list(_tracked[stage]):
            with contextlib.suppress(Exception):  # exit must go on whatever one object does
                obj._close_at_exit()


def _reset_all_after_fork() -> None:
    for stage in sorted(Stage):
        for obj in list(_tracked[stage]):
            with contextlib.suppress(Exception):
                obj._reset_after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_after_fork)


class LogOnce:
    """Log a warning once per key, thread-safely; :meth:`reset` forgets the keys."""

    def __init__(self, logger: logging.Logger, prefix: str = "") -> None:
        self._logger = logger
        self._prefix = prefix
        self._lock = threading.Lock()
        self._keys: set[str] = set()

    def __call__(self, key: str, message: str, exc_info: BaseException | None = None) -> bool:
        """Log ``message`` unless ``key`` was logged before; True when it was logged now."""
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
        self._logger.warning("%s%s", self._prefix, message, exc_info=exc_info)
        return True

    def reset(self) -> None:
        """Forget every key (a forked child logs its own failures again)."""
        self._lock = threading.Lock()
        self._keys = set()
