"""The chart's monitoring objects: PodMonitor, PrometheusRule (real promtool), Grafana dashboard.

The PrometheusRule must carry files/prometheus-rules.yaml with the chart's thresholds and
nothing else changed: in particular Helm must not have run over the Prometheus templates
(``{{ $labels.run }}``) of the annotations. Its ``spec`` is checked by ``promtool check rules``
(Debian ``prometheus``; ``make test`` installs it, a missing promtool fails under CI).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from tests.conftest import needs_binary
from tests.k8s import render as r
from tests.k8s.render import RenderError, deep_merge, render
from tests.k8s.validate import CrdsNotPresent, validate

RELEASE, NAMESPACE = "rel", "ml"
FULLNAME = "rel-sam-train"
BASE: dict = {"training": {"dataShards": "gs://bucket/sa1b/sa_*.tar", "runDir": "gs://bucket/runs/test"}}
FILES = r.CHART_DIR / "files"
RULES_FILE = FILES / "prometheus-rules.yaml"
DASHBOARD_FILE = FILES / "grafana-dashboard.json"

needs_promtool = needs_binary("promtool", "prometheus")


def _monitoring(**prometheus_rule: Any) -> dict:
    return deep_merge(BASE, {"monitoring": {"podMonitor": {"enabled": True},
                                            "prometheusRule": {"enabled": True, **prometheus_rule},
                                            "dashboard": {"enabled": True}}})


def _rule_spec(values: Mapping[str, Any]) -> dict:
    return r.one(render(values, name=RELEASE, namespace=NAMESPACE), "PrometheusRule")["spec"]


def _alerts(spec: Mapping[str, Any]) -> dict[str, dict]:
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"] if "alert" in rule}


def _file_alerts() -> dict[str, dict]:
    return _alerts(yaml.safe_load(RULES_FILE.read_text()))


def _stripped(value: Any) -> Any:
    """Strings without surrounding whitespace (a folded YAML scalar may keep a final newline)."""
    if isinstance(value, Mapping):
        return {k: _stripped(v) for k, v in value.items()}
    return value.strip() if isinstance(value, str) else value


def _promtool_check(spec: Mapping[str, Any], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(dict(spec), sort_keys=False))
    return subprocess.run([shutil.which("promtool") or "promtool", "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)


def _validated(objects: list[dict]) -> list[dict]:
    for obj in objects:
        try:
            validate(obj)
        except CrdsNotPresent:
            pass  # test_k8s_validate / test_chart_render report the missing CRDs
    return objects


def test_monitoring_is_off_by_default() -> None:
    kinds = {o["kind"] for o in render(BASE)}
    assert not kinds & {"PodMonitor", "PrometheusRule"}
    assert [o["metadata"]["name"] for o in r.of_kind(render(BASE), "ConfigMap")] == [f"{FULLNAME}-config"]


def test_monitoring_objects_carry_the_release_label_and_validate() -> None:
    values = deep_merge(_monitoring(labels={"team": "vision"}),
                        {"monitoring": {"prometheusRelease": "prom", "podMonitor": {"labels": {"scrape": "yes"}}}})
    objects = _validated(render(values, name=RELEASE, namespace=NAMESPACE))
    monitor, rule = r.one(objects, "PodMonitor"), r.one(objects, "PrometheusRule")
    assert monitor["metadata"]["labels"]["release"] == "prom" and monitor["metadata"]["labels"]["scrape"] == "yes"
    assert rule["metadata"]["labels"]["release"] == "prom" and rule["metadata"]["labels"]["team"] == "vision"
    assert rule["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("gpus, procs", [(0, 1), (1, 1), (8, 8)])
def test_podmonitor_scrapes_one_port_per_local_rank(gpus: int, procs: int) -> None:
    values = deep_merge(_monitoring(), {"gpusPerNode": gpus, "nodes": 2, "monitoring": {"port": 9500}})
    objects = render(values, name=RELEASE, namespace="team-a")
    monitor = r.one(objects, "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == [f"metrics-{i}" for i in range(procs)]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    for template in r.pytorchjob_templates(r.job_of(objects)).values():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert all(ports[f"metrics-{i}"] == 9500 + i for i in range(procs))


def test_podmonitor_with_exporter_off_fails_naming_the_port() -> None:
    values = deep_merge(_monitoring(), {"monitoring": {"port": 0}})
    with pytest.raises(RenderError) as info:
        render(values)
    assert "monitoring.port" in str(info.value)


def test_podmonitor_with_a_trainjob_needs_the_charts_runtime() -> None:
    values = deep_merge(_monitoring(), {"jobKind": "trainjob"})
    with pytest.raises(RenderError) as info:
        render(values)
    assert "monitoring.podMonitor.enabled" in str(info.value) and "trainJob.createRuntime" in str(info.value)
    objects = render(deep_merge(values, {"trainJob": {"createRuntime": True}}))
    runtime = r.one(objects, "TrainingRuntime")
    template = r.runtime_pod_templates(runtime)["node"]
    ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in r.one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]} <= ports


#: Annotation texts the chart rewrites from its thresholds even at their defaults ("half" is
#: written as the percentage of monitoring.prometheusRule.throughputDropRatio).
REWORDED = {("SamTrainThroughputDrop", "summary"): ("below half its", "below 50% of its")}


def test_default_rules_are_the_files_rules_unchanged() -> None:
    rendered = _alerts(_rule_spec(_monitoring()))
    for name, rule in _file_alerts().items():
        got = rendered[name]
        for field in ("expr", "for", "labels"):
            assert _stripped(got.get(field)) == _stripped(rule.get(field)), (name, field)
        for key, text in rule["annotations"].items():
            old, new = REWORDED.get((name, key), ("", ""))
            assert got["annotations"][key].strip() == text.replace(old, new).strip(), (name, key)
        assert set(got["annotations"]) == set(rule["annotations"]), name


def test_annotations_keep_the_prometheus_templates() -> None:
    rendered = _alerts(_rule_spec(_monitoring()))
    for name, rule in _file_alerts().items():
        assert "{{ $labels.run }}" in rendered[name]["annotations"]["summary"], name
    pending = rendered["SamTrainPodsPending"]["annotations"]
    assert "{{ $labels.pod }}" in pending["summary"]


@needs_promtool
def test_rendered_rules_pass_promtool(tmp_path: Path) -> None:
    result = _promtool_check(_rule_spec(_monitoring()), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


CHANGED = dict(noProgressWindow="30m", checkpointMaxAgeSeconds=3600, throughputDropRatio=0.25,
               gpuUtilizationMin=0.3, dataSkipRatioMax=0.1, podsPendingFor="45m",
               severity={"SamTrainThroughputDrop": "critical", "SamTrainPodsPending": "critical"},
               disabled=["SamTrainGpuUtilizationLow"])


def test_changed_thresholds_appear_in_the_exprs() -> None:
    alerts = _alerts(_rule_spec(_monitoring(**CHANGED)))
    no_progress = alerts["SamTrainNoProgress"]["expr"]
    assert "[30m]" in no_progress and "[15m]" not in no_progress
    assert "last 30m" in alerts["SamTrainNoProgress"]["annotations"]["description"]
    assert alerts["SamTrainCheckpointStale"]["expr"].rstrip().endswith("> 3600")
    assert "7200" not in alerts["SamTrainCheckpointStale"]["expr"]
    assert alerts["SamTrainThroughputDrop"]["expr"].rstrip().endswith("< 0.25")
    assert alerts["SamTrainDataSkipsHigh"]["expr"].rstrip().endswith("> 0.1")
    assert alerts["SamTrainThroughputDrop"]["labels"]["severity"] == "critical"
    assert alerts["SamTrainPodsPending"]["labels"]["severity"] == "critical"
    assert alerts["SamTrainPodsPending"]["for"] == "45m"
    assert "SamTrainGpuUtilizationLow" not in alerts
    # Untouched alerts keep the file's severity.
    assert alerts["SamTrainRankMissing"]["labels"] == _file_alerts()["SamTrainRankMissing"]["labels"]


def test_gpu_threshold_is_substituted() -> None:
    alerts = _alerts(_rule_spec(_monitoring(gpuUtilizationMin=0.3)))
    assert alerts["SamTrainGpuUtilizationLow"]["expr"].rstrip().endswith("< 0.3")


@needs_promtool
def test_changed_rules_pass_promtool(tmp_path: Path) -> None:
    result = _promtool_check(_rule_spec(_monitoring(**CHANGED)), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _pod_regex(expr: str) -> str:
    found = set(re.findall(r'pod=~"([^"]+)"', expr))
    assert len(found) == 1, expr
    return found.pop()


@pytest.mark.parametrize("alert", ["SamTrainNotScraped", "SamTrainPodsPending"])
def test_kubernetes_alerts_select_this_jobs_pods(alert: str) -> None:
    rule = _alerts(_rule_spec(_monitoring()))[alert]
    assert f'namespace="{NAMESPACE}"' in rule["expr"]
    pattern = re.compile(_pod_regex(rule["expr"]))  # PromQL regexes are fully anchored
    for pod in (f"{FULLNAME}-master-0", f"{FULLNAME}-worker-31", f"{FULLNAME}-node-0-0-x7k2p"):
        assert pattern.fullmatch(pod), pod
    for pod in (f"other-{FULLNAME}-master-0", f"{FULLNAME}x-master-0", "rel-master-0"):
        assert not pattern.fullmatch(pod), pod


def test_not_scraped_alert_is_dropped_without_the_exporter() -> None:
    values = deep_merge(BASE, {"monitoring": {"port": 0, "prometheusRule": {"enabled": True}}})
    assert "SamTrainNotScraped" not in _alerts(_rule_spec(values))


def test_dashboard_is_the_file_verbatim_with_the_sidecar_label() -> None:
    values = deep_merge(_monitoring(), {"monitoring": {"dashboard": {"namespace": "grafana", "folder": "SAM"}}})
    objects = _validated(render(values, name=RELEASE, namespace=NAMESPACE))
    dashboards = [o for o in r.of_kind(objects, "ConfigMap") if "sam-train.json" in o.get("data", {})]
    assert len(dashboards) == 1
    dashboard = dashboards[0]
    assert json.loads(dashboard["data"]["sam-train.json"]) == json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "grafana"
    assert dashboard["metadata"]["annotations"]["grafana_folder"] == "SAM"


def test_dashboard_defaults_to_the_release_namespace() -> None:
    dashboard = [o for o in r.of_kind(render(_monitoring(), namespace="team-a"), "ConfigMap")
                 if "sam-train.json" in o.get("data", {})][0]
    assert dashboard["metadata"]["namespace"] == "team-a"
    assert "annotations" not in dashboard["metadata"] or "grafana_folder" not in dashboard["metadata"]["annotations"]
