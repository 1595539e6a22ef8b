"""Shared fixtures: a small fitted detector that tests can build monitors on."""

from __future__ import annotations

import pytest
import torch

from oodmon import OCS, Detector

NUM_CLASSES = 10


def id_logits(n: int, seed: int) -> torch.Tensor:
    """Logits that look like a trained classifier's on in-distribution data."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, NUM_CLASSES, generator=gen)
    z[torch.arange(n), torch.randint(0, NUM_CLASSES, (n,), generator=gen)] += 4.0
    return z


@pytest.fixture(scope="session")
def ocs() -> OCS:
    return OCS.cross_entropy(counts=[30, 20, 15, 10, 8, 6, 5, 3, 2, 1])


@pytest.fixture(scope="session")
def detector(ocs: OCS) -> Detector:
    return Detector(ocs, alpha=0.05).fit(id_logits(999, seed=0))
