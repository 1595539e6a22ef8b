"""Cost of updating oodmon's Prometheus metrics for one batch, by batch size.

    .venv/bin/python benchmarks/metrics_update.py [--rounds 30] [--calls 200]

Times ``PrometheusMetrics.record(observation)`` (counters, and the distance, p-value and
scoring-time histograms filled with NumPy) against a naive sink that calls
``Histogram.observe`` once per sample, for batches of 1, 64, 1024 and 4096 rows. Sizes are
interleaved round by round so that drift in machine load hits them alike; each round times
``--calls`` consecutive updates and reports the per-update mean, and the table shows the
median over rounds with the interquartile range and the minimum (the least disturbed
round, the best estimate of the intrinsic cost on a shared machine). The requirement
(issue 4): the update for a batch of 4096 costs at most 3x the update for a batch of 1.

The sink is described as a Monitor describes it: an OCS score (the default), whose p-value
buckets are counted from the same sort as the distance buckets. A detector with another score
(msp, energy, ...) sorts distances and p-values apart; that path is timed and printed too.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

from oodmon.conformal import p_values
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


def make_observation(
    rng: np.random.Generator, n: int, alpha: float, calibration: torch.Tensor
) -> Observation:
    """A batch like a 10-class model's: KL distances spread over 0..~5 nats, and the conformal
    p-values those distances get against the calibration scores (as a Monitor computes them)."""
    distance = rng.gamma(2.0, 0.8, size=n)
    p_value = p_values(torch.from_numpy(-distance), calibration).numpy()
    verdict = HostVerdict(
        score=-distance,
        distance=distance,
        p_value=p_value,
        flag=p_value <= alpha,
        invalid=np.zeros(n, dtype=bool),
        predicted=rng.integers(0, 10, size=n),
    )
    return Observation("bench", "v1", verdict, {}, scoring_seconds=0.002)


def per_call_seconds(record: object, observation: Observation, calls: int) -> float:
    fn = record  # bound method
    start = time.perf_counter()
    for _ in range(calls):
        fn(observation)  # type: ignore[operator]
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--calls", type=int, default=Config.calls)
    args = parser.parse_args(argv)
    config = Config(rounds=args.rounds, calls=args.calls)
    rng = np.random.default_rng(config.seed)

    # what a Monitor describes: an OCS score, so distance == -score, with its calibration
    calibration = torch.sort(-torch.from_numpy(rng.gamma(2.0, 0.8, size=1000))).values
    sink = PrometheusMetrics(CollectorRegistry())
    sink.describe(
        DetectorSummary(
            "bench",
            "v1",
            "ocs_kl",
            config.alpha,
            -0.5,
            1000,
            "0" * 16,
            10,
            "cross_entropy",
            calibration_scores=calibration,
        )
    )
    # a detector with a non-OCS score (msp, energy, ...): distances and p-values sorted apart
    two_sorts = PrometheusMetrics(CollectorRegistry())
    two_sorts.describe(
        DetectorSummary(
            "bench", "v1", "msp", config.alpha, -0.5, 1000, "0" * 16, 10, "cross_entropy"
        )
    )
    naive = NaiveMetrics(CollectorRegistry())
    observations = {n: make_observation(rng, n, config.alpha, calibration) for n in config.sizes}
    # The naive loop is slow at large batches: fewer calls keep the run short.
    naive_calls = {n: max(2, min(config.calls, 20_000 // n)) for n in config.sizes}

    batched: dict[int, list[float]] = {n: [] for n in config.sizes}
    looped: dict[int, list[float]] = {n: [] for n in config.sizes}
    other: dict[int, list[float]] = {n: [] for n in config.sizes}
    for n in config.sizes:  # warm-up
        per_call_seconds(sink.record, observations[n], 10)
        per_call_seconds(two_sorts.record, observations[n], 10)
        per_call_seconds(naive.record, observations[n], 2)
    for _ in range(config.rounds):
        for n in config.sizes:
            batched[n].append(per_call_seconds(sink.record, observations[n], config.calls))
            other[n].append(per_call_seconds(two_sorts.record, observations[n], config.calls))
            looped[n].append(per_call_seconds(naive.record, observations[n], naive_calls[n]))

    def stats(values: list[float]) -> tuple[float, float, float, float]:
        us = np.asarray(values) * 1e6
        q1, median, q3 = np.percentile(us, [25, 50, 75])
        return float(median), float(q1), float(q3), float(us.min())

    print(
        f"per-batch metrics update over {config.rounds} interleaved rounds of {config.calls} calls"
    )
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}")
    head = f"{'batch':>6} | {'record: median [IQR]':>24} {'min':>7} | {'observe loop: median':>21}"
    print(head)
    print("-" * len(head))
    for n in config.sizes:
        median, q1, q3, low = stats(batched[n])
        naive_median = stats(looped[n])[0]
        print(
            f"{n:>6} | {median:>8.1f} [{q1:>6.1f}, {q3:>6.1f}] us {low:>6.1f} | "
            f"{naive_median:>18.1f} us"
        )
    first, last = config.sizes[0], config.sizes[-1]
    by_median = stats(batched[last])[0] / stats(batched[first])[0]
    by_min = stats(batched[last])[3] / stats(batched[first])[3]
    per_round = np.asarray(batched[last]) / np.asarray(batched[first])
    naive = stats(looped[last])[0] / stats(looped[first])[0]
    two = stats(other[last])[0] / stats(other[first])[0]
    print(
        f"cost({last}) / cost({first}): {by_median:.2f} (medians), {by_min:.2f} (minima), "
        f"{np.median(per_round):.2f} (median of per-round ratios); requirement <= 3. "
        f"Per-sample observe loop: {naive:.0f}."
    )
    print(
        f"non-OCS score (two sorts): {stats(other[first])[0]:.1f} us at {first}, "
        f"{stats(other[last])[0]:.1f} us at {last}: {two:.2f}x."
    )
    return 0 if by_median <= 3.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
