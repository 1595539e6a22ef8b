"""Interpreter exit without close(): pending background batches still reach the label queue."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from oodmon.label_queue import LabelQueue

CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import oodmon
    from oodmon.label_queue import QueueWriter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    ocs = oodmon.OCS.cross_entropy(counts=[1] * 10)
    with torch.no_grad():
        detector = oodmon.Detector(ocs, alpha=0.05).fit(model(torch.randn(400, 4, 4) * 3))
    writer = QueueWriter(sys.argv[1], flush_interval=60.0)   # would wait a minute to write
    monitor = oodmon.Monitor(detector, "m", "1", queue=writer, linger=60.0)  # and to score
    wrapped = oodmon.wrap(model, monitor)
    with torch.no_grad():
        for i in range(50):
            wrapped(torch.zeros(2, 4, 4) + i * 1e-3)   # near-constant inputs: flagged
    print(monitor.stats(flush=False).seen, flush=True)  # nothing scored yet
    # no close(): the interpreter exits here
    """
)


def test_exit_scores_pending_batches_and_flushes_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"  # the background thread had not scored anything yet
    with LabelQueue(path, read_only=True) as queue:
        stats = queue.stats()
    assert stats.queued + stats.duplicates == 100  # every flagged row arrived (some merged)
    assert stats.queued == 50  # 50 distinct inputs, each seen twice
