"""Cross-field rules: ``charts/sam-train/templates/_validate.tpl`` in Python, with the same messages.

values.schema.json checks one value at a time (:mod:`trainer.launch.fields`); these rules
involve several, and fail when objects are built, as the chart fails when its templates render.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from trainer.launch.configtoml import CHART_OWNED, go_string
from trainer.launch.fields import SpecError, go_quote
from trainer.launch.pod import config_text
from trainer.launch.spec import JobSpec


def own_runtime(spec: JobSpec) -> bool:
    """A TrainJob gets the chart's own TrainingRuntime: asked for, or needed for gang scheduling."""
    return spec.job_kind == "trainjob" and (spec.train_job.create_runtime or spec.scheduling.gang != "none")


def check_rules(spec: JobSpec) -> None:
    """Raise SpecError (the chart's message) for the first rule the spec breaks, in the chart's order."""
    _check_elastic(spec)
    _check_restarts(spec)
    _check_trainjob_only_values(spec)
    _check_identity(spec)
    _check_image(spec)
    _check_resources(spec)
    _check_extra_args(spec)
    _check_metrics(spec)
    _check_gang(spec)
    _check_trainjob(spec)
    _check_mounts(spec)
    _check_encoder_init(spec)
    spec.fullname  # noqa: B018 - a bad release name fails here, as in the chart's helpers
    config_text(spec)  # required keys, chart-owned keys, TOML types


def _check_elastic(spec: JobSpec) -> None:
    # Elastic training exists only in PyTorchJob (Trainer v2 removed torch ElasticPolicy).
    if not spec.elastic.enabled:
        return
    if spec.job_kind == "trainjob":
        raise SpecError("elastic.enabled=true needs jobKind=pytorchjob: Kubeflow Trainer v2 (TrainJob) has no elastic "
                        "PyTorch training; set elastic.enabled=false or jobKind=pytorchjob")
    if spec.elastic.min_nodes > spec.nodes:
        raise SpecError(f"elastic.minNodes ({spec.elastic.min_nodes}) must not exceed nodes ({spec.nodes}), the most "
                        f"Worker pods")
    # Both would be torchrun's --max-restarts: the operator's PET_MAX_RESTARTS and the flag.
    if spec.training.max_restarts > 0:
        raise SpecError(f"training.maxRestarts ({spec.training.max_restarts}) with elastic.enabled=true: both are "
                        f"torchrun's --max-restarts (the operator passes elastic.maxRestarts as PET_MAX_RESTARTS); set "
                        f"elastic.maxRestarts and leave training.maxRestarts 0")


def _check_restarts(spec: JobSpec) -> None:
    # ExitCode with backoffLimit 0: training-operator v1.9 fails the job at the first pod failure,
    # a drain's 143 included; the chart's runtime (maxRestarts 0) the same.
    if spec.restart_policy == "ExitCode" and spec.run_policy.backoff_limit == 0 and (
            spec.job_kind != "trainjob" or own_runtime(spec)):
        raise SpecError("runPolicy.backoffLimit=0 with restartPolicy=ExitCode fails the run at the first pod failure, "
                        "even a retryable one (143 after a node drain or preemption, 200 after a peer's loss): set "
                        "runPolicy.backoffLimit >= 1, or restartPolicy=Never to fail at the first failure on purpose")


def _check_trainjob_only_values(spec: JobSpec) -> None:
    # Values a TrainJob has no place for: refused instead of silently dropped.
    if spec.job_kind != "trainjob":
        return
    if spec.run_policy.ttl_seconds_after_finished is not None:
        raise SpecError("runPolicy.ttlSecondsAfterFinished is PyTorchJob-only: a TrainJob (jobKind=trainjob) has no TTL; "
                        "leave it null (delete finished TrainJobs with helm uninstall)")
    if spec.run_policy.clean_pod_policy != "Running":
        raise SpecError(f"runPolicy.cleanPodPolicy={spec.run_policy.clean_pod_policy} is PyTorchJob-only: a TrainJob "
                        f"(jobKind=trainjob) cleans its pods through the JobSet; leave it at its default (Running)")


def _check_identity(spec: JobSpec) -> None:
    # The identity annotations live on the ServiceAccount the chart creates.
    account = spec.service_account
    if account.create:
        return
    for key, value in (("gcpServiceAccount", account.gcp_service_account), ("awsRoleArn", account.aws_role_arn),
                       ("annotations", account.annotations)):
        if value:
            raise SpecError(f"serviceAccount.{key} is set but serviceAccount.create=false: the chart annotates only the "
                            f"ServiceAccount it creates; annotate your account {go_quote(spec.service_account_name)} "
                            f"yourself and remove serviceAccount.{key}, or set serviceAccount.create=true")


def _check_image(spec: JobSpec) -> None:
    # The tag or digest goes in image.tag (the chart appends `:<tag>`).
    repo = spec.image.repository
    if "@" in repo:
        raise SpecError(f"image.repository {go_quote(repo)} contains a digest: set image.repository to the part before "
                        f"'@' and image.tag to the sha256:... digest")
    if re.search(r":[^/]*\Z", repo):
        raise SpecError(f"image.repository {go_quote(repo)} contains a tag (after its last '/'): set "
                        f"image.repository={re.sub(r':[^/]*$', '', repo)} and image.tag={re.sub(r'^.*:', '', repo)}")


_QUANTITY = re.compile(r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][-+]?[0-9]+)?\Z")
_FACTORS = {"": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
            "Ki": 1024.0, "Mi": 1048576.0, "Gi": 1073741824.0, "Ti": 1099511627776.0, "Pi": 1125899906842624.0,
            "Ei": 1152921504606846976.0}


def quantity_value(value: Any, path: str) -> float:
    """A Kubernetes quantity as a number, as the chart's ``sam-train.quantity`` computes it.

    Sprig's ``mulf`` multiplies in decimal, then rounds to a float64: so does this.
    """
    text = go_string(value)
    found = _QUANTITY.match(text)
    if not found:
        raise SpecError(f"{path} {go_quote(text)} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi, 1G)")
    digits, suffix = found[1], text[found.end(1):]
    if suffix in _FACTORS:
        return float(Decimal(repr(float(digits))) * Decimal(repr(_FACTORS[suffix])))
    return float(text.removeprefix("+"))  # an exponent (1e3): the whole text is a float


def _check_resources(spec: JobSpec) -> None:
    # /dev/shm is memory-backed and counts against the container's memory limit.
    requests, limits = spec.resources.requests, spec.resources.limits
    shm = quantity_value(spec.shm_size, "shmSize")
    shown = go_string(spec.shm_size)
    if shm < 1048576.0:
        raise SpecError(f"shmSize {shown} is below 1Mi: data loader workers pass batches through /dev/shm (e.g. 16Gi)")
    if not limits.get("memory"):
        raise SpecError(f"resources.limits.memory is required: /dev/shm (shmSize {shown}) is memory-backed and counts "
                        f"against it, and without a limit a filling /dev/shm is bounded by nothing but the node (e.g. "
                        f"--set resources.limits.memory=128Gi)")
    if shm >= quantity_value(limits["memory"], "resources.limits.memory"):
        raise SpecError(f"shmSize {shown} must be below resources.limits.memory {go_string(limits['memory'])}: /dev/shm "
                        f"counts against the container's memory limit, so the training processes would have nothing "
                        f"left (OOM kill, exit 137)")
    for name in ("cpu", "memory", "ephemeral-storage"):
        if requests.get(name) and limits.get(name):
            request = quantity_value(requests[name], f"resources.requests.{name}")
            if request > quantity_value(limits[name], f"resources.limits.{name}"):
                raise SpecError(f"resources.requests.{name} ({go_string(requests[name])}) exceeds resources.limits."
                                f"{name} ({go_string(limits[name])}): the API server rejects such pods")


def _check_extra_args(spec: JobSpec) -> None:
    # training.extraArgs (`--set`, applied last) may not override the keys the chart sets.
    owned = {f"{section}.{key}": owner for section, key, owner in CHART_OWNED}
    for arg in spec.training.extra_args:
        key = go_string(arg).split("=")[0].strip()
        if key in owned:
            raise SpecError(f"training.extraArgs {go_quote(go_string(arg))} sets {key}, which the chart sets from "
                            f"{owned[key]}: set {owned[key]} instead and remove it from training.extraArgs")


def _check_metrics(spec: JobSpec) -> None:
    # The PodMonitor scrapes ports that must exist.
    port = spec.monitoring.port
    if spec.monitoring.pod_monitor.enabled and port == 0:
        raise SpecError("monitoring.podMonitor.enabled=true needs monitoring.port > 0 (monitoring.port 0 turns the "
                        "trainer's exporter off: nothing to scrape)")
    if port + spec.procs_per_node - 1 > 65535:
        raise SpecError(f"monitoring.port {port} + {spec.procs_per_node} local ranks exceeds port 65535")


def _check_gang(spec: JobSpec) -> None:
    # Gang-scheduling knobs that only some gang schedulers read.
    sched = spec.scheduling
    if sched.queue and sched.gang != "volcano":
        raise SpecError(f"scheduling.queue {go_quote(sched.queue)} is a Volcano queue and needs scheduling.gang=volcano "
                        f"(got {go_quote(sched.gang)})")
    timeout_set = sched.schedule_timeout_seconds is not None
    if timeout_set and sched.gang == "none":
        raise SpecError("scheduling.scheduleTimeoutSeconds is set but scheduling.gang is none: set "
                        "scheduling.gang=volcano or scheduler-plugins, or leave it null")
    if spec.job_kind == "trainjob" and sched.gang not in ("none", "scheduler-plugins") and timeout_set:
        raise SpecError("scheduling.scheduleTimeoutSeconds with jobKind=trainjob exists only for "
                        "scheduling.gang=scheduler-plugins (podGroupPolicy.coscheduling); Trainer's volcano policy has "
                        "no timeout")


def _check_trainjob(spec: JobSpec) -> None:
    # What the runtimePatches of Trainer v2.3 cannot carry.
    if spec.job_kind == "trainjob" and not own_runtime(spec):
        where = f"(runtime {spec.train_job.runtime_kind} {go_quote(spec.train_job.runtime)})"
        hint = ("; set trainJob.createRuntime=true: the chart then renders its own TrainingRuntime, where it has a "
                "place")
        if spec.node_pool.priority_class_name:
            raise SpecError(f"nodePool.priorityClassName has no place in a TrainJob's runtimePatches {where}{hint}")
        if spec.scheduling.scheduler_name:
            raise SpecError(f"scheduling.schedulerName has no place in a TrainJob's runtimePatches {where}{hint}")
        if spec.monitoring.pod_monitor.enabled:
            raise SpecError(f"monitoring.podMonitor.enabled=true with jobKind=trainjob needs the metrics container "
                            f"ports (metrics-0..), which a TrainJob's runtimePatches cannot declare {where}{hint}")


def _check_mounts(spec: JobSpec) -> None:
    # Every extra mount names a volume: the API server would reject the operator's pods later.
    volumes = ["dshm", "config"] + [v.get("name") for v in spec.extra_volumes]
    for i, mount in enumerate(spec.extra_volume_mounts):
        if mount.get("name") not in volumes:
            raise SpecError(f"extraVolumeMounts[{i}].name {go_quote(str(mount.get('name')))} names no volume: add it "
                            f"to extraVolumes (have: {', '.join(str(v) for v in volumes)})")


def _check_encoder_init(spec: JobSpec) -> None:
    # The trainer refuses an initialisation without its checkpoint (exit 2): say so before submitting.
    model = spec.training.config.get("model") or {}
    init = str(model.get("encoder_init") or "")
    if init == "mae" and not model.get("mae_checkpoint"):
        raise SpecError("training.config.model.mae_checkpoint is required with training.config.model.encoder_init=mae "
                        "(the paper's init, e.g. gs://bucket/mae_pretrain_vit_huge.pth)")
    if init == "sam" and not model.get("init_checkpoint"):
        raise SpecError("training.config.model.init_checkpoint is required with training.config.model.encoder_init=sam "
                        "(an official SAM .pth or one of our checkpoints)")
