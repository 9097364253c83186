"""The job's Kubernetes objects, built in Python exactly as the Helm chart renders them.

:func:`build_objects` is ``helm template`` of ``charts/sam-train`` for ``spec.to_values()``, minus
the chart-only objects (:func:`chart_only`: the monitoring objects, which need the Prometheus
Operator and Grafana, and the pipeline launcher's RBAC, which a launcher cannot grant itself). In
creation order: the ConfigMap ``<fullname>-config`` (``config.toml``), the ServiceAccount (when
``serviceAccount.create``), the TrainingRuntime (a TrainJob with ``trainJob.createRuntime`` or gang
scheduling), and the PyTorchJob (``kubeflow.org/v1``) or TrainJob (``trainer.kubeflow.org/v1alpha1``).

The objects equal the chart's field by field (``tests/unit/test_launch_build.py`` renders both),
except for :data:`DIFFERENCES_FROM_HELM`.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

from trainer.launch.chart import APP_VERSION, CHART_NAME, CHART_VERSION, MANAGED_BY
from trainer.launch.fields import SpecError
from trainer.launch.pod import config_text, pod_pieces, pod_template
from trainer.launch.rules import check_rules, own_runtime
from trainer.launch.spec import JobSpec

#: Where a built object may differ from the chart's: (JSON-pointer-like path, why). Nothing else may.
DIFFERENCES_FROM_HELM: tuple[tuple[str, str], ...] = (
    ("metadata.labels.app.kubernetes.io/managed-by",
     f"`{MANAGED_BY}` instead of `Helm`: the objects are not part of a Helm release (`helm list` does not show "
     f"them and `helm upgrade` must not adopt them)"),
)
#: Kinds of the chart that the builder leaves out.
CHART_ONLY_KINDS = ("PodMonitor", "PrometheusRule", "Role", "RoleBinding")
#: ``app.kubernetes.io/component`` of the chart's objects that the builder leaves out (the dashboard
#: ConfigMap, the launcher's ServiceAccount); the builder's objects are all ``trainer``.
CHART_ONLY_COMPONENTS = ("monitoring", "launcher")
JOB_KINDS = ("PyTorchJob", "TrainJob")
TRAINER_GROUP = "trainer.kubeflow.org"
#: The field manager named in the TrainJob's runtimePatches (the chart's, so both give one object).
RUNTIME_PATCH_MANAGER = "sam-train.helm.chart"


def chart_only(obj: Mapping[str, Any]) -> bool:
    """Whether a rendered chart object is one the builder leaves out."""
    component = ((obj.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")
    return obj.get("kind") in CHART_ONLY_KINDS or component in CHART_ONLY_COMPONENTS


def labels(spec: JobSpec, component: str = "trainer") -> dict[str, str]:
    """The standard labels of every object (``app.kubernetes.io/managed-by`` is the builder's)."""
    chart = f"{CHART_NAME}-{CHART_VERSION}".replace("+", "_")[:63]
    return {"helm.sh/chart": chart[:-1] if chart.endswith("-") else chart,
            "app.kubernetes.io/name": spec.chart_name, "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/version": APP_VERSION, "app.kubernetes.io/managed-by": MANAGED_BY,
            "app.kubernetes.io/component": component}


def _metadata(spec: JobSpec, name: str, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": spec.namespace, "labels": {**labels(spec), **(extra_labels or {})}}


def _job_labels(spec: JobSpec) -> dict[str, str]:
    return {"kueue.x-k8s.io/queue-name": spec.scheduling.kueue_queue} if spec.scheduling.kueue_queue else {}


def config_map(spec: JobSpec) -> dict[str, Any]:
    """``<fullname>-config`` with ``config.toml`` (mounted read-only at /etc/sam-train)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec, f"{spec.fullname}-config"),
            "data": {"config.toml": config_text(spec) + "\n"}}


def service_account(spec: JobSpec) -> dict[str, Any]:
    """The pods' identity: Workload Identity / IRSA annotations; no API token mounted."""
    account = spec.service_account
    annotations = dict(account.annotations)
    if account.gcp_service_account:
        annotations["iam.gke.io/gcp-service-account"] = account.gcp_service_account
    if account.aws_role_arn:
        annotations["eks.amazonaws.com/role-arn"] = account.aws_role_arn
    meta = _metadata(spec, spec.service_account_name)
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False}


def pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """The PyTorchJob: Master + ``nodes - 1`` Workers, or Workers only when elastic."""
    nodes, elastic = spec.nodes, spec.elastic.enabled
    job_spec: dict[str, Any] = {"nprocPerNode": str(spec.procs_per_node)}
    if elastic:
        # How long each pod's torchrun waits for the others to join: the operator's PET_RDZV_CONF.
        job_spec["elasticPolicy"] = {"minReplicas": spec.elastic.min_nodes, "maxReplicas": nodes,
                                     "rdzvBackend": "c10d", "maxRestarts": spec.elastic.max_restarts,
                                     "rdzvConf": [{"key": "join_timeout",
                                                   "value": str(spec.training.rendezvous_timeout_seconds)}]}
    job_spec["runPolicy"] = _run_policy(spec)
    template = pod_template(spec, "pytorchjob")
    replicas: dict[str, Any] = {}
    if not elastic:
        replicas["Master"] = {"replicas": 1, "restartPolicy": spec.restart_policy, "template": template}
    if elastic or nodes > 1:
        replicas["Worker"] = {"replicas": nodes if elastic else nodes - 1, "restartPolicy": spec.restart_policy,
                              "template": copy.deepcopy(template)}
    job_spec["pytorchReplicaSpecs"] = replicas
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": _metadata(spec, spec.fullname, _job_labels(spec)), "spec": job_spec}


def _run_policy(spec: JobSpec) -> dict[str, Any]:
    run = spec.run_policy
    policy: dict[str, Any] = {"backoffLimit": run.backoff_limit, "cleanPodPolicy": run.clean_pod_policy}
    if run.ttl_seconds_after_finished is not None:
        policy["ttlSecondsAfterFinished"] = run.ttl_seconds_after_finished
    if run.active_deadline_seconds is not None:
        policy["activeDeadlineSeconds"] = run.active_deadline_seconds
    if run.suspend:  # only when true: a written `false` would resume a job Kueue suspended, at every update
        policy["suspend"] = True
    sched = spec.scheduling
    if sched.gang != "none":  # the operator (started with --gang-scheduler-name) creates the PodGroup
        gang: dict[str, Any] = {"minAvailable": spec.elastic.min_nodes if spec.elastic.enabled else spec.nodes}
        if sched.queue:
            gang["queue"] = sched.queue
        if sched.schedule_timeout_seconds is not None:
            gang["scheduleTimeoutSeconds"] = sched.schedule_timeout_seconds
        if spec.node_pool.priority_class_name:
            gang["priorityClass"] = spec.node_pool.priority_class_name
        policy["schedulingPolicy"] = gang
    return policy


def trainjob(spec: JobSpec) -> dict[str, Any]:
    """The TrainJob: the referenced runtime plus runtimePatches, or the job's own TrainingRuntime."""
    own = own_runtime(spec)
    p = pod_pieces(spec, "trainjob")
    meta = _metadata(spec, spec.fullname, _job_labels(spec))
    if spec.scheduling.gang == "volcano" and spec.scheduling.queue:
        # Trainer's volcano plugin takes the PodGroup's queue from this annotation of the TrainJob.
        meta["annotations"] = {"scheduling.volcano.sh/queue-name": spec.scheduling.queue}
    if own:
        ref = {"apiGroup": TRAINER_GROUP, "kind": "TrainingRuntime", "name": spec.fullname}
    else:
        ref = {"apiGroup": TRAINER_GROUP, "kind": spec.train_job.runtime_kind, "name": spec.train_job.runtime}
    job_spec: dict[str, Any] = {"runtimeRef": ref}
    if spec.run_policy.suspend:  # only when true, as for the PyTorchJob
        job_spec["suspend"] = True
    if spec.run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    trainer: dict[str, Any] = {"image": spec.image_ref, "command": p.command, "numNodes": spec.nodes,
                               "numProcPerNode": spec.procs_per_node}
    if p.resources:
        trainer["resourcesPerNode"] = p.resources
    trainer["env"] = p.env
    job_spec["trainer"] = trainer
    if not own:
        job_spec["runtimePatches"] = [_runtime_patch(spec)]
    return {"apiVersion": f"{TRAINER_GROUP}/v1alpha1", "kind": "TrainJob", "metadata": meta, "spec": job_spec}


def _runtime_patch(spec: JobSpec) -> dict[str, Any]:
    """Pod settings for the referenced runtime's ``node`` job: what Trainer v2.3's runtimePatches allow."""
    template = pod_template(spec, "trainjob")
    pod = template["spec"]
    container = pod["containers"][0]
    allowed = ("serviceAccountName", "nodeSelector", "tolerations", "affinity", "imagePullSecrets", "securityContext",
               "terminationGracePeriodSeconds", "volumes")
    patch_pod: dict[str, Any] = {k: pod[k] for k in allowed if k in pod}
    patch_container = {"name": "node", "volumeMounts": container["volumeMounts"]}
    if "securityContext" in container:
        patch_container["securityContext"] = container["securityContext"]
    patch_pod["containers"] = [patch_container]
    pod_template_patch = {"metadata": template["metadata"], "spec": patch_pod}
    return {"manager": RUNTIME_PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": "node", "template": {"spec": {"template": pod_template_patch}}}]}}}}


def training_runtime(spec: JobSpec) -> dict[str, Any]:
    """The job's own namespaced TrainingRuntime: torch-distributed's shape plus gang and restart policy.

    ``restartPolicy`` ExitCode: pods never restart in place, exit 1-127 fails the Job
    (podFailurePolicy) and the JobSet; other failures restart the JobSet, at most
    ``runPolicy.backoffLimit`` times. OnFailure: in-place restarts, backoffLimit per Job. Never:
    the first failure fails the run.
    """
    rp, backoff = spec.restart_policy, spec.run_policy.backoff_limit
    runtime_spec: dict[str, Any] = {"mlPolicy": {"numNodes": spec.nodes, "torch": {}}}
    if spec.scheduling.gang == "scheduler-plugins":
        timeout = spec.scheduling.schedule_timeout_seconds
        runtime_spec["podGroupPolicy"] = {"coscheduling": {} if timeout is None else {"scheduleTimeoutSeconds": timeout}}
    elif spec.scheduling.gang == "volcano":
        runtime_spec["podGroupPolicy"] = {"volcano": {}}  # the queue is the TrainJob's annotation
    if rp == "ExitCode":
        failure = {"maxRestarts": backoff, "rules": [{"name": "permanentExitCode", "action": "FailJobSet",
                                                      "onJobFailureReasons": ["PodFailurePolicy"]}]}
    else:
        failure = {"maxRestarts": 0}
    job: dict[str, Any] = {"backoffLimit": backoff if rp == "OnFailure" else 0}
    if rp == "ExitCode":
        job["podFailurePolicy"] = {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": "node", "operator": "In", "values": list(range(1, 128))}}]}
    job["template"] = pod_template(spec, "trainjob", "OnFailure" if rp == "OnFailure" else "Never")
    runtime_spec["template"] = {"spec": {"failurePolicy": failure, "replicatedJobs": [{
        "name": "node", "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                     "spec": job}}]}}
    return {"apiVersion": f"{TRAINER_GROUP}/v1alpha1", "kind": "TrainingRuntime",
            "metadata": _metadata(spec, spec.fullname, {"trainer.kubeflow.org/framework": "torch"}),
            "spec": runtime_spec}


def build_objects(spec: JobSpec) -> list[dict[str, Any]]:
    """The job's objects in creation order (ConfigMap, ServiceAccount, TrainingRuntime, job).

    The spec is checked again first (it may have been edited after ``from_values``), then the
    chart's cross-field rules apply.

    Raises:
        SpecError: a bad value or combination of values (the chart's message where it has one).
    """
    spec = JobSpec.from_values(spec.to_values(), spec.name, spec.namespace)
    check_rules(spec)
    objects = [config_map(spec)]
    if spec.service_account.create:
        objects.append(service_account(spec))
    if own_runtime(spec):
        objects.append(training_runtime(spec))
    objects.append(pytorchjob(spec) if spec.job_kind == "pytorchjob" else trainjob(spec))
    return objects


def job_object(objects: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The PyTorchJob or TrainJob among ``objects``.

    Raises:
        SpecError: there is not exactly one.
    """
    jobs = [o for o in objects if o.get("kind") in JOB_KINDS]
    if len(jobs) != 1:
        raise SpecError(f"expected one PyTorchJob or TrainJob among the objects, found "
                        f"{[o.get('kind') for o in objects]}")
    return dict(jobs[0])
