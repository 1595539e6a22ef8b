"""Forward-pass overhead of oodmon.wrap: wrapped vs bare model, measured side by side.

Run:  .venv/bin/python benchmarks/overhead.py [--rounds 30] [--skip-resnet] [--json out.json]

Each configuration runs in interleaved rounds (bare, wrapped with background scoring, the
default, and wrapped with synchronous scoring), in a shuffled order each round, so that
machine noise and order effects hit all of them alike. A round times several forward calls;
the ratio wrapped/bare is taken per round and the table reports its median and interquartile
range. Every wrapped model has Prometheus metrics and an SQLite label queue attached, as in
production. Three ways of timing, all reported:

* flushed: after each wrapped round the monitor is flushed inside the timed region, so work
  pushed onto the background thread is paid for, not hidden;
* alternating: bare and background-wrapped calls alternate one by one, each timed alone, and
  the worker is never flushed inside a timed region, so its scoring competes with the next
  forward passes as it does in a server (the monitor is flushed between rounds, untimed);
* randomised: bare and wrapped calls in a random order, each followed by one timed bare
  forward. A wrapped call costs its own extra time plus the extra time of the forward after
  it: its copies and Python code leave that forward colder caches. The alternating pass
  charges that second part to the bare call that follows, so its ratio understates the
  calling thread's cost.

A second table says where the overhead goes, in microseconds per call: wrapped minus bare in
each harness (the randomised one split into the call and the forward after it),
``Monitor.submit`` timed on the calling thread in the alternating pass, the worker thread's
CPU time in the flushed pass (read from its own CPU clock, so it counts what the worker did,
not how long it waited) and the wait in ``flush`` at the end of a flushed round. What the
flushed overhead has beyond these is the worker competing with the model for cores and for
the GIL. Two probes in the randomised pass bound what a wrapped call could cost at least:
the wrapper with a ``Monitor.submit`` that does nothing, and the two copies a submit makes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from oodmon import OCS, Detector, Monitor, wrap
from oodmon.demo.mnist import SmallCNN
from oodmon.label_queue import QueueWriter
from oodmon.metrics import PrometheusMetrics


@dataclass
class Case:
    name: str
    model: nn.Module
    make_input: Callable[[], torch.Tensor]
    calls_per_round: int


def cases(skip_resnet: bool) -> list[Case]:
    torch.manual_seed(0)
    found = [
        Case("MNIST CNN, batch 1", SmallCNN().eval(), lambda: torch.randn(1, 1, 28, 28), 200),
        Case("MNIST CNN, batch 256", SmallCNN().eval(), lambda: torch.randn(256, 1, 28, 28), 4),
    ]
    if not skip_resnet:
        from torchvision.models import resnet18

        found.append(
            Case(
                "ResNet-18, batch 32, 224x224",
                resnet18(weights=None).eval(),
                lambda: torch.randn(32, 3, 224, 224),
                1,
            )
        )
    return found


def monitored(
    case: Case, workdir: Path, background: bool
) -> tuple[nn.Module, Monitor, QueueWriter]:
    """The case's model wrapped with metrics and an SQLite queue, calibrated on its own outputs."""
    with torch.inference_mode():
        calibration = torch.cat([case.model(case.make_input()) for _ in range(4)])
        if len(calibration) < 200:
            calibration = torch.cat([case.model(case.make_input()) for _ in range(200)])
    classes = calibration.shape[1]
    detector = Detector(OCS.cross_entropy(counts=[10] * classes), alpha=0.05).fit(calibration)
    writer = QueueWriter(workdir / f"queue-{id(case)}-{background}.sqlite")
    monitor = Monitor(
        detector, "bench", "1", metrics=PrometheusMetrics(registry=CollectorRegistry()),
        queue=writer,
    )  # fmt: skip
    return wrap(case.model, monitor, background=background), monitor, writer


def run_case(case: Case, rounds: int, workdir: Path) -> dict[str, object]:
    background, bg_monitor, bg_writer = monitored(case, workdir, background=True)
    synchronous, sync_monitor, sync_writer = monitored(case, workdir, background=False)
    x = case.make_input()
    configs: dict[str, tuple[nn.Module, Monitor | None]] = {
        "bare": (case.model, None),
        "background": (background, bg_monitor),
        "sync": (synchronous, sync_monitor),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    worker_cpu: list[float] = []  # worker CPU seconds per background round
    flush_wait: list[float] = []  # seconds in flush() per background round
    with torch.inference_mode():
        for _ in range(2):  # warm-up, including the background thread's start
            for model, monitor in configs.values():
                model(x)
                if monitor is not None:
                    monitor.flush()
        order = list(configs)
        shuffler = random.Random(0)
        for _ in range(rounds):
            shuffler.shuffle(order)
            for name in order:
                model, monitor = configs[name]
                worker, cpu_before = worker_cpu_now(monitor)
                start = time.perf_counter()
                for _ in range(case.calls_per_round):
                    model(x)
                flushing = time.perf_counter()
                if monitor is not None:
                    monitor.flush()
                end = time.perf_counter()
                times[name].append((end - start) / case.calls_per_round)
                if name == "background":
                    worker_after, cpu_after = worker_cpu_now(monitor)
                    # a worker started during the round began at zero CPU seconds
                    worker_cpu.append(cpu_after - (cpu_before if worker_after is worker else 0))
                    flush_wait.append(end - flushing)
    result: dict[str, object] = {
        "case": case.name,
        "bare_ms": statistics.median(times["bare"]) * 1e3,
    }
    for name in ("background", "sync"):
        ratios = [w / b for w, b in zip(times[name], times["bare"], strict=True)]
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        result[name] = {"median_ratio": med, "q1": q1, "q3": q3,
                        "ms": statistics.median(times[name]) * 1e3}  # fmt: skip
    per_call_us = 1e6 / case.calls_per_round
    result["flushed_us"] = statistics.median(
        (w - b) * 1e6 for w, b in zip(times["background"], times["bare"], strict=True)
    )
    result["worker_cpu_us"] = statistics.median(worker_cpu) * per_call_us
    result["flush_us"] = statistics.median(flush_wait) * per_call_us
    result["alternating"] = alternating(case, background, bg_monitor, x, rounds)
    result["randomised"] = randomised(
        case, background, bg_monitor, x, calls=rounds * case.calls_per_round
    )
    for monitor, writer in ((bg_monitor, bg_writer), (sync_monitor, sync_writer)):
        stats = monitor.stats()
        result.setdefault("monitor_errors", 0)
        result["monitor_errors"] = int(result["monitor_errors"]) + stats.errors_total  # type: ignore[call-overload]
        monitor.close()
        writer.close()
    return result


def alternating(
    case: Case, wrapped: nn.Module, monitor: Monitor, x: torch.Tensor, rounds: int
) -> dict[str, float]:
    """Bare and wrapped calls one after the other, no flush inside the timed region.

    Returns the median over rounds of sum(wrapped) / sum(bare) within a round, its quartiles,
    and the median cost of ``Monitor.submit`` on the calling thread in microseconds.
    """
    submit = monitor.submit
    submit_ns: list[int] = []

    def timed_submit(*args: object, **kwargs: object) -> None:
        start = time.perf_counter_ns()
        submit(*args, **kwargs)  # type: ignore[arg-type]
        submit_ns.append(time.perf_counter_ns() - start)

    monitor.submit = timed_submit  # type: ignore[method-assign]
    ratios = []
    extra_us = []
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                bare = wrapped_total = 0
                for _ in range(case.calls_per_round):
                    start = time.perf_counter_ns()
                    case.model(x)
                    middle = time.perf_counter_ns()
                    wrapped(x)
                    bare += middle - start
                    wrapped_total += time.perf_counter_ns() - middle
                monitor.flush()  # between rounds, untimed: the backlog stays bounded
                ratios.append(wrapped_total / bare)
                extra_us.append((wrapped_total - bare) / case.calls_per_round / 1e3)
    finally:
        del monitor.submit
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    return {"median_ratio": med, "q1": q1, "q3": q3, "extra_us": statistics.median(extra_us),
            "submit_us": statistics.median(submit_ns) / 1e3}  # fmt: skip


def randomised(
    case: Case, wrapped: nn.Module, monitor: Monitor, x: torch.Tensor, calls: int
) -> dict[str, float]:
    """Bare, wrapped and probe calls in a random order, each followed by a timed bare forward.

    Returns, in microseconds, the wrapped call's extra time and the extra time of the forward
    after it, each a difference of 10%-trimmed means (robust to the VM's stalls, yet moved by
    every call), and the ratio (bare call + both) / bare call; then, for the wrapped call and
    each probe, its call plus next forward against the bare one's, with a standard error. The
    two probes bound what the wrapped call could cost: the wrapper with a ``Monitor.submit``
    that does nothing, and a bare forward followed by the two copies a submit makes (kept as
    long as a lingering backlog keeps them).
    """
    held: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=100)

    def copies_only(inputs: torch.Tensor) -> None:
        outputs = case.model(inputs)
        held.append((outputs.clone(), inputs.clone()))

    calls_of: dict[str, Callable[[torch.Tensor], object]] = {
        "bare": case.model, "wrapped": wrapped, "wrapper_only": wrapped,
        "copies_only": copies_only,
    }  # fmt: skip
    chooser = random.Random(1)
    call_ns: dict[str, list[int]] = {kind: [] for kind in calls_of}
    next_ns: dict[str, list[int]] = {kind: [] for kind in calls_of}
    with torch.inference_mode():
        for i in range(calls):
            kind = chooser.choice(list(calls_of))
            if kind == "wrapper_only":
                monitor.submit = _no_submit  # type: ignore[method-assign]
            try:
                start = time.perf_counter_ns()
                calls_of[kind](x)
                middle = time.perf_counter_ns()
                case.model(x)
            finally:
                if kind == "wrapper_only":
                    del monitor.submit
            call_ns[kind].append(middle - start)
            next_ns[kind].append(time.perf_counter_ns() - middle)
            if i % 1000 == 999:
                monitor.flush()  # untimed: the backlog stays bounded
        monitor.flush()
    bare_call, bare_next = trimmed_mean(call_ns["bare"]), trimmed_mean(next_ns["bare"])
    extra_call = trimmed_mean(call_ns["wrapped"]) - bare_call
    extra_next = trimmed_mean(next_ns["wrapped"]) - bare_next
    result = {"ratio": (bare_call + extra_call + extra_next) / bare_call,
              "call_us": extra_call / 1e3, "next_forward_us": extra_next / 1e3}  # fmt: skip
    # each kind's call + next forward against the bare one's, with a standard error
    totals = {kind: [c + n for c, n in zip(call_ns[kind], next_ns[kind], strict=True)]
              for kind in calls_of}  # fmt: skip
    for kind in ("wrapped", "wrapper_only", "copies_only"):
        result[f"{kind}_us"] = (trimmed_mean(totals[kind]) - trimmed_mean(totals["bare"])) / 1e3
        result[f"{kind}_se_us"] = (
            math.hypot(trimmed_standard_error(totals[kind]), trimmed_standard_error(totals["bare"]))
            / 1e3
        )
    return result


def _no_submit(*args: object, **kwargs: object) -> None:
    """A ``Monitor.submit`` that does nothing: the wrapper's own cost."""


def trimmed_mean(values: list[int]) -> float:
    """The mean of the middle 80% (NaN with no values: too few rounds)."""
    middle = _middle(values)
    return statistics.fmean(middle) if middle else math.nan


def trimmed_standard_error(values: list[int]) -> float:
    """The standard error of :func:`trimmed_mean` (a rough one: the middle's spread).

    NaN with fewer than two values in the middle: too few rounds to tell.
    """
    middle = _middle(values)
    if len(middle) < 2:
        return math.nan
    return statistics.stdev(middle) / math.sqrt(len(middle))


def _middle(values: list[int]) -> list[int]:
    ordered = sorted(values)
    cut = len(ordered) // 10
    return ordered[cut : len(ordered) - cut]


def worker_cpu_now(monitor: Monitor | None) -> tuple[threading.Thread | None, float]:
    """The monitor's worker thread and the CPU seconds it has used so far (0 without one).

    Read from the thread's own CPU clock (Linux), so time it spent waiting is not counted.
    """
    worker = None if monitor is None else monitor._batcher.worker
    if worker is None or worker.ident is None:
        return worker, 0.0
    try:
        return worker, time.clock_gettime(time.pthread_getcpuclockid(worker.ident))
    except OSError:  # the thread has ended
        return worker, 0.0
    except AttributeError:  # no per-thread CPU clocks here (not Linux)
        return worker, math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval (s), for GIL experiments"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the quartiles need two rounds)")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.rounds} rounds, "
        f"GIL switch interval {sys.getswitchinterval() * 1e3:g} ms"
    )
    print(
        "| model | bare ms/call | background, flushed: median ratio [IQR] "
        "| background, alternating: median ratio [IQR] | background, randomised: ratio "
        "| sync: median ratio [IQR] |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args.skip_resnet):
            r = run_case(case, args.rounds, Path(tmp))
            results.append(r)
            cells = []
            for name in ("background", "alternating", "sync"):
                s = r[name]
                assert isinstance(s, dict)
                cells.append(f"{s['median_ratio']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]")
            randomised_ratio = r["randomised"]["ratio"]  # type: ignore[index]
            print(
                f"| {r['case']} | {r['bare_ms']:.3f} | {cells[0]} | {cells[1]} "
                f"| {randomised_ratio:.3f} | {cells[2]} |",
                flush=True,
            )
    print()
    print("Where the overhead goes, us per call (wrapped - bare; submit, worker and flush alone):")
    print(
        "| model | flushed | alternating | randomised: call + next forward "
        "| Monitor.submit | worker CPU | flush wait | probe: wrapper, no-op submit "
        "| probe: the two copies alone |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        alt, rnd = r["alternating"], r["randomised"]
        assert isinstance(alt, dict) and isinstance(rnd, dict)
        print(
            f"| {r['case']} | {r['flushed_us']:.1f} | {alt['extra_us']:.1f} "
            f"| {rnd['call_us']:.1f} + {rnd['next_forward_us']:.1f} "
            f"= {rnd['wrapped_us']:.1f} +- {rnd['wrapped_se_us']:.1f} "
            f"| {alt['submit_us']:.1f} | {r['worker_cpu_us']:.1f} | {r['flush_us']:.1f} "
            f"| {rnd['wrapper_only_us']:.1f} +- {rnd['wrapper_only_se_us']:.1f} "
            f"| {rnd['copies_only_us']:.1f} +- {rnd['copies_only_se_us']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
