"""Admission of new sightings into the label queue, inside one write transaction.

:func:`admit` runs four steps, each a function here:

1. :func:`group_sightings` collapses the batch to one group per (model, content hash);
2. :func:`merge_known_inputs` adds the sightings of inputs already stored, keeping the
   evidence of the most-OOD sighting;
3. :func:`admit_new_inputs` inserts new inputs most OOD first, into the free room, then by
   evicting less-OOD queued items while a newcomer wins;
4. :func:`tally` says what happened to each given item, and :func:`persist_counters` adds
   the evictions and rejections to the persistent counters.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from oodmon.label_queue._sql import (
    CHUNK,
    INSERT,
    PRIORITY_DESC,
    Backend,
    expire_leases,
)
from oodmon.label_queue.item import AddResult, QueueItem

__all__ = [
    "Group",
    "admit",
    "admit_new_inputs",
    "group_sightings",
    "merge_known_inputs",
    "persist_counters",
    "tally",
]

#: (model, content hash): what deduplication keys on.
Key = tuple[str, str]


class Group:
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
        """The values of :data:`~oodmon.label_queue._sql.INSERT` for this input."""
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


def admit(db: Backend, batch: Sequence[QueueItem], now: float, default_capacity: int) -> AddResult:
    """Add ``batch`` within the caller's write transaction (adders already serialised)."""
    groups, keys = group_sightings(batch)
    expire_leases(db, now)
    meta = dict(db.query("SELECT key, value FROM meta"))
    capacity = int(meta.get("capacity", default_capacity))
    n_open = int(db.query("SELECT COUNT(*) FROM items WHERE status IN ('queued', 'claimed')")[0][0])
    known = merge_known_inputs(db, groups)
    evicted = admit_new_inputs(db, groups, room=max(capacity - n_open, 0))
    ids, added, merged, rejected = tally(keys, groups, known)
    persist_counters(db, meta, evicted=evicted, rejected=rejected)
    depth = int(db.query("SELECT COUNT(*) FROM items WHERE status = 'queued'")[0][0])
    return AddResult(ids, added, merged, evicted, rejected, depth)


def group_sightings(batch: Sequence[QueueItem]) -> tuple[dict[Key, Group], list[Key]]:
    """Step 1: one group per (model, content hash), and the key of every given item."""
    groups: dict[Key, Group] = {}
    keys: list[Key] = []
    for item in batch:
        key = (item.model, item.content_hash)
        keys.append(key)
        group = groups.get(key)
        if group is None:
            groups[key] = Group(item)
        else:
            group.merge(item)
    return groups, keys


def merge_known_inputs(db: Backend, groups: dict[Key, Group]) -> set[Key]:
    """Step 2: one more sighting for stored inputs, and better evidence if more OOD.

    Returns:
        The keys that were already stored (their groups get ``stored_id``).
    """
    stored = _lookup(db, list(groups))
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
    return set(stored)


def admit_new_inputs(db: Backend, groups: dict[Key, Group], room: int) -> int:
    """Step 3: insert new inputs, most OOD first: fill ``room``, then evict while they win.

    Admitted groups get ``stored_id``; rejected ones keep None.

    Returns:
        How many queued items were evicted.
    """
    fresh = sorted((g for g in groups.values() if g.stored_id is None), key=lambda g: g.key)
    _assign_ids(db, fresh)
    admitted, contenders = fresh[:room], fresh[room:]
    evicted = 0
    for group in contenders:
        # the newcomer must beat the least-OOD queued item, stored or admitted just now;
        # contenders are sorted, so once one loses, all the rest lose too
        victim = db.query(
            f"SELECT id, p_value, distance FROM items WHERE status = 'queued' "
            f"ORDER BY {PRIORITY_DESC} LIMIT 1{db.lock_clause}"
        )
        if not victim:
            break
        weakest = (float(victim[0][1]), float(victim[0][2]))
        if (admitted and admitted[-1].key > weakest) or group.key >= weakest:
            break
        db.execute("DELETE FROM items WHERE id = ?", (victim[0][0],))
        evicted += 1
        admitted.append(group)
    db.executemany(INSERT, [g.row() for g in admitted])
    for group in admitted:
        group.stored_id = group.new_id
    return evicted


def tally(
    keys: list[Key], groups: dict[Key, Group], known: set[Key]
) -> tuple[list[str | None], int, int, int]:
    """Step 4a: the stored id of every given item, and the added / merged / rejected counts."""
    ids: list[str | None] = []
    added = merged = rejected = 0
    counted: set[Key] = set()
    for key in keys:
        group = groups[key]
        ids.append(group.stored_id)
        if group.stored_id is None:
            rejected += 1
        elif key in known or key in counted:
            merged += 1
        else:
            added += 1
            counted.add(key)
    return ids, added, merged, rejected


def persist_counters(db: Backend, meta: dict[str, str], *, evicted: int, rejected: int) -> None:
    """Step 4b: add this batch's evictions and rejections to the counters in ``meta``."""
    for name, count in (("evicted", evicted), ("rejected", rejected)):
        if count:
            db.execute(
                "UPDATE meta SET value = ? WHERE key = ?",
                (str(int(meta.get(name, "0")) + count), name),
            )


def _lookup(db: Backend, keys: list[Key]) -> dict[Key, tuple[str, float, float]]:
    """Stored ``(id, p_value, distance)`` by (model, content hash), in few queries."""
    found: dict[Key, tuple[str, float, float]] = {}
    by_model: dict[str, list[str]] = {}
    for model, digest in keys:
        by_model.setdefault(model, []).append(digest)
    for model, digests in by_model.items():
        for start in range(0, len(digests), CHUNK):
            chunk = digests[start : start + CHUNK]
            marks = ", ".join("?" * len(chunk))  # placeholders only; values are bound
            rows = db.query(
                "SELECT content_hash, id, p_value, distance FROM items "
                f"WHERE model = ? AND content_hash IN ({marks})",
                (model, *chunk),
            )
            for digest, item_id, p, d in rows:
                found[(model, digest)] = (item_id, float(p), float(d))
    return found


def _assign_ids(db: Backend, groups: list[Group]) -> None:
    """Give every new item a free id: a caller id taken by other content gets a suffix."""
    wanted = [g.first.id for g in groups]
    taken: set[str] = set()
    for start in range(0, len(wanted), CHUNK):
        chunk = wanted[start : start + CHUNK]
        marks = ", ".join("?" * len(chunk))
        taken |= {row[0] for row in db.query(f"SELECT id FROM items WHERE id IN ({marks})", chunk)}
    for group in groups:
        item_id = group.first.id
        while item_id in taken:  # keep both items rather than lose one
            item_id = f"{group.first.id}~{uuid.uuid4().hex[:12]}"
        taken.add(item_id)
        group.new_id = item_id
