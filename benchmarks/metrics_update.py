"""Cost of updating oodmon's Prometheus metrics for one batch, by batch size and score kind.

    .venv/bin/python benchmarks/metrics_update.py [--rounds 30] [--calls 200]

Times ``PrometheusMetrics.record(observation)`` (counters, and the distance, p-value and
scoring-time histograms filled with NumPy) for batches of 1, 64, 1024 and 4096 rows, on both
ways the sink fills the p-value histogram:

* ``ocs``: an OCS score (the default, distance == -score); one sort of the distances counts
  both histograms (the p-value buckets through ``conformal.score_cutoffs``).
* ``non-OCS``: any other score (msp, energy, ...); the distances are sorted, the p-values
  counted from the verdict's calibration ranks (a ``bincount``, no sort).

and, for scale, a naive sink that calls ``Histogram.observe`` once per sample. Sizes and
paths are interleaved round by round so that drift in machine load hits them alike; each round
times ``--calls`` consecutive updates and reports the per-update mean. The table shows the
median over rounds with the interquartile range, and the minimum (the least disturbed round,
the best estimate of the intrinsic cost on a shared machine), then cost(4096) / cost(1) by
medians, by minima and as the median of per-round ratios. The requirement (issues 4 and 15):
the update for a batch of 4096 costs at most 3x the update for a batch of 1, by medians, on
both paths; the exit status is 1 when a path misses it. ``benchmarks/histogram_counting.py``
compares the ways of counting one histogram.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

from oodmon.conformal import ranked_p_values
from oodmon.metrics import DEFAULT_DISTANCE_BUCKETS, DEFAULT_P_VALUE_BUCKETS, PrometheusMetrics
from oodmon.sinks import DetectorSummary
from oodmon.verdict import HostVerdict, Observation


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...] = (1, 64, 1024, 4096)
    rounds: int = 30
    calls: int = 200
    seed: int = 0
    alpha: float = 0.05


class NaiveMetrics:
    """The same counters and histograms, updated with one ``observe`` call per sample."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "model_version")
        self.predictions = Counter("naive_predictions_total", "rows", labels, registry=registry)
        self.flagged = Counter("naive_flagged_total", "flags", labels, registry=registry)
        self.distance = Histogram(
            "naive_distance", "d", labels, registry=registry, buckets=DEFAULT_DISTANCE_BUCKETS
        )
        self.p_value = Histogram(
            "naive_p_value", "p", labels, registry=registry, buckets=DEFAULT_P_VALUE_BUCKETS
        )
        self.scoring = Histogram("naive_scoring_seconds", "s", labels, registry=registry)

    def record(self, observation: Observation) -> None:
        key = (observation.model, observation.version)
        verdict = observation.verdict
        self.predictions.labels(*key).inc(len(verdict))
        self.flagged.labels(*key).inc(int(verdict.flag.sum()))
        valid = ~verdict.invalid
        distance, p_value = self.distance.labels(*key), self.p_value.labels(*key)
        for value in verdict.distance[valid].tolist():
            distance.observe(value)
        for value in verdict.p_value[valid].tolist():
            p_value.observe(value)
        self.scoring.labels(*key).observe(observation.scoring_seconds)


def synthetic_distances(rng: np.random.Generator, n: int) -> np.ndarray:
    """KL distances like a 10-class model's, spread over 0..~5 nats."""
    return rng.gamma(2.0, 0.8, size=n)


def synthetic_calibration(rng: np.random.Generator, n: int = 1000) -> torch.Tensor:
    """Sorted calibration scores (negated distances) of the same distribution."""
    return torch.sort(-torch.from_numpy(synthetic_distances(rng, n))).values


def synthetic_batch(
    rng: np.random.Generator, n: int, calibration: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` distances, and the conformal p-values and calibration ranks they get.

    As a Monitor computes them.
    """
    distance = synthetic_distances(rng, n)
    p_value, rank = ranked_p_values(torch.from_numpy(-distance), calibration)
    return distance, p_value.numpy(), rank.numpy()


def make_observation(
    rng: np.random.Generator, n: int, alpha: float, calibration: torch.Tensor
) -> Observation:
    """An observed batch of :func:`synthetic_batch` rows."""
    distance, p_value, rank = synthetic_batch(rng, n, calibration)
    verdict = HostVerdict(
        score=-distance,
        distance=distance,
        p_value=p_value,
        flag=p_value <= alpha,
        invalid=np.zeros(n, dtype=bool),
        predicted=rng.integers(0, 10, size=n),
        calibration_rank=rank,
    )
    return Observation("bench", "v1", verdict, {}, scoring_seconds=0.002)


def per_call_seconds(record: object, observation: Observation, calls: int) -> float:
    fn = record  # bound method
    start = time.perf_counter()
    for _ in range(calls):
        fn(observation)  # type: ignore[operator]
    return (time.perf_counter() - start) / calls


def summary_for(score: str, alpha: float, calibration: torch.Tensor) -> DetectorSummary:
    """The detector as a Monitor describes it to its sinks."""
    n = calibration.numel()
    return DetectorSummary(
        "bench", "v1", score, alpha, -0.5, n, "0" * 16, 10, "cross_entropy",
        calibration_scores=calibration,
    )  # fmt: skip


def stats(values: list[float]) -> tuple[float, float, float, float]:
    """Median, first and third quartiles, and minimum, in microseconds."""
    us = np.asarray(values) * 1e6
    q1, median, q3 = np.percentile(us, [25, 50, 75])
    return float(median), float(q1), float(q3), float(us.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--calls", type=int, default=Config.calls)
    args = parser.parse_args(argv)
    config = Config(rounds=args.rounds, calls=args.calls)
    rng = np.random.default_rng(config.seed)

    calibration = synthetic_calibration(rng)
    sinks = {path: PrometheusMetrics(CollectorRegistry()) for path in ("ocs", "non-OCS")}
    sinks["ocs"].describe(summary_for("ocs_kl", config.alpha, calibration))
    sinks["non-OCS"].describe(summary_for("msp", config.alpha, calibration))
    naive = NaiveMetrics(CollectorRegistry())
    observations = {n: make_observation(rng, n, config.alpha, calibration) for n in config.sizes}
    # The naive loop is slow at large batches: fewer calls keep the run short.
    naive_calls = {n: max(2, min(config.calls, 20_000 // n)) for n in config.sizes}

    times: dict[str, dict[int, list[float]]] = {
        path: {n: [] for n in config.sizes} for path in [*sinks, "observe loop"]
    }
    for n in config.sizes:  # warm-up
        for sink in sinks.values():
            per_call_seconds(sink.record, observations[n], 10)
        per_call_seconds(naive.record, observations[n], 2)
    for _ in range(config.rounds):
        for n in config.sizes:
            for path, sink in sinks.items():
                times[path][n].append(per_call_seconds(sink.record, observations[n], config.calls))
            times["observe loop"][n].append(
                per_call_seconds(naive.record, observations[n], naive_calls[n])
            )

    print(
        f"per-batch metrics update over {config.rounds} interleaved rounds of {config.calls} "
        f"calls; python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    head = f"{'path':>12} | {'batch':>6} | {'median [IQR]':>24} | {'min':>7}"
    print(head)
    print("-" * len(head))
    for path, by_size in times.items():
        for n in config.sizes:
            median, q1, q3, low = stats(by_size[n])
            print(f"{path:>12} | {n:>6} | {median:>8.1f} [{q1:>6.1f}, {q3:>6.1f}] us | {low:>7.1f}")
    first, last = config.sizes[0], config.sizes[-1]
    print(f"cost({last}) / cost({first}), requirement <= 3 (medians) for ocs and non-OCS:")
    met = True
    for path, by_size in times.items():
        by_median = stats(by_size[last])[0] / stats(by_size[first])[0]
        by_min = stats(by_size[last])[3] / stats(by_size[first])[3]
        per_round = np.median(np.asarray(by_size[last]) / np.asarray(by_size[first]))
        print(
            f"{path:>12}: {by_median:6.2f} (medians), {by_min:6.2f} (minima), "
            f"{per_round:6.2f} (median of per-round ratios)"
        )
        if path in sinks:
            met = met and by_median <= 3.0
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
