"""oodmon.metrics: the Prometheus sink, batched histograms, exposition and multiprocess mode."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import toy_classifier
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from oodmon import OCS, Detector
from oodmon._batch_histogram import BatchHistogram
from oodmon.conformal import p_value_of_rank, p_values, score_cutoffs
from oodmon.metrics import (
    DEFAULT_DISTANCE_BUCKETS,
    DEFAULT_P_VALUE_BUCKETS,
    METRIC_NAMES,
    METRICS,
    PrometheusMetrics,
    child_exit,
    exposition_registry,
    make_asgi_app,
    make_wsgi_app,
    mark_process_dead,
    prepare_multiprocess_dir,
    serve,
)
from oodmon.monitor import Monitor
from oodmon.sinks import QUEUE_LOSS_REASONS, DetectorSummary, InMemoryQueue, MetricsSink
from oodmon.verdict import INVALID_REASONS, HostVerdict, Observation

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_APP = REPO / "grafana" / "examples" / "gunicorn_app.py"
EXAMPLE_CONF = REPO / "grafana" / "examples" / "gunicorn.conf.py"
LABELS = {"model": "clf", "model_version": "v1"}

# ---------------------------------------------------------------------- helpers


def summary(**changes: Any) -> DetectorSummary:
    fields: dict[str, Any] = {
        "model": "clf",
        "version": "v1",
        "score": "ocs_kl",
        "alpha": 0.05,
        "threshold": -0.7,
        "calibration_size": 999,
        "calibration_hash": "0123456789abcdef",
        "num_outputs": 10,
        "loss": "cross_entropy",
    }
    fields.update(changes)
    return DetectorSummary(**fields)


def observation(
    distance: np.ndarray,
    p_value: np.ndarray,
    invalid: np.ndarray | None = None,
    alpha: float = 0.05,
    reasons: dict[str, int] | None = None,
    seconds: float = 0.002,
) -> Observation:
    n = distance.shape[0]
    invalid = np.zeros(n, dtype=bool) if invalid is None else invalid
    verdict = HostVerdict(
        score=-distance,
        distance=distance,
        p_value=p_value,
        flag=(p_value <= alpha) & ~invalid,
        invalid=invalid,
        predicted=np.zeros(n, dtype=np.int64),
    )
    return Observation("clf", "v1", verdict, reasons or {}, scoring_seconds=seconds)


def histogram_samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    """{(sample name, sorted labels without model labels): value}, without _created."""
    out = {}
    for family in registry.collect():
        if family.name != name:
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in LABELS))
            out[(s.name[len(name) :], labels)] = s.value
    return out


def assert_same_histogram(batched: dict[tuple, float], looped: dict[tuple, float]) -> None:
    assert batched.keys() == looped.keys()
    for key, value in looped.items():
        if key[0] == "_sum":
            assert batched[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        else:
            assert batched[key] == value, key  # counts are exact


# ---------------------------------------------------------------------- the sink


def test_sink_implements_the_protocol() -> None:
    assert isinstance(PrometheusMetrics(CollectorRegistry()), MetricsSink)


def test_metric_names_are_every_registered_family_and_follow_conventions() -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(registry)
    families = {f.name: f.type for f in registry.collect()}
    exposed = {name + "_total" if kind == "counter" else name for name, kind in families.items()}
    assert exposed == set(METRIC_NAMES)
    for spec in METRICS:
        assert spec.name.startswith("oodmon_") and ":" not in spec.name
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        assert set(spec.labels) <= {
            "model",
            "model_version",
            "reason",
            "kind",
            "score",
            "loss",
            "calibration_size",
            "calibration_hash",
        }
        assert (spec.multiprocess_mode is not None) == (spec.type == "gauge"), spec.name


def test_describe_publishes_the_detector_and_creates_series_at_zero() -> None:
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.describe(summary())
    get = registry.get_sample_value
    assert get("oodmon_alpha_ratio", LABELS) == 0.05
    assert get("oodmon_score_threshold", LABELS) == -0.7
    info = {
        **LABELS,
        "score": "ocs_kl",
        "loss": "cross_entropy",
        "calibration_size": "999",
        "calibration_hash": "0123456789abcdef",
    }
    assert get("oodmon_detector_info", info) == 1.0
    # bounded series exist before any traffic, so rate() and alerts see the first increment
    assert get("oodmon_predictions_total", LABELS) == 0.0
    assert get("oodmon_flagged_total", {**LABELS, "reason": "ocs_kl"}) == 0.0
    for reason in INVALID_REASONS:
        assert get("oodmon_invalid_outputs_total", {**LABELS, "reason": reason}) == 0.0
    for reason in QUEUE_LOSS_REASONS:  # every loss reason exists at 0 before any loss
        assert get("oodmon_label_queue_dropped_total", {**LABELS, "reason": reason}) == 0.0
    assert get("oodmon_p_value_count", LABELS) == 0.0
    # no queue reported yet: no depth series (0 would claim an empty queue)
    assert get("oodmon_label_queue_depth", LABELS) is None


def test_recalibration_replaces_the_detector_info() -> None:
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.describe(summary())
    sink.describe(summary(calibration_hash="fedcba9876543210", calibration_size=5000, alpha=0.01))
    infos = [s for f in registry.collect() if f.name == "oodmon_detector_info" for s in f.samples]
    assert [(s.labels["calibration_hash"], s.value) for s in infos] == [("fedcba9876543210", 1.0)]
    assert registry.get_sample_value("oodmon_alpha_ratio", LABELS) == 0.01


def test_monitor_traffic_is_counted_like_monitor_stats() -> None:
    model, detector = toy_classifier()
    registry = CollectorRegistry()
    monitor = Monitor(detector, "clf", "v1", metrics=PrometheusMetrics(registry))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        monitor.observe(model(2.0 * torch.randn(300, 8, generator=gen)))  # in-distribution
        monitor.observe(model(0.01 * torch.randn(200, 8, generator=gen)))  # at the OCS
        nan_rows = model(torch.randn(7, 8, generator=gen))
    nan_rows[:3, 0] = float("nan")
    monitor.observe(nan_rows)
    monitor.observe(torch.randn(5, 4))  # a detector for another model: wrong width
    stats = monitor.stats()
    get = registry.get_sample_value

    assert get("oodmon_predictions_total", LABELS) == stats.seen == 512
    assert get("oodmon_flagged_total", {**LABELS, "reason": "ocs_kl"}) == stats.flagged
    assert stats.flagged >= 200  # every output at the OCS is flagged
    assert get("oodmon_invalid_outputs_total", {**LABELS, "reason": "nonfinite"}) == 3
    assert get("oodmon_invalid_outputs_total", {**LABELS, "reason": "wrong_width"}) == 5
    valid = stats.seen - stats.invalid_total
    assert get("oodmon_p_value_count", LABELS) == valid
    assert get("oodmon_ocs_distance_count", LABELS) == valid
    assert np.isfinite(get("oodmon_ocs_distance_sum", LABELS))  # NaN rows never observed
    assert np.isfinite(get("oodmon_p_value_sum", LABELS))
    assert get("oodmon_scoring_seconds_count", LABELS) == 4
    # outputs at the OCS have distance ~0: they fill the lowest bucket
    assert get("oodmon_ocs_distance_bucket", {**LABELS, "le": "0.01"}) >= 200


def test_histograms_match_reference_counts_of_valid_finite_rows() -> None:
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.describe(summary())
    distance = np.array([0.0, 0.001, 0.0011, 2.5, np.nan, 20.0, np.inf, 0.3])
    p_value = np.array([0.001, 0.05, 0.0501, 1.0, np.nan, 0.5, 0.2, 0.05])
    invalid = np.array([False, False, False, False, True, False, False, True])
    sink.record(observation(distance, p_value, invalid, reasons={"nonfinite": 2}))
    get = registry.get_sample_value
    kept_d = distance[~invalid & np.isfinite(distance)]
    kept_p = p_value[~invalid & np.isfinite(p_value)]
    for bound in DEFAULT_DISTANCE_BUCKETS:
        le = {**LABELS, "le": repr(float(bound))}
        assert get("oodmon_ocs_distance_bucket", le) == np.count_nonzero(kept_d <= bound)
    for bound in DEFAULT_P_VALUE_BUCKETS:
        le = {**LABELS, "le": repr(float(bound))}
        assert get("oodmon_p_value_bucket", le) == np.count_nonzero(kept_p <= bound)
    assert get("oodmon_ocs_distance_count", LABELS) == kept_d.size == 5
    assert get("oodmon_ocs_distance_sum", LABELS) == pytest.approx(kept_d.sum())
    assert get("oodmon_p_value_count", LABELS) == kept_p.size == 6
    assert get("oodmon_flagged_total", {**LABELS, "reason": "ocs_kl"}) == 2
    assert get("oodmon_predictions_total", LABELS) == 8


def test_errors_queue_and_unknown_reasons_stay_bounded() -> None:
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.record_error("clf", "v1", "RuntimeError")
    sink.record_error("clf", "v1", "RuntimeError")
    sink.record_queue("clf", "v1", depth=None, dropped=0)
    sink.record_queue("clf", "v1", depth=12, dropped=3)
    sink.record_queue("clf", "v1", depth=None, dropped=2)  # unknown depth keeps the last one
    sink.record_queue("clf", "v1", depth=None, dropped=4, reason="rejected")
    sink.record_queue("clf", "v1", depth=None, dropped=1, reason="no-such-reason")
    n = 4
    sink.record(observation(np.ones(n), np.ones(n), np.ones(n, bool), reasons={"weird": n}))
    get = registry.get_sample_value
    assert get("oodmon_monitor_errors_total", {**LABELS, "kind": "RuntimeError"}) == 2
    assert get("oodmon_label_queue_depth", LABELS) == 12
    dropped = {**LABELS, "reason": "buffer_full"}
    assert get("oodmon_label_queue_dropped_total", dropped) == 5
    assert get("oodmon_label_queue_dropped_total", {**LABELS, "reason": "rejected"}) == 4
    assert get("oodmon_label_queue_dropped_total", {**LABELS, "reason": "other"}) == 1
    assert get("oodmon_invalid_outputs_total", {**LABELS, "reason": "other"}) == n
    # never described: flags are counted under reason="unknown"
    assert get("oodmon_flagged_total", {**LABELS, "reason": "unknown"}) == 0


def test_monitor_reports_its_label_queue_and_errors() -> None:
    model, detector = toy_classifier()
    registry = CollectorRegistry()
    calls = []

    def flaky_callback(flagged: Observation) -> None:
        calls.append(len(flagged))
        if len(calls) == 1:
            raise RuntimeError("labelling service down")

    monitor = Monitor(
        detector,
        "clf",
        "v1",
        metrics=PrometheusMetrics(registry),
        queue=InMemoryQueue(capacity=50),
        on_flag=flaky_callback,
    )
    with torch.no_grad():
        monitor.observe(model(torch.zeros(40, 8)))
        monitor.observe(model(torch.zeros(40, 8)))
    get = registry.get_sample_value
    assert get("oodmon_label_queue_depth", LABELS) == 50
    assert get("oodmon_label_queue_dropped_total", {**LABELS, "reason": "buffer_full"}) == 30
    assert get("oodmon_monitor_errors_total", {**LABELS, "kind": "RuntimeError"}) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"distance_buckets": []},
        {"distance_buckets": [1.0, 0.5]},
        {"p_value_buckets": [0.1, 0.1]},
        {"scoring_seconds_buckets": [0.1, float("nan")]},
    ],
)
def test_bad_buckets_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        PrometheusMetrics(CollectorRegistry(), **kwargs)


def test_describe_refuses_something_else() -> None:
    with pytest.raises(ValueError, match="DetectorSummary"):
        PrometheusMetrics(CollectorRegistry()).describe({"model": "clf"})  # type: ignore[arg-type]


def test_custom_buckets_are_used() -> None:
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry, distance_buckets=[1, 10, 100])
    sink.record(observation(np.array([5.0, 50.0]), np.array([0.5, 0.5])))
    assert registry.get_sample_value("oodmon_ocs_distance_bucket", {**LABELS, "le": "10.0"}) == 1


# ---------------------------------------------------------------------- batched histograms

BOUNDS = [0.001, 0.05, 0.1, 0.5, 1.0, 2.5]
edge_values = st.sampled_from(
    [
        *BOUNDS,
        *np.nextafter(BOUNDS, -1.0),
        *np.nextafter(BOUNDS, 9.0),
        0.0,
        -0.0,
        -1.0,
        1e9,
        float("inf"),
    ]
)
values_strategy = st.lists(
    st.one_of(edge_values, st.floats(-2.0, 5.0, allow_nan=False)), min_size=0, max_size=300
)


def _pair(mode: str) -> tuple[CollectorRegistry, Any, Any]:
    """A batched and a plain histogram with the same buckets, in one registry."""
    registry = CollectorRegistry()
    batched = BatchHistogram(
        "b", "batched", ["model", "model_version"], registry=registry, buckets=BOUNDS
    ).labels("clf", "v1")
    looped = Histogram(
        "l", "looped", ["model", "model_version"], registry=registry, buckets=BOUNDS
    ).labels("clf", "v1")
    batched.mode = mode
    return registry, batched, looped


@pytest.mark.parametrize("mode", ["memory", "values", "observe"])
@settings(max_examples=60, deadline=None)
@given(batches=st.lists(values_strategy, min_size=1, max_size=4))
def test_batched_histogram_equals_per_sample_observe(mode: str, batches: list[list[float]]) -> None:
    registry, batched, looped = _pair(mode)
    for i, batch in enumerate(batches):
        values = np.asarray(batch, dtype=np.float64)
        batched.observe_batch(values)
        if i == 0 and batch:
            batched.observe(batch[0])  # single observations mix with batches
            looped.observe(batch[0])
        for value in batch:
            looped.observe(value)
    assert_same_histogram(histogram_samples(registry, "b"), histogram_samples(registry, "l"))
    text = generate_latest(registry).decode()
    assert text.count("b_bucket{") == text.count("l_bucket{") == len(BOUNDS) + 1


def test_this_client_gets_the_fast_path() -> None:
    """An upgrade that changes the Histogram internals fails here, not on a dashboard."""
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.describe(summary())
    series = sink._series[("clf", "v1")]
    assert series.distance.mode == series.p_value.mode == "memory"


@pytest.mark.parametrize("path", ["one sort", "two sorts"])
def test_update_cost_is_a_constant_number_of_python_calls(path: str) -> None:
    """The per-batch update makes the same number of Python-level calls at any batch size,
    on both ways of filling the p-value histogram (OCS score: one sort; other: two)."""
    n_calibration = 999
    cal = torch.sort(torch.randn(n_calibration, dtype=torch.float64)).values
    sink = PrometheusMetrics(CollectorRegistry())
    score = "ocs_kl" if path == "one sort" else "energy"
    sink.describe(summary(score=score, calibration_scores=cal))
    assert (sink._series[("clf", "v1")].p_cutoffs is not None) == (path == "one sort")
    rng = np.random.default_rng(0)

    def calls(n: int) -> int:
        # conformal p-values (1 + k) / (n + 1), as the detector computes them
        k = rng.integers(0, n_calibration, n)
        p_value = p_values(cal[torch.from_numpy(k)], cal).numpy()
        p_value[0] = 10 / (n_calibration + 1)  # one flag in every batch: the same branches run
        obs = observation(rng.gamma(2.0, 1.0, n), p_value)
        count = 0

        def profiler(frame: Any, event: str, arg: Any) -> None:
            nonlocal count
            count += event in ("call", "c_call")

        # garbage from earlier tests must not run finalisers (Python calls) inside the count
        gc.collect()
        gc.disable()
        sys.setprofile(profiler)
        try:
            sink.record(obs)
        finally:
            sys.setprofile(None)
            gc.enable()
        return count

    calls(1)  # warm caches
    counts = {n: calls(n) for n in (1, 64, 4096, 65536)}
    assert len(set(counts.values())) == 1, counts


def test_batched_histogram_in_multiprocess_mode(tmp_path: Path) -> None:
    """In a process with PROMETHEUS_MULTIPROC_DIR set, batches land in the mmap files exactly."""
    rng = np.random.default_rng(3)
    batches = [rng.gamma(1.0, 0.3, size=n).round(3).tolist() for n in (1, 17, 500)]
    batches.append([*BOUNDS, 5.0, 0.0])
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from prometheus_client import CollectorRegistry, Histogram
        from oodmon._batch_histogram import BatchHistogram
        batches = json.loads(sys.argv[1])
        reg = CollectorRegistry()
        b = BatchHistogram("b", "batched", ["m"], registry=reg, buckets={BOUNDS!r}).labels("x")
        l = Histogram("l", "looped", ["m"], registry=reg, buckets={BOUNDS!r}).labels("x")
        for batch in batches:
            b.observe_batch(np.asarray(batch, dtype=np.float64))
            for v in batch:
                l.observe(v)
        print(b.mode)
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(batches)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "values"
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(tmp_path))
    batched, looped = histogram_samples(merged, "b"), histogram_samples(merged, "l")
    assert_same_histogram(batched, looped)
    assert batched[("_count", (("m", "x"),))] == sum(len(b) for b in batches)


# ---------------------------------------------------------------------- exposition


def test_serve_binds_loopback_by_default_and_stops(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.describe(summary())
    server = serve(0, registry=registry)
    try:
        assert server.addr == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
        assert 'oodmon_alpha_ratio{model="clf",model_version="v1"} 0.05' in body
    finally:
        server.close()
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


@pytest.mark.parametrize("port", [-1, 70000, 1.5, True])
def test_serve_refuses_bad_ports(port: Any) -> None:
    with pytest.raises(ValueError, match="port"):
        serve(port)


def test_serve_on_a_busy_port_names_the_address() -> None:
    registry = CollectorRegistry()
    with serve(0, registry=registry) as first:
        with pytest.raises(OSError) as info:
            serve(first.port, registry=registry)
        assert f"Cannot serve metrics on 127.0.0.1:{first.port}: " in str(info.value)
        assert info.value.errno == errno.EADDRINUSE and "choose another port" in str(info.value)


def test_wsgi_app_serves_the_registry() -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(registry).describe(summary())
    app = make_wsgi_app(registry)
    status: list[str] = []
    body = b"".join(
        app(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
            lambda s, headers: status.append(s),
        )
    )
    assert status == ["200 OK"]
    assert b"oodmon_detector_info{" in body


def test_asgi_app_serves_the_registry() -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(registry).describe(summary())
    app = make_asgi_app(registry)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/metrics",
        "headers": [],
        "query_string": b"",
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    assert b"oodmon_alpha_ratio{" in sent[1]["body"]


def test_exposition_registry_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = CollectorRegistry()
    assert exposition_registry(mine) is mine
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    from prometheus_client import REGISTRY

    assert exposition_registry() is REGISTRY
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    merged = exposition_registry()
    assert merged is not REGISTRY
    assert list(merged.collect()) == []  # reads the (empty) directory


# ---------------------------------------------------------------------- multiprocess mode


def test_prepare_multiprocess_dir_and_child_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "metrics"
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        prepare_multiprocess_dir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    assert prepare_multiprocess_dir() == directory and directory.is_dir()
    for name in (
        "counter_41.db",
        "histogram_41.db",
        "gauge_livemax_41.db",
        "gauge_livemostrecent_41.db",
        "gauge_livemax_42.db",
    ):
        (directory / name).write_bytes(b"")
    (directory / "keep.txt").write_text("not a metrics file")

    child_exit(None, type("Worker", (), {"pid": 41})())
    left = sorted(p.name for p in directory.iterdir())
    assert left == ["counter_41.db", "gauge_livemax_42.db", "histogram_41.db", "keep.txt"]
    mark_process_dead(42, directory)
    assert "gauge_livemax_42.db" not in {p.name for p in directory.iterdir()}

    prepare_multiprocess_dir()  # a new run starts clean
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]


def test_gunicorn_config_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "counter_7.db").write_bytes(b"")
    conf = runpy.run_path(str(EXAMPLE_CONF))
    assert conf["bind"].startswith("127.0.0.1:")
    conf["on_starting"](None)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "gauge_livemostrecent_7.db").write_bytes(b"")
    conf["child_exit"](None, type("Worker", (), {"pid": 7})())
    assert list(tmp_path.iterdir()) == []


def _post(port: int, inputs: list[list[float]]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=json.dumps({"inputs": inputs}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker exited: {process.communicate()[1]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise AssertionError("worker did not become healthy")


@pytest.mark.slow
def test_worker_processes_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    """Two worker processes of the example app feed one directory; any scrape sees the sums."""
    from prometheus_server import free_port

    directory = tmp_path / "multiproc"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    env.pop("prometheus_multiproc_dir", None)
    prepare_multiprocess_dir(directory)
    ports = [free_port(), free_port()]
    workers = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE_APP), "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    try:
        for port, worker in zip(ports, workers, strict=True):
            _wait_healthy(port, worker)
        rng = np.random.default_rng(0)
        rows = flagged = invalid = 0
        requests = [(0, 2.0, 40), (1, 2.0, 25), (0, 0.01, 30), (1, 0.01, 11), (0, 2.0, 1)]
        for worker, scale, n in requests:
            response = _post(ports[worker], (scale * rng.standard_normal((n, 8))).tolist())
            rows += n
            flagged += sum(response["ood"])
        nan_inputs = rng.standard_normal((4, 8)).tolist()
        nan_inputs[0][0] = float("nan")
        response = _post(ports[1], nan_inputs)
        rows, invalid = rows + 4, invalid + sum(response["invalid"])
        flagged += sum(response["ood"])
        assert flagged >= 41 and invalid == 1  # the OCS-like requests are flagged

        labels = (("model", "toy-classifier"), ("model_version", "v1"))
        scrapes = [_scrape(port) for port in ports]
        assert scrapes[0] == scrapes[1]  # any worker serves the merged view
        merged = scrapes[0]
        assert merged[("oodmon_predictions_total", labels)] == rows
        assert merged[("oodmon_flagged_total", (*labels, ("reason", "ocs_kl")))] == flagged
        assert merged[("oodmon_invalid_outputs_total", (*labels, ("reason", "nonfinite")))] == 1
        assert merged[("oodmon_p_value_count", labels)] == rows - invalid
        assert merged[("oodmon_ocs_distance_count", labels)] == rows - invalid
        inf_bucket = ("oodmon_ocs_distance_bucket", (("le", "+Inf"), *labels))
        assert merged[inf_bucket] == rows - invalid
        assert merged[("oodmon_scoring_seconds_count", labels)] == len(requests) + 1
        # gauges are merged, not repeated per worker
        assert merged[("oodmon_alpha_ratio", labels)] == 0.05
        infos = [k for k in merged if k[0] == "oodmon_detector_info"]
        assert len(infos) == 1 and merged[infos[0]] == 1.0

        # a worker dies: its counts stay (totals never go backwards), its live gauges go
        workers[1].terminate()
        workers[1].wait(timeout=30)
        mark_process_dead(workers[1].pid, directory)
        after = _scrape(ports[0])
        assert after[("oodmon_predictions_total", labels)] == rows
        assert after[("oodmon_detector_info", infos[0][1])] == 1.0  # worker 0 still lives
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
            try:
                worker.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.communicate()


@pytest.mark.parametrize("score", ["ocs_kl", "energy"])
@pytest.mark.parametrize("n_calibration", [19, 199, 1000])
def test_one_sort_histograms_equal_per_sample_observation(score: str, n_calibration: int) -> None:
    """With an OCS score the sink counts p-values from the sorted distances
    (conformal.score_cutoffs); every bucket must equal a per-sample Histogram's, including
    p-values that fall exactly on bucket bounds (n + 1 = 20, 200, 1001) and scores tied with
    calibration scores. The energy score counts p-values from the verdicts' calibration
    ranks instead: the same result."""
    gen = torch.Generator().manual_seed(n_calibration)
    ocs = OCS.cross_entropy(counts=[40, 30, 20, 10])
    cal_logits = torch.randn(n_calibration, 4, generator=gen) * 3
    detector = Detector(ocs, score=score, alpha=0.05).fit(cal_logits)
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    monitor = Monitor(detector, "m", "1", metrics=sink)
    series = sink._series[("m", "1")]
    assert (series.p_cutoffs is not None) == (score == "ocs_kl")
    assert (series.p_bucket_of_rank is not None) == (score == "energy")

    batches = [
        cal_logits[: n_calibration // 2],  # ties with calibration scores
        torch.randn(300, 4, generator=gen) * 3,
        ocs.log_target.float().expand(50, 4) + 0.01 * torch.randn(50, 4, generator=gen),
        torch.cat([torch.randn(5, 4, generator=gen), torch.full((2, 4), float("nan"))]),
    ]
    reference = CollectorRegistry()
    ref_distance = Histogram("ref_d", "d", buckets=DEFAULT_DISTANCE_BUCKETS, registry=reference)
    ref_p = Histogram("ref_p", "p", buckets=DEFAULT_P_VALUE_BUCKETS, registry=reference)
    for batch in batches:
        verdict = monitor.observe(batch)
        assert verdict is not None
        valid = ~verdict.invalid
        for d, p in zip(verdict.distance[valid].tolist(), verdict.p_value[valid].tolist(),
                        strict=True):  # fmt: skip
            ref_distance.observe(d)
            ref_p.observe(p)
    on_bounds = sum(
        int((monitor.detector.predict(b).p_value == e).sum())
        for b in batches
        for e in DEFAULT_P_VALUE_BUCKETS
    )
    if n_calibration == 19:
        assert on_bounds > 0  # the test really exercises p-values equal to a bound
    got_d = histogram_samples(registry, "oodmon_ocs_distance")
    got_p = histogram_samples(registry, "oodmon_p_value")
    want_d = {(k[0], k[1]): v for k, v in histogram_samples(reference, "ref_d").items()}
    want_p = {(k[0], k[1]): v for k, v in histogram_samples(reference, "ref_p").items()}
    assert_same_histogram(got_d, want_d)
    assert_same_histogram(got_p, want_p)


def test_ranks_of_another_calibration_fall_back_to_sorting_the_p_values() -> None:
    # a detector swapped without describe(), or a verdict built by hand: never miscounted
    registry = CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.describe(summary(score="energy", calibration_size=19))
    reference = Histogram("ref_p", "p", buckets=DEFAULT_P_VALUE_BUCKETS, registry=registry)
    cases = [
        (p_value_of_rank(19)[[9, 19, 0]], [9, 19, 0]),  # this calibration: counted by rank
        (p_value_of_rank(99)[[9, 90]], [9, 90]),  # ranks of 99 scores: beyond the table
        (p_value_of_rank(24)[[3, 17]], [3, 17]),  # ranks of 24 scores: inside, wrong p
        (np.array([0.5, 0.05]), None),  # no ranks at all
    ]
    for p_value, rank in cases:
        obs = observation(np.array([0.5] * len(p_value)), p_value)
        rank_array = None if rank is None else np.array(rank)
        verdict = HostVerdict(**{**vars(obs.verdict), "calibration_rank": rank_array})
        sink.record(Observation("clf", "v1", verdict))
        for p in p_value.tolist():
            reference.observe(p)
    got = histogram_samples(registry, "oodmon_p_value")
    want = {(k[0], k[1]): v for k, v in histogram_samples(registry, "ref_p").items()}
    assert_same_histogram(got, want)
    assert want[("_count", ())] == 9


def test_score_cutoffs_agree_with_p_values() -> None:
    cal = torch.sort(torch.randn(49, dtype=torch.float64)).values
    cal[10:13] = cal[10]  # ties inside the calibration set
    edges = [0.0, 0.01, 0.02, 0.05, 0.1, 0.5, 0.99, 1.0, float("inf")]
    cutoffs = score_cutoffs(cal, edges)
    extremes = torch.tensor([-1e300, 1e300], dtype=torch.float64)
    scores = torch.cat([cal, cal + 1e-12, cal - 1e-12, extremes])
    p = p_values(scores, cal)
    for edge, cutoff in zip(edges, cutoffs, strict=True):
        assert torch.equal(p <= edge, scores > cutoff), edge


def _record_corner_cases(score: str, registry: CollectorRegistry) -> str:
    """Feed a sink every corner of histogram filling, and per-sample reference histograms
    (``ref_d``, ``ref_p``) the valid finite values; returns how the sink filled them.

    Calibration has 19 scores, so p-values are multiples of 1/20 and land exactly on bounds.
    Batches: ties with calibration scores, plain traffic, outputs at the OCS, NaN and inf
    rows, an empty batch, an all-invalid batch; for a non-OCS score (whose p-values are
    counted from the verdicts' calibration ranks, or sorted when a verdict has none) also a
    verdict without ranks: valid rows with inf/NaN values and p-values that are no conformal
    p-values.
    """
    gen = torch.Generator().manual_seed(7)
    ocs = OCS.cross_entropy(counts=[40, 30, 20, 10])
    cal_logits = torch.randn(19, 4, generator=gen) * 3
    detector = Detector(ocs, score=score, alpha=0.05).fit(cal_logits)
    sink = PrometheusMetrics(registry)
    monitor = Monitor(detector, "m", "1", metrics=sink)
    ref_d = Histogram("ref_d", "d", buckets=DEFAULT_DISTANCE_BUCKETS, registry=registry)
    ref_p = Histogram("ref_p", "p", buckets=DEFAULT_P_VALUE_BUCKETS, registry=registry)

    def reference(distance: np.ndarray, p_value: np.ndarray, invalid: np.ndarray) -> None:
        for d in distance[~invalid & np.isfinite(distance)].tolist():
            ref_d.observe(d)
        for p in p_value[~invalid & np.isfinite(p_value)].tolist():
            ref_p.observe(p)

    inf_row = torch.tensor([[float("inf"), 0.0, 0.0, 0.0]])
    batches = [
        cal_logits,  # ties with calibration scores
        torch.randn(200, 4, generator=gen) * 3,
        ocs.log_target.float().expand(20, 4) + 0.01 * torch.randn(20, 4, generator=gen),
        torch.cat([torch.randn(5, 4, generator=gen), torch.full((2, 4), float("nan")), inf_row]),
        torch.empty(0, 4),
        torch.full((3, 4), float("nan")),
    ]
    on_bounds = 0
    for batch in batches:
        verdict = monitor.observe(batch)
        assert verdict is not None
        host = verdict.to_host()
        reference(host.distance, host.p_value, host.invalid)
        on_bounds += int(np.isin(host.p_value[~host.invalid], DEFAULT_P_VALUE_BUCKETS).sum())
    assert on_bounds > 0  # p-values exactly on bucket bounds really occur
    series = sink._series[("m", "1")]
    if series.p_cutoffs is None:  # values a detector never gives, on the two-sort path
        distance = np.array([0.001, np.inf, np.nan, 0.0, 14.0, 1e300, 0.3])
        p_value = np.array([0.05, 0.1, np.nan, np.inf, 1.0, 0.05 + 1e-12, 0.3])
        invalid = np.array([False, False, False, False, False, False, True])
        verdict = HostVerdict(
            score=-distance,
            distance=distance,
            p_value=p_value,
            flag=np.zeros(7, dtype=bool),
            invalid=invalid,
            predicted=np.zeros(7, dtype=np.int64),
        )
        sink.record(Observation("m", "1", verdict, {"nonfinite": 1}))
        reference(distance, p_value, invalid)
    # the Monitor's verdicts carry calibration ranks; the hand-made one above does not
    path = "one sort" if series.p_cutoffs is not None else "ranks, then two sorts"
    return f"{path} {series.distance.mode} {series.p_value.mode}"


def _assert_sink_matches_reference(registry: Any) -> None:
    for name, ref in (("oodmon_ocs_distance", "ref_d"), ("oodmon_p_value", "ref_p")):
        got, want = histogram_samples(registry, name), histogram_samples(registry, ref)
        assert_same_histogram(got, want)
        assert want[("_count", ())] > 0


@pytest.mark.parametrize("score", ["ocs_kl", "energy"])
def test_sink_histograms_equal_per_sample_observe_single_process(score: str) -> None:
    registry = CollectorRegistry()
    how = _record_corner_cases(score, registry)
    assert how == ("one sort" if score == "ocs_kl" else "ranks, then two sorts") + " memory memory"
    _assert_sink_matches_reference(registry)


@pytest.mark.parametrize("score", ["ocs_kl", "energy"])
def test_sink_histograms_equal_per_sample_observe_multiprocess(score: str, tmp_path: Path) -> None:
    """In multiprocess mode every count goes to the worker's files: the same values."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from prometheus_client import CollectorRegistry
        from test_metrics import _record_corner_cases
        print(_record_corner_cases({score!r}, CollectorRegistry()))
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    env.pop("prometheus_multiproc_dir", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    path = "one sort" if score == "ocs_kl" else "ranks, then two sorts"
    assert done.stdout.strip().splitlines()[-1] == f"{path} values values"
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(tmp_path))
    _assert_sink_matches_reference(merged)
