"""The strict object validator (tests/k8s/validate.py) rejects what a strict API server rejects.

Each test breaks one field of a hand-written valid object and asserts the error names that
field's JSON path, so a validator that silently passes (the CRDs ship open schemas; the
kubernetes-validate package passes unknown kinds with a warning) fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s import validate as v
from tests.k8s.validate import CrdsNotPresent, ValidationError, validate


@pytest.fixture
def crds() -> Path:
    """The shared CRD folder (skips where a fresh clone has none)."""
    return v.require_crds()


def _pod_template(container_name: str = "pytorch") -> dict:
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "sam-train"}},
        "spec": {
            "containers": [{
                "name": container_name, "image": "ghcr.io/sam-k8s/sam-train:0.1.0",
                "ports": [{"name": "metrics-0", "containerPort": 9400}],
                "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"nvidia.com/gpu": 8}},
            }],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}],
        },
    }


def pytorchjob() -> dict:
    """A minimal valid PyTorchJob: Master + 1 Worker."""
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": "rel", "namespace": "ml", "labels": {"app.kubernetes.io/instance": "rel"}},
        "spec": {
            "nprocPerNode": "8",
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": _pod_template()},
                "Worker": {"replicas": 1, "restartPolicy": "ExitCode", "template": _pod_template()},
            },
            "runPolicy": {"backoffLimit": 20, "cleanPodPolicy": "None"},
        },
    }


def podmonitor() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": "rel", "namespace": "ml", "labels": {"release": "kube-prometheus-stack"}},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "sam-train"}},
            "namespaceSelector": {"matchNames": ["ml"]},
            "podMetricsEndpoints": [{"port": "metrics-0", "path": "/metrics", "interval": "30s"}],
        },
    }


def prometheusrule() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "rel", "namespace": "ml"},
        "spec": {"groups": [{
            "name": "sam-train", "partial_response_strategy": "WARN",  # case-insensitive: the (?i) rewrite
            "rules": [{"alert": "SamTrainNoProgress", "expr": "max(changes(sam_train_step[15m])) == 0",
                       "for": "10m", "labels": {"severity": "critical"},
                       "annotations": {"summary": "run {{ $labels.run }} stuck"}}],
        }]},
    }


def trainjob() -> dict:
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": "rel", "namespace": "ml"},
        "spec": {
            "runtimeRef": {"name": "torch-distributed", "kind": "ClusterTrainingRuntime",
                           "apiGroup": "trainer.kubeflow.org"},
            "trainer": {"image": "ghcr.io/sam-k8s/sam-train:0.1.0",
                        "command": ["python", "-m", "trainer.dist", "-m", "trainer.train"],
                        "numNodes": 2, "numProcPerNode": 8,
                        "resourcesPerNode": {"limits": {"nvidia.com/gpu": 8, "memory": "128Gi"}}},
            "runtimePatches": [{
                "manager": "sam-train.chart",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": "node",
                    "template": {"spec": {"template": {"spec": {
                        "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
                        "containers": [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
                        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}],
                    }}}},
                }]}}},
            }],
        },
    }


def trainingruntime() -> dict:
    """A namespaced TrainingRuntime like torch-distributed, with a pod failure policy."""
    pod = _pod_template("node")
    pod["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainingRuntime",
        "metadata": {"name": "rel", "namespace": "ml", "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 2, "torch": {}},
            "podGroupPolicy": {"coscheduling": {"scheduleTimeoutSeconds": 120}},
            "template": {"spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {
                "backoffLimit": 0,
                "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                    "containerName": "node", "operator": "In", "values": [1, 2, 3]}}]},
                "template": pod,
            }}}]}},
        },
    }


def _errors(obj: dict) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate(obj)
    return info.value


def _paths(err: ValidationError) -> list[str]:
    return [p.path for p in err.problems]


def _container(job: dict, replica: str = "Worker") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


WORKER = "$.spec.pytorchReplicaSpecs.Worker"
WORKER_CONTAINER = f"{WORKER}.template.spec.containers[0]"


@pytest.mark.parametrize("make", [pytorchjob, podmonitor, prometheusrule, trainjob, trainingruntime])
def test_minimal_valid_objects_pass(crds: Path, make: Any) -> None:
    validate(make())


def test_valid_core_objects_pass() -> None:
    validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rel-config"},
              "data": {"config.toml": "preset = \"vit_h\"\n"}})
    validate({"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": "rel", "annotations": {"iam.gke.io/gcp-service-account": "g@p.iam.gserviceaccount.com"}}})


def test_typo_field_in_spec_is_rejected(crds: Path) -> None:
    job = pytorchjob()
    job["spec"]["pytorchReplicaSpec"] = job["spec"].pop("pytorchReplicaSpecs")
    err = _errors(job)
    assert any(p.path == "$.spec" and "pytorchReplicaSpec" in p.message for p in err.problems), err
    assert err.kind == "PyTorchJob" and err.name == "rel"
    assert str(err).startswith("PyTorchJob/rel:")


def test_wrong_type_is_rejected(crds: Path) -> None:
    job = pytorchjob()
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "2"
    assert f"{WORKER}.replicas" in _paths(_errors(job))


def test_float_quantity_is_rejected(crds: Path) -> None:
    job = pytorchjob()
    _container(job)["resources"]["requests"]["cpu"] = 1.5
    err = _errors(job)
    problems = [p for p in err.problems if p.path == f"{WORKER_CONTAINER}.resources.requests.cpu"]
    assert problems and "float" in problems[0].message, err


def test_integer_and_string_quantities_pass(crds: Path) -> None:
    job = pytorchjob()
    _container(job)["resources"]["requests"] = {"cpu": 2, "memory": "1.5Gi"}
    validate(job)


def test_duplicate_container_names_are_rejected(crds: Path) -> None:
    job = pytorchjob()
    containers = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))
    err = _errors(job)
    assert any(p.path == f"{WORKER}.template.spec.containers" and "duplicate" in p.message
               for p in err.problems), err


def test_duplicate_ports_are_rejected_with_the_default_protocol(crds: Path) -> None:
    # list-map-keys (containerPort, protocol): a missing protocol is TCP, so these two collide.
    job = pytorchjob()
    _container(job)["ports"] = [{"name": "metrics-0", "containerPort": 9400},
                                {"name": "metrics-1", "containerPort": 9400, "protocol": "TCP"}]
    assert f"{WORKER_CONTAINER}.ports" in _paths(_errors(job))


def test_unknown_field_in_pod_template_container_is_rejected(crds: Path) -> None:
    job = pytorchjob()
    _container(job)["imagePullPolicyy"] = "IfNotPresent"
    err = _errors(job)
    assert any(p.path == WORKER_CONTAINER and "imagePullPolicyy" in p.message for p in err.problems), err


def test_pod_template_is_checked_by_the_core_schema_even_where_the_crd_is_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CRD that preserves unknown fields cannot catch the typo: the embedded PodTemplate check must.
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "pytorchjobs.kubeflow.org"},
        "spec": {"group": "kubeflow.org", "scope": "Namespaced",
                 "names": {"kind": "PyTorchJob", "plural": "pytorchjobs"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object",
                                                               "x-kubernetes-preserve-unknown-fields": True}}}}}]},
    }
    (tmp_path / "pytorchjobs.kubeflow.org.yaml").write_text(yaml.safe_dump(crd))
    monkeypatch.setenv(v.CRD_DIR_ENV, str(tmp_path))
    job = pytorchjob()
    validate(job)
    _container(job)["imagePullPolicyy"] = "IfNotPresent"
    err = _errors(job)
    assert any(p.path == WORKER_CONTAINER and "imagePullPolicyy" in p.message for p in err.problems), err


def test_bad_partial_response_strategy_is_rejected(crds: Path) -> None:
    rule = prometheusrule()
    rule["spec"]["groups"][0]["partial_response_strategy"] = "maybe"
    assert "$.spec.groups[0].partial_response_strategy" in _paths(_errors(rule))


def test_bad_duration_in_rule_is_rejected(crds: Path) -> None:
    rule = prometheusrule()
    rule["spec"]["groups"][0]["rules"][0]["for"] = "10 minutes"
    assert "$.spec.groups[0].rules[0].for" in _paths(_errors(rule))


def test_unknown_kind_is_rejected(crds: Path) -> None:
    for obj in ({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
                {"apiVersion": "v1", "kind": "ConfigMapp", "metadata": {"name": "w"}},
                {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitorr", "metadata": {"name": "w"}}):
        err = _errors(obj)
        assert "unknown kind" in str(err), obj


def test_unserved_version_is_rejected(crds: Path) -> None:
    job = pytorchjob()
    job["apiVersion"] = "kubeflow.org/v2"
    err = _errors(job)
    assert _paths(err) == ["$.apiVersion"] and "v1" in err.problems[0].message


def test_null_value_is_rejected(crds: Path) -> None:
    job = pytorchjob()
    job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] = None
    assert "$.spec.runPolicy.ttlSecondsAfterFinished" in _paths(_errors(job))


@pytest.mark.parametrize("meta, path", [
    ({"namespace": "ml"}, "$.metadata.name"),
    ({"name": "Rel_1"}, "$.metadata.name"),
    ({"name": "r" * 64}, "$.metadata.name"),  # a PyTorchJob name must stay a DNS label
    ({"name": "rel", "labels": {"run": "has space"}}, "$.metadata.labels.run"),
    ({"name": "rel", "labels": {"gpus": 8}}, "$.metadata.labels.gpus"),
    ({"name": "rel", "labels": {"bad key!": "x"}}, "$.metadata.labels.bad key!"),
    ({"name": "rel", "annotations": {"checksum/config": 1}}, "$.metadata.annotations.checksum/config"),
    ({"name": "rel", "lables": {}}, "$.metadata.lables"),
])
def test_bad_metadata_is_rejected(crds: Path, meta: dict, path: str) -> None:
    job = pytorchjob()
    job["metadata"] = meta
    assert path in _paths(_errors(job))


def test_bad_label_in_pod_template_is_rejected(crds: Path) -> None:
    job = pytorchjob()
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]["x"] = "a b"
    assert f"{WORKER}.template.metadata.labels.x" in _paths(_errors(job))


@pytest.mark.parametrize("breakage, path", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "$.spec.pytorchReplicaSpecs.Master.replicas"),
    (lambda j: _container(j, "Master").update(name="trainer"), "$.spec.pytorchReplicaSpecs.Master.template.spec.containers"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]),
     "$.spec.pytorchReplicaSpecs.Chief"),
    (lambda j: (j["spec"]["pytorchReplicaSpecs"].pop("Worker"), j["spec"].update(elasticPolicy={"minReplicas": 1})),
     "$.spec.elasticPolicy"),
])
def test_pytorchjob_webhook_rules(crds: Path, breakage: Any, path: str) -> None:
    job = pytorchjob()
    breakage(job)
    assert path in _paths(_errors(job))


@pytest.mark.parametrize("breakage, path", [
    (lambda c: c["resources"]["limits"].update(gpu=8), f"{WORKER_CONTAINER}.resources.limits.gpu"),
    (lambda c: c["resources"]["requests"].update({"nvidia.com/gpu": 4}),
     f"{WORKER_CONTAINER}.resources.requests.nvidia.com/gpu"),
    (lambda c: c["resources"].update(requests={"memory": "2Gi"}, limits={"memory": "1Gi"}),
     f"{WORKER_CONTAINER}.resources.requests.memory"),
    (lambda c: c.update(volumeMounts=[{"name": "data", "mountPath": "/data"}]), f"{WORKER_CONTAINER}.volumeMounts[0].name"),
    (lambda c: c.update(volumeMounts=[{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "dshm", "mountPath": "/dev/shm"}]),
     f"{WORKER_CONTAINER}.volumeMounts[1].mountPath"),
    (lambda c: c["ports"][0].update(name="Metrics_0"), f"{WORKER_CONTAINER}.ports[0].name"),
    (lambda c: c["ports"][0].update(name="metrics-rank-00000"), f"{WORKER_CONTAINER}.ports[0].name"),
    (lambda c: c["ports"].append({"name": "metrics-0", "containerPort": 9401}), f"{WORKER_CONTAINER}.ports[1].name"),
])
def test_pod_rules_beyond_the_schema(crds: Path, breakage: Any, path: str) -> None:
    # The API server checks these when the operator creates the pods, i.e. after `helm install`
    # succeeded: the job would sit without pods. The validator checks them on the template.
    job = pytorchjob()
    breakage(_container(job))
    assert path in _paths(_errors(job))


def test_pod_rules_on_core_kinds() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "i", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}]}}
    assert "$.spec.containers[0].volumeMounts[0].name" in _paths(_errors(pod))


@pytest.mark.parametrize("text, value", [("8", 8), (8, 8), ("500m", 0.5), ("64Gi", 64 * 2**30), ("1.5G", 1.5e9),
                                         ("1e3", 1000), ("lots", None)])
def test_quantity(text: Any, value: float | None) -> None:
    assert v.quantity(text) == value


def test_core_kind_typo_and_type_are_rejected() -> None:
    err = _errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "dat": {}})
    assert "dat" in str(err)
    err = _errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"port": 9400}})
    assert "$.data.port" in _paths(err)


def test_trainjob_patch_typo_is_rejected(crds: Path) -> None:
    job = trainjob()
    pod = (job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
           ["template"]["spec"]["template"]["spec"])
    pod["nodeSelectorr"] = pod.pop("nodeSelector")
    err = _errors(job)
    assert any("nodeSelectorr" in p.message for p in err.problems), err


RUNTIME_JOB = "$.spec.template.spec.replicatedJobs[0].template.spec"


def _runtime_job(runtime: dict) -> dict:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]


@pytest.mark.parametrize("breakage, path", [
    (lambda j: j["template"]["spec"].update(restartPolicy="OnFailure"), f"{RUNTIME_JOB}.podFailurePolicy"),
    (lambda j: j["template"]["spec"].update(restartPolicy="Always"), f"{RUNTIME_JOB}.template.spec.restartPolicy"),
    (lambda j: j["podFailurePolicy"]["rules"][0]["onExitCodes"].update(values=[3, 1]),
     f"{RUNTIME_JOB}.podFailurePolicy.rules[0].onExitCodes.values"),
    (lambda j: j["podFailurePolicy"]["rules"][0]["onExitCodes"].update(values=[0, 1]),
     f"{RUNTIME_JOB}.podFailurePolicy.rules[0].onExitCodes.values"),
    (lambda j: j["podFailurePolicy"]["rules"][0]["onExitCodes"].update(containerName="pytorch"),
     f"{RUNTIME_JOB}.podFailurePolicy.rules[0].onExitCodes.containerName"),
])
def test_job_rules_in_a_runtime(crds: Path, breakage: Any, path: str) -> None:
    runtime = trainingruntime()
    breakage(_runtime_job(runtime))
    assert path in _paths(_errors(runtime))


def test_core_job_rules() -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
           "spec": {"podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [1]}}]},
                    "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}}
    validate(job)
    job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    assert "$.spec.podFailurePolicy" in _paths(_errors(job))


def test_missing_crd_folder_skips_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(v.CRD_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(pytest.skip.Exception, match=r"\.\./shared/crds not present"):
        v.require_crds()
    with pytest.raises(CrdsNotPresent):
        validate(pytorchjob())
    validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})  # core kinds still work
