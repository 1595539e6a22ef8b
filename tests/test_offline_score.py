"""score_table and `oodmon score`: every input and output format round-trips to the verdicts of
Detector.predict on the whole array; bad rows come out invalid with a reason; unreadable
inputs are one clear error; BH covers the whole input; memory stays flat as inputs grow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import id_logits
from offline_inputs import SUFFIX, list_column, read_output, write_input

from oodmon import Detector, score_table
from oodmon.cli import main
from oodmon.conformal import benjamini_hochberg
from oodmon.offline import UnreadableInputError


def sample(detector: Detector, n: int = 150) -> np.ndarray:
    """In-distribution logits, with every fifth row replaced by the OCS itself (flagged)."""
    x = id_logits(n, seed=7).numpy()
    x[::5] = np.log(detector.ocs.target.numpy())
    return x.astype(np.float32)


def expected(detector: Detector, x: np.ndarray) -> dict[str, np.ndarray]:
    v = detector.predict(torch.from_numpy(x)).to_host()
    return {"flag": v.flag, "p_value": v.p_value, "score": v.score, "predicted": v.predicted}


def assert_verdicts(out: dict[str, list], want: dict[str, np.ndarray], x: np.ndarray) -> None:
    assert len(out["flag"]) == len(x)
    np.testing.assert_array_equal(out["flag"], want["flag"])
    np.testing.assert_array_equal(out["p_value"], want["p_value"])
    np.testing.assert_array_equal(out["predicted"], want["predicted"])
    np.testing.assert_allclose(np.array(out["score"], dtype=float), want["score"], rtol=1e-12)
    assert not any(out["invalid"]) and set(out["invalid_reason"]) == {None}
    assert any(out["flag"]) and not all(out["flag"])


@pytest.mark.parametrize("layout", list(SUFFIX))
@pytest.mark.parametrize("out_format", ["parquet", "jsonl", "csv"])
def test_every_format_round_trips(
    detector: Detector, tmp_path: Path, layout: str, out_format: str
) -> None:
    x = sample(detector)
    source = write_input(x, tmp_path / f"in{SUFFIX[layout]}", layout)
    keep = "id" if layout.startswith(("parquet", "jsonl")) else ()
    columns = "logit_*" if layout == "parquet_columns" else None
    destination = tmp_path / f"out.{out_format}"
    summary = score_table(source, detector, destination, columns=columns, keep=keep,
                          batch_rows=32, progress=False)  # fmt: skip
    out = read_output(destination)
    # JSON numbers are decimal text, scored in float64; binary formats keep float32
    precision = np.float64 if layout.startswith("jsonl") else np.float32
    assert_verdicts(out, expected(detector, x.astype(precision)), x)
    assert out["index"] == list(range(len(x)))
    if keep:
        want_ids = [f"r{i}" for i in range(len(x))]
        if layout == "jsonl_oip":  # one id per response, shared by its two rows
            want_ids = [f"r{i - i % 2}" for i in range(len(x))]
        assert out["id"] == want_ids
    assert summary.rows == len(x) and summary.flagged == sum(out["flag"]) and summary.invalid == 0
    assert summary.skipped == (len(x) if layout == "jsonl_kserve_events" else 0)
    assert not list(tmp_path.glob(".*partial"))


def test_bad_rows_are_invalid_with_a_reason_never_dropped(
    detector: Detector, tmp_path: Path
) -> None:
    x = sample(detector, 6)
    rows = [r.tolist() for r in x]
    lists = pa.array([rows[0], rows[1][:4], None, [*rows[3][:9], float("nan")], rows[4],
                      [*rows[5][:9], None]], type=pa.list_(pa.float32()))  # fmt: skip
    parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": list("abcdef"), "logits": lists}), parquet)
    out = tmp_path / "out.parquet"
    summary = score_table(parquet, detector, out, keep="id", progress=False)
    got = read_output(out)
    assert got["id"] == list("abcdef")
    assert got["invalid"] == [False, True, True, True, False, True]
    assert got["invalid_reason"] == [None, "wrong_width", "null", "nonfinite", None, "nonfinite"]
    assert got["flag"][1:4] == [False] * 3 and got["score"][1:4] == [None] * 3
    assert summary.invalid_reasons == {"wrong_width": 1, "null": 1, "nonfinite": 2}

    lines = [json.dumps({"id": "a", "outputs": rows[0]}), "{not json", json.dumps({"id": "c"}),
             json.dumps({"id": "d", "outputs": rows[3][:3]}), json.dumps([1, 2]),
             json.dumps({"id": "f", "outputs": [None] * 10}),
             json.dumps({"id": "g", "outputs": [{"name": "x", "shape": [1, 10],
                                                 "datatype": "BYTES", "data": ["a"] * 10}]}),
             "", json.dumps({"id": "h", "outputs": rows[4]})]  # fmt: skip
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    out_csv = tmp_path / "out.csv"
    score_table(jsonl, detector, out_csv, keep="id", progress=False)
    got = read_output(out_csv)
    assert got["id"] == ["a", None, "c", "d", None, "f", "g", "h"]
    assert got["invalid_reason"] == [None, "not_json", "missing_column", "wrong_width",
                                     "bad_record", "nonfinite", "bad_record", None]  # fmt: skip
    assert got["invalid"] == [r is not None for r in got["invalid_reason"]]
    assert not any(f for f, bad in zip(got["flag"], got["invalid"], strict=True) if bad)


def test_missing_and_corrupt_files_are_one_line_exit_2(
    detector: Detector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    detector_path = detector.save(tmp_path / "detector.json")
    x = sample(detector, 20)
    good = write_input(x, tmp_path / "good.parquet", "parquet_list")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    wide = write_input(np.zeros((3, 4), np.float32), tmp_path / "wide.parquet", "parquet_fixed")
    cases = [
        (["--outputs", corrupt], "Could not read .*corrupt.parquet as Parquet"),
        (["--outputs", good, "--columns", "nope"], "column\\(s\\) nope .* missing"),
        (["--outputs", good, "--keep", "user"], "--keep column\\(s\\) user"),
        (["--outputs", wide], "Expected 10 outputs per row"),
        (["--outputs", tmp_path / "absent.jsonl"], "outputs file not found"),
        (["--outputs", good, "--keep", "score"], "differ from the verdict's"),
    ]
    for argv, message in cases:
        out = tmp_path / "out.csv"
        code = main(["score", "--detector", str(detector_path), *map(str, argv), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("oodmon: error: ") and err.count("\n") == 1, err
        import re

        assert re.search(message, err), err
        assert not out.exists() and not list(tmp_path.glob(".*partial"))
    with pytest.raises(UnreadableInputError):
        score_table(corrupt, detector, tmp_path / "o.csv", progress=False)


def test_corrupt_row_group_rows_are_reported_unreadable(detector: Detector, tmp_path: Path) -> None:
    x = sample(detector, 30)
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"logits": list_column(x)}), path, row_group_size=10,
                   compression="none", use_dictionary=False)  # fmt: skip
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start : start + 64] = b"\xff" * 64  # the page header of row group 1
    path.write_bytes(bytes(data))
    out = tmp_path / "out.parquet"
    summary = score_table(path, detector, out, progress=False)
    got = read_output(out)
    assert got["invalid_reason"] == [None] * 10 + ["unreadable"] * 10 + [None] * 10
    want = expected(detector, x)
    np.testing.assert_array_equal(got["flag"][20:], want["flag"][20:])
    assert summary.rows == 30 and summary.invalid_reasons == {"unreadable": 10}


def test_a_failed_run_leaves_the_destination_untouched(
    detector: Detector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_input(sample(detector, 100), tmp_path / "in.parquet", "parquet_list")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"the previous run's verdicts")
    import oodmon.offline.score as score_module

    calls = {"n": 0}
    real = score_module.score_batch

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("scoring failed halfway")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(score_module, "score_batch", failing)
    with pytest.raises(RuntimeError, match="halfway"):
        score_table(source, detector, out, batch_rows=10, progress=False)
    assert out.read_bytes() == b"the previous run's verdicts"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet"]


def test_fdr_is_benjamini_hochberg_over_the_whole_input(detector: Detector, tmp_path: Path) -> None:
    x = np.concatenate([sample(detector, 400), np.full((3, 10), np.nan, np.float32)])
    x[::7] += np.log(detector.ocs.target.numpy()) * 3  # a spread of small p-values
    source = write_input(x, tmp_path / "in.npy", "npy")
    out = tmp_path / "out.parquet"
    summary = score_table(source, detector, out, fdr=0.2, batch_rows=37, progress=False)
    p = torch.from_numpy(np.asarray(read_output(out)["p_value"], dtype=float))
    want = benjamini_hochberg(p, 0.2).numpy()
    got = np.asarray(read_output(out)["flag"])
    assert want.sum() > 10 and want.sum() != (p <= detector.alpha).sum()
    np.testing.assert_array_equal(got, want)
    assert summary.flagged == want.sum() and summary.fdr == 0.2 and summary.alpha is None


def test_cli_score_parquet_with_keep_and_stdout_jsonl(
    detector: Detector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    detector_path = detector.save(tmp_path / "detector.json")
    x = sample(detector, 40)
    source = write_input(x, tmp_path / "in.parquet", "parquet_columns")
    out = tmp_path / "v.parquet"
    assert main(["score", "--detector", str(detector_path), "--outputs", str(source),
                 "--columns", "logit_*", "--keep", "id", "-o", str(out), "--no-progress",
                 "--batch-rows", "16"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith(f"wrote 40 verdicts to {out}: ") and "(alpha 0.05)" in err
    assert_verdicts(read_output(out), expected(detector, x), x)
    assert main(["score", "--detector", str(detector_path), "--outputs", str(source),
                 "--columns", "logit_*", "--format", "jsonl", "--no-progress"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 40 and json.loads(lines[0])["index"] == 0


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    from oodmon import Detector, score_table

    def peak_mib():  # VmHWM: this process's peak resident set (ru_maxrss survives exec)
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def reset_peak():  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")

    detector = Detector.load(sys.argv[1])
    peaks = []
    for source in sys.argv[2:]:
        reset_peak()
        score_table(source, detector, source + ".out.parquet", batch_rows=2_000, progress=False)
        peaks.append(peak_mib())
    print(json.dumps(peaks))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "limit_mib"), [("parquet_list", 30), ("jsonl_rows", 15),
                                                  ("npy", 30)])  # fmt: skip
def test_memory_stays_flat_as_the_input_grows(
    detector: Detector, tmp_path: Path, layout: str, limit_mib: float
) -> None:
    """Peak RSS after a warm-up input, a small one and one 10x larger. Holding the larger
    input's outputs and verdicts alone would add ~75 MiB (1M rows of Parquet or npy), or
    ~30 MiB of arrays plus the lines' Python objects (200k JSON lines)."""
    small_n = 20_000 if layout == "jsonl_rows" else 100_000
    rng = np.random.default_rng(0)
    sources = []
    for name, n in (("warm", small_n // 4), ("small", small_n), ("large", 10 * small_n)):
        x = rng.normal(size=(n, 10)).astype(np.float32)
        sources.append(str(write_input(x, tmp_path / f"{name}{SUFFIX[layout]}", layout, 50_000)))
    detector_path = detector.save(tmp_path / "detector.json")
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(detector_path), *sources],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, small, large = json.loads(result.stdout)
    growth = large - small
    print(f"{layout}: peak RSS {small:.0f} MiB small, {large:.0f} MiB 10x larger")
    assert large <= 1.2 * small, (small, large)
    assert growth < limit_mib, f"peak RSS grew by {growth:.0f} MiB from a 10x larger input"


def test_readme_offline_commands_use_real_flags() -> None:
    from oodmon.cli.main import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Score logs offline", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.splitlines() if line.startswith("oodmon score ")]
    assert len(commands) == 7
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(command.split()[1:])  # exits (fails) on an unknown flag
        assert args.detector == "detector.json"
    assert "Score logs offline" in readme.split("## Metrics", 1)[0]
