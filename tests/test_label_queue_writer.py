"""QueueWriter: the Monitor's label-queue sink, with a real SQLite file behind it."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import postgres_server
import pytest
import torch
from prometheus_client import CollectorRegistry

from oodmon import OCS, Detector
from oodmon.label_queue import (
    AddResult,
    LabelQueue,
    QueueItem,
    QueueUnavailableError,
    QueueWriter,
    npy_bytes,
    observation_items,
)
from oodmon.metrics import PrometheusMetrics
from oodmon.monitor import Monitor
from oodmon.sinks import InMemoryMetrics, QueueSink
from oodmon.verdict import HostVerdict, Observation

REPO = Path(__file__).resolve().parents[1]


def make_detector(seed: int = 0) -> Detector:
    g = torch.Generator().manual_seed(seed)
    ocs = OCS.cross_entropy(counts=[10] * 10)
    return Detector(ocs, alpha=0.1).fit(torch.randn(400, 10, generator=g) * 6)


def logits(n: int, seed: int) -> torch.Tensor:
    """Outputs from confident (in-distribution-like) to flat (close to the OCS, flagged)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g) * torch.linspace(0.05, 8.0, n)[:, None]


def observation(p, d=None, inputs=None, ids=None) -> Observation:
    p = np.asarray(p, dtype=float)
    d = np.ones_like(p) if d is None else np.asarray(d, dtype=float)
    verdict = HostVerdict(
        score=-d,
        distance=d,
        p_value=p,
        flag=np.ones(p.size, dtype=bool),
        invalid=np.zeros(p.size, dtype=bool),
        predicted=np.arange(p.size, dtype=np.int64),
    )
    return Observation(model="m", version="1", verdict=verdict, inputs=inputs, ids=ids)


class StalledQueue:
    """A queue whose writes hang until released (a database that stopped answering)."""

    def __init__(self, inner: LabelQueue) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.calls = 0

    def add(self, items):
        self.calls += 1
        self.release.wait(30)
        return self.inner.add(items)

    def close(self) -> None:
        self.inner.close()


class FlakyQueue:
    """Fails the first ``failures`` writes as an unreachable server would."""

    def __init__(self, inner: LabelQueue | None, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def add(self, items) -> AddResult:
        if self.failures:
            self.failures -= 1
            raise QueueUnavailableError("Cannot connect to the label queue: connection refused")
        assert self.inner is not None
        return self.inner.add(items)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_writer_is_a_queue_sink(tmp_path):
    with QueueWriter(tmp_path / "q.db") as writer:
        assert isinstance(writer, QueueSink)
        assert writer.depth() is None  # nothing committed yet, and no I/O to find out


def test_monitor_writes_exactly_the_flagged_rows(tmp_path):
    path = tmp_path / "q.db"
    metrics = InMemoryMetrics()
    detector = make_detector()
    writer = QueueWriter(
        str(path), batch_rows=16, flush_interval=0.01, calibration=detector.calibration_hash_
    )
    monitor = Monitor(detector, "mnist", "v1", metrics=metrics, queue=writer)
    expected = {}
    for seed in range(5):
        x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        ids = [f"req-{seed}-{i}" for i in range(40)]
        verdict = monitor.observe(logits(40, seed), inputs=x, ids=ids)
        for i in np.flatnonzero(verdict.flag.numpy()):
            expected[ids[i]] = (
                x[i].numpy(),
                float(verdict.p_value[i]),
                float(verdict.distance[i]),
                int(verdict.predicted[i]),
            )
    monitor.close()  # closes (flushes) the writer
    assert 20 < len(expected) < 200
    assert writer.committed_rows == len(expected) and writer.dropped == writer.failed == 0
    assert writer.committed_batches >= len(expected) // 16
    assert writer.depth() == len(expected)
    assert metrics.queue_dropped == 0 and metrics.errors == {}
    with LabelQueue(path, read_only=True) as q:
        items = {it.id: it for it in q.items(include_inputs=True)}
    assert set(items) == set(expected)
    for item_id, (x, p, d, pred) in expected.items():
        item = items[item_id]
        np.testing.assert_array_equal(item.input, x)
        assert (item.p_value, item.distance, item.predicted) == (p, pytest.approx(d), pred)
        assert item.model_tag == f"mnist@v1#{detector.calibration_hash_}"


def test_submit_never_waits_for_a_stalled_database(tmp_path):
    stalled = StalledQueue(LabelQueue(tmp_path / "q.db"))
    metrics = InMemoryMetrics()
    writer = QueueWriter(stalled, buffer_rows=50, batch_rows=10, flush_interval=0.0)
    monitor = Monitor(make_detector(), "mnist", "v1", metrics=metrics, queue=writer)
    flagged = 0
    slowest = 0.0
    for seed in range(30):
        start = time.perf_counter()
        verdict = monitor.observe(logits(20, seed), inputs=torch.rand(20, 4))
        slowest = max(slowest, time.perf_counter() - start)
        flagged += int(verdict.flag.sum())
    assert slowest < 0.25, "observe() waited for the database"
    assert stalled.calls == 1  # one batch is stuck in the database, the rest is buffered
    assert writer.buffered == 50  # bounded
    assert writer.dropped > 0
    assert metrics.queue_dropped == writer.dropped  # the Monitor exports what was dropped
    stalled.release.set()
    monitor.close()
    assert writer.failed == 0 and 50 < writer.committed_rows <= 60
    assert writer.committed_rows + writer.dropped == flagged
    stalled.close()


def test_dropped_rows_reach_prometheus(tmp_path):
    registry = CollectorRegistry()
    with LabelQueue(tmp_path / "q.db") as q:
        stalled = StalledQueue(q)
        writer = QueueWriter(stalled, buffer_rows=5, batch_rows=1000, flush_interval=60)
        monitor = Monitor(
            make_detector(), "mnist", "v1", metrics=PrometheusMetrics(registry), queue=writer
        )
        flagged = sum(
            int(monitor.observe(logits(40, s), inputs=torch.rand(40, 2)).flag.sum())
            for s in range(3)
        )
        labels = {"model": "mnist", "model_version": "v1", "reason": "buffer_full"}
        assert registry.get_sample_value("oodmon_label_queue_dropped_total", labels) == (
            flagged - 5
        )
        stalled.release.set()
        monitor.close()
        assert writer.committed_rows == 5


def test_a_batch_that_only_partly_fits_keeps_its_most_ood_rows(tmp_path):
    with LabelQueue(tmp_path / "q.db") as q:
        stalled = StalledQueue(q)
        writer = QueueWriter(stalled, buffer_rows=3, batch_rows=100, flush_interval=60)
        dropped = writer.submit(
            observation([0.5, 0.01, 0.3, 0.02, 0.001], ids=["a", "b", "c", "d", "e"])
        )
        assert dropped == 2 and writer.dropped == 2
        assert writer.submit(observation([0.0001], ids=["f"])) == 1  # full: dropped
        stalled.release.set()
        writer.close()
        assert sorted(it.id for it in q.items()) == ["b", "d", "e"]


def test_writer_retries_until_the_database_comes_back(tmp_path, caplog):
    with LabelQueue(tmp_path / "q.db") as q:
        flaky = FlakyQueue(q, failures=3)
        writer = QueueWriter(flaky, retry_initial=0.01, flush_interval=0.0)
        assert writer.submit(observation([0.01, 0.02], ids=["a", "b"])) == 0
        assert writer.flush(timeout=10)
        assert writer.retries == 3 and writer.committed_rows == 2 and writer.last_error is None
        assert [it.id for it in q.items()] == ["a", "b"]
        writer.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, then only counted
    assert "retrying" in warnings[0].getMessage()


def test_close_gives_up_at_its_deadline_and_counts_the_loss(caplog):
    writer = QueueWriter(
        FlakyQueue(None, failures=10**9),
        retry_initial=0.01,
        retry_max=0.05,
        flush_interval=0.0,
        batch_rows=8,
    )
    assert writer.submit(observation(np.full(30, 0.01))) == 0
    start = time.monotonic()
    writer.close(timeout=0.3)
    assert time.monotonic() - start < 3
    assert writer.failed == 30 and writer.committed_rows == 0
    assert writer.submit(observation([0.01])) == 1  # closed: dropped, not raised
    # the batch being written when the deadline passed is lost too, and logged with the rest
    lost = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert len(lost) == 1 and "30 rows not written" in lost[0], lost


def test_submit_never_raises_into_the_caller(tmp_path):
    with QueueWriter(tmp_path / "q.db") as writer:
        assert writer.submit(object()) == 0  # type: ignore[arg-type]
        assert writer.submit(None) == 0  # type: ignore[arg-type]


def test_unconvertible_rows_are_counted_not_fatal(tmp_path):
    with LabelQueue(tmp_path / "q.db") as q:
        writer = QueueWriter(q, flush_interval=0.0)
        rows = [np.zeros(3), {"not": "an array"}, "s3://ok"]
        writer.submit(observation([0.01, 0.02, 0.03], inputs=rows, ids=["a", "b", "c"]))
        writer.close()
        assert writer.failed == 1 and writer.committed_rows == 2
        assert [it.id for it in q.items()] == ["a", "c"]


def test_unreachable_postgres_never_logs_the_password(caplog):
    pytest.importorskip("psycopg")
    secret = "Hunter2-very-secret"
    port = postgres_server.free_port()
    url = f"postgresql://alice:{secret}@127.0.0.1:{port}/labels?connect_timeout=1"
    caplog.set_level(logging.DEBUG)
    writer = QueueWriter(url, retry_initial=0.05, retry_max=0.1, flush_interval=0.0)
    assert secret not in repr(writer)
    start = time.perf_counter()
    assert writer.submit(observation([0.01, 0.02])) == 0
    assert time.perf_counter() - start < 0.1
    assert wait_for(lambda: writer.retries >= 2)
    error = writer.last_error
    writer.close(timeout=0.2)
    assert error is not None and "alice:***@127.0.0.1" in error and secret not in error
    assert caplog.records and secret not in caplog.text
    assert writer.failed == 2


def test_reference_only_mode(tmp_path):
    with LabelQueue(tmp_path / "q.db") as q:
        writer = QueueWriter(q, store_inputs=False, flush_interval=0.0)
        x = torch.rand(2, 3)
        writer.submit(observation([0.01, 0.02], inputs=x, ids=["s3://b/1", "s3://b/2"]))
        writer.submit(observation([0.03], inputs=["gs://c/3"]))
        writer.close()
        items = q.items(include_inputs=True)
    assert [it.input_ref for it in items] == ["s3://b/1", "s3://b/2", "gs://c/3"]
    assert all(it.input_npy is None and it.input_size is None for it in items)
    expected = QueueItem.create(model="m", version="1", p_value=0.5, distance=1, input=x[0])
    assert items[0].content_hash == expected.content_hash  # still deduplicated by content


class SpyTensor(torch.Tensor):
    """Records the thread on which an input is copied to the host."""

    threads: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cpu", "numpy"):
            cls.threads.append(threading.current_thread().name)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_inputs_move_to_the_host_on_the_writer_thread(tmp_path):
    SpyTensor.threads.clear()
    writer = QueueWriter(tmp_path / "q.db", flush_interval=0.0)
    monitor = Monitor(make_detector(), "mnist", "v1", queue=writer)
    x = torch.rand(40, 3).as_subclass(SpyTensor)
    verdict = monitor.observe(logits(40, 1), inputs=x)
    monitor.close()
    # copied to the host only on the writer thread, never on the inference thread
    assert SpyTensor.threads and set(SpyTensor.threads) == {"oodmon-queue-writer"}
    assert writer.committed_rows == int(verdict.flag.sum())


def test_one_transaction_per_batch_and_on_commit(tmp_path):
    batches: list[list[str]] = []
    with LabelQueue(tmp_path / "q.db") as q:
        writer = QueueWriter(q, batch_rows=4, flush_interval=60, on_commit=batches.append)
        writer.submit(observation(np.linspace(0.01, 0.1, 10), ids=[str(i) for i in range(10)]))
        assert writer.flush(timeout=10)
        assert [len(b) for b in batches] == [4, 4, 2] and writer.committed_batches == 3
        assert [i for b in batches for i in b] == [str(i) for i in range(10)]
        writer.close()


def test_a_lone_row_is_written_after_flush_interval(tmp_path):
    with LabelQueue(tmp_path / "q.db") as q:
        writer = QueueWriter(q, batch_rows=1000, flush_interval=0.05)
        writer.submit(observation([0.01]))
        assert wait_for(lambda: writer.committed_rows == 1, timeout=5)
        writer.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="buffer_rows"):
        QueueWriter("q.db", buffer_rows=0)
    with pytest.raises(ValueError, match="scheme"):
        QueueWriter("mysql://u:pw@h/db")
    with pytest.raises(ValueError, match="LabelQueue"):
        QueueWriter(42)  # type: ignore[arg-type]


def test_a_read_only_queue_is_refused(tmp_path):
    LabelQueue(tmp_path / "q.db").close()
    with (
        LabelQueue(tmp_path / "q.db", read_only=True) as ro,
        pytest.raises(ValueError, match="read-only"),
    ):
        QueueWriter(ro)


@pytest.mark.parametrize(
    "rows",
    [
        np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32),
        np.arange(4, dtype=np.int16),
        torch.rand(4, 5)[:, ::2],
    ],
)
def test_observation_items_encode_exactly_like_np_save(rows):
    items, bad = observation_items(observation([0.1] * 4, inputs=rows))
    assert bad == 0
    for item, row in zip(items, rows, strict=True):
        assert item.input_npy == npy_bytes(row)
        assert item.content_hash == hashlib.sha256(npy_bytes(row)).hexdigest()


def test_observation_items_reads_every_input_kind():
    x = np.arange(6, dtype=np.int16).reshape(3, 2)
    items, bad = observation_items(observation([0.1, 0.2, 0.3], inputs=x, ids=["a", None, "c"]))
    assert bad == 0 and items[0].id == "a" and items[2].id == "c" and len(items[1].id) == 32
    np.testing.assert_array_equal(items[1].input, x[1])
    with pytest.raises(ValueError, match="3 inputs"):
        observation_items(observation([0.1, 0.2, 0.3], inputs=x[:2]))


@pytest.mark.parametrize("through", ["monitor", "writer"])
def test_interpreter_exit_flushes(tmp_path, through):
    """Never closed: the exit hooks write everything (via Monitor.submit, or the writer alone)."""
    path = tmp_path / "q.db"
    script = textwrap.dedent(f"""
        import numpy as np
        import torch
        from oodmon import OCS, Detector
        from oodmon.monitor import Monitor
        from oodmon.label_queue import QueueWriter
        from oodmon.verdict import HostVerdict, Observation

        writer = QueueWriter({str(path)!r}, batch_rows=10_000, flush_interval=3600)
        if {through!r} == "monitor":
            ocs = OCS.cross_entropy(counts=[10] * 10)
            det = Detector(ocs, alpha=0.1).fit(torch.randn(400, 10) * 6)
            monitor = Monitor(det, "mnist", "v1", queue=writer)
            flat = torch.zeros(25, 10)  # exactly the OCS: every row flagged
            for i in range(4):
                monitor.submit(flat + i * 1e-3, inputs=torch.rand(25, 4),
                               ids=[f"{{i}}-{{j}}" for j in range(25)])
        else:
            p = np.linspace(0.001, 0.01, 100)
            v = HostVerdict(score=-p, distance=p, p_value=p, flag=np.ones(100, bool),
                            invalid=np.zeros(100, bool), predicted=np.zeros(100, np.int64))
            writer.submit(Observation("m", "1", v, inputs=torch.rand(100, 4)))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    with LabelQueue(path, read_only=True) as q:
        assert q.stats().queued == 100


def test_monitor_tells_the_writer_its_calibration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from oodmon import OCS, Detector, LabelQueue, Monitor, QueueWriter

    detector = Detector(OCS.cross_entropy(counts=[1] * 4)).fit(torch.randn(100, 4) * 3)
    writer = QueueWriter(tmp_path / "q.sqlite")
    with Monitor(detector, "m", "1", queue=writer) as monitor:
        monitor.observe(torch.zeros(3, 4), inputs=torch.arange(3.0).unsqueeze(1))
    assert writer.calibration == detector.calibration_hash_
    with LabelQueue(tmp_path / "q.sqlite", read_only=True) as queue:
        items = queue.items()
    assert len(items) == 3
    assert all(detector.calibration_hash_ in item.model_tag for item in items)


def test_interpreter_exit_logs_how_many_rows_were_not_written(tmp_path):
    """A database down until exit: the writer gives up after close_timeout and says how many
    rows it lost (the batch it was writing included)."""
    script = textwrap.dedent("""
        import numpy as np
        from oodmon.label_queue import QueueUnavailableError, QueueWriter
        from oodmon.verdict import HostVerdict, Observation

        class Down:
            def add(self, items):
                raise QueueUnavailableError("connection refused")

            def close(self):
                pass

        writer = QueueWriter(Down(), batch_rows=8, flush_interval=0.0, retry_initial=0.01,
                             retry_max=0.05, close_timeout=0.5)
        p = np.linspace(0.001, 0.01, 30)
        v = HostVerdict(score=-p, distance=p, p_value=p, flag=np.ones(30, bool),
                        invalid=np.zeros(30, bool), predicted=np.zeros(30, np.int64))
        writer.submit(Observation("m", "1", v))
        # no close(): the interpreter exits here
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    lost = [line for line in done.stderr.splitlines() if "not written" in line]
    assert len(lost) == 1 and "30 rows not written" in lost[0], done.stderr


FORK_SCRIPT = textwrap.dedent("""
    import os, sys

    import numpy as np
    import torch

    # libgomp (torch's OpenMP runtime) is not fork-safe: once the parent has started its
    # thread pool, a child that runs a parallel torch op can hang. One thread (and tiny
    # tensors) keep the pool from ever starting before the fork.
    torch.set_num_threads(1)

    from oodmon import OCS, Detector, LabelQueue, Monitor, QueueWriter
    from oodmon.verdict import HostVerdict, Observation

    path, through = sys.argv[1], sys.argv[2]
    detector = Detector(OCS.cross_entropy(counts=[10] * 10), alpha=0.1)
    detector.fit(torch.randn(400, 10) * 6)
    queue = path if through == "url" else LabelQueue(path)
    writer = QueueWriter(queue, flush_interval=0.01)
    monitor = Monitor(detector, "m", "v1", queue=writer)
    # the parent writes first (numpy only, no torch op), so its connection is open and used
    p = np.array([0.001, 0.002, 0.003])
    verdict = HostVerdict(score=-p, distance=p, p_value=p, flag=np.ones(3, bool),
                          invalid=np.zeros(3, bool), predicted=np.zeros(3, np.int64))
    writer.submit(Observation("m", "v1", verdict, ids=["parent-0", "parent-1", "parent-2"]))
    assert writer.flush(timeout=30)

    pid = os.fork()  # gunicorn --preload: built in the parent, used in the worker
    if pid == 0:
        code = 1
        try:
            flat = torch.zeros(40, 10)  # exactly the OCS: every row is flagged
            monitor.observe(flat, inputs=torch.arange(40.0).unsqueeze(1),
                            ids=[f"child-{j}" for j in range(40)])
            monitor.close(timeout=30)
            writer.close(timeout=30)
            code = 0 if (writer.committed_rows, writer.failed) == (40, 0) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    # the parent's writer and queue go on working after the fork
    writer.submit(Observation("m", "v1", verdict, ids=["parent-3", "parent-4", "parent-5"]))
    monitor.close(timeout=30)
    writer.close(timeout=30)
    print(os.waitstatus_to_exitcode(status), writer.committed_rows, writer.failed)
""")


@pytest.mark.parametrize("through", ["url", "queue"])
def test_a_writer_built_before_fork_writes_from_the_child(tmp_path, through):
    """Writer and Monitor built before ``os.fork()``: the child's rows reach the queue file,
    through the child's own connection (the parent's is never used there)."""
    path = tmp_path / "q.sqlite"
    done = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(path), through],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "6", "0"], done.stderr  # child ok; parent wrote 3 + 3
    with LabelQueue(path, read_only=True) as queue:
        ids = {item.id for item in queue.iter_items()}
    assert ids == {f"child-{j}" for j in range(40)} | {f"parent-{j}" for j in range(6)}


# ---------------------------------------------------------------------- reliability (issue 17)


def lost_metric(registry, reason: str, model: str = "m", version: str = "1") -> float | None:
    labels = {"model": model, "model_version": version, "reason": reason}
    return registry.get_sample_value("oodmon_label_queue_dropped_total", labels)


POISON = {"sqlite": ["\ud800"], "postgresql": ["\ud800", "nul\x00byte"]}


def test_poison_rows_are_isolated_and_everything_else_flows(queue_url, caplog):
    """Rows the store can never accept (a lone surrogate; NUL on PostgreSQL) among good ones:
    they are dropped and counted, and every other row, before and after them, is written."""
    backend = "postgresql" if queue_url.startswith("postgresql") else "sqlite"
    poison = POISON[backend]
    ids = [f"good-{i}" for i in range(60)]
    spots = [3, 17, 41][: len(poison) + 1]
    for k, (spot, bad) in enumerate(zip(spots, poison * 2, strict=False)):
        ids[spot] = f"bad-{k}-{bad}"
    bad_ids = {ids[s] for s in spots}
    registry = CollectorRegistry()
    writer = QueueWriter(
        queue_url, batch_rows=16, flush_interval=0.0, metrics=PrometheusMetrics(registry)
    )
    p = np.linspace(0.001, 0.05, 60)
    inputs = [f"s3://bucket/{i}.png" for i in range(60)]
    for start in (0, 30):  # two hand-overs: rows after the poison keep flowing
        rows = slice(start, start + 30)
        writer.submit(observation(p[rows], inputs=inputs[rows], ids=ids[rows]))
    assert writer.flush(timeout=30)
    writer.close()
    with LabelQueue(queue_url) as q:
        stored = {item.id for item in q.items()}
    assert stored == set(ids) - bad_ids
    assert writer.committed_rows == 60 - len(bad_ids)
    assert writer.failed == len(bad_ids) and writer.lost["rejected"] == len(bad_ids)
    assert writer.retries == 0  # a rejection is not a store failure: no back-off, no retry
    assert lost_metric(registry, "rejected") == len(bad_ids)
    assert writer.last_error is not None and "rejected row bad-" in writer.last_error
    assert writer.last_error.isprintable()  # the poison is shown escaped
    rejections = [r for r in caplog.records if "rejected row" in r.getMessage()]
    assert len(rejections) == 1 and rejections[0].getMessage().isprintable()


class CountingDown:
    """A store that is always down, counting the attempts made on it."""

    def __init__(self) -> None:
        self.attempts: list[float] = []

    def add(self, items):
        self.attempts.append(time.monotonic())
        raise QueueUnavailableError("connection refused")

    def close(self) -> None:
        pass


def test_back_off_holds_while_close_waits():
    """Before: ~69,000 attempts during close(timeout=3). The pauses stay between half the
    current bound and the bound, so at most about 2 / retry_max attempts per second."""
    down = CountingDown()
    writer = QueueWriter(down, retry_initial=0.01, retry_max=0.1, flush_interval=0.0)
    writer.submit(observation(np.full(20, 0.01)))
    assert wait_for(lambda: len(down.attempts) >= 3)
    start = time.monotonic()
    writer.close(timeout=1.0)
    during = [t for t in down.attempts if t >= start]
    assert 2 <= len(during) <= 1.0 / (0.1 / 2) + 6  # the ramp from 0.01 adds a few
    # between the one attempt close() asks for at once and the last pause, cut short by the
    # deadline: every pause at least half the bound, and not all alike (jitter)
    gaps = np.diff(during)[1:-1]
    assert gaps.min() >= 0.1 / 2 * 0.9 and len(set(np.round(gaps, 4))) > 1
    assert writer.lost["store_error"] == 20 and writer.failed == 20


def test_back_off_holds_against_an_unreachable_postgres():
    """Connection attempts (logins) to a server that refuses them, per second of close()."""
    pytest.importorskip("psycopg")
    port = postgres_server.free_port()
    url = f"postgresql://alice:pw@127.0.0.1:{port}/labels?connect_timeout=1"
    writer = QueueWriter(url, retry_initial=0.05, retry_max=0.2, flush_interval=0.0)
    writer.submit(observation([0.01, 0.02]))
    assert wait_for(lambda: writer.retries >= 2)
    before = writer.retries
    writer.close(timeout=2.0)
    assert writer.retries - before <= 2.0 / (0.2 / 2) + 4
    assert writer.lost["store_error"] == 2


@pytest.mark.parametrize("bound_by", ["writer", "monitor"])
def test_rows_lost_to_an_unwritable_queue_show_in_metrics(tmp_path, caplog, bound_by):
    """50 flagged rows to a queue that cannot be written: /metrics says 50 lost, store_error,
    and so does the log (it said "0 buffered rows not written" while 135 were lost). The
    Monitor hands its metrics sink to a writer built without one."""
    from urllib.request import urlopen

    from oodmon.metrics import serve

    directory = tmp_path / "gone"
    directory.mkdir()
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    writer = QueueWriter(
        directory / "q.db", retry_initial=0.01, retry_max=0.05, flush_interval=0.0,
        metrics=metrics if bound_by == "writer" else None,
    )  # fmt: skip
    directory.rmdir()  # the directory existed at construction; it is gone when writing
    monitor = Monitor(make_detector(), "mnist", "v1", metrics=metrics, queue=writer)
    flat = torch.zeros(50, 10)  # exactly the OCS: every row is flagged
    assert int(monitor.observe(flat, inputs=torch.rand(50, 2)).flag.sum()) == 50
    monitor.close(timeout=0.5)
    with serve(0, registry=registry) as server, urlopen(server.url, timeout=10) as response:
        page = response.read().decode()
    line = (
        'oodmon_label_queue_dropped_total{model="mnist",model_version="v1",'
        'reason="store_error"} 50.0'
    )
    assert line in page.splitlines()
    lost = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert len(lost) == 1 and "50 rows not written" in lost[0], lost
    assert writer.failed == 50 and writer.lost == {
        "buffer_full": 0, "closed": 0, "store_error": 50, "rejected": 0
    }  # fmt: skip


def test_rows_unwritten_at_the_close_deadline_are_lost_as_closed(tmp_path):
    """A store that works but slowly: what close() could not write in time is `closed`."""

    class Slow:
        def __init__(self, inner: LabelQueue) -> None:
            self.inner = inner

        def add(self, items):
            time.sleep(0.2)
            return self.inner.add(items)

        def close(self) -> None:
            self.inner.close()

    registry = CollectorRegistry()
    with LabelQueue(tmp_path / "q.db") as q:
        writer = QueueWriter(
            Slow(q), batch_rows=5, flush_interval=0.0, metrics=PrometheusMetrics(registry)
        )
        writer.submit(observation(np.linspace(0.001, 0.01, 40)))
        writer.close(timeout=0.5)
        written = q.stats().queued
    assert 0 < writer.committed_rows == written < 40
    assert writer.lost["closed"] == 40 - written == lost_metric(registry, "closed")
    assert writer.committed_rows + writer.failed == 40


def test_depth_gauge_follows_every_commit(tmp_path):
    """The depth gauge equals the queue's count after the last commit (it lagged before)."""
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    writer = QueueWriter(tmp_path / "q.db", batch_rows=7, flush_interval=0.0, metrics=metrics)
    monitor = Monitor(make_detector(), "mnist", "v1", metrics=metrics, queue=writer)
    for seed in range(6):
        monitor.observe(logits(60, seed), inputs=torch.rand(60, 3))
    monitor.close(timeout=30)
    with LabelQueue(tmp_path / "q.db", read_only=True) as q:
        queued = q.stats().queued
    labels = {"model": "mnist", "model_version": "v1"}
    assert queued == writer.committed_rows > 0
    assert registry.get_sample_value("oodmon_label_queue_depth", labels) == queued


def test_a_queue_in_a_missing_directory_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="does not: create it first"):
        QueueWriter(tmp_path / "no-such-dir" / "q.db")
    with pytest.raises(ValueError, match="no-such-dir does not"):
        QueueWriter(f"sqlite:///{tmp_path}/no-such-dir/q.db")
    assert time.monotonic() - start < 1
    QueueWriter("sqlite:///:memory:").close()  # no directory involved


def test_interpreter_exit_counts_rows_of_a_write_that_never_returns(tmp_path):
    """A write hangs at exit: the buffered rows and the batch being written are all
    reported lost, with their number."""
    script = textwrap.dedent("""
        import threading
        import numpy as np
        from oodmon.label_queue import QueueWriter
        from oodmon.verdict import HostVerdict, Observation

        class Hung:
            def add(self, items):
                threading.Event().wait()

            def close(self):
                pass

        writer = QueueWriter(Hung(), batch_rows=8, flush_interval=0.0, close_timeout=0.1)
        p = np.linspace(0.001, 0.01, 30)
        v = HostVerdict(score=-p, distance=p, p_value=p, flag=np.ones(30, bool),
                        invalid=np.zeros(30, bool), predicted=np.zeros(30, np.int64))
        writer.submit(Observation("m", "1", v))
        # no close(): the interpreter exits here
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    lost = [line for line in done.stderr.splitlines() if "not written" in line]
    assert len(lost) == 1 and "30 rows not written" in lost[0], done.stderr


@pytest.mark.parametrize(
    "form",
    [
        "postgresql://alice:{secret}@127.0.0.1:{port}/q?connect_timeout=1",
        "postgresql://alice:{encoded}@127.0.0.1:{port}/q?connect_timeout=1",  # %2F %3F %23 %40
        "postgresql://alice@127.0.0.1:{port}/q?password={secret}&connect_timeout=1",
        "postgres://alice:{secret}@127.0.0.1:{port}/q?sslpassword={secret}&connect_timeout=1",
    ],
)
def test_no_password_form_reaches_errors_repr_logs_last_error_or_metrics(form, caplog):
    pytest.importorskip("psycopg")
    from urllib.parse import quote

    from prometheus_client import generate_latest

    secret = "Pa/ss?w#rd@Sw0rdf1sh"
    plain = "Sw0rdf1sh-plain"
    port = postgres_server.free_port()
    url = form.format(
        secret=plain if "{secret}" in form else "", encoded=quote(secret, safe=""), port=port
    )
    secrets = [plain, secret, quote(secret, safe="")] if "{encoded}" in form else [plain]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(QueueUnavailableError) as info:
        LabelQueue(url, timeout=1)
    registry = CollectorRegistry()
    writer = QueueWriter(
        url, retry_initial=0.05, retry_max=0.1, flush_interval=0.0,
        metrics=PrometheusMetrics(registry),
    )  # fmt: skip
    writer.submit(observation([0.01, 0.02]))
    assert wait_for(lambda: writer.retries >= 2)
    error = writer.last_error
    writer.close(timeout=0.2)
    shown = [str(info.value), repr(writer), writer.url, str(error), caplog.text]
    shown.append(generate_latest(registry).decode())
    for text in shown:
        for s in secrets:
            assert s not in text, text
    assert "***" in str(info.value) and "***" in str(error)
    assert writer.lost["store_error"] == 2
