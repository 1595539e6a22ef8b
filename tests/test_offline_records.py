"""JSON Lines records: OIP, KServe v1, CloudEvents and plain rows decode to the same rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oodmon.offline.records import decode_line, decode_lines

ROWS = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.25]]


@pytest.mark.parametrize(
    "record",
    [
        {"model_name": "m", "id": "7", "outputs": [
            {"name": "logits", "shape": [2, 3], "datatype": "FP32", "data": [*ROWS[0], *ROWS[1]]}]},
        {"id": "7", "predictions": ROWS},
        {"id": "7", "outputs": ROWS},
        {"specversion": "1.0", "type": "org.kubeflow.serving.inference.response", "id": "7",
         "data": {"predictions": ROWS}},
        {"specversion": "1.0", "type": "org.kubeflow.serving.inference.response", "id": "7",
         "data": json.dumps({"outputs": ROWS})},
    ],
)  # fmt: skip
def test_every_form_gives_the_rows(record: dict) -> None:
    decoded = decode_line(json.dumps(record), 3)
    np.testing.assert_array_equal(decoded.rows, np.array(ROWS))
    assert decoded.reason is None and decoded.rows.dtype == np.float64
    rows, skipped = decode_lines([json.dumps(record)], 3, keep=("id",))
    assert rows.keep == {"id": ["7", "7"]} and skipped == 0


def test_tensor_choice_request_events_and_bad_lines() -> None:
    a = {"name": "a", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}
    b = {"name": "b", "shape": [1, 3], "datatype": "INT64", "data": [4, 5, 6]}
    two = {"outputs": [a, b]}
    assert decode_line(json.dumps(two), 3).reason == "bad_record"  # several tensors, no name
    np.testing.assert_array_equal(decode_line(json.dumps(two), 3, tensor="b").rows, [[4, 5, 6]])
    request = {"specversion": "1.0", "type": "org.kubeflow.serving.inference.request",
               "data": {"instances": [[1]]}}  # fmt: skip
    lines = [json.dumps(request), "", "oops", json.dumps({"outputs": [[1, 2]] * 3}),
             json.dumps({"id": 4}), json.dumps({"outputs": ["a", "b", "c"]})]  # fmt: skip
    rows, skipped = decode_lines(lines, 3, keep=("id",))
    assert skipped == 1
    codes = {1: "nonfinite", 2: "wrong_width", 4: "missing_column", 5: "not_json", 6: "bad_record"}
    assert [codes[c] for c in rows.reasons] == ["not_json"] + ["wrong_width"] * 3 + [
        "missing_column", "bad_record"]  # fmt: skip
    assert np.isnan(rows.outputs).all() and rows.keep["id"] == [None] * 4 + ["4", None]
