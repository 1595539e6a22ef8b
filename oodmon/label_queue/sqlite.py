"""SQLite backend of the label queue: one file, WAL journal, one transaction per call.

Writers take the database lock up front (``BEGIN IMMEDIATE``), so a claim, an add and a
done never interleave; readers use plain ``BEGIN`` and see a consistent snapshot while a
writer works (WAL). ``synchronous=FULL`` makes every committed transaction durable before
``COMMIT`` returns, which is what :class:`~oodmon.label_queue.QueueWriter` reports as
committed. A read-only queue opens the file with ``mode=ro``: SQLite may create the
``-wal``/``-shm`` side files it needs to read, but never changes the database; where it may
not create them (a read-only directory), the file is read as immutable. A locked database is
a :class:`~oodmon.label_queue.QueueUnavailableError` (busy: worth retrying), never a
"not a database" error; a value the driver cannot bind is an
:class:`~oodmon.label_queue.ItemRejectedError`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from oodmon.label_queue.errors import (
    ItemRejectedError,
    NotAQueueError,
    QueueError,
    QueueUnavailableError,
    ReadOnlyQueueError,
)
from oodmon.label_queue.url import QueueURL

__all__ = ["SQLiteBackend"]


class SQLiteBackend:
    """A label-queue backend over one SQLite file (see :class:`oodmon.LabelQueue`)."""

    name = "sqlite"
    float_type = "REAL"
    blob_type = "BLOB"
    lock_clause = ""

    def __init__(
        self, location: QueueURL, *, read_only: bool, create: bool, timeout: float
    ) -> None:
        self.location = location
        self.read_only = read_only
        path = location.target
        memory = path == ":memory:"
        if memory and read_only:
            raise ValueError("An in-memory SQLite queue cannot be opened read-only.")
        if not memory:
            file = Path(path)
            if file.is_dir():
                raise ValueError(f"{path} is a directory, not a label-queue file.")
            if not file.exists():
                if read_only or not create:
                    raise FileNotFoundError(f"No label queue at {path}: the file does not exist.")
                if not file.parent.is_dir():
                    raise FileNotFoundError(
                        f"Cannot create a label queue at {path}: the directory {file.parent} "
                        "does not exist."
                    )
        self.conn = self._connect(path, read_only=read_only, timeout=timeout)
        try:
            self._configure(read_only=read_only, memory=memory)
        except sqlite3.OperationalError as err:
            self.conn.close()
            if not read_only or not _needs_write_access(err):
                raise self._error(err) from err
            # A reader of a WAL database creates the -shm index next to it; in a directory
            # it may not write to, reading the file as immutable (main file only) still works.
            self.conn = self._connect(path, read_only=True, timeout=timeout, immutable=True)
            try:
                self._configure(read_only=True, memory=False)
            except sqlite3.OperationalError as again:
                self.conn.close()
                raise self._error(again) from again
            except sqlite3.DatabaseError as again:
                self.conn.close()
                raise NotAQueueError(f"{path} is not a usable SQLite database: {again}.") from again
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise NotAQueueError(f"{path} is not a usable SQLite database: {err}.") from err
        except BaseException:
            self.conn.close()
            raise

    @staticmethod
    def _connect(
        path: str, *, read_only: bool, timeout: float, immutable: bool = False
    ) -> sqlite3.Connection:
        try:
            if read_only:
                flags = "?immutable=1" if immutable else "?mode=ro"
                uri = "file:" + quote(str(Path(path).resolve())) + flags
                return sqlite3.connect(
                    uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
                )
            return sqlite3.connect(
                path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise QueueUnavailableError(f"Cannot open the label queue {path}: {err}.") from err

    def _configure(self, *, read_only: bool, memory: bool) -> None:
        """WAL and durable commits for a writer; ``query_only`` for a reader; then one read."""
        path = self.location.target
        if not read_only and not memory:
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise QueueError(f"Could not switch {path} to WAL mode (got {mode!r}).")
            self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA query_only = " + ("ON" if read_only else "OFF"))
        self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()

    # ------------------------------------------------------------------ Backend protocol

    @contextmanager
    def transaction(self, write: bool) -> Iterator[None]:
        """One transaction; a write one refuses on a read-only queue."""
        if write and self.read_only:
            raise ReadOnlyQueueError(f"The label queue {self.location.redacted} is read-only.")
        self._run(self.conn.execute, "BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:
                with suppress(sqlite3.Error):  # the original error matters more
                    self.conn.execute("ROLLBACK")
            raise
        else:
            self._run(self.conn.execute, "COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` (``?`` placeholders) and return every row."""
        cursor = self._run(self.conn.execute, sql, tuple(params))
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run ``sql`` (``?`` placeholders) and return the number of rows it changed."""
        cursor = self._run(self.conn.execute, sql, tuple(params))
        try:
            return cursor.rowcount
        finally:
            cursor.close()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run ``sql`` once per row of parameters (nothing for no rows)."""
        if rows:
            self._run(self.conn.executemany, sql, [tuple(r) for r in rows]).close()

    def table_names(self) -> set[str]:
        """The tables of the database (of the current schema on PostgreSQL)."""
        rows = self.query("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(name) for (name,) in rows}

    def serialize_adders(self) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already holds the only write lock."""

    def serialize_schema(self) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already holds the only write lock."""

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # ------------------------------------------------------------------ errors

    def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except sqlite3.OperationalError as err:
            raise self._error(err) from err
        except (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError) as err:
            raise ItemRejectedError(
                f"The label queue {self.location.redacted} refused a value: {err}."
            ) from err
        except sqlite3.DatabaseError as err:
            if "not a database" in str(err):
                raise NotAQueueError(
                    f"{self.location.redacted} is not an SQLite database: {err}."
                ) from err
            raise QueueError(f"The label queue {self.location.redacted} failed: {err}.") from err
        except (UnicodeError, OverflowError) as err:  # raised while binding a value
            raise ItemRejectedError(
                f"The label queue {self.location.redacted} cannot store a value: "
                f"{type(err).__name__}: {err}."
            ) from err

    def _error(self, err: sqlite3.OperationalError) -> QueueError:
        """The queue error for an operational failure: busy and locked are worth retrying."""
        text = str(err)
        where = self.location.redacted
        if "locked" in text or "busy" in text:
            return QueueUnavailableError(
                f"The label queue {where} is locked by another process (busy); try again: {text}."
            )
        if "readonly" in text or "read-only" in text:
            return ReadOnlyQueueError(f"The label queue {where} is read-only: {text}.")
        if "no such table" in text or "no such column" in text:
            return QueueError(f"The label queue {where} is damaged: {text}.")
        return QueueUnavailableError(f"The label queue {where} failed: {text}.")


def _needs_write_access(err: sqlite3.OperationalError) -> bool:
    """A read-only open failed for want of write access to the directory (``-shm``)."""
    text = str(err)
    return "readonly" in text or "read-only" in text or "unable to open" in text
