"""LabelQueue (``label_queue.store``) on a real SQLite file and a real PostgreSQL server:
priority, inputs, claims and leases, schema checks, read-only queues."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from label_queue_helpers import put

from oodmon.errors import FormatVersionError
from oodmon.label_queue import (
    SCHEMA_VERSION,
    ItemNotFoundError,
    LabelQueue,
    LeaseError,
    QueueItem,
    ReadOnlyQueueError,
    SchemaVersionError,
)
from oodmon.label_queue.export import export_queue


def test_items_come_most_ood_first(url, clock):
    with LabelQueue(url, clock=clock) as q:
        evidence = [(0.2, 1.0), (0.01, 3.0), (0.01, 0.5), (0.5, 0.1), (0.001, 9.0)]
        ids = [put(q, seed, p, d) for seed, (p, d) in enumerate(evidence)]
        expected = [ids[i] for i in sorted(range(5), key=lambda i: evidence[i])]
        assert [it.id for it in q.items()] == expected
        assert [it.id for it in q.claim(2, "ann", 60)] == expected[:2]
        assert [it.id for it in q.claim(10, "bob", 60)] == expected[2:]


def test_tensor_inputs_are_stored_as_npy(url, clock):
    x = torch.rand(1, 6, 5, dtype=torch.float32)
    with LabelQueue(url, clock=clock) as q:
        item_id = q.put(x, model="m", version="1", p_value=0.01, distance=0.2)
        item = q.get(item_id)
        assert item is not None and item.input is not None
        np.testing.assert_array_equal(item.input, x.numpy())
        assert item.input.dtype == np.float32


def test_lapsed_lease_comes_back_and_live_lease_is_respected(url, clock):
    with LabelQueue(url, clock=clock) as q:
        a = put(q, 1, 0.01)
        b = put(q, 2, 0.02)
        assert [it.id for it in q.claim(1, "ann", lease_seconds=30)] == [a]
        assert [it.id for it in q.claim(5, "bob", lease_seconds=30)] == [b]
        assert q.claim(5, "cid", 30) == []
        clock.advance(29)
        assert q.claim(5, "cid", 30) == []
        clock.advance(2)  # both leases lapsed: "crashed labellers" give items back
        stats = q.stats()
        assert (stats.queued, stats.claimed, stats.expired_leases) == (2, 0, 2)
        assert [it.status for it in q.items()] == ["queued", "queued"]
        got = q.claim(5, "cid", 30)
        assert [it.id for it in got] == [a, b]
        assert all(it.claimed_by == "cid" and it.status == "claimed" for it in got)
        assert got[0].lease_expires_at == pytest.approx(clock.now + 30)


def test_done_and_release_rules(url, clock):
    with LabelQueue(url, clock=clock) as q:
        a = put(q, 1, 0.01)
        b = put(q, 2, 0.02)
        q.claim(2, "ann", 60)
        with pytest.raises(LeaseError, match="claimed by 'ann'"):
            q.done(a, "cat", worker="bob")
        with pytest.raises(LeaseError):
            q.release(a, worker="bob")
        item = q.done(a, "cat", worker="ann")
        assert (item.status, item.label, item.claimed_by) == ("done", "cat", "ann")
        assert item.labelled_at == clock.now
        with pytest.raises(LeaseError, match="already labelled"):
            q.release(a)
        q.release(b, worker="ann")
        assert q.get(b).status == "queued"
        assert q.done(b, "dog").status == "done"  # no worker: admin override
        clock.advance(100)
        assert q.done(a, "bird", worker="bob").label == "bird"  # relabel
        with pytest.raises(ItemNotFoundError):
            q.done("nope", "cat")
        with pytest.raises(ValueError):
            q.claim(0, "ann")
        with pytest.raises(ValueError):
            q.claim(1, "", 10)


def test_concurrent_claimers_never_share_an_item(url, clock, request):
    n_items, n_workers = (1000, 4) if "postgresql" in request.node.callspec.id else (300, 4)
    with LabelQueue(url, clock=clock) as q:
        q.add(
            [
                QueueItem.create(
                    model="m",
                    version="1",
                    p_value=(i + 1) / (n_items + 1),
                    distance=1.0,
                    reference=f"ref-{i}",
                    timestamp=clock.now,
                )
                for i in range(n_items)
            ]
        )
        assert q.stats().queued == n_items
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n_workers)

    def work(name: str) -> None:
        try:
            with LabelQueue(url, clock=clock, timeout=30) as mine:  # its own connection
                got: list[str] = []
                start.wait()
                while batch := mine.claim(7, name, lease_seconds=3600):
                    got.extend(it.id for it in batch)
                claimed[name] = got
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    counts = Counter(i for ids in claimed.values() for i in ids)
    assert len(counts) == n_items
    assert set(counts.values()) == {1}
    assert sorted(claimed) == [f"w{i}" for i in range(n_workers)]
    with LabelQueue(url, clock=clock) as q:
        assert q.stats().claimed == n_items


def test_schema_version_mismatch_is_a_clear_error(url, clock):
    with LabelQueue(url, clock=clock):
        pass
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    else:
        conn = sqlite3.connect(url)
        with conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.close()
    with pytest.raises(SchemaVersionError, match=f"'99'.*version {SCHEMA_VERSION}") as info:
        LabelQueue(url)
    assert isinstance(info.value, FormatVersionError)


def test_read_only_queue_never_writes(url, clock, tmp_path):
    with LabelQueue(url, clock=clock) as q:
        put(q, 1, 0.01)
        put(q, 2, 0.02)
    before = None
    if not url.startswith("postgresql"):
        before = (Path(url).read_bytes(), Path(url).stat().st_mtime_ns)
    with LabelQueue(url, read_only=True, clock=clock) as ro:
        assert len(ro.items()) == 2
        assert ro.stats().queued == 2
        assert export_queue(ro, tmp_path / "a.json") == 2
        assert export_queue(ro, tmp_path / "a.jsonl", format="jsonl") == 2
        for write in (
            lambda: put(ro, 3, 0.5),
            lambda: ro.claim(1, "ann"),
            lambda: ro.done(ro.items()[0].id, "x"),
            lambda: ro.release("x"),
        ):
            with pytest.raises(ReadOnlyQueueError, match="read-only"):
                write()
        if before is not None:
            assert ro._db.conn.total_changes == 0  # type: ignore[union-attr]
        else:  # the server itself refuses writes in this session
            with pytest.raises(ReadOnlyQueueError), ro._db.transaction(write=False):  # type: ignore[union-attr]
                ro._db.execute("DELETE FROM items")  # type: ignore[union-attr]
    if before is not None:
        assert (Path(url).read_bytes(), Path(url).stat().st_mtime_ns) == before
    with LabelQueue(url, clock=clock) as q:
        assert len(q.items()) == 2
