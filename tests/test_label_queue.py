"""Behaviour of LabelQueue on a real SQLite file and a real PostgreSQL server (same suite)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
import sqlite3
import struct
import threading
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import postgres_server
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oodmon.errors import FormatVersionError
from oodmon.label_queue import (
    SCHEMA_VERSION,
    ItemNotFoundError,
    LabelQueue,
    LeaseError,
    NotAQueueError,
    QueueItem,
    QueueUnavailableError,
    ReadOnlyQueueError,
    SchemaVersionError,
)
from oodmon.queue_export import label_studio_task, png_bytes
from oodmon.queue_url import parse_url, redact_url


class Clock:
    """A settable UTC clock, so lease tests never sleep."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def url(queue_url: str) -> str:
    return queue_url


@pytest.fixture
def clock() -> Clock:
    return Clock()


def image(seed: int, shape: tuple[int, ...] = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def put(q: LabelQueue, seed: int, p: float, d: float = 1.0, **kw) -> str | None:
    kw.setdefault("model", "mnist")
    kw.setdefault("version", "v1")
    return q.put(image(seed), p_value=p, distance=d, **kw)


# ---------------------------------------------------------------------- priority and dedupe


def test_items_come_most_ood_first(url, clock):
    with LabelQueue(url, clock=clock) as q:
        evidence = [(0.2, 1.0), (0.01, 3.0), (0.01, 0.5), (0.5, 0.1), (0.001, 9.0)]
        ids = [put(q, seed, p, d) for seed, (p, d) in enumerate(evidence)]
        expected = [ids[i] for i in sorted(range(5), key=lambda i: evidence[i])]
        assert [it.id for it in q.items()] == expected
        assert [it.id for it in q.claim(2, "ann", 60)] == expected[:2]
        assert [it.id for it in q.claim(10, "bob", 60)] == expected[2:]


def test_same_input_twice_is_one_item_with_the_most_ood_evidence(url, clock):
    with LabelQueue(url, clock=clock) as q:
        first = put(q, 1, 0.04, 2.0, version="v1", predicted=3)
        clock.advance(10)
        again = put(q, 1, 0.01, 1.5, version="v2", predicted=7, calibration="abc")
        clock.advance(10)
        weaker = put(q, 1, 0.3, 0.1, version="v3", predicted=1)
        assert first == again == weaker
        (item,) = q.items(include_inputs=True)
        assert item.seen_count == 3
        # the most-OOD sighting's evidence, kept together
        assert (item.p_value, item.distance, item.model_version, item.predicted) == (
            0.01,
            1.5,
            "v2",
            7,
        )
        assert item.calibration == "abc"
        assert item.created_at == pytest.approx(clock.now - 20)
        assert item.last_seen_at == pytest.approx(clock.now)
        np.testing.assert_array_equal(item.input, image(1))
        assert q.stats().duplicates == 2


def test_dedupe_is_per_model_and_by_content_not_id(url, clock):
    with LabelQueue(url, clock=clock) as q:
        a = put(q, 1, 0.01, model="a")
        b = put(q, 1, 0.01, model="b")
        assert a != b
        # a caller id reused for other content keeps both items
        x = put(q, 2, 0.02, id="req-1")
        y = put(q, 3, 0.02, id="req-1")
        assert x == "req-1" and y is not None and y.startswith("req-1~")
        # the same content under the same id is a duplicate
        assert put(q, 2, 0.03, id="req-1") == "req-1"
        assert len(q.items()) == 4


def test_reference_only_items_store_no_input(url, clock):
    with LabelQueue(url, clock=clock) as q:
        a = q.put(
            reference="s3://bucket/img-1.png", model="m", version="1", p_value=0.01, distance=0.2
        )
        b = q.put("s3://bucket/img-1.png", model="m", version="1", p_value=0.02, distance=0.2)
        c = q.put(
            image(5),
            reference="key-5",
            store_input=False,
            model="m",
            version="1",
            p_value=0.02,
            distance=0.2,
        )
        d = q.put(
            image(5),
            reference="key-5-again",
            store_input=False,
            model="m",
            version="1",
            p_value=0.03,
            distance=0.2,
        )
        assert a == b and c == d  # a reference dedupes; so does hashed-but-unstored content
        items = {it.id: it for it in q.items(include_inputs=True)}
        assert items[a].input_npy is None and items[a].input_ref == "s3://bucket/img-1.png"
        assert items[c].input_npy is None and items[c].input_ref == "key-5"
        assert items[a].seen_count == 2 and items[c].seen_count == 2


def test_tensor_inputs_are_stored_as_npy(url, clock):
    x = torch.rand(1, 6, 5, dtype=torch.float32)
    with LabelQueue(url, clock=clock) as q:
        item_id = q.put(x, model="m", version="1", p_value=0.01, distance=0.2)
        item = q.get(item_id)
        assert item is not None and item.input is not None
        np.testing.assert_array_equal(item.input, x.numpy())
        assert item.input.dtype == np.float32


# ---------------------------------------------------------------------- capacity


def test_full_queue_evicts_the_least_ood_queued_item(url, clock):
    with LabelQueue(url, capacity=3, clock=clock) as q:
        ids = {p: put(q, i, p) for i, p in enumerate([0.1, 0.2, 0.3])}
        newcomer = put(q, 10, 0.05)
        assert {it.id for it in q.items()} == {ids[0.1], ids[0.2], newcomer}
        assert put(q, 11, 0.9) is None  # less OOD than everything: rejected
        stats = q.stats()
        assert (stats.queued, stats.evicted, stats.rejected) == (3, 1, 1)
    with LabelQueue(url, clock=clock) as again:  # counters and capacity are persistent
        stats = again.stats()
        assert (stats.capacity, stats.evicted, stats.rejected) == (3, 1, 1)


def test_claimed_and_done_items_are_never_evicted(url, clock):
    with LabelQueue(url, capacity=2, clock=clock) as q:
        weak = put(q, 1, 0.5)
        put(q, 2, 0.4)
        (claimed,) = q.claim(1, "ann", 60)  # the more OOD one (0.4)
        assert put(q, 3, 0.01) is not None  # evicts `weak`, the only queued item
        assert q.get(weak) is None
        # now everything open is claimed or more OOD; labelled items do not count
        q.done(claimed.id, "cat", worker="ann")
        assert put(q, 4, 0.02) is not None
        q.claim(2, "ann", 60)
        assert put(q, 5, 0.000001) is None  # full of claimed items: nothing to evict
        assert q.get(claimed.id).status == "done"
        assert q.stats().done == 1


def test_eviction_in_one_batch_keeps_the_most_ood(url, clock):
    rng = np.random.default_rng(0)
    ps = rng.uniform(0.001, 0.5, size=40)
    with LabelQueue(url, capacity=10, clock=clock) as q:
        items = [
            QueueItem.create(
                model="m", version="1", p_value=p, distance=1.0, input=image(i), timestamp=clock.now
            )
            for i, p in enumerate(ps)
        ]
        result = q.add(items)
        assert result.added + result.rejected == 40 and result.added - result.evicted == 10
        kept = sorted(it.p_value for it in q.items())
        assert kept == pytest.approx(sorted(ps)[:10])
        assert result.depth == 10


# ---------------------------------------------------------------------- claims and leases


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


def test_concurrent_writers_dedupe_and_respect_capacity(url, clock):
    """Several replicas adding overlapping inputs: one item per input, capacity exact."""
    with LabelQueue(url, capacity=50, clock=clock):
        pass
    errors: list[BaseException] = []

    def replica(offset: int) -> None:
        try:
            with LabelQueue(url, clock=clock, timeout=30) as mine:
                for start in range(0, 60, 10):
                    mine.add(
                        [
                            QueueItem.create(
                                model="m",
                                version="1",
                                p_value=(i + 1) / 100,
                                distance=1.0,
                                reference=f"ref-{(i + offset) % 60}",
                                timestamp=clock.now,
                            )
                            for i in range(start, start + 10)
                        ]
                    )
        except BaseException as err:  # pragma: no cover
            errors.append(err)

    threads = [threading.Thread(target=replica, args=(k * 20,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with LabelQueue(url, clock=clock) as q:
        items = q.items()
        assert len(items) == 50
        assert len({it.input_ref for it in items}) == 50
        stats = q.stats()
        assert stats.queued == 50 and stats.evicted + stats.rejected >= 10


# ---------------------------------------------------------------------- exports


def decode_png(data: bytes) -> np.ndarray:
    """A reference decoder for the PNGs we write (8-bit, filter 0), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    idat = b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert b"IEND" in chunks
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8
    channels = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, -1)
    assert (raw[:, 0] == 0).all()
    pixels = raw[:, 1:].reshape(height, width, channels)
    return pixels[:, :, 0] if channels == 1 else pixels


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(12, dtype=np.uint8).reshape(3, 4)),
        (np.array([[[0.0, 1.0], [0.5, 0.25]]]), np.array([[0, 255], [128, 64]], dtype=np.uint8)),
        (np.array([[-1.0, 1.0], [0.0, 3.0]]), np.array([[0, 128], [64, 255]], dtype=np.uint8)),
    ],
)
def test_png_encoder_matches_a_reference_decoder(array, expected):
    np.testing.assert_array_equal(decode_png(png_bytes(array)), expected)


def test_png_encoder_writes_rgb_in_either_layout():
    rgb = image(3, (5, 4, 3))
    np.testing.assert_array_equal(decode_png(png_bytes(rgb)), rgb)
    np.testing.assert_array_equal(decode_png(png_bytes(np.moveaxis(rgb, -1, 0))), rgb)
    with pytest.raises(ValueError, match="image"):
        png_bytes(np.zeros(10))


def check_label_studio_task(task: dict) -> None:
    """Label Studio's import format: data + predictions[model_version, score, result]."""
    assert set(task) == {"data", "predictions"}
    assert isinstance(task["data"], dict)
    (prediction,) = task["predictions"]
    assert set(prediction) == {"model_version", "score", "result"}
    assert isinstance(prediction["model_version"], str)
    assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0
    for region in prediction["result"]:
        assert set(region) == {"from_name", "to_name", "type", "value"}
        assert region["type"] == "choices"
        assert region["to_name"] in task["data"]
        assert all(isinstance(c, str) for c in region["value"]["choices"])


def test_label_studio_export(url, clock, tmp_path):
    with LabelQueue(url, clock=clock) as q:
        img = image(1, (1, 6, 7))
        a = q.put(
            img,
            model="mnist",
            version="v3",
            p_value=0.002,
            distance=0.3,
            score=-0.3,
            predicted=4,
            calibration="c0ffee",
        )
        b = q.put(
            reference="https://example.org/x.png",
            model="mnist",
            version="v3",
            p_value=0.01,
            distance=0.5,
            predicted=2,
        )
        c = q.put(
            np.array([0.5, np.inf, 2.0]),
            model="tab",
            version="1",
            p_value=0.03,
            distance=float("nan"),
        )
        put(q, 9, 0.04)  # labelled: filtered out below
        q.done(q.items()[-1].id, "cat")
        out = tmp_path / "tasks.json"
        count = q.export_label_studio(
            out, status="queued", class_names=[f"digit-{k}" for k in range(10)]
        )
    tasks = json.loads(out.read_text())  # strict JSON: no NaN/Infinity
    assert count == len(tasks) == 3
    for task in tasks:
        check_label_studio_task(task)
    assert [t["data"]["oodmon_id"] for t in tasks] == [a, b, c]
    first = tasks[0]
    prefix = "data:image/png;base64,"
    assert first["data"]["image"].startswith(prefix)
    png = base64.b64decode(first["data"]["image"][len(prefix) :])
    np.testing.assert_array_equal(decode_png(png), img[0])
    assert first["predictions"][0]["model_version"] == "mnist@v3#c0ffee"
    # a confidence (low = most OOD): the p-value, tie-broken by distance below 1e-9
    scores = [t["predictions"][0]["score"] for t in tasks]
    assert scores == sorted(scores)
    assert first["predictions"][0]["score"] == pytest.approx(0.002, abs=1e-9)
    assert first["predictions"][0]["result"][0]["value"]["choices"] == ["digit-4"]
    assert first["data"] | {"image": None} == {
        "image": None,
        "oodmon_id": a,
        "distance": 0.3,
        "p_value": 0.002,
        "score": -0.3,
        "predicted": 4,
        "seen_count": 1,
        "model": "mnist",
        "model_version": "v3",
        "calibration": "c0ffee",
    }
    assert tasks[1]["data"]["image"] == "https://example.org/x.png"
    assert tasks[1]["predictions"][0]["model_version"] == "mnist@v3"
    assert tasks[2]["data"]["input"] == [0.5, 0.0, 2.0]
    assert tasks[2]["data"]["distance"] is None
    assert tasks[2]["predictions"][0]["result"] == []


def test_jsonl_export_round_trips(url, clock):
    with LabelQueue(url, clock=clock) as q:
        x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
        a = q.put(x, model="m", version="1", p_value=0.01, distance=0.1, predicted=1)
        b = q.put(reference="key", model="m", version="1", p_value=0.02, distance=0.1)
        buf = io.StringIO()
        assert q.export_jsonl(buf) == 2
        stored = {it.id: it for it in q.items(include_inputs=True)}
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [line["id"] for line in lines] == [a, b]
    arr = np.load(io.BytesIO(base64.b64decode(lines[0]["input_npy_b64"])))
    np.testing.assert_array_equal(arr, x)
    assert lines[1]["input_npy_b64"] is None and lines[1]["input_ref"] == "key"
    for line in lines:
        item = stored[line["id"]]
        assert line["content_hash"] == item.content_hash
        assert line["status"] == "queued" and line["seen_count"] == 1


def test_label_studio_task_for_item_without_anything_to_show():
    item = QueueItem.create(model="m", version="1", p_value=0.5, distance=1.0)
    task = label_studio_task(item)
    check_label_studio_task(task)
    assert "image" not in task["data"]


# ---------------------------------------------------------------------- schema and safety


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
        ro.export_label_studio(tmp_path / "a.json")
        ro.export_jsonl(tmp_path / "a.jsonl")
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


def test_missing_and_foreign_files(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LabelQueue(missing, read_only=True)
    with pytest.raises(FileNotFoundError):
        LabelQueue(missing, create=False)
    assert not missing.exists()
    with pytest.raises(FileNotFoundError, match="directory"):
        LabelQueue(tmp_path / "no-dir" / "q.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(NotAQueueError, match="not"):
        LabelQueue(junk)
    with pytest.raises(NotAQueueError, match="not"):
        LabelQueue(junk, read_only=True)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE items (x)")
    conn.close()
    with pytest.raises(NotAQueueError, match="not an oodmon label queue"):
        LabelQueue(other)


@pytest.mark.parametrize(
    ("url", "backend", "target"),
    [
        ("labels.db", "sqlite", "labels.db"),
        ("sqlite:///rel/labels.db", "sqlite", "rel/labels.db"),
        ("sqlite:////abs/labels.db", "sqlite", "/abs/labels.db"),
        ("postgresql://u:pw@h:5432/db", "postgresql", "postgresql://u:pw@h:5432/db"),
        ("postgres://h/db", "postgresql", "postgres://h/db"),
    ],
)
def test_parse_url(url, backend, target):
    parsed = parse_url(url)
    assert (parsed.backend, parsed.target) == (backend, target)
    assert "pw" not in repr(parsed)


@pytest.mark.parametrize("bad", ["", "mysql://u:hunter2@h/db", "sqlite:relative.db"])
def test_bad_urls(bad):
    with pytest.raises(ValueError) as info:
        parse_url(bad)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://alice:s3cr%40t@db.example:5432/q",
            "postgresql://alice:***@db.example:5432/q",
        ),
        (
            "postgresql://alice@db/q?password=s3cr&sslmode=require",
            "postgresql://alice@db/q?password=***&sslmode=require",
        ),
        ("postgresql://db/q", "postgresql://db/q"),
        ("host=db password=s3cr user=x", "host=db password=*** user=x"),
        ("postgresql://u:s3cr@[::1/db", "postgresql://u:***@[::1/db"),  # malformed
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_connection_errors_never_show_the_password(caplog):
    pytest.importorskip("psycopg")
    port = postgres_server.free_port()  # nothing listens there
    secret = "Sup3rS3cret-pw"
    url = f"postgresql://alice:{secret}@127.0.0.1:{port}/labels?connect_timeout=2"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(QueueUnavailableError) as info:
        LabelQueue(url)
    err = info.value
    assert "alice:***@127.0.0.1" in str(err)
    chain = [err, err.__cause__]
    assert not any(secret in repr(e) or secret in str(e) for e in chain if e is not None)
    assert err.__suppress_context__  # the driver's own error (which may quote the URL) is hidden
    assert secret not in caplog.text


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://alice:{pw}@[::1/labels",  # malformed: the driver quotes the URL back
        "postgresql://alice:{pw}@127.0.0.1:1/labels?bogus=1",
        "postgresql://alice@127.0.0.1:1/labels?password={pw}&bogus=1",
    ],
)
def test_malformed_urls_never_show_the_password(template):
    pytest.importorskip("psycopg")
    secret = "Sup3rS3cret-pw"
    with pytest.raises((ValueError, QueueUnavailableError)) as info:
        LabelQueue(template.format(pw=secret), timeout=1)
    assert secret not in str(info.value) and "***" in str(info.value)


def test_duplicates_within_one_batch(url, clock):
    with LabelQueue(url, clock=clock) as q:
        same = [
            QueueItem.create(
                model="m",
                version=v,
                p_value=p,
                distance=1.0,
                input=image(1),
                timestamp=clock.now + t,
            )
            for v, p, t in (("a", 0.2, 0), ("b", 0.05, 1), ("c", 0.1, 2))
        ]
        other = QueueItem.create(
            model="m", version="a", p_value=0.3, distance=1.0, input=image(2), timestamp=clock.now
        )
        result = q.add([same[0], other, same[1], same[2]])
        assert (result.added, result.merged, result.rejected) == (2, 2, 0)
        assert result.ids[0] == result.ids[2] == result.ids[3] == same[0].id
        item = q.get(same[0].id)
        assert (item.seen_count, item.p_value, item.model_version) == (3, 0.05, "b")
        assert (item.created_at, item.last_seen_at) == (clock.now, clock.now + 2)
        again = q.add([same[2], same[2]])
        assert (again.added, again.merged) == (0, 2)
        assert q.get(same[0].id).seen_count == 5


def reference_add(stored: dict, capacity: int, batch: list[tuple[str, float]]) -> dict:
    """The documented semantics in plain Python: dedupe, keep the best p-value, and keep the
    `capacity` most-OOD inputs (a newcomer must beat an incumbent strictly)."""
    groups: dict[str, list[float]] = {}
    for key, p in batch:
        groups.setdefault(key, []).append(p)
    stored = {k: dict(v) for k, v in stored.items()}
    for key, ps in groups.items():
        if key in stored:
            stored[key]["seen"] += len(ps)
            stored[key]["p"] = min(stored[key]["p"], *ps)
    fresh = sorted((min(ps), key, len(ps)) for key, ps in groups.items() if key not in stored)
    for p, key, count in fresh:
        if len(stored) < capacity:
            stored[key] = {"p": p, "seen": count}
            continue
        weakest = max(stored, key=lambda k: stored[k]["p"])
        if p < stored[weakest]["p"]:
            del stored[weakest]
            stored[key] = {"p": p, "seen": count}
    return stored


@settings(max_examples=80, deadline=None)
@given(capacity=st.integers(1, 6), data=st.data())
def test_add_matches_a_reference_model(capacity, data):
    # distinct p-values: how ties between different inputs break is not part of the contract
    ps = data.draw(st.lists(st.floats(0.0, 1.0), unique=True, max_size=30))
    keys = data.draw(st.lists(st.sampled_from("abcdefghij"), min_size=len(ps), max_size=len(ps)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ps)), max_size=4)))
    bounds = [0, *cuts, len(ps)]
    batches = [list(zip(keys[a:b], ps[a:b], strict=True)) for a, b in itertools.pairwise(bounds)]
    expected: dict = {}
    with LabelQueue("sqlite:///:memory:", capacity=capacity, clock=Clock()) as q:
        for batch in batches:
            result = q.add(
                [
                    QueueItem.create(model="m", version="1", p_value=p, distance=1.0, reference=key)
                    for key, p in batch
                ]
            )
            assert result.added + result.merged + result.rejected == len(batch)
            expected = reference_add(expected, capacity, batch)
            got = {it.input_ref: {"p": it.p_value, "seen": it.seen_count} for it in q.items()}
            assert got == expected
            assert result.depth == len(got) <= capacity
