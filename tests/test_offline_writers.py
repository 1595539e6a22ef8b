"""Writers: formats from suffixes, empty outputs keep their header, streams, temp files."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from oodmon.offline.scoring import empty_batch
from oodmon.offline.writers import open_writer, output_format


def test_formats_from_suffix() -> None:
    assert output_format("v.parquet") == "parquet" and output_format("v.jsonl") == "jsonl"
    assert output_format("v.txt") == "csv" and output_format(None) == "csv"
    assert output_format("v.csv", "jsonl") == "jsonl"
    with pytest.raises(ValueError, match="output format"):
        output_format("v.csv", "xlsx")


def test_empty_outputs_are_valid_files(tmp_path: Path) -> None:
    with open_writer(tmp_path / "e.parquet", "parquet", keep=("id",)):
        pass
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 0 and table.column_names[:2] == ["index", "id"]
    with open_writer(tmp_path / "e.csv", "csv"):
        pass
    assert (tmp_path / "e.csv").read_text().startswith("index,score,distance,p_value,flag")
    stream = io.StringIO()
    with open_writer(stream, "csv") as writer:
        writer.write(empty_batch(), None)
    assert stream.getvalue().splitlines() == [
        "score,distance,p_value,flag,invalid,invalid_reason,predicted"
    ]
    with pytest.raises(ValueError, match="Parquet cannot be written to stdout"):
        open_writer(io.StringIO(), "parquet")
    with pytest.raises(ValueError, match="is a directory"):
        open_writer(tmp_path, "csv")


def test_abort_removes_the_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "v.csv"
    with pytest.raises(KeyboardInterrupt), open_writer(target, "csv") as writer:
        writer.write(empty_batch(), 0)
        assert list(tmp_path.iterdir()) and not target.exists()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
