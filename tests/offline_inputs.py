"""Writers of the input formats `oodmon score` reads, for the offline tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

LIST = pa.list_(pa.float32())


def list_column(x: np.ndarray, fixed: bool = False) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel())
    array = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    return array if fixed else array.cast(LIST)


def write_input(x: np.ndarray, path: Path, layout: str, row_group_size: int = 64) -> Path:
    """Write ``x`` (``[N, K]``) with ids 0..N-1 in one of the layouts the readers accept."""
    ids = [f"r{i}" for i in range(len(x))]
    if layout in ("parquet_list", "parquet_fixed"):
        table = pa.table({"id": ids, "logits": list_column(x, layout == "parquet_fixed")})
        pq.write_table(table, path, row_group_size=row_group_size)
    elif layout == "parquet_columns":
        columns = {"id": ids, **{f"logit_{j}": x[:, j] for j in range(x.shape[1])}}
        pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    elif layout == "jsonl_rows":
        path.write_text("".join(json.dumps({"id": i, "outputs": r.tolist()}) + "\n"
                                for i, r in zip(ids, x, strict=True)))  # fmt: skip
    elif layout == "jsonl_oip":  # one OIP response per line, two rows each (a batch)
        lines = []
        for start in range(0, len(x), 2):
            block = x[start : start + 2]
            lines.append(json.dumps({
                "model_name": "digits", "id": ids[start],
                "outputs": [{"name": "logits", "shape": list(block.shape), "datatype": "FP32",
                             "data": block.ravel().tolist()}],
            }))  # fmt: skip
        path.write_text("\n".join(lines) + "\n")
    elif layout == "jsonl_kserve_events":  # payload-logger CloudEvents: requests and responses
        lines = []
        for i, row in zip(ids, x, strict=True):
            base = {"specversion": "1.0", "id": i, "source": "digits-predictor"}
            lines.append(json.dumps({**base, "type": "org.kubeflow.serving.inference.request",
                                     "data": {"instances": [[0.0] * 4]}}))  # fmt: skip
            lines.append(json.dumps({**base, "type": "org.kubeflow.serving.inference.response",
                                     "data": {"predictions": [row.tolist()]}}))  # fmt: skip
        path.write_text("\n".join(lines) + "\n")
    elif layout == "npy":
        np.save(path, x)
    elif layout == "pt":
        torch.save({"logits": torch.from_numpy(x)}, path)
    else:
        raise ValueError(layout)
    return path


SUFFIX = {"parquet_list": ".parquet", "parquet_fixed": ".parquet", "parquet_columns": ".parquet",
          "jsonl_rows": ".jsonl", "jsonl_oip": ".jsonl", "jsonl_kserve_events": ".jsonl",
          "npy": ".npy", "pt": ".pt"}  # fmt: skip


def read_output(path: Path) -> dict[str, list]:
    """Columns of a verdict file as Python lists (NaN/empty -> None)."""
    if path.suffix == ".parquet" or path.is_dir():
        return pq.read_table(path).to_pydict()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    import csv

    with path.open() as stream:
        rows = list(csv.DictReader(stream))
    parse = {"score": float, "distance": float, "p_value": float, "predicted": int, "index": int,
             "flag": lambda v: v == "True", "invalid": lambda v: v == "True"}  # fmt: skip
    return {k: [None if r[k] == "" else parse.get(k, str)(r[k]) for r in rows] for k in rows[0]}
