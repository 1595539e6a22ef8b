"""PostgreSQL backend of the label queue, for several serving replicas feeding one queue.

Needs psycopg 3 (``pip install oodmon[postgres]``), imported only when a ``postgresql://``
URL is opened. Concurrency:

* claims, lease expiry and eviction select their rows ``FOR UPDATE SKIP LOCKED``, so
  concurrent claimers never wait on, nor get, each other's items;
* adds are serialised by a row lock on the ``meta`` table (counters and capacity stay exact
  with many replicas), without blocking claims;
* schema creation is serialised by a transaction-scoped advisory lock.

A read-only queue sets ``default_transaction_read_only`` on its session, so the server
itself refuses any write. A dropped connection is re-opened on the next call. Connection
errors never carry the password of the URL (see :func:`oodmon.label_queue.url.scrub`).
Values the server or the driver cannot store (NUL in text, a lone surrogate, a number out of
range) raise :class:`~oodmon.label_queue.ItemRejectedError`: retrying cannot help.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from oodmon.label_queue.errors import (
    ItemRejectedError,
    QueueError,
    QueueUnavailableError,
    ReadOnlyQueueError,
)
from oodmon.label_queue.url import QueueURL, scrub

__all__ = ["PostgresBackend"]

#: Advisory-lock key under which the schema is created (any constant unique to oodmon).
_SCHEMA_LOCK_KEY = 0x00D_0000_0001


def _psycopg() -> Any:
    try:  # imported on first use, not at the top: psycopg is an optional extra
        import psycopg
    except ImportError as err:
        raise ImportError(
            "The PostgreSQL label queue needs psycopg 3: pip install 'oodmon[postgres]'."
        ) from err
    return psycopg


class PostgresBackend:
    """A label-queue backend over a PostgreSQL database (see :class:`oodmon.LabelQueue`)."""

    name = "postgresql"
    float_type = "DOUBLE PRECISION"
    blob_type = "BYTEA"
    lock_clause = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self, location: QueueURL, *, read_only: bool, create: bool, timeout: float
    ) -> None:
        self.location = location
        self.read_only = read_only
        self.timeout = max(1, round(timeout))
        self._psycopg = _psycopg()
        self.conn: Any = None
        self._connect()

    def _connect(self) -> None:
        """Open the connection (``self.conn``); errors carry no password."""
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(
                self.location.target, autocommit=True, connect_timeout=self.timeout
            )
        except psycopg.OperationalError as err:
            raise self._unavailable("Cannot connect to", err) from None
        except Exception as err:  # a malformed URL: ProgrammingError, ValueError, ...
            message = _one_line(scrub(str(err), self.location.target))
            raise ValueError(f"Bad PostgreSQL URL {self.location.redacted}: {message}") from None
        try:
            if self.read_only:
                conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as err:
            conn.close()
            raise self._unavailable("Cannot configure", err) from None
        self.conn = conn

    def _unavailable(self, what: str, err: Exception) -> QueueUnavailableError:
        # `from None` above: the driver's exception may quote the connection string.
        message = _one_line(scrub(str(err), self.location.target))
        return QueueUnavailableError(f"{what} the label queue {self.location.redacted}: {message}")

    # ------------------------------------------------------------------ Backend protocol

    @contextmanager
    def transaction(self, write: bool) -> Iterator[None]:
        """One transaction; a write one refuses on a read-only queue."""
        if write and self.read_only:
            raise ReadOnlyQueueError(f"The label queue {self.location.redacted} is read-only.")
        psycopg = self._psycopg
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self._connect()
        conn: Any = self.conn
        try:
            with conn.transaction():
                yield
        except psycopg.errors.ReadOnlySqlTransaction as err:
            raise ReadOnlyQueueError(
                f"The label queue {self.location.redacted} is read-only: "
                f"{_one_line(scrub(str(err), self.location.target))}"
            ) from None
        except psycopg.OperationalError as err:
            raise self._unavailable("Failed to use", err) from None
        except (psycopg.DataError, psycopg.IntegrityError, UnicodeError, OverflowError) as err:
            # the values, not the server: NUL in text, a surrogate, a number out of range
            raise ItemRejectedError(
                f"The label queue {self.location.redacted} refused a value: "
                f"{_one_line(scrub(str(err), self.location.target))}"
            ) from None
        except psycopg.Error as err:
            raise QueueError(
                f"The label queue {self.location.redacted} failed: "
                f"{_one_line(scrub(str(err), self.location.target))}"
            ) from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` (``?`` placeholders) and return every row."""
        with self.conn.cursor() as cursor:
            cursor.execute(_placeholders(sql), tuple(params))
            return cursor.fetchall() if cursor.description is not None else []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run ``sql`` (``?`` placeholders) and return the number of rows it changed."""
        with self.conn.cursor() as cursor:
            cursor.execute(_placeholders(sql), tuple(params))
            return int(cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run ``sql`` once per row of parameters (nothing for no rows)."""
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(_placeholders(sql), [tuple(r) for r in rows])

    def table_names(self) -> set[str]:
        """The tables of the database (of the current schema on PostgreSQL)."""
        rows = self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        return {str(name) for (name,) in rows}

    def serialize_adders(self) -> None:
        """Hold a row lock on ``meta`` until commit: adders queue up, claimers do not."""
        self.query("SELECT value FROM meta WHERE key = 'rejected' FOR UPDATE")

    def serialize_schema(self) -> None:
        """Hold the schema advisory lock until commit, so one process creates the tables."""
        self.query("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_KEY,))

    def close(self) -> None:
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _one_line(message: str) -> str:
    """Driver messages span lines (hints, details); errors here are one line."""
    return " ".join(message.split())


def _placeholders(sql: str) -> str:
    """Turn the queue's ``?`` placeholders into psycopg's ``%s``.

    Safe because the queue's SQL has no literals containing ``?`` or ``%``.
    """
    return sql.replace("?", "%s")
