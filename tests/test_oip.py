"""Open Inference Protocol decoding and encoding against NumPy references."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from oodmon import Detector
from oodmon.errors import OodmonError
from oodmon.ocs import OCS
from oodmon.oip import (
    DATATYPES,
    VERDICT_OUTPUTS,
    DetectorIdentity,
    OIPError,
    decode_tensor,
    encode_tensor,
    encode_verdict,
    parse_request,
    parse_response,
    select_tensor,
)

NUMERIC = sorted(DATATYPES)


def _values(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = max(info.min, -1000), min(info.max, 1000)
        return rng.integers(low, high, size=shape).astype(dtype)
    return rng.normal(size=shape).astype(dtype)


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("nested", [False, True])
def test_decode_round_trips_every_numeric_datatype(datatype: str, nested: bool) -> None:
    rng = np.random.default_rng(0)
    expected = _values(datatype, (3, 4), rng)
    data = expected.tolist() if nested else expected.ravel().tolist()
    tensor = {"name": "x", "shape": [3, 4], "datatype": datatype, "data": data}
    # through real JSON text, as a server would send it
    decoded = decode_tensor(json.loads(json.dumps(tensor)))
    assert decoded.dtype == DATATYPES[datatype]
    assert decoded.shape == (3, 4)
    np.testing.assert_array_equal(decoded, expected)
    again = encode_tensor("x", decoded)
    assert again["datatype"] == datatype and again["shape"] == [3, 4]
    np.testing.assert_array_equal(decode_tensor(again), expected)


def test_flat_data_is_row_major() -> None:
    tensor = {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5]}
    np.testing.assert_array_equal(decode_tensor(tensor), np.arange(6).reshape(2, 3))


def test_nan_and_inf_pass_through_for_the_detector_to_count() -> None:
    body = '{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [NaN, Infinity, 1.0]}'
    decoded = decode_tensor(json.loads(body))
    assert math.isnan(decoded[0, 0]) and math.isinf(decoded[0, 1]) and decoded[0, 2] == 1.0


def test_encode_writes_standard_json_and_null_reads_back_as_nan() -> None:
    tensor = encode_tensor("x", np.array([np.nan, 1.0, np.inf]))
    text = json.dumps(tensor, allow_nan=False)  # would raise on NaN
    assert tensor["data"] == [None, 1.0, None]
    back = decode_tensor(json.loads(text))
    assert np.isnan(back[0]) and back[1] == 1.0 and np.isnan(back[2])


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        ({"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}, "BYTES"),
        ({"name": "x", "shape": [2], "datatype": "FP8", "data": [1, 2]}, "datatype in"),
        ({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}, "6 values"),
        ({"name": "x", "shape": [2, -1], "datatype": "FP32", "data": [1, 2]}, "non-negative"),
        ({"name": "x", "shape": "2", "datatype": "FP32", "data": [1, 2]}, "shape"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["1.5", "2"]}, "strings"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": 3.0}, "JSON array"),
        ({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}, "equal"),
        ({"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}, "non-integral"),
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [300, 2]}, "[0, 255]"),
        ({"name": "x", "shape": [2], "datatype": "BOOL", "data": [2, 0]}, "BOOL"),
        ({"name": "x", "shape": [1], "data": [1]}, "lacks datatype"),
        ([1, 2], "an object"),
    ],
)
def test_bad_tensors_are_refused_with_expected_but_got(tensor: object, fragment: str) -> None:
    with pytest.raises(OIPError, match="Expected") as info:
        decode_tensor(tensor, "outputs[0]")
    assert fragment in str(info.value)
    assert "but" in str(info.value)
    assert isinstance(info.value, OodmonError) and isinstance(info.value, ValueError)


def test_parse_response_v2_keeps_model_identity_and_order() -> None:
    body = {
        "model_name": "resnet",
        "model_version": "3",
        "id": "req-1",
        "outputs": [
            {"name": "logits", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
            {"name": "label", "shape": [2], "datatype": "INT64", "data": [2, 2]},
        ],
    }
    payload = parse_response(body)
    assert payload.protocol == "v2"
    assert (payload.model_name, payload.model_version, payload.id) == ("resnet", "3", "req-1")
    assert list(payload.tensors) == ["logits", "label"]
    name, logits = payload.select("logits")
    assert name == "logits" and logits.shape == (2, 3)


def test_select_lists_available_names_when_ambiguous_or_unknown() -> None:
    tensors = {"logits": np.zeros((1, 2)), "label": np.zeros(1)}
    with pytest.raises(OIPError, match=r"several: 'logits', 'label'; choose one with --output"):
        select_tensor(tensors)
    with pytest.raises(OIPError, match=r"named 'probs', but the payload has 'logits', 'label'"):
        select_tensor(tensors, "probs")
    with pytest.raises(OIPError, match="none"):
        select_tensor({})
    assert select_tensor({"only": np.ones(2)})[0] == "only"


def test_kserve_v1_forms() -> None:
    response = parse_response({"predictions": [[0.1, 0.9], [0.8, 0.2]]})
    assert response.protocol == "v1" and response.model_name is None
    np.testing.assert_array_equal(response.select()[1], [[0.1, 0.9], [0.8, 0.2]])
    request = parse_request({"instances": [[1, 2, 3]]})
    assert request.select()[0] == "instances"
    assert request.select()[1].dtype == np.float64


def test_parse_request_v2_inputs() -> None:
    request = parse_request(
        {
            "inputs": [
                {"name": "pixels", "shape": [1, 2, 2], "datatype": "UINT8", "data": [1, 2, 3, 4]}
            ]
        }
    )
    np.testing.assert_array_equal(request.tensors["pixels"], [[[1, 2], [3, 4]]])


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([1, 2], '"outputs"'),
        ({"result": 1}, "keys ['result']"),
        ({"outputs": {"name": "x"}}, "list of tensors"),
        ({"outputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "unique"),
        ({"outputs": [], "model_name": ["m"]}, "model_name"),
        ({"outputs": [], "parameters": [1]}, "parameters"),
    ],
)
def test_bad_payloads(body: object, fragment: str) -> None:
    with pytest.raises(OIPError, match="Expected") as info:
        parse_response(body)
    assert fragment in str(info.value)


def test_encode_verdict_matches_detector_predict() -> None:
    rng = np.random.default_rng(1)
    ocs = OCS.cross_entropy(counts=[5, 3, 2])
    detector = Detector(ocs, alpha=0.2).fit(rng.normal(size=(200, 3)) * 4)
    outputs = np.concatenate([rng.normal(size=(5, 3)) * 4, np.zeros((2, 3)), [[np.nan, 0, 0]]])
    host = detector.predict(outputs).to_host()
    identity = DetectorIdentity(
        score=detector.score, alpha=detector.alpha,
        calibration_hash=detector.calibration_hash_, model="m", model_version="1",
    )  # fmt: skip
    reply = json.loads(json.dumps(encode_verdict(host, identity, id="e-1"), allow_nan=False))
    assert [t["name"] for t in reply["outputs"]] == [name for name, _ in VERDICT_OUTPUTS]
    assert [t["datatype"] for t in reply["outputs"]] == [dt for _, dt in VERDICT_OUTPUTS]
    decoded = parse_response(reply).tensors
    np.testing.assert_array_equal(decoded["is_outlier"], host.flag)
    np.testing.assert_array_equal(decoded["instance_score"], host.score)
    np.testing.assert_array_equal(decoded["p_value"], host.p_value)
    np.testing.assert_array_equal(decoded["distance"], host.distance)
    assert decoded["is_outlier"][5:7].all()  # the OCS itself is as OOD as it gets
    assert not decoded["is_outlier"][7] and np.isnan(decoded["p_value"][7])
    assert reply["id"] == "e-1" and reply["model_name"] == "m" and reply["model_version"] == "1"
    assert reply["parameters"] == {
        "detector_score": detector.score,
        "alpha": 0.2,
        "calibration_hash": detector.calibration_hash_,
        "monitored_model": "m",
        "monitored_model_version": "1",
    }


def test_module_imports_no_torch() -> None:
    """Offline scoring and the Kafka consumer reuse this module on plain arrays."""
    tree = ast.parse(Path(__file__).parents[1].joinpath("oodmon", "oip.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "torch" not in imported and "numpy" in imported
