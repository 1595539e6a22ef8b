"""Helpers shared by the label-queue tests: a settable clock and small image inputs."""

from __future__ import annotations

import numpy as np

from oodmon.label_queue import LabelQueue


class Clock:
    """A settable UTC clock, so lease tests never sleep."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def image(seed: int, shape: tuple[int, ...] = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def put(q: LabelQueue, seed: int, p: float, d: float = 1.0, **kw) -> str | None:
    kw.setdefault("model", "mnist")
    kw.setdefault("version", "v1")
    return q.put(image(seed), p_value=p, distance=d, **kw)
