"""deploy/kserve/ agrees with the sidecar: the logger URL, ports, probe and scrape paths."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml

from oodmon import OCS, Detector
from oodmon.cli.main import build_parser
from oodmon.sidecar import DetectorRoute, Sidecar, parse_detector_spec

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kserve"


def load(name: str) -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    return {doc["kind"]: doc for doc in documents}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {**load("inferenceservice.yaml"), **load("sidecar.yaml")}


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def sidecar_args(manifests: dict[str, dict[str, Any]]) -> Any:
    spec = container(manifests)
    assert spec["command"] == ["oodmon"]
    return build_parser().parse_args(spec["args"])  # the real CLI parses them


def get(app: Sidecar, method: str, path: str) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    asyncio.run(app(scope, receive, send))
    return int(sent[0]["status"])


def test_logger_sends_everything_to_the_sidecar_service(manifests: dict[str, Any]) -> None:
    logger = manifests["InferenceService"]["spec"]["predictor"]["logger"]
    assert logger["mode"] == "all"  # requests too, so flagged rows keep their inputs
    url = urlsplit(logger["url"])
    service = manifests["Service"]
    host = url.hostname or ""
    assert host.split(".")[0] == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    assert url.path in ("", "/")  # the sidecar receives events on POST /


def test_service_targets_the_port_the_sidecar_listens_on(manifests: dict[str, Any]) -> None:
    args = sidecar_args(manifests)
    assert args.command == "sidecar" and args.addr == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container(manifests)["ports"]}
    (service_port,) = manifests["Service"]["spec"]["ports"]
    assert ports[service_port["targetPort"]] == args.port
    annotations = manifests["Service"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args.port
    selector = manifests["Service"]["spec"]["selector"]
    assert manifests["Deployment"]["spec"]["template"]["metadata"]["labels"].items() >= (
        selector.items()
    )


def test_detector_is_routed_to_the_inference_service_model(manifests: dict[str, Any]) -> None:
    args = sidecar_args(manifests)
    (spec,) = args.detector
    model, _, path = parse_detector_spec(spec)
    assert model == manifests["InferenceService"]["metadata"]["name"]
    mount = container(manifests)["volumeMounts"][0]["mountPath"]
    assert path.startswith(mount + "/")


def test_probe_and_scrape_paths_are_served(manifests: dict[str, Any]) -> None:
    spec = container(manifests)
    rng = np.random.default_rng(0)
    detector = Detector(OCS.cross_entropy(counts=[1, 1, 1])).fit(rng.normal(size=(100, 3)))
    app = Sidecar([DetectorRoute(detector, "my-model", "v1")])
    try:
        app._ready = True  # as after the server's startup event
        paths = [
            spec["readinessProbe"]["httpGet"]["path"],
            spec["livenessProbe"]["httpGet"]["path"],
            manifests["Service"]["metadata"]["annotations"]["prometheus.io/path"],
        ]
        for path in paths:
            assert get(app, "GET", path) == 200, path
        assert get(app, "GET", "/not-a-path") == 404  # the check can fail
    finally:
        app.close()
