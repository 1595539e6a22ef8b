"""A batch of rows read from a log: the outputs matrix, why rows could not be read, passthrough.

Every reader (Parquet, JSON Lines, ``.npy``, ``.pt``) and the Ray engine turn what they read
into a :class:`RowBatch`, so that one function scores them all. A row that cannot be read (a
null, the wrong width, a line that is not JSON) stays in the batch as a row of NaN with a
reason code: NaN rows score NaN, so they come out ``invalid`` and can never pass for
in-distribution, and nothing is dropped.

The Arrow helpers import pyarrow lazily: ``import oodmon`` must not need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "INVALID_REASONS",
    "ColumnChoice",
    "RowBatch",
    "UnreadableInputError",
    "choose_columns",
    "reason_code",
    "rows_from_arrow",
]

#: Why a row is invalid, in the ``invalid_reason`` column. ``nonfinite``: the outputs hold
#: NaN/inf (or values the detector's ``kind`` cannot take); ``wrong_width``: not K numbers;
#: ``null``: a null value or row; ``missing_column``: a JSON record without outputs;
#: ``not_json``: a line that does not parse; ``bad_record``: JSON that is not model outputs;
#: ``unreadable``: a corrupt part of a file (e.g. a Parquet row group that fails to decode).
INVALID_REASONS: tuple[str, ...] = (
    "nonfinite",
    "wrong_width",
    "null",
    "missing_column",
    "not_json",
    "bad_record",
    "unreadable",
)
_CODES = {name: code for code, name in enumerate(INVALID_REASONS, start=1)}


def reason_code(reason: str) -> int:
    """The uint8 code of a reason (0 means the row was read fine)."""
    return _CODES[reason]


class UnreadableInputError(ValueError):
    """An input that cannot be scored at all (exit code 2).

    For example: no such file, a corrupt footer, a column that does not exist, outputs of
    the wrong width for the whole file.
    """


@dataclass(frozen=True)
class RowBatch:
    """Rows ready to score.

    Attributes:
        outputs: ``[n, K]`` floating outputs; rows the reader could not read are NaN.
        reasons: ``[n]`` uint8 reader reason codes (see :func:`reason_code`); 0 = read fine.
        keep: passthrough columns, name -> n values (a pyarrow array or a list).
    """

    outputs: np.ndarray
    reasons: np.ndarray
    keep: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.outputs.shape[0])

    @classmethod
    def unreadable(
        cls, n: int, width: int, reason: str, keep: Sequence[str] = (), dtype: Any = np.float32
    ) -> RowBatch:
        """``n`` rows that could not be read at all: NaN outputs, null passthrough values."""
        return cls(
            outputs=np.full((n, width), np.nan, dtype=dtype),
            reasons=np.full(n, reason_code(reason), dtype=np.uint8),
            keep={name: [None] * n for name in keep},
        )


# ---------------------------------------------------------------------- Arrow tables


@dataclass(frozen=True)
class ColumnChoice:
    """Which columns of a table hold the outputs: one list column, or K numeric columns."""

    list_column: str | None = None
    numeric_columns: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The chosen column names: the list column, or else the numeric columns."""
        return (self.list_column,) if self.list_column else self.numeric_columns


def choose_columns(
    schema: pa.Schema, columns: Sequence[str] | None, width: int, where: str
) -> ColumnChoice:
    """Resolve ``--columns`` against a table's schema.

    Args:
        schema: the table's schema.
        columns: None (the table's only list column), one list column's name, K numeric
            column names, or one ``prefix*`` (every numeric column starting with prefix, in
            the table's order).
        width: K, the detector's output width.
        where: the file, for messages.

    Raises:
        UnreadableInputError: a column that does not exist, no or several candidate list
            columns, non-numeric columns, or a width other than K.
    """
    import pyarrow as pa

    fields = {f.name: f.type for f in schema}
    listing = ", ".join(f"{name} ({kind})" for name, kind in fields.items())
    if not columns:
        lists = [name for name, kind in fields.items() if _is_numeric_list(kind)]
        if len(lists) != 1:
            found = "none" if not lists else f"several ({', '.join(lists)})"
            raise UnreadableInputError(
                f"Expected {where} to have one list column of {width} numbers, but found "
                f"{found}; name the outputs with --columns NAME, --columns A,B,... or "
                f"--columns PREFIX*. Columns: {listing}."
            )
        choice = ColumnChoice(list_column=lists[0])
    elif len(columns) == 1 and columns[0].endswith("*"):
        prefix = columns[0][:-1]
        names = tuple(n for n, k in fields.items() if n.startswith(prefix) and _is_number(k))
        if not names:
            raise UnreadableInputError(
                f"Expected numeric columns starting with {prefix!r} in {where}, but found "
                f"none. Columns: {listing}."
            )
        choice = ColumnChoice(numeric_columns=names)
    else:
        missing = [name for name in columns if name not in fields]
        if missing:
            raise UnreadableInputError(
                f"Expected column(s) {', '.join(missing)} in {where}, but they are missing. "
                f"Columns: {listing}."
            )
        if len(columns) == 1 and _is_numeric_list(fields[columns[0]]):
            choice = ColumnChoice(list_column=columns[0])
        else:
            bad = [name for name in columns if not _is_number(fields[name])]
            if bad:
                raise UnreadableInputError(
                    f"Expected numeric output columns (or one list column), but "
                    f"{', '.join(f'{n} ({fields[n]})' for n in bad)} in {where} is not."
                )
            choice = ColumnChoice(numeric_columns=tuple(columns))
    if choice.list_column is not None:
        kind = fields[choice.list_column]
        if pa.types.is_fixed_size_list(kind) and kind.list_size != width:
            raise UnreadableInputError(
                f"Expected {width} outputs per row (the detector's width), but column "
                f"{choice.list_column!r} in {where} holds {kind.list_size}: is this the model "
                "the detector was calibrated for?"
            )
    elif len(choice.numeric_columns) != width:
        raise UnreadableInputError(
            f"Expected {width} output columns (the detector's width), but --columns chose "
            f"{len(choice.numeric_columns)} in {where}: {', '.join(choice.numeric_columns)}."
        )
    return choice


def rows_from_arrow(
    table: pa.Table | pa.RecordBatch, choice: ColumnChoice, width: int, keep: Sequence[str] = ()
) -> RowBatch:
    """Turn the chosen columns of an Arrow table into a :class:`RowBatch`.

    Zero-copy where the layout allows: a list column without nulls and of the right width
    is one reshape.
    """
    n = table.num_rows
    if choice.list_column is not None:
        outputs, reasons = _list_to_matrix(_one_chunk(table.column(choice.list_column)), n, width)
    else:
        outputs, reasons = _columns_to_matrix(
            [_one_chunk(table.column(name)) for name in choice.numeric_columns], n
        )
    return RowBatch(outputs, reasons, {name: table.column(name) for name in keep})


def _list_to_matrix(array: pa.Array, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    reasons = np.zeros(n, dtype=np.uint8)
    dtype = _float_dtype(array.type.value_type)
    lengths = None  # fixed-size lists: every row has list_size (= width, checked by the schema)
    if not pa.types.is_fixed_size_list(array.type):
        lengths = np.diff(array.offsets.to_numpy(zero_copy_only=False))
    if array.null_count == 0 and (lengths is None or bool((lengths == width).all())):
        return _flat_values(array, dtype).reshape(n, width), reasons
    null = np.zeros(n, dtype=bool)
    if array.null_count:
        null = array.is_null().to_numpy(zero_copy_only=False)
    good = ~null if lengths is None else ~null & (lengths == width)
    outputs = np.full((n, width), np.nan, dtype=dtype)
    if good.any():
        outputs[good] = _flat_values(array.filter(pa.array(good)), dtype).reshape(-1, width)
    reasons[~good] = reason_code("wrong_width")
    reasons[null] = reason_code("null")
    return outputs, reasons


def _flat_values(array: pa.Array, dtype: np.dtype[Any]) -> np.ndarray:
    """The list elements as one flat array; nulls inside a list become NaN (invalid rows)."""
    values = array.flatten()
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=dtype)


def _columns_to_matrix(columns: list[pa.Array], n: int) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.result_type(*(_float_dtype(c.type) for c in columns))
    outputs = np.empty((n, len(columns)), dtype=dtype)
    null = np.zeros(n, dtype=bool)
    for j, column in enumerate(columns):
        outputs[:, j] = column.to_numpy(zero_copy_only=False)
        if column.null_count:
            null |= column.is_null().to_numpy(zero_copy_only=False)
    outputs[null] = np.nan
    reasons = np.where(null, reason_code("null"), 0).astype(np.uint8)
    return outputs, reasons


def _one_chunk(column: Any) -> pa.Array:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return column.chunk(0)
        return pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([])
    return column


def _float_dtype(kind: pa.DataType) -> np.dtype[Any]:
    """The float dtype to score an Arrow type in: float32 and float64 stay, the rest widen.

    Scores are computed in the input's precision, as the in-process Monitor does; half
    precision and integers widen.
    """
    import pyarrow as pa

    if pa.types.is_float32(kind) or pa.types.is_float16(kind):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _is_number(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def _is_numeric_list(kind: pa.DataType) -> bool:
    import pyarrow as pa

    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    return bool((is_list or pa.types.is_fixed_size_list(kind)) and _is_number(kind.value_type))
