"""Readers stream in batches, read every row once, and can be iterated again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from offline_inputs import write_input

from oodmon.offline.readers import NpyReader, default_batch_rows, open_reader
from oodmon.offline.rows import UnreadableInputError


def rows_of(reader: object) -> np.ndarray:
    return np.concatenate([b.outputs for b in reader])  # type: ignore[attr-defined]


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_memory_map_in_batches(tmp_path: Path, order: str) -> None:
    x = np.asarray(np.random.default_rng(0).normal(size=(1001, 7)), order=order)
    np.save(tmp_path / "x.npy", x)
    reader = open_reader(tmp_path / "x.npy", 7, batch_rows=100)
    assert isinstance(reader, NpyReader) and reader.total_rows == 1001
    assert [len(b) for b in reader] == [100] * 10 + [1]
    np.testing.assert_array_equal(rows_of(reader), x)  # a second pass reads the same
    np.save(tmp_path / "ints.npy", np.arange(14, dtype=np.int16).reshape(2, 7))
    assert rows_of(open_reader(tmp_path / "ints.npy", 7)).dtype == np.float32


def test_pt_dict_key_directory_and_errors(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    torch.save({"a": torch.from_numpy(x), "b": torch.zeros(2)}, tmp_path / "x.pt")
    np.testing.assert_array_equal(rows_of(open_reader(tmp_path / "x.pt", 4, key="a")), x)
    with pytest.raises(UnreadableInputError, match="choose one with --key"):
        open_reader(tmp_path / "x.pt", 4)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_input(x[:10], parts / "0.parquet", "parquet_list")
    write_input(x[10:], parts / "1.parquet", "parquet_list")
    reader = open_reader(parts, 4, batch_rows=8)
    assert reader.total_rows == 30
    np.testing.assert_array_equal(rows_of(reader), x)
    with pytest.raises(UnreadableInputError, match="with 4 columns.*got 5"):
        open_reader(_npy(tmp_path, (3, 5)), 4)
    with pytest.raises(UnreadableInputError, match="a .parquet, .jsonl, .npy or .pt file"):
        open_reader(_text(tmp_path), 4)
    with pytest.raises(ValueError, match="no --keep columns for a .npy"):
        open_reader(_npy(tmp_path, (3, 4)), 4, keep=("id",))


def _npy(tmp_path: Path, shape: tuple[int, int]) -> Path:
    np.save(tmp_path / "s.npy", np.zeros(shape, np.float32))
    return tmp_path / "s.npy"


def _text(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("hello")
    return tmp_path / "notes.txt"


def test_batch_rows_follow_the_width() -> None:
    assert default_batch_rows(10) == 262_144 and default_batch_rows(1000) == 4194
    assert default_batch_rows(10**7) == 1024
