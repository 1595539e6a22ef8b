"""Inference latency with the label-queue writer on, stalled, or off.

    .venv/bin/python benchmarks/queue_latency.py [--model mlp|cnn] [--rounds 20] [--calls 200]

Times every call of a wrapped model, ``oodmon.wrap(model, monitor, background=...)``, in three
configurations that differ only in the Monitor's label queue:

* ``none``: no queue;
* ``sqlite``: a :class:`~oodmon.label_queue.QueueWriter` on a real SQLite file;
* ``stalled``: a QueueWriter whose database sleeps ``--stall`` seconds on every write (a slow
  or hung server). Its buffer fills up and further flagged rows are dropped and counted.

The detector is calibrated so that about ``alpha`` (25 %) of the traffic is flagged and sent
to the queue. Configurations are interleaved round by round (in a shuffled order) so that
drift in machine load hits them alike. Both Monitor paths are measured: ``sync`` (scored
inside forward, so ``QueueWriter.submit`` runs on the inference thread: the strict case) and
``background`` (the default of ``wrap``). Requirement (issue 5): inference never waits on
the queue, i.e. the stalled p99 stays close to the no-queue p99.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oodmon import OCS, Detector
from oodmon.label_queue import AddResult, LabelQueue, QueueWriter
from oodmon.monitor import Monitor
from oodmon.wrapping import wrap

CONFIGS = ("none", "sqlite", "stalled")


@dataclass(frozen=True)
class Config:
    model: str = "mlp"
    batch: int = 32
    rounds: int = 20
    calls: int = 200
    warmup: int = 50
    alpha: float = 0.25
    stall: float = 0.5
    buffer_rows: int = 10_000
    threads: int = 2
    seed: int = 0


class MnistCNN(nn.Module):
    """conv32-conv64-fc128-fc10, the classic MNIST network."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(kind: str) -> nn.Module:
    if kind == "cnn":
        return MnistCNN().eval()
    # a 2-layer MLP: cheap enough that any queue cost would show in the latency
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


class StalledQueue(LabelQueue):
    """A real SQLite queue whose every write first sleeps (a database that hangs)."""

    stall = 0.5

    def add(self, items: Any) -> AddResult:
        time.sleep(self.stall)
        return super().add(items)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(cfg: Config, background: bool, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.inference_mode():
        calibration = model(torch.rand(2000, 1, 28, 28, generator=gen))
    detector = Detector(OCS.cross_entropy(counts=[1] * 10), alpha=cfg.alpha).fit(calibration)

    StalledQueue.stall = cfg.stall
    mode = "bg" if background else "sync"
    writers: dict[str, QueueWriter | None] = {
        "none": None,
        "sqlite": QueueWriter(
            workdir / f"{cfg.model}-{mode}-sqlite.db", buffer_rows=cfg.buffer_rows
        ),
        "stalled": QueueWriter(
            StalledQueue(workdir / f"{cfg.model}-{mode}-stalled.db"), buffer_rows=cfg.buffer_rows
        ),
    }
    monitors = {name: Monitor(detector, "bench", "v1", queue=w) for name, w in writers.items()}
    wrapped = {name: wrap(model, m, background=background) for name, m in monitors.items()}
    inputs = [torch.rand(cfg.batch, 1, 28, 28, generator=gen) for _ in range(64)]
    latencies: dict[str, list[float]] = {name: [] for name in CONFIGS}
    order = list(CONFIGS)
    rng = random.Random(cfg.seed)
    with torch.inference_mode():
        for name in CONFIGS:
            for i in range(cfg.warmup):
                wrapped[name](inputs[i % len(inputs)])
        for _ in range(cfg.rounds):
            rng.shuffle(order)
            for name in order:
                fn = wrapped[name]
                times = latencies[name]
                for i in range(cfg.calls):
                    x = inputs[i % len(inputs)]
                    start = time.perf_counter_ns()
                    fn(x)
                    times.append((time.perf_counter_ns() - start) / 1e6)
                # untimed: let this block's background work finish so that it does not
                # load the next block (a stalled writer only sleeps, so it is left alone)
                monitors[name].flush()
                writer = writers[name]
                if name == "sqlite" and writer is not None:
                    writer.flush()
    results: dict[str, Any] = {}
    for name in CONFIGS:
        monitor, writer = monitors[name], writers[name]
        stats = monitor.stats(flush=True)
        monitor.close(timeout=2.0)  # closes the writer: a stalled one gives up after 2 s
        values = latencies[name]
        results[name] = {
            "p50_ms": percentile(values, 50),
            "p99_ms": percentile(values, 99),
            "max_ms": max(values),
            "calls": len(values),
            "flagged": stats.flagged,
            "queued": None if writer is None else writer.committed_rows,
            "dropped": None if writer is None else writer.dropped,
            "unwritten_at_close": None if writer is None else writer.failed,
        }
    base = results["none"]
    for name in CONFIGS:
        results[name]["p50_ratio"] = results[name]["p50_ms"] / base["p50_ms"]
        results[name]["p99_ratio"] = results[name]["p99_ms"] / base["p99_ms"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    parser.add_argument("--model", choices=("mlp", "cnn"), default=defaults.model)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--calls", type=int, default=defaults.calls)
    parser.add_argument("--stall", type=float, default=defaults.stall)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    cfg = Config(
        model=args.model, batch=args.batch, rounds=args.rounds, calls=args.calls, stall=args.stall
    )
    torch.set_num_threads(cfg.threads)
    print(f"config: {asdict(cfg)}  torch {torch.__version__}, {torch.get_num_threads()} threads")
    everything: dict[str, Any] = {"config": asdict(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        for background in (False, True):
            mode = "background" if background else "sync"
            results = run(cfg, background, Path(tmp))
            everything[mode] = results
            print(f"\nwrapped {cfg.model} (batch {cfg.batch}), Monitor path: {mode}")
            print(
                f"{'queue':8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50 x':>6} "
                f"{'p99 x':>6} {'flagged':>8} {'queued':>7} {'dropped':>8}"
            )
            for name in CONFIGS:
                r = results[name]
                print(
                    f"{name:8} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['max_ms']:8.2f} "
                    f"{r['p50_ratio']:6.2f} {r['p99_ratio']:6.2f} {r['flagged']:8d} "
                    f"{_n(r['queued']):>7} {_n(r['dropped']):>8}"
                )
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    ratios = [everything[m]["stalled"]["p99_ratio"] for m in ("sync", "background")]
    print(
        f"\nstalled/none p99 ratio: sync {ratios[0]:.2f}, background {ratios[1]:.2f} "
        f"(median of both {statistics.median(ratios):.2f})"
    )
    return 0


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
