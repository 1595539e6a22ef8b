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
in a URL never appears in errors, logs or ``repr`` (:func:`redact_url`); a queue opened with
``read_only=True`` never writes (SQLite ``mode=ro``; PostgreSQL read-only transactions).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import IO, Any, Protocol

import numpy as np

from oodmon.errors import FormatVersionError, OodmonError
from oodmon.queue_url import QueueURL, parse_url

#: Version of the database layout. Bump it (and write a migration) when the schema changes.
SCHEMA_VERSION = 1
#: Open items (queued + claimed) a new queue holds by default.
DEFAULT_CAPACITY = 100_000
STATUSES = ("queued", "claimed", "done")

# ---------------------------------------------------------------------- errors


class QueueError(OodmonError):
    """Base class for label-queue errors."""


class SchemaVersionError(QueueError, FormatVersionError):
    """The database was written with another label-queue schema version."""


class QueueUnavailableError(QueueError, ConnectionError):
    """The database could not be reached or is busy (a runtime failure, worth retrying)."""


class ReadOnlyQueueError(QueueError, PermissionError):
    """A write was attempted on a queue opened with ``read_only=True``."""


class NotAQueueError(QueueError, ValueError):
    """The database exists but is not an oodmon label queue (or not a database at all)."""


class ItemNotFoundError(QueueError, ValueError, LookupError):
    """No item with this id (a ValueError too: the caller named it)."""


class LeaseError(QueueError, ValueError):
    """Another worker holds a live lease on the item, or the item is already labelled."""


# ---------------------------------------------------------------------- items


@dataclass(frozen=True)
class QueueItem:
    """One input waiting for (or having received) a label.

    Attributes:
        id: the item id (caller-given or a random UUID hex).
        model, model_version: the model that flagged it (the most-OOD sighting's version).
        content_hash: SHA-256 hex of the input's ``.npy`` bytes (or of its reference).
        p_value: conformal p-value of the most-OOD sighting (smaller = more OOD).
        distance: distance to the OCS of that sighting (smaller = more OOD); ``inf`` if unknown.
        score: the detector's OOD score (higher = more OOD), or None.
        predicted: the model's predicted class, or -1.
        created_at, last_seen_at: UTC Unix seconds of the first and latest sighting.
        seen_count: how many times this input was flagged.
        input_npy: the input as ``np.save`` bytes, or None (reference only / not loaded).
        input_ref: a URI or key for the input, or None.
        input_size: bytes of the stored input, or None if none is stored (set on reads).
        calibration: the detector's calibration hash, if known.
        status: ``"queued"``, ``"claimed"`` or ``"done"`` (a lapsed claim reads as queued).
        claimed_by, lease_expires_at: the worker holding it and until when (UTC seconds).
        label, labelled_at: the label given with :meth:`LabelQueue.done` and when.
    """

    id: str
    model: str
    model_version: str
    content_hash: str
    p_value: float
    distance: float
    score: float | None = None
    predicted: int = -1
    created_at: float = 0.0
    last_seen_at: float = 0.0
    seen_count: int = 1
    input_npy: bytes | None = field(default=None, repr=False)
    input_ref: str | None = None
    input_size: int | None = None
    calibration: str | None = None
    status: str = "queued"
    claimed_by: str | None = None
    lease_expires_at: float | None = None
    label: str | None = None
    labelled_at: float | None = None

    @property
    def input(self) -> np.ndarray | None:
        """The stored input as an array (``np.load``, no pickle), or None."""
        if self.input_npy is None:
            return None
        return np.load(io.BytesIO(self.input_npy), allow_pickle=False)

    @property
    def model_tag(self) -> str:
        """``model@version#calibration`` (``#calibration`` only when known)."""
        tag = f"{self.model}@{self.model_version}"
        return f"{tag}#{self.calibration}" if self.calibration else tag

    @classmethod
    def create(
        cls,
        *,
        model: str,
        version: str,
        p_value: float,
        distance: float,
        input: Any = None,
        reference: str | None = None,
        store_input: bool = True,
        score: float | None = None,
        predicted: int = -1,
        id: str | None = None,
        timestamp: float | None = None,
        calibration: str | None = None,
        input_npy: bytes | None = None,
    ) -> QueueItem:
        """Build an item from one flagged input and its evidence.

        Args:
            input: the input (tensor, array, nested list of numbers), or a ``str`` taken as
                its reference, or None.
            reference: a URI or key for the input (stored as ``input_ref``).
            store_input: False keeps only the reference; the input, if given, is still
                hashed so that duplicates are recognised.
            timestamp: UTC Unix seconds of the sighting (default: now).
            input_npy: the input already encoded with ``np.save`` (instead of ``input``).

        Raises:
            ValueError: missing model/version, a p-value outside [0, 1], or an input that
                cannot be stored as a plain numeric array.
        """
        for name, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"Expected `{name}` to be a non-empty string, but got {value!r}.")
        p = float(p_value)
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"Expected `p_value` in [0, 1], but got {p_value!r}.")
        d = float(distance)
        d = math.inf if math.isnan(d) else d
        s = None if score is None or not math.isfinite(float(score)) else float(score)
        if isinstance(input, str):
            reference = reference if reference is not None else input
            input = None
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"Expected `reference` to be a string, but got {reference!r}.")
        if id is not None and (not isinstance(id, str) or not id):
            raise ValueError(f"Expected `id` to be a non-empty string, but got {id!r}.")
        npy = input_npy if input is None else npy_bytes(input)
        if npy is not None:
            digest = hashlib.sha256(npy).hexdigest()
        elif reference is not None:
            digest = hashlib.sha256(b"ref:" + reference.encode()).hexdigest()
        elif id is not None:
            digest = hashlib.sha256(b"id:" + id.encode()).hexdigest()
        else:  # nothing identifies the input: never deduplicated
            digest = hashlib.sha256(b"uuid:" + uuid.uuid4().bytes).hexdigest()
        now = time.time() if timestamp is None else float(timestamp)
        return cls(
            id=id if id is not None else uuid.uuid4().hex,
            model=model,
            model_version=version,
            content_hash=digest,
            p_value=p,
            distance=d,
            score=s,
            predicted=int(predicted),
            created_at=now,
            last_seen_at=now,
            input_npy=npy if store_input else None,
            input_ref=reference,
            input_size=None if npy is None or not store_input else len(npy),
            calibration=calibration,
        )

    def to_json(self, include_input: bool = True) -> dict[str, Any]:
        """A JSON-ready dict of every field (input as base64 ``.npy``; inf/NaN as None)."""
        out: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if name == "input_npy":
                if include_input:
                    out["input_npy_b64"] = (
                        None if value is None else base64.b64encode(value).decode("ascii")
                    )
                continue
            out[name] = finite_or_none(value) if isinstance(value, float) else value
        return out


_FIELDS = tuple(QueueItem.__dataclass_fields__)


def npy_bytes(value: Any) -> bytes:
    """``np.save`` bytes of a tensor, array or nested list (moved to the host; no pickle).

    Raises:
        ValueError: the value is not a plain numeric/boolean array.
    """
    try:
        import torch

        if isinstance(value, torch.Tensor):
            t = value.detach()
            if t.dtype in (torch.bfloat16,):
                t = t.to(torch.float32)
            value = t.cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.ascontiguousarray(np.asarray(value))
    if arr.dtype.kind not in "biufc":
        raise ValueError(
            f"Expected a numeric input (tensor or array), but got dtype {arr.dtype}; "
            "pass a reference (a URI or key) for other kinds of input."
        )
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class AddResult:
    """What one :meth:`LabelQueue.add` call did (one transaction).

    Attributes:
        ids: per given item, the id it is stored under (an existing id for a duplicate), or
            None when it was rejected because the queue was full of more-OOD items.
        added, merged, evicted, rejected: counts for this call.
        depth: queued items after the call.
    """

    ids: list[str | None]
    added: int = 0
    merged: int = 0
    evicted: int = 0
    rejected: int = 0
    depth: int = 0


@dataclass(frozen=True)
class QueueStats:
    """Counts of a label queue.

    Attributes:
        queued: items waiting (a lapsed claim counts here; see ``expired_leases``).
        claimed: items under a live lease.
        done: labelled items.
        expired_leases: claims whose lease lapsed (included in ``queued``).
        capacity: bound on open (queued + claimed) items.
        evicted: items evicted to make room, ever.
        rejected: new items turned away because the queue was full of more-OOD ones, ever.
        duplicates: sightings merged into an existing item (sum of seen_count - items).
        schema_version: the database's schema version.
    """

    queued: int
    claimed: int
    done: int
    expired_leases: int
    capacity: int
    evicted: int
    rejected: int
    duplicates: int
    schema_version: int

    @property
    def total(self) -> int:
        return self.queued + self.claimed + self.done

    def as_dict(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "claimed": self.claimed,
            "done": self.done,
            "total": self.total,
            "expired_leases": self.expired_leases,
            "capacity": self.capacity,
            "evicted": self.evicted,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "schema_version": self.schema_version,
        }


# ---------------------------------------------------------------------- backends


class Backend(Protocol):
    """What :class:`LabelQueue` needs from a database (see ``queue_sqlite``/``queue_postgres``).

    SQL reaches a backend with ``?`` placeholders; the backend adapts them. ``lock_clause``
    is appended to SELECTs whose rows are about to be changed (``FOR UPDATE SKIP LOCKED`` on
    PostgreSQL, empty on SQLite where ``BEGIN IMMEDIATE`` serialises writers).
    """

    name: str
    float_type: str
    blob_type: str
    lock_clause: str
    read_only: bool

    def transaction(self, write: bool) -> AbstractContextManager[None]: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def table_names(self) -> set[str]: ...

    def serialize_adders(self) -> None: ...

    def serialize_schema(self) -> None: ...

    def close(self) -> None: ...


def _schema(backend: Backend) -> list[str]:
    f, b = backend.float_type, backend.blob_type
    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS items (
            id TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            calibration TEXT,
            content_hash TEXT NOT NULL,
            p_value {f} NOT NULL,
            distance {f} NOT NULL,
            score {f},
            predicted BIGINT NOT NULL,
            created_at {f} NOT NULL,
            last_seen_at {f} NOT NULL,
            seen_count BIGINT NOT NULL DEFAULT 1,
            input_npy {b},
            input_ref TEXT,
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'claimed', 'done')),
            claimed_by TEXT,
            lease_expires_at {f},
            label TEXT,
            labelled_at {f},
            UNIQUE (model, content_hash)
        )""",
        "CREATE INDEX IF NOT EXISTS items_priority "
        "ON items (status, p_value, distance, created_at, id)",
    ]


# Column lists and clauses are constants; every value goes through a placeholder.
_COLS = (
    "id, model, model_version, content_hash, p_value, distance, score, predicted, "
    "created_at, last_seen_at, seen_count, {npy} AS input_npy, input_ref, "
    "length(input_npy) AS input_size, calibration, status, claimed_by, lease_expires_at, "
    "label, labelled_at"
)
_COLS_WITH_INPUT = _COLS.format(npy="input_npy")
_COLS_NO_INPUT = _COLS.format(npy="NULL")
_PRIORITY = "p_value, distance, created_at, id"
_PRIORITY_DESC = "p_value DESC, distance DESC, created_at DESC, id DESC"
_INSERT = (
    "INSERT INTO items (id, model, model_version, calibration, content_hash, p_value, "
    "distance, score, predicted, created_at, last_seen_at, seen_count, input_npy, input_ref, "
    "status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')"
)
_CHUNK = 500  # values per IN (...) list
_STATUS_FILTERS = {
    # effective status: a claim whose lease lapsed reads as queued
    "queued": ("(status = 'queued' OR (status = 'claimed' AND lease_expires_at <= ?))", 1),
    "claimed": ("(status = 'claimed' AND lease_expires_at > ?)", 1),
    "done": ("status = 'done'", 0),
}
_META_DEFAULTS = ("evicted", "rejected")


class _Group:
    """The sightings of one input within one :meth:`LabelQueue.add` batch."""

    def __init__(self, item: QueueItem) -> None:
        self.first = item  # its id, input and reference are the ones stored
        self.best = item  # the most-OOD sighting: its evidence is the one stored
        self.count = 1
        self.created = item.created_at
        self.last_seen = item.last_seen_at
        self.stored_id: str | None = None
        self.new_id = item.id

    @property
    def key(self) -> tuple[float, float]:
        """Priority of the best sighting: smaller = more OOD."""
        return (self.best.p_value, self.best.distance)

    def merge(self, item: QueueItem) -> None:
        self.count += 1
        if (item.p_value, item.distance) < (self.best.p_value, self.best.distance):
            self.best = item
        self.created = min(self.created, item.created_at)
        self.last_seen = max(self.last_seen, item.last_seen_at)

    def row(self) -> tuple[Any, ...]:
        first, best = self.first, self.best
        return (
            self.new_id,
            first.model,
            best.model_version,
            best.calibration,
            first.content_hash,
            best.p_value,
            best.distance,
            best.score,
            best.predicted,
            self.created,
            self.last_seen,
            self.count,
            first.input_npy,
            first.input_ref,
        )


def _open_backend(location: QueueURL, *, read_only: bool, create: bool, timeout: float) -> Backend:
    if location.backend == "postgresql":
        from oodmon.queue_postgres import PostgresBackend

        return PostgresBackend(location, read_only=read_only, create=create, timeout=timeout)
    from oodmon.queue_sqlite import SQLiteBackend

    return SQLiteBackend(location, read_only=read_only, create=create, timeout=timeout)


# ---------------------------------------------------------------------- the queue


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
        db = _open_backend(
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
                    + ("" if tables else "; open it without read_only=True to create one")
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
            for statement in _schema(db):
                db.execute(statement)
            defaults = {
                "schema_version": str(SCHEMA_VERSION),
                "capacity": str(capacity or DEFAULT_CAPACITY),
                "created_at": repr(self.clock()),
                **{key: "0" for key in _META_DEFAULTS},
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
        return self.location.backend

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._db is None

    def _conn(self, write: bool) -> Backend:
        if self._db is None:
            raise QueueError(f"The label queue {self.url} is closed.")
        if write and self.read_only:
            raise ReadOnlyQueueError(
                f"The label queue {self.url} was opened read-only; open it without "
                "read_only=True to change it."
            )
        return self._db

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Backend]:
        """The queue's database inside one transaction, for companion tables.

        For modules that keep their own table beside the queue (e.g. the Label Studio task
        ids of :mod:`oodmon.label_studio`). SQL takes ``?`` placeholders on every backend;
        the ``items`` and ``meta`` tables belong to the queue: never write them through this.

        Raises:
            ReadOnlyQueueError: ``write=True`` on a read-only queue.
        """
        with self._lock:
            db = self._conn(write=write)
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
        with self._lock:
            db = self._conn(write=True)
            with db.transaction(write=True):
                db.serialize_adders()
                return self._add_locked(db, batch)

    def _add_locked(self, db: Backend, batch: list[QueueItem]) -> AddResult:
        # 1. collapse the batch to one entry per (model, content hash)
        groups: dict[tuple[str, str], _Group] = {}
        keys: list[tuple[str, str]] = []
        for item in batch:
            key = (item.model, item.content_hash)
            keys.append(key)
            group = groups.get(key)
            if group is None:
                groups[key] = _Group(item)
            else:
                group.merge(item)
        now = self.clock()
        self._expire_leases(db, now)
        meta = dict(db.query("SELECT key, value FROM meta"))
        capacity = int(meta.get("capacity", self._capacity))
        n_open = int(
            db.query("SELECT COUNT(*) FROM items WHERE status IN ('queued', 'claimed')")[0][0]
        )
        # 2. inputs seen before: one more sighting, and better evidence if it is more OOD
        stored = self._lookup(db, list(groups))
        better, sightings = [], []
        for key, (item_id, p, d) in stored.items():
            group = groups[key]
            group.stored_id = item_id
            best = group.best
            if (best.p_value, best.distance) < (p, d):
                better.append(
                    (
                        group.count,
                        group.last_seen,
                        group.last_seen,
                        best.p_value,
                        best.distance,
                        best.score,
                        best.predicted,
                        best.model_version,
                        best.calibration,
                        item_id,
                    )
                )
            else:
                sightings.append((group.count, group.last_seen, group.last_seen, item_id))
        latest = "last_seen_at = CASE WHEN last_seen_at < ? THEN ? ELSE last_seen_at END"
        db.executemany(
            f"UPDATE items SET seen_count = seen_count + ?, {latest}, p_value = ?, "
            "distance = ?, score = ?, predicted = ?, model_version = ?, calibration = ? "
            "WHERE id = ?",
            better,
        )
        db.executemany(
            f"UPDATE items SET seen_count = seen_count + ?, {latest} WHERE id = ?", sightings
        )
        # 3. new inputs, most OOD first: fill the free room, then evict while newcomers win
        fresh = sorted((g for g in groups.values() if g.stored_id is None), key=lambda g: g.key)
        self._assign_ids(db, fresh)
        room = max(capacity - n_open, 0)
        admitted, contenders = fresh[:room], fresh[room:]
        evicted = 0
        for group in contenders:
            # the newcomer must beat the least-OOD queued item, stored or admitted just now;
            # contenders are sorted, so once one loses, all the rest lose too
            victim = db.query(
                f"SELECT id, p_value, distance FROM items WHERE status = 'queued' "
                f"ORDER BY {_PRIORITY_DESC} LIMIT 1{db.lock_clause}"
            )
            if not victim:
                break
            weakest = (float(victim[0][1]), float(victim[0][2]))
            if (admitted and admitted[-1].key > weakest) or group.key >= weakest:
                break
            db.execute("DELETE FROM items WHERE id = ?", (victim[0][0],))
            evicted += 1
            admitted.append(group)
        db.executemany(_INSERT, [g.row() for g in admitted])
        for group in admitted:
            group.stored_id = group.new_id
        # 4. tally per given item, and persist the counters
        ids: list[str | None] = []
        added = merged = rejected = 0
        counted: set[tuple[str, str]] = set()
        for key in keys:
            group = groups[key]
            ids.append(group.stored_id)
            if group.stored_id is None:
                rejected += 1
            elif key in stored or key in counted:
                merged += 1
            else:
                added += 1
                counted.add(key)
        for name, count in (("evicted", evicted), ("rejected", rejected)):
            if count:
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = ?",
                    (str(int(meta.get(name, "0")) + count), name),
                )
        depth = int(db.query("SELECT COUNT(*) FROM items WHERE status = 'queued'")[0][0])
        return AddResult(ids, added, merged, evicted, rejected, depth)

    def _lookup(
        self, db: Backend, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[str, float, float]]:
        """Stored ``(id, p_value, distance)`` by (model, content hash), in few queries."""
        found: dict[tuple[str, str], tuple[str, float, float]] = {}
        by_model: dict[str, list[str]] = {}
        for model, digest in keys:
            by_model.setdefault(model, []).append(digest)
        for model, digests in by_model.items():
            for start in range(0, len(digests), _CHUNK):
                chunk = digests[start : start + _CHUNK]
                marks = ", ".join("?" * len(chunk))  # placeholders only; values are bound
                rows = db.query(
                    "SELECT content_hash, id, p_value, distance FROM items "
                    f"WHERE model = ? AND content_hash IN ({marks})",
                    (model, *chunk),
                )
                for digest, item_id, p, d in rows:
                    found[(model, digest)] = (item_id, float(p), float(d))
        return found

    def _assign_ids(self, db: Backend, groups: list[_Group]) -> None:
        """Give every new item a free id: a caller id taken by other content gets a suffix."""
        wanted = [g.first.id for g in groups]
        taken: set[str] = set()
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            taken |= {
                row[0] for row in db.query(f"SELECT id FROM items WHERE id IN ({marks})", chunk)
            }
        for group in groups:
            item_id = group.first.id
            while item_id in taken:  # keep both items rather than lose one
                item_id = f"{group.first.id}~{uuid.uuid4().hex[:12]}"
            taken.add(item_id)
            group.new_id = item_id

    def _expire_leases(self, db: Backend, now: float) -> None:
        db.execute(
            "UPDATE items SET status = 'queued', claimed_by = NULL, lease_expires_at = NULL "
            "WHERE id IN (SELECT id FROM items WHERE status = 'claimed' "
            f"AND lease_expires_at <= ?{db.lock_clause})",
            (now,),
        )

    # ------------------------------------------------------------------ labelling

    def claim(self, n: int, worker: str, lease_seconds: float = 600.0) -> list[QueueItem]:
        """Hand the ``n`` most-OOD queued items to ``worker`` under a lease, atomically.

        Items whose lease lapsed are queued again first. Two concurrent claimers never get
        the same item (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``FOR UPDATE SKIP LOCKED``).

        Returns:
            Up to n items (inputs included), most OOD first, with status ``"claimed"``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Expected `n` to be a positive integer, but got {n!r}.")
        if not isinstance(worker, str) or not worker:
            raise ValueError(f"Expected `worker` to be a non-empty string, but got {worker!r}.")
        lease = float(lease_seconds)
        if not (math.isfinite(lease) and lease > 0):
            raise ValueError(f"Expected `lease_seconds` > 0, but got {lease_seconds!r}.")
        with self._lock:
            db = self._conn(write=True)
            with db.transaction(write=True):
                now = self.clock()
                self._expire_leases(db, now)
                rows = db.query(
                    f"SELECT {_COLS_WITH_INPUT} FROM items WHERE status = 'queued' "
                    f"ORDER BY {_PRIORITY} LIMIT ?{db.lock_clause}",
                    (n,),
                )
                expires = now + lease
                db.executemany(
                    "UPDATE items SET status = 'claimed', claimed_by = ?, lease_expires_at = ? "
                    "WHERE id = ?",
                    [(worker, expires, row[0]) for row in rows],
                )
        return [
            replace(_item(row, now), status="claimed", claimed_by=worker, lease_expires_at=expires)
            for row in rows
        ]

    def done(self, id: str, label: str, worker: str | None = None) -> QueueItem:
        """Record ``label`` for item ``id`` and mark it done (labelling again overwrites).

        Raises:
            ItemNotFoundError: no such item.
            LeaseError: ``worker`` is given and another worker holds a live lease on it.
        """
        if not isinstance(label, str) or not label:
            raise ValueError(f"Expected `label` to be a non-empty string, but got {label!r}.")
        worker = _check_worker(worker)
        with self._lock:
            db = self._conn(write=True)
            with db.transaction(write=True):
                now = self.clock()
                _status, holder = self._lockable(db, id, worker, now, "label")
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
        with self._lock:
            db = self._conn(write=True)
            with db.transaction(write=True):
                now = self.clock()
                status, _ = self._lockable(db, id, worker, now, "release")
                if status == "done":
                    raise LeaseError(f"Item {id!r} is already labelled; it cannot be released.")
                db.execute(
                    "UPDATE items SET status = 'queued', claimed_by = NULL, "
                    "lease_expires_at = NULL WHERE id = ?",
                    (id,),
                )

    def _lockable(
        self, db: Backend, id: str, worker: str | None, now: float, action: str
    ) -> tuple[str, str | None]:
        lock = " FOR UPDATE" if db.lock_clause else ""
        rows = db.query(
            f"SELECT status, claimed_by, lease_expires_at FROM items WHERE id = ?{lock}", (id,)
        )
        if not rows:
            raise ItemNotFoundError(f"No item with id {id!r} in {self.url}.")
        status, holder, expires = rows[0]
        live = status == "claimed" and expires is not None and expires > now
        if worker is not None and live and holder != worker:
            raise LeaseError(
                f"Item {id!r} is claimed by {holder!r} until {format_utc(expires)}; {worker!r} "
                f"cannot {action} it (omit the worker to override)."
            )
        return str(status), holder

    # ------------------------------------------------------------------ reading

    def get(self, id: str, include_input: bool = True) -> QueueItem | None:
        """The item with this id, or None."""
        cols = _COLS_WITH_INPUT if include_input else _COLS_NO_INPUT
        with self._lock:
            db = self._conn(write=False)
            with db.transaction(write=False):
                rows = db.query(f"SELECT {cols} FROM items WHERE id = ?", (id,))
        return _item(rows[0], self.clock()) if rows else None

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

    ls = items

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
        if status is not None and status not in _STATUS_FILTERS:
            raise ValueError(
                f"Expected `status` to be one of {STATUSES} or None, but got {status!r}."
            )
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ValueError(f"Expected `limit` to be a non-negative integer, but got {limit!r}.")
        cols = _COLS_WITH_INPUT if include_inputs else _COLS_NO_INPUT
        now = self.clock()
        remaining = limit
        after: tuple[Any, ...] | None = None
        while remaining is None or remaining > 0:
            where: list[str] = []
            params: list[Any] = []
            if status is not None:
                clause, nparams = _STATUS_FILTERS[status]
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
            sql += f" ORDER BY {_PRIORITY} LIMIT ?"
            params.append(size)
            with self._lock:
                db = self._conn(write=False)
                with db.transaction(write=False):
                    rows = db.query(sql, params)
            for row in rows:
                yield _item(row, now)
            if len(rows) < size:
                return
            last = rows[-1]
            after = (last[4], last[5], last[8], last[0])
            if remaining is not None:
                remaining -= len(rows)

    def stats(self) -> QueueStats:
        """Counts by (effective) status, capacity and the persistent eviction counters."""
        with self._lock:
            db = self._conn(write=False)
            with db.transaction(write=False):
                now = self.clock()
                by_status = db.query(
                    "SELECT status, COUNT(*), COALESCE(SUM(seen_count), 0) FROM items "
                    "GROUP BY status"
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

    # ------------------------------------------------------------------ exports

    def export_label_studio(
        self,
        dest: str | os.PathLike[str] | IO[str],
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        class_names: Sequence[str] | None = None,
        from_name: str = "label",
        to_name: str = "image",
    ) -> int:
        """Write Label Studio import JSON (a list of tasks), most OOD first.

        See :func:`oodmon.queue_export.label_studio_task` for the task layout. Returns the
        number of tasks.
        """
        items = self.iter_items(status, model=model, limit=limit, include_inputs=True)
        from oodmon.queue_export import write_label_studio

        return write_label_studio(
            items, dest, class_names=class_names, from_name=from_name, to_name=to_name
        )

    def export_jsonl(
        self,
        dest: str | os.PathLike[str] | IO[str],
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        include_inputs: bool = True,
    ) -> int:
        """Write one JSON object per item and line (every field; input as base64 ``.npy``).

        Returns the number of lines.
        """
        items = self.iter_items(status, model=model, limit=limit, include_inputs=include_inputs)
        from oodmon.queue_export import write_jsonl

        return write_jsonl(items, dest, include_inputs=include_inputs)


def _check_worker(worker: str | None) -> str | None:
    if worker is None:
        return None
    if not isinstance(worker, str) or not worker:
        raise ValueError(f"Expected `worker` to be a non-empty string, but got {worker!r}.")
    return worker


def _item(row: Sequence[Any], now: float) -> QueueItem:
    (
        id_,
        model,
        version,
        digest,
        p,
        d,
        score,
        predicted,
        created,
        last_seen,
        seen,
        npy,
        ref,
        size,
        calibration,
        status,
        holder,
        expires,
        label,
        labelled,
    ) = row
    if status == "claimed" and expires is not None and expires <= now:
        status, holder, expires = "queued", None, None
    return QueueItem(
        id=id_,
        model=model,
        model_version=version,
        content_hash=digest,
        p_value=float(p),
        distance=float(d),
        score=None if score is None else float(score),
        predicted=int(predicted),
        created_at=float(created),
        last_seen_at=float(last_seen),
        seen_count=int(seen),
        input_npy=None if npy is None else bytes(npy),
        input_ref=ref,
        input_size=None if size is None else int(size),
        calibration=calibration,
        status=status,
        claimed_by=holder,
        lease_expires_at=None if expires is None else float(expires),
        label=label,
        labelled_at=None if labelled is None else float(labelled),
    )


def format_utc(t: float | None) -> str:
    """A Unix time as ``YYYY-MM-DDTHH:MM:SSZ`` (``-`` for None), for tables and messages."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def finite_or_none(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (JSON has no NaN or infinity)."""
    return value if value is not None and math.isfinite(value) else None
