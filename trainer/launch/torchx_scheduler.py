"""The ``pytorchjob`` TorchX scheduler: the sam_train component's AppDef as the chart's PyTorchJob.

TorchX's own ``kubernetes`` scheduler creates a Volcano Job; this one submits the objects that
``helm install`` of ``charts/sam-train`` creates (ConfigMap ``<fullname>-config``, ServiceAccount,
PyTorchJob ``kubeflow.org/v1``), built by :func:`trainer.launch.build.build_objects` from a
:class:`~trainer.launch.spec.JobSpec`, and reads, follows and deletes them through
:mod:`trainer.launch.client`. Registered as the ``torchx.schedulers`` entry point ``pytorchjob``::

    torchx run -s pytorchjob --scheduler_args namespace=ml,node_pool=gke-a2-ultragpu \\
        sam_train --image REGISTRY/sam-train:0.1.0 --nodes 32 --data_shards 'gs://b/sa1b/sa_*.tar' ...
    torchx run --dryrun -s pytorchjob ...      # prints the objects as YAML, sends nothing
    torchx status pytorchjob://torchx/ml:sam-train-1a2b3c
    torchx log pytorchjob://torchx/ml:sam-train-1a2b3c/trainer/0     # the master's log (-t: follow)
    torchx cancel pytorchjob://torchx/ml:sam-train-1a2b3c            # deletes the job, its ConfigMap and account

From the AppDef to the job (:func:`appdef_to_spec`): the role gives the image, the nodes
(``num_replicas``), the GPUs per node, the CPU request and the memory (request and limit), the
extra env and ``runPolicy.backoffLimit`` (``max_retries``); the component's metadata gives the
rest (:mod:`trainer.launch.torchx_component`), and the run options override it. The pod command
is the chart's, ``python -m trainer.dist [chart flags] -m trainer.train --config
/etc/sam-train/config.toml``: the role's rendezvous flags (``--nnodes``, ``--rdzv-endpoint``, ...)
are not used, the operator's ``PET_*`` variables feed torchrun. The
trainer overrides go into the ConfigMap's ``config.toml`` as typed values, checked by the
trainer's own config loader before anything is sent (a bad key fails the dry run).

App ids are ``<namespace>:<job name>``. Without ``job_name`` the job is called
``<app name>-<6 random hex digits>`` (a new job per run, as TorchX's schedulers do).
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, TypedDict

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream, filter_regex, split_lines
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, runopts

from trainer.launch.build import build_objects, job_object
from trainer.launch.chart import CHART_NAME, MAX_FULLNAME
from trainer.launch.setvalues import deep_merge
from trainer.launch.spec import JobSpec
from trainer.launch.torchx_component import METADATA_KEY, METADATA_VERSION, ROLE_NAME, mib_quantity
from trainer.launch.watch import State, pytorchjob_status

#: The scheduler's name (the ``torchx.schedulers`` entry point).
BACKEND = "pytorchjob"
#: Job state -> TorchX state. Created (accepted, pods not all running) and Suspended (held, e.g.
#: by Kueue) are PENDING; Restarting (a pod is being recreated after a retryable exit) is still RUNNING.
APP_STATES: dict[State, AppState] = {
    State.PENDING: AppState.SUBMITTED,
    State.CREATED: AppState.PENDING,
    State.SUSPENDED: AppState.PENDING,
    State.RUNNING: AppState.RUNNING,
    State.RESTARTING: AppState.RUNNING,
    State.SUCCEEDED: AppState.SUCCEEDED,
    State.FAILED: AppState.FAILED,
}
#: Pod phase -> TorchX replica state.
POD_STATES: dict[str, AppState] = {
    "Pending": AppState.PENDING, "Running": AppState.RUNNING, "Succeeded": AppState.SUCCEEDED,
    "Failed": AppState.FAILED, "Unknown": AppState.UNKNOWN,
}
#: Trainer keys the chart sets from its own values (it refuses them in training.config).
DEDICATED_KEYS: dict[str, tuple[str, str]] = {
    "data.shards": ("training", "dataShards"),
    "train.run_dir": ("training", "runDir"),
    "checkpoint.url": ("training", "checkpointUrl"),
    "metrics.port": ("monitoring", "port"),
}
#: Variables the TorchX runner adds to every role (its tracking handle): the pods run no TorchX.
RUNNER_ENV_PREFIX = "TORCHX_"


class PyTorchJobOpts(TypedDict, total=False):
    """Run options (``--scheduler_args k=v,...``); see :meth:`PyTorchJobScheduler._run_opts`."""

    namespace: str
    kubeconfig: Optional[str]
    context: Optional[str]
    job_name: Optional[str]
    queue: Optional[str]
    gang: Optional[str]
    kueue_queue: Optional[str]
    service_account: Optional[str]
    node_pool: Optional[str]
    priority_class: Optional[str]


@dataclass
class PyTorchJobRequest:
    """What :meth:`PyTorchJobScheduler.schedule` creates; ``str()`` is the YAML ``--dryrun`` prints."""

    objects: list[dict]
    namespace: str
    name: str

    def __str__(self) -> str:
        import yaml

        return yaml.safe_dump_all(self.objects, sort_keys=False)

    @property
    def app_id(self) -> str:
        return f"{self.namespace}:{self.name}"


# --------------------------------------------------------------------------- AppDef -> JobSpec


def _job_inputs(app: AppDef) -> dict[str, Any]:
    """The component's JSON inputs from ``app.metadata``; a clear error for other AppDefs."""
    if len(app.roles) != 1 or app.roles[0].num_replicas < 1:
        raise ValueError(f"app {app.name!r}: the {BACKEND} scheduler runs one role of at least one replica, got "
                         f"{[(r.name, r.num_replicas) for r in app.roles]}")
    raw = app.metadata.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"app {app.name!r}: the {BACKEND} scheduler runs apps of the sam_train component "
                         f"(trainer.launch.torchx_component, `sam_train`); this AppDef has no "
                         f"metadata[{METADATA_KEY!r}]")
    job = json.loads(raw)
    if job.get("version") != METADATA_VERSION:
        raise ValueError(f"app {app.name!r}: metadata[{METADATA_KEY!r}] has version {job.get('version')!r}; "
                         f"this scheduler reads version {METADATA_VERSION}")
    return job


def split_image(image: str) -> dict[str, str]:
    """``repo[:tag]`` or ``repo@sha256:...`` as the chart's ``image`` values (``tag`` may be empty)."""
    if "@" in image:
        repository, _, digest = image.partition("@")
        return {"repository": repository, "tag": digest}
    head, sep, tail = image.rpartition(":")
    if sep and "/" not in tail:  # a registry port ("host:5000/repo") is not a tag
        return {"repository": head, "tag": tail}
    return {"repository": image, "tag": ""}


def cpu_quantity(cpu: float) -> str:
    """Cores as a Kubernetes quantity: ``8``, or millicores (``1500m``) for fractions."""
    return str(int(cpu)) if float(cpu).is_integer() else f"{round(cpu * 1000)}m"


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node[key]
    return node


def trainer_values(config: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The chart values of the trainer's config: ``training.*`` and ``monitoring.port``.

    ``config`` (a preset, or a TOML file whose ``preset`` key names one) and ``overrides``
    (``section.key=value``, in order) are resolved by the trainer's own loader, so a bad key,
    type or value, or a required key still missing, raises here as it would in the pod. The
    file's tables and the overrides' typed values go to ``training.config`` (tuples as lists);
    the keys the chart owns go to their values (:data:`DEDICATED_KEYS`).

    Raises:
        trainer.config.ConfigError: what the trainer would refuse.
        ValueError: a config file without a ``preset`` key (the chart's config.toml always names one).
    """
    from trainer.config import PRESET_KEY, ConfigError, read_toml, resolve_config, to_dict
    from trainer.presets import PRESETS, Config

    if config in PRESETS:
        preset, tables = config, {}
    else:
        tables = read_toml(config)
        preset = tables.pop(PRESET_KEY, None)
        if preset is None:
            raise ValueError(f"--config {config}: the file names no preset (add `{PRESET_KEY} = \"vit_h\"` or "
                             f"another); the chart's config.toml always starts from one")
    cfg, problem = resolve_config(Config, config, overrides, PRESETS)
    if problem is not None:
        raise ConfigError(problem)
    resolved = to_dict(cfg)
    values: dict[str, Any] = {"training": {"preset": preset}}
    for dotted, path in DEDICATED_KEYS.items():  # a config file may set them too
        section, key = dotted.split(".")
        if key in tables.get(section, {}):
            _set_path(values, path, tables[section].pop(key))
            if not tables[section]:
                del tables[section]
    for item in overrides:
        dotted = item.partition("=")[0].strip()
        value = _get_path(resolved, dotted)  # the final value: a later override of a key wins
        _set_path(values if dotted in DEDICATED_KEYS else tables,
                  DEDICATED_KEYS.get(dotted) or dotted.split("."), value)
    values["training"]["config"] = tables
    return values


def _role_values(role: Role) -> dict[str, Any]:
    """What the role's own fields say: image, nodes, GPUs, CPU, memory, env, retries."""
    values: dict[str, Any] = {"nodes": role.num_replicas, "gpusPerNode": role.resource.gpu,
                              "runPolicy": {"backoffLimit": role.max_retries}}
    if role.image:
        values["image"] = split_image(role.image)
    requests: dict[str, str] = {}
    if role.resource.cpu > 0:
        requests["cpu"] = cpu_quantity(role.resource.cpu)
    if role.resource.memMB > 0:
        requests["memory"] = mib_quantity(role.resource.memMB)
        values["resources"] = {"limits": {"memory": requests["memory"]}}
    if requests:
        values.setdefault("resources", {})["requests"] = requests
    env = [{"name": k, "value": v} for k, v in role.env.items() if not k.startswith(RUNNER_ENV_PREFIX)]
    if env:
        values["env"] = env
    return values


def _opts_values(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the run options override."""
    values: dict[str, Any] = {}
    for opt, path in (("queue", ("scheduling", "queue")), ("gang", ("scheduling", "gang")),
                      ("kueue_queue", ("scheduling", "kueueQueue")), ("node_pool", ("nodePool", "preset")),
                      ("priority_class", ("nodePool", "priorityClassName"))):
        if cfg.get(opt):
            _set_path(values, path, cfg[opt])
    if cfg.get("service_account"):
        values["serviceAccount"] = {"create": False, "name": cfg["service_account"]}
    return values


def job_name(app: AppDef, cfg: Mapping[str, Any]) -> str:
    """The release name: ``job_name``, else the app's name (DNS-safe) plus a random suffix.

    The name is cut so that the full name (the release name, or ``<release>-sam-train``) fits
    the chart's 40 characters with the suffix intact: a cut suffix could repeat a name.
    """
    if cfg.get("job_name"):
        return str(cfg["job_name"])
    suffix = f"-{secrets.token_hex(3)}"
    base = re.sub(r"[^a-z0-9-]+", "-", app.name.lower()).strip("-") or CHART_NAME
    room = MAX_FULLNAME - len(suffix)
    if CHART_NAME not in base[:room]:
        room -= len(CHART_NAME) + 1  # the chart appends -sam-train
    return base[:room].rstrip("-") + suffix


def appdef_values(app: AppDef, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The chart values of ``app`` with run options ``cfg`` (see the module docstring)."""
    job = _job_inputs(app)
    values = deep_merge(job["values"], trainer_values(job["config"], job["set"]))
    values = deep_merge(values, _role_values(app.roles[0]))
    return deep_merge(values, _opts_values(cfg))


def appdef_to_spec(app: AppDef, cfg: Mapping[str, Any]) -> JobSpec:
    """The :class:`JobSpec` of ``app`` with run options ``cfg``.

    Raises:
        SpecError: a value the chart would refuse. ConfigError: a trainer setting the trainer would.
    """
    namespace = cfg.get("namespace")
    if not namespace:
        from trainer.launch.client import default_namespace

        namespace = default_namespace(cfg.get("kubeconfig"), cfg.get("context"))
    return JobSpec.from_values(appdef_values(app, cfg), job_name(app, cfg), namespace)


# --------------------------------------------------------------------------- the scheduler


def parse_app_id(app_id: str) -> tuple[str, str]:
    """``<namespace>:<name>`` -> ``(namespace, name)``."""
    namespace, sep, name = app_id.partition(":")
    if not sep or not namespace or not name:
        raise ValueError(f"app id {app_id!r}: expected <namespace>:<job name>")
    return namespace, name


class PyTorchJobScheduler(Scheduler[PyTorchJobOpts]):
    """Runs the sam_train component as the chart's PyTorchJob (training-operator v1.9).

    Args:
        session_name: TorchX's session name.
        client: a :class:`trainer.launch.client.LaunchClient` to use for everything (tests).
        kubeconfig, context: the cluster for describe/list/cancel/logs, which get no run options
            (default: ``$KUBECONFIG``, in-cluster, ``~/.kube/config``; its current context). A
            submit uses its run options' ``kubeconfig``/``context`` when given.
    """

    def __init__(self, session_name: str, client: Any = None, kubeconfig: Optional[str] = None,
                 context: Optional[str] = None) -> None:
        super().__init__(BACKEND, session_name)
        self._client_obj = client
        self._kubeconfig = kubeconfig
        self._context = context

    def _client(self, cfg: Optional[Mapping[str, Any]] = None) -> Any:
        if self._client_obj is not None:
            return self._client_obj
        from trainer.launch.client import connect

        cfg = cfg or {}
        client = connect(cfg.get("kubeconfig") or self._kubeconfig, cfg.get("context") or self._context)
        if not cfg:  # keep the connection for later reads; a submit's options may name another cluster
            self._client_obj = client
        return client

    @staticmethod
    def _ref(app_id: str) -> Any:
        from trainer.launch.client import PYTORCHJOB, JobRef

        namespace, name = parse_app_id(app_id)
        return JobRef(PYTORCHJOB, name, namespace)

    # ------------------------------------------------------------------ submitting

    def _run_opts(self) -> runopts:
        opts = runopts()
        opts.add("namespace", type_=str, default=None,
                 help="Kubernetes namespace of the job (default: the kube context's, else default)")
        opts.add("kubeconfig", type_=str, default=None,
                 help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
        opts.add("context", type_=str, default=None, help="kubeconfig context (default: the current one)")
        opts.add("job_name", type_=str, default=None,
                 help="release name of the job, exactly (default: <app name>-<random>); the objects are "
                      "<job_name>, or <job_name>-sam-train when it lacks sam-train")
        opts.add("queue", type_=str, default=None, help="Volcano queue (with gang volcano); overrides the component's")
        opts.add("gang", type_=str, default=None,
                 help="gang scheduling: none, volcano, scheduler-plugins; overrides the component's")
        opts.add("kueue_queue", type_=str, default=None, help="Kueue LocalQueue; overrides the component's")
        opts.add("service_account", type_=str, default=None,
                 help="existing ServiceAccount of the pods; overrides the component's")
        opts.add("node_pool", type_=str, default=None,
                 help="node pool preset (nodePool.preset of the chart); overrides the component's")
        opts.add("priority_class", type_=str, default=None, help="priorityClassName of the pods (and of the gang)")
        return opts

    def _validate(self, app: AppDef, scheduler: str) -> None:
        """Only the sam_train component's single-role apps; anything else fails before a dry run."""
        _job_inputs(app)

    def _submit_dryrun(self, app: AppDef, cfg: PyTorchJobOpts) -> AppDryRunInfo[PyTorchJobRequest]:
        spec = appdef_to_spec(app, cfg)
        objects = build_objects(spec)
        job = job_object(objects)
        request = PyTorchJobRequest(objects, job["metadata"]["namespace"], job["metadata"]["name"])
        return AppDryRunInfo(request, str)

    def schedule(self, dryrun_info: AppDryRunInfo[PyTorchJobRequest]) -> str:
        request = dryrun_info.request
        client = self._client(dryrun_info._cfg or {})
        ref = client.submit(request.objects)
        return f"{ref.namespace}:{ref.name}"

    # ------------------------------------------------------------------ reading

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        from trainer.launch.client import NotFound

        ref = self._ref(app_id)
        client = self._client()
        try:
            job = client.get_job(ref)
        except NotFound:
            return None
        status = pytorchjob_status(job)
        state = APP_STATES[status.state]
        deleting = bool((job.get("metadata") or {}).get("deletionTimestamp"))
        if deleting and state not in (AppState.SUCCEEDED, AppState.FAILED):
            state = AppState.CANCELLED  # being deleted (torchx cancel): the pods are going away
        msg = ": ".join(part for part in (status.state.value, status.reason, status.message) if part)
        return DescribeAppResponse(app_id=app_id, state=state, msg=msg, roles=[_role_of(job)],
                                   roles_statuses=[RoleStatus(ROLE_NAME, _replica_statuses(client, ref))])

    def list(self) -> list[ListAppResponse]:
        from trainer.launch.client import PYTORCHJOB

        client = self._client()
        return [ListAppResponse(app_id=f"{ref.namespace}:{ref.name}", state=APP_STATES[pytorchjob_status(job).state])
                for ref, job in client.list_jobs() if ref.kind is PYTORCHJOB]

    def _cancel_existing(self, app_id: str) -> None:
        """Delete the job (its pods go with it) and the ConfigMap and ServiceAccount it came with."""
        self._client().delete(self._ref(app_id))

    def log_iter(self, app_id: str, role_name: str, k: int = 0, regex: Optional[str] = None,
                 since: Optional[datetime] = None, until: Optional[datetime] = None,
                 should_tail: bool = False, streams: Optional[Stream] = None) -> Iterable[str]:
        """The log of node ``k`` (0: the Master pod, k: Worker k-1), container ``pytorch``.

        ``since`` is honoured (the API's ``sinceSeconds``); ``should_tail`` follows the log until
        the container exits. ``until`` is not supported by the pod log API (ValueError), and only
        the combined stream exists.
        """
        if streams not in (None, Stream.COMBINED):
            raise ValueError(f"the {BACKEND} scheduler has only the combined log stream (stdout and stderr)")
        if until is not None:
            raise ValueError(f"the {BACKEND} scheduler cannot end a log at a time (until): the pod log API "
                             f"has no such bound")
        if role_name != ROLE_NAME:
            raise ValueError(f"app {app_id}: no role {role_name!r} (its one role is {ROLE_NAME!r})")
        lines: Iterable[str] = _pod_log_lines(self._client(), self._ref(app_id), k, since, should_tail)
        return filter_regex(regex, lines) if regex else lines


def _role_of(job: Mapping[str, Any]) -> Role:
    """The role as the job shows it: image, command and replica count."""
    replicas = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    count = sum(int(spec.get("replicas") or 0) for spec in replicas.values())
    containers = [c for spec in replicas.values() for c in spec["template"]["spec"]["containers"]
                  if c.get("name") == "pytorch"]
    container = containers[0] if containers else {}
    command = list(container.get("command") or [])
    return Role(name=ROLE_NAME, image=container.get("image", ""), entrypoint=command[0] if command else "",
                args=command[1:], num_replicas=count)


def _node_index(pod: Any) -> int:
    """A pod's node rank: Master 0, Worker i -> i + 1 (the operator's RANK)."""
    labels = pod.metadata.labels or {}
    index = int(labels.get("training.kubeflow.org/replica-index", 0))
    return index if labels.get("training.kubeflow.org/replica-type", "").lower() == "master" else index + 1


def _replica_statuses(client: Any, ref: Any) -> list[ReplicaStatus]:
    pods = sorted(client.pods(ref), key=_node_index)
    return [ReplicaStatus(id=_node_index(pod), state=POD_STATES.get((pod.status.phase if pod.status else None) or "",
                                                                     AppState.UNKNOWN),
                          role=ROLE_NAME, hostname=pod.metadata.name) for pod in pods]


def _pod_log_lines(client: Any, ref: Any, k: int, since: Optional[datetime], follow: bool) -> Iterator[str]:
    """Lines of node ``k``'s training container, each with its newline."""
    from trainer.launch.client import Action, Resource, explain_api_error
    from kubernetes.client.exceptions import ApiException

    replica, index = ("master", 0) if k == 0 else ("worker", k - 1)
    pod = client.replica_pod(ref, replica, index)
    name = pod.metadata.name
    kwargs: dict[str, Any] = {"container": "pytorch", "_preload_content": False}
    if since is not None:
        now = datetime.now(timezone.utc) if since.tzinfo else datetime.now()
        kwargs["since_seconds"] = max(1, int((now - since).total_seconds()))
    if follow:
        kwargs["follow"] = True
    else:
        kwargs["_request_timeout"] = client.request_timeout
    try:
        answer = client.core.read_namespaced_pod_log(name, ref.namespace, **kwargs)
    except ApiException as err:
        action = Action("get", Resource("Pod", "", "v1", "pods"), ref.namespace, name, "log")
        raise explain_api_error(err.status or 0, err.reason or "", err.body, action, client.identity) from None
    try:
        if not follow:
            yield from split_lines(answer.data.decode("utf-8", "replace"))
            return
        # Chunks end anywhere, even inside a UTF-8 sequence or a line: decode and split incrementally.
        decoder, pending = codecs.getincrementaldecoder("utf-8")("replace"), ""
        for chunk in answer.stream(4096):
            *complete, pending = (pending + decoder.decode(chunk)).split("\n")
            yield from (line + "\n" for line in complete)
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending
    finally:
        answer.release_conn()


def create_scheduler(session_name: str, client: Any = None, kubeconfig: Optional[str] = None,
                     context: Optional[str] = None, **kwargs: Any) -> PyTorchJobScheduler:
    """The ``torchx.schedulers`` factory (other keyword arguments of the runner are ignored)."""
    return PyTorchJobScheduler(session_name, client=client, kubeconfig=kubeconfig, context=context)
