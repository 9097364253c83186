"""A small fake Kubernetes API server on loopback, for the real ``kubernetes`` Python client.

No kube-apiserver (nor kind, nor envtest) can run in this test environment, so this server
speaks the real HTTP/JSON protocol of the API server, for the paths ``sam-train launch``
uses, and the client under test is the real ``kubernetes`` client, configured from a real
kubeconfig file (:meth:`FakeApiServer.write_kubeconfig`):

- ``/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs[/{name}]`` and
  ``/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/{trainjobs,trainingruntimes}[/{name}]``
  (each CRD can be "uninstalled": its paths then answer 404 with no details, as the real server
  answers for an unknown resource);
- ``/api/v1/namespaces/{ns}/{configmaps,serviceaccounts,pods,events}[/{name}]`` and
  ``pods/{name}/log`` (``container``, ``tailLines``, ``follow``);
- POST (201; 409 AlreadyExists), GET (404 NotFound naming the object), list with
  ``labelSelector`` (equality terms) and ``fieldSelector`` (``involvedObject.*``), PATCH
  (merge patch; a strategic merge patch is applied as a merge patch, enough for these maps),
  PUT, DELETE (DeleteOptions recorded; Foreground keeps the object, with a deletionTimestamp, for
  ``foreground_gets`` more GETs, and deletes the job's pods as the garbage collector would);
- errors as ``Status`` objects: 401 for a wrong bearer token, 403 Forbidden (RBAC wording,
  or "exceeded quota"), 422 Invalid with ``details.causes``, set up with :meth:`fail`.

Recorded job histories (``tests/launch/recordings/*.json``) are replayed by :meth:`play`:
the n-th GET of the job answers the n-th recorded object's ``status`` (the last one repeats)
and adds that step's events, so a watcher sees the job move as a real operator moves it.
Every request is kept in :attr:`requests`.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qs, urlsplit

from tests.loopback_http import LoopbackHttpServer, Request

RECORDINGS = Path(__file__).parent / "recordings"
TOKEN = "fake-token-for-tests"
#: (group, version, plural) -> kind of every resource the server knows.
RESOURCES: dict[tuple[str, str, str], str] = {
    ("kubeflow.org", "v1", "pytorchjobs"): "PyTorchJob",
    ("trainer.kubeflow.org", "v1alpha1", "trainjobs"): "TrainJob",
    ("trainer.kubeflow.org", "v1alpha1", "trainingruntimes"): "TrainingRuntime",
    ("", "v1", "configmaps"): "ConfigMap",
    ("", "v1", "serviceaccounts"): "ServiceAccount",
    ("", "v1", "pods"): "Pod",
    ("", "v1", "events"): "Event",
}
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def load_recording(name: str) -> dict:
    """``tests/launch/recordings/<name>.json``."""
    return json.loads((RECORDINGS / f"{name}.json").read_text())


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merged key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def status_object(code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> dict:
    """A ``Status`` failure body as the API server sends it."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details is not None:
        body["details"] = dict(details)
    return body




@dataclass
class Failure:
    """A scripted error: requests matching ``verb`` and ``plural`` (and ``name``) get ``body``."""

    verb: str
    plural: str
    name: str | None
    code: int
    body: dict
    times: int | None = None  # None: every matching request


@dataclass
class Replay:
    """A recorded history being replayed onto one stored job."""

    steps: list[dict]
    served: int = 0


@dataclass
class _Path:
    group: str
    version: str
    namespace: str
    plural: str
    name: str | None
    subresource: str | None

    @property
    def key_prefix(self) -> tuple[str, str, str]:
        return (self.group, self.namespace, self.plural)


def _parse_path(path: str) -> _Path | None:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if len(rest) < 3 or rest[0] != "namespaces" or len(rest) > 5:
        return None
    return _Path(group, version, rest[1], rest[2], rest[3] if len(rest) > 3 else None,
                 rest[4] if len(rest) > 4 else None)


def _label_selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.replace("==", "=").partition("=")
        if labels.get(key) != value:
            return False
    return True


def _field_value(obj: Mapping[str, Any], dotted: str) -> Any:
    node: Any = obj
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


class FakeApiServer(LoopbackHttpServer):
    """The fake API server; use as a context manager (``with FakeApiServer() as api:``)."""

    def __init__(self, user: str = "system:serviceaccount:ml:launcher") -> None:
        self.user = user  # who the token authenticates as, in Forbidden messages
        self.objects: dict[tuple[str, str, str, str], dict] = {}  # (group, ns, plural, name) -> object
        self.uninstalled: set[str] = set()  # API groups whose CRDs are not installed
        self.failures: list[Failure] = []
        self.replays: dict[tuple[str, str, str, str], Replay] = {}
        self.pod_logs: dict[tuple[str, str], dict[str, str]] = {}  # (ns, pod) -> {container: text}
        self.requests: list[Request] = []
        self.foreground_gets = 1
        self._lingering: dict[tuple[str, str, str, str], int] = {}
        self._version = 1000
        self._lock = threading.RLock()
        self._serve(self._handler_class(), "fake-apiserver")

    def write_kubeconfig(self, path: Path, namespace: str = "ml", token: str = TOKEN) -> Path:
        """A kubeconfig whose current context ``fake`` points at this server with a bearer token."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}],
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    # ------------------------------------------------------------------ setting up

    def uninstall(self, group: str) -> None:
        """Make every resource of an API group unknown (its CRDs are not installed)."""
        self.uninstalled.add(group)

    def fail(self, verb: str, plural: str, code: int, message: str, reason: str, name: str | None = None,
             causes: list[dict] | None = None, times: int | None = None) -> None:
        """Answer matching requests with a Status error (e.g. 403 Forbidden, 422 Invalid)."""
        group = next(g for (g, _, p) in RESOURCES if p == plural)
        details: dict[str, Any] = {"group": group, "kind": plural}
        if name:
            details["name"] = name
        if causes:
            details["causes"] = causes
        self.failures.append(Failure(verb, plural, name, code, status_object(code, reason, message, details), times))

    def forbid(self, verb: str, plural: str, namespace: str = "ml") -> None:
        """RBAC denies ``verb`` on ``plural`` to :attr:`user`, worded as the real authorizer words it."""
        group = next(g for (g, _, p) in RESOURCES if p == plural)
        resource = f"{plural}.{group}" if group else plural
        self.fail(verb, plural, 403, f'{resource} is forbidden: User "{self.user}" cannot {verb} resource '
                  f'"{plural}" in API group "{group}" in the namespace "{namespace}"', "Forbidden")

    def put(self, obj: Mapping[str, Any]) -> dict:
        """Store an object as if it had been created (server fields filled in)."""
        group, _, version = obj["apiVersion"].rpartition("/")
        plural = next(p for (g, v, p), k in RESOURCES.items() if k == obj["kind"] and g == group)
        stored = self._stamp(copy.deepcopy(dict(obj)), obj["metadata"].get("namespace", "ml"))
        with self._lock:
            self.objects[(group, stored["metadata"]["namespace"], plural, stored["metadata"]["name"])] = stored
        return stored

    def play(self, recording: Mapping[str, Any], store_job: bool = True) -> None:
        """Replay a recorded history: pods, logs, and the job's recorded states on successive GETs.

        Args:
            recording: a recording (:func:`load_recording`): ``steps`` [{job, events}], ``pods``, ``logs``.
            store_job: also store the first recorded job (else the job must be submitted).
        """
        first = recording["steps"][0]["job"]
        group = first["apiVersion"].rpartition("/")[0]
        plural = next(p for (g, v, p), k in RESOURCES.items() if k == first["kind"] and g == group)
        namespace, name = first["metadata"]["namespace"], first["metadata"]["name"]
        if store_job:
            self.put({key: value for key, value in first.items() if key != "status"})
        for pod in recording.get("pods", ()):
            self.put(pod)
        for pod_name, containers in recording.get("logs", {}).items():
            self.pod_logs[(namespace, pod_name)] = dict(containers)
        with self._lock:
            self.replays[(group, namespace, plural, name)] = Replay(list(recording["steps"]))

    def stored(self, plural: str, name: str, namespace: str = "ml") -> dict | None:
        group = next(g for (g, _, p) in RESOURCES if p == plural)
        with self._lock:
            return copy.deepcopy(self.objects.get((group, namespace, plural, name)))

    def received(self, method: str, plural: str | None = None) -> list[Request]:
        """The requests of ``method`` (on paths of ``plural``), in order."""
        return [r for r in self.requests if r.method == method and (plural is None or f"/{plural}" in r.path)]

    # ------------------------------------------------------------------ serving

    def _stamp(self, obj: dict, namespace: str) -> dict:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2026-11-30T09:00:00Z")
        meta["resourceVersion"] = self._next_version()
        if obj.get("kind") in ("PyTorchJob", "TrainJob", "TrainingRuntime"):
            meta.setdefault("generation", 1)
        return obj

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                body = json.loads(raw) if raw else None
                request = Request(self.command, url.path, query, body, {k.lower(): v for k, v in self.headers.items()})
                with server._lock:
                    server.requests.append(request)
                    code, payload, content_type = server._answer(request)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        return Handler

    def _answer(self, request: Request) -> tuple[int, Any, str]:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, status_object(401, "Unauthorized", "Unauthorized"), "application/json"
        path = _parse_path(request.path)
        known = path and (path.group, path.version, path.plural) in RESOURCES
        if not path or not known or path.group in self.uninstalled:
            return 404, status_object(404, "NotFound", "the server could not find the requested resource",
                                      {}), "application/json"
        verb = VERBS[request.method] if path.name or request.method != "GET" else "list"
        if path.subresource == "log":
            verb = "get"
        name = path.name or ((request.body or {}).get("metadata") or {}).get("name") if verb == "create" else path.name
        failure = self._scripted_failure(verb, path, name)
        if failure is not None:
            return failure.code, failure.body, "application/json"
        if path.subresource == "log":
            return self._log(path, request.query)
        handler = {"list": self._list, "get": self._get, "create": self._create, "patch": self._patch,
                   "update": self._update, "delete": self._delete}[verb]
        code, payload = handler(path, request)
        return code, payload, "application/json"

    def _scripted_failure(self, verb: str, path: _Path, name: str | None) -> Failure | None:
        for failure in self.failures:
            if failure.verb == verb and failure.plural == path.plural and failure.name in (None, name):
                if failure.times is not None:
                    if failure.times <= 0:
                        continue
                    failure.times -= 1
                return failure
        return None

    def _not_found(self, path: _Path, name: str) -> tuple[int, dict]:
        resource = f"{path.plural}.{path.group}" if path.group else path.plural
        return 404, status_object(404, "NotFound", f'{resource} "{name}" not found',
                                  {"name": name, "group": path.group, "kind": path.plural})

    def _key(self, path: _Path, name: str | None = None) -> tuple[str, str, str, str]:
        return (path.group, path.namespace, path.plural, name or path.name or "")

    def _list(self, path: _Path, request: Request) -> tuple[int, dict]:
        labels = request.query.get("labelSelector", "")
        fields = [term.partition("=")[::2] for term in request.query.get("fieldSelector", "").split(",") if term]
        items = [copy.deepcopy(obj) for key, obj in sorted(self.objects.items())
                 if key[:3] == path.key_prefix
                 and _label_selector_matches(labels, obj["metadata"].get("labels") or {})
                 and all(str(_field_value(obj, f)) == v for f, v in fields)]
        kind = RESOURCES[(path.group, path.version, path.plural)]
        api_version = f"{path.group}/{path.version}" if path.group else path.version
        return 200, {"apiVersion": api_version, "kind": f"{kind}List", "items": items,
                     "metadata": {"resourceVersion": self._next_version()}}

    def _get(self, path: _Path, request: Request) -> tuple[int, dict]:
        key = self._key(path)
        if key not in self.objects:
            return self._not_found(path, path.name or "")
        if key in self._lingering:  # a Foreground delete in progress
            self._lingering[key] -= 1
            answer = copy.deepcopy(self.objects[key])
            if self._lingering[key] <= 0:
                del self._lingering[key], self.objects[key]
            return 200, answer
        replay = self.replays.get(key)
        if replay is not None:
            step = replay.steps[min(replay.served, len(replay.steps) - 1)]
            if replay.served < len(replay.steps):
                for event in step.get("events", ()):
                    self.put(event)
            replay.served += 1
            self.objects[key]["status"] = copy.deepcopy(step["job"].get("status") or {})
            self.objects[key]["metadata"]["resourceVersion"] = self._next_version()
        return 200, copy.deepcopy(self.objects[key])

    def _create(self, path: _Path, request: Request) -> tuple[int, dict]:
        body = request.body or {}
        name = body.get("metadata", {}).get("name", "")
        if body.get("metadata", {}).get("namespace", path.namespace) != path.namespace:
            return 400, status_object(400, "BadRequest", "the namespace of the provided object does not match "
                                      "the namespace sent on the request")
        key = self._key(path, name)
        if key in self.objects:
            resource = f"{path.plural}.{path.group}" if path.group else path.plural
            return 409, status_object(409, "AlreadyExists", f'{resource} "{name}" already exists',
                                      {"name": name, "group": path.group, "kind": path.plural})
        self.objects[key] = self._stamp(copy.deepcopy(body), path.namespace)
        return 201, copy.deepcopy(self.objects[key])

    def _patch(self, path: _Path, request: Request) -> tuple[int, dict]:
        key = self._key(path)
        if key not in self.objects:
            return self._not_found(path, path.name or "")
        patched = merge_patch(self.objects[key], request.body or {})
        patched["metadata"]["resourceVersion"] = self._next_version()
        self.objects[key] = patched
        return 200, copy.deepcopy(patched)

    def _update(self, path: _Path, request: Request) -> tuple[int, dict]:
        key = self._key(path)
        if key not in self.objects:
            return self._not_found(path, path.name or "")
        old = self.objects[key]["metadata"]
        body = copy.deepcopy(request.body or {})
        body["metadata"].update(uid=old["uid"], creationTimestamp=old["creationTimestamp"])
        self.objects[key] = self._stamp(body, path.namespace)
        return 200, copy.deepcopy(self.objects[key])

    def _delete(self, path: _Path, request: Request) -> tuple[int, dict]:
        key = self._key(path)
        if key not in self.objects:
            return self._not_found(path, path.name or "")
        obj = self.objects[key]
        policy = (request.body or {}).get("propagationPolicy") or request.query.get("propagationPolicy")
        self._collect_pods(path, obj)
        if policy == "Foreground" and path.group and self.foreground_gets > 0:
            obj["metadata"].update(deletionTimestamp="2026-11-30T10:00:00Z", finalizers=["foregroundDeletion"])
            self._lingering[key] = self.foreground_gets
            return 200, copy.deepcopy(obj)
        del self.objects[key]
        if path.group:  # custom resources answer with the object, core ones with a Status
            return 200, obj
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {"name": obj["metadata"]["name"], "kind": path.plural,
                                 "uid": obj["metadata"]["uid"]}}

    def _collect_pods(self, path: _Path, obj: Mapping[str, Any]) -> None:
        """The garbage collector: a deleted job's pods go too."""
        label = {"PyTorchJob": "training.kubeflow.org/job-name",
                 "TrainJob": "jobset.sigs.k8s.io/jobset-name"}.get(obj.get("kind", ""))
        if not label:
            return
        for key in [k for k, pod in self.objects.items() if k[1:3] == (path.namespace, "pods")
                    and (pod["metadata"].get("labels") or {}).get(label) == obj["metadata"]["name"]]:
            del self.objects[key]

    def _log(self, path: _Path, query: Mapping[str, str]) -> tuple[int, Any, str]:
        key = ("", path.namespace, "pods", path.name or "")
        if key not in self.objects:
            code, body = self._not_found(path, path.name or "")
            return code, body, "application/json"
        containers = [c["name"] for c in self.objects[key]["spec"]["containers"]]
        container = query.get("container")
        if container is None and len(containers) > 1:
            return 400, status_object(400, "BadRequest", f"a container name must be specified for pod "
                                      f"{path.name}, choose one of: [{' '.join(containers)}]"), "application/json"
        container = container or containers[0]
        if container not in containers:
            return 400, status_object(400, "BadRequest", f"container {container} is not valid for pod "
                                      f"{path.name}"), "application/json"
        text = self.pod_logs.get((path.namespace, path.name or ""), {}).get(container, "")
        if "tailLines" in query:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) else ""
        return 200, text.encode(), "text/plain"

    def iter_objects(self, plural: str) -> Iterator[dict]:
        with self._lock:
            for key, obj in sorted(self.objects.items()):
                if key[2] == plural:
                    yield copy.deepcopy(obj)
