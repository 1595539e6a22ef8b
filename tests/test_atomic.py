"""atomic_write: the target holds the old content or the complete new one, never a part."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from oodmon._atomic import atomic_write


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with atomic_write(target, newline="") as stream:
        stream.write("a,b\r\n")
        assert target.read_text() == "old\n"  # nothing visible until the block ends
    assert target.read_bytes() == b"a,b\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    with atomic_write(target, "wb") as stream:
        stream.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text('{"good": true}')
    with pytest.raises(RuntimeError, match="half-way"), atomic_write(target) as stream:
        stream.write('{"trunc')
        raise RuntimeError("failed half-way")
    assert target.read_text() == '{"good": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_permissions_follow_the_umask_like_open(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.txt") as stream:
            stream.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_bad_targets_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "d.json"
    with pytest.raises(FileNotFoundError, match=r"the directory .*no-such-dir does not exist"):
        atomic_write(missing).__enter__()
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        atomic_write(tmp_path).__enter__()
    with pytest.raises(ValueError, match="mode"):
        atomic_write(tmp_path / "x", "a").__enter__()
