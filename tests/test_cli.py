"""CLI: every command's happy path and its bad-input errors, in-process and as a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import id_logits

from oodmon import Detector
from oodmon.cli import main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    cal = id_logits(500, seed=1)
    test = torch.cat([id_logits(20, seed=2), torch.zeros(5, 10)])  # 5 rows at the uniform OCS
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(3))
    paths = {
        "cal": tmp_path / "cal.pt",
        "cal_npy": tmp_path / "cal.npy",
        "test": tmp_path / "test.npy",
        "labels": tmp_path / "labels.npy",
        "detector": tmp_path / "detector.json",
    }
    torch.save({"logits": cal}, paths["cal"])
    np.save(paths["cal_npy"], cal.numpy())
    np.save(paths["test"], test.numpy())
    np.save(paths["labels"], labels.numpy())
    return paths


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_calibrate_score_inspect(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        "calibrate", "--outputs", files["cal"], "--labels", files["labels"],
        "--num-classes", "10", "--alpha", "0.1", "-o", files["detector"],
    )  # fmt: skip
    assert code == 0
    assert "500 calibration samples" in capsys.readouterr().out
    detector = Detector.load(files["detector"])
    assert detector.alpha == 0.1 and detector.n_calibration_ == 500

    out_csv = files["detector"].with_name("verdicts.csv")
    assert (
        run("score", "--detector", files["detector"], "--outputs", files["test"], "-o", out_csv)
        == 0
    )
    with out_csv.open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 25
    expected = detector.predict(np.load(files["test"]))
    assert [r["flag"] == "True" for r in rows] == expected.flag.tolist()
    assert all(r["flag"] == "True" for r in rows[20:])  # the OCS rows are flagged
    np.testing.assert_allclose([float(r["p_value"]) for r in rows], expected.p_value.numpy())

    assert (
        run(
            "score",
            "--detector",
            files["detector"],
            "--outputs",
            files["test"],
            "--format",
            "jsonl",
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 25 and json.loads(lines[0])["index"] == 0

    assert run("inspect", files["detector"]) == 0
    text = capsys.readouterr().out
    assert "ocs_kl" in text and "500 samples" in text and detector.calibration_hash_ in text
    assert run("inspect", "--json", files["detector"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["n"] == 500


def test_calibrate_with_counts_and_other_losses(files: dict[str, Path], tmp_path: Path) -> None:
    assert run("calibrate", "--outputs", files["cal_npy"], "--counts", ",".join(["5"] * 10),
               "--score", "energy", "-o", tmp_path / "d.json") == 0  # fmt: skip
    assert Detector.load(tmp_path / "d.json").score == "energy"
    targets = tmp_path / "targets.npy"
    np.save(targets, np.random.default_rng(0).normal(size=(300, 2)))
    outputs = tmp_path / "reg.npy"
    np.save(outputs, np.random.default_rng(1).normal(size=(300, 2)))
    assert run("calibrate", "--loss", "mse", "--targets", targets, "--outputs", outputs,
               "-o", tmp_path / "reg.json") == 0  # fmt: skip
    assert Detector.load(tmp_path / "reg.json").ocs.loss == "mse"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "--outputs", "missing.pt", "--counts", "1,2"], "outputs file not found"),
        (["calibrate", "--outputs", "{cal}", "--counts", "1,x"], "comma-separated integers"),
        (["calibrate", "--outputs", "{cal}"], "exactly one of --labels FILE or --counts"),
        (["calibrate", "--outputs", "{cal}", "--labels", "{labels}"], "needs --num-classes"),
        (["calibrate", "--outputs", "{cal}", "--counts", "1,2,3"], "10 columns.*got 10|3 outputs"),
        (["calibrate", "--outputs", "{labels}", "--counts", "1,2"], "columns|shape"),
        (
            [
                "calibrate",
                "--outputs",
                "{cal}",
                "--counts",
                ",".join(["1"] * 10),
                "--alpha",
                "0.0001",
            ],
            "at least 9999",
        ),
        (["calibrate", "--outputs", "{detector_missing}", "--counts", "1"], "not found"),
        (["calibrate", "--outputs", "{text}", "--counts", "1"], "a .pt or .npy file"),
        (["calibrate", "--loss", "mse", "--outputs", "{cal}"], "needs --targets"),
        (["score", "--detector", "nope.json", "--outputs", "{test}"], "detector file not found"),
        (["score", "--detector", "{text}", "--outputs", "{test}"], "not valid JSON"),
        (["inspect", "{text}"], "not valid JSON"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], message: str, files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    text = tmp_path / "notes.txt"
    text.write_text("{hello")
    subs = {"cal": files["cal"], "labels": files["labels"], "test": files["test"], "text": text,
            "detector_missing": tmp_path / "nothing.npy"}  # fmt: skip
    code = run(*[a.format(**subs) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("oodmon: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_score_with_wrong_width_detector(files: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    narrow = tmp_path / "narrow.npy"
    np.save(narrow, np.zeros((3, 4), dtype=np.float32))
    run(
        "calibrate",
        "--outputs",
        files["cal"],
        "--counts",
        ",".join(["1"] * 10),
        "-o",
        files["detector"],
    )
    assert run("score", "--detector", files["detector"], "--outputs", narrow) == 2
    assert "10 columns" in capsys.readouterr().err


def test_usage_errors_and_help() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("command", ["calibrate", "score", "inspect", "queue", "demo"])
def test_every_command_has_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "oodmon.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: oodmon" in result.stdout


def test_subprocess_error_has_no_traceback(files: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "oodmon.cli", "score", "--detector", "missing.json", "--outputs",
         str(files["test"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "oodmon: error: detector file not found: missing.json"


def test_console_script_runs_end_to_end(files: dict[str, Path]) -> None:
    exe = Path(sys.executable).with_name("oodmon")
    assert exe.exists(), "the `oodmon` console script is not installed next to this Python"
    result = subprocess.run(
        [str(exe), "calibrate", "--outputs", str(files["cal"]), "--labels", str(files["labels"]),
         "--num-classes", "10", "-o", str(files["detector"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    inspect = subprocess.run([str(exe), "inspect", str(files["detector"])], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert inspect.returncode == 0 and "cross_entropy" in inspect.stdout


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("oodmon: error: ") and err.count("\n") == 1, err
    return err


def test_forged_or_hostile_detector_files_exit_2(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("calibrate", "--outputs", files["cal"], "--counts", ",".join(["1"] * 10),
        "-o", files["detector"])  # fmt: skip
    capsys.readouterr()
    data = json.loads(files["detector"].read_text())
    data["ocs"]["target"] = [-1.0] * 10
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    assert run("inspect", forged) == 2
    assert "class probabilities in (0, 1] summing to 1" in _one_line_error(capsys)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert run("score", "--detector", deep, "--outputs", files["test"]) == 2
    assert "nested too deeply" in _one_line_error(capsys)


def test_outputs_of_the_wrong_kind_exit_2_naming_the_flag(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    probs = tmp_path / "probs.npy"
    np.save(probs, torch.from_numpy(np.load(files["test"])).softmax(-1).numpy())
    run("calibrate", "--outputs", files["cal"], "--counts", ",".join(["1"] * 10),
        "-o", files["detector"])  # fmt: skip
    capsys.readouterr()
    assert run("score", "--detector", files["detector"], "--outputs", probs) == 2
    err = _one_line_error(capsys)
    assert "look like probabilities" in err and "--kind probs" in err
    assert run("calibrate", "--outputs", probs, "--counts", ",".join(["1"] * 10),
               "-o", tmp_path / "d.json") == 2  # fmt: skip
    assert "pass `--kind probs`" in _one_line_error(capsys)
    assert run("calibrate", "--outputs", files["cal"], "--counts", ",".join(["1"] * 10),
               "--kind", "probs", "-o", tmp_path / "d.json") == 2  # fmt: skip
    assert "pass `--kind logits`" in _one_line_error(capsys)


_SLOW_TORCH = """
import sys, time
class SlowTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.stderr.write("importing torch\\n")
            sys.stderr.flush()
            time.sleep(60)
        return None
sys.meta_path.insert(0, SlowTorch())
from oodmon.cli.main import main
sys.exit(main())
"""


def test_ctrl_c_while_torch_imports_is_one_line_exit_130() -> None:
    import signal

    with subprocess.Popen(
        [sys.executable, "-c", _SLOW_TORCH, "inspect", "detector.json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        assert process.stderr is not None
        assert process.stderr.readline() == "importing torch\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err == "oodmon: interrupted\n" and out == ""


def test_a_closed_output_pipe_ends_quietly(files: dict[str, Path], tmp_path: Path) -> None:
    many = tmp_path / "many.npy"
    np.save(many, id_logits(20_000, seed=9).numpy())
    run("calibrate", "--outputs", files["cal"], "--counts", ",".join(["1"] * 10),
        "-o", files["detector"])  # fmt: skip
    with subprocess.Popen(
        [sys.executable, "-m", "oodmon.cli", "score", "--detector", str(files["detector"]),
         "--outputs", str(many)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as process:  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().startswith(b"index,score")
        process.stdout.close()  # what `| head -1` does
        err = process.stderr.read()
        assert process.wait(timeout=120) == 141
    assert err == b""


def test_unreadable_pt_files_are_one_line(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 this is not a torch archive" * 10)
    args = ("calibrate", "--outputs", junk, "--counts", ",".join(["1"] * 10), "-o",
            tmp_path / "d.json")  # fmt: skip
    assert run(*args) == 2
    err = _one_line_error(capsys)
    assert f"Could not read outputs from {junk}" in err and "--debug" in err
    with pytest.raises(Exception) as info:
        run("--debug", *args)
    assert info.value.__cause__ is not None  # --debug: the full torch error, chained


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((3, 10), dtype=np.complex64),
        np.zeros((3, 10), dtype=bool),
        np.full((3, 10), "x"),
    ],
    ids=["complex", "bool", "string"],
)
def test_non_real_npy_files_exit_2(
    array: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "outputs.npy"
    np.save(path, array)
    assert run("calibrate", "--outputs", path, "--counts", ",".join(["1"] * 10),
               "-o", tmp_path / "d.json") == 2  # fmt: skip
    assert f"holds NumPy dtype {array.dtype}" in _one_line_error(capsys)


def test_a_failed_export_keeps_the_previous_file(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from oodmon.offline import writers

    run("calibrate", "--outputs", files["cal"], "--counts", ",".join(["1"] * 10),
        "-o", files["detector"])  # fmt: skip
    out = tmp_path / "verdicts.jsonl"
    assert run("score", "--detector", files["detector"], "--outputs", files["test"],
               "-o", out) == 0  # fmt: skip
    good = out.read_text()

    def fail_half_way(self, batch, first_index) -> None:  # type: ignore[no-untyped-def]
        self._text_stream().write('{"index": 0, "sco')
        raise OSError("No space left on device")

    monkeypatch.setattr(writers.VerdictWriter, "_write_text", fail_half_way)
    assert run("score", "--detector", files["detector"], "--outputs", files["test"],
               "-o", out) == 1  # fmt: skip
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_missing_output_directory_is_named(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "no-such-dir" / "d.json"
    assert run("calibrate", "--outputs", files["cal"], "--counts", ",".join(["1"] * 10),
               "-o", target) == 2  # fmt: skip
    err = _one_line_error(capsys)
    assert f"the directory {target.parent} does not exist" in err and ".tmp" not in err


def test_messages_name_the_real_problem(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    counts = ",".join(["1"] * 10)
    run("calibrate", "--outputs", files["cal"], "--counts", counts, "-o", files["detector"])
    capsys.readouterr()
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(400, dtype=np.float32))
    assert run("score", "--detector", files["detector"], "--outputs", flat) == 2
    err = _one_line_error(capsys)
    assert "a 1-D array of 400 values" in err and "reshape it to [40, 10]" in err
    assert "columns" not in err

    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(7).repeat(10))
    assert run("calibrate", "--outputs", files["cal"], "--labels", labels, "--num-classes", "7",
               "-o", tmp_path / "d.json") == 2  # fmt: skip
    err = _one_line_error(capsys)
    assert "have 10 columns but the OCS has 7 outputs" in err and "--num-classes" in err
    assert "calibrated for" not in err

    state = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 10)).state_dict(), state)
    assert run("calibrate", "--outputs", state, "--counts", counts,
               "-o", tmp_path / "d.json") == 2  # fmt: skip
    err = _one_line_error(capsys)
    assert "looks like a model's state_dict" in err and "'0.weight'" in err
    assert "--key" not in err

    two = tmp_path / "two.pt"
    torch.save({"logits": torch.zeros(3, 10), "features": torch.zeros(3, 4)}, two)
    assert run("calibrate", "--outputs", two, "--counts", counts,
               "-o", tmp_path / "d.json") == 2  # fmt: skip
    err = _one_line_error(capsys)
    assert "'features', 'logits'" in err and "with --key" in err
