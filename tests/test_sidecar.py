"""The sidecar: in-process checks of routing and joining, and end-to-end tests that start the
real ``oodmon sidecar`` process and post real CloudEvents to it over loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_server
import pytest

from oodmon import OCS, Detector, LabelQueue
from oodmon.events import REQUEST_TYPE, RESPONSE_TYPE, encode_event
from oodmon.oip import encode_tensor, parse_response
from oodmon.sidecar import REJECT_REASONS, DetectorRoute, Sidecar, parse_detector_spec

REPO = Path(__file__).resolve().parents[1]
ALPHA_CLASSES, BETA_CLASSES = 10, 4


def synthetic_logits(n: int, k: int, rng: np.random.Generator, ood: bool = False) -> np.ndarray:
    """Confident logits for in-distribution rows; flat (near the OCS) logits for OOD rows."""
    z = rng.normal(size=(n, k)).astype(np.float32)
    if not ood:
        z[np.arange(n), rng.integers(0, k, n)] += 5.0
    else:
        z *= 0.05
    return z


def make_detector(k: int, seed: int) -> Detector:
    rng = np.random.default_rng(seed)
    return Detector(OCS.cross_entropy(counts=[1] * k), alpha=0.1).fit(synthetic_logits(400, k, rng))


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detectors")
    return {
        "alpha": make_detector(ALPHA_CLASSES, 1).save(root / "alpha.json"),
        "beta": make_detector(BETA_CLASSES, 2).save(root / "beta.json"),
    }


def response_body(model: str, logits: np.ndarray, version: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": model, "outputs": [encode_tensor("logits", logits)]}
    if version is not None:
        body["model_version"] = version
    return body


def request_body(inputs: np.ndarray) -> dict[str, Any]:
    return {"inputs": [encode_tensor("pixels", inputs)]}


def binary(type_: str, id_: str, data: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    return encode_event(type_, "/isvc/test", id_, data)


def structured(type_: str, id_: str, data: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    envelope = {
        "specversion": "1.0", "id": id_, "source": "/isvc/test", "type": type_,
        "datacontenttype": "application/json", "data": data,
    }  # fmt: skip
    return {"content-type": "application/cloudevents+json"}, json.dumps(envelope).encode()


# ---------------------------------------------------------------------- in-process


def test_parse_detector_spec() -> None:
    assert parse_detector_spec("d.json") == (None, None, "d.json")
    assert parse_detector_spec("resnet=d.json") == ("resnet", None, "d.json")
    assert parse_detector_spec("resnet:2=/x/d.json") == ("resnet", "2", "/x/d.json")
    assert parse_detector_spec("/a=b/d.json") == (None, None, "/a=b/d.json")
    with pytest.raises(ValueError, match="Expected --detector"):
        parse_detector_spec("resnet=")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Sidecar]:
    sidecar = Sidecar(
        [
            DetectorRoute(make_detector(ALPHA_CLASSES, 1), "alpha", "v1"),
            DetectorRoute(make_detector(BETA_CLASSES, 2), "beta", "2", match_version="2"),
        ],
        queue=str(tmp_path / "labels.db"),
        join_seconds=60,
    )
    yield sidecar
    sidecar.close()


def _handle(app: Sidecar, message: tuple[dict[str, str], bytes]) -> tuple[int, dict[str, Any]]:
    headers, body = message
    answer, _ = app.handle([(k.encode(), v.encode()) for k, v in headers.items()], body)
    return answer.status, json.loads(answer.body)


def _queued(path: Path, expected: int, timeout: float = 20.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        with LabelQueue(path) as queue:
            items = queue.items(limit=10_000, include_inputs=True)
        if len(items) >= expected or time.monotonic() > deadline:
            return items
        time.sleep(0.1)


def test_response_first_then_request_still_queues_inputs(app: Sidecar, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    logits = synthetic_logits(3, ALPHA_CLASSES, rng, ood=True)
    inputs = rng.integers(0, 255, (3, 2, 2)).astype(np.uint8)
    status, reply = _handle(app, binary(RESPONSE_TYPE, "late", response_body("alpha", logits)))
    assert status == 200
    flags = parse_response(reply).tensors["is_outlier"]
    assert flags.all()
    assert len(app.join) == 1  # flagged rows wait for their request
    status, reply = _handle(app, binary(REQUEST_TYPE, "late", request_body(inputs)))
    assert (status, reply) == (202, {"id": "late", "joined": True})
    items = sorted(_queued(tmp_path / "labels.db", 3), key=lambda item: item.id)
    assert [item.id for item in items] == ["late/0", "late/1", "late/2"]
    for row, item in enumerate(items):
        np.testing.assert_array_equal(item.input, inputs[row])
        assert item.model == "alpha"


def test_unpaired_flagged_rows_are_queued_without_input_on_eviction(tmp_path: Path) -> None:
    sidecar = Sidecar(
        [DetectorRoute(make_detector(ALPHA_CLASSES, 1), "alpha", "v1", default=True)],
        queue=str(tmp_path / "labels.db"),
        join_entries=1,
    )
    try:
        rng = np.random.default_rng(4)
        for id_ in ("a", "b"):  # "b" evicts "a" (join_entries=1)
            ood = synthetic_logits(1, ALPHA_CLASSES, rng, ood=True)
            assert _handle(sidecar, binary(RESPONSE_TYPE, id_, response_body("x", ood)))[0] == 200
        items = _queued(tmp_path / "labels.db", 1)
        assert [item.id for item in items] == ["a/0"] and items[0].input is None
        assert (
            sidecar.registry.get_sample_value(
                "oodmon_sidecar_join_evicted_total", {"kind": "response", "reason": "full"}
            )
            == 1
        )
    finally:
        sidecar.close()
    # closing queues what is still held (without input): nothing flagged is lost
    assert sorted(item.id for item in _queued(tmp_path / "labels.db", 2)) == ["a/0", "b/0"]


def test_routing_by_model_and_version(app: Sidecar) -> None:
    rng = np.random.default_rng(5)
    alpha = synthetic_logits(2, ALPHA_CLASSES, rng)
    beta = synthetic_logits(2, BETA_CLASSES, rng)
    assert _handle(app, binary(RESPONSE_TYPE, "1", response_body("alpha", alpha)))[0] == 200
    assert _handle(app, binary(RESPONSE_TYPE, "2", response_body("beta", beta, "2")))[0] == 200
    status, reply = _handle(app, binary(RESPONSE_TYPE, "3", response_body("beta", beta, "3")))
    assert status == 404 and "model 'beta' version '3'" in reply["error"]
    assert "alpha, beta" in reply["error"]
    status, reply = _handle(app, binary(RESPONSE_TYPE, "4", response_body("gamma", alpha)))
    assert status == 404 and reply["error"].startswith("Expected an event for a model")
    get = app.registry.get_sample_value
    assert get("oodmon_predictions_total", {"model": "alpha", "model_version": "v1"}) == 2
    assert get("oodmon_predictions_total", {"model": "beta", "model_version": "2"}) == 2
    assert get("oodmon_sidecar_rejected_total", {"reason": "unknown_model"}) == 2


# ---------------------------------------------------------------------- the real process


@dataclass
class Process:
    url: str
    queue: Path
    proc: subprocess.Popen[bytes]

    def post(self, message: tuple[dict[str, str], bytes]) -> tuple[int, dict[str, Any]]:
        headers, body = message
        request = urllib.request.Request(self.url + "/", body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        samples = {}
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith("#") or not line:
                continue
            match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
            assert match, line
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
        return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def sidecar_process(
    detector_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    queue = tmp_path_factory.mktemp("queue") / "labels.db"
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = prometheus_server.free_port()
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "oodmon.cli", "sidecar",
                "--detector", f"alpha={detector_files['alpha']}",
                "--detector", f"beta:2={detector_files['beta']}",
                "--addr", "127.0.0.1", "--port", str(port), "--queue", str(queue),
                "--max-body-bytes", "100000",
            ],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        process = Process(f"http://127.0.0.1:{port}", queue, proc)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if process.get("/ready")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        if proc.poll() is None:
            break
    else:
        output = proc.stdout.read().decode() if proc.stdout else ""
        pytest.fail(f"the sidecar did not start:\n{output}")
    yield process
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = proc.stdout.read().decode() if proc.stdout is not None else ""
    if proc.stdout is not None:
        proc.stdout.close()
    # SIGTERM is a graceful shutdown (uvicorn re-raises the signal once it is done)
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output


@pytest.mark.slow
def test_real_process_scores_both_models_both_modes_with_joins(
    sidecar_process: Process, detector_files: dict[str, Path]
) -> None:
    side = sidecar_process
    detectors = {name: Detector.load(path) for name, path in detector_files.items()}
    rng = np.random.default_rng(6)
    before = side.metrics()
    sent: dict[str, list[np.ndarray]] = {"alpha": [], "beta": []}
    expected_queue: dict[str, np.ndarray] = {}
    counts = {"request": 0, "response": 0}
    for i in range(12):
        model, k, version = ("alpha", ALPHA_CLASSES, None) if i % 2 else ("beta", BETA_CLASSES, "2")
        rows = 1 + i % 3
        logits = synthetic_logits(rows, k, rng, ood=(i % 3 == 0))
        inputs = rng.normal(size=(rows, 3)).astype(np.float32)
        make = binary if i % 4 < 2 else structured
        event_id = f"pair-{i}"
        request = make(REQUEST_TYPE, event_id, request_body(inputs))
        response = make(RESPONSE_TYPE, event_id, response_body(model, logits, version))
        order = [request, response] if i % 3 else [response, request]
        for message in order:
            status, reply = side.post(message)
            assert status in (200, 202), reply
            if status == 200:
                local = detectors[model].predict(logits).to_host()
                got = parse_response(reply).tensors
                np.testing.assert_array_equal(got["is_outlier"], local.flag)
                np.testing.assert_allclose(got["p_value"], local.p_value)
                np.testing.assert_allclose(got["distance"], local.distance, rtol=1e-12)
                assert reply["id"] == event_id
                assert reply["parameters"]["calibration_hash"] == detectors[model].calibration_hash_
                for row in np.flatnonzero(local.flag):
                    expected_queue[f"{event_id}/{row}"] = inputs[row]
        counts["request"] += 1
        counts["response"] += 1
        sent[model].append(logits)
    after = side.metrics()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for model, version in (("alpha", "v1"), ("beta", "2")):
        outputs = np.concatenate(sent[model])
        local = detectors[model].predict(outputs).to_host()
        labels = {"model": model, "model_version": version}
        assert delta("oodmon_predictions_total", **labels) == len(outputs)
        flagged = delta("oodmon_flagged_total", **labels, reason=detectors[model].score)
        assert flagged == int(local.flag.sum())
        assert delta("oodmon_p_value_count", **labels) == len(outputs)
    assert delta("oodmon_sidecar_events_total", type="request") == counts["request"]
    assert delta("oodmon_sidecar_events_total", type="response") == counts["response"]
    assert expected_queue, "the synthetic OOD rows should have been flagged"

    items = {item.id: item for item in _queued(side.queue, len(expected_queue))}
    assert set(items) >= set(expected_queue)
    for item_id, inputs in expected_queue.items():
        np.testing.assert_array_equal(items[item_id].input, inputs)  # queued WITH its input


BAD_INPUTS: list[tuple[str, Any, int, str]] = [
    ("malformed_json", lambda: ({**_bin_headers(), "content-type": "application/json"},
                                b"{oops"), 400, "not valid JSON"),
    ("missing_attribute", lambda: ({"content-type": "application/json"}, b"{}"), 400,
     "ce-specversion"),
    ("missing_attribute", lambda: ({k: v for k, v in _bin_headers().items() if k != "ce-id"},
                                   b"{}"), 400, "ce-id is missing"),
    ("unknown_type", lambda: (_bin_headers(type_="com.example.unknown"), b"{}"), 400,
     "com.example.unknown"),
    ("bad_payload", lambda: (_bin_headers(), json.dumps({"result": 1}).encode()), 400,
     '"outputs"'),
    ("bad_payload", lambda: (_bin_headers(), json.dumps({"model_name": "alpha", "outputs": [
        {"name": "logits", "shape": [2, 10], "datatype": "FP32", "data": [0.0] * 7}]}).encode()),
     400, "20 values"),
    ("bad_payload", lambda: (_bin_headers(), json.dumps({"model_name": "alpha", "outputs": [
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode()), 400,
     "BYTES"),
    ("wrong_width", lambda: binary(RESPONSE_TYPE, "w", response_body("alpha", np.zeros((1, 3)))),
     422, "10 columns"),
    ("wrong_shape", lambda: binary(RESPONSE_TYPE, "s", response_body(
        "alpha", np.zeros((1, 2, 10)))), 422, "shape [N, 10]"),
    ("nonfinite", lambda: binary(RESPONSE_TYPE, "n", response_body(
        "alpha", np.array([[np.nan] * 10, [1.0] * 10]))), 422, "NaN or inf"),
    ("unknown_model", lambda: binary(RESPONSE_TYPE, "u", response_body("gamma", np.zeros((1, 10)))),
     404, "'gamma'"),
    ("too_large", lambda: (_bin_headers(), b" " * 200_000), 413, "100000 bytes"),
]  # fmt: skip


def _bin_headers(type_: str = RESPONSE_TYPE) -> dict[str, str]:
    return {
        "ce-specversion": "1.0", "ce-id": "bad", "ce-source": "/t", "ce-type": type_,
        "content-type": "application/json",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("reason", "make", "status", "fragment"), BAD_INPUTS)
def test_real_process_refuses_bad_input_and_keeps_serving(
    sidecar_process: Process, reason: str, make: Any, status: int, fragment: str
) -> None:
    side = sidecar_process
    assert reason in REJECT_REASONS
    before = value(side.metrics(), "oodmon_sidecar_rejected_total", reason=reason)
    got, reply = side.post(make())
    assert got == status, reply
    assert set(reply) >= {"error"} and fragment in reply["error"], reply
    assert reply["error"].startswith("Expected")
    if reason == "nonfinite":  # the finite row was still scored and answered
        tensors = {t["name"]: t for t in reply["outputs"]}
        assert tensors["p_value"]["data"][0] is None and tensors["p_value"]["data"][1] > 0
    after = value(side.metrics(), "oodmon_sidecar_rejected_total", reason=reason)
    assert after == before + 1
    ok = binary(RESPONSE_TYPE, "good", response_body("alpha", np.eye(10, dtype=np.float32)[:1]))
    assert side.post(ok)[0] == 200  # and the next good event still works


@pytest.mark.slow
def test_real_process_probes_and_metrics_families(sidecar_process: Process) -> None:
    side = sidecar_process
    assert side.get("/healthz") == (200, '{"status":"ok"}')
    status, body = side.get("/ready")
    assert status == 200 and json.loads(body)["models"] == [["alpha", "v1"], ["beta", "2"]]
    assert side.get("/nope")[0] == 404
    from oodmon.metrics import METRIC_NAMES
    from oodmon.sidecar import SIDECAR_METRICS

    text = side.get("/metrics")[1]
    for name in (*METRIC_NAMES, *(spec[0] for spec in SIDECAR_METRICS)):
        assert f"# HELP {name} " in text, name
    lint = prometheus_server.run_promtool(["check", "metrics"], stdin=text.encode())
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_reply_url_receives_the_verdict_as_a_cloudevent() -> None:
    import http.server
    import threading

    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/verdicts"
    app = Sidecar([DetectorRoute(make_detector(ALPHA_CLASSES, 1), "alpha", "v1")], reply_url=url)
    try:
        logits = synthetic_logits(2, ALPHA_CLASSES, np.random.default_rng(7), ood=True)
        headers, body = binary(RESPONSE_TYPE, "fwd-1", response_body("alpha", logits))
        answer, forward = app.handle([(k.encode(), v.encode()) for k, v in headers.items()], body)
        assert answer.status == 200 and forward is not None
        app._forward(forward)  # what the ASGI path does after answering
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        ((sent_headers, sent_body),) = received
        assert sent_headers["ce-type"] == "io.seldon.serving.inference.outlier"
        assert sent_headers["ce-id"] == "fwd-1"
        assert json.loads(sent_body) == json.loads(answer.body)
    finally:
        app.close()
        server.shutdown()
        server.server_close()
    assert app.registry.get_sample_value("oodmon_sidecar_forwarded_total", {"outcome": "ok"}) == 1
