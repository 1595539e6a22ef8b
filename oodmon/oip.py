"""Open Inference Protocol (KServe v2) JSON <-> NumPy, and the KServe v1 forms.

Model servers (KServe, Triton, MLServer, Seldon) speak the Open Inference Protocol: a request
``{"inputs": [tensor, ...]}`` and a response ``{"model_name", "model_version", "id",
"outputs": [tensor, ...]}``, where a tensor is ``{"name", "shape", "datatype", "data"}`` and
``data`` is nested or flat in row-major order. KServe's older v1 protocol sends
``{"instances": [...]}`` and answers ``{"predictions": [...]}``. The functions here turn both
into arrays, and a detector's verdict back into OIP output tensors named as the ecosystem names
them (``is_outlier``, ``instance_score``, ``p_value``, ``distance``).

Pure functions over JSON-ready Python objects and NumPy arrays (no torch), so that the
sidecar, the Kafka consumer and offline table scoring share them. NaN and inf decode as they
are: the Detector counts non-finite rows as invalid. Every error is an :class:`OIPError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from oodmon.errors import OodmonError

__all__ = [
    "DATATYPES",
    "VERDICT_OUTPUTS",
    "DetectorIdentity",
    "InferencePayload",
    "OIPError",
    "VerdictArrays",
    "decode_tensor",
    "encode_tensor",
    "encode_verdict",
    "parse_request",
    "parse_response",
    "select_tensor",
]

#: OIP datatype -> NumPy dtype for every numeric datatype. ``BYTES`` is deliberately absent:
#: a detector scores numbers, and strings cannot be model outputs it understands.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}

#: Names of the output tensors :func:`encode_verdict` writes, with their datatypes (the names
#: alibi-detect style detectors use, so existing consumers of detector replies understand them).
VERDICT_OUTPUTS: tuple[tuple[str, str], ...] = (
    ("is_outlier", "BOOL"),
    ("instance_score", "FP64"),
    ("p_value", "FP64"),
    ("distance", "FP64"),
)


class OIPError(OodmonError, ValueError):
    """A payload that is not valid Open Inference Protocol (or KServe v1) JSON."""


@dataclass(frozen=True)
class InferencePayload:
    """The tensors of one inference request or response, decoded.

    Attributes:
        tensors: name -> array, in the payload's order. v1 payloads have one tensor, named
            ``"instances"`` or ``"predictions"``.
        protocol: ``"v2"`` (Open Inference Protocol) or ``"v1"`` (KServe v1).
        model_name: the response's ``model_name`` (None when absent, always for v1).
        model_version: the response's ``model_version``, or None.
        id: the payload's ``id``, or None.
        parameters: the payload's ``parameters`` object (empty when absent).
    """

    tensors: dict[str, np.ndarray]
    protocol: Literal["v1", "v2"]
    model_name: str | None = None
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def select(self, name: str | None = None) -> tuple[str, np.ndarray]:
        """The tensor called ``name``, or the only one; see :func:`select_tensor`."""
        return select_tensor(self.tensors, name)


class VerdictArrays(Protocol):
    """What :func:`encode_verdict` reads: :class:`oodmon.verdict.HostVerdict` has it."""

    @property
    def score(self) -> np.ndarray:
        """Per-row OOD score."""
        ...

    @property
    def distance(self) -> np.ndarray:
        """Per-row distance to the OCS."""
        ...

    @property
    def p_value(self) -> np.ndarray:
        """Per-row conformal p-value."""
        ...

    @property
    def flag(self) -> np.ndarray:
        """Per-row flag (p-value <= alpha)."""
        ...


@dataclass(frozen=True)
class DetectorIdentity:
    """Which detector judged a batch: written into the reply's ``parameters``.

    Attributes:
        score: the detector's score name (e.g. ``"ocs_kl"``).
        alpha: its target false-alarm rate.
        calibration_hash: the hash of its calibration set.
        model: the model label the verdict was recorded under.
        model_version: the model version label.
    """

    score: str
    alpha: float
    calibration_hash: str
    model: str
    model_version: str

    def parameters(self) -> dict[str, Any]:
        """The identity as OIP ``parameters`` (JSON scalars)."""
        return {
            "detector_score": self.score,
            "alpha": self.alpha,
            "calibration_hash": self.calibration_hash,
            "monitored_model": self.model,
            "monitored_model_version": self.model_version,
        }


# ---------------------------------------------------------------------- tensors


def decode_tensor(tensor: Any, where: str = "tensor") -> np.ndarray:
    """One OIP tensor ``{name, shape, datatype, data}`` as an array of its shape and dtype.

    Args:
        tensor: the JSON object of the tensor.
        where: how to name it in errors (e.g. ``"outputs[1]"``).

    Returns:
        An array of shape ``shape`` and the NumPy dtype of ``datatype``.

    Raises:
        OIPError: a missing field, a ``BYTES`` or unknown datatype, non-numeric data, or data
            whose element count does not match ``shape``.
    """
    if not isinstance(tensor, Mapping):
        raise OIPError(
            f"Expected {where} to be an object with name, shape, datatype and data, "
            f"but got {_kind(tensor)}."
        )
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in tensor]
    if missing:
        raise OIPError(
            f"Expected {where} to have fields name, shape, datatype and data, but it lacks "
            f"{', '.join(missing)}."
        )
    name = tensor["name"]
    where = f"{where} ({name!r})" if isinstance(name, str) else where
    shape = _check_shape(tensor["shape"], where)
    datatype = tensor["datatype"]
    if datatype == "BYTES":
        raise OIPError(
            f"Expected {where} to hold numbers (FP32, FP64, INT64, ...), but got datatype "
            "BYTES: a detector scores numeric model outputs; select a numeric output."
        )
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise OIPError(
            f"Expected {where} to have a datatype in {sorted(DATATYPES)}, but got {datatype!r}."
        )
    array = _as_array(tensor["data"], dtype, where)
    expected = math.prod(shape)
    if array.size != expected:
        raise OIPError(
            f"Expected {where} to hold {expected} values for shape {list(shape)}, but its data "
            f"holds {array.size} (shape {list(array.shape)})."
        )
    if array.shape != shape:
        array = array.reshape(shape)  # flat row-major data, or nested data of another nesting
    return array


def encode_tensor(name: str, array: Any, datatype: str | None = None) -> dict[str, Any]:
    """An array as an OIP tensor with flat row-major ``data``.

    Floating-point NaN and inf become ``null`` so that the JSON stays standard (strict
    parsers reject ``NaN``); :func:`decode_tensor` reads ``null`` back as NaN.

    Raises:
        OIPError: an unknown datatype, or an array dtype with no OIP datatype.
    """
    values = np.asarray(array)
    if datatype is None:
        datatype = _DATATYPE_OF.get(values.dtype)
        if datatype is None:
            raise OIPError(
                f"Expected an array with a numeric dtype for {name!r}, but got {values.dtype}."
            )
    elif datatype not in DATATYPES:
        raise OIPError(
            f"Expected a datatype in {sorted(DATATYPES)} for {name!r}, but got {datatype!r}."
        )
    values = values.astype(DATATYPES[datatype], copy=False)
    data: list[Any] = values.ravel().tolist()
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        data = [v if math.isfinite(v) else None for v in data]
    return {"name": name, "shape": list(values.shape), "datatype": datatype, "data": data}


def select_tensor(
    tensors: Mapping[str, np.ndarray], name: str | None = None, what: str = "output"
) -> tuple[str, np.ndarray]:
    """The tensor called ``name``; without a name, the only tensor there is.

    Raises:
        OIPError: no such name, no tensors, or several tensors and no name.
    """
    if name is not None:
        if name not in tensors:
            raise OIPError(
                f"Expected an {what} tensor named {name!r}, but the payload has "
                f"{_names(tensors)}: choose one of those (--{what} NAME)."
            )
        return name, tensors[name]
    if len(tensors) == 1:
        only = next(iter(tensors))
        return only, tensors[only]
    if not tensors:
        raise OIPError(f"Expected at least one {what} tensor, but the payload has none.")
    raise OIPError(
        f"Expected one {what} tensor or a chosen name, but the payload has several: "
        f"{_names(tensors)}; choose one with --{what} NAME."
    )


# ---------------------------------------------------------------------- payloads


def parse_response(body: Any) -> InferencePayload:
    """An inference response: OIP ``{"outputs": [...]}`` or KServe v1 ``{"predictions": ...}``.

    Raises:
        OIPError: neither form, or a malformed tensor.
    """
    return _parse(body, "outputs", "predictions")


def parse_request(body: Any) -> InferencePayload:
    """An inference request: OIP ``{"inputs": [...]}`` or KServe v1 ``{"instances": ...}``.

    Raises:
        OIPError: neither form, or a malformed tensor.
    """
    return _parse(body, "inputs", "instances")


def _parse(body: Any, v2_key: str, v1_key: str) -> InferencePayload:
    if not isinstance(body, Mapping):
        raise OIPError(
            f'Expected a JSON object with "{v2_key}" (Open Inference Protocol) or "{v1_key}" '
            f"(KServe v1), but got {_kind(body)}."
        )
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise OIPError(f'Expected "parameters" to be an object, but got {_kind(parameters)}.')
    if v2_key in body:
        items = body[v2_key]
        if not isinstance(items, list):
            raise OIPError(f'Expected "{v2_key}" to be a list of tensors, but got {_kind(items)}.')
        tensors: dict[str, np.ndarray] = {}
        for i, item in enumerate(items):
            array = decode_tensor(item, f"{v2_key}[{i}]")
            name = item["name"]
            if not isinstance(name, str) or name in tensors:
                raise OIPError(
                    f"Expected {v2_key}[{i}] to have a unique string name, but got {name!r}."
                )
            tensors[name] = array
        return InferencePayload(
            tensors=tensors,
            protocol="v2",
            model_name=_optional_str(body, "model_name"),
            model_version=_optional_str(body, "model_version"),
            id=_optional_str(body, "id"),
            parameters=dict(parameters),
        )
    if v1_key in body:
        # v1 carries no datatype: numbers are taken as float64, what JSON numbers are
        array = _as_array(body[v1_key], DATATYPES["FP64"], f'"{v1_key}"')
        return InferencePayload(
            tensors={v1_key: array},
            protocol="v1",
            id=_optional_str(body, "id"),
            parameters=dict(parameters),
        )
    raise OIPError(
        f'Expected a JSON object with "{v2_key}" (Open Inference Protocol) or "{v1_key}" '
        f"(KServe v1), but got one with keys {sorted(map(str, body))[:10]}."
    )


def encode_verdict(
    verdict: VerdictArrays,
    identity: DetectorIdentity,
    *,
    model_name: str | None = None,
    model_version: str | None = None,
    id: str | None = None,
) -> dict[str, Any]:
    """A verdict as an OIP response, with the detector's identity in ``parameters``.

    The outputs are ``is_outlier``, ``instance_score``, ``p_value`` and ``distance``
    tensors of shape ``[N]``.

    Rows that could not be scored have ``is_outlier`` false and ``null`` (NaN) evidence.

    Args:
        verdict: per-row arrays (a :class:`~oodmon.verdict.HostVerdict`).
        identity: the detector that judged the rows.
        model_name: the reply's ``model_name`` (default: the identity's model).
        model_version: the reply's ``model_version`` (default: the identity's version).
        id: the reply's ``id`` (echo the request's, as OIP servers do).
    """
    columns = {
        "is_outlier": verdict.flag,
        "instance_score": verdict.score,
        "p_value": verdict.p_value,
        "distance": verdict.distance,
    }
    reply: dict[str, Any] = {
        "model_name": model_name if model_name is not None else identity.model,
        "model_version": model_version if model_version is not None else identity.model_version,
    }
    if id is not None:
        reply["id"] = id
    reply["parameters"] = identity.parameters()
    reply["outputs"] = [encode_tensor(name, columns[name], dt) for name, dt in VERDICT_OUTPUTS]
    return reply


# ---------------------------------------------------------------------- helpers


def _as_array(data: Any, dtype: np.dtype[Any], where: str) -> np.ndarray:
    """Nested or flat JSON numbers as an array of ``dtype``; ``null`` in float data is NaN.

    NumPy is left to infer the element kind first, so that strings are refused (``asarray``
    with a float dtype would parse ``"1.5"``) and integers are range-checked (a cast to
    ``UINT8`` would wrap 300 to 44 silently).
    """
    if not isinstance(data, list):
        raise OIPError(
            f"Expected {where} data to be a JSON array of numbers, but got {_kind(data)}."
        )
    try:
        inferred = np.asarray(data)
    except (ValueError, TypeError) as err:  # ragged rows
        raise OIPError(
            f"Expected {where} data to be a (nested) array of numbers with rows of equal "
            f"length, but it could not be read as one: {err}."
        ) from err
    kind = inferred.dtype.kind
    if kind == "O" and dtype.kind == "f":  # null for NaN, as encode_tensor writes it
        nulls = np.vectorize(_is_null, otypes=[bool])(inferred)
        if nulls.any():
            inferred = inferred.copy()
            inferred[nulls] = np.nan
            with contextlib.suppress(ValueError, TypeError):
                inferred = inferred.astype(np.float64)
            kind = inferred.dtype.kind
    if kind not in "biuf":
        raise OIPError(
            f"Expected {where} data to be a (nested) array of {_DATATYPE_OF[dtype]} numbers, "
            f"but it holds {_element_kind(inferred)}."
        )
    if dtype.kind in "iu" and inferred.size:
        if kind == "f" and not np.array_equal(inferred, np.round(inferred)):
            raise OIPError(
                f"Expected {where} data of integer datatype {_DATATYPE_OF[dtype]}, but it "
                "holds non-integral numbers."
            )
        info = np.iinfo(dtype)
        low, high = inferred.min(), inferred.max()
        if low < info.min or high > info.max:
            raise OIPError(
                f"Expected {where} data of {_DATATYPE_OF[dtype]} in [{info.min}, {info.max}], "
                f"but it holds values in [{low}, {high}]."
            )
    elif dtype.kind == "b" and kind != "b" and not np.isin(inferred, (0, 1)).all():
        raise OIPError(
            f"Expected {where} data of datatype BOOL (true/false or 0/1), but it holds "
            "other numbers."
        )
    return inferred.astype(dtype, copy=False)


def _is_null(value: Any) -> bool:
    return value is None


def _element_kind(array: np.ndarray) -> str:
    if array.dtype.kind in "US":
        return "strings"
    if array.dtype.kind == "O":
        return "null or mixed values"
    return f"values of dtype {array.dtype}"


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise OIPError(
            f"Expected {where} shape to be a list of non-negative integers, but got {shape!r}."
        )
    return tuple(shape)


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise OIPError(f'Expected "{key}" to be a string, but got {_kind(value)}.')


def _names(tensors: Mapping[str, Any]) -> str:
    return ", ".join(repr(n) for n in tensors) or "no tensors"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, str):
        return f"a string {value[:40]!r}"
    return f"{type(value).__name__} {value!r}"[:80]
