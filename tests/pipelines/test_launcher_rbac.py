"""The chart's RBAC for the pipeline's launch step (``templates/launcher-rbac.yaml``).

The Role must allow every request the launch step makes and nothing the step does not need:
the launch step runs against the fake API server (success, failure with the master's log,
timeout with deletion, a retried step adopting its job), each request becomes the (API group,
resource, verb) an RBAC authorizer checks, and each must be granted by the rendered Role.
Rendered by the real Helm library (``tests/k8s/render.py``), validated as strictly as an API
server would (``tests/k8s/validate.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.pipelines import require_kfp

require_kfp()

from tests.k8s.render import CHART_DIR, RenderError, render_templates  # noqa: E402
from tests.launch.fake_apiserver import FakeApiServer, _parse_path, load_recording  # noqa: E402
from tests.pipelines.launching import launch  # noqa: E402

#: The chart rendered (a module constant, so a check of values additions can point it elsewhere).
CHART = CHART_DIR
TEMPLATE = "sam-train/templates/launcher-rbac.yaml"
BASE = {"training": {"dataShards": "gs://b/sa1b/sa_*.tar", "runDir": "gs://b/runs/r1"}}
#: What the launch step may do, and nothing more: (API group, resource, verbs).
EXPECTED_RULES = [
    ("kubeflow.org", "pytorchjobs", {"create", "get", "list", "watch", "delete"}),
    ("trainer.kubeflow.org", "trainjobs", {"create", "get", "list", "watch", "delete"}),
    ("trainer.kubeflow.org", "trainingruntimes", {"create", "get", "patch", "delete"}),
    ("", "configmaps", {"create", "get", "patch", "delete"}),
    ("", "serviceaccounts", {"create", "get", "patch", "delete"}),
    ("", "pods", {"get", "list"}),
    ("", "pods/log", {"get"}),
    ("", "events", {"list"}),
]
ARGO_RULE = ("argoproj.io", "workflowtaskresults", {"create", "patch"})


def rbac_objects(launcher: dict[str, Any], name: str = "rel", namespace: str = "ml", **more: Any) -> list[dict]:
    import yaml

    values = {**copy.deepcopy(BASE), "launcherRbac": launcher, **more}
    text = render_templates(values, name=name, namespace=namespace, chart_dir=CHART).get(TEMPLATE, "")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def rules_of(role: dict) -> list[tuple[str, str, set[str]]]:
    return [(group, resource, set(rule["verbs"])) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"]]


def allowed(rules: list[tuple[str, str, set[str]]], group: str, resource: str, verb: str) -> bool:
    return any(g == group and r == resource and verb in verbs for g, r, verbs in rules)


def requests_as_permissions(api: FakeApiServer) -> set[tuple[str, str, str]]:
    """Each request as the (group, resource, verb) RBAC checks for it."""
    verbs = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
    seen = set()
    for request in api.requests:
        path = _parse_path(request.path)
        assert path is not None, request.path
        resource = path.plural + (f"/{path.subresource}" if path.subresource else "")
        verb = "list" if request.method == "GET" and not path.name else verbs[request.method]
        seen.add((path.group, resource, verb))
    return seen


def test_off_by_default() -> None:
    objects = rbac_objects({"enabled": False})
    assert objects == []
    text = render_templates(BASE, name="rel", namespace="ml", chart_dir=CHART).get(TEMPLATE, "")
    assert text.strip() == ""


def test_role_and_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.k8s.validate import validate_all

    objects = rbac_objects({"enabled": True, "serviceAccountName": "pipeline-runner",
                            "serviceAccountNamespace": "kubeflow"})
    assert [(o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]) for o in objects] == [
        ("Role", "rel-sam-train-launcher", "ml"), ("RoleBinding", "rel-sam-train-launcher", "ml")]
    role, binding = objects
    assert sorted(rules_of(role)) == sorted(EXPECTED_RULES)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "rel-sam-train-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    validate_all(objects)


def test_role_allows_every_request_of_the_launch_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    rules = rules_of(rbac_objects({"enabled": True})[0])
    seen: set[tuple[str, str, str]] = set()
    scenarios = [("pytorchjob-restart-succeeded", {}), ("pytorchjob-failed", {}),
                 (None, {"timeout_s": 1, "poll_interval_s": 1})]
    for recording, overrides in scenarios:
        with FakeApiServer() as api:
            monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            if recording:
                api.play(load_recording(recording), store_job=False)
            try:
                launch(**overrides)
            except RuntimeError:
                pass  # failed and timed-out jobs: the requests are what matters here
            seen |= requests_as_permissions(api)
    # Every kind of request happened (create, poll, logs, events, delete), and each is granted.
    assert {("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "delete")} <= seen
    assert {("", "pods", "list"), ("", "pods/log", "get"), ("", "events", "list")} <= seen
    assert {("", "configmaps", "delete"), ("", "serviceaccounts", "delete")} <= seen
    denied = sorted(p for p in seen if not allowed(rules, *p))
    assert denied == []


def test_created_service_account_carries_the_cloud_identity() -> None:
    objects = rbac_objects({"enabled": True, "createServiceAccount": True, "serviceAccountName": "sam-train-launcher"},
                           serviceAccount={"gcpServiceAccount": "trainer@proj.iam.gserviceaccount.com"})
    account, role, binding = objects
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "sam-train-launcher"
    assert account["metadata"]["namespace"] == "ml"
    assert account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "trainer@proj.iam.gserviceaccount.com"}
    assert account["automountServiceAccountToken"] is True  # the launch step needs its API token
    assert sorted(rules_of(role)) == sorted(EXPECTED_RULES + [ARGO_RULE])  # it also runs the steps' pods
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sam-train-launcher", "namespace": "ml"}]


def test_created_account_must_live_in_the_release_namespace() -> None:
    with pytest.raises(RenderError, match=r"launcherRbac.createServiceAccount=true creates the account in the "
                                          r"release namespace \"ml\""):
        rbac_objects({"enabled": True, "createServiceAccount": True, "serviceAccountNamespace": "kubeflow"})


@pytest.mark.parametrize("launcher, key", [
    ({"enabled": "yes"}, "/launcherRbac/enabled"),
    ({"enabled": True, "serviceAccountName": "Not_A_Name"}, "/launcherRbac/serviceAccountName"),
    ({"enabled": True, "extra": 1}, "/launcherRbac"),
])
def test_schema_rejects_bad_values(launcher: dict, key: str) -> None:
    with pytest.raises(RenderError, match=key) as err:
        rbac_objects(launcher)
    assert err.value.stage == "values"
