"""Admission (``label_queue._admit``) through LabelQueue.add, on both backends: dedupe,
evidence merging, capacity and eviction, checked against a plain-Python reference model."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_queue_helpers import Clock, image, put

from oodmon.label_queue import LabelQueue, QueueItem


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
