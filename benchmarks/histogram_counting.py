"""Counting one batch into histogram buckets with NumPy: which exact strategy is cheapest.

    .venv/bin/python benchmarks/histogram_counting.py [--rounds 25] [--calls 200]

``PrometheusMetrics.record`` needs, per histogram, the cumulative count of a batch at each
bucket bound (``#{x <= bound}``), exactly as per-sample ``observe`` would count. For a
non-OCS score (msp, energy, ...) it sorts the distances and counts the p-values from the
verdict's calibration ranks; this compares the ways one could count either. Each strategy is checked
to give the sort's counts on the benchmark data, then timed at batch 1 and 4096, interleaved
round by round; the table shows the median and the minimum over rounds, in microseconds:

* ``sort``: ``searchsorted(sort(x), bounds)``, what the sink does for distances.
* ``bucket search``: ``bincount(searchsorted(bounds, x))``, a binary search per sample.
* ``ranks from p``: conformal p-values are ``j / (n + 1)``: recover j from p, check that it
  gives back p exactly, look the bucket up in a table and ``bincount`` (p-values only).
* ``carried ranks``: the same with j handed over by the detector, no recovery and no check
  (p-values only): what the sink does for non-OCS scores, from ``Verdict.calibration_rank``.
* ``bit grid``: the float's bit pattern shifted right indexes a table of buckets; the few
  values in cells that hold a bound are counted exactly apart.
* ``outer compare``: a ``[bounds, N]`` comparison summed per row.

The calibration set has 1000 scores, the p-values and distances are those of
``benchmarks/metrics_update.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from metrics_update import synthetic_batch, synthetic_calibration  # the same data as there

from oodmon.metrics import DEFAULT_DISTANCE_BUCKETS, DEFAULT_P_VALUE_BUCKETS


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...] = (1, 4096)
    rounds: int = 25
    calls: int = 200
    seed: int = 0
    n_calibration: int = 1000
    grid_shift: int = 44  # 8 mantissa bits: cells 0.4% wide


def with_inf(bounds: tuple[float, ...]) -> np.ndarray:
    return np.asarray([*bounds, np.inf], dtype=np.float64)


def by_sort(bounds: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.searchsorted(np.sort(x), bounds, side="right")


def by_bucket_search(bounds: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def count(x: np.ndarray) -> np.ndarray:
        buckets = np.searchsorted(bounds, x, side="left")
        return np.cumsum(np.bincount(buckets, minlength=bounds.size))

    return count


class Ranks:
    """p-values j / (n + 1): the bucket of each rank j, and j recovered from p."""

    def __init__(self, n: int, bounds: np.ndarray) -> None:
        self.values = np.arange(n + 2, dtype=np.float64) / float(n + 1)
        self.bucket = np.searchsorted(bounds, self.values, side="left")
        self.size = bounds.size
        self.scale = float(n + 1) * (1.0 + 2.0**-50)  # truncation lands on j exactly

    def from_p(self, p: np.ndarray) -> np.ndarray:
        rank = np.empty(p.shape, dtype=np.intp)
        with np.errstate(invalid="ignore"):
            np.multiply(p, self.scale, out=rank, casting="unsafe")
        if not (self.values.take(rank, mode="clip") == p).all():
            raise AssertionError("not conformal p-values")
        return self.carried(rank)

    def carried(self, rank: np.ndarray) -> np.ndarray:
        return np.cumsum(np.bincount(self.bucket.take(rank), minlength=self.size))


class BitGrid:
    """Buckets of non-negative floats by their top bits; cells holding a bound are exact."""

    def __init__(self, bounds: np.ndarray, shift: int) -> None:
        finite = bounds[np.isfinite(bounds)]
        assert finite[0] > 0  # negatives and tiny values all fall in the first cell
        self.bounds, self.shift = bounds, shift
        cells = np.arange(int(finite[-1:].view(np.int64)[0] >> shift) + 2, dtype=np.int64)
        first = (cells << shift).view(np.float64)
        last = (((cells + 1) << shift) - 1).view(np.float64)
        low = np.searchsorted(bounds, first, side="left")
        high = np.searchsorted(bounds, last, side="left")
        self.mixed = bounds.size  # the bucket number of cells that hold a bound
        self.table = np.where(low == high, low, self.mixed).astype(np.uint8)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        buckets = self.table.take(np.right_shift(x.view(np.int64), self.shift), mode="clip")
        counts = np.bincount(buckets, minlength=self.mixed + 1)
        exact = np.searchsorted(self.bounds, x[buckets == self.mixed], side="left")
        counts[:-1] += np.bincount(exact, minlength=self.mixed)
        return np.cumsum(counts[:-1])


def by_outer_compare(bounds: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: (x <= bounds[:, None]).view(np.uint8).sum(axis=1, dtype=np.int64)


def per_call_us(count: Callable[[np.ndarray], np.ndarray], x: np.ndarray, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        count(x)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--calls", type=int, default=Config.calls)
    args = parser.parse_args(argv)
    config = Config(rounds=args.rounds, calls=args.calls)
    rng = np.random.default_rng(config.seed)
    n = config.n_calibration
    calibration = synthetic_calibration(rng, n)
    p_bounds, d_bounds = with_inf(DEFAULT_P_VALUE_BUCKETS), with_inf(DEFAULT_DISTANCE_BUCKETS)
    ranks = Ranks(n, p_bounds)

    counters: dict[str, dict[str, Callable[[np.ndarray], np.ndarray]]] = {}
    for histogram, bounds in (("p-value", p_bounds), ("distance", d_bounds)):
        counters[histogram] = {
            "sort": by_sort(bounds),
            "bucket search": by_bucket_search(bounds),
            "bit grid": BitGrid(bounds, config.grid_shift),
            "outer compare": by_outer_compare(bounds),
        }
    counters["p-value"]["ranks from p"] = ranks.from_p
    counters["p-value"]["carried ranks"] = ranks.carried

    cases: dict[tuple[str, str, int], tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]] = {}
    for size in config.sizes:
        distance, p, below = synthetic_batch(rng, size, calibration)
        rank = n + 1 - below  # the Ranks table counts j = n + 1 - #{calibration < score}
        for histogram, x in (("p-value", p), ("distance", distance)):
            want = counters[histogram]["sort"](x)
            for name, count in counters[histogram].items():
                arg = rank if name == "carried ranks" else x
                assert np.array_equal(count(arg), want), (histogram, name, size)  # exact
                cases[(histogram, name, size)] = (count, arg)

    times: dict[tuple[str, str, int], list[float]] = {key: [] for key in cases}
    for count, arg in cases.values():  # warm-up
        per_call_us(count, arg, 10)
    for _ in range(config.rounds):
        for key, (count, arg) in cases.items():
            times[key].append(per_call_us(count, arg, config.calls))

    print(
        f"bucket counting over {config.rounds} interleaved rounds of {config.calls} calls; "
        f"python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    small, large = config.sizes[0], config.sizes[-1]
    head = (
        f"{'histogram':>9} | {'strategy':>13} | {f'batch {small}: median':>16} {'min':>6} | "
        f"{f'batch {large}: median':>19} {'min':>6}"
    )
    print(head)
    print("-" * len(head))
    for histogram, name, size in cases:
        if size != small:
            continue
        a = np.asarray(times[(histogram, name, small)])
        b = np.asarray(times[(histogram, name, large)])
        print(
            f"{histogram:>9} | {name:>13} | {np.median(a):>13.1f} us {a.min():>6.1f} | "
            f"{np.median(b):>16.1f} us {b.min():>6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
