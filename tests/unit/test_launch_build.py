"""``trainer.launch.build.build_objects`` gives the chart's objects, field by field.

For every chart preset (as a PyTorchJob and as a TrainJob), the whole matrix of
tests/unit/test_chart_render.py (nodes 1/2/32 x GPUs 0/1/8 x elastic x gang none/volcano/
scheduler-plugins x monitoring x jobKind: 162 valid cases) and a list of feature cases (node
pools, Kueue, suspend and deadlines, service account identity, GCS emulator, extraArgs,
training.config of ints/floats/strings/lists, env overrides, resources merged and removed,
security contexts, TrainingRuntime restart policies, names...), the spec's values are rendered
by the real Helm library (tests/k8s/render.py) and built by the builder; the two object lists
must be equal except at :data:`trainer.launch.build.DIFFERENCES_FROM_HELM`, and those
differences must be there (so the list stays exact). A failure prints every differing field
path. config.toml is compared as text (it is hashed into ``checksum/config``) and parsed with
tomllib, and the trainer's own loader reads the builder's file. Every built object passes the
strict CRD/core validation of tests/k8s/validate.py. Cross-field mistakes fail with the
chart's own message.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from tests.k8s import render as r
from tests.k8s import validate as v
from tests.k8s.render import RenderError, deep_merge, render
from tests.unit.test_chart_render import CASES, case_id, case_values
from trainer.launch import JobSpec, SpecError, build_objects, job_object
from trainer.launch import chart as chart_facts
from trainer.launch.build import DIFFERENCES_FROM_HELM, chart_only
from trainer.launch.configtoml import go_format_v, go_json_float, toml_table
from trainer.launch.nodepools import NODE_POOLS

RELEASE, NAMESPACE = "rel", "ml"
BASE: dict = {"training": {"dataShards": "gs://bucket/sa1b/sa_*.tar", "runDir": "gs://bucket/runs/test"}}
MAE = {"training": {"config": {"model": {"mae_checkpoint": "gs://bucket/mae_pretrain_vit_huge.pth"}}}}
MANAGED_BY = "app.kubernetes.io/managed-by"


# --------------------------------------------------------------------------- comparing


def field_diff(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Every differing field as ``path: builder X != chart Y`` (lists by index, maps by key)."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in theirs:
                out.append(f"{sub}: only the builder has it: {ours[key]!r}")
            elif key not in ours:
                out.append(f"{sub}: only the chart has it: {theirs[key]!r}")
            else:
                out += field_diff(ours[key], theirs[key], sub)
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [line for i, (a, b) in enumerate(zip(ours, theirs)) for line in field_diff(a, b, f"{path}[{i}]")]
    if ours != theirs or type(ours) is not type(theirs):
        return [f"{path}: builder {ours!r} != chart {theirs!r}"]
    return []


def chart_objects(spec: JobSpec) -> dict[tuple[str, str], dict]:
    """The chart's objects for the spec's values, minus the chart-only ones (monitoring, launcher RBAC)."""
    objects = render(spec.to_values(), name=spec.name, namespace=spec.namespace)
    return {(o["kind"], o["metadata"]["name"]): o for o in objects if not chart_only(o)}


def without_allowed_differences(obj: dict) -> dict:
    """``obj`` with the documented difference undone (asserting that it is there)."""
    assert [path for path, _ in DIFFERENCES_FROM_HELM] == [f"metadata.labels.{MANAGED_BY}"]
    labels = obj["metadata"]["labels"]
    assert labels[MANAGED_BY] == chart_facts.MANAGED_BY, labels
    return {**obj, "metadata": {**obj["metadata"], "labels": {**labels, MANAGED_BY: "Helm"}}}


def assert_same_as_chart(values: Mapping[str, Any], name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """Build and render ``values``; fail listing every differing field. Returns the built objects."""
    spec = JobSpec.from_values(values, name, namespace)
    built = build_objects(spec)
    ours = {(o["kind"], o["metadata"]["name"]): o for o in built}
    theirs = chart_objects(spec)
    assert list(ours) == sorted(ours, key=_creation_order), "creation order: config, account, runtime, job"
    assert set(ours) == set(theirs), f"builder {sorted(ours)} vs chart {sorted(theirs)}"
    problems = []
    for key, obj in ours.items():
        problems += [f"{key[0]}/{key[1]}: {line}" for line in field_diff(without_allowed_differences(obj), theirs[key])]
    assert not problems, "builder and chart differ:\n  " + "\n  ".join(problems)
    config_key = ("ConfigMap", f"{spec.fullname}-config")
    ours_toml, chart_toml = ours[config_key]["data"]["config.toml"], theirs[config_key]["data"]["config.toml"]
    assert tomllib.loads(ours_toml) == tomllib.loads(chart_toml)
    return built


def _creation_order(key: tuple[str, str]) -> int:
    return ["ConfigMap", "ServiceAccount", "TrainingRuntime", "PyTorchJob", "TrainJob"].index(key[0])


def validate_strictly(objects: list[dict]) -> None:
    v.require_crds()  # skips, saying why, where ../shared/crds is missing
    v.validate_all(objects)


def preset_values(preset: str, *more: Mapping[str, Any]) -> dict:
    return deep_merge(r.load_preset(preset), BASE, MAE if preset.startswith("vit") else {}, *more)


# --------------------------------------------------------------------------- presets and the matrix


def test_chart_facts_are_chart_yaml() -> None:
    chart = yaml.safe_load((r.CHART_DIR / "Chart.yaml").read_text())
    assert (chart_facts.CHART_NAME, chart_facts.CHART_VERSION, chart_facts.APP_VERSION) == (
        chart["name"], chart["version"], chart["appVersion"])


def test_node_pools_are_the_charts_list() -> None:
    schema = yaml.safe_load((r.CHART_DIR / "values.schema.json").read_text())
    assert list(NODE_POOLS) == schema["properties"]["nodePool"]["properties"]["preset"]["enum"]
    template = (r.CHART_DIR / "templates" / "_nodepools.tpl").read_text()
    assert all(f'"{name}"' in template for name in NODE_POOLS)


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("preset", r.preset_names())
def test_preset_is_built_like_the_chart_and_validates(preset: str, job_kind: str) -> None:
    objects = assert_same_as_chart(preset_values(preset, {"jobKind": job_kind}))
    validate_strictly(objects)


@pytest.mark.parametrize("preset", r.preset_names())
def test_preset_config_loads_with_the_trainers_loader(preset: str, tmp_path: Path) -> None:
    from trainer.config import load_config
    from trainer.presets import PRESETS, Config

    spec = JobSpec.from_values(preset_values(preset, {"training": {"extraArgs": ["train.log_every=7"]}}), RELEASE)
    objects = build_objects(spec)
    path = tmp_path / "config.toml"
    path.write_text(objects[0]["data"]["config.toml"])
    command = job_object(objects)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "command"]
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    cfg = load_config(Config, str(path), overrides, PRESETS)
    assert cfg.data.shards == BASE["training"]["dataShards"] and cfg.train.run_dir == BASE["training"]["runDir"]
    assert cfg.train.log_every == 7 and cfg.metrics.port == spec.monitoring.port


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matrix_case_is_built_like_the_chart(case: dict) -> None:
    validate_strictly(assert_same_as_chart(case_values(case)))


# --------------------------------------------------------------------------- feature cases

TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
OWN_RUNTIME = {"trainJob": {"createRuntime": True}}
#: case -> (values over BASE, job kinds it applies to).
FEATURES: dict[str, tuple[dict, tuple[str, ...]]] = {
    **{f"pool-{pool}": ({"nodes": 2, "gpusPerNode": 8, "nodePool": {
        "preset": pool, "nodeSelector": {"pool": "training"}, "tolerations": [TOLERATION]}}, ("pytorchjob", "trainjob"))
       for pool in NODE_POOLS},
    "pool-label-emptied": ({"nodePool": {"preset": "gke-a2-highgpu",
                                         "nodeSelector": {"cloud.google.com/gke-accelerator": ""}}}, ("pytorchjob",)),
    "pool-duplicate-toleration": ({"nodePool": {"preset": "eks-p5", "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, TOLERATION, TOLERATION]}},
        ("pytorchjob",)),
    "pool-cpu-efa": ({"gpusPerNode": 0, "nodePool": {"preset": "eks-p4d"}}, ("pytorchjob",)),
    "kueue": ({"scheduling": {"kueueQueue": "team-a"}}, ("pytorchjob", "trainjob")),
    "suspend-deadlines": ({"runPolicy": {"suspend": True, "activeDeadlineSeconds": 86400, "backoffLimit": 3}},
                          ("pytorchjob", "trainjob")),
    "ttl-cleanup": ({"runPolicy": {"ttlSecondsAfterFinished": 0, "cleanPodPolicy": "All"}}, ("pytorchjob",)),
    "not-suspended": ({"runPolicy": {"suspend": False, "cleanPodPolicy": "None"}}, ("pytorchjob",)),
    "rendezvous-timeout": ({"training": {"rendezvousTimeoutSeconds": 60}, "nodes": 3}, ("pytorchjob", "trainjob")),
    "service-account-identity": ({"serviceAccount": {
        "gcpServiceAccount": "train@proj.iam.gserviceaccount.com", "awsRoleArn": "arn:aws:iam::123456789012:role/sam",
        "annotations": {"team": "vision", "iam.gke.io/gcp-service-account": "other@x.iam.gserviceaccount.com"}}},
        ("pytorchjob", "trainjob")),
    "service-account-existing": ({"serviceAccount": {"create": False, "name": "ci"}}, ("pytorchjob", "trainjob")),
    "service-account-default": ({"serviceAccount": {"create": False}}, ("pytorchjob",)),
    "service-account-named": ({"serviceAccount": {"name": "trainer.sa"}}, ("pytorchjob",)),
    "gcs-emulator": ({"gcs": {"emulatorHost": "http://fake-gcs.ns:4443", "token": "anon"}}, ("pytorchjob", "trainjob")),
    "extra-args": ({"training": {"extraArgs": ["optim.max_iters=290", "train.log_every=5"], "maxRestarts": 2,
                                 "checkpointUrl": "gs://bucket/ckpt"}}, ("pytorchjob", "trainjob")),
    "config-types": ({"training": {"config": {
        "optim": {"max_iters": 90000, "lr": 8e-05, "eps": 1e-7, "weight_decay": 1.5e-10, "warmup_start_factor": 1e21,
                  "warmup_iters": 2**60, "decay_gamma": 3.0, "layer_decay": 0.8, "milestones": [60000, 86666],
                  "betas": [0.9, 0.999], "no_decay_patterns": []},
        "eval": {"shards": ["gs://b/val/sa_000999.tar", 'a "q" <&>\n\t\\ caf\u00e9'], "every": 2.0},
        "train": {"amp": "off", "compile": True, "deterministic": False, "grad_clip": 0},
        "model": {"encoder_init": "sam", "init_checkpoint": "gs://b/sam_vit_h.pth", "drop_path_rate": -1},
        "metrics": {"run_name": "", "peak_tflops": 989.5}, "log": {"level": "DEBUG"}}}}, ("pytorchjob", "trainjob")),
    "monitoring-off": ({"monitoring": {"port": 0}, "gpusPerNode": 0, "training": {"preset": "tiny_cpu"}},
                       ("pytorchjob", "trainjob")),
    "monitoring-port": ({"monitoring": {"port": 9500}, "gpusPerNode": 4}, ("pytorchjob",)),
    "env-overrides": ({"env": [{"name": "SAM_GCS_TOKEN", "value": "cloud"}, {"name": "X", "value": "1"},
                               {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                       "nodePool": {"preset": "eks-p4d"}}, ("pytorchjob", "trainjob")),
    "nccl": ({"nccl": {"debug": "", "socketIfname": "eth0", "ibDisable": True, "asyncErrorHandling": False,
                       "extraEnv": {"NCCL_IB_HCA": "mlx5", "NCCL_NET_GDR_LEVEL": 2, "NCCL_X": True, "A_RATIO": 0.5}}},
             ("pytorchjob",)),
    "nccl-cpu": ({"gpusPerNode": 0, "nccl": {"socketIfname": "eth0"}}, ("pytorchjob",)),
    "resources-merged": ({"resources": {"requests": {"cpu": 2, "memory": 1000000, "example.com/foo": "1"},
                                        "limits": {"memory": 1000000000000, "example.com/foo": "1", "cpu": 2.5}}},
                         ("pytorchjob", "trainjob")),
    "resources-removed": ({"resources": {"requests": {"cpu": None}, "limits": {"ephemeral-storage": "100Gi"}}},
                          ("pytorchjob", "trainjob")),
    "resources-no-requests": ({"resources": {"requests": None}, "gpusPerNode": 0}, ("pytorchjob", "trainjob")),
    "resources-units": ({"resources": {"requests": {"memory": "1.5e3", "cpu": "500m"},
                                       "limits": {"memory": "2G", "cpu": "1"}}, "shmSize": "1G"}, ("pytorchjob",)),
    "image": ({"image": {"repository": "reg.example.com/sam", "tag": "1.2.3", "pullPolicy": "Always",
                         "pullSecrets": ["regcred", {"name": "other"}]}}, ("pytorchjob", "trainjob")),
    "image-digest": ({"image": {"tag": "sha256:" + "ab" * 32}}, ("pytorchjob",)),
    "pod-labels-annotations": ({"podLabels": {"team": "vision", "app.kubernetes.io/component": "other"},
                                "podAnnotations": {"a": "b", "checksum/config": "mine"}}, ("pytorchjob", "trainjob")),
    "security-contexts": ({"podSecurityContext": {"runAsUser": 2000, "fsGroup": None, "supplementalGroups": [5]},
                           "securityContext": {"capabilities": None, "readOnlyRootFilesystem": True}},
                          ("pytorchjob", "trainjob")),
    "security-contexts-cleared": ({"podSecurityContext": {k: None for k in ("runAsNonRoot", "runAsUser", "runAsGroup",
                                                                            "fsGroup", "seccompProfile")},
                                   "securityContext": {"allowPrivilegeEscalation": None, "capabilities": None}},
                                  ("pytorchjob", "trainjob")),
    "volumes-affinity": ({"extraVolumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "sa1b"}}],
                          "extraVolumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
                          "nodePool": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                              {"weight": 10, "preference": {"matchExpressions": [
                                  {"key": "zone", "operator": "In", "values": ["a"]}]}}]}}},
                          "shmSize": "2Gi", "terminationGracePeriodSeconds": 0}, ("pytorchjob", "trainjob")),
    "grace-period": ({"terminationGracePeriodSeconds": 900}, ("pytorchjob",)),
    "priority-scheduler": ({"nodePool": {"priorityClassName": "high"}, "scheduling": {"schedulerName": "custom"},
                            **OWN_RUNTIME}, ("pytorchjob", "trainjob")),
    "restart-on-failure": ({"restartPolicy": "OnFailure", "nodes": 2, **OWN_RUNTIME}, ("pytorchjob", "trainjob")),
    "restart-never": ({"restartPolicy": "Never", **OWN_RUNTIME}, ("pytorchjob", "trainjob")),
    "backoff-0-on-failure": ({"restartPolicy": "OnFailure", "runPolicy": {"backoffLimit": 0}}, ("pytorchjob",)),
    "backoff-0-referenced-runtime": ({"runPolicy": {"backoffLimit": 0}}, ("trainjob",)),
    "volcano-queue": ({"nodes": 4, "scheduling": {"gang": "volcano", "queue": "research"},
                       "nodePool": {"priorityClassName": "high"}}, ("pytorchjob", "trainjob")),
    "volcano-timeout": ({"nodes": 4, "scheduling": {"gang": "volcano", "scheduleTimeoutSeconds": 600}},
                        ("pytorchjob",)),
    "coscheduling-timeout": ({"nodes": 4, "scheduling": {"gang": "scheduler-plugins", "scheduleTimeoutSeconds": 60}},
                             ("pytorchjob", "trainjob")),
    "elastic-gang": ({"nodes": 8, "elastic": {"enabled": True, "minNodes": 2, "maxRestarts": 5},
                      "scheduling": {"gang": "volcano"}}, ("pytorchjob",)),
    "cpu-processes": ({"gpusPerNode": 0, "cpuProcessesPerNode": 4, "nodes": 3}, ("pytorchjob", "trainjob")),
    "names": ({"nameOverride": "sam", "fullnameOverride": "vit-h-run"}, ("pytorchjob", "trainjob")),
    "name-override": ({"nameOverride": "segmenter"}, ("pytorchjob", "trainjob")),
    "runtime-ref": ({"trainJob": {"runtime": "my-torch", "runtimeKind": "TrainingRuntime"}}, ("trainjob",)),
    "monitoring-objects": ({"monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                           "dashboard": {"enabled": True}}, **OWN_RUNTIME}, ("pytorchjob", "trainjob")),
    "dashboard-elsewhere": ({"monitoring": {"dashboard": {"enabled": True, "namespace": "grafana"}}}, ("pytorchjob",)),
}
FEATURE_CASES = [(name, kind) for name, (_, kinds) in FEATURES.items() for kind in kinds]


@pytest.mark.parametrize("case, job_kind", FEATURE_CASES, ids=[f"{n}-{k}" for n, k in FEATURE_CASES])
def test_feature_case_is_built_like_the_chart(case: str, job_kind: str) -> None:
    values = deep_merge(BASE, FEATURES[case][0], {"jobKind": job_kind})
    validate_strictly(assert_same_as_chart(values))


@pytest.mark.parametrize("name, namespace", [("sam-train-exp1", "team-a"), ("x" * 30, "default"),
                                             ("a-sam-train-b", "ml"), ("s" * 20 + "sam-train", "default")])
def test_release_names_and_namespaces(name: str, namespace: str) -> None:
    built = assert_same_as_chart(deep_merge(BASE, {"nodes": 2}), name=name, namespace=namespace)
    assert {o["metadata"]["namespace"] for o in built} == {namespace}


# --------------------------------------------------------------------------- failures


#: Values the chart's templates refuse (not its schema): the builder raises the same message.
TEMPLATE_FAILURES = {
    "queue-without-volcano": {"scheduling": {"queue": "research"}},
    "timeout-without-gang": {"scheduling": {"scheduleTimeoutSeconds": 60}},
    "trainjob-volcano-timeout": {"jobKind": "trainjob", "scheduling": {"gang": "volcano", "scheduleTimeoutSeconds": 60}},
    "elastic-max-restarts": {"nodes": 2, "elastic": {"enabled": True}, "training": {"maxRestarts": 1}},
    "exitcode-backoff-0": {"runPolicy": {"backoffLimit": 0}},
    "exitcode-backoff-0-own-runtime": {"jobKind": "trainjob", "runPolicy": {"backoffLimit": 0}, **OWN_RUNTIME},
    "trainjob-ttl": {"jobKind": "trainjob", "runPolicy": {"ttlSecondsAfterFinished": 60}},
    "trainjob-clean-pods": {"jobKind": "trainjob", "runPolicy": {"cleanPodPolicy": "All"}},
    "identity-without-account": {"serviceAccount": {"create": False, "gcpServiceAccount": "a@p.iam.gserviceaccount.com"}},
    "annotations-without-account": {"serviceAccount": {"create": False, "name": "ci", "annotations": {"a": "b"}}},
    "image-with-tag": {"image": {"repository": "localhost:5000/sam-train:1.0"}},
    "image-with-digest": {"image": {"repository": "reg/sam@sha256:" + "ab" * 32}},
    "shm-tiny": {"shmSize": "512Ki"},
    "no-memory-limit": {"resources": {"limits": {"memory": None}}},
    "shm-over-limit": {"shmSize": "128Gi"},
    "request-over-limit": {"resources": {"requests": {"cpu": "8"}, "limits": {"cpu": 4}}},
    "memory-request-over-limit": {"resources": {"requests": {"memory": "200Gi"}}},
    "extra-args-owned": {"training": {"extraArgs": ["metrics.port=1"]}},
    "trainjob-scheduler": {"jobKind": "trainjob", "scheduling": {"schedulerName": "custom"}},
    "trainjob-priority": {"jobKind": "trainjob", "nodePool": {"priorityClassName": "high"}},
    "trainjob-podmonitor": {"jobKind": "trainjob", "monitoring": {"podMonitor": {"enabled": True}}},
    "trainjob-elastic": {"jobKind": "trainjob", "elastic": {"enabled": True}},
    "elastic-min-over-nodes": {"nodes": 2, "elastic": {"enabled": True, "minNodes": 3}},
    "podmonitor-port-0": {"monitoring": {"port": 0, "podMonitor": {"enabled": True}}},
    "port-overflow": {"monitoring": {"port": 65519}, "gpusPerNode": 0, "cpuProcessesPerNode": 256},
    "mount-without-volume": {"extraVolumeMounts": [{"name": "data", "mountPath": "/data"}]},
    "mae-without-checkpoint": {"training": {"config": {"model": {"encoder_init": "mae"}}}},
    "sam-without-checkpoint": {"training": {"config": {"model": {"encoder_init": "sam"}}}},
    "owned-key": {"training": {"config": {"metrics": {"port": 1}}}},
    "missing-run-dir": {"training": {"runDir": ""}},
    "release-name-too-long": {"nameOverride": "x" * 38},
    "gpu-in-resources": {"resources": {"limits": {"nvidia.com/gpu": "8"}}},
}


#: Values the chart's schema refuses: the spec refuses them too (naming the key).
SCHEMA_FAILURES = {
    "config-null": ({"training": {"config": {"optim": {"lr": None}}}}, "training.config.optim.lr"),
    "config-table-in-list": ({"training": {"config": {"eval": {"shards": [{"a": 1}]}}}}, "training.config.eval.shards"),
    "config-unknown-key": ({"training": {"config": {"optim": {"lrr": 1e-4}}}}, "training.config.optim.lrr"),
    "config-short-tuple": ({"training": {"config": {"optim": {"betas": [0.9]}}}}, "training.config.optim.betas"),
    "config-bool-for-string": ({"training": {"config": {"train": {"amp": False}}}}, "training.config.train.amp"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_FAILURES))
def test_schema_failures_are_spec_errors(case: str) -> None:
    override, key = SCHEMA_FAILURES[case]
    values = deep_merge(BASE, override)
    with pytest.raises(RenderError) as chart:
        render(values)
    assert chart.value.stage == "values", str(chart.value)
    with pytest.raises(SpecError) as ours:
        JobSpec.from_values(values, RELEASE, NAMESPACE)
    assert str(ours.value).startswith(key), str(ours.value)


@pytest.mark.parametrize("case", sorted(TEMPLATE_FAILURES))
def test_template_failures_give_the_charts_message(case: str) -> None:
    values = deep_merge(BASE, TEMPLATE_FAILURES[case])
    with pytest.raises(RenderError) as chart:
        render(values)
    assert chart.value.stage == "template", str(chart.value)
    with pytest.raises(SpecError) as ours:
        build_objects(JobSpec.from_values(values, RELEASE, NAMESPACE))
    assert str(ours.value) in str(chart.value), (str(ours.value), str(chart.value))


def test_job_object_finds_the_one_job() -> None:
    objects = build_objects(JobSpec.from_values(deep_merge(BASE, {"jobKind": "trainjob", **OWN_RUNTIME}), RELEASE))
    assert [o["kind"] for o in objects] == ["ConfigMap", "ServiceAccount", "TrainingRuntime", "TrainJob"]
    assert job_object(objects)["kind"] == "TrainJob"
    with pytest.raises(SpecError, match="expected one PyTorchJob or TrainJob"):
        job_object(objects[:2])


def test_build_does_not_change_the_spec() -> None:
    spec = JobSpec.from_values(deep_merge(BASE, {"env": [{"name": "A", "value": "1"}]}), RELEASE)
    before = spec.to_values()
    objects = build_objects(spec)
    objects[-1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"].clear()
    assert spec.to_values() == before


# --------------------------------------------------------------------------- Go number formatting


@pytest.mark.parametrize("number, json_text, v_text", [
    (8e-05, "0.00008", "8e-05"), (1e-7, "1e-7", "1e-07"), (1e21, "1e+21", "1e+21"), (1.5e-10, "1.5e-10", "1.5e-10"),
    (1000000.0, "1000000", "1e+06"), (123456789.0, "123456789", "1.23456789e+08"), (0.5, "0.5", "0.5"),
    (-2.5, "-2.5", "-2.5"), (100000.0, "100000", "100000"), (0.0001, "0.0001", "0.0001"), (0.0, "0", "0"),
    (float(2**60), "1152921504606847000", "1.152921504606847e+18"),
])
def test_go_number_formatting(number: float, json_text: str, v_text: str) -> None:
    # Go's encoding/json and fmt %v, which Helm's toJson/toString use on its float64 values.
    assert go_json_float(number) == json_text and go_format_v(number) == v_text


def test_toml_writer_nests_tables_and_quotes_keys() -> None:
    # The chart's schema allows only the trainer's flat sections; the writer (like _toml.tpl) handles more.
    table = {"a": {"x y": 1, "dotted.key": [1, [2.5, "s"]], "sub": {"deep": {"k": True}, "v": "caf\u00e9"}}, "b": {}}
    text = toml_table(table, "", "training.config")
    assert text == ('\n\n[a]\n"dotted.key" = [1, [2.5, "s"]]\n"x y" = 1\n\n[a.sub]\nv = "caf\u00e9"'
                    '\n\n[a.sub.deep]\nk = true\n\n[b]')
    assert tomllib.loads(text) == table


def test_chart_only_objects_are_the_monitoring_ones() -> None:
    values = deep_merge(BASE, {"monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                              "dashboard": {"enabled": True}}})
    left_out = sorted(o["kind"] for o in render(values) if chart_only(o))
    assert left_out == ["ConfigMap", "PodMonitor", "PrometheusRule"]  # the ConfigMap is the Grafana dashboard
    assert not [o for o in build_objects(JobSpec.from_values(values, RELEASE)) if chart_only(o)]
