"""Wall time of oodmon's command-line entry points, each a fresh process, side by side.

Run:  .venv/bin/python benchmarks/cli_startup.py [--repeats 5] [--json out.json]

Times ``oodmon --version``, ``oodmon queue stats`` on a 10,000-item SQLite queue and
``oodmon score`` on 1,000 rows, each through the console script and through
``python -m oodmon.cli`` (which works whether the CLI is a module or a package with a
``__main__``), beside ``python -c "import oodmon"`` and ``python -c "import torch"``.
Commands run in interleaved rounds, so machine load hits them alike; the table shows the
median and the minimum over rounds. Targets (issue 15): ``--version`` under 0.3 s, ``queue
stats`` under 1 s, ``import oodmon`` within 0.3 s of ``import torch``. Reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodmon import OCS, Detector, LabelQueue
from oodmon.label_queue import QueueItem

QUEUE_ITEMS = 10_000
SCORE_ROWS = 1_000
CLASSES = 10


def make_queue(path: Path) -> None:
    """An SQLite label queue holding QUEUE_ITEMS items (no stored inputs)."""
    rng = np.random.default_rng(0)
    queue = LabelQueue(path, capacity=QUEUE_ITEMS * 2)
    items = [
        QueueItem.create(
            model="bench",
            version="1",
            p_value=float(rng.uniform(0.0001, 0.05)),
            distance=float(rng.gamma(2.0, 0.5)),
            predicted=int(rng.integers(0, CLASSES)),
            id=f"item-{i}",
            timestamp=1.7e9 + i,
        )
        for i in range(QUEUE_ITEMS)
    ]
    queue.add(items)
    queue.close()


def make_detector_and_outputs(workdir: Path) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randn(2000, CLASSES, generator=gen) * 3
    detector = Detector(OCS.cross_entropy(counts=[10] * CLASSES)).fit(calibration)
    detector_path = workdir / "detector.json"
    detector.save(detector_path)
    outputs_path = workdir / "outputs.npy"
    np.save(outputs_path, (torch.randn(SCORE_ROWS, CLASSES, generator=gen) * 3).numpy())
    return detector_path, outputs_path


def commands(workdir: Path) -> dict[str, list[str]]:
    queue_path = workdir / "queue.sqlite"
    make_queue(queue_path)
    detector_path, outputs_path = make_detector_and_outputs(workdir)
    script = Path(sys.executable).with_name("oodmon")
    if not script.exists():
        raise SystemExit(f"console script not found next to {sys.executable}: pip install -e .")
    module = [sys.executable, "-m", "oodmon.cli"]
    score_args = ["score", "--detector", str(detector_path), "--outputs", str(outputs_path),
                  "-o", str(workdir / "scores.csv")]  # fmt: skip
    found: dict[str, list[str]] = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        'python -c "import oodmon"': [sys.executable, "-c", "import oodmon"],
    }
    for label, prefix in (("oodmon", [str(script)]), ("python -m oodmon.cli", module)):
        found[f"{label} --version"] = [*prefix, "--version"]
        found[f"{label} queue stats (10k items)"] = [*prefix, "queue", "stats", str(queue_path)]
        found[f"{label} score (1k rows)"] = [*prefix, *score_args]
    return found


def run_once(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for cmd in cmds.values():  # warm the file cache once
            run_once(cmd)
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                times[name].append(run_once(cmd))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.repeats} interleaved rounds")  # fmt: skip
    print("| command | median s | min s |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.2f} | {min(values):.2f} |")
    torch_s = statistics.median(times['python -c "import torch"'])
    oodmon_s = statistics.median(times['python -c "import oodmon"'])
    print(f"import oodmon - import torch: {oodmon_s - torch_s:+.2f} s (target: within 0.3 s)")
    if args.json:
        Path(args.json).write_text(json.dumps(times, indent=2))


if __name__ == "__main__":
    main()
