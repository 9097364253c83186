"""What the launcher talks to: the API resources it uses, job references, and API errors.

:func:`explain_api_error` turns an API failure into one :class:`LaunchError`: one readable
line naming the cause (the CRD is not installed, forbidden for whom, quota, the invalid fields,
the job exists) and the exit code of ``sam-train launch`` (:class:`ExitCode`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from trainer.launch.watch import ExitCode

#: The in-cluster namespace file of a pod's service account.
INCLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: Labels the chart (and the builder) put on every object of a release.
INSTANCE_LABEL = "app.kubernetes.io/instance"
NAME_LABEL = "app.kubernetes.io/name"


@dataclass(frozen=True)
class Resource:
    """An API resource: ``group`` "" is the core group (``/api/v1``)."""

    kind: str
    group: str
    version: str
    plural: str
    #: What to install when the CRD is missing (custom resources only).
    install: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def full_name(self) -> str:
        """``pytorchjobs.kubeflow.org`` (as RBAC and the API server's messages spell it)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


PYTORCHJOB = Resource("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs",
                      "install training-operator v1.9 (README 'On a cluster')")
TRAINJOB = Resource("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs",
                    "install Kubeflow Trainer v2 (README 'On a cluster')")
TRAININGRUNTIME = Resource("TrainingRuntime", "trainer.kubeflow.org", "v1alpha1", "trainingruntimes",
                           "install Kubeflow Trainer v2 (README 'On a cluster')")
CONFIGMAP = Resource("ConfigMap", "", "v1", "configmaps")
SERVICEACCOUNT = Resource("ServiceAccount", "", "v1", "serviceaccounts")
JOB_KINDS: tuple[Resource, ...] = (PYTORCHJOB, TRAINJOB)
#: Objects submit() knows how to create or patch, by (apiVersion, kind).
SUBMITTABLE: dict[tuple[str, str], Resource] = {
    (r.api_version, r.kind): r for r in (PYTORCHJOB, TRAINJOB, TRAININGRUNTIME, CONFIGMAP, SERVICEACCOUNT)}
#: Pods of a job: the operator's label (PyTorchJob) or the JobSet's (TrainJob).
POD_SELECTOR = {"PyTorchJob": "training.kubeflow.org/job-name", "TrainJob": "jobset.sigs.k8s.io/jobset-name"}
#: The training container of a pod.
TRAINING_CONTAINER = {"PyTorchJob": "pytorch", "TrainJob": "node"}


@dataclass(frozen=True)
class JobRef:
    """One job in the cluster."""

    kind: Resource
    name: str
    namespace: str

    def describe(self) -> str:
        return f"{self.kind.kind} {self.namespace}/{self.name}"

    def delete_command(self) -> str:
        return f"sam-train launch delete {self.name} -n {self.namespace}"


class LaunchError(Exception):
    """A failure of ``sam-train launch``: ``str()`` is one line; ``exit_code`` per :class:`ExitCode`."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.API_REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NotFound(LaunchError):
    """The object does not exist (its resource type does)."""


class CrdMissing(LaunchError):
    """The resource type itself is not served: its CRD is not installed."""


class AlreadyExists(LaunchError):
    """A create found an object of that name."""


def crd_missing_message(resource: Resource) -> str:
    return (f"the {resource.kind} CRD ({resource.api_version}) is not installed in the cluster: "
            f"{resource.install}")


@dataclass(frozen=True)
class Action:
    """What a request was doing, for the error message."""

    verb: str  # create, get, list, patch, delete (RBAC verbs)
    resource: Resource
    namespace: str
    name: str = ""
    subresource: str = ""  # "log" for pods/log

    def what(self) -> str:
        return f'{self.resource.kind} "{self.name}"' if self.name else f"{self.resource.kind} objects"

    def rbac(self) -> str:
        sub = f"/{self.subresource}" if self.subresource else ""
        return f"{self.verb} {self.resource.full_name}{sub}"


def _status_body(body: Any) -> dict:
    """The Status object of an error response; {} when the body is not one (e.g. a proxy's text)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(body or "")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _subject(message: str, identity: str) -> str:
    """Who was refused: the server names the user; a service account reads as ns/name."""
    match = re.search(r'User "([^"]+)"', message)
    user = match.group(1) if match else ""
    if user.startswith("system:serviceaccount:"):
        namespace, _, account = user.removeprefix("system:serviceaccount:").partition(":")
        return f'service account "{namespace}/{account}"'
    return f'user "{user}"' if user else identity


def explain_api_error(status_code: int, reason: str, body: Any, action: Action, identity: str) -> LaunchError:
    """One readable line for an error answer of the API server.

    Args:
        status_code, reason, body: of the HTTP answer (``ApiException.status/reason/body``).
        action: what the request was doing.
        identity: who we are, when the server's message does not say (the kubeconfig user).
    """
    status = _status_body(body)
    message = str(status.get("message") or reason or "").strip()
    details = status.get("details") or {}
    where = f'namespace "{action.namespace}"'
    if status_code == 404:
        # A missing object's Status names it (details.name); an unknown resource path (no
        # CRD) answers "the server could not find the requested resource" with no details.
        if action.resource.group and not details.get("name"):
            return CrdMissing(crd_missing_message(action.resource))
        if details.get("kind") == "namespaces":  # a create into a namespace that does not exist
            return NotFound(f"{where} does not exist: create it (kubectl create namespace {action.namespace}) "
                            "or pick another with -n")
        return NotFound(f"{action.what()} not found in {where}")
    if status_code == 403 and "exceeded quota" in message:
        return LaunchError(f"quota exceeded in {where} creating {action.what()}: "
                           f"{message.partition('forbidden: ')[2] or message}")
    if status_code == 403:
        return LaunchError(f"forbidden: {_subject(message, identity)} may not {action.rbac()} in {where}; "
                           f"grant it with a Role and RoleBinding (server: {message})")
    if status_code == 409 and action.verb == "create":
        return AlreadyExists(f"{action.what()} already exists in {where}")
    if status_code == 422:
        causes = [f"{c.get('field') or '?'}: {c.get('message') or c.get('reason')}"
                  for c in details.get("causes") or ()]
        return LaunchError(f"the API server rejected {action.what()} as invalid: "
                           f"{'; '.join(causes) or message}")
    if status_code == 401:
        return LaunchError(f"the API server did not accept the credentials of {identity} (401 Unauthorized): "
                           "log in again or refresh the kubeconfig", ExitCode.USAGE)
    return LaunchError(f"the API server answered {status_code} {reason} to {action.verb} {action.what()} "
                       f"in {where}: {message}")


def _network_cause(err: BaseException) -> str:
    """What went wrong on the way to the server, in a few words."""
    text = str(getattr(err, "reason", None) or err)
    for needle, words in (("Connection refused", "connection refused"), ("Name or service not known",
                          "the host name does not resolve"), ("nodename nor servname", "the host name does "
                          "not resolve"), ("CERTIFICATE", "TLS certificate not accepted"), ("timed out", "timed out"),
                          ("No route to host", "no route to host")):
        if needle.lower() in text.lower():
            return words
    return text
