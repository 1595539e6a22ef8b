"""--engine ray: the same verdicts as the single-process path on the same file, on a local
Ray started with two CPUs (as in CI)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import id_logits
from offline_inputs import read_output

from oodmon import Detector, score_table
from oodmon.offline.ray_engine import PartWriter, worker_cpus

# Ray's own warnings, not ours (pytest turns every warning into an error):
# - Ray Data's DataContext() sets its own deprecated fields (use_push_based_shuffle,
#   use_polars, ...) when it is created: deprecations raised by ray.data.context only;
# - an actor pool larger than the number of blocks a small test file makes.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
    pytest.mark.filterwarnings("ignore:The minimum number of concurrent actors:UserWarning"),
]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray  # CI installs oodmon[ray]: a missing Ray fails here, it is not skipped

    # no dashboard and a small object store: starts faster on a loaded two-core machine
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def rows_with_problems(detector: Detector, n: int) -> list:
    x = id_logits(n, seed=11).numpy()
    x[::4] = np.log(detector.ocs.target.numpy())  # flagged rows
    rows: list = [r.tolist() for r in x]
    rows[3] = rows[3][:7]  # wrong width
    rows[5] = None  # null
    rows[8][2] = float("nan")
    return rows


def assert_same_verdicts(local: dict, ray: dict) -> None:
    """Decisions equal exactly; scores and distances to float32 rounding: torch's vectorised
    kernels can round a row's last bit differently depending on where it sits in a batch,
    and Ray's batches are not the single-process ones."""
    assert ray["id"] == local["id"]  # input order kept
    for column in ("p_value", "flag", "invalid", "invalid_reason", "predicted"):
        assert ray[column] == local[column], column
    for column in ("score", "distance"):
        a = np.array(ray[column], dtype=float)
        b = np.array(local[column], dtype=float)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert np.array_equal(np.isnan(a), np.isnan(b))
    assert "index" not in ray


@pytest.mark.slow
def test_ray_matches_local_on_parquet(detector: Detector, tmp_path: Path, local_ray: None) -> None:
    rows = rows_with_problems(detector, 300)
    source = tmp_path / "in.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(len(rows))],
                      "logits": pa.array(rows, type=pa.list_(pa.float32()))})  # fmt: skip
    pq.write_table(table, source, row_group_size=50)
    local = score_table(source, detector, tmp_path / "local.parquet", keep="id", progress=False)
    ray = score_table(source, detector, tmp_path / "ray", keep="id", engine="ray",
                      concurrency=2, batch_rows=40, progress=False)  # fmt: skip
    assert_same_verdicts(read_output(tmp_path / "local.parquet"), read_output(tmp_path / "ray"))
    assert (ray.rows, ray.flagged, ray.invalid_reasons) == (
        local.rows, local.flagged, local.invalid_reasons)  # fmt: skip
    assert local.invalid_reasons == {"wrong_width": 1, "null": 1, "nonfinite": 1}
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_ray_matches_local_on_json_lines_with_fdr(
    detector: Detector, tmp_path: Path, local_ray: None
) -> None:
    rows = rows_with_problems(detector, 200)

    def line(i: int, r: list | None) -> str:
        if r is None or len(r) != 10:  # plain rows for the null and the short one
            return json.dumps({"id": f"r{i}", "outputs": r})
        tensor = {"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": r}
        return json.dumps({"id": f"r{i}", "outputs": [tensor]})

    lines = [line(i, r) for i, r in enumerate(rows)]
    lines[10] = '{"id": "r10", "outputs": [1, 2'  # not JSON
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    local = score_table(source, detector, tmp_path / "local.parquet", keep="id", fdr=0.1,
                        progress=False)  # fmt: skip
    ray = score_table(source, detector, tmp_path / "ray", keep="id", fdr=0.1, engine="ray",
                      concurrency=2, batch_rows=30, progress=False)  # fmt: skip
    assert_same_verdicts(read_output(tmp_path / "local.parquet"), read_output(tmp_path / "ray"))
    assert ray.p_cutoff == local.p_cutoff and local.flagged > 0
    assert local.invalid_reasons["not_json"] == 1


def test_ray_refuses_what_it_cannot_do(detector: Detector, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="Parquet or JSON Lines for --engine ray"):
        score_table(tmp_path / "x.npy", detector, tmp_path / "out", engine="ray")
    with pytest.raises(ValueError, match="Expected -o DIR"):
        score_table(tmp_path / "x.npy", detector, None, engine="ray")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    pq.write_table(pa.table({"logits": pa.array([[0.0] * 10], pa.list_(pa.float32()))}),
                   tmp_path / "in.parquet")  # fmt: skip
    with pytest.raises(ValueError, match="new directory"):
        score_table(tmp_path / "in.parquet", detector, tmp_path / "taken", engine="ray")


@pytest.mark.parametrize(("cpus", "workers", "want"), [(2, 2, 0.5), (2, 1, 1.0), (16, 4, 1.0),
                                                        (8, 14, 0.5), (1, 1, 0.5)])  # fmt: skip
def test_worker_cpus_leave_room_for_reads(cpus: float, workers: int, want: float) -> None:
    assert worker_cpus(cpus, workers) == pytest.approx(want)
    assert workers * worker_cpus(cpus, workers) <= max(cpus - 1, cpus / 2)


def verdict_table(first: int, n: int) -> pa.Table:
    rows = range(first, first + n)
    return pa.table({"id": [f"r{i}" for i in rows], "flag": [i % 3 == 0 for i in rows],
                     "invalid_reason": [None if i % 5 else "null" for i in rows]})  # fmt: skip


def test_part_writer_keeps_order_across_parts_and_counts(tmp_path: Path) -> None:
    """The driver-side writer: blocks in the order given, split into numbered parts that read
    back (sorted by name, as readers do) in that order."""
    parts = PartWriter(str(tmp_path / "out"), rows_per_part=7)
    for first, n in ((0, 5), (5, 11), (16, 0), (16, 4)):
        parts.write(verdict_table(first, n))
    parts.close()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"part-{i:06d}.parquet" for i in range(3)]
    assert [pq.read_table(tmp_path / "out" / n).num_rows for n in names] == [7, 7, 6]
    # small blocks are gathered: one row group per part here, not one per block
    assert [pq.ParquetFile(tmp_path / "out" / n).num_row_groups for n in names] == [1, 1, 1]
    assert pq.read_table(tmp_path / "out").column("id").to_pylist() == [f"r{i}" for i in range(20)]
    assert (parts.rows, parts.flagged, parts.reasons) == (20, 7, {"null": 4})


def test_part_writer_with_no_rows_leaves_a_readable_empty_table(tmp_path: Path) -> None:
    parts = PartWriter(str(tmp_path / "out"))
    parts.write(verdict_table(0, 0))
    parts.close()
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 0 and table.column_names == ["id", "flag", "invalid_reason"]
