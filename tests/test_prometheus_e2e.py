"""End to end: a wrapped model feeds oodmon's exporter, a real Prometheus scrapes it, and every
dashboard query, template variable and rule works against the scraped data.

Needs Debian's ``prometheus`` package (server and promtool): skipped without it on a
workstation, failed without it under CI (see tests/prometheus_server.py).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import toy_classifier
from prometheus_client import CollectorRegistry
from prometheus_server import PrometheusServer, http_get, prometheus_server, run_promtool

from oodmon.metrics import METRIC_NAMES, PrometheusMetrics, serve
from oodmon.monitor import Monitor
from oodmon.sinks import InMemoryQueue
from oodmon.verdict import Observation
from oodmon.wrapping import wrap

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
MODEL, VERSION = "e2e-model", "v1"
ALPHA = 0.05
RATE_WINDOW = "5s"  # what $__rate_interval becomes (Grafana: at least 4 scrape intervals)
PHASE_SECONDS = 6.0  # longer than the rate window, so each phase has a window of its own
BATCH, PERIOD = 32, 0.05  # rows per forward pass, seconds between passes

pytestmark = pytest.mark.slow


def substitute(expr: str, rate_window: str = RATE_WINDOW) -> str:
    """Fill in the template variables as Grafana would for this model and version."""
    for variable, value in (
        ("$__rate_interval", rate_window),
        ("$__interval", "1s"),
        ("$__range", "30s"),
        ("$model_version", VERSION),
        ("$model", MODEL),
    ):
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


class Traffic:
    """Drives the wrapped model: forward passes of in- or out-of-distribution inputs."""

    def __init__(self, wrapped: torch.nn.Module, monitor: Monitor) -> None:
        self.wrapped, self.monitor = wrapped, monitor
        self.gen = torch.Generator().manual_seed(1)

    def run(self, scale: float, seconds: float, nan_batches: int = 0) -> float:
        """Send batches of ``scale * N(0, I)`` inputs for ``seconds``; return when it ended."""
        end = time.monotonic() + seconds
        sent = 0
        with torch.no_grad():
            while time.monotonic() < end:
                x = scale * torch.randn(BATCH, 8, generator=self.gen)
                if sent < nan_batches:
                    x[:2, 0] = float("nan")  # NaN outputs: counted as invalid
                self.wrapped(x)
                sent += 1
                time.sleep(PERIOD)
        assert self.monitor.flush(timeout=30)
        return time.time()


@pytest.fixture(scope="module")
def live() -> Iterator[dict[str, Any]]:
    """Exporter + Prometheus + traffic: an in-distribution phase, then an OOD phase."""
    model, detector = toy_classifier(alpha=ALPHA, calibration_rows=4000)
    registry = CollectorRegistry()
    callbacks: list[int] = []

    def flaky_labeller(flagged: Observation) -> None:  # one failure: a monitor error
        callbacks.append(len(flagged))
        if len(callbacks) == 1:
            raise ConnectionError("labelling service unreachable")

    monitor = Monitor(
        detector,
        MODEL,
        VERSION,
        metrics=PrometheusMetrics(registry),
        queue=InMemoryQueue(capacity=300),
        on_flag=flaky_labeller,
    )
    wrapped = wrap(model, monitor)
    exporter = serve(0, registry=registry)
    try:
        target = f"127.0.0.1:{exporter.port}"
        with prometheus_server([target], rule_files=[GRAFANA / "alerts.yml"]) as prom:
            prom.wait_for(
                "the first scrape",
                lambda: values(prom.query('up{job="oodmon"}')) == [1.0],
            )
            traffic = Traffic(wrapped, monitor)
            in_distribution_end = traffic.run(2.0, PHASE_SECONDS, nan_batches=3)
            time.sleep(1.5)  # let a scrape see the end of the first phase
            ood_end = traffic.run(0.01, PHASE_SECONDS)
            time.sleep(2.5)  # and of the second
            yield {
                "prom": prom,
                "exporter": exporter,
                "monitor": monitor,
                "in_distribution_end": in_distribution_end,
                "ood_end": ood_end,
            }
    finally:
        monitor.close()
        exporter.close()


def _flag_ratio_expr() -> str:
    board = json.loads((GRAFANA / "dashboards" / "oodmon.json").read_text())
    for panel in board["panels"]:
        for target in panel["targets"]:
            if "oodmon_flagged_total" in target["expr"] and "/" in target["expr"]:
                return str(target["expr"])
    raise AssertionError("no flag-ratio query on the dashboard")


def test_every_dashboard_query_returns_data(live: dict[str, Any]) -> None:
    prom: PrometheusServer = live["prom"]
    board = json.loads((GRAFANA / "dashboards" / "oodmon.json").read_text())
    empty = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            result = prom.query(expr, at=live["ood_end"])
            finite = [v for v in values(result) if math.isfinite(v)]
            if not finite:
                empty.append((panel["title"], target["refId"], expr, result))
    assert not empty, f"queries without data: {empty}"


def test_template_variables_list_the_model(live: dict[str, Any]) -> None:
    prom: PrometheusServer = live["prom"]
    board = json.loads((GRAFANA / "dashboards" / "oodmon.json").read_text())
    expected = {"model": MODEL, "model_version": VERSION}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = substitute(match.group(1)), match.group(2)
        found = prom.api(f"label/{label}/values", **{"match[]": selector})
        assert expected[variable["name"]] in found, (variable["name"], found)


def test_flag_ratio_reflects_the_ood_phase(live: dict[str, Any]) -> None:
    prom: PrometheusServer = live["prom"]
    expr = substitute(_flag_ratio_expr())
    (before,) = values(prom.query(expr, at=live["in_distribution_end"]))
    (after,) = values(prom.query(expr, at=live["ood_end"]))
    assert before < 3 * ALPHA, before  # in distribution: about alpha
    assert after > 0.8, after  # outputs at the OCS: nearly every row flagged
    alpha = values(prom.query(substitute(f'oodmon_alpha_ratio{{model="{MODEL}"}}')))
    assert alpha == [ALPHA]


def test_the_scrape_matches_the_monitor(live: dict[str, Any]) -> None:
    prom: PrometheusServer = live["prom"]
    stats = live["monitor"].stats()

    def scraped(name: str, extra: str = "") -> float:
        (value,) = values(prom.query(f'{name}{{model="{MODEL}",model_version="{VERSION}"{extra}}}'))
        return value

    assert scraped("oodmon_predictions_total") == stats.seen
    assert scraped("oodmon_flagged_total") == stats.flagged
    assert scraped("oodmon_invalid_outputs_total", ',reason="nonfinite"') == 6
    assert scraped("oodmon_p_value_count") == stats.seen - stats.invalid_total
    assert scraped("oodmon_monitor_errors_total", ',kind="ConnectionError"') == 1
    assert scraped("oodmon_label_queue_depth") == 300
    # the in-memory queue holds 300: the rest was refused at submit, so lost as buffer_full
    assert scraped("oodmon_label_queue_dropped_total", ',reason="buffer_full"') == (
        stats.flagged - 300
    )
    lost = values(prom.query(f'sum(oodmon_label_queue_dropped_total{{model="{MODEL}"}})'))
    assert lost == [stats.flagged - 300]  # no other reason lost a row


def test_every_exported_metric_reaches_prometheus(live: dict[str, Any]) -> None:
    names = set(live["prom"].api("label/__name__/values"))
    for name in METRIC_NAMES:
        assert name in names or f"{name}_count" in names, name


def test_rules_load_and_the_alerts_go_pending(live: dict[str, Any]) -> None:
    prom: PrometheusServer = live["prom"]
    groups = prom.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 9
    assert all(rule["health"] == "ok" for rule in rules), rules
    flag_ratio = "model_version:oodmon_flagged:rate5m / model_version:oodmon_p_value_count:rate5m"
    ratio = values(prom.query(flag_ratio))
    assert ratio and ratio[0] > 3 * ALPHA

    def active() -> set[str]:
        return {alert["labels"]["alertname"] for alert in prom.api("alerts")["alerts"]}

    expected = {"OodmonFlagRatioHigh", "OodmonMonitorErrors", "OodmonLabelQueueDrops"}
    prom.wait_for(f"alerts {expected} to become active", lambda: expected <= active(), 15)
    assert "OodmonTrafficStopped" not in active()


def test_promtool_accepts_the_live_exposition(live: dict[str, Any]) -> None:
    exposition = http_get(live["exporter"].url)
    assert b"oodmon_predictions_total" in exposition
    done = run_promtool(["check", "metrics"], stdin=exposition)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
