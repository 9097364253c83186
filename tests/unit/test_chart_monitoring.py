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


#: What the chart adds to every trainer-metric selector of the file's exprs for release `rel` in `ml`.
SCOPE = f'namespace="{NAMESPACE}", run="{FULLNAME}"'


def _unscoped(expr: str) -> str:
    """An expr without the release's matchers (``name{SCOPE}`` -> ``name``, ``{SCOPE, x}`` -> ``{x}``)."""
    return expr.replace("{" + SCOPE + "}", "").replace("{" + SCOPE + ", ", "{")


def test_default_rules_are_the_files_rules_unchanged() -> None:
    rendered = _alerts(_rule_spec(_monitoring()))
    for name, rule in _file_alerts().items():
        got = rendered[name]
        assert _unscoped(got["expr"]).strip() == rule["expr"].strip(), name  # only the scope added
        for field in ("for", "labels"):
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


# --------------------------------------------------------------------------- scoped to the release

#: A trainer metric name in an expr (the exporter's families: trainer/prom.py).
METRIC = re.compile(r"\bsam_(?:train|gpu)_[a-zA-Z0-9_:]+")


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, the text right after it) for every trainer metric of ``expr``."""
    return [(m.group(0), expr[m.end():m.end() + 200]) for m in METRIC.finditer(expr)]


def test_every_trainer_selector_is_scoped_to_the_release() -> None:
    # Finding 3: without namespace/run matchers each release's rule evaluates every run.
    alerts = _alerts(_rule_spec(_monitoring()))
    for name in _file_alerts():
        found = _selectors(alerts[name]["expr"])
        assert found, name
        for metric, after in found:
            assert after.startswith("{" + SCOPE), (name, metric, after[:60])
        assert "}{" not in alerts[name]["expr"], name


def test_a_selector_the_file_already_has_is_joined(tmp_path: Path) -> None:
    # The file has none today; a rules file with one must give `{scope, its matchers}`.
    chart = tmp_path / "sam-train"
    shutil.copytree(r.CHART_DIR, chart)
    rules = yaml.safe_load((chart / "files" / "prometheus-rules.yaml").read_text())
    rule = rules["groups"][0]["rules"][1]
    assert rule["alert"] == "SamTrainNonFiniteSteps"
    rule["expr"] = rule["expr"].replace("sam_train_nonfinite_steps_total", 'sam_train_nonfinite_steps_total{rank="0"}')
    (chart / "files" / "prometheus-rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    manifests = r.render_templates(_monitoring(), name=RELEASE, namespace=NAMESPACE, chart_dir=chart)
    spec = yaml.safe_load(manifests["sam-train/templates/prometheusrule.yaml"])["spec"]
    expr = _alerts(spec)["SamTrainNonFiniteSteps"]["expr"]
    assert 'sam_train_nonfinite_steps_total{' + SCOPE + ', rank="0"}[15m]' in expr, expr


@pytest.mark.parametrize("values, run", [
    ({"training": {"config": {"metrics": {"run_name": "vit-h-exp1"}}}}, "vit-h-exp1"),
    ({"training": {"config": {"metrics": {"run_name": "a"}}, "extraArgs": ["metrics.run_name=b"]}}, "b"),
    ({"env": [{"name": "SAM_RUN_NAME", "value": "from-env"}]}, "from-env"),
])
def test_alerts_follow_the_run_label_the_trainer_uses(values: dict, run: str) -> None:
    # The `run` label is metrics.run_name (--set over the file), else SAM_RUN_NAME (trainer/prom.py).
    spec = _rule_spec(deep_merge(_monitoring(), values))
    for name, rule in _alerts(spec).items():
        for metric, after in _selectors(rule["expr"]):
            assert after.startswith(f'{{namespace="{NAMESPACE}", run="{run}"'), (name, metric)
        if name.startswith("SamTrain") and "run" in (rule.get("labels") or {}):
            assert rule["labels"]["run"] == run, name


def _without_annotations(spec: Mapping[str, Any]) -> dict:
    """The rules without annotations: promtool compares them, and these tests are about labels."""
    groups = [{**g, "rules": [{k: v for k, v in rule.items() if k != "annotations"} for rule in g["rules"]]}
              for g in spec["groups"]]
    return {"groups": groups}


def _promtool_test(spec: Mapping[str, Any], tests: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_without_annotations(spec), sort_keys=False))
    (tmp_path / "rules.test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    return subprocess.run([shutil.which("promtool") or "promtool", "test", "rules", "rules.test.yaml"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _series(metric: str, namespace: str, run: str, values: str, rank: str = "0") -> dict:
    return {"series": f'{metric}{{namespace="{namespace}",run="{run}",rank="{rank}",local_rank="{rank}",'
                      f'node="0",job="sam",instance="{run}:9400"}}', "values": values}


@needs_promtool
def test_only_this_releases_alert_fires(tmp_path: Path) -> None:
    # Finding 3, in Prometheus: this release (checkpoint threshold 1h) and two other runs with
    # stale checkpoints, another release in the same namespace and a same-named run elsewhere.
    spec = _rule_spec(_monitoring(checkpointMaxAgeSeconds=3600))
    stale = "0x180"  # last checkpoint at t=0: its age is the evaluation time
    tests = [{
        "interval": "1m",
        "input_series": [
            _series("sam_train_last_checkpoint_timestamp_seconds", NAMESPACE, FULLNAME, stale),
            _series("sam_train_last_checkpoint_timestamp_seconds", NAMESPACE, "other-sam-train", stale),
            _series("sam_train_last_checkpoint_timestamp_seconds", "team-b", FULLNAME, stale),
            _series("sam_train_step", NAMESPACE, "other-sam-train", "100x180"),
            _series("sam_train_max_iters", NAMESPACE, "other-sam-train", "1000x180"),
        ],
        "alert_rule_test": [
            {"eval_time": "2h", "alertname": "SamTrainCheckpointStale",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "run": FULLNAME}}]},
            # The other release's run is stuck, but that is its own release's alert to raise.
            {"eval_time": "2h", "alertname": "SamTrainNoProgress", "exp_alerts": []},
        ],
    }]
    result = _promtool_test(spec, tests, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_not_scraped_alert_needs_the_podmonitor() -> None:
    # Finding 4: without a PodMonitor nothing scrapes the pods; the alert would fire on every healthy run.
    values = deep_merge(BASE, {"monitoring": {"prometheusRule": {"enabled": True}}})
    assert "SamTrainNotScraped" not in _alerts(_rule_spec(values))
    assert "SamTrainNotScraped" in _alerts(_rule_spec(_monitoring()))


# --------------------------------------------------------------------------- pods restarting often


def test_restarting_often_alert_selects_this_jobs_pods() -> None:
    rule = _alerts(_rule_spec(_monitoring(restartsPerHourMax=5)))["SamTrainRestartingOften"]
    assert "kube_pod_created" in rule["expr"] and f'namespace="{NAMESPACE}"' in rule["expr"]
    assert rule["expr"].rstrip().endswith("> 5") and rule["for"] == "0m"
    assert rule["labels"] == {"severity": "warning", "namespace": NAMESPACE, "run": FULLNAME}
    pattern = re.compile(_pod_regex(rule["expr"]))
    assert pattern.fullmatch(f"{FULLNAME}-worker-3") and not pattern.fullmatch(f"other-{FULLNAME}-worker-3")
    assert "SamTrainRestartingOften" not in _alerts(_rule_spec(_monitoring(disabled=["SamTrainRestartingOften"])))


def _pod_objects(pod_names: list[str], every_min: int, minutes: int) -> list[dict]:
    """kube_pod_created of pod objects recreated every ``every_min`` minutes (one uid each)."""
    out = []
    for k, pod in enumerate(pod_names):
        start = k * every_min
        length = min(every_min, minutes - start)
        values = " ".join(["_"] * start + [str(start * 60)] * length)
        out.append({"series": f'kube_pod_created{{namespace="{NAMESPACE}",pod="{pod}",uid="u{k}",'
                              f'job="kube-state-metrics"}}', "values": values})
    return out


@needs_promtool
def test_restarting_often_fires_on_recreated_pods_of_this_job_only(tmp_path: Path) -> None:
    # Finding 7: ExitCode restarts are unbounded; kube-state-metrics shows each new pod object.
    spec = _rule_spec(_monitoring())  # restartsPerHourMax: 3
    worker = f"{FULLNAME}-worker-0"
    node = f"{FULLNAME}-node-0-0"  # a TrainJob (JobSet) pod: a new random suffix at each restart
    tests = [
        {"interval": "1m",
         "input_series": (_pod_objects([worker] * 5, 12, 61)  # 4 recreations in the hour
                          + _pod_objects(["other-sam-train-worker-0"] * 10, 6, 61)
                          + [{"series": f'kube_pod_created{{namespace="{NAMESPACE}",pod="{FULLNAME}-master-0",'
                                        f'uid="m",job="kube-state-metrics"}}', "values": "0x60"}]),
         "alert_rule_test": [
             {"eval_time": "30m", "alertname": "SamTrainRestartingOften", "exp_alerts": []},  # 2 so far
             {"eval_time": "60m", "alertname": "SamTrainRestartingOften",
              "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "run": FULLNAME}}]},
         ]},
        {"interval": "1m",
         "input_series": _pod_objects([f"{node}-{s}" for s in ("x7k2p", "b9d4q", "zz2cf", "mm4bv", "q2w5r")], 12, 61),
         "alert_rule_test": [
             {"eval_time": "60m", "alertname": "SamTrainRestartingOften",
              "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "run": FULLNAME}}]},
         ]},
        {"interval": "1m",  # 3 recreations: not more than restartsPerHourMax
         "input_series": _pod_objects([worker] * 4, 15, 61),
         "alert_rule_test": [{"eval_time": "60m", "alertname": "SamTrainRestartingOften", "exp_alerts": []}]},
    ]
    result = _promtool_test(spec, tests, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
