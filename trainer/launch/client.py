"""Submit, read, follow and delete training jobs through the Kubernetes API.

Built on the official ``kubernetes`` client (the ``launch`` extra): ``CustomObjectsApi`` for
PyTorchJob (``kubeflow.org/v1``), TrainJob and TrainingRuntime (``trainer.kubeflow.org/v1alpha1``),
``CoreV1Api`` for the ConfigMap, the ServiceAccount, pods, logs and events.

Every API failure becomes a :class:`LaunchError`: one readable line naming the cause (the
CRD is not installed, forbidden for whom, quota, the invalid fields, the job exists, the
server cannot be reached) and the exit code of ``sam-train launch`` (:class:`ExitCode`).

Connection (:func:`connect`): ``--kubeconfig`` if given, else ``$KUBECONFIG``, else the
in-cluster service account when ``KUBERNETES_SERVICE_HOST`` is set (a pod, e.g. a Kubeflow
Pipelines step), else ``~/.kube/config``; ``--context`` picks a kubeconfig context. The
namespace defaults to the context's (in a pod: the pod's), else ``default``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

from trainer.launch import watch
from trainer.launch.k8s_api import (  # noqa: F401 - re-exported: the API vocabulary of the client
    INCLUSTER_NAMESPACE_FILE, JOB_KINDS, SUBMITTABLE, INSTANCE_LABEL, NAME_LABEL, Resource, PYTORCHJOB,
    TRAINJOB, TRAININGRUNTIME, CONFIGMAP, SERVICEACCOUNT, POD_SELECTOR,
    TRAINING_CONTAINER, JobRef, LaunchError, NotFound, CrdMissing,
    AlreadyExists, crd_missing_message, Action, explain_api_error,
)
from trainer.launch.k8s_api import _network_cause
from trainer.launch.watch import ExitCode, JobStatus, pytorchjob_status, trainjob_status


def _use_kubeconfig(kubeconfig: str | None, context: str | None) -> bool:
    """A kubeconfig unless none is named and this runs in a pod (``KUBERNETES_SERVICE_HOST``)."""
    return bool(kubeconfig or context or os.environ.get("KUBECONFIG") or not os.environ.get("KUBERNETES_SERVICE_HOST"))


def _kubeconfig_path(kubeconfig: str | None) -> str:
    """The kubeconfig file(s): the flag, else ``$KUBECONFIG`` (a ``:`` list), else ``~/.kube/config``.

    Read now, not at import: the client's own default is frozen when it is first imported.
    """
    return kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def _kubernetes() -> Any:
    """The ``kubernetes`` package, or a usage error saying which extra installs it."""
    try:
        import kubernetes.client
        import kubernetes.config
    except ImportError as err:
        raise LaunchError(f"the kubernetes client is not installed ({err}): pip install 'sam-k8s-trainer[launch]'",
                          ExitCode.USAGE) from None
    return kubernetes


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace of the kubeconfig context (or of this pod), else ``default``; never fails."""
    try:
        config = _kubernetes().config
    except LaunchError:  # --dry-run works without the client; a submit says what is missing
        return "default"

    if _use_kubeconfig(kubeconfig, context):
        try:
            contexts, active = config.list_kube_config_contexts(config_file=_kubeconfig_path(kubeconfig))
        except (config.ConfigException, OSError, TypeError, ValueError):  # no or broken kubeconfig
            return "default"
        chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
        return ((chosen or {}).get("context") or {}).get("namespace") or "default"
    try:
        return Path(INCLUSTER_NAMESPACE_FILE).read_text().strip() or "default"
    except OSError:
        return "default"


def connect(kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None,
            request_timeout: float = 30.0) -> LaunchClient:
    """A client for the cluster of ``kubeconfig``/``context`` (or in-cluster; see the module doc).

    Raises:
        LaunchError: (exit 2) the kubeconfig is missing, unreadable or lacks the context, or
            the kubernetes client is not installed.
    """
    kubernetes = _kubernetes()
    client, config = kubernetes.client, kubernetes.config

    cfg = client.Configuration()
    try:
        if _use_kubeconfig(kubeconfig, context):
            if kubeconfig and not Path(kubeconfig).is_file():
                raise LaunchError(f"--kubeconfig {kubeconfig}: no such file", ExitCode.USAGE)
            config.load_kube_config(config_file=_kubeconfig_path(kubeconfig), context=context,
                                    client_configuration=cfg, persist_config=False)
            identity = f"the user of kube context {context!r}" if context else "the current kubeconfig user"
        else:
            config.load_incluster_config(client_configuration=cfg)
            identity = "this pod's service account"
    except config.ConfigException as err:
        where = _kubeconfig_path(kubeconfig)
        raise LaunchError(f"cannot use the kubeconfig {where}: {err}", ExitCode.USAGE) from None
    return LaunchClient(client.ApiClient(cfg), namespace or default_namespace(kubeconfig, context), identity,
                        request_timeout)


class LaunchClient:
    """Jobs, their pods, logs and events in one namespace of one cluster.

    Args:
        api_client: a configured ``kubernetes.client.ApiClient``.
        namespace: the default namespace (objects that name their own keep it).
        identity: who we are, for "forbidden" messages the server does not word.
        request_timeout: seconds for one request (log following has none).
    """

    def __init__(self, api_client: Any, namespace: str, identity: str = "the current kubeconfig user",
                 request_timeout: float = 30.0) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.identity = identity
        self.request_timeout = request_timeout
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @contextlib.contextmanager
    def _calling(self, action: Action) -> Iterator[None]:
        """Turn the client's exceptions into a :class:`LaunchError` for ``action``."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            yield
        except ApiException as err:
            raise explain_api_error(err.status or 0, err.reason or "", err.body, action, self.identity) from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise LaunchError(f"cannot reach the Kubernetes API server at {self.api_client.configuration.host}: "
                              f"{_network_cause(err)} (check --kubeconfig/--context)", ExitCode.UNREACHABLE) from None

    # ------------------------------------------------------------------ generic objects

    def _request(self, verb: str, resource: Resource, namespace: str, name: str = "", body: Any = None) -> Any:
        """One get/create/patch/delete: CustomObjectsApi for custom kinds, CoreV1Api's typed methods for
        core ones (whose answers are turned into plain dicts too). Both take these keywords."""
        params: dict[str, Any] = {"namespace": namespace, "_request_timeout": self.request_timeout}
        if verb != "create":
            params["name"] = name
        if body is not None:
            params["body"] = body
        with self._calling(Action(verb, resource, namespace, name)):
            if resource.group:
                method = getattr(self.custom, f"{verb}_namespaced_custom_object")
                return method(group=resource.group, version=resource.version, plural=resource.plural, **params)
            method = getattr(self.core, f"{'read' if verb == 'get' else verb}_namespaced_{_snake(resource.kind)}")
            return self.api_client.sanitize_for_serialization(method(**params))

    def _get(self, resource: Resource, name: str, namespace: str) -> dict:
        return self._request("get", resource, namespace, name)

    def _create(self, resource: Resource, body: Mapping[str, Any], namespace: str) -> None:
        self._request("create", resource, namespace, body["metadata"]["name"], dict(body))

    def _patch(self, resource: Resource, body: Mapping[str, Any], namespace: str) -> None:
        self._request("patch", resource, namespace, body["metadata"]["name"], dict(body))

    def _delete(self, resource: Resource, name: str, namespace: str, propagation: str) -> None:
        from kubernetes import client

        self._request("delete", resource, namespace, name, client.V1DeleteOptions(propagation_policy=propagation))

    def apply(self, body: Mapping[str, Any]) -> str:
        """Create the object, or patch it when it exists; returns "created" or "patched"."""
        resource = _resource_of(body)
        namespace = body["metadata"].get("namespace") or self.namespace
        try:
            self._create(resource, body, namespace)
            return "created"
        except AlreadyExists:
            self._patch(resource, body, namespace)
            return "patched"

    # ------------------------------------------------------------------ jobs

    def get_job(self, ref: JobRef) -> dict:
        return self._get(ref.kind, ref.name, ref.namespace)

    def exists(self, ref: JobRef) -> bool:
        try:
            self.get_job(ref)
        except NotFound:
            return False
        return True

    def submit(self, objects: Sequence[Mapping[str, Any]], replace: bool = False,
               say: Callable[[str], None] = lambda _: None, gone_timeout: float = 300.0) -> JobRef:
        """Create the job's objects: ConfigMap, ServiceAccount (created or patched), then the job.

        When the job itself is refused (forbidden, invalid, quota), the objects this call created
        are deleted again, so a failed submit leaves nothing behind.

        Raises:
            AlreadyExists: the job exists and ``replace`` is False (nothing was changed).
        """
        job = _job_of(objects)
        ref = JobRef(_resource_of(job), job["metadata"]["name"], job["metadata"].get("namespace") or self.namespace)
        if self.exists(ref):
            if not replace:
                raise AlreadyExists(f"{ref.describe()} already exists: pass --replace to delete and resubmit it, "
                                    f"or delete it first: {ref.delete_command()}")
            say(f"deleting the existing {ref.describe()} (--replace)")
            self._delete(ref.kind, ref.name, ref.namespace, "Foreground")
            self.wait_gone(ref, gone_timeout)
        created: list[Mapping[str, Any]] = []
        for body in objects:
            if body is not job:
                what = self.apply(body)
                created += [body] if what == "created" else []
                say(f"{what} {body['kind']} {ref.namespace}/{body['metadata']['name']}")
        try:
            self._create(ref.kind, job, ref.namespace)
        except AlreadyExists:  # created by someone else since the check above: its objects stay
            raise AlreadyExists(f"{ref.describe()} was created by someone else meanwhile; "
                                f"delete it first: {ref.delete_command()}") from None
        except LaunchError:
            self._roll_back(created, ref.namespace, say)
            raise
        say(f"created {ref.describe()}")
        return ref

    def _roll_back(self, created: Sequence[Mapping[str, Any]], namespace: str, say: Callable[[str], None]) -> None:
        """Delete what a failed submit created (best effort: the job's error is the one to report)."""
        for body in reversed(created):
            with contextlib.suppress(LaunchError):
                self._delete(_resource_of(body), body["metadata"]["name"], namespace, "Background")
                say(f"removed {body['kind']} {namespace}/{body['metadata']['name']} again (the job was refused)")

    def wait_gone(self, ref: JobRef, timeout: float, interval: float = 1.0) -> None:
        """Poll until the job is gone (a Foreground delete waits for its pods)."""
        deadline = time.monotonic() + timeout
        while self.exists(ref):
            if time.monotonic() > deadline:
                raise LaunchError(f"{ref.describe()} is still being deleted after {timeout:g}s", ExitCode.TIMEOUT)
            watch.sleep(interval)

    def find_job(self, name: str, kind: Resource | None = None, namespace: str | None = None) -> JobRef:
        """The job called ``name`` (either kind unless given), or the one of release ``name``."""
        namespace = namespace or self.namespace
        kinds = [kind] if kind else list(JOB_KINDS)
        missing: list[CrdMissing] = []
        for candidate in kinds:
            try:
                self._get(candidate, name, namespace)
                return JobRef(candidate, name, namespace)
            except NotFound:
                continue
            except CrdMissing as err:
                missing.append(err)
        if len(missing) == len(kinds):
            raise missing[0]
        by_release = [ref for ref, _ in self.list_jobs(namespace, selector=f"{INSTANCE_LABEL}={name}")]
        if len(by_release) == 1:
            return by_release[0]
        if by_release:
            raise LaunchError(f"release {name!r} has several jobs in namespace {namespace!r}: "
                              f"{', '.join(r.describe() for r in by_release)}; name one", ExitCode.USAGE)
        kinds_text = " or ".join(k.kind for k in kinds)
        raise NotFound(f"no {kinds_text} named {name!r} in namespace {namespace!r} "
                       f"(sam-train launch list -n {namespace})")

    def list_jobs(self, namespace: str | None = None, selector: str = "") -> list[tuple[JobRef, dict]]:
        """Jobs of both kinds in the namespace (a kind whose CRD is missing is skipped)."""
        namespace = namespace or self.namespace
        found: list[tuple[JobRef, dict]] = []
        missing: list[CrdMissing] = []
        for kind in JOB_KINDS:
            try:
                with self._calling(Action("list", kind, namespace)):
                    answer = self.custom.list_namespaced_custom_object(
                        kind.group, kind.version, namespace, kind.plural, label_selector=selector,
                        _request_timeout=self.request_timeout)
            except CrdMissing as err:
                missing.append(err)
                continue
            found += [(JobRef(kind, item["metadata"]["name"], namespace), item) for item in answer.get("items", ())]
        if len(missing) == len(JOB_KINDS):
            raise missing[0]
        return found

    def status(self, ref: JobRef, job: Mapping[str, Any] | None = None) -> JobStatus:
        """The job's state (a TrainJob's Running comes from its pods)."""
        job = job if job is not None else self.get_job(ref)
        if ref.kind is TRAINJOB:
            return trainjob_status(job, [p.status.phase for p in self.pods(ref) if p.status])
        return pytorchjob_status(job)

    def delete(self, ref: JobRef, propagation: str = "Foreground") -> list[str]:
        """Delete the job, then the ConfigMap, ServiceAccount and TrainingRuntime its release created.

        An object is deleted only when it carries the job's ``app.kubernetes.io/instance`` and
        ``app.kubernetes.io/name`` labels, so an existing account (``serviceAccount.create=false``)
        or the ``default`` one is never touched. Returns one line per object.
        """
        job = self.get_job(ref)
        self._delete(ref.kind, ref.name, ref.namespace, propagation)
        lines = [f"deleted {ref.describe()} (propagationPolicy {propagation})"]
        labels = job.get("metadata", {}).get("labels") or {}
        mine = {key: labels.get(key) for key in (INSTANCE_LABEL, NAME_LABEL)}
        for resource, name in self._companions(job, ref.namespace):
            try:
                other = self._get(resource, name, ref.namespace)
            except NotFound:
                continue
            other_labels = other.get("metadata", {}).get("labels") or {}
            if mine[INSTANCE_LABEL] and all(other_labels.get(k) == v for k, v in mine.items()):
                self._delete(resource, name, ref.namespace, propagation)
                lines.append(f"deleted {resource.kind} {ref.namespace}/{name}")
            else:
                lines.append(f"kept {resource.kind} {ref.namespace}/{name} (not created with this job)")
        return lines

    def _companions(self, job: Mapping[str, Any], namespace: str) -> list[tuple[Resource, str]]:
        """The objects created with a job: its ConfigMap, its own TrainingRuntime, and the
        ServiceAccounts its pods run as (named in the job, or in that runtime)."""
        name = job["metadata"]["name"]
        spec = job.get("spec") or {}
        found: list[tuple[Resource, str]] = [(CONFIGMAP, f"{name}-config")]
        runtime_ref = spec.get("runtimeRef") or {}
        trees: list[Any] = [spec]
        if runtime_ref.get("kind") == "TrainingRuntime" and runtime_ref.get("name"):
            found.append((TRAININGRUNTIME, runtime_ref["name"]))
            with contextlib.suppress(NotFound):
                trees.append(self._get(TRAININGRUNTIME, runtime_ref["name"], namespace).get("spec"))
        accounts = [a for tree in trees for a in _find_values(tree, "serviceAccountName") if isinstance(a, str) and a]
        found[1:1] = [(SERVICEACCOUNT, account) for account in dict.fromkeys(accounts)]
        return found

    # ------------------------------------------------------------------ pods, logs, events

    def pods(self, ref: JobRef, extra_selector: str = "") -> list[Any]:
        """The job's pods (``V1Pod`` objects)."""
        selector = f"{POD_SELECTOR[ref.kind.kind]}={ref.name}" + (f",{extra_selector}" if extra_selector else "")
        with self._calling(Action("list", Resource("Pod", "", "v1", "pods"), ref.namespace)):
            return list(self.core.list_namespaced_pod(ref.namespace, label_selector=selector,
                                                      _request_timeout=self.request_timeout).items)

    def replica_pod(self, ref: JobRef, replica: str = "master", index: int = 0) -> Any:
        """The pod of one replica: PyTorchJob ``<replica>-<index>``; TrainJob node rank
        (master = node 0, worker i = node i + 1, the ranks of a PyTorchJob's pods)."""
        if ref.kind is TRAINJOB:
            rank = 0 if replica == "master" else index + 1
            extra = f"jobset.sigs.k8s.io/replicatedjob-name=node,batch.kubernetes.io/job-completion-index={rank}"
            label = f"node {rank}"
        else:
            extra = f"training.kubeflow.org/replica-type={replica},training.kubeflow.org/replica-index={index}"
            label = f"{replica} {index}"
        pods = self.pods(ref, extra)
        if not pods:
            raise NotFound(f"{ref.describe()} has no pod for {label} (not scheduled yet, or cleaned up)")
        # A restarted TrainJob node leaves its failed pod behind: prefer the running, then the newest.
        pods.sort(key=lambda p: ((p.status and p.status.phase) == "Running",
                                 p.metadata.creation_timestamp or watch.parse_time(None)))
        return pods[-1]

    def _container(self, ref: JobRef, pod: Any) -> str:
        names = [c.name for c in pod.spec.containers]
        wanted = TRAINING_CONTAINER[ref.kind.kind]
        return wanted if wanted in names else names[0]

    def logs(self, ref: JobRef, replica: str = "master", index: int = 0,
             tail_lines: int | None = None) -> tuple[str, str, str]:
        """``(pod, container, text)`` of one replica's training container."""
        pod = self.replica_pod(ref, replica, index)
        container = self._container(ref, pod)
        action = Action("get", Resource("Pod", "", "v1", "pods"), ref.namespace, pod.metadata.name, "log")
        with self._calling(action):
            # Raw bytes: the client would json-decode a log that happens to be one JSON document.
            answer = self.core.read_namespaced_pod_log(pod.metadata.name, ref.namespace, container=container,
                                                       tail_lines=tail_lines, _preload_content=False,
                                                       _request_timeout=self.request_timeout)
            return pod.metadata.name, container, answer.data.decode("utf-8", "replace")

    def follow_logs(self, ref: JobRef, out: TextIO, replica: str = "master", index: int = 0,
                    tail_lines: int | None = None) -> None:
        """Stream one replica's log to ``out`` until the container exits."""
        pod = self.replica_pod(ref, replica, index)
        action = Action("get", Resource("Pod", "", "v1", "pods"), ref.namespace, pod.metadata.name, "log")
        with self._calling(action):
            answer = self.core.read_namespaced_pod_log(pod.metadata.name, ref.namespace,
                                                       container=self._container(ref, pod), follow=True,
                                                       tail_lines=tail_lines, _preload_content=False)
            try:
                for chunk in answer.stream(4096):
                    out.write(chunk.decode("utf-8", "replace"))
                    out.flush()
            finally:
                answer.release_conn()

    def events(self, ref: JobRef) -> list[dict[str, Any]]:
        """The job's events, oldest first: ``{name, type, reason, message, count, time}``."""
        selector = f"involvedObject.name={ref.name},involvedObject.kind={ref.kind.kind}"
        with self._calling(Action("list", Resource("Event", "", "v1", "events"), ref.namespace)):
            items = self.core.list_namespaced_event(ref.namespace, field_selector=selector,
                                                    _request_timeout=self.request_timeout).items
        events = []
        for item in items:
            when = item.last_timestamp or item.event_time or item.first_timestamp
            events.append({"name": item.metadata.name, "type": item.type, "reason": item.reason,
                           "message": item.message, "count": item.count or 1,
                           "time": when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else ""})
        return sorted(events, key=lambda e: e["time"])


def _snake(kind: str) -> str:
    """``ConfigMap`` -> ``config_map`` (the CoreV1Api method suffix)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def _resource_of(body: Mapping[str, Any]) -> Resource:
    key = (body.get("apiVersion", ""), body.get("kind", ""))
    if key not in SUBMITTABLE:
        raise LaunchError(f"cannot submit {key[1] or '?'} ({key[0] or '?'}): only "
                          f"{', '.join(sorted(k for _, k in SUBMITTABLE))}", ExitCode.USAGE)
    return SUBMITTABLE[key]


def _job_of(objects: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    jobs = [o for o in objects if o.get("kind") in {k.kind for k in JOB_KINDS}]
    if len(jobs) != 1:
        raise LaunchError(f"expected one PyTorchJob or TrainJob among the objects, found {len(jobs)}", ExitCode.USAGE)
    return jobs[0]


def _find_values(tree: Any, key: str) -> Iterator[Any]:
    """Every value of ``key`` anywhere in a nested dict/list tree."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from _find_values(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from _find_values(item, key)
