"""The typed job description: ``JobSpec``, a tree of dataclasses mirroring the chart's values.

Every key of ``charts/sam-train/values.yaml`` has a field here, in the same sections, in
snake_case (``gpusPerNode`` -> ``spec.gpus_per_node``, ``nodePool.preset`` ->
``spec.node_pool.preset``), with the chart's defaults. The free-form parts
(``training.config``, ``env``, ``extraVolumes``, ``affinity``, tolerations, labels,
annotations, security contexts) stay dicts and lists.

- :meth:`JobSpec.from_values` takes a chart values tree (camelCase, what ``helm install -f``
  takes), merges it over the defaults the way Helm does (maps key by key, a ``null`` removes a
  default key, lists replaced) and checks every value like values.schema.json
  (:mod:`trainer.launch.fields`): unknown keys and wrong types raise :class:`SpecError`
  naming the dotted key.
- :meth:`JobSpec.load` is ``helm install NAME -f a.yaml --set k=v`` (:mod:`trainer.launch.setvalues`).
- :meth:`JobSpec.to_values` gives the values tree back; rendering the chart with it gives what
  :func:`trainer.launch.build.build_objects` gives.

Cross-field rules (``templates/_validate.tpl``) are checked when objects are built, as Helm
checks them when templates render.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from trainer.launch import fields as fl
from trainer.launch.chart import CHART_NAME, MAX_FULLNAME
from trainer.launch.fields import SpecError, go_quote
from trainer.launch.valuetree import section_kwargs, section_values
from trainer.launch.nodepools import NODE_POOLS

__all__ = ["JobSpec", "SpecError"]


def _v(key: str, default: Any, check: fl.Check | None = None) -> Any:
    """A field holding the chart value ``key`` (camelCase) with ``default`` and a check.

    Sections (dataclass defaults) have no check: their fields check themselves.
    """
    meta = {"key": key, "check": check}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        proto = default
        return field(default_factory=lambda: copy.deepcopy(proto), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass
class Image:
    """``image.*``: the trainer image."""
    repository: str = _v("repository", "ghcr.io/sam-k8s/sam-train", fl.string(min_length=1))
    tag: str = _v("tag", "", fl.string())
    pull_policy: str = _v("pullPolicy", "IfNotPresent", fl.string(enum=("Always", "IfNotPresent", "Never")))
    pull_secrets: list = _v("pullSecrets", [], fl.pull_secrets())


@dataclass
class Resources:
    """``resources.*``: requests and limits of the trainer container besides the GPUs."""
    requests: dict = _v("requests", {"cpu": "8", "memory": "64Gi"}, fl.resource_map())
    limits: dict = _v("limits", {"memory": "128Gi"}, fl.resource_map())


@dataclass
class Training:
    """``training.*``: what the trainer runs (the ConfigMap's config.toml)."""
    preset: str = _v("preset", "vit_h", fl.string(enum=("tiny_cpu", "vit_b", "vit_l", "vit_h")))
    data_shards: str = _v("dataShards", "", fl.string())
    run_dir: str = _v("runDir", "", fl.string())
    checkpoint_url: str = _v("checkpointUrl", "", fl.string())
    config: dict = _v("config", {}, fl.training_config())
    extra_args: list = _v("extraArgs", [], fl.string_list(pattern=fl.EXTRA_ARG, what="section.key=value"))
    max_restarts: int = _v("maxRestarts", 0, fl.integer(minimum=0))
    rendezvous_timeout_seconds: int = _v("rendezvousTimeoutSeconds", 1800, fl.integer(minimum=60))


@dataclass
class Gcs:
    """``gcs.*``: how the trainer reaches gs://."""
    token: str = _v("token", "google_default", fl.string(min_length=1))
    emulator_host: str = _v("emulatorHost", "", fl.string(pattern=fl.HTTP_URL_OR_EMPTY, what="an http(s) URL"))


@dataclass
class Nccl:
    """``nccl.*``: NCCL variables of GPU pods."""
    debug: str = _v("debug", "WARN", fl.string(enum=("", "VERSION", "WARN", "INFO", "TRACE")))
    socket_ifname: str = _v("socketIfname", "", fl.string())
    ib_disable: bool = _v("ibDisable", False, fl.boolean())
    async_error_handling: bool = _v("asyncErrorHandling", True, fl.boolean())
    extra_env: dict = _v("extraEnv", {}, fl.string_map(key_pattern=fl.ENV_NAME, scalars=True))


@dataclass
class ServiceAccount:
    """``serviceAccount.*``: the pods' identity (Workload Identity / IRSA annotations)."""
    create: bool = _v("create", True, fl.boolean())
    name: str = _v("name", "", fl.string(pattern=fl.DNS1123_SUBDOMAIN_OR_EMPTY, max_length=253,
                                         what="a DNS-1123 subdomain"))
    gcp_service_account: str = _v("gcpServiceAccount", "", fl.string(
        pattern=fl.GCP_SERVICE_ACCOUNT, what="a Google service account (GSA@PROJECT.iam.gserviceaccount.com)"))
    aws_role_arn: str = _v("awsRoleArn", "", fl.string(pattern=fl.AWS_ROLE_ARN, what="an IAM role ARN"))
    annotations: dict = _v("annotations", {}, fl.string_map())


@dataclass
class NodePool:
    """``nodePool.*``: where the pods run."""
    preset: str = _v("preset", "none", fl.string(enum=tuple(NODE_POOLS)))
    node_selector: dict = _v("nodeSelector", {}, fl.string_map())
    tolerations: list = _v("tolerations", [], fl.object_list(required=()))
    affinity: dict = _v("affinity", {}, fl.mapping())
    priority_class_name: str = _v("priorityClassName", "", fl.string())


@dataclass
class RunPolicy:
    """``runPolicy.*``: backoff, cleanup, deadlines, suspend."""
    backoff_limit: int = _v("backoffLimit", 20, fl.integer(minimum=0))
    clean_pod_policy: str = _v("cleanPodPolicy", "Running", fl.string(enum=("None", "Running", "All")))
    ttl_seconds_after_finished: int | None = _v("ttlSecondsAfterFinished", None, fl.integer(minimum=0, nullable=True))
    active_deadline_seconds: int | None = _v("activeDeadlineSeconds", None, fl.integer(minimum=1, nullable=True))
    suspend: bool = _v("suspend", False, fl.boolean())


@dataclass
class Scheduling:
    """``scheduling.*``: gang scheduling and queueing."""
    gang: str = _v("gang", "none", fl.string(enum=("none", "volcano", "scheduler-plugins")))
    queue: str = _v("queue", "", fl.string())
    schedule_timeout_seconds: int | None = _v("scheduleTimeoutSeconds", None, fl.integer(minimum=1, nullable=True))
    scheduler_name: str = _v("schedulerName", "", fl.string())
    kueue_queue: str = _v("kueueQueue", "", fl.string(max_length=63))


@dataclass
class Elastic:
    """``elastic.*``: elastic PyTorchJob training."""
    enabled: bool = _v("enabled", False, fl.boolean())
    min_nodes: int = _v("minNodes", 1, fl.integer(minimum=1))
    max_restarts: int = _v("maxRestarts", 3, fl.integer(minimum=0))


@dataclass
class TrainJobSettings:
    """``trainJob.*``: Kubeflow Trainer v2 settings."""
    runtime: str = _v("runtime", "torch-distributed", fl.string(min_length=1))
    runtime_kind: str = _v("runtimeKind", "ClusterTrainingRuntime",
                           fl.string(enum=("ClusterTrainingRuntime", "TrainingRuntime")))
    create_runtime: bool = _v("createRuntime", False, fl.boolean())


_DURATION = fl.string(min_length=1, pattern=fl.DURATION, what="a duration (30s, 15m, 1h)")


@dataclass
class PodMonitor:
    """``monitoring.podMonitor.*`` (the PodMonitor itself is chart-only)."""
    enabled: bool = _v("enabled", False, fl.boolean())
    interval: str = _v("interval", "30s", _DURATION)
    labels: dict = _v("labels", {}, fl.string_map())


@dataclass
class PrometheusRule:
    """``monitoring.prometheusRule.*`` (chart-only object)."""
    enabled: bool = _v("enabled", False, fl.boolean())
    labels: dict = _v("labels", {}, fl.string_map())
    no_progress_window: str = _v("noProgressWindow", "15m", _DURATION)
    checkpoint_max_age_seconds: int = _v("checkpointMaxAgeSeconds", 7200, fl.integer(minimum=1))
    throughput_drop_ratio: float = _v("throughputDropRatio", 0.5, fl.number(exclusive_minimum=0, maximum=1))
    gpu_utilization_min: float = _v("gpuUtilizationMin", 0.5, fl.number(exclusive_minimum=0, maximum=1))
    data_skip_ratio_max: float = _v("dataSkipRatioMax", 0.05, fl.number(exclusive_minimum=0, maximum=1))
    pods_pending_for: str = _v("podsPendingFor", "30m", _DURATION)
    restarts_per_hour_max: int = _v("restartsPerHourMax", 3, fl.integer(minimum=0))
    severity: dict = _v("severity", {}, fl.string_map(key_enum=fl.ALERTS, value_pattern=fl.SEVERITY))
    disabled: list = _v("disabled", [], fl.string_list(enum=fl.ALERTS, unique=True))


@dataclass
class Dashboard:
    """``monitoring.dashboard.*`` (chart-only object)."""
    enabled: bool = _v("enabled", False, fl.boolean())
    labels: dict = _v("labels", {"grafana_dashboard": "1"}, fl.string_map())
    namespace: str = _v("namespace", "", fl.string(pattern=fl.DNS1123_LABEL_OR_EMPTY, what="a namespace name"))
    folder: str = _v("folder", "", fl.string())


@dataclass
class Monitoring:
    """``monitoring.*``: the metrics port, and the chart-only monitoring objects' settings."""
    port: int = _v("port", 9400, fl.integer(minimum=0, maximum=65519))
    prometheus_release: str = _v("prometheusRelease", "kube-prometheus-stack", fl.string())
    pod_monitor: PodMonitor = _v("podMonitor", PodMonitor())
    prometheus_rule: PrometheusRule = _v("prometheusRule", PrometheusRule())
    dashboard: Dashboard = _v("dashboard", Dashboard())


@dataclass
class LauncherRbac:
    """``launcherRbac.*``: RBAC for the Kubeflow Pipelines launch step (chart-only objects)."""
    enabled: bool = _v("enabled", False, fl.boolean())
    service_account_name: str = _v("serviceAccountName", "pipeline-runner",
                                   fl.string(min_length=1, max_length=253, pattern=fl.DNS1123_SUBDOMAIN_OR_EMPTY,
                                             what="a service account name"))
    service_account_namespace: str = _v("serviceAccountNamespace", "",
                                        fl.string(max_length=63, pattern=fl.DNS1123_LABEL_OR_EMPTY,
                                                  what="a namespace name"))
    create_service_account: bool = _v("createServiceAccount", False, fl.boolean())


_NAME = fl.string(max_length=MAX_FULLNAME, pattern=fl.DNS1035_OR_EMPTY, what="a DNS-1035 label")
_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                     "seccompProfile": {"type": "RuntimeDefault"}}
_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


@dataclass
class JobSpec:
    """One training run: the release ``name`` and ``namespace`` plus every chart value."""
    name: str
    namespace: str = "default"
    name_override: str = _v("nameOverride", "", _NAME)
    fullname_override: str = _v("fullnameOverride", "", _NAME)
    job_kind: str = _v("jobKind", "pytorchjob", fl.string(enum=("pytorchjob", "trainjob")))
    image: Image = _v("image", Image())
    nodes: int = _v("nodes", 1, fl.integer(minimum=1))
    gpus_per_node: int = _v("gpusPerNode", 8, fl.integer(minimum=0, maximum=16))
    cpu_processes_per_node: int = _v("cpuProcessesPerNode", 1, fl.integer(minimum=1, maximum=256))
    resources: Resources = _v("resources", Resources())
    shm_size: str = _v("shmSize", "16Gi", fl.string(pattern=fl.SIZE_WITH_UNIT, what="a size with a unit (16Gi, 512Mi, 1G)"))
    training: Training = _v("training", Training())
    env: list = _v("env", [], fl.object_list(required=("name",), named=True))
    extra_volumes: list = _v("extraVolumes", [], fl.object_list(required=("name",)))
    extra_volume_mounts: list = _v("extraVolumeMounts", [], fl.object_list(required=("name", "mountPath")))
    gcs: Gcs = _v("gcs", Gcs())
    nccl: Nccl = _v("nccl", Nccl())
    service_account: ServiceAccount = _v("serviceAccount", ServiceAccount())
    node_pool: NodePool = _v("nodePool", NodePool())
    pod_labels: dict = _v("podLabels", {}, fl.string_map())
    pod_annotations: dict = _v("podAnnotations", {}, fl.string_map())
    pod_security_context: dict = _v("podSecurityContext", _SECURITY_CONTEXT, fl.mapping())
    security_context: dict = _v("securityContext", _CONTAINER_SECURITY, fl.mapping())
    termination_grace_period_seconds: int = _v("terminationGracePeriodSeconds", 300, fl.integer(minimum=0))
    restart_policy: str = _v("restartPolicy", "ExitCode", fl.string(enum=("ExitCode", "OnFailure", "Never")))
    run_policy: RunPolicy = _v("runPolicy", RunPolicy())
    scheduling: Scheduling = _v("scheduling", Scheduling())
    elastic: Elastic = _v("elastic", Elastic())
    train_job: TrainJobSettings = _v("trainJob", TrainJobSettings())
    monitoring: Monitoring = _v("monitoring", Monitoring())
    launcher_rbac: LauncherRbac = _v("launcherRbac", LauncherRbac())

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_values(cls, values: Mapping[str, Any] | None, name: str, namespace: str = "default") -> "JobSpec":
        """The job of ``helm install name -n namespace`` with these chart values (camelCase).

        ``values`` holds only what differs from values.yaml, or a whole tree (``to_values()``).
        Raises:
            SpecError: an unknown key, a wrong type or range (the message starts with the dotted key),
                or a release name Helm would refuse.
        """
        values = {} if values is None else values
        fl.string(min_length=1, max_length=53, pattern=fl.DNS1123_SUBDOMAIN_OR_EMPTY,
                  what="a release name: lowercase letters, digits, '-' and '.'")(name, "release name")
        fl.string(min_length=1, max_length=63, pattern=fl.DNS1123_LABEL_OR_EMPTY,
                  what="a namespace name")(namespace, "namespace")
        if isinstance(values, Mapping) and "global" in values:
            fl.mapping()(values["global"], "global")  # Helm's global values: allowed, unused
            values = {k: v for k, v in values.items() if k != "global"}
        return cls(name=name, namespace=namespace, **section_kwargs(cls, values, ""))

    @classmethod
    def load(cls, value_files: Sequence[str] = (), set_values: Sequence[str] = (), name: str = CHART_NAME,
             namespace: str = "default", set_string_values: Sequence[str] = ()) -> "JobSpec":
        """``helm install NAME -f a.yaml -f b.yaml --set a.b=c --set-string x=007``.

        Files merge in order (maps key by key, lists replaced), then ``--set`` (Helm's syntax:
        ``a.b=1,c=x``, ``list={a,b}``, ``items[0].name=x``; ints, ``true``/``false``, ``null``
        typed) and ``--set-string`` (always strings) apply.
        """
        from trainer.launch.setvalues import layered_values

        return cls.from_values(layered_values(value_files, set_values, set_string_values), name, namespace)

    def with_values(self, values: Mapping[str, Any]) -> "JobSpec":
        """A new spec: these chart values merged over this spec's (as one more ``-f`` file)."""
        from trainer.launch.setvalues import deep_merge

        return JobSpec.from_values(deep_merge(self.to_values(), values), self.name, self.namespace)

    # ------------------------------------------------------------------ views

    def to_values(self) -> dict[str, Any]:
        """The whole chart values tree (camelCase); ``from_values`` of it gives this spec back.

        A default key that this spec removed (``resources.limits.memory`` deleted with ``null``)
        appears as ``null``, so that Helm, which merges the values over values.yaml, removes it too.
        """
        return section_values(self)

    @property
    def fullname(self) -> str:
        """The chart's name for every object: fullnameOverride, the release name, or ``<release>-sam-train``.

        Raises:
            SpecError: the name is not a DNS-1035 label (the chart's message).
        """
        if self.fullname_override:
            if len(self.fullname_override) > MAX_FULLNAME:
                raise SpecError(f"fullnameOverride {go_quote(self.fullname_override)} is "
                                f"{len(self.fullname_override)} characters long; at most {MAX_FULLNAME} are allowed "
                                f"(pod names like <name>-worker-31 must stay DNS labels)")
            full = self.fullname_override
        else:
            # Too long fails instead of being cut: two release names cut alike would share a job.
            full = self.name if self.chart_name in self.name else f"{self.name}-{self.chart_name}"
            if len(full) > MAX_FULLNAME:
                raise SpecError(f"the release name {go_quote(self.name)} gives the full name {go_quote(full)}, "
                                f"{len(full)} characters long; at most {MAX_FULLNAME} are allowed (pod names like "
                                f"<name>-worker-31 must stay DNS labels): choose a shorter release name, one that "
                                f"contains {go_quote(self.chart_name)} (then used as is), or set fullnameOverride")
        if not fl.DNS1035_OR_EMPTY.search(full) or not full:
            raise SpecError(f"the full name {go_quote(full)} (from the release name or fullnameOverride) must be a "
                            f"DNS-1035 label: lowercase letters, digits and '-', starting with a letter; set "
                            f"fullnameOverride")
        return full

    @property
    def chart_name(self) -> str:
        """``app.kubernetes.io/name``: nameOverride or the chart's name."""
        return _trunc(self.name_override or CHART_NAME, MAX_FULLNAME)

    @property
    def procs_per_node(self) -> int:
        """Training processes per pod: one per GPU, else cpuProcessesPerNode."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.cpu_processes_per_node

    @property
    def image_ref(self) -> str:
        """``repository:tag`` (tag defaults to the chart's appVersion; a ``sha256:`` tag is a digest)."""
        from trainer.launch.chart import APP_VERSION

        tag = self.image.tag or APP_VERSION
        sep = "@" if tag.startswith("sha256:") else ":"
        return f"{self.image.repository}{sep}{tag}"

    @property
    def service_account_name(self) -> str:
        """The ServiceAccount the pods run as (created, or an existing one, default ``default``)."""
        if self.service_account.create:
            return self.service_account.name or self.fullname
        return self.service_account.name or "default"


def _trunc(text: str, limit: int) -> str:
    """Sprig's ``trunc N | trimSuffix "-"``: cut, then drop one trailing dash."""
    text = text[:limit]
    return text[:-1] if text.endswith("-") else text
