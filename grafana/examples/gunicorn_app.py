"""A WSGI model server whose oodmon metrics add up across gunicorn worker processes.

Each gunicorn worker is a separate process with its own counters. client_python's
multiprocess mode has every worker write its metrics to files in ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` (served by any worker) merges them, so a scrape sees the totals.

Run it with gunicorn (``pip install gunicorn``), from the repository root::

    export PROMETHEUS_MULTIPROC_DIR=/tmp/oodmon-metrics   # set before gunicorn starts
    gunicorn -c grafana/examples/gunicorn.conf.py --chdir grafana/examples gunicorn_app:app

or without gunicorn, one worker per command, all sharing the directory::

    PROMETHEUS_MULTIPROC_DIR=/tmp/oodmon-metrics python grafana/examples/gunicorn_app.py --port 8001

Endpoints: ``POST /predict`` with ``{"inputs": [[8 floats], ...]}`` returns the predicted
classes and the per-row OOD verdict; ``GET /metrics`` is the merged exposition for Prometheus;
``GET /healthz`` answers ``ok``. The model and detector are toys built from a fixed seed so that
every worker holds the same ones; a real service loads its model and
``oodmon.Detector.load("detector.json")`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Without it every worker would keep its own counters and each scrape would see one
    # worker's share at random.
    raise SystemExit("Set PROMETHEUS_MULTIPROC_DIR before starting the server (see docstring).")

import torch

from oodmon import OCS, Detector
from oodmon.metrics import PrometheusMetrics, make_wsgi_app
from oodmon.monitor import Monitor

MODEL_NAME = "toy-classifier"
MODEL_VERSION = "v1"
NUM_FEATURES = 8
NUM_CLASSES = 10
CLASS_COUNTS = [50, 30, 20, 10, 10, 5, 5, 5, 3, 2]


def build_model() -> tuple[torch.nn.Module, Detector]:
    """A linear classifier whose output at x = 0 is the OCS, and a detector calibrated on it."""
    generator = torch.Generator().manual_seed(0)
    ocs = OCS.cross_entropy(counts=CLASS_COUNTS)
    model = torch.nn.Linear(NUM_FEATURES, NUM_CLASSES)
    with torch.no_grad():
        model.weight.copy_(torch.randn(NUM_CLASSES, NUM_FEATURES, generator=generator))
        model.bias.copy_(ocs.log_target.to(torch.float32))
    model.eval()
    calibration_inputs = 2.0 * torch.randn(2000, NUM_FEATURES, generator=generator)
    with torch.no_grad():
        detector = Detector(ocs, alpha=0.05).fit(model(calibration_inputs))
    return model, detector


MODEL, DETECTOR = build_model()
METRICS = PrometheusMetrics()  # registers in prometheus_client's default registry
MONITOR = Monitor(DETECTOR, MODEL_NAME, MODEL_VERSION, metrics=METRICS)
METRICS_APP = make_wsgi_app()  # merges every worker's files (PROMETHEUS_MULTIPROC_DIR is set)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def predict(inputs: list[list[float]]) -> dict[str, Any]:
    """Run the model, and the monitor on its outputs; return classes and OOD verdicts."""
    x = torch.tensor(inputs, dtype=torch.float32).reshape(-1, NUM_FEATURES)
    with torch.no_grad():
        logits = MODEL(x)
    verdict = MONITOR.observe(logits)  # synchronous: the response carries the verdict
    if verdict is None:  # the batch could not be scored; it is counted in the metrics
        return {"predicted": logits.argmax(-1).tolist(), "ood": None, "p_value": None}
    p_values = [None if p != p else p for p in verdict.p_value.tolist()]  # NaN -> null
    return {
        "predicted": logits.argmax(-1).tolist(),
        "ood": verdict.flag.tolist(),
        "invalid": verdict.invalid.tolist(),
        "p_value": p_values,
    }


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI application gunicorn serves."""
    path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
    if path == "/metrics":
        return METRICS_APP(environ, start_response)  # type: ignore[no-any-return]
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    if path == "/predict" and method == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        try:
            request = json.loads(environ["wsgi.input"].read(length))
            body = json.dumps(predict(request["inputs"])).encode()
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [f"bad request: {err}\n".encode()]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


def main() -> None:
    """Serve one worker with wsgiref (for trying the example without gunicorn)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--addr", default="127.0.0.1")
    args = parser.parse_args()
    with make_server(args.addr, args.port, app, handler_class=QuietHandler) as server:
        print(f"serving on http://{args.addr}:{args.port} (pid {os.getpid()})", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
