"""The sam-train chart renders valid, coherent jobs for every preset and a matrix of values.

Rendered with the real Helm v4 library (tests/k8s/render.py) and validated object by object
as strictly as an API server (tests/k8s/validate.py). Per render, the semantic checks below
tie the job to the values: replica counts, processes, GPUs, /dev/shm, metrics ports and the
PodMonitor, command, restart policy, security context, gang scheduling.

The matrix: nodes 1/2/32 x gpusPerNode 0/1/8 x elastic off/on x gang none/volcano/
scheduler-plugins x monitoring off/on x jobKind pytorchjob/trainjob, the full product: 216
combinations, 162 valid (elastic needs a PyTorchJob; the other 54 must fail at render time).
Measured on our 2-core machines: one render ~20 ms (Helm ~10 ms, parsing the YAML the rest),
validating its objects ~11 ms, the semantic checks ~10 ms: ~7 s for all 162, so no covering
design is needed (a pairwise one would have been ~15 cases and missed 3-factor interactions
such as elastic x gang x nodes, which sets schedulingPolicy.minAvailable).
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Iterable, Mapping, Sequence

import pytest
import yaml

from tests.k8s import render as r
from tests.k8s.render import RenderError, deep_merge, effective_values, job_of, named, render
from tests.k8s.validate import CrdsNotPresent, crds_present, validate

RELEASE, NAMESPACE = "rel", "ml"
#: The release name does not contain the chart name, so objects are `<release>-sam-train`.
FULLNAME = "rel-sam-train"
BASE: dict = {"training": {"dataShards": "gs://bucket/sa1b/sa_*.tar", "runDir": "gs://bucket/runs/test"}}
#: What the paper presets need on top of BASE (the chart refuses encoder_init=mae without it).
MAE = {"training": {"config": {"model": {"mae_checkpoint": "gs://bucket/mae_pretrain_vit_huge.pth"}}}}
MONITORING_ON = {"monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                "dashboard": {"enabled": True}}}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
CONFIG_DIR = "/etc/sam-train"
GANG_SCHEDULERS = {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}

FACTORS: dict[str, tuple] = {
    "nodes": (1, 2, 32),
    "gpusPerNode": (0, 1, 8),
    "elastic": (False, True),
    "gang": ("none", "volcano", "scheduler-plugins"),
    "monitoring": (False, True),
    "jobKind": ("pytorchjob", "trainjob"),
}


def possible(case: Mapping[str, Any]) -> bool:
    """Elastic training exists only for PyTorchJob (Trainer v2 removed ElasticPolicy)."""
    return not (case["elastic"] and case["jobKind"] == "trainjob")


def case_values(case: Mapping[str, Any]) -> dict:
    """Chart values of one matrix case, over BASE."""
    values: dict = {
        "nodes": case["nodes"], "gpusPerNode": case["gpusPerNode"], "jobKind": case["jobKind"],
        "elastic": {"enabled": case["elastic"]}, "scheduling": {"gang": case["gang"]},
    }
    if case["monitoring"]:
        values = deep_merge(values, MONITORING_ON)
        if case["jobKind"] == "trainjob":
            # Metrics ports need the chart's own TrainingRuntime (runtimePatches cannot declare ports).
            values["trainJob"] = {"createRuntime": True}
    return deep_merge(BASE, values)


def case_id(case: Mapping[str, Any]) -> str:
    return (f"n{case['nodes']}-g{case['gpusPerNode']}-{'elastic' if case['elastic'] else 'fixed'}-"
            f"{case['gang']}-{'mon' if case['monitoring'] else 'nomon'}-{case['jobKind']}")


ALL_CASES = [dict(zip(FACTORS, levels)) for levels in itertools.product(*FACTORS.values())]
CASES = [case for case in ALL_CASES if possible(case)]
IMPOSSIBLE = [case for case in ALL_CASES if not possible(case)]


# --------------------------------------------------------------------------- checks


def procs_per_node(ev: Mapping[str, Any]) -> int:
    return ev["gpusPerNode"] if ev["gpusPerNode"] > 0 else ev["cpuProcessesPerNode"]


def pod_templates(objects: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """Every full pod template that runs the trainer: PyTorchJob replicas or the chart's runtime."""
    job = job_of(objects)
    if job["kind"] == "PyTorchJob":
        return {f"PyTorchJob.{k}": t for k, t in r.pytorchjob_templates(job).items()}
    out = {}
    for runtime in r.of_kind(objects, "TrainingRuntime"):
        out.update({f"TrainingRuntime.{k}": t for k, t in r.runtime_pod_templates(runtime).items()})
    out.update({f"TrainJob.patch.{k}": t for k, t in r.trainjob_patch_templates(job).items()})
    return out


def trainer_container(template: Mapping[str, Any], kind: str = "PyTorchJob") -> dict:
    """The one trainer container of a pod template: ``pytorch`` in a PyTorchJob (the operator's
    webhook requires it), ``node`` in Trainer v2 (the torch runtime's trainer container)."""
    containers = template["spec"].get("containers") or []
    names = [c["name"] for c in containers]
    want = "pytorch" if kind == "PyTorchJob" else "node"
    found = named(containers, want)
    assert len(found) == 1, f"expected exactly one container named {want!r}, got {names}"
    return found[0]


def check_replicas(ev: Mapping[str, Any], job: Mapping[str, Any]) -> None:
    nodes = ev["nodes"]
    if job["kind"] == "TrainJob":
        assert job["spec"]["trainer"]["numNodes"] == nodes
        assert job["spec"]["trainer"]["numProcPerNode"] == procs_per_node(ev)
        return
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert job["spec"]["nprocPerNode"] == str(procs_per_node(ev))  # a string for the operator
    if ev["elastic"]["enabled"]:
        assert set(specs) == {"Worker"}, "elastic jobs are Worker-only"
        assert specs["Worker"]["replicas"] == nodes
        policy = job["spec"]["elasticPolicy"]
        assert (policy["minReplicas"], policy["maxReplicas"]) == (ev["elastic"]["minNodes"], nodes)
        assert "nProcPerNode" not in policy  # mutually exclusive with spec.nprocPerNode
        # The rendezvous timeout reaches torchrun as PET_RDZV_CONF (no flag: it would replace it).
        assert policy["rdzvConf"] == [{"key": "join_timeout",
                                       "value": str(ev["training"]["rendezvousTimeoutSeconds"])}]
        return
    assert "elasticPolicy" not in job["spec"]
    assert specs["Master"]["replicas"] == 1
    if nodes == 1:
        assert "Worker" not in specs
    else:
        assert specs["Worker"]["replicas"] == nodes - 1
    for spec in specs.values():
        assert spec["restartPolicy"] == ev["restartPolicy"]


def check_container(ev: Mapping[str, Any], template: Mapping[str, Any], kind: str) -> None:
    """GPUs, /dev/shm, the config mount, ports and command of one trainer pod template.

    ``kind``: ``PyTorchJob``, ``TrainingRuntime`` or ``TrainJob.patch`` (a runtime patch: no
    ports, resources or command there; :func:`check_trainjob_trainer` checks the TrainJob's own).
    """
    container = trainer_container(template, kind)
    spec = template["spec"]
    if ev["gpusPerNode"]:
        assert GPU_TOLERATION in (spec.get("tolerations") or []), spec.get("tolerations")
    check_shm_and_config(ev, spec, container)
    if kind == "TrainJob.patch":
        assert not container.get("ports") and not container.get("command")
        return
    check_gpu_limit(ev, container.get("resources"))
    check_ports(ev, container, kind)
    check_command(ev, list(container.get("command") or []) + list(container.get("args") or []))
    check_shutdown_env(ev, container.get("env"))


def check_trainjob_trainer(ev: Mapping[str, Any], job: Mapping[str, Any]) -> None:
    """The container settings a TrainJob sets itself (they win over the runtime's)."""
    trainer = job["spec"]["trainer"]
    check_gpu_limit(ev, trainer.get("resourcesPerNode"))
    check_command(ev, list(trainer.get("command") or []) + list(trainer.get("args") or []))
    check_shutdown_env(ev, trainer.get("env"))
    assert trainer["image"] == "ghcr.io/sam-k8s/sam-train:" + str(ev["image"]["tag"] or "0.1.0")


def check_gpu_limit(ev: Mapping[str, Any], resources: Mapping[str, Any] | None) -> None:
    limits = (resources or {}).get("limits") or {}
    gpus = ev["gpusPerNode"]
    if gpus:
        assert limits.get("nvidia.com/gpu") in (gpus, str(gpus)), limits
    else:
        assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in ((resources or {}).get("requests") or {})


def check_shm_and_config(ev: Mapping[str, Any], spec: Mapping[str, Any], container: Mapping[str, Any]) -> None:
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    assert {"/dev/shm", CONFIG_DIR} <= mounts.keys(), f"mounts: {sorted(mounts)}"
    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": str(ev["shmSize"])}
    config = volumes[mounts[CONFIG_DIR]["name"]]
    assert config["configMap"]["name"] == f"{FULLNAME}-config"
    assert mounts[CONFIG_DIR].get("readOnly") is True


def metrics_ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports") or []
            if p["name"].startswith("metrics-")}


def check_ports(ev: Mapping[str, Any], container: Mapping[str, Any], kind: str) -> None:
    port = ev["monitoring"]["port"]
    want = {f"metrics-{i}": port + i for i in range(procs_per_node(ev))} if port else {}
    assert metrics_ports(container) == want
    assert all(len(p["name"]) <= 15 for p in container.get("ports") or [])  # IANA_SVC_NAME
    if kind == "PyTorchJob":
        assert {"name": "pytorchjob-port", "containerPort": 23456} in [
            {k: p[k] for k in ("name", "containerPort")} for p in container["ports"]]


def check_command(ev: Mapping[str, Any], command: Sequence[str]) -> None:
    command = list(command)
    assert command[:3] == ["python", "-m", "trainer.dist"], command
    tail = ["-m", "trainer.train", "--config", f"{CONFIG_DIR}/config.toml"]
    start = next(i for i in range(len(command)) if command[i:i + 2] == ["-m", "trainer.train"])
    assert command[start:start + len(tail)] == tail, command
    wrapper = command[3:start]
    restarts, timeout = ev["training"]["maxRestarts"], ev["training"]["rendezvousTimeoutSeconds"]
    # The rendezvous timeout is a flag except in elastic jobs (elasticPolicy.rdzvConf there).
    rdzv = [] if ev["elastic"]["enabled"] else [f"--rdzv-conf=join_timeout={timeout},timeout={timeout}"]
    assert wrapper == rdzv + (["--max-restarts", str(restarts)] if restarts else []), wrapper
    extra = command[start + len(tail):]
    assert extra == [x for arg in ev["training"]["extraArgs"] for x in ("--set", arg)], extra
    # Nothing else of the rendezvous: torchrun reads the operator's PET_* variables.
    assert not any(a.startswith(("--rdzv-endpoint", "--rdzv-backend", "--rdzv-id", "--nnodes", "--rdzv_"))
                   for a in command)


def check_shutdown_env(ev: Mapping[str, Any], env: Sequence[Mapping[str, Any]] | None) -> None:
    """SAM_SHUTDOWN_TIMEOUT_S: the grace period minus 15 s for torchrun's workers, at least 5."""
    values = {e["name"]: e.get("value") for e in env or ()}
    want = max(5, ev["terminationGracePeriodSeconds"] - 15)
    assert values.get("SAM_SHUTDOWN_TIMEOUT_S") == str(want), values.get("SAM_SHUTDOWN_TIMEOUT_S")


def check_podmonitor(ev: Mapping[str, Any], objects: Sequence[Mapping[str, Any]]) -> None:
    monitors = r.of_kind(objects, "PodMonitor")
    if not ev["monitoring"]["podMonitor"]["enabled"]:
        assert not monitors
        return
    monitor = r.one(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == ev["monitoring"]["prometheusRelease"]
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    endpoints = spec["podMetricsEndpoints"]
    assert all(e.get("path") == "/metrics" and e.get("interval") == ev["monitoring"]["podMonitor"]["interval"]
               for e in endpoints)
    selector = spec["selector"]["matchLabels"]
    templates = pod_templates(objects)
    full = {k: t for k, t in templates.items() if not k.startswith("TrainJob.patch")}
    assert full, "a PodMonitor without a pod template that declares the metrics ports"
    for where, template in full.items():
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{where}: selector {selector} not in labels {labels}"
        ports = metrics_ports(trainer_container(template, where.split(".")[0]))
        assert sorted(e["port"] for e in endpoints) == sorted(ports), where


def check_scheduling(ev: Mapping[str, Any], objects: Sequence[Mapping[str, Any]]) -> None:
    job = job_of(objects)
    gang = ev["scheduling"]["gang"]
    want_scheduler = ev["scheduling"]["schedulerName"] or GANG_SCHEDULERS.get(gang)
    for where, template in pod_templates(objects).items():
        if where.startswith("TrainJob.patch") and r.of_kind(objects, "TrainingRuntime"):
            continue  # the runtime carries the pod settings
        assert template["spec"].get("schedulerName") == want_scheduler, where
    if job["kind"] == "PyTorchJob":
        policy = job["spec"]["runPolicy"].get("schedulingPolicy")
        if gang == "none":
            assert policy is None
        else:
            min_nodes = ev["elastic"]["minNodes"] if ev["elastic"]["enabled"] else ev["nodes"]
            assert policy["minAvailable"] == min_nodes
        return
    runtimes = r.of_kind(objects, "TrainingRuntime")
    if gang == "none":
        assert all("podGroupPolicy" not in rt["spec"] for rt in runtimes)
        return
    runtime = r.one(objects, "TrainingRuntime")
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert job["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    policy = runtime["spec"]["podGroupPolicy"]
    assert set(policy) == {"coscheduling" if gang == "scheduler-plugins" else "volcano"}


def check_render(values: Mapping[str, Any], objects: Sequence[Mapping[str, Any]]) -> None:
    """Every per-render check (values: what was passed, without the chart defaults)."""
    ev = effective_values(values)
    job = job_of(objects)
    assert job["metadata"]["name"] == FULLNAME and job["metadata"]["namespace"] == NAMESPACE
    check_replicas(ev, job)
    if job["kind"] == "TrainJob":
        check_trainjob_trainer(ev, job)
    for where, template in pod_templates(objects).items():
        check_container(ev, template, where.rsplit(".", 1)[0])
        assert restricted_violations(template["spec"], partial=where.startswith("TrainJob.patch")) == [], where
    check_podmonitor(ev, objects)
    check_scheduling(ev, objects)


# --------------------------------------------------------------------------- Pod Security "restricted"

_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}
_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def restricted_violations(spec: Mapping[str, Any], partial: bool = False) -> list[str]:
    """The Pod Security Standard "restricted" rules (v1.31) checkable on a pod spec, as messages.

    ``partial``: a TrainJob patch, whose containers are merged into the runtime's (no image).
    """
    out = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"{field} is set")
    pod_sc = spec.get("securityContext") or {}
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: type {sorted(kinds - _RESTRICTED_VOLUMES)} not allowed")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod seccompProfile Unconfined")
    out += [f"pod: {m}" for m in _baseline_context_violations(pod_sc)]
    unsafe = {s.get("name") for s in pod_sc.get("sysctls") or []} - _SAFE_SYSCTLS
    if unsafe:
        out.append(f"pod sysctls {sorted(unsafe)} not in the safe set")
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if not containers and not partial:
        out.append("no containers")
    for c in containers:
        out += [f"container {c['name']}: {m}" for m in _container_violations(c.get("securityContext") or {}, pod_sc)]
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"container {c['name']}: hostPort")
    return out


def _container_violations(sc: Mapping[str, Any], pod_sc: Mapping[str, Any]) -> list[str]:
    out = []
    if sc.get("privileged"):
        out.append("privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation must be false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append("capabilities.drop must contain ALL")
    if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
        out.append(f"capabilities.add {caps.get('add')}")
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if non_root is not True:
        out.append("runAsNonRoot must be true (pod or container)")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.append("runAsUser 0")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"seccompProfile {seccomp!r} (RuntimeDefault or Localhost)")
    if sc.get("procMount") not in (None, "Default"):
        out.append("procMount")
    return out + _baseline_context_violations(sc)


def _baseline_context_violations(sc: Mapping[str, Any]) -> list[str]:
    """AppArmor, SELinux and Windows host-process rules shared by pod and container contexts."""
    out = []
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append("appArmorProfile Unconfined")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type") not in _SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        out.append(f"seLinuxOptions {selinux}")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("windowsOptions.hostProcess")
    return out


# --------------------------------------------------------------------------- tests


def _validate_all(objects: Iterable[Mapping[str, Any]]) -> None:
    for obj in objects:
        try:
            validate(obj)
        except CrdsNotPresent:
            pass  # custom kinds need ../shared/crds (test_custom_kinds_need_crds skips saying so)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matrix_case_renders_valid_and_coherent(case: dict) -> None:
    values = case_values(case)
    objects = render(values, name=RELEASE, namespace=NAMESPACE)
    _validate_all(objects)
    check_render(values, objects)


@pytest.mark.parametrize("case", IMPOSSIBLE, ids=case_id)
def test_elastic_trainjob_fails_naming_the_values(case: dict) -> None:
    with pytest.raises(RenderError) as info:
        render(case_values(case))
    assert "elastic.enabled" in str(info.value) and "jobKind" in str(info.value)


@pytest.mark.parametrize("preset", r.preset_names())
def test_preset_renders_valid_and_coherent(preset: str) -> None:
    values = deep_merge(r.load_preset(preset), BASE, MAE if preset.startswith("vit") else {})
    objects = render(values, name=RELEASE, namespace=NAMESPACE)
    _validate_all(objects)
    check_render(values, objects)


def oldest_kubernetes() -> str:
    """The lowest Kubernetes minor version Chart.yaml's kubeVersion admits (``>=1.27.0-0`` -> 1.27)."""
    constraint = yaml.safe_load((r.CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    found = re.match(r"^>=\s*v?(\d+)\.(\d+)", constraint)
    assert found, f"kubeVersion {constraint!r}: expected a lower bound like >=1.27.0-0"
    return f"{found[1]}.{found[2]}"


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("preset", r.preset_names())
def test_preset_validates_on_the_oldest_supported_kubernetes(preset: str, job_kind: str) -> None:
    # Core fields newer than the chart's minimum (e.g. securityContext.appArmorProfile, 1.30)
    # would be rejected there: the pod templates are checked against that version's schema.
    version = oldest_kubernetes()
    values = deep_merge(r.load_preset(preset), BASE, MAE if preset.startswith("vit") else {}, {"jobKind": job_kind})
    for obj in render(values, name=RELEASE, namespace=NAMESPACE, kube_version=f"v{version}.0"):
        try:
            validate(obj, kube_version=version)
        except CrdsNotPresent:
            pass


@pytest.mark.parametrize("preset", r.preset_names())
def test_preset_lints_clean(preset: str) -> None:
    values = deep_merge(r.load_preset(preset), BASE, MAE if preset.startswith("vit") else {})
    assert r.lint_errors(r.lint(values)) == []


def test_restricted_check_rejects_what_the_standard_forbids() -> None:
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "pytorch", "securityContext": {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_violations(good) == []
    breakages = [
        lambda s: s.update(hostNetwork=True),
        lambda s: s["securityContext"].update(runAsNonRoot=False),
        lambda s: s["securityContext"].pop("seccompProfile"),
        lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
        lambda s: s.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]),
        lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        lambda s: s["containers"][0]["securityContext"].update(runAsUser=0),
        lambda s: s["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]),
    ]
    for index, breakage in enumerate(breakages):
        spec = copy.deepcopy(good)
        breakage(spec)
        assert restricted_violations(spec), index


@pytest.mark.parametrize("preset", r.preset_names())
def test_install_dry_run_gives_the_rendered_objects(preset: str) -> None:
    values = deep_merge(r.load_preset(preset), BASE, MAE if preset.startswith("vit") else {}, MONITORING_ON)
    release = r.install_dry_run(values, name=RELEASE, namespace=NAMESPACE)
    installed = [d for d in yaml.safe_load_all(release["manifest"]) if d]

    def names(objects: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
        return sorted((o["kind"], o["metadata"]["name"]) for o in objects)

    assert names(installed) == names(render(values, name=RELEASE, namespace=NAMESPACE))
    assert release["notes"].strip() == r.notes(values, name=RELEASE, namespace=NAMESPACE).strip()


def test_presets_exist() -> None:
    assert set(r.preset_names()) >= {"tiny-cpu", "vit-b-a100", "vit-l-a100", "vit-h-a100",
                                     "vit-b-h100", "vit-l-h100", "vit-h-h100"}


def test_custom_kinds_need_crds() -> None:
    if not crds_present():
        pytest.skip("../shared/crds not present: custom kinds (PyTorchJob, TrainJob, PodMonitor, "
                    "PrometheusRule) were rendered but not schema-validated")


def test_defaults_lint_clean() -> None:
    assert r.lint_errors(r.lint(BASE)) == []
