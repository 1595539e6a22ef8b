"""LabelQueue: a durable, prioritised queue of flagged inputs waiting for a human label.

One API over two backends, chosen by the URL:

* SQLite (the embedded default): a file path, ``sqlite:///relative.db`` or
  ``sqlite:////absolute.db``. WAL journal, ``synchronous=FULL``, one transaction per call.
* PostgreSQL, for several serving replicas feeding one queue: ``postgresql://...``
  (psycopg 3, ``pip install oodmon[postgres]``). Claims use ``FOR UPDATE SKIP LOCKED``.

Semantics (identical on both backends):

* Priority: most OOD first, i.e. ascending ``(p_value, distance, created_at, id)``.
  An unknown (NaN) distance is stored as ``+inf`` (least OOD among equal p-values).
* Dedupe: one item per ``(model, content_hash)``. The content hash is the SHA-256 of the
  input's ``.npy`` bytes, or of its reference when no input is available. Seeing the same
  input again increments ``seen_count``, updates ``last_seen_at`` and keeps the evidence
  (p-value, distance, score, predicted class, model version, calibration) of the most-OOD
  sighting, as one coherent set. Two models flagging the same input make two items.
* Capacity bounds the *open* items (queued + claimed); labelled (``done``) items are kept
  and do not count. When full, the least-OOD queued item is evicted (never a claimed or
  labelled one) if the newcomer is more OOD; otherwise the newcomer is rejected. Both
  are counted persistently (``stats().evicted`` / ``stats().rejected``).
* Claims: ``claim(n, worker, lease_seconds)`` hands out up to n queued items in priority
  order, atomically; an item whose lease has lapsed is queued again (and claimable).
  ``done(id, label, worker)`` and ``release(id, worker)`` refuse only when *another*
  worker holds a live lease on the item; without ``worker`` they always apply (admin use).
* Times are UTC Unix seconds (floats) on both backends; ``clock=`` injects a clock.
* Ids: caller-given or a random UUID. A caller id already used by *different* content
  gets a ``~<random>`` suffix rather than overwriting or losing the item.

Safety: SQL is parameterised everywhere (table and column names are constants); a password
in a URL never appears in errors, logs or ``repr``
(:func:`~oodmon.label_queue.url.redact_url`); a queue opened with
``read_only=True`` never writes (SQLite ``mode=ro``; PostgreSQL read-only transactions).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from oodmon.label_queue._admit import admit
from oodmon.label_queue._sql import (
    COLS_NO_INPUT,
    COLS_WITH_INPUT,
    META_COUNTERS,
    PRIORITY,
    SCHEMA_VERSION,
    STATUS_FILTERS,
    Backend,
    expire_leases,
    row_to_item,
    schema_statements,
)
from oodmon.label_queue.errors import (
    ItemNotFoundError,
    LeaseError,
    NotAQueueError,
    QueueError,
    ReadOnlyQueueError,
    SchemaVersionError,
)
from oodmon.label_queue.item import STATUSES, AddResult, QueueItem, QueueStats, format_utc
from oodmon.label_queue.postgres import PostgresBackend
from oodmon.label_queue.sqlite import SQLiteBackend
from oodmon.label_queue.url import QueueURL, parse_url

__all__ = [
    "DEFAULT_CAPACITY",
    "MAX_CLAIM",
    "MAX_LEASE_SECONDS",
    "SCHEMA_VERSION",
    "Backend",
    "LabelQueue",
    "open_backend",
]

#: Open items (queued + claimed) a new queue holds by default.
DEFAULT_CAPACITY = 100_000
#: Most items one :meth:`LabelQueue.claim` hands out (they are loaded with their inputs).
MAX_CLAIM = 100_000
#: Longest lease a claim may take: one year (a lease ends as a date).
MAX_LEASE_SECONDS = 365 * 86_400.0


def open_backend(location: QueueURL, *, read_only: bool, create: bool, timeout: float) -> Backend:
    """Connect to the database ``location`` names (PostgreSQL needs ``oodmon[postgres]``)."""
    backend = PostgresBackend if location.backend == "postgresql" else SQLiteBackend
    return backend(location, read_only=read_only, create=create, timeout=timeout)


class LabelQueue:
    """A durable, prioritised, deduplicated, bounded queue of inputs to label.

    Args:
        url: a file path, ``sqlite:///path.db`` or ``postgresql://user@host:port/db``.
        capacity: bound on open (queued + claimed) items. None keeps the stored value
            (``DEFAULT_CAPACITY`` for a new queue); a number updates it.
        read_only: open for listing and export only; nothing is ever written.
        create: create the file / schema if missing (ignored when ``read_only``).
        clock: returns UTC Unix seconds; injectable for lease tests.
        timeout: seconds to wait for a lock (SQLite) or a connection (PostgreSQL).

    Raises:
        FileNotFoundError: an SQLite file that does not exist (read-only or ``create=False``).
        ValueError: a bad URL, or a database that is not an oodmon label queue.
        SchemaVersionError: the database has another schema version.
        QueueUnavailableError: the server cannot be reached.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        capacity: int | None = None,
        read_only: bool = False,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
    ) -> None:
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1
        ):
            raise ValueError(f"Expected `capacity` to be a positive integer, but got {capacity!r}.")
        self.location = parse_url(url)
        self.read_only = bool(read_only)
        self.clock = clock
        self._lock = threading.RLock()
        self._db: Backend | None = None
        db = open_backend(
            self.location,
            read_only=self.read_only,
            create=create and not read_only,
            timeout=timeout,
        )
        try:
            self._capacity = self._check_schema(
                db, create=create and not read_only, capacity=capacity
            )
        except BaseException:
            db.close()
            raise
        self._db = db

    # ------------------------------------------------------------------ schema

    def _check_schema(self, db: Backend, *, create: bool, capacity: int | None) -> int:
        with db.transaction(write=False):
            tables = db.table_names()
        if "meta" not in tables:
            if "items" in tables or not create:
                what = "has tables but no oodmon meta table" if tables else "is empty"
                raise NotAQueueError(
                    f"{self.url} {what}: it is not an oodmon label queue"
                    + ("" if tables else "; the first writer (a QueueWriter) creates one")
                    + "."
                )
            self._create_schema(db, capacity)
        with db.transaction(write=False):
            meta = dict(db.query("SELECT key, value FROM meta"))
        found = meta.get("schema_version")
        if found != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"{self.url} has label-queue schema version {found!r}, but this oodmon reads "
                f"version {SCHEMA_VERSION}: export it with the oodmon version that wrote it, "
                "or open another queue."
            )
        stored = int(meta.get("capacity", DEFAULT_CAPACITY))
        if capacity is not None and capacity != stored and not self.read_only:
            with db.transaction(write=True):
                db.execute("UPDATE meta SET value = ? WHERE key = 'capacity'", (str(capacity),))
            stored = capacity
        return stored

    def _create_schema(self, db: Backend, capacity: int | None) -> None:
        with db.transaction(write=True):
            db.serialize_schema()
            for statement in schema_statements(db):
                db.execute(statement)
            defaults = {
                "schema_version": str(SCHEMA_VERSION),
                "capacity": str(capacity or DEFAULT_CAPACITY),
                "created_at": repr(self.clock()),
                **{key: "0" for key in META_COUNTERS},
            }
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                list(defaults.items()),
            )

    # ------------------------------------------------------------------ plumbing

    @property
    def url(self) -> str:
        """The queue URL with any password redacted (safe to log)."""
        return self.location.redacted

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.location.backend

    @property
    def capacity(self) -> int:
        """Bound on open (queued + claimed) items, as stored when the queue was opened."""
        return self._capacity

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._db is None

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Backend]:
        """One transaction on the open connection, holding the lock that shares it.

        Also for companion tables kept beside the queue (the Label Studio task ids of
        :mod:`oodmon.label_queue.label_studio`). SQL takes ``?`` placeholders on every backend;
        the ``items`` and ``meta`` tables belong to the queue: never write them through this.

        Raises:
            QueueError: the queue is closed.
            ReadOnlyQueueError: ``write`` on a queue opened read-only.
        """
        with self._lock:
            if self._db is None:
                raise QueueError(f"The label queue {self.url} is closed.")
            if write and self.read_only:
                raise ReadOnlyQueueError(
                    f"The label queue {self.url} was opened read-only (read_only=True, or its "
                    "file or directory is not writable); open it writable to change it."
                )
            db = self._db
            with db.transaction(write=write):
                yield db

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()

    def __enter__(self) -> LabelQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"LabelQueue({self.url!r}{mode})"

    # ------------------------------------------------------------------ writing

    def put(
        self,
        input: Any = None,
        *,
        model: str,
        version: str,
        p_value: float,
        distance: float,
        score: float | None = None,
        predicted: int = -1,
        id: str | None = None,
        reference: str | None = None,
        store_input: bool = True,
        calibration: str | None = None,
        timestamp: float | None = None,
    ) -> str | None:
        """Add one input (see :meth:`QueueItem.create`). Returns its id, or None if rejected."""
        item = QueueItem.create(
            model=model,
            version=version,
            p_value=p_value,
            distance=distance,
            input=input,
            reference=reference,
            store_input=store_input,
            score=score,
            predicted=predicted,
            id=id,
            timestamp=self.clock() if timestamp is None else timestamp,
            calibration=calibration,
        )
        return self.add([item]).ids[0]

    def add(self, items: Iterable[QueueItem]) -> AddResult:
        """Add items in one transaction: dedupe, then insert, evicting at capacity.

        Returns:
            An :class:`AddResult` (stored id per item, counts, queued depth).

        Raises:
            ReadOnlyQueueError: the queue is read-only.
            QueueUnavailableError: the database is unreachable or locked for too long.
        """
        batch = list(items)
        for item in batch:
            if not isinstance(item, QueueItem):
                raise ValueError(
                    f"Expected QueueItem objects (see QueueItem.create), but got "
                    f"{type(item).__name__}."
                )
        with self.transaction(write=True) as db:
            db.serialize_adders()
            return admit(db, batch, self.clock(), self._capacity)

    # ------------------------------------------------------------------ labelling

    def claim(self, n: int, worker: str, lease_seconds: float = 600.0) -> list[QueueItem]:
        """Hand the ``n`` most-OOD queued items to ``worker`` under a lease, atomically.

        Items whose lease lapsed are queued again first. Two concurrent claimers never get
        the same item (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
        Arguments are checked before anything changes.

        Returns:
            Up to n items (inputs included), most OOD first, with status ``"claimed"``.

        Raises:
            ValueError: ``n`` outside 1..``MAX_CLAIM``, an empty worker, or a lease outside
                (0, ``MAX_LEASE_SECONDS``].
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CLAIM:
            raise ValueError(
                f"Expected `n` to be an integer in [1, {MAX_CLAIM}], but got {n!r}; claim in "
                "smaller batches."
            )
        if not isinstance(worker, str) or not worker:
            raise ValueError(f"Expected `worker` to be a non-empty string, but got {worker!r}.")
        try:
            lease = float(lease_seconds)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"Expected `lease_seconds` to be a number, but got {lease_seconds!r}."
            ) from err
        if not (math.isfinite(lease) and 0 < lease <= MAX_LEASE_SECONDS):
            raise ValueError(
                f"Expected `lease_seconds` in (0, {MAX_LEASE_SECONDS:.0f}] (one year at most), "
                f"but got {lease_seconds!r}."
            )
        with self.transaction(write=True) as db:
            now = self.clock()
            expire_leases(db, now)
            rows = db.query(
                f"SELECT {COLS_WITH_INPUT} FROM items WHERE status = 'queued' "
                f"ORDER BY {PRIORITY} LIMIT ?{db.lock_clause}",
                (n,),
            )
            expires = now + lease
            db.executemany(
                "UPDATE items SET status = 'claimed', claimed_by = ?, lease_expires_at = ? "
                "WHERE id = ?",
                [(worker, expires, row[0]) for row in rows],
            )
        return [
            replace(
                row_to_item(row, now),
                status="claimed",
                claimed_by=worker,
                lease_expires_at=expires,
            )
            for row in rows
        ]

    def done(
        self, id: str, label: str, worker: str | None = None, *, overwrite: bool = True
    ) -> QueueItem:
        """Record ``label`` for item ``id`` and mark it done.

        Args:
            id: the item.
            label: the label.
            worker: who labels it; refused if another worker holds a live lease on it.
            overwrite: False refuses an item that already has a label (True replaces it).

        Raises:
            ItemNotFoundError: no such item.
            LeaseError: ``worker`` is given and another worker holds a live lease on it, or
                ``overwrite`` is False and the item already has a label.
        """
        if not isinstance(label, str) or not label:
            raise ValueError(f"Expected `label` to be a non-empty string, but got {label!r}.")
        worker = _check_worker(worker)
        with self.transaction(write=True) as db:
            now = self.clock()
            _status, holder, previous = self._lockable(db, id, worker, now, "label")
            if previous is not None and not overwrite:
                raise LeaseError(
                    f"Item {id!r} is already labelled {previous!r}; replacing a label needs "
                    "overwrite=True (--force on the command line)."
                )
            db.execute(
                "UPDATE items SET status = 'done', label = ?, labelled_at = ?, "
                "claimed_by = ?, lease_expires_at = NULL WHERE id = ?",
                (label, now, worker if worker is not None else holder, id),
            )
        item = self.get(id)
        if item is None:  # deleted by someone else in the meantime
            raise ItemNotFoundError(f"No item with id {id!r} in {self.url}.")
        return item

    def release(self, id: str, worker: str | None = None) -> None:
        """Give a claimed item back to the queue.

        Raises:
            ItemNotFoundError: no such item.
            LeaseError: it is already labelled, or another worker holds a live lease on it.
        """
        worker = _check_worker(worker)
        with self.transaction(write=True) as db:
            now = self.clock()
            status, _, _ = self._lockable(db, id, worker, now, "release")
            if status == "done":
                raise LeaseError(f"Item {id!r} is already labelled; it cannot be released.")
            db.execute(
                "UPDATE items SET status = 'queued', claimed_by = NULL, "
                "lease_expires_at = NULL WHERE id = ?",
                (id,),
            )

    def _lockable(
        self, db: Backend, id: str, worker: str | None, now: float, action: str
    ) -> tuple[str, str | None, str | None]:
        """Status, lease holder and label of item ``id``, locked; refuses another's lease."""
        lock = " FOR UPDATE" if db.lock_clause else ""
        rows = db.query(
            f"SELECT status, claimed_by, lease_expires_at, label FROM items WHERE id = ?{lock}",
            (id,),
        )
        if not rows:
            raise ItemNotFoundError(f"No item with id {id!r} in {self.url}.")
        status, holder, expires, label = rows[0]
        live = status == "claimed" and expires is not None and expires > now
        if worker is not None and live and holder != worker:
            raise LeaseError(
                f"Item {id!r} is claimed by {holder!r} until {format_utc(expires)}; {worker!r} "
                f"cannot {action} it (omit the worker to override)."
            )
        return str(status), holder, label

    # ------------------------------------------------------------------ reading

    def get(self, id: str, include_input: bool = True) -> QueueItem | None:
        """The item with this id, or None."""
        cols = COLS_WITH_INPUT if include_input else COLS_NO_INPUT
        with self.transaction(write=False) as db:
            rows = db.query(f"SELECT {cols} FROM items WHERE id = ?", (id,))
        return row_to_item(rows[0], self.clock()) if rows else None

    def items(
        self,
        status: str | None = None,
        *,
        model: str | None = None,
        limit: int | None = None,
        include_inputs: bool = False,
    ) -> list[QueueItem]:
        """Items in priority order (most OOD first).

        Args:
            status: ``"queued"``, ``"claimed"`` or ``"done"`` (effective status), or None.
            model: only this model's items.
            limit: at most this many.
            include_inputs: load the stored ``.npy`` bytes too.
        """
        return list(
            self.iter_items(status, model=model, limit=limit, include_inputs=include_inputs)
        )

    def iter_items(
        self,
        status: str | None = None,
        *,
        model: str | None = None,
        limit: int | None = None,
        include_inputs: bool = False,
        page_size: int = 500,
    ) -> Iterator[QueueItem]:
        """Like :meth:`items`, but fetched page by page (keyset pagination), for exports."""
        if status is not None and status not in STATUS_FILTERS:
            raise ValueError(
                f"Expected `status` to be one of {STATUSES} or None, but got {status!r}."
            )
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ValueError(f"Expected `limit` to be a non-negative integer, but got {limit!r}.")
        cols = COLS_WITH_INPUT if include_inputs else COLS_NO_INPUT
        now = self.clock()
        remaining = limit
        after: tuple[Any, ...] | None = None
        while remaining is None or remaining > 0:
            where: list[str] = []
            params: list[Any] = []
            if status is not None:
                clause, nparams = STATUS_FILTERS[status]
                where.append(clause)
                params.extend([now] * nparams)
            if model is not None:
                where.append("model = ?")
                params.append(model)
            if after is not None:
                where.append("(p_value, distance, created_at, id) > (?, ?, ?, ?)")
                params.extend(after)
            size = page_size if remaining is None else min(page_size, remaining)
            sql = f"SELECT {cols} FROM items"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += f" ORDER BY {PRIORITY} LIMIT ?"
            params.append(size)
            with self.transaction(write=False) as db:
                rows = db.query(sql, params)
            for row in rows:
                yield row_to_item(row, now)
            if len(rows) < size:
                return
            last = rows[-1]
            after = (last[4], last[5], last[8], last[0])
            if remaining is not None:
                remaining -= len(rows)

    def stats(self) -> QueueStats:
        """Counts by (effective) status, capacity and the persistent eviction counters."""
        with self.transaction(write=False) as db:
            now = self.clock()
            by_status = db.query(
                "SELECT status, COUNT(*), COALESCE(SUM(seen_count), 0) FROM items GROUP BY status"
            )
            expired = db.query(
                "SELECT COUNT(*) FROM items WHERE status = 'claimed' AND lease_expires_at <= ?",
                (now,),
            )
            meta = dict(db.query("SELECT key, value FROM meta"))
        counts = {status: int(n) for status, n, _ in by_status}
        seen = sum(int(s) for _, _, s in by_status)
        n_expired = int(expired[0][0])
        return QueueStats(
            queued=counts.get("queued", 0) + n_expired,
            claimed=counts.get("claimed", 0) - n_expired,
            done=counts.get("done", 0),
            expired_leases=n_expired,
            capacity=int(meta.get("capacity", self._capacity)),
            evicted=int(meta.get("evicted", 0)),
            rejected=int(meta.get("rejected", 0)),
            duplicates=seen - sum(counts.values()),
            schema_version=int(meta.get("schema_version", 0)),
        )


def _check_worker(worker: str | None) -> str | None:
    if worker is None:
        return None
    if not isinstance(worker, str) or not worker:
        raise ValueError(f"Expected `worker` to be a non-empty string, but got {worker!r}.")
    return worker
