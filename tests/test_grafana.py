"""grafana/: the dashboard, provisioning files and Prometheus rules are valid and consistent.

The dashboard and the rules may only use metrics the exporter defines (or recording rules
defined in alerts.yml); promtool validates and unit-tests the rules. The end-to-end test in
test_prometheus_e2e.py runs every dashboard query against a live Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_server import run_promtool

from oodmon.metrics import METRIC_NAMES, METRICS

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "oodmon.json"
ALERTS = GRAFANA / "alerts.yml"
ALERTS_TEST = GRAFANA / "alerts_test.yml"
PROMETHEUS_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# ---------------------------------------------------------------------- PromQL names

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (strings, matchers, ranges and grouping removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def exported_sample_names() -> set[str]:
    """Every series name the exporter can expose (histograms with their suffixes)."""
    names = set()
    for spec in METRICS:
        names.add(spec.name)
        if spec.type == "histogram":
            names.update(spec.name + suffix for suffix in _HISTOGRAM_SUFFIXES)
    return names


def _rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(ALERTS.read_text())["groups"])


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _rule_groups() for rule in group["rules"]]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_promql_name_extraction() -> None:
    expr = (
        'sum by (model, le) (rate(oodmon_x_bucket{model=~"$model", le!="1"}[$__rate_interval]))'
        " / on (model) group_left level:oodmon_y:rate5m > 3 * max(oodmon_alpha_ratio offset 5m)"
        " and 1e-3 < histogram_quantile(0.5, foo) unless bool inf"
    )
    assert promql_metric_names(expr) == {
        "oodmon_x_bucket",
        "level:oodmon_y:rate5m",
        "oodmon_alpha_ratio",
        "foo",
    }


def test_every_metric_in_dashboard_and_rules_is_defined_by_the_exporter() -> None:
    exported = exported_sample_names()
    recorded = recording_rule_names()
    used: dict[str, str] = {}
    for title, target in dashboard_targets():
        for name in promql_metric_names(target["expr"]):
            used[name] = f"dashboard panel {title!r}"
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            for name in promql_metric_names(_label_values_selector(variable["definition"])):
                used[name] = f"dashboard variable {variable['name']!r}"
    for rule in _rules():
        for name in promql_metric_names(rule["expr"]):
            used[name] = f"rule {rule.get('alert') or rule.get('record')!r}"
    assert used, "no metric names found: the extractor is broken"
    unknown = {
        name: where for name, where in used.items() if name not in exported and name not in recorded
    }
    assert not unknown, f"metrics the exporter does not define: {unknown}"
    # a recording rule's metric part (level:metric:operations) must be an exported metric too
    for name in recorded:
        level, metric, operations = name.split(":")
        assert level and operations, name
        assert metric in exported or metric + "_total" in exported, name


def test_every_exported_metric_is_on_the_dashboard() -> None:
    on_dashboard = set()
    for _, target in dashboard_targets():
        for name in promql_metric_names(target["expr"]):
            on_dashboard.add(name)
            on_dashboard.add(re.sub(r"_(bucket|sum|count)$", "", name))
    missing = set(METRIC_NAMES) - on_dashboard
    assert not missing, f"exported but never shown: {missing}"


# ---------------------------------------------------------------------- the dashboard


def _label_values_selector(definition: str) -> str:
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
    assert match, definition
    return match.group(1)


def test_dashboard_is_provisionable() -> None:
    text = DASHBOARD.read_text()
    board = json.loads(text)
    assert board["uid"] == "oodmon-overview"  # stable: links and provisioning rely on it
    assert board["id"] is None
    assert board["schemaVersion"] >= 39
    assert "__inputs" not in board and "${DS_" not in text and "__requires" not in board
    assert board["title"] and board["panels"]


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(variables) == {"datasource", "model", "model_version"}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for name in ("model", "model_version"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == PROMETHEUS_DATASOURCE
        assert variable["definition"].startswith("label_values(")
        assert variable["definition"].endswith(f", {name})")
        assert variable["query"]["query"] == variable["definition"]
    assert '{model=~"$model"}' in variables["model_version"]["definition"]


def test_every_panel_uses_the_datasource_variable_and_the_filters() -> None:
    for panel in dashboard()["panels"]:
        assert panel["datasource"] == PROMETHEUS_DATASOURCE, panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == PROMETHEUS_DATASOURCE, panel["title"]
            expr = target["expr"]
            selectors = re.findall(r"oodmon_\w+(\{[^}]*\})?", expr)
            assert selectors and all(
                'model=~"$model"' in s and 'model_version=~"$model_version"' in s for s in selectors
            ), (panel["title"], expr)


def test_panels_cover_the_issue_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}

    def panel_using(*needles: str, kind: str | None = None) -> str:
        for panel in panels:
            if all(n in exprs[panel["title"]] for n in needles) and kind in (None, panel["type"]):
                return str(panel["title"])
        raise AssertionError(f"no {kind or ''} panel uses {needles}")

    panel_using("oodmon_predictions_total")  # traffic
    panel_using("oodmon_flagged_total", "oodmon_p_value_count", "oodmon_alpha_ratio")
    panel_using("oodmon_ocs_distance_bucket", kind="heatmap")
    panel_using("oodmon_p_value_bucket")
    panel_using("oodmon_invalid_outputs_total", "oodmon_monitor_errors_total")
    panel_using("oodmon_label_queue_depth", "oodmon_label_queue_dropped_total")
    scoring = panel_using("oodmon_scoring_seconds_bucket")
    assert (
        "histogram_quantile(0.5" in exprs[scoring] and "histogram_quantile(0.99" in exprs[scoring]
    )
    panel_using("oodmon_detector_info", kind="table")
    for panel in panels:
        if panel["type"] == "heatmap":
            assert all(t["format"] == "heatmap" for t in panel["targets"]), panel["title"]


# ---------------------------------------------------------------------- provisioning


def test_provisioning_files() -> None:
    dashboards = yaml.safe_load((GRAFANA / "provisioning/dashboards/oodmon.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    sources = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/oodmon-prometheus.yaml").read_text()
    )
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    assert source["access"] == "proxy"


# ---------------------------------------------------------------------- rules


def test_rules_follow_conventions() -> None:
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert set(alerts) == {
        "OodmonFlagRatioHigh",
        "OodmonInvalidOutputs",
        "OodmonMonitorErrors",
        "OodmonMonitorBacklogFull",
        "OodmonLabelQueueDrops",
        "OodmonTrafficStopped",
    }
    for name, rule in alerts.items():
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    assert "oodmon_alpha_ratio" in alerts["OodmonFlagRatioHigh"]["expr"]
    for name in recording_rule_names():
        assert name.count(":") == 2, f"{name}: recording rules are named level:metric:operations"


def test_promtool_checks_the_rules() -> None:
    done = run_promtool(["check", "rules", str(ALERTS)])
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert b"SUCCESS: 9 rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = run_promtool(["test", "rules", str(ALERTS_TEST)])
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        (
            "3 * max by (model, model_version) (oodmon_alpha_ratio)",
            "30 * max by (model, model_version) (oodmon_alpha_ratio)",
        ),
        (
            "sum by (model) (rate(oodmon_predictions_total[10m])) == 0",
            "sum by (model, model_version) (rate(oodmon_predictions_total[10m])) == 0",
        ),
        ("> 0.01\n        for: 5m", "> 0.2\n        for: 5m"),
        (
            "          or\n          sum by (model, model_version, kind) (\n",
            "          unless\n          sum by (model, model_version, kind) (\n",
        ),
    ],
    ids=["alpha-multiplier", "traffic-per-version", "invalid-threshold", "first-error"],
)
def test_promtool_unit_tests_catch_a_broken_rule(
    tmp_path: Path, original: str, broken: str
) -> None:
    """The rule tests can fail: a mutated alerts.yml must not pass them."""
    text = ALERTS.read_text()
    assert original in text
    (tmp_path / "alerts.yml").write_text(text.replace(original, broken))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    done = run_promtool(["test", "rules", str(tmp_path / "alerts_test.yml")])
    assert done.returncode != 0, done.stdout.decode()
