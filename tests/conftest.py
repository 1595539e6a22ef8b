"""Shared fixtures: a small fitted detector that tests can build monitors on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import label_queue_helpers
import postgres_server
import pytest
import torch

from oodmon import OCS, Detector

NUM_CLASSES = 10


# ---- shared toy models and detectors (used by several test files) -------------------------


def toy_classifier(
    seed: int = 0, alpha: float = 0.05, calibration_rows: int = 2000
) -> tuple[torch.nn.Linear, Detector]:
    """A linear 10-class model whose output at x = 0 is exactly the OCS, and its detector."""
    gen = torch.Generator().manual_seed(seed)
    ocs = OCS.cross_entropy(counts=[50, 30, 20, 10, 10, 5, 5, 5, 3, 2])
    model = torch.nn.Linear(8, 10)
    with torch.no_grad():
        model.weight.copy_(torch.randn(10, 8, generator=gen))
        model.bias.copy_(ocs.log_target.to(torch.float32))
        calibration = model(2.0 * torch.randn(calibration_rows, 8, generator=gen))
        detector = Detector(ocs, alpha=alpha).fit(calibration)
    return model.eval(), detector


def near_ocs(detector: Detector, n: int) -> torch.Tensor:
    """``n`` outputs exactly at the detector's OCS: the most OOD rows there are."""
    return detector.ocs.log_target.float().expand(n, detector.num_outputs).clone()


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


# ---- end of shared toys ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres_server.PostgresServer]:
    """One real PostgreSQL server for the whole session, started by the tests themselves."""
    yield from postgres_server.serve()


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty label-queue location on each backend: an SQLite file or a fresh database."""
    if request.param == "sqlite":
        return str(tmp_path / "queue.db")
    return str(request.getfixturevalue("pg_server").create_database())


# ---------------------------------------------------------------------- label queue (and its CLI)
# Fixtures shared by tests/test_label_queue_*.py; plain helpers live in label_queue_helpers.py.


@pytest.fixture
def url(queue_url: str) -> str:
    """The label-queue location a test works on (each backend in turn; see ``queue_url``)."""
    return queue_url


@pytest.fixture
def clock() -> label_queue_helpers.Clock:
    """A settable UTC clock for a LabelQueue, so lease tests never sleep."""
    return label_queue_helpers.Clock()
