"""JSON Lines records -> rows: OIP responses, KServe v1 replies, CloudEvents, plain rows.

One line of a payload log is one of:

- an Open Inference Protocol response ``{"model_name", "id", "outputs": [tensor, ...]}``,
- a KServe v1 reply ``{"predictions": [[...], ...]}``,
- either of those wrapped in a CloudEvent, as KServe's payload logger writes them
  (``{"specversion": "1.0", "type": "org.kubeflow.serving.inference.response", "id", "data"}``),
- a plain row ``{"outputs": [0.1, 2.3, ...]}`` (or a list of such rows).

The protocol decoding itself is :mod:`oodmon.oip`'s; this module only finds the payload in a
line and turns its output tensor into rows. A line holds one row or a batch of rows; a line that
cannot be decoded becomes one invalid row with a reason, never a skipped one. Request events
(``...inference.request``) carry no outputs and are counted as skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodmon.offline.rows import RowBatch, reason_code

__all__ = ["DecodedLine", "decode_line", "decode_lines", "keep_value"]

#: CloudEvent types that carry model inputs, not outputs: skipped (and counted).
_REQUEST_EVENT_SUFFIX = ".request"


@dataclass(frozen=True)
class DecodedLine:
    """What one JSON line gave: its rows and their reader reason, or skipped.

    ``rows`` is ``[m, K]``, NaN where invalid, and ``reason`` a reader reason for all of
    them (None when read fine); ``skipped`` marks a line that holds no outputs.
    """

    rows: np.ndarray
    reason: str | None
    record: Mapping[str, Any] | None
    skipped: bool = False


def decode_line(line: bytes | str, width: int, tensor: str | None = None) -> DecodedLine:
    """Decode one JSON Lines record into rows of ``width`` outputs.

    Args:
        line: the raw line.
        width: K, the detector's output width.
        tensor: for OIP responses with several output tensors, the one to score.
    """
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return _invalid("not_json", width, None)
    if not isinstance(record, dict):
        return _invalid("bad_record", width, None)
    payload: Any = record
    if "specversion" in record:  # a structured-mode CloudEvent: the payload is its data
        if str(record.get("type", "")).endswith(_REQUEST_EVENT_SUFFIX):
            return DecodedLine(np.empty((0, width)), None, record, skipped=True)
        payload = record.get("data")
        if isinstance(payload, (str, bytes)):
            try:
                payload = json.loads(payload)
            except ValueError:
                return _invalid("not_json", width, record)
        if not isinstance(payload, dict):
            return _invalid("bad_record", width, record)
    return _decode_payload(payload, record, width, tensor)


def decode_lines(
    lines: Sequence[bytes | str], width: int, keep: Sequence[str] = (), tensor: str | None = None
) -> tuple[RowBatch, int]:
    """Decode a run of lines into one :class:`RowBatch`; returns it and the skipped count."""
    parts: list[np.ndarray] = []
    reasons: list[np.ndarray] = []
    kept: dict[str, list[Any]] = {name: [] for name in keep}
    skipped = 0
    for line in lines:
        if not line.strip():
            continue  # blank lines separate nothing in JSON Lines
        decoded = decode_line(line, width, tensor)
        if decoded.skipped:
            skipped += 1
            continue
        m = decoded.rows.shape[0]
        parts.append(decoded.rows)
        code = 0 if decoded.reason is None else reason_code(decoded.reason)
        reasons.append(np.full(m, code, dtype=np.uint8))
        for name in keep:
            kept[name].extend([keep_value(decoded.record, name)] * m)
    if not parts:
        return RowBatch(np.empty((0, width)), np.empty(0, dtype=np.uint8), kept), skipped
    outputs = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return RowBatch(outputs, np.concatenate(reasons), dict(kept)), skipped


def keep_value(record: Mapping[str, Any] | None, name: str) -> Any:
    """A passthrough value: the record's field, as a string, or None if absent.

    The field is looked up in the record (or the CloudEvent, then its payload), and made a
    string unless it is one already (one stable type per column).
    """
    if record is None:
        return None
    value = record.get(name)
    if value is None and "specversion" in record and isinstance(record.get("data"), dict):
        value = record["data"].get(name)
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


# ---------------------------------------------------------------------- payloads


def _decode_payload(
    payload: dict[str, Any], record: dict[str, Any], width: int, tensor: str | None
) -> DecodedLine:
    """THE place a JSON payload becomes rows.

    OIP and KServe v1 go through :mod:`oodmon.oip`; plain ``{"outputs": [numbers...]}``
    rows are read here.
    """
    import oodmon.oip as oip

    outputs = payload.get("outputs")
    if "outputs" in payload and not _is_tensor_list(outputs):
        return _plain_rows(outputs, width, record)
    if "outputs" not in payload and "predictions" not in payload:
        return _invalid("missing_column", width, record)
    try:
        _, array = oip.parse_response(payload).select(tensor)
    except oip.OIPError:
        return _invalid("bad_record", width, record)
    return _as_rows(array, width, record)


def _is_tensor_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _plain_rows(value: Any, width: int, record: dict[str, Any]) -> DecodedLine:
    try:
        array = np.asarray(value, dtype=np.float64)  # JSON null becomes NaN: invalid
    except (TypeError, ValueError):  # strings, ragged nesting
        return _invalid("bad_record", width, record)
    return _as_rows(array, width, record)


def _as_rows(array: np.ndarray, width: int, record: dict[str, Any]) -> DecodedLine:
    if array.dtype.kind not in "biuf":
        return _invalid("bad_record", width, record)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        return _invalid("bad_record", width, record)
    if array.shape[1] != width:
        return _invalid("wrong_width", width, record, rows=max(array.shape[0], 1))
    # JSON numbers are decimal text: always float64, so that a row scores the same whatever
    # else shares its batch (the single-process and Ray paths batch lines differently)
    return DecodedLine(array.astype(np.float64, copy=False), None, record)


def _invalid(
    reason: str, width: int, record: Mapping[str, Any] | None, rows: int = 1
) -> DecodedLine:
    return DecodedLine(np.full((rows, width), np.nan), reason, record)
