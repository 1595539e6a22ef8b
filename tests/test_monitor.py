"""Monitor: statistics, sinks, never breaking the caller, background scoring."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, id_logits, near_ocs

from oodmon import Detector, Observation
from oodmon.monitor import Monitor
from oodmon.sinks import InMemoryMetrics, InMemoryQueue, MetricsSink, QueueSink


def test_observe_counts_and_feeds_sinks(detector: Detector) -> None:
    metrics, queue, flagged_batches = InMemoryMetrics(), InMemoryQueue(), []
    assert isinstance(metrics, MetricsSink) and isinstance(queue, QueueSink)
    monitor = Monitor(detector, "m", "1", metrics, queue, on_flag=flagged_batches.append)
    z = torch.cat([id_logits(90, seed=1), near_ocs(detector, 10)])
    inputs = torch.arange(100).float().unsqueeze(1)
    ids = [f"req-{i}" for i in range(100)]
    verdict = monitor.observe(z, inputs=inputs, ids=ids)
    assert verdict is not None and torch.equal(verdict.flag, detector.predict(z).flag)
    n_flagged = int(verdict.flag.sum())
    assert n_flagged >= 10
    stats = monitor.stats()
    assert (stats.seen, stats.flagged, stats.errors_total, stats.invalid_total) == (
        100,
        n_flagged,
        0,
        0,
    )
    assert metrics.seen == 100 and metrics.flagged == n_flagged
    assert (
        metrics.summary is not None
        and metrics.summary.calibration_hash == detector.calibration_hash_
    )
    assert queue.rows == n_flagged and metrics.queue_depth == n_flagged
    (batch,) = flagged_batches
    flagged_rows = np.flatnonzero(verdict.flag.numpy())
    assert batch.ids == [ids[i] for i in flagged_rows]
    assert torch.equal(batch.inputs.squeeze(1), torch.tensor(flagged_rows, dtype=torch.float32))
    assert batch.verdict.flag.all()


def test_numpy_probabilities_from_any_framework(ocs) -> None:  # type: ignore[no-untyped-def]
    detector = Detector(ocs, kind="probs").fit(id_logits(500, seed=2).softmax(-1).numpy())
    monitor = Monitor(detector, "sklearn", "1")
    verdict = monitor.observe(id_logits(20, seed=3).softmax(-1).numpy())
    assert verdict is not None and len(verdict) == 20
    single = monitor.observe(np.full(NUM_CLASSES, 0.1))  # one row as a vector
    assert single is not None and len(single) == 1
    assert monitor.stats().seen == 21


def test_invalid_outputs_are_counted_not_raised(detector: Detector) -> None:
    metrics = InMemoryMetrics()
    monitor = Monitor(detector, "m", "1", metrics)
    z = id_logits(5, seed=4)
    z[1, 2] = float("nan")
    z[3, 0] = float("inf")
    verdict = monitor.observe(z)
    assert verdict is not None and verdict.invalid.tolist() == [False, True, False, True, False]
    assert monitor.observe(torch.zeros(4, 7)) is None
    assert monitor.observe(torch.zeros(2, 3, NUM_CLASSES)) is None
    stats = monitor.stats()
    assert stats.invalid == {"nonfinite": 2, "wrong_width": 4, "wrong_shape": 2}
    assert stats.seen == 11 and stats.errors_total == 0
    assert metrics.invalid == stats.invalid
    assert stats.window_size == 3  # only valid rows enter the flag-rate window


class Boom(RuntimeError):
    pass


class BrokenMetrics(InMemoryMetrics):
    def record(self, observation: Observation) -> None:
        raise Boom("metrics backend down")


def test_failures_inside_monitoring_never_reach_the_caller(
    detector: Detector, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_on_flag(obs: Observation) -> None:
        raise KeyError("callback bug")

    class BrokenQueue(InMemoryQueue):
        def submit(self, observation: Observation) -> int:
            raise ConnectionError("database unreachable")

    metrics = BrokenMetrics()
    monitor = Monitor(detector, "m", "1", metrics, BrokenQueue(), on_flag=bad_on_flag)
    z = torch.cat([id_logits(10, seed=5), near_ocs(detector, 5)])
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        for _ in range(3):
            verdict = monitor.observe(z)
            assert verdict is not None  # scoring worked; only sinks failed
    stats = monitor.stats()
    assert stats.errors == {"Boom": 3, "ConnectionError": 3, "KeyError": 3}
    assert metrics.errors == stats.errors
    assert stats.seen == 45  # statistics are kept even when every sink fails
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 3  # once per kind


def test_scoring_failure_returns_none_and_strict_reraises(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(outputs: object) -> None:
        raise Boom("scoring bug")

    monitor = Monitor(detector, "m", "1")
    monkeypatch.setattr(monitor.detector, "predict", explode)
    assert monitor.observe(id_logits(3, seed=6)) is None
    assert monitor.stats().errors == {"Boom": 1}
    strict = Monitor(detector, "m", "1", strict=True)
    with pytest.raises(Boom):
        strict.observe(id_logits(3, seed=6))


def test_mismatched_ids_or_inputs_are_dropped_and_counted(detector: Detector) -> None:
    queue = InMemoryQueue()
    monitor = Monitor(detector, "m", "1", queue=queue)
    verdict = monitor.observe(id_logits(3, seed=7), ids=["a"])
    assert verdict is not None and len(verdict) == 3  # the outputs are still scored
    assert monitor.observe(id_logits(3, seed=7), inputs=torch.zeros(2, 4)) is not None
    assert monitor.stats().errors == {"ValueError": 2} and monitor.stats().seen == 6
    # in the background, one caller's bad ids must not poison the batches it is merged with
    for i in range(6):
        good = [f"g{i}-{j}" for j in range(2)]
        monitor.submit(near_ocs(detector, 2), ids=good if i != 3 else ["bad"])
    stats = monitor.stats()
    assert stats.seen == 18 and stats.errors == {"ValueError": 3}
    ids = [i for obs in queue.observations for i in (obs.ids or [])]
    assert "bad" not in ids and {f"g5-{j}" for j in range(2)} <= set(ids)
    # inputs of another row count leave submit's common path and are dropped the same way
    monitor.submit(near_ocs(detector, 2), inputs=torch.zeros(3, 4))
    monitor.submit(near_ocs(detector, 2), inputs=torch.zeros(2, 4))
    monitor.flush()
    stats = monitor.stats()
    assert stats.seen == 22 and stats.errors == {"ValueError": 4}


def test_submit_scores_in_background_with_exact_totals(detector: Detector) -> None:
    metrics, queue = InMemoryMetrics(), InMemoryQueue()
    monitor = Monitor(detector, "m", "1", metrics, queue, linger=0.01)
    expected_flags = 0
    for i in range(200):
        z = id_logits(1 + i % 7, seed=100 + i)
        if i % 10 == 0:
            z = near_ocs(detector, 2)
        expected_flags += int(detector.predict(z).flag.sum())
        monitor.submit(z, inputs=torch.zeros(len(z), 3))
        z.add_(100.0)  # the caller reusing its buffer must not change what is scored
    stats = monitor.stats()
    rows = sum(2 if i % 10 == 0 else 1 + i % 7 for i in range(200))
    assert stats.seen == rows and stats.flagged == expected_flags
    assert metrics.seen == rows and queue.rows == expected_flags
    assert metrics.batches < 200  # small batches were coalesced
    monitor.close()
    assert queue.closed
    monitor.submit(id_logits(2, seed=0))  # after close: skipped and counted, never raised
    assert monitor.observe(id_logits(1, seed=0)) is None
    after = monitor.stats()
    assert after.skipped == 3 and after.errors == {} and after.seen == rows


def test_a_worker_that_ended_is_replaced_by_the_next_submit(detector: Detector) -> None:
    # submit checks a flag the worker clears on its way out, not Thread.is_alive()
    monitor = Monitor(detector, "m", "1", InMemoryMetrics(), linger=0.0)
    monitor.submit(id_logits(2, seed=1))
    assert monitor.flush(timeout=30)
    batcher = monitor._batcher
    first = batcher.worker
    assert first is not None

    with batcher._wakeup:  # let the loop end as it does when closed, then reopen
        batcher.closed = True
        batcher._wakeup.notify_all()
    first.join(timeout=10)
    assert not first.is_alive() and not batcher._worker_running
    batcher.closed = False
    monitor.submit(id_logits(3, seed=2))
    assert monitor.flush(timeout=30)
    assert batcher.worker is not first and monitor.stats().seen == 5
    monitor.close()


def test_backlog_limit_skips_and_counts(detector: Detector) -> None:
    metrics = InMemoryMetrics()
    monitor = Monitor(detector, "m", "1", metrics, max_pending=10, linger=0.5)
    for _ in range(5):
        monitor.submit(id_logits(4, seed=8))
    stats = monitor.stats()
    assert stats.seen + stats.skipped == 20 and stats.skipped >= 8
    assert metrics.skipped == stats.skipped and metrics.seen == stats.seen


def test_constructor_validation(detector: Detector, ocs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="`name`"):
        Monitor(detector, "", "1")
    with pytest.raises(ValueError, match="`window`"):
        Monitor(detector, "m", "1", window=0)
    with pytest.raises(ValueError, match="not fitted"):
        Monitor(Detector(ocs), "m", "1")


def test_strict_background_errors_surface_at_flush_and_the_worker_survives(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = Monitor(detector, "m", "1", strict=True, linger=0.0)
    real_predict = monitor.detector.predict
    calls = {"n": 0}

    def flaky(outputs: torch.Tensor) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Boom("first batch fails")
        return real_predict(outputs)

    monkeypatch.setattr(monitor.detector, "predict", flaky)
    monitor.submit(id_logits(2, seed=1))
    with pytest.raises(Boom):
        monitor.flush(timeout=30)
    monitor.submit(id_logits(3, seed=2))  # the worker is still alive and scores this
    assert monitor.flush(timeout=30)
    assert monitor.stats().seen == 3 and monitor.stats().errors == {"Boom": 1}


def test_stats_from_a_callback_on_the_worker_does_not_deadlock(detector: Detector) -> None:
    seen_inside: list[int] = []
    monitor = Monitor(detector, "m", "1", linger=0.0)
    monitor.on_flag = lambda obs: seen_inside.append(monitor.stats().seen)
    monitor.submit(near_ocs(detector, 4))
    assert monitor.flush(timeout=30), "flush hung: the worker waited for itself"
    monitor.submit(near_ocs(detector, 4))
    assert monitor.flush(timeout=30)
    assert seen_inside == [4, 8]


def test_unclosed_unreferenced_monitors_are_collected(detector: Detector) -> None:
    import gc
    import weakref

    monitor = Monitor(detector, "m", "1", linger=0.0)
    monitor.submit(id_logits(2, seed=3))
    monitor.flush(timeout=30)
    worker = monitor._batcher.worker
    ref = weakref.ref(monitor)
    del monitor
    deadline = time.monotonic() + 10
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert ref() is None
    assert worker is not None
    worker.join(timeout=5)
    assert not worker.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_scores_its_own_traffic(detector: Detector) -> None:
    monitor = Monitor(detector, "m", "1", linger=0.0)
    monitor.submit(id_logits(2, seed=4))  # the parent's worker thread is running
    monitor.flush(timeout=30)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no parent thread here; a new worker must start
        try:
            monitor.submit(id_logits(5, seed=5))
            ok = monitor.flush(timeout=20)
            os.write(write, f"{ok} {monitor.stats(flush=False).seen}".encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 100).decode()
    os.close(read)
    assert status == 0 and answer == "True 5"
    assert monitor.stats().seen == 2  # the parent is unaffected


def test_submit_copies_inputs_so_a_reused_buffer_queues_what_was_seen(detector: Detector) -> None:
    queue = InMemoryQueue()
    monitor = Monitor(detector, "m", "1", queue=queue, linger=0.5)
    buffer = torch.zeros(2, 3)
    for step in range(3):
        buffer.fill_(step)  # a serving loop refilling one input buffer
        monitor.submit(near_ocs(detector, 2), inputs=buffer)
    monitor.flush()
    queued = torch.cat([obs.inputs for obs in queue.observations])
    assert queued[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    # opting out shares the buffer: every queued row shows its last contents
    shared = InMemoryQueue()
    no_copy = Monitor(detector, "m", "1", queue=shared, linger=0.5)
    for step in range(2):
        buffer.fill_(step)
        no_copy.submit(near_ocs(detector, 2), inputs=buffer, copy_inputs=False)
    no_copy.flush()
    assert torch.cat([obs.inputs for obs in shared.observations])[:, 0].tolist() == [1, 1, 1, 1]


def test_queue_must_be_a_sink_and_the_error_says_what_to_pass(
    detector: Detector, tmp_path: Path
) -> None:
    from oodmon import LabelQueue, QueueWriter

    location = tmp_path / "queue.sqlite"
    for location_given in (str(location), location):
        with pytest.raises(ValueError, match=r"oodmon\.QueueWriter\(.*queue\.sqlite"):
            Monitor(detector, "m", "1", queue=location_given)  # type: ignore[arg-type]
    with LabelQueue(location) as store, pytest.raises(ValueError, match=r"QueueWriter\("):
        Monitor(detector, "m", "1", queue=store)  # type: ignore[arg-type]
    with QueueWriter(location) as writer:  # the sink it asks for is accepted
        Monitor(detector, "m", "1", queue=writer).close()


def _unscorable_outputs() -> list[tuple[object, int, str]]:
    dense = torch.zeros(3, NUM_CLASSES)
    nested = torch.nested.nested_tensor(
        [torch.zeros(NUM_CLASSES), torch.zeros(NUM_CLASSES - 1)], layout=torch.jagged
    )
    return [
        (dense.bool(), 3, "wrong_dtype"),
        (dense.to(torch.complex64), 3, "wrong_dtype"),
        (np.zeros((2, NUM_CLASSES), dtype=bool), 2, "wrong_dtype"),
        (np.array([["a"] * NUM_CLASSES]), 1, "wrong_dtype"),
        (torch.zeros(4, NUM_CLASSES, device="meta"), 4, "wrong_layout"),
        (dense.to_sparse(), 3, "wrong_layout"),
        (nested, 2, "wrong_layout"),
        ([[0.0] * NUM_CLASSES, [0.0] * 3], 2, "wrong_layout"),
    ]


@pytest.mark.parametrize("background", [False, True])
def test_unscorable_outputs_are_invalid_rows_not_errors(
    detector: Detector, background: bool
) -> None:
    metrics = InMemoryMetrics()
    monitor = Monitor(detector, "m", "1", metrics, linger=0)
    expected: dict[str, int] = {}
    for outputs, rows, reason in _unscorable_outputs():
        if background:
            monitor.submit(outputs)
        else:
            assert monitor.observe(outputs) is None
        expected[reason] = expected.get(reason, 0) + rows
    stats = monitor.stats()
    assert stats.errors == {}
    assert stats.invalid == expected
    assert stats.seen == sum(expected.values())
    assert metrics.invalid == expected
    monitor.close()


class Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise RuntimeError("__str__ itself fails")


def test_an_unprintable_error_does_not_escape_the_error_path(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = Monitor(detector, "m", "1")

    def explode(*args: object) -> None:
        raise Unprintable()

    monkeypatch.setattr(monitor.detector, "predict", explode)
    assert monitor.observe(id_logits(3, seed=5)) is None
    assert monitor.stats().errors == {"Unprintable": 1}


def test_probabilities_fed_to_a_logits_detector_warn_once_and_count(
    detector: Detector, caplog: pytest.LogCaptureFixture
) -> None:
    from oodmon.monitor import KIND_MISMATCH

    metrics = InMemoryMetrics()
    monitor = Monitor(detector, "m", "1", metrics)
    monitor.observe(id_logits(50, seed=6))
    assert monitor.stats().errors == {}
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        for seed in (7, 8, 9):
            monitor.observe(id_logits(50, seed=seed).softmax(-1))
    stats = monitor.stats()
    assert stats.errors == {KIND_MISMATCH: 3}
    assert stats.seen == 200  # still scored: a warning, not a dropped batch
    warnings = [r for r in caplog.records if "look like probabilities" in r.getMessage()]
    assert len(warnings) == 1
    assert "kind='probs'" in warnings[0].getMessage()
    monitor.observe(id_logits(50, seed=10).log_softmax(-1))  # log-probabilities are logits
    assert monitor.stats().errors == {KIND_MISMATCH: 3}


def test_a_long_vector_is_one_row_of_the_wrong_width(
    detector: Detector, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = Monitor(detector, "m", "1")
    with caplog.at_level(logging.WARNING, logger="oodmon"):
        assert monitor.observe(np.zeros(400)) is None
    assert monitor.stats().invalid == {"wrong_width": 1}
    (record,) = [r for r in caplog.records if "wrong" in r.getMessage() or "rows" in r.getMessage()]
    message = record.getMessage()
    assert f"rows have 400 values but the detector expects {NUM_CLASSES}" in message
    assert "columns" not in message
