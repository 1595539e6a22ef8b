"""Label Studio and JSON Lines exports (``label_queue.export``), and the PNG encoder."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from label_queue_helpers import image, put

from oodmon.label_queue import LabelQueue, QueueItem
from oodmon.label_queue.export import export_queue, label_studio_task, png_bytes, write_items


def decode_png(data: bytes) -> np.ndarray:
    """A reference decoder for the PNGs we write (8-bit, filter 0), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    idat = b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert b"IEND" in chunks
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8
    channels = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, -1)
    assert (raw[:, 0] == 0).all()
    pixels = raw[:, 1:].reshape(height, width, channels)
    return pixels[:, :, 0] if channels == 1 else pixels


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(12, dtype=np.uint8).reshape(3, 4)),
        (np.array([[[0.0, 1.0], [0.5, 0.25]]]), np.array([[0, 255], [128, 64]], dtype=np.uint8)),
        (np.array([[-1.0, 1.0], [0.0, 3.0]]), np.array([[0, 128], [64, 255]], dtype=np.uint8)),
    ],
)
def test_png_encoder_matches_a_reference_decoder(array, expected):
    np.testing.assert_array_equal(decode_png(png_bytes(array)), expected)


def test_png_encoder_writes_rgb_in_either_layout():
    rgb = image(3, (5, 4, 3))
    np.testing.assert_array_equal(decode_png(png_bytes(rgb)), rgb)
    np.testing.assert_array_equal(decode_png(png_bytes(np.moveaxis(rgb, -1, 0))), rgb)
    with pytest.raises(ValueError, match="image"):
        png_bytes(np.zeros(10))


def check_label_studio_task(task: dict) -> None:
    """Label Studio's import format: data + predictions[model_version, score, result]."""
    assert set(task) == {"data", "predictions"}
    assert isinstance(task["data"], dict)
    (prediction,) = task["predictions"]
    assert set(prediction) == {"model_version", "score", "result"}
    assert isinstance(prediction["model_version"], str)
    assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0
    for region in prediction["result"]:
        assert set(region) == {"from_name", "to_name", "type", "value"}
        assert region["type"] == "choices"
        assert region["to_name"] in task["data"]
        assert all(isinstance(c, str) for c in region["value"]["choices"])


def test_label_studio_export(url, clock, tmp_path):
    with LabelQueue(url, clock=clock) as q:
        img = image(1, (1, 6, 7))
        a = q.put(
            img,
            model="mnist",
            version="v3",
            p_value=0.002,
            distance=0.3,
            score=-0.3,
            predicted=4,
            calibration="c0ffee",
        )
        b = q.put(
            reference="https://example.org/x.png",
            model="mnist",
            version="v3",
            p_value=0.01,
            distance=0.5,
            predicted=2,
        )
        c = q.put(
            np.array([0.5, np.inf, 2.0]),
            model="tab",
            version="1",
            p_value=0.03,
            distance=float("nan"),
        )
        put(q, 9, 0.04)  # labelled: filtered out below
        q.done(q.items()[-1].id, "cat")
        out = tmp_path / "tasks.json"
        count = export_queue(q, out, status="queued", class_names=[f"digit-{k}" for k in range(10)])
    tasks = json.loads(out.read_text())  # strict JSON: no NaN/Infinity
    assert count == len(tasks) == 3
    for task in tasks:
        check_label_studio_task(task)
    assert [t["data"]["oodmon_id"] for t in tasks] == [a, b, c]
    first = tasks[0]
    prefix = "data:image/png;base64,"
    assert first["data"]["image"].startswith(prefix)
    png = base64.b64decode(first["data"]["image"][len(prefix) :])
    np.testing.assert_array_equal(decode_png(png), img[0])
    assert first["predictions"][0]["model_version"] == "mnist@v3#c0ffee"
    # a confidence (low = most OOD): the p-value, tie-broken by distance below 1e-9
    scores = [t["predictions"][0]["score"] for t in tasks]
    assert scores == sorted(scores)
    assert first["predictions"][0]["score"] == pytest.approx(0.002, abs=1e-9)
    assert first["predictions"][0]["result"][0]["value"]["choices"] == ["digit-4"]
    assert first["data"] | {"image": None} == {
        "image": None,
        "oodmon_id": a,
        "distance": 0.3,
        "p_value": 0.002,
        "score": -0.3,
        "predicted": 4,
        "seen_count": 1,
        "model": "mnist",
        "model_version": "v3",
        "calibration": "c0ffee",
    }
    assert tasks[1]["data"]["image"] == "https://example.org/x.png"
    assert tasks[1]["predictions"][0]["model_version"] == "mnist@v3"
    assert tasks[2]["data"]["input"] == [0.5, 0.0, 2.0]
    assert tasks[2]["data"]["distance"] is None
    assert tasks[2]["predictions"][0]["result"] == []


def test_jsonl_export_round_trips(url, clock):
    with LabelQueue(url, clock=clock) as q:
        x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
        a = q.put(x, model="m", version="1", p_value=0.01, distance=0.1, predicted=1)
        b = q.put(reference="key", model="m", version="1", p_value=0.02, distance=0.1)
        buf = io.StringIO()
        assert export_queue(q, buf, format="jsonl") == 2
        stored = {it.id: it for it in q.items(include_inputs=True)}
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [line["id"] for line in lines] == [a, b]
    arr = np.load(io.BytesIO(base64.b64decode(lines[0]["input_npy_b64"])))
    np.testing.assert_array_equal(arr, x)
    assert lines[1]["input_npy_b64"] is None and lines[1]["input_ref"] == "key"
    for line in lines:
        item = stored[line["id"]]
        assert line["content_hash"] == item.content_hash
        assert line["status"] == "queued" and line["seen_count"] == 1


def test_label_studio_task_for_item_without_anything_to_show():
    item = QueueItem.create(model="m", version="1", p_value=0.5, distance=1.0)
    task = label_studio_task(item)
    check_label_studio_task(task)
    assert "image" not in task["data"]


@pytest.mark.parametrize("fmt", ["label-studio", "jsonl"])
def test_a_failed_export_keeps_the_previous_file(tmp_path, fmt):
    """The export writes to a temporary file and renames it: a failure half-way (here an
    item iterator that breaks) leaves the previous export whole and no temporary file."""
    item = QueueItem.create(reference="s3://a.png", model="m", version="1", p_value=0.01,
                            distance=0.1)  # fmt: skip
    out = tmp_path / "tasks.json"
    assert write_items([item], out, format=fmt) == 1
    good = out.read_text()

    def broken():  # type: ignore[no-untyped-def]
        yield item
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_items(broken(), out, format=fmt)
    assert out.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.json"]
