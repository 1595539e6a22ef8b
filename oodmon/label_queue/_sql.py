"""The label queue's SQL: the schema, column lists, priority orders, and the Backend protocol.

Table and column names are constants written here; every value reaches the database through
a ``?`` placeholder (each backend adapts the placeholder to its driver).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from oodmon.label_queue.item import QueueItem

__all__ = [
    "CHUNK",
    "COLS_NO_INPUT",
    "COLS_WITH_INPUT",
    "INSERT",
    "META_COUNTERS",
    "PRIORITY",
    "PRIORITY_DESC",
    "SCHEMA_VERSION",
    "STATUS_FILTERS",
    "Backend",
    "expire_leases",
    "row_to_item",
    "schema_statements",
]

#: Version of the database layout. Bump it (and write a migration) when the schema changes.
SCHEMA_VERSION = 1


class Backend(Protocol):
    """What :class:`~oodmon.label_queue.LabelQueue` needs from a database.

    Implemented by ``label_queue.sqlite`` and ``label_queue.postgres``. SQL reaches a
    backend with ``?`` placeholders; the backend adapts them. ``lock_clause`` is appended to
    SELECTs whose rows are about to be changed (``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
    empty on SQLite where ``BEGIN IMMEDIATE`` serialises writers).
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


def schema_statements(backend: Backend) -> list[str]:
    """The statements that create the tables and the priority index, if missing."""
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
COLS = (
    "id, model, model_version, content_hash, p_value, distance, score, predicted, "
    "created_at, last_seen_at, seen_count, {npy} AS input_npy, input_ref, "
    "length(input_npy) AS input_size, calibration, status, claimed_by, lease_expires_at, "
    "label, labelled_at"
)
COLS_WITH_INPUT = COLS.format(npy="input_npy")
COLS_NO_INPUT = COLS.format(npy="NULL")
PRIORITY = "p_value, distance, created_at, id"
PRIORITY_DESC = "p_value DESC, distance DESC, created_at DESC, id DESC"
INSERT = (
    "INSERT INTO items (id, model, model_version, calibration, content_hash, p_value, "
    "distance, score, predicted, created_at, last_seen_at, seen_count, input_npy, input_ref, "
    "status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')"
)
CHUNK = 500  # values per IN (...) list
STATUS_FILTERS = {
    # effective status: a claim whose lease lapsed reads as queued
    "queued": ("(status = 'queued' OR (status = 'claimed' AND lease_expires_at <= ?))", 1),
    "claimed": ("(status = 'claimed' AND lease_expires_at > ?)", 1),
    "done": ("status = 'done'", 0),
}
META_COUNTERS = ("evicted", "rejected")


def expire_leases(db: Backend, now: float) -> None:
    """Queue again every claimed item whose lease lapsed by ``now`` (inside a transaction)."""
    db.execute(
        "UPDATE items SET status = 'queued', claimed_by = NULL, lease_expires_at = NULL "
        "WHERE id IN (SELECT id FROM items WHERE status = 'claimed' "
        f"AND lease_expires_at <= ?{db.lock_clause})",
        (now,),
    )


def row_to_item(row: Sequence[Any], now: float) -> QueueItem:
    """The item of one row selected with ``COLS_WITH_INPUT`` or ``COLS_NO_INPUT``.

    A claim whose lease lapsed by ``now`` reads as queued.
    """
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
