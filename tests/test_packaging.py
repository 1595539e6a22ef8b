"""The built wheel holds every module of the source tree, and the type marker."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_module_and_py_typed(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            "data",
            "*.so",  # the native kernels must be compiled by this build, not copied
        ),
    )
    dist = tmp_path / "dist"
    # offline: build with the setuptools already installed, no isolated build environment
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(dist), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("oodmon-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "oodmon").rglob("*.py")}
    expected.add("oodmon/py.typed")
    assert len(expected) > 20  # the source tree was found
    assert not expected - packed, f"missing from the wheel: {sorted(expected - packed)}"
    # the optional native kernels: built here (CI has a C compiler), with their types
    assert "oodmon/_native_scores.pyi" in packed
    assert [n for n in packed if n.startswith("oodmon/_native_scores.") and n.endswith(".so")]
