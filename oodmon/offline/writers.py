"""Streaming verdict writers: Parquet, JSON Lines, CSV.

A writer takes scored batches one at a time and holds at most one Parquet row group in memory.
Files are written under a temporary name next to the destination and renamed into place only
when the whole run succeeded, so a failed or interrupted run never leaves a half-written file
where a finished one is expected (CSV and JSON Lines can also go to a stream, e.g. stdout).

Columns: ``index`` (the row's position in the input), the ``--keep`` columns, then
``score, distance, p_value, flag, invalid, invalid_reason, predicted``. Scores of invalid
rows are null (empty in CSV), never NaN-as-a-number.
"""

from __future__ import annotations

import csv
import json
import os
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import numpy as np

from oodmon.offline.rows import INVALID_REASONS
from oodmon.offline.scoring import ScoredBatch, empty_batch

__all__ = [
    "OUTPUT_FORMATS",
    "ROW_GROUP_ROWS",
    "RowGroupWriter",
    "VerdictWriter",
    "open_writer",
    "output_format",
]

#: Output format -> suffixes that select it (anything else is CSV, as ``oodmon score`` was).
OUTPUT_FORMATS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson"),
    "csv": (".csv",),
}

_REASON_NAMES = np.array([None, *INVALID_REASONS], dtype=object)
#: Rows a Parquet row group gathers before it is written (small batches, e.g. from JSON
#: Lines, would otherwise make tiny row groups).
ROW_GROUP_ROWS = 65_536
_UNIQUE_COLUMNS = ("index", "score", "distance", "p_value")


def output_format(destination: Any, override: str | None = None) -> str:
    """The format to write: ``override``, else from the destination's suffix, else CSV."""
    if override is not None:
        if override not in OUTPUT_FORMATS:
            raise ValueError(
                f"Expected an output format in {sorted(OUTPUT_FORMATS)}, but got {override!r}."
            )
        return override
    if isinstance(destination, (str, os.PathLike)):
        suffix = Path(destination).suffix.lower()
        for name, suffixes in OUTPUT_FORMATS.items():
            if suffix in suffixes:
                return name
    return "csv"


class VerdictWriter:
    """Write scored batches; use as a context manager (commit on success, discard on error)."""

    def __init__(
        self,
        destination: str | os.PathLike[str] | TextIO,
        fmt: str,
        keep: tuple[str, ...] = (),
        index: bool = True,
    ) -> None:
        self.format, self.keep, self.index = fmt, keep, index
        self.destination: Path | None = None
        self._tmp: Path | None = None
        if isinstance(destination, (str, os.PathLike)):
            self.destination = Path(destination)
            if self.destination.is_dir():
                raise ValueError(
                    f"Expected -o to name a file, but {self.destination} is a directory."
                )
            self._tmp = self.destination.with_name(
                f".{self.destination.name}.{os.getpid()}.partial"
            )
        elif fmt == "parquet":
            raise ValueError(
                "Expected -o FILE for Parquet output, but got a stream: Parquet cannot be "
                "written to stdout; use --format csv or jsonl there."
            )
        self._file: Any = None
        self._stream: TextIO | None = None if self._tmp else destination  # type: ignore[assignment]
        self._csv: Any = None
        self._parquet: RowGroupWriter | None = None
        self.rows = 0

    def __enter__(self) -> VerdictWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def write(self, batch: ScoredBatch, first_index: int | None) -> None:
        """Append a batch; ``first_index`` is its first row's position in the input."""
        if self.format == "parquet":
            self._write_parquet(batch.to_arrow(first_index))
        else:
            self._write_text(batch, first_index)
        self.rows += len(batch)

    def commit(self) -> None:
        """Finish the file and move it into place."""
        if self.rows == 0:  # no rows: still a valid file, with its header or schema
            self.write(empty_batch(self.keep), 0 if self.index else None)
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None:
            self._file.close()
        elif self._stream is not None:
            self._stream.flush()
        if self._tmp is not None and self.destination is not None:
            os.replace(self._tmp, self.destination)

    def abort(self) -> None:
        """Drop the partial file; the destination is left as it was."""
        # closing a broken writer must not hide the original error
        if self._parquet is not None:
            with suppress(Exception):
                self._parquet.close(flush=False)
        if self._file is not None:
            with suppress(Exception):
                self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ text

    def _text_stream(self) -> TextIO:
        if self._stream is None:
            assert self._tmp is not None
            self._file = self._tmp.open("w", newline="", encoding="utf-8")
            self._stream = self._file
        return self._stream

    def _write_text(self, batch: ScoredBatch, first_index: int | None) -> None:
        stream = self._text_stream()
        names, values = _python_columns(batch, first_index)
        if self.format == "jsonl":
            dumps = json.dumps
            stream.writelines(
                dumps(dict(zip(names, row, strict=True)), default=str) + "\n"
                for row in zip(*values, strict=True)
            )
            return
        if self._csv is None:
            self._csv = csv.writer(stream)
            self._csv.writerow(names)
        self._csv.writerows(zip(*values, strict=True))

    # ------------------------------------------------------------------ parquet

    def _write_parquet(self, table: Any) -> None:
        if self._parquet is None:
            assert self._tmp is not None
            self._parquet = RowGroupWriter(str(self._tmp))
        self._parquet.write(table)


class RowGroupWriter:
    """One Parquet file of verdict tables, in row groups of about :data:`ROW_GROUP_ROWS` rows.

    Small tables (JSON Lines batches, Ray's blocks) are gathered first, since tiny row groups
    make a file slow to read. Every table is cast to ``schema`` (default: the first table's).
    Only the columns that repeat are dictionary-encoded: trying it on the float columns
    doubles the write time for nothing. The file is created at the first flush, so a writer
    given only an empty table still leaves a file with the schema.
    """

    def __init__(self, path: str, schema: Any = None, filesystem: Any = None) -> None:
        self.path, self.schema, self._filesystem = path, schema, filesystem
        self._file: Any = None
        self._pending: list[Any] = []
        self._pending_rows = 0

    def write(self, table: Any) -> None:
        """Append a table; a full row group is written out."""
        if self.schema is None:
            self.schema = table.schema
        self._pending.append(table if table.schema.equals(self.schema) else table.cast(self.schema))
        self._pending_rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write what is gathered as one row group."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        if self._file is None:
            dictionary = [f.name for f in self.schema if f.name not in _UNIQUE_COLUMNS]
            self._file = pq.ParquetWriter(self.path, self.schema, filesystem=self._filesystem,
                                          use_dictionary=dictionary)  # fmt: skip
        pending = self._pending
        self._file.write_table(pa.concat_tables(pending) if len(pending) > 1 else pending[0])
        self._pending, self._pending_rows = [], 0

    def close(self, flush: bool = True) -> None:
        """Finish the file (``flush=False``: drop what is gathered, for a failed run)."""
        if flush:
            self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def open_writer(
    destination: str | os.PathLike[str] | TextIO,
    fmt: str,
    keep: tuple[str, ...] = (),
    index: bool = True,
) -> VerdictWriter:
    """A :class:`VerdictWriter` for ``destination``.

    ``destination`` is a path, or a text stream for CSV/JSONL; ``keep`` and ``index`` shape
    the header of a file that receives no rows.
    """
    return VerdictWriter(destination, fmt, keep, index)


def _python_columns(batch: ScoredBatch, first_index: int | None) -> tuple[list[str], list[Any]]:
    """Column names and Python lists (NaN -> None, so it prints empty in CSV, null in JSON)."""
    v = batch.verdict
    names: list[str] = []
    values: list[Any] = []
    if first_index is not None:
        names.append("index")
        values.append(range(first_index, first_index + len(batch)))
    for name, column in batch.keep.items():
        names.append(name)
        values.append(column if isinstance(column, list) else column.to_pylist())
    for name, array in (("score", v.score), ("distance", v.distance), ("p_value", v.p_value)):
        names.append(name)
        values.append(_floats(array))
    names += ["flag", "invalid", "invalid_reason", "predicted"]
    values += [
        v.flag.tolist(),
        v.invalid.tolist(),
        _REASON_NAMES[batch.reasons].tolist(),
        v.predicted.tolist(),
    ]
    return names, values


def _floats(array: np.ndarray) -> list[Any]:
    values: list[Any] = array.tolist()
    for i in np.flatnonzero(np.isnan(array)).tolist():
        values[i] = None
    return values
