"""The SQLite backend (``label_queue.sqlite``): missing and foreign files; crash safety.

Crash safety: a process writing through the Monitor is SIGKILLed mid-stream.

The child streams flagged batches through ``Monitor -> QueueWriter -> SQLite`` and prints
the ids of every batch right after its transaction committed. The parent kills it with
SIGKILL while it is still writing, then checks that the file opens cleanly, passes
``PRAGMA integrity_check``, and holds every id the child reported as committed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from oodmon.label_queue import LabelQueue, NotAQueueError

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys
    import torch
    from oodmon import OCS, Detector
    from oodmon.monitor import Monitor
    from oodmon.label_queue import QueueWriter

    def report(ids):
        print("COMMIT " + " ".join(ids), flush=True)

    torch.manual_seed(0)
    detector = Detector(OCS.cross_entropy(counts=[10] * 10), alpha=0.1)
    detector.fit(torch.randn(400, 10) * 6)
    writer = QueueWriter(sys.argv[1], batch_rows=16, flush_interval=0.001, on_commit=report)
    monitor = Monitor(detector, "mnist", "v1", queue=writer)
    batch = 0
    while True:  # until killed
        near_ocs = torch.randn(32, 10) * 0.01  # flat outputs: every row is flagged
        images = torch.rand(32, 1, 28, 28)
        monitor.observe(near_ocs, inputs=images, ids=[f"{batch}-{j}" for j in range(32)])
        batch += 1
""")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_commits", [3, 25])
def test_sigkill_mid_stream_loses_no_committed_batch(tmp_path, kill_after_commits):
    path = tmp_path / "crash.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    enough = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            if sum(x.startswith("COMMIT ") for x in lines) >= kill_after_commits:
                enough.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not enough.wait(120):
            stderr = child.stderr.read() if child.stderr else ""
            raise AssertionError(f"the child did not commit: {stderr}")
        assert child.poll() is None, "the child must still be streaming when killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        reader.join(10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()

    committed = [
        i
        for line in lines
        if line.startswith("COMMIT ") and line.endswith("\n")
        for i in line.split()[1:]
    ]
    assert len(committed) >= 16 * kill_after_commits
    # the crashed writer left a WAL behind; opening recovers it
    start = time.monotonic()
    with LabelQueue(path) as queue:
        present = {item.id for item in queue.iter_items()}
        stats = queue.stats()
    assert time.monotonic() - start < 10
    missing = set(committed) - present
    assert not missing, f"{len(missing)} committed items lost, e.g. {sorted(missing)[:5]}"
    assert stats.queued == len(present) >= len(committed)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


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
