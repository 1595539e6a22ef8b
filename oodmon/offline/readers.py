"""Streaming readers: a file of model outputs -> :class:`~oodmon.offline.rows.RowBatch` es.

Each reader yields batches of at most ``batch_rows`` rows and never holds the whole input:
Parquet is read row group by row group (pyarrow), JSON Lines line by line, ``.npy`` through a
memory map whose pages are released once scored. ``.pt`` files are loaded whole, as
``torch.load`` requires. Readers can be iterated more than once (``--fdr`` reads twice).

A part of a file that cannot be decoded (a corrupt Parquet row group, a line that is not JSON)
becomes invalid rows with a reason; a file that cannot be read at all raises
:class:`~oodmon.offline.rows.UnreadableInputError` before anything is written.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oodmon.offline.records import decode_lines
from oodmon.offline.rows import ColumnChoice, RowBatch, UnreadableInputError, choose_columns

__all__ = [
    "INPUT_FORMATS",
    "ArrayReader",
    "JsonLinesReader",
    "NpyReader",
    "ParquetReader",
    "TableReader",
    "default_batch_rows",
    "input_files",
    "input_format",
    "load_pt",
    "open_reader",
]

#: Input format -> file suffixes that select it.
INPUT_FORMATS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "npy": (".npy",),
    "pt": (".pt", ".pth"),
}

#: Bytes of outputs per batch: large enough that per-batch overhead vanishes, small enough
#: that memory stays flat (16 MiB of float32, e.g. 4,096 rows of 1,000 classes).
_BATCH_BYTES = 16 * 2**20


def default_batch_rows(width: int) -> int:
    """Rows per batch for outputs of ``width`` columns."""
    return int(min(max(_BATCH_BYTES // (4 * max(width, 1)), 1024), 262_144))


class TableReader:
    """Base of the readers: iterate for batches.

    ``total_rows`` (None if unknown up front) feeds the progress bar; ``skipped`` counts
    records without outputs in the last pass.
    """

    width: int
    keep: tuple[str, ...]
    total_rows: int | None = None
    skipped: int = 0

    def __iter__(self) -> Iterator[RowBatch]:
        raise NotImplementedError


def input_format(path: str | os.PathLike[str], override: str | None = None) -> str:
    """The input format of a file (from its suffix) or of a directory (from its files)."""
    if override is not None:
        if override not in INPUT_FORMATS:
            raise ValueError(
                f"Expected an input format in {sorted(INPUT_FORMATS)}, but got {override!r}."
            )
        return override
    file = Path(path)
    suffixes = [file.suffix.lower()]
    if file.is_dir():
        suffixes = sorted({p.suffix.lower() for p in file.iterdir() if p.is_file()})
    for name, known in INPUT_FORMATS.items():
        if any(s in known for s in suffixes):
            return name
    raise UnreadableInputError(
        f"Expected a .parquet, .jsonl, .npy or .pt file of model outputs, but got "
        f"{file.name!r}; name the format with --input-format."
    )


def open_reader(
    source: Any,
    width: int,
    *,
    columns: Sequence[str] | None = None,
    keep: Sequence[str] = (),
    key: str | None = None,
    batch_rows: int | None = None,
    fmt: str | None = None,
) -> TableReader:
    """A reader for ``source``: a path or an in-memory array/tensor ``[N, K]``.

    A path is a file, or a directory of files of one format.

    Raises:
        UnreadableInputError: no such file, an unreadable file, missing columns, wrong width.
    """
    rows = batch_rows or default_batch_rows(width)
    if not isinstance(source, (str, os.PathLike)):
        if keep:
            raise ValueError(
                "Expected no `keep` columns for an in-memory array (it has no named columns), "
                f"but got {list(keep)}."
            )
        return ArrayReader(source, width, rows)
    path = Path(source)
    if not path.exists():
        raise UnreadableInputError(f"outputs file not found: {path}")
    kind = input_format(path, fmt)
    if kind in ("npy", "pt") and keep:
        raise ValueError(
            f"Expected no --keep columns for a .{kind} file (it holds a bare array), "
            f"but got {','.join(keep)}; use Parquet or JSON Lines to carry ids along."
        )
    if kind == "parquet":
        return ParquetReader(input_files(path, kind), width, columns, keep, rows)
    if kind == "jsonl":
        tensor = columns[0] if columns else None
        if columns and len(columns) > 1:
            raise ValueError(
                "Expected at most one --columns name for JSON Lines (the OIP output tensor to "
                f"score), but got {','.join(columns)}."
            )
        return JsonLinesReader(input_files(path, kind), width, keep, rows, tensor)
    if kind == "npy":
        return NpyReader(_single(path, kind), width, rows)
    return ArrayReader(load_pt(_single(path, kind), key), width, rows, where=str(path))


def input_files(path: Path, kind: str) -> list[Path]:
    """The file itself, or a directory's files of the format, in name order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in INPUT_FORMATS[kind])
    if not files:
        raise UnreadableInputError(f"Expected {kind} files in the directory {path}, found none.")
    return files


def _single(path: Path, kind: str) -> Path:
    if not path.is_file():
        raise UnreadableInputError(f"Expected one .{kind} file, but {path} is a directory.")
    return path


def _check_width(shape: tuple[int, ...], width: int, where: str) -> None:
    if len(shape) not in (1, 2):
        raise UnreadableInputError(
            f"Expected outputs of shape [N, {width}] in {where}, but got shape {shape}."
        )
    if len(shape) == 1 and shape[0] != width:
        hint = (
            f"reshape it to [{shape[0] // width}, {width}]"
            if shape[0] % width == 0
            else f"save the outputs as an [N, {width}] array"
        )
        raise UnreadableInputError(
            f"Expected outputs of shape [N, {width}] in {where}, but got a 1-D array of "
            f"{shape[0]} values: {hint}."
        )
    if shape[-1] != width:
        raise UnreadableInputError(
            f"Expected outputs with {width} columns (the detector's OCS has {width} outputs), "
            f"but got {shape[-1]} in {where}: is this the model the detector was calibrated for?"
        )


def _as_float(block: np.ndarray) -> np.ndarray:
    """float32/float64 as they are; other numbers as float32, as the Detector would."""
    if block.dtype in (np.float32, np.float64):
        return block
    return block.astype(np.float32)


# ---------------------------------------------------------------------- Parquet


class ParquetReader(TableReader):
    """Parquet files read row group by row group.

    A row group that fails to decode becomes its rows as ``unreadable`` invalid rows (the
    rest of the file is still scored).
    """

    def __init__(
        self,
        files: Sequence[Path],
        width: int,
        columns: Sequence[str] | None,
        keep: Sequence[str],
        batch_rows: int,
    ) -> None:
        import pyarrow.parquet as pq

        self.width, self.keep, self.batch_rows = width, tuple(keep), batch_rows
        self.files = list(files)
        self.choices: list[ColumnChoice] = []
        total = 0
        for file in self.files:
            try:
                meta = pq.ParquetFile(file)
                schema = meta.schema_arrow
            except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
                raise UnreadableInputError(
                    f"Could not read {file} as Parquet: {err}".rstrip(".") + "."
                ) from err
            choice = choose_columns(schema, columns, width, str(file))
            missing = [name for name in self.keep if schema.get_field_index(name) < 0]
            if missing:
                raise UnreadableInputError(
                    f"Expected --keep column(s) {', '.join(missing)} in {file}, but they are "
                    f"missing. Columns: {', '.join(schema.names)}."
                )
            self.choices.append(choice)
            total += meta.metadata.num_rows
        self.total_rows = total

    def __iter__(self) -> Iterator[RowBatch]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from oodmon.offline.rows import rows_from_arrow

        for file, choice in zip(self.files, self.choices, strict=True):
            wanted = list(dict.fromkeys([*choice.names, *self.keep]))
            with pq.ParquetFile(file) as parquet:
                for group in range(parquet.num_row_groups):
                    expected = parquet.metadata.row_group(group).num_rows
                    done = 0
                    try:
                        for batch in parquet.iter_batches(
                            batch_size=self.batch_rows, row_groups=[group], columns=wanted
                        ):
                            rows = rows_from_arrow(batch, choice, self.width, self.keep)
                            done += len(rows)
                            yield rows
                    except (pa.ArrowException, OSError):
                        # a corrupt page: its rows are reported invalid, not lost
                        yield RowBatch.unreadable(expected - done, self.width, "unreadable",
                                                  self.keep)  # fmt: skip


# ---------------------------------------------------------------------- JSON Lines


class JsonLinesReader(TableReader):
    """One record per line (see :mod:`oodmon.offline.records`), ``batch_rows`` lines a batch."""

    def __init__(
        self,
        files: Sequence[Path],
        width: int,
        keep: Sequence[str],
        batch_rows: int,
        tensor: str | None,
    ) -> None:
        self.files, self.width, self.keep = list(files), width, tuple(keep)
        self.batch_rows, self.tensor = batch_rows, tensor
        for file in self.files:
            try:
                with file.open("rb"):
                    pass
            except OSError as err:
                raise UnreadableInputError(f"Could not open {file}: {err}") from err

    def __iter__(self) -> Iterator[RowBatch]:
        self.skipped = 0
        for file in self.files:
            with file.open("rb") as stream:
                lines: list[bytes] = []
                for line in stream:
                    lines.append(line)
                    if len(lines) >= self.batch_rows:
                        yield from self._decode(lines)
                        lines = []
                if lines:
                    yield from self._decode(lines)

    def _decode(self, lines: list[bytes]) -> Iterator[RowBatch]:
        rows, skipped = decode_lines(lines, self.width, self.keep, self.tensor)
        self.skipped += skipped
        if len(rows):
            yield rows


# ---------------------------------------------------------------------- arrays


class NpyReader(TableReader):
    """A ``.npy`` file through a read-only memory map.

    Pages are released after each batch (``MADV_DONTNEED``), so the resident set stays flat
    however large the file is.
    """

    def __init__(self, file: Path, width: int, batch_rows: int) -> None:
        try:
            probe = np.load(file, mmap_mode="r", allow_pickle=False)
        except Exception as err:
            raise UnreadableInputError(f"Could not read outputs from {file}: {err}") from err
        self.file, self.width, self.keep, self.batch_rows = file, width, (), batch_rows
        self.shape: tuple[int, ...] = tuple(probe.shape)
        self.dtype, self.offset = probe.dtype, int(probe.offset)
        fortran = probe.ndim > 1 and not probe.flags.c_contiguous
        del probe
        _check_width(self.shape, width, str(file))
        if self.dtype.kind not in "biuf":
            raise UnreadableInputError(
                f"Expected numeric outputs in {file}, but the array has dtype {self.dtype}."
            )
        self.fortran = fortran
        self.total_rows = self.shape[0] if len(self.shape) == 2 else 1

    def __iter__(self) -> Iterator[RowBatch]:
        n, row_bytes = self.total_rows or 0, self.width * self.dtype.itemsize
        if self.fortran:  # column-major: rows are strided, read through numpy's own map
            whole = np.load(self.file, mmap_mode="r", allow_pickle=False)
            for start in range(0, n, self.batch_rows):
                block = np.ascontiguousarray(whole[start : start + self.batch_rows])
                yield _array_rows(block)
            return
        if n == 0:
            return
        with (
            self.file.open("rb") as stream,
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        ):
            for start in range(0, n, self.batch_rows):
                count = min(self.batch_rows, n - start)
                begin = self.offset + start * row_bytes
                view = np.frombuffer(mapped, self.dtype, count * self.width, begin)
                block = view.reshape(count, self.width).copy()
                del view  # the map cannot close while a view exports it
                aligned = begin - begin % mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, aligned, begin + count * row_bytes - aligned)
                yield _array_rows(block)


class ArrayReader(TableReader):
    """An in-memory ``[N, K]`` array or tensor, in slices (``.pt`` files land here)."""

    def __init__(self, data: Any, width: int, batch_rows: int, where: str = "the array") -> None:
        import torch

        if isinstance(data, torch.Tensor):
            tensor = data.detach().cpu()
            if tensor.dtype in (torch.float16, torch.bfloat16) or not tensor.is_floating_point():
                tensor = tensor.to(torch.float32)
            data = tensor.numpy()
        array = np.asarray(data)
        if array.dtype.kind not in "biuf":
            raise UnreadableInputError(
                f"Expected numeric outputs in {where}, but got dtype {array.dtype}."
            )
        _check_width(tuple(array.shape), width, where)
        self.array = array.reshape(-1, width)
        self.width, self.keep, self.batch_rows = width, (), batch_rows
        self.total_rows = self.array.shape[0]

    def __iter__(self) -> Iterator[RowBatch]:
        for start in range(0, self.array.shape[0], self.batch_rows):
            yield _array_rows(np.ascontiguousarray(self.array[start : start + self.batch_rows]))


def _array_rows(block: np.ndarray) -> RowBatch:
    return RowBatch(_as_float(block), np.zeros(block.shape[0], dtype=np.uint8))


def load_pt(file: Path, key: str | None = None) -> Any:
    """The array in a ``torch.save`` file (``key`` picks an entry of a dict)."""
    import torch

    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UnreadableInputError(f"Could not read outputs from {file}: {err}") from err
    if isinstance(data, dict):
        if key is None and len(data) == 1:
            key = next(iter(data))
        if key not in data:
            raise UnreadableInputError(
                f"{file} holds a dict with keys {sorted(map(str, data))}; choose one with --key."
            )
        data = data[key]
    if not isinstance(data, (torch.Tensor, np.ndarray)):
        raise UnreadableInputError(
            f"Expected an array of outputs in {file}, but found {type(data).__name__}."
        )
    return data
