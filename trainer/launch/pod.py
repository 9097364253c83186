"""The pod of one training node: ``charts/sam-train/templates/_pod.tpl`` in Python.

Built once per job and used by the PyTorchJob (both replica types), the TrainingRuntime and the
TrainJob's runtimePatches. :func:`pod_pieces` returns the pieces (labels, annotations, scheduling,
volumes, container settings); :func:`pod_template` assembles a PodTemplateSpec from them with
the fields in the chart's order and the chart's omissions (empty pieces are left out).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from trainer.launch.configtoml import config_toml, go_string
from trainer.launch.fields import SpecError
from trainer.launch.nodepools import GPU_TOLERATION, node_pool
from trainer.launch.spec import JobSpec

CONFIG_DIR = "/etc/sam-train"
CONFIG_PATH = f"{CONFIG_DIR}/config.toml"
#: The port PyTorchJob's MASTER_PORT/PET_MASTER_PORT point at, declared so that the operator does not add it.
PYTORCHJOB_PORT = 23456


@dataclass
class PodPieces:
    """What a training pod gets (see the module docstring); lists and dicts are fresh copies."""
    labels: dict
    annotations: dict
    service_account_name: str
    node_selector: dict
    tolerations: list
    affinity: dict
    priority_class_name: str
    scheduler_name: str
    image_pull_secrets: list
    security_context: dict
    termination_grace_period_seconds: int
    volumes: list
    command: list
    ports: list
    resources: dict
    env: list
    volume_mounts: list
    container_security_context: dict


def config_text(spec: JobSpec) -> str:
    """The chart's ``config.toml`` text without its final newline (what ``checksum/config`` hashes)."""
    training = spec.training
    return config_toml(training.preset, training.config, training.data_shards, training.run_dir,
                       training.checkpoint_url, spec.monitoring.port)


def selector_labels(spec: JobSpec) -> dict[str, str]:
    """The labels every training pod carries; the PodMonitor selects by them."""
    return {"app.kubernetes.io/name": spec.chart_name, "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/component": "trainer"}


def scheduler_name(spec: JobSpec) -> str:
    """scheduling.schedulerName, else the gang scheduler's, else empty (the cluster default)."""
    if spec.scheduling.scheduler_name:
        return spec.scheduling.scheduler_name
    return {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}.get(spec.scheduling.gang, "")


def command(spec: JobSpec) -> list[str]:
    """``python -m trainer.dist [--rdzv-conf=...] [--max-restarts N] -m trainer.train --config FILE [--set X ...]``.

    No other rendezvous flags: torchrun reads the operator's PET_* variables as flag defaults. The
    rendezvous timeout is a flag of non-elastic jobs; an elastic PyTorchJob carries it in
    ``elasticPolicy.rdzvConf`` (the operator's PET_RDZV_CONF, which a flag would replace).
    """
    cmd = ["python", "-m", "trainer.dist"]
    if not spec.elastic.enabled:
        timeout = spec.training.rendezvous_timeout_seconds
        cmd.append(f"--rdzv-conf=join_timeout={timeout},timeout={timeout}")
    if spec.training.max_restarts > 0:
        cmd += ["--max-restarts", str(spec.training.max_restarts)]
    cmd += ["-m", "trainer.train", "--config", CONFIG_PATH]
    for arg in spec.training.extra_args:
        cmd += ["--set", go_string(arg)]
    return cmd


def shutdown_timeout(spec: JobSpec) -> int:
    """Seconds the pod's torchrun wrapper gives its workers after SIGTERM: the grace period - 15, at least 5."""
    return max(5, spec.termination_grace_period_seconds - 15)


def env(spec: JobSpec) -> list[dict]:
    """The chart's variables, then the node pool preset's, then ``env``; the last entry of a name wins."""
    items: list[dict] = [{"name": "SAM_RUN_NAME", "value": spec.fullname},
                         {"name": "SAM_GCS_TOKEN", "value": go_string(spec.gcs.token)}]
    if spec.gcs.emulator_host:
        items.append({"name": "STORAGE_EMULATOR_HOST", "value": spec.gcs.emulator_host})
        # gcsfs probes each bucket over gRPC and waits 60 s per call against an emulator.
        items.append({"name": "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "value": "false"})
    items.append({"name": "SAM_LOG_FORMAT", "value": "json"})
    items.append({"name": "SAM_SHUTDOWN_TIMEOUT_S", "value": str(shutdown_timeout(spec))})
    if spec.gpus_per_node > 0:  # NCCL variables only where NCCL runs
        nccl = spec.nccl
        if nccl.debug:
            items.append({"name": "NCCL_DEBUG", "value": nccl.debug})
        if nccl.socket_ifname:
            items.append({"name": "NCCL_SOCKET_IFNAME", "value": nccl.socket_ifname})
        if nccl.ib_disable:
            items.append({"name": "NCCL_IB_DISABLE", "value": "1"})
        if nccl.async_error_handling:
            items.append({"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"})
        items += [{"name": k, "value": go_string(nccl.extra_env[k])} for k in sorted(nccl.extra_env)]
    pool = node_pool(spec.node_pool.preset)
    items += [{"name": k, "value": go_string(pool.env[k])} for k in sorted(pool.env)]
    items += copy.deepcopy(spec.env)
    names = [go_string(e.get("name")) for e in items]
    return [e for i, e in enumerate(items) if names[i] not in names[i + 1:]]


def resources(spec: JobSpec) -> dict:
    """requests and limits as strings, plus the GPUs and the node pool's extra resources (limits)."""
    requests = {k: go_string(v) for k, v in spec.resources.requests.items()}
    limits = {k: go_string(v) for k, v in spec.resources.limits.items()}
    if spec.gpus_per_node > 0:
        if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
            raise SpecError(f"resources sets nvidia.com/gpu, which the chart sets from gpusPerNode "
                            f"({spec.gpus_per_node}); remove it from resources")
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    for name, amount in node_pool(spec.node_pool.preset).extra_resources.items():
        limits.setdefault(name, go_string(amount))
    out: dict[str, dict] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def tolerations(spec: JobSpec) -> list[dict]:
    """The preset's, the GPU one on GPU pods, then nodePool.tolerations; exact duplicates dropped."""
    candidates = list(node_pool(spec.node_pool.preset).tolerations)
    if spec.gpus_per_node > 0:
        candidates.append(GPU_TOLERATION)
    candidates += spec.node_pool.tolerations
    out, seen = [], set()
    for toleration in candidates:
        ident = json.dumps(_canonical(toleration), sort_keys=True)  # the chart compares toJson texts
        if ident not in seen:
            seen.add(ident)
            out.append(copy.deepcopy(dict(toleration)))
    return out


def _canonical(value: Any) -> Any:
    """Numbers as Helm holds them (float64: 3600 and 3600.0 are one value)."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def ports(spec: JobSpec, kind: str) -> list[dict]:
    """pytorchjob-port (PyTorchJob only), then ``metrics-<local rank>`` on ``port + local rank``."""
    out = []
    if kind == "pytorchjob":
        out.append({"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"})
    if spec.monitoring.port > 0:
        out += [{"name": f"metrics-{i}", "containerPort": spec.monitoring.port + i, "protocol": "TCP"}
                for i in range(spec.procs_per_node)]
    return out


def pod_pieces(spec: JobSpec, kind: str) -> PodPieces:
    """The pieces of the pod for ``kind`` ``pytorchjob`` (container ``pytorch``) or ``trainjob`` (``node``)."""
    pool = node_pool(spec.node_pool.preset)
    labels = {**spec.pod_labels, **selector_labels(spec)}  # the selector labels win
    annotations = {**spec.pod_annotations,
                   "checksum/config": hashlib.sha256(config_text(spec).encode()).hexdigest(),
                   "kubectl.kubernetes.io/default-container": container_name(kind)}
    secrets = [{"name": s} if isinstance(s, str) else copy.deepcopy(s) for s in spec.image.pull_secrets]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": go_string(spec.shm_size)}},
               {"name": "config", "configMap": {"name": f"{spec.fullname}-config"}}] + copy.deepcopy(spec.extra_volumes)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}] + copy.deepcopy(spec.extra_volume_mounts)
    return PodPieces(
        labels=labels, annotations=annotations, service_account_name=spec.service_account_name,
        node_selector=mergo(spec.node_pool.node_selector, pool.node_selector),  # the user's labels win
        tolerations=tolerations(spec), affinity=copy.deepcopy(spec.node_pool.affinity),
        priority_class_name=spec.node_pool.priority_class_name, scheduler_name=scheduler_name(spec),
        image_pull_secrets=secrets, security_context=copy.deepcopy(spec.pod_security_context),
        termination_grace_period_seconds=spec.termination_grace_period_seconds, volumes=volumes,
        command=command(spec), ports=ports(spec, kind), resources=resources(spec), env=env(spec),
        volume_mounts=mounts, container_security_context=copy.deepcopy(spec.security_context))


def mergo(dst: dict, src: dict) -> dict:
    """Sprig's ``merge dst src`` of flat maps: ``dst`` wins, except where its value is empty ("", 0, false, null)."""
    out = copy.deepcopy(dict(dst))
    for key, value in src.items():
        if key not in out or not out[key]:
            out[key] = copy.deepcopy(value)
    return out


def container_name(kind: str) -> str:
    """``pytorch`` (the PyTorchJob webhook requires it) or ``node`` (the torch runtime's trainer container)."""
    return "pytorch" if kind == "pytorchjob" else "node"


def _put(target: dict, key: str, value: Any) -> None:
    """Sets ``key`` unless ``value`` is empty, as the chart's ``{{- with }}`` blocks do."""
    if value:
        target[key] = copy.deepcopy(value)


def pod_template(spec: JobSpec, kind: str, restart_policy: str = "") -> dict:
    """A PodTemplateSpec for ``kind``; ``restart_policy`` only for the TrainingRuntime's Job pods."""
    p = pod_pieces(spec, kind)
    pod: dict[str, Any] = {}
    _put(pod, "restartPolicy", restart_policy)
    pod["serviceAccountName"] = p.service_account_name
    _put(pod, "schedulerName", p.scheduler_name)
    _put(pod, "priorityClassName", p.priority_class_name)
    _put(pod, "nodeSelector", p.node_selector)
    _put(pod, "tolerations", p.tolerations)
    _put(pod, "affinity", p.affinity)
    _put(pod, "imagePullSecrets", p.image_pull_secrets)
    _put(pod, "securityContext", p.security_context)
    pod["terminationGracePeriodSeconds"] = p.termination_grace_period_seconds
    container: dict[str, Any] = {"name": container_name(kind), "image": spec.image_ref,
                                 "imagePullPolicy": spec.image.pull_policy, "command": p.command}
    _put(container, "ports", p.ports)
    _put(container, "resources", p.resources)
    container["env"] = p.env
    container["volumeMounts"] = p.volume_mounts
    _put(container, "securityContext", p.container_security_context)
    pod["containers"] = [container]
    pod["volumes"] = p.volumes
    return {"metadata": {"labels": p.labels, "annotations": p.annotations}, "spec": pod}
