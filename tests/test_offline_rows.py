"""Choosing output columns and turning Arrow columns into rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from oodmon.offline.rows import (
    INVALID_REASONS,
    ColumnChoice,
    UnreadableInputError,
    choose_columns,
    rows_from_arrow,
)


def schema(**fields: pa.DataType) -> pa.Schema:
    return pa.schema(list(fields.items()))


def test_choose_columns() -> None:
    s = schema(id=pa.string(), logits=pa.list_(pa.float32()), a=pa.float64(), b=pa.int32())
    assert choose_columns(s, None, 3, "f") == ColumnChoice(list_column="logits")
    assert choose_columns(s, ["a", "b"], 2, "f") == ColumnChoice(numeric_columns=("a", "b"))
    wide = schema(**{f"p{i}": pa.float32() for i in range(3)}, x=pa.float32())
    assert choose_columns(wide, ["p*"], 3, "f").numeric_columns == ("p0", "p1", "p2")
    for columns, width, message in [
        (["nope"], 2, "nope in f, but they are missing"),
        (["id"], 1, "is not"),
        (["a", "b"], 3, "Expected 3 output columns"),
        (["q*"], 3, "starting with 'q'"),
    ]:
        with pytest.raises(UnreadableInputError, match=message):
            choose_columns(s, columns, width, "f")
    with pytest.raises(UnreadableInputError, match="several"):
        choose_columns(schema(u=pa.list_(pa.float32()), v=pa.list_(pa.int8())), None, 3, "f")
    with pytest.raises(UnreadableInputError, match="holds 4"):
        choose_columns(schema(v=pa.list_(pa.float32(), 4)), None, 3, "f")


@pytest.mark.parametrize("kind", [pa.list_(pa.float32()), pa.large_list(pa.float64()),
                                  pa.list_(pa.float32(), 3), pa.list_(pa.int16())])  # fmt: skip
def test_list_columns_with_nulls_and_slices(kind: pa.DataType) -> None:
    fixed = pa.types.is_fixed_size_list(kind)
    values = [[1, 2, 3], None, [4, 5, 6], [7, 8, 9] if fixed else [7, 8], [1, None, 3]]
    table = pa.table({"v": pa.array(values, type=kind)}).slice(1)  # a non-zero offset
    rows = rows_from_arrow(table, ColumnChoice(list_column="v"), 3)
    names = [INVALID_REASONS[c - 1] if c else None for c in rows.reasons]
    assert names == ["null", None, None if fixed else "wrong_width", None]
    np.testing.assert_array_equal(rows.outputs[1], [4, 5, 6])
    assert np.isnan(rows.outputs[0]).all() and np.isnan(rows.outputs[3, 1])
    assert rows.outputs.dtype == (np.float32 if kind.value_type == pa.float32() else np.float64)


def test_numeric_columns_and_fast_path_is_zero_copy() -> None:
    table = pa.table({"a": [1.0, None, 3.0], "b": [4, 5, 6], "id": ["x", "y", "z"]})
    rows = rows_from_arrow(table, ColumnChoice(numeric_columns=("a", "b")), 2, keep=("id",))
    np.testing.assert_array_equal(rows.outputs[[0, 2]], [[1, 4], [3, 6]])
    assert np.isnan(rows.outputs[1]).all() and list(rows.reasons) == [0, 3, 0]
    assert rows.keep["id"].to_pylist() == ["x", "y", "z"]
    flat = pa.array(np.arange(12, dtype=np.float32))
    column = pa.FixedSizeListArray.from_arrays(flat, 3).cast(pa.list_(pa.float32()))
    rows = rows_from_arrow(pa.table({"v": column}), ColumnChoice(list_column="v"), 3)
    assert np.shares_memory(rows.outputs, flat.to_numpy())
