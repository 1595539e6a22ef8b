"""Score throughput, side by side on the same logits: oodmon vs one log_softmax vs pytorch-ood.

Run:  .venv/bin/python benchmarks/scores.py [--repeats 200] [--eager] [--compiled]

For each shape, every function is timed in interleaved rounds (so machine noise hits all of
them alike) and the table reports the median time per call, its interquartile range, and two
ratios: against one ``torch.log_softmax`` pass over the same logits, and against pytorch-ood's
implementation of the same score where one exists.

glibc may hand large temporaries (4 MB at B=1024, K=1000) back to the operating system after
each call, so that the next call pays page faults that dwarf the arithmetic. A server does
not tune its allocator, so both ways are reported: ``--allocator both`` (the default) runs
the measurement once with glibc's defaults and once pinned, with ``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_TRIM_THRESHOLD_`` raised (the first alone is not a pin: fixing the mmap threshold
also fixes the trim threshold at 128 KiB, and freed temporaries at the top of the heap are
then trimmed after every call).

The plain oodmon rows are what a user gets: the native kernels where the package built them
(``oodmon/_native.py``; the header line says). ``--eager`` adds a row per score with them off
(the PyTorch path every other device and dtype takes), and ``--compiled`` one with them off and
the optional fused kernels on (``oodmon.scores.use_compiled``); those serve batches from
32,768 elements, so at B=256, K=10 they time the eager path plus the switch. Compilation
happens in the warm-up rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import oodmon
from oodmon import _native
from oodmon import scores as S

native_default = _native.native_active()

SHAPES = [(1024, 1000), (256, 10)]


def candidates(ocs: oodmon.OCS) -> list[tuple[str, Callable[[torch.Tensor], object], str | None]]:
    """(name, oodmon function, name of the pytorch-ood counterpart or None)."""
    return [
        ("msp", S.msp, "MaxSoftmax"),
        ("max_logit", S.max_logit, "MaxLogit"),
        ("energy", S.energy, "EnergyBased"),
        ("entropy", S.entropy, "Entropy"),
        ("ocs_kl (distance)", lambda z: oodmon.distance(z, ocs), None),
        ("ocs_kl_reverse", lambda z: oodmon.distance(z, ocs, reverse=True), None),
    ]


def switched(
    fn: Callable[[torch.Tensor], object], *, compiled: bool
) -> Callable[[torch.Tensor], object]:
    """``fn`` with the native kernels off, and the fused ones on or off, for the call only."""

    def call(z: torch.Tensor) -> object:
        S.use_compiled(compiled)
        S.use_native(False)
        try:
            return fn(z)
        finally:
            S.use_compiled(False)
            S.use_native(native_default)

    return call


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--allocator",
        choices=("both", "default", "pinned", "as-is"),
        default="both",
        help="glibc's defaults, the pinned thresholds, both (each in a fresh process), or "
        "whatever this process was started with",
    )
    parser.add_argument(
        "--compiled", action="store_true", help="also time the optional fused kernels"
    )
    parser.add_argument(
        "--eager", action="store_true", help="also time the eager scores (native kernels off)"
    )
    args = parser.parse_args(argv)
    if args.allocator != "as-is":
        modes = ("default", "pinned") if args.allocator == "both" else (args.allocator,)
        for mode in modes:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            if mode == "pinned":
                env.update(MALLOC_MMAP_THRESHOLD_=str(128 * 2**20),
                           MALLOC_TRIM_THRESHOLD_=str(256 * 2**20))  # fmt: skip
            command = [sys.executable, __file__, "--repeats", str(args.repeats)]
            command += ["--compiled"] if args.compiled else []
            command += ["--eager"] if args.eager else []
            subprocess.run([*command, "--allocator", "as-is"], env=env, check=True)
        return
    pinned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"\n## allocator: {pinned or 'glibc defaults'}")
    try:
        from pytorch_ood import detector as pood
    except ImportError:
        pood = None
    kernels = "on" if native_default else "built, off" if _native.native_available() else "absent"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 logits on CPU, "
        f"native kernels {kernels}"
    )
    S.use_compiled(False)  # eager rows are eager whatever the environment says
    for batch, classes in SHAPES:
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(batch, classes, generator=gen) * 3
        counts = torch.randint(1, 100, (classes,), generator=gen)
        ocs = oodmon.OCS.cross_entropy(counts=counts)
        fns: dict[str, Callable[[], object]] = {
            "torch.log_softmax": lambda z=z: torch.log_softmax(z, -1)
        }
        pairs: dict[str, str] = {}
        for name, fn, ref in candidates(ocs):
            fns[f"oodmon {name}"] = lambda fn=fn, z=z: fn(z)
            variants = [("eager", False)] if args.eager else []
            if args.compiled and name not in ("msp", "max_logit"):  # single-pass already
                variants.append(("compiled", True))
            for label, compiled in variants:
                variant = switched(fn, compiled=compiled)
                fns[f"oodmon {name}, {label}"] = lambda fn=variant, z=z: fn(z)
                if ref is not None and pood is not None:
                    pairs[f"oodmon {name}, {label}"] = f"pytorch-ood {ref}"
            if ref is not None and pood is not None:
                fns[f"pytorch-ood {ref}"] = lambda ref=ref, z=z: getattr(pood, ref).score(z)
                pairs[f"oodmon {name}"] = f"pytorch-ood {ref}"
        times = time_rounds(fns, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["torch.log_softmax"]
        print(f"\nB={batch}, K={classes}")
        print("| function | median ms | IQR ms | x log_softmax | x pytorch-ood |")
        print("|---|---:|---:|---:|---:|")
        for name, values in times.items():
            q = statistics.quantiles(values, n=4)
            vs_ref = f"{med[name] / med[pairs[name]]:.2f}" if name in pairs else ""
            print(
                f"| {name} | {med[name] * 1e3:.3f} | {(q[2] - q[0]) * 1e3:.3f} "
                f"| {med[name] / base:.2f} | {vs_ref} |"
            )


if __name__ == "__main__":
    main()
