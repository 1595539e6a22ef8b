"""``oodmon demo``: the whole product, end to end, on real MNIST digits and no network.

Trains (or loads from cache) the small MNIST CNN, calibrates a Detector on held-out digits,
wraps the model with a Monitor that exports Prometheus metrics and fills an SQLite label
queue, then streams a scenario through the wrapped model: upright digits, increasingly
rotated digits, then noise. The per-phase summary is read back from the Prometheus registry,
so the numbers printed are the numbers a dashboard would show.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodmon.detector import Detector
from oodmon.monitor import Monitor
from oodmon.ocs import OCS

__all__ = ["run_demo"]

_MODEL_NAME = "mnist-cnn"
# not 9464, the README's wrapping example's port: the demo and that example can run at once


@dataclass(frozen=True)
class _Phase:
    """One stretch of traffic: upright digits (0 degrees), rotated digits, or noise."""

    name: str
    angle: float | None  # None = uniform noise images
    samples: int


def _scenario(quick: bool) -> list[_Phase]:
    n = 200 if quick else 1000
    return [
        _Phase("in-distribution", 0.0, n),
        _Phase("rotated 30°", 30.0, n),
        _Phase("rotated 60°", 60.0, n),
        _Phase("rotated 90°", 90.0, n),
        _Phase("rotated 180°", 180.0, n),
        _Phase("noise", None, n // 2),
    ]


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code (130 if interrupted during the scenario)."""
    from prometheus_client import CollectorRegistry

    from oodmon import QueueWriter
    from oodmon.demo import mnist
    from oodmon.metrics import PrometheusMetrics, serve
    from oodmon.wrapping import wrap

    started = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else workdir / "cache"
    progress = not args.no_progress
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 3)
    torch.manual_seed(args.seed)

    data = mnist.load_mnist("auto", root=args.data_root)
    splits = mnist.split_indices(len(data), seed=args.seed, labels=data.labels)
    _say(f"data: {data.source}; splits " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    train_x = mnist.to_model_input(data.images[splits["train"]])
    train_y = data.labels[splits["train"]]

    model, cache_note = _trained_model(
        mnist, train_x, train_y, epochs, args.seed, cache_dir, data.source, progress
    )
    _say(cache_note)

    cal_x = mnist.to_model_input(data.images[splits["calibration"]])
    detector = Detector(OCS.cross_entropy(train_y, 10), alpha=args.alpha)
    detector.fit(mnist.predict_logits(model, cal_x))
    detector_path = detector.save(workdir / "detector.json")

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    try:
        server = serve(args.port, "127.0.0.1", registry=registry)
    except OSError as err:
        raise OSError(
            f"cannot serve /metrics on 127.0.0.1:{args.port} ({err.strerror or err}); "
            "choose another --port (0 picks a free one)"
        ) from err
    _say(f"metrics: {server.url}")

    queue_path = workdir / "label_queue.sqlite"
    with contextlib.suppress(FileNotFoundError):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{queue_path}{suffix}").unlink()
    writer = QueueWriter(queue_path)  # the Monitor tells it the calibration hash
    monitor = Monitor(detector, _MODEL_NAME, "demo", metrics=metrics, queue=writer)
    wrapped = wrap(model, monitor)

    test_images = data.images[splits["test"]]
    phases = _scenario(args.quick)
    rows: list[dict[str, Any]] = []
    interrupted = False
    previous = _interrupt_on_signals()
    try:
        with _progress(sum(p.samples for p in phases), "scenario", progress) as bar:
            for phase in phases:
                before = _totals(registry)
                images = _phase_images(mnist, test_images, phase, args.seed)
                n_batches = -(-len(images) // args.batch_size)
                pause = max(args.phase_seconds, 0.0) / n_batches
                with torch.inference_mode():
                    for start in range(0, len(images), args.batch_size):
                        batch = mnist.to_model_input(images[start : start + args.batch_size])
                        wrapped(batch)
                        if bar is not None:
                            bar.update(len(batch))
                        if pause:
                            time.sleep(pause)
                monitor.flush()
                writer.flush(timeout=30)
                after = _totals(registry)
                rows.append(_phase_summary(phase, before, after, writer.depth()))
        plot_path = _plot_phases(rows, workdir / "demo.png", detector.alpha)
        _write_summary(rows, workdir / "summary.json", detector, data.source)
        _print_summary(rows, detector.alpha)
        _say(f"plot:     {plot_path or 'not written (pip install oodmon[experiments])'}")
        cli = _cli()
        _say(f"queue:    {queue_path}  (try: {cli} queue ls {shlex.quote(str(queue_path))})")
        _say(f"detector: {detector_path}  (try: {cli} inspect {shlex.quote(str(detector_path))})")
        _say(f"done in {time.perf_counter() - started:.0f} s")
        if args.serve:
            _say(f"serving {server.url} until Ctrl-C (grafana/ has a dashboard for it)")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        interrupted = True
        _say("interrupted: flushing the label queue and stopping the exporter")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        monitor.close()  # flushes the queue writer too
        server.close()
    return 130 if interrupted else 0


def _interrupt_on_signals() -> dict[int, Any]:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt, so the demo always cleans up."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, interrupt)
    return previous


def _say(message: str) -> None:
    print(message, flush=True)


def _trained_model(
    mnist: Any,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    epochs: int,
    seed: int,
    cache_dir: Path,
    source: str,
    progress: bool,
) -> tuple[torch.nn.Module, str]:
    """Load the CNN from the cache when the same data and settings trained it, else train it."""
    key = hashlib.sha256(
        json.dumps(
            [source, len(train_y), int(train_y.sum()), epochs, seed, torch.__version__]
        ).encode()
    ).hexdigest()[:12]
    path = cache_dir / f"mnist_cnn_{key}.pt"
    model = mnist.SmallCNN()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), f"model: loaded from cache {path}"
        except Exception as err:  # a corrupt cache is retrained, not fatal
            note = f" (cache {path} unreadable: {err}; retrained)"
    else:
        note = ""
    start = time.perf_counter()
    mnist.train(model, train_x, train_y, epochs=epochs, seed=seed, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    took = time.perf_counter() - start
    return model.eval(), f"model: trained {epochs} epochs in {took:.0f} s, cached at {path}{note}"


def _phase_images(mnist: Any, test_images: torch.Tensor, phase: _Phase, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 17)
    picks = torch.randint(0, len(test_images), (phase.samples,), generator=gen)
    if phase.angle is None:
        return torch.randint(0, 256, (phase.samples, 28, 28), generator=gen, dtype=torch.uint8)
    images = test_images[picks]
    return images if phase.angle == 0 else mnist.rotate(images, phase.angle)


def _totals(registry: Any) -> dict[str, float]:
    labels = {"model": _MODEL_NAME, "model_version": "demo"}

    def value(name: str, extra: dict[str, str] | None = None) -> float:
        got = registry.get_sample_value(name, {**labels, **(extra or {})})
        return float(got or 0.0)

    flagged = sum(
        float(s.value)
        for family in registry.collect()
        if family.name == "oodmon_flagged"
        for s in family.samples
        if s.name == "oodmon_flagged_total" and s.labels.get("model") == _MODEL_NAME
    )
    return {
        "predictions": value("oodmon_predictions_total"),
        "flagged": flagged,
        "scored": value("oodmon_ocs_distance_count"),
        "distance_sum": value("oodmon_ocs_distance_sum"),
    }


def _phase_summary(
    phase: _Phase, before: dict[str, float], after: dict[str, float], depth: int | None
) -> dict[str, Any]:
    delta = {k: after[k] - before[k] for k in after}
    scored = delta["scored"]
    return {
        "phase": phase.name,
        "samples": int(delta["predictions"]),
        "flag_rate": delta["flagged"] / delta["predictions"] if delta["predictions"] else 0.0,
        "mean_distance": delta["distance_sum"] / scored if scored else float("nan"),
        "queue_depth": depth,
    }


def _print_summary(rows: list[dict[str, Any]], alpha: float) -> None:
    header = (
        f"{'phase':<16} {'samples':>8} {'flag rate':>10} {'mean KL to OCS':>17} "
        f"{'queue (total)':>13}"
    )
    _say("")
    _say(header)
    _say("-" * len(header))
    for row in rows:
        depth = "?" if row["queue_depth"] is None else str(row["queue_depth"])
        _say(
            f"{row['phase']:<16} {row['samples']:>8} {row['flag_rate']:>10.1%} "
            f"{row['mean_distance']:>12.3f} nats {depth:>13}"
        )
    _say("")
    for line in _legend(alpha):
        _say(line)
    _say("")


def _legend(alpha: float) -> list[str]:
    """How to read the summary table without the paper."""
    return [
        "flag rate       share of the phase's inputs flagged as OOD; on in-distribution digits",
        f"                it should be close to alpha = {alpha:g} (the false-alarm rate the",
        "                detector was calibrated for); far above alpha = shifted traffic",
        "mean KL to OCS  distance from the outputs to the optimal constant solution (the",
        "                training label frequencies); LOWER = closer to the OCS = more OOD",
        "queue (total)   label-queue items so far, cumulative over the phases",
        "180° vs 60°     upside-down digits still look like digits (0s and 1s stay mostly",
        "                right; most 7s read as 6s): the model answers confidently, its outputs",
        "                stay far from the OCS, and fewer are flagged; a confident mistake for",
        "                another class is what the OCS view cannot see (experiments/README.md)",
    ]


def _cli() -> str:
    """A command that runs this oodmon's CLI from the current directory, as typed."""
    script = Path(sys.executable).with_name("oodmon")
    if script.is_file():
        path = str(script)
        with contextlib.suppress(ValueError):  # another drive (Windows)
            relative = os.path.relpath(script)
            if not relative.startswith(".."):
                path = relative
        return shlex.quote(path)
    return f"{shlex.quote(sys.executable)} -m oodmon.cli"


def _write_summary(rows: list[dict[str, Any]], path: Path, detector: Detector, source: str) -> None:
    path.write_text(
        json.dumps(
            {
                "data_source": source,
                "alpha": detector.alpha,
                "calibration_size": detector.n_calibration_,
                "calibration_hash": detector.calibration_hash_,
                "phases": rows,
            },
            indent=2,
        )
    )


def _plot_phases(rows: list[dict[str, Any]], path: Path, alpha: float) -> Path | None:
    """Flag rate and mean distance per phase, side by side; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["phase"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.bar(names, [r["flag_rate"] for r in rows], color="#c0392b")
    left.axhline(alpha, color="black", linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
    left.legend(loc="upper left")
    left.set_ylabel("flag rate")
    left.set_ylim(0, 1)
    left.set_title("Flagged as out-of-distribution")
    right.bar(names, [r["mean_distance"] for r in rows], color="#2c7fb8")
    right.set_ylabel("mean KL(p(x) || OCS), nats")
    right.set_title("Distance to the optimal constant solution")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
        for label in axis.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
