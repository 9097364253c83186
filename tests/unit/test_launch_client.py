"""``trainer.launch.client`` and ``trainer.launch.watch`` against a fake API server on loopback.

No kube-apiserver can run here (no container runtime, no kind, no envtest binaries), so
``tests/launch/fake_apiserver.py`` speaks the real Kubernetes HTTP/JSON protocol for the paths
the launcher uses, and the client under test is the real ``kubernetes`` Python client, loaded
from a real kubeconfig file that points at ``http://127.0.0.1:PORT`` with a bearer token. Job
histories are recorded API objects (``tests/launch/recordings/*.json``) replayed one per GET.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.launch import require_kubernetes
from tests.launch.fake_apiserver import FakeApiServer, load_recording
from trainer.launch.watch import (ExitCode, JobStatus, State, Watcher, format_status, pytorchjob_status,
                                  trainjob_status)

require_kubernetes()

from trainer.launch.client import (PYTORCHJOB, TRAINJOB, AlreadyExists, CrdMissing, JobRef,  # noqa: E402
                                   LaunchClient, LaunchError, NotFound, connect, default_namespace)

JOB = JobRef(PYTORCHJOB, "demo-sam-train", "ml")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def client(kubeconfig: Path) -> LaunchClient:
    return connect(str(kubeconfig))


def tiny_objects(*sets: str, name: str = "demo") -> list[dict]:
    """The builder's objects for the tiny-cpu preset (ConfigMap, ServiceAccount, PyTorchJob)."""
    from trainer.launch import JobSpec, build_objects

    spec = JobSpec.load(["charts/sam-train/presets/tiny-cpu.yaml"],
                        ["training.dataShards=gs://sam-demo/synth/sa_*.tar", "training.runDir=gs://sam-demo/runs/demo",
                         *sets], name=name, namespace="ml")
    return build_objects(spec)


def states(output: str) -> list[str]:
    """The states of the status lines, in order."""
    return re.findall(r"^\[\s*\d+s\] \S+ \S+: (\w+)", output, flags=re.MULTILINE)


# --------------------------------------------------------------------------- conditions -> states


def cond(type_: str, status: str = "True", t: str | None = "2026-11-30T09:00:00Z", reason: str = "") -> dict:
    out = {"type": type_, "status": status, "reason": reason or f"PyTorchJob{type_}", "message": f"{type_} msg"}
    if t is not None:
        out["lastTransitionTime"] = t
    return out


T = [f"2026-11-30T09:{m:02d}:00Z" for m in range(10)]

PYTORCHJOB_CASES = [
    ("no status yet", None, State.PENDING),
    ("only Created", [cond("Created", t=T[0])], State.CREATED),
    ("Created then Running", [cond("Created", t=T[0]), cond("Running", t=T[1])], State.RUNNING),
    ("Restarting replaces Running", [cond("Created", t=T[0]), cond("Restarting", t=T[2])], State.RESTARTING),
    ("Running again after a restart", [cond("Created", t=T[0]), cond("Running", t=T[3]),
                                       cond("Restarting", "False", T[2])], State.RUNNING),
    ("Succeeded with Running turned False", [cond("Created", t=T[0]), cond("Running", "False", T[1]),
                                             cond("Succeeded", t=T[5])], State.SUCCEEDED),
    ("Failed with Running turned False", [cond("Created", t=T[0]), cond("Running", "False", T[1]),
                                          cond("Failed", t=T[4])], State.FAILED),
    ("out of order: the latest time wins, not the list position",
     [cond("Succeeded", t=T[6]), cond("Running", t=T[2]), cond("Created", t=T[0])], State.SUCCEEDED),
    ("out of order: an earlier Failed listed last loses", [cond("Running", t=T[7]), cond("Failed", t=T[3])],
     State.RUNNING),
    ("a False entry never wins, however late", [cond("Created", t=T[0]), cond("Running", "False", T[9])],
     State.CREATED),
    ("status is compared as a string", [cond("Created", t=T[0]), cond("Running", "Unknown", T[5])], State.CREATED),
    ("Suspended", [cond("Created", t=T[0]), cond("Running", "False", T[1]), cond("Suspended", t=T[2])],
     State.SUSPENDED),
    ("resumed: Suspended False, Running later", [cond("Created", t=T[0]), cond("Suspended", "False", T[3]),
                                                 cond("Running", t=T[4])], State.RUNNING),
    ("equal times: the later entry wins", [cond("Running", t=T[1]), cond("Restarting", t=T[1])], State.RESTARTING),
    ("missing time counts as oldest", [cond("Failed", t=None), cond("Running", t=T[1])], State.RUNNING),
    ("times with and without a zone compare", [cond("Running", t="2026-11-30T09:05:00"),
                                               cond("Restarting", t="2026-11-30T09:04:00.5+00:00")], State.RUNNING),
    ("unknown condition types are ignored", [cond("Created", t=T[0]), cond("Evicted", t=T[8])], State.CREATED),
]


@pytest.mark.parametrize("conditions, expected", [c[1:] for c in PYTORCHJOB_CASES],
                         ids=[c[0] for c in PYTORCHJOB_CASES])
def test_pytorchjob_conditions_map_to_states(conditions: list[dict] | None, expected: State) -> None:
    job: dict[str, Any] = {"kind": "PyTorchJob", "metadata": {"name": "j"}}
    if conditions is not None:
        job["status"] = {"conditions": conditions}
    assert pytorchjob_status(job).state is expected


def test_pytorchjob_status_carries_reason_message_and_nonzero_replicas() -> None:
    conditions = [cond("Created", t=T[0]), cond("Restarting", t=T[2], reason="PyTorchJobRestarting")]
    job = {"status": {"conditions": conditions,
                      "replicaStatuses": {"Worker": {"failed": 1, "active": 0}, "Master": {"active": 1}}}}
    status = pytorchjob_status(job)
    assert status == JobStatus(State.RESTARTING, "PyTorchJobRestarting", "Restarting msg",
                               {"Master": {"active": 1}, "Worker": {"failed": 1}})
    assert format_status("PyTorchJob", "ml", "j", status, 12) == (
        "[   12s] PyTorchJob ml/j: Restarting (PyTorchJobRestarting: Restarting msg)  "
        "[Master: active 1 | Worker: failed 1]")


TRAINJOB_CASES = [
    ("no status, no pods: created", {}, [], State.CREATED),
    ("pods pending: created", {"jobsStatus": [{"name": "node", "active": 2, "ready": 0}]}, ["Pending"], State.CREATED),
    ("a pod running: running", {}, ["Pending", "Running"], State.RUNNING),
    ("JobSet ready pods: running", {"jobsStatus": [{"name": "node", "active": 2, "ready": 2}]}, [], State.RUNNING),
    ("Complete", {"conditions": [cond("Complete", t=T[5])]}, ["Succeeded"], State.SUCCEEDED),
    ("Failed", {"conditions": [cond("Failed", t=T[5])]}, ["Failed"], State.FAILED),
    ("Suspended", {"conditions": [cond("Suspended", t=T[1])]}, [], State.SUSPENDED),
    ("resumed (Suspended False) and running", {"conditions": [cond("Suspended", "False", T[2])]}, ["Running"],
     State.RUNNING),
    ("suspended earlier, complete later", {"conditions": [cond("Complete", t=T[6]), cond("Suspended", t=T[1])]},
     [], State.SUCCEEDED),
    ("a PyTorchJob-only type means nothing here", {"conditions": [cond("Succeeded", t=T[6])]}, [], State.CREATED),
]


@pytest.mark.parametrize("status, phases, expected", [c[1:] for c in TRAINJOB_CASES],
                         ids=[c[0] for c in TRAINJOB_CASES])
def test_trainjob_conditions_and_pods_map_to_states(status: dict, phases: list[str], expected: State) -> None:
    assert trainjob_status({"kind": "TrainJob", "status": status}, phases).state is expected


def test_exit_codes_are_distinct() -> None:
    assert len({int(code) for code in ExitCode}) == len(ExitCode)
    assert (ExitCode.OK, ExitCode.JOB_FAILED, ExitCode.USAGE, ExitCode.TIMEOUT) == (0, 1, 2, 124)


# --------------------------------------------------------------------------- the watcher over recordings


def test_watcher_follows_created_running_restarting_running_succeeded(api: FakeApiServer, client: LaunchClient) -> None:
    api.play(load_recording("pytorchjob-restart-succeeded"))
    out = io.StringIO()
    result = Watcher(client, JOB, interval=0, out=out).run()
    text = out.getvalue()
    assert states(text) == ["Created", "Running", "Restarting", "Running", "Succeeded"]  # the repeated step: one line
    assert result.exit_code is ExitCode.OK and result.status.state is State.SUCCEEDED
    assert "[Master: active 1 | Worker: failed 1]" in text  # replica counts of the restart
    assert text.count("warning: PyTorchJobRestarting: PyTorchJob demo-sam-train is restarting") == 1
    assert len(api.received("GET", "pytorchjobs/demo-sam-train")) == 6  # one GET per recorded step
    assert "--- last" not in text  # logs only on failure


def test_watcher_on_failure_prints_master_log_tail_and_events(api: FakeApiServer, client: LaunchClient) -> None:
    api.play(load_recording("pytorchjob-failed"))
    out = io.StringIO()
    result = Watcher(client, JOB, interval=0, out=out, log_lines=3).run()
    text = out.getvalue()
    assert states(text) == ["Created", "Running", "Failed"]
    assert result.exit_code is ExitCode.JOB_FAILED
    assert "--- last 3 lines of pod demo-sam-train-master-0 (container pytorch) ---" in text
    assert "no shard matches gs://sam-demo/synth/sa_*.tar" in text
    assert "preflight: torch" not in text  # only the tail
    log_request = api.received("GET", "log")[-1]
    assert log_request.path.endswith("/pods/demo-sam-train-master-0/log")
    assert log_request.query == {"container": "pytorch", "tailLines": "3"}
    assert "--- events of PyTorchJob ml/demo-sam-train ---" in text
    assert "ExitedWithCode: Pod: ml.demo-sam-train-master-0 exited with code 2" in text


class FakeClock:
    """Monotonic seconds that the poll sleep advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("condition, code", [("Running", ExitCode.TIMEOUT), ("Suspended", ExitCode.SUSPENDED)])
def test_watcher_timeout_exit_code_depends_on_state(api: FakeApiServer, client: LaunchClient,
                                                    monkeypatch: pytest.MonkeyPatch, condition: str,
                                                    code: ExitCode) -> None:
    job = load_recording("pytorchjob-failed")["steps"][0]["job"]
    job["status"] = {"conditions": [cond("Created", t=T[0]), cond(condition, t=T[1])]}
    api.put(job)
    clock = FakeClock()
    monkeypatch.setattr("trainer.launch.watch.sleep", lambda s: setattr(clock, "now", clock.now + s))
    out = io.StringIO()
    result = Watcher(client, JOB, interval=30, timeout=100, out=out, clock=clock).run()
    assert result.exit_code is code and result.timed_out
    assert len(api.received("GET", "pytorchjobs/demo-sam-train")) == 5  # polls at 0, 30, 60, 90, 120 s
    assert f"timed out after 100s: PyTorchJob ml/demo-sam-train is {condition} and left as it is; " \
           "delete it with: sam-train launch delete demo-sam-train -n ml" in out.getvalue()


def test_watcher_without_events_permission_still_watches(api: FakeApiServer, client: LaunchClient) -> None:
    api.play(load_recording("pytorchjob-restart-succeeded"))
    api.forbid("list", "events")
    out = io.StringIO()
    assert Watcher(client, JOB, interval=0, out=out).run().exit_code is ExitCode.OK
    assert out.getvalue().count("(events not shown: forbidden:") == 1


# --------------------------------------------------------------------------- submit, replace, delete


def test_submit_creates_configmap_serviceaccount_then_job(api: FakeApiServer, client: LaunchClient) -> None:
    objects = tiny_objects()
    said: list[str] = []
    ref = client.submit(objects, say=said.append)
    assert ref == JOB
    posts = api.received("POST")
    assert [p.path for p in posts] == ["/api/v1/namespaces/ml/configmaps", "/api/v1/namespaces/ml/serviceaccounts",
                                       "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs"]
    assert [p.body for p in posts] == objects  # sent as built, nothing added or dropped
    assert said == ["created ConfigMap ml/demo-sam-train-config", "created ServiceAccount ml/demo-sam-train",
                    "created PyTorchJob ml/demo-sam-train"]


def test_resubmit_refuses_without_replace_and_changes_nothing(api: FakeApiServer, client: LaunchClient) -> None:
    client.submit(tiny_objects())
    before = len(api.requests)
    with pytest.raises(AlreadyExists) as err:
        client.submit(tiny_objects("nodes=3"))
    assert str(err.value) == ("PyTorchJob ml/demo-sam-train already exists: pass --replace to delete and resubmit it, "
                              "or delete it first: sam-train launch delete demo-sam-train -n ml")
    assert err.value.exit_code is ExitCode.API_REFUSED
    assert [r.method for r in api.requests[before:]] == ["GET"]  # only the existence check


def test_replace_deletes_waits_until_gone_patches_and_recreates(api: FakeApiServer, client: LaunchClient,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trainer.launch.watch.sleep", lambda s: None)
    client.submit(tiny_objects())
    api.foreground_gets = 2  # the job lingers (deletionTimestamp set) for two GETs, as pods are removed
    new = tiny_objects("nodes=3", "training.config.optim.max_iters=40")
    said: list[str] = []
    client.submit(new, replace=True, say=said.append)
    delete = api.received("DELETE")[0]
    assert delete.path.endswith("/pytorchjobs/demo-sam-train") and delete.body["propagationPolicy"] == "Foreground"
    # the job lingers for two GETs, then is gone; ConfigMap and ServiceAccount: create -> 409 -> patch
    assert [r.method for r in api.requests[-8:]] == ["GET", "GET", "GET", "POST", "PATCH", "POST", "PATCH", "POST"]
    assert said[0] == "deleting the existing PyTorchJob ml/demo-sam-train (--replace)"
    assert said[1:] == ["patched ConfigMap ml/demo-sam-train-config", "patched ServiceAccount ml/demo-sam-train",
                        "created PyTorchJob ml/demo-sam-train"]
    stored = api.stored("pytorchjobs", "demo-sam-train")
    assert stored["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert "max_iters = 40" in api.stored("configmaps", "demo-sam-train-config")["data"]["config.toml"]


def test_delete_removes_job_configmap_and_serviceaccount(api: FakeApiServer, client: LaunchClient) -> None:
    client.submit(tiny_objects())
    api.foreground_gets = 0
    lines = client.delete(JOB, "Background")
    assert lines == ["deleted PyTorchJob ml/demo-sam-train (propagationPolicy Background)",
                     "deleted ConfigMap ml/demo-sam-train-config", "deleted ServiceAccount ml/demo-sam-train"]
    assert [d.body["propagationPolicy"] for d in api.received("DELETE")] == ["Background"] * 3
    assert not list(api.iter_objects("pytorchjobs")) and not list(api.iter_objects("configmaps"))
    assert not list(api.iter_objects("serviceaccounts"))


def test_delete_keeps_a_service_account_it_did_not_create(api: FakeApiServer, client: LaunchClient) -> None:
    client.submit(tiny_objects("serviceAccount.create=false", "serviceAccount.name=shared-gcs"))
    api.put({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "shared-gcs", "namespace": "ml"}})
    lines = client.delete(JOB)
    assert lines[1:] == ["deleted ConfigMap ml/demo-sam-train-config",
                         "kept ServiceAccount ml/shared-gcs (not created with this job)"]
    assert api.stored("serviceaccounts", "shared-gcs") is not None


def test_apply_patches_an_existing_configmap(api: FakeApiServer, client: LaunchClient) -> None:
    configmap = tiny_objects()[0]
    assert client.apply(configmap) == "created"
    configmap["data"]["config.toml"] = "preset = 'tiny_cpu'\n"
    assert client.apply(configmap) == "patched"
    assert api.stored("configmaps", "demo-sam-train-config")["data"] == {"config.toml": "preset = 'tiny_cpu'\n"}
    assert api.received("PATCH")[0].headers["content-type"] == "application/strategic-merge-patch+json"


# --------------------------------------------------------------------------- errors: one line, with the cause


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_crd_is_named_with_what_to_install(api: FakeApiServer, client: LaunchClient) -> None:
    api.uninstall("kubeflow.org")
    with pytest.raises(CrdMissing) as err:
        client.submit(tiny_objects())
    assert one_line(err) == ("the PyTorchJob CRD (kubeflow.org/v1) is not installed in the cluster: "
                             "install training-operator v1.9 (README 'On a cluster')")
    assert err.value.exit_code is ExitCode.API_REFUSED
    assert not api.received("POST")  # found out before anything was created


def test_missing_job_is_not_a_missing_crd(client: LaunchClient) -> None:
    with pytest.raises(NotFound) as err:
        client.get_job(JOB)
    assert one_line(err) == 'PyTorchJob "demo-sam-train" not found in namespace "ml"'
    with pytest.raises(NotFound) as err:
        client.find_job("nothing")
    assert one_line(err) == ("no PyTorchJob or TrainJob named 'nothing' in namespace 'ml' "
                             "(sam-train launch list -n ml)")


def test_missing_namespace_is_named(api: FakeApiServer, client: LaunchClient) -> None:
    api.fail("create", "configmaps", 404, 'namespaces "ml" not found', "NotFound", name="demo-sam-train-config")
    api.failures[-1].body["details"] = {"name": "ml", "kind": "namespaces"}  # what the real server says
    with pytest.raises(NotFound) as err:
        client.submit(tiny_objects())
    assert one_line(err) == ('namespace "ml" does not exist: create it (kubectl create namespace ml) '
                             "or pick another with -n")


def test_forbidden_names_the_service_account_verb_resource_and_namespace(api: FakeApiServer,
                                                                         client: LaunchClient) -> None:
    api.forbid("create", "pytorchjobs")
    with pytest.raises(LaunchError) as err:
        client.submit(tiny_objects())
    text = one_line(err)
    assert text.startswith('forbidden: service account "ml/launcher" may not create pytorchjobs.kubeflow.org '
                           'in namespace "ml"; grant it with a Role and RoleBinding (server: pytorchjobs.kubeflow.org '
                           'is forbidden: User "system:serviceaccount:ml:launcher" cannot create')
    assert err.value.exit_code is ExitCode.API_REFUSED
    # the ConfigMap and ServiceAccount this submit created are removed again
    assert not list(api.iter_objects("configmaps")) and not list(api.iter_objects("serviceaccounts"))


def test_a_refused_job_keeps_companions_that_existed_before(api: FakeApiServer, client: LaunchClient) -> None:
    configmap, account, job = tiny_objects()
    client.apply(configmap)  # e.g. from an earlier run of the release
    api.fail("create", "pytorchjobs", 422, "invalid", "Invalid", causes=[{"field": "spec", "message": "bad"}])
    said: list[str] = []
    with pytest.raises(LaunchError, match="as invalid: spec: bad"):
        client.submit([configmap, account, job], say=said.append)
    assert api.stored("configmaps", "demo-sam-train-config") is not None  # patched, not created: kept
    assert api.stored("serviceaccounts", "demo-sam-train") is None
    assert said[-1] == "removed ServiceAccount ml/demo-sam-train again (the job was refused)"


def test_forbidden_log_read_names_the_subresource(api: FakeApiServer, client: LaunchClient) -> None:
    api.play(load_recording("pytorchjob-failed"))
    api.forbid("get", "pods")
    with pytest.raises(LaunchError) as err:
        client.logs(JOB)
    assert 'may not get pods/log in namespace "ml"' in one_line(err)


def test_quota_exceeded_is_reported_as_quota(api: FakeApiServer, client: LaunchClient) -> None:
    api.fail("create", "pytorchjobs", 403, 'pytorchjobs.kubeflow.org "demo-sam-train" is forbidden: exceeded quota: '
             "ml-jobs, requested: count/pytorchjobs.kubeflow.org=1, used: count/pytorchjobs.kubeflow.org=2, "
             "limited: count/pytorchjobs.kubeflow.org=2", "Forbidden")
    with pytest.raises(LaunchError) as err:
        client.submit(tiny_objects())
    assert one_line(err) == ('quota exceeded in namespace "ml" creating PyTorchJob "demo-sam-train": exceeded quota: '
                             "ml-jobs, requested: count/pytorchjobs.kubeflow.org=1, used: "
                             "count/pytorchjobs.kubeflow.org=2, limited: count/pytorchjobs.kubeflow.org=2")


def test_invalid_object_lists_the_fields_the_server_named(api: FakeApiServer, client: LaunchClient) -> None:
    causes = [{"reason": "FieldValueInvalid", "field": "spec.pytorchReplicaSpecs.Master.replicas",
               "message": "Invalid value: 2: must be 1"},
              {"reason": "FieldValueRequired", "field": "spec.pytorchReplicaSpecs.Worker.template.spec.containers",
               "message": "Required value"}]
    api.fail("create", "pytorchjobs", 422, 'PyTorchJob.kubeflow.org "demo-sam-train" is invalid: [...]', "Invalid",
             name="demo-sam-train", causes=causes)
    with pytest.raises(LaunchError) as err:
        client.submit(tiny_objects())
    assert one_line(err) == ('the API server rejected PyTorchJob "demo-sam-train" as invalid: '
                             "spec.pytorchReplicaSpecs.Master.replicas: Invalid value: 2: must be 1; "
                             "spec.pytorchReplicaSpecs.Worker.template.spec.containers: Required value")


def test_create_race_409_is_already_exists(api: FakeApiServer, client: LaunchClient) -> None:
    api.fail("create", "pytorchjobs", 409, 'pytorchjobs.kubeflow.org "demo-sam-train" already exists',
             "AlreadyExists", name="demo-sam-train")
    with pytest.raises(AlreadyExists) as err:
        client.submit(tiny_objects())
    assert "was created by someone else meanwhile" in one_line(err)


def test_unreachable_server_has_its_own_exit_code(api: FakeApiServer, tmp_path: Path) -> None:
    from tests.conftest import free_port

    config = json.loads(api.write_kubeconfig(tmp_path / "kc").read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "kc").write_text(json.dumps(config))
    with pytest.raises(LaunchError) as err:
        connect(str(tmp_path / "kc")).get_job(JOB)
    assert re.fullmatch(r"cannot reach the Kubernetes API server at http://127\.0\.0\.1:\d+: connection refused "
                        r"\(check --kubeconfig/--context\)", one_line(err))
    assert err.value.exit_code is ExitCode.UNREACHABLE


def test_wrong_credentials_are_a_config_error(api: FakeApiServer, tmp_path: Path) -> None:
    client = connect(str(api.write_kubeconfig(tmp_path / "kc", token="expired")))
    with pytest.raises(LaunchError) as err:
        client.get_job(JOB)
    assert "did not accept the credentials" in one_line(err) and err.value.exit_code is ExitCode.USAGE


def test_kubeconfig_problems_are_usage_errors(tmp_path: Path, kubeconfig: Path) -> None:
    with pytest.raises(LaunchError) as err:
        connect(str(tmp_path / "missing"))
    assert one_line(err) == f"--kubeconfig {tmp_path / 'missing'}: no such file"
    with pytest.raises(LaunchError) as err:
        connect(str(kubeconfig), context="prod")
    assert err.value.exit_code is ExitCode.USAGE and "prod" in one_line(err)


# --------------------------------------------------------------------------- kubeconfig, namespaces, lookup


def test_namespace_comes_from_the_context(kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert connect(str(kubeconfig)).namespace == "ml"
    assert connect(str(kubeconfig), namespace="other").namespace == "other"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert default_namespace() == "default"  # no kubeconfig: never fails (--dry-run needs no cluster)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert default_namespace() == "ml"


def test_in_a_pod_the_service_account_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBERNETES_SERVICE_HOST and no kubeconfig named: the pod's token, CA and namespace (a KFP step)."""
    import kubernetes.config.incluster_config as incluster

    for name, text in (("token", "pod-token"), ("ca.crt", "-----BEGIN CERTIFICATE-----\n"), ("namespace", "kfp-runs")):
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setattr("trainer.launch.client.INCLUSTER_NAMESPACE_FILE", str(tmp_path / "namespace"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    client = connect()
    assert client.api_client.configuration.host == "https://10.96.0.1:443"
    assert client.api_client.configuration.api_key["authorization"].lower() == "bearer pod-token"
    assert (client.namespace, client.identity) == ("kfp-runs", "this pod's service account")


def test_find_job_by_release_name_and_list(api: FakeApiServer, client: LaunchClient) -> None:
    client.submit(tiny_objects())
    assert client.find_job("demo") == JOB  # the release name: label app.kubernetes.io/instance
    assert client.find_job("demo-sam-train") == JOB
    api.uninstall("trainer.kubeflow.org")  # no Trainer v2: PyTorchJobs are still listed
    assert [ref for ref, _ in client.list_jobs()] == [JOB]
    api.uninstall("kubeflow.org")
    with pytest.raises(CrdMissing):
        client.list_jobs()


# --------------------------------------------------------------------------- logs


def test_logs_pick_the_replica_and_the_training_container(api: FakeApiServer, client: LaunchClient) -> None:
    api.play(load_recording("pytorchjob-failed"))
    pod, container, text = client.logs(JOB, "worker", 0)
    assert (pod, container) == ("demo-sam-train-worker-0", "pytorch")  # not the init container
    assert "waiting for rendezvous" in text
    assert api.received("GET", "pods")[-2].query["labelSelector"] == (
        "training.kubeflow.org/job-name=demo-sam-train,training.kubeflow.org/replica-type=worker,"
        "training.kubeflow.org/replica-index=0")
    with pytest.raises(NotFound, match="has no pod for worker 5"):
        client.logs(JOB, "worker", 5)


def test_a_one_line_json_log_comes_back_verbatim(api: FakeApiServer, client: LaunchClient) -> None:
    """The trainer logs JSON lines; the client would parse a one-document log into a dict."""
    api.play(load_recording("pytorchjob-failed"))
    _, _, text = client.logs(JOB, tail_lines=1)
    assert text.startswith('{"ts": "2026-11-30T09:01:05.390+00:00", "level": "ERROR"') and text.endswith("}\n")


def test_follow_streams_the_log(api: FakeApiServer, client: LaunchClient) -> None:
    api.play(load_recording("pytorchjob-restart-succeeded"))
    out = io.StringIO()
    client.follow_logs(JOB, out)
    assert out.getvalue().splitlines()[-1].endswith('"msg": "finished: 30 steps"}')
    assert api.received("GET", "log")[-1].query["follow"].lower() == "true"


# --------------------------------------------------------------------------- TrainJob


def trainjob_pod(rank: int, phase: str, created: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"demo-sam-train-node-0-{rank}-{created[-3:-1]}x7q", "namespace": "ml",
                         "creationTimestamp": created,
                         "labels": {"jobset.sigs.k8s.io/jobset-name": "demo-sam-train",
                                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                    "jobset.sigs.k8s.io/job-index": "0",
                                    "batch.kubernetes.io/job-completion-index": str(rank)}},
            "spec": {"containers": [{"name": "node", "image": "ghcr.io/sam-k8s/sam-train:0.1.0"}]},
            "status": {"phase": phase}}


def test_trainjob_state_from_pods_and_node_logs(api: FakeApiServer, client: LaunchClient) -> None:
    api.put({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
             "metadata": {"name": "demo-sam-train", "namespace": "ml",
                          "labels": {"app.kubernetes.io/instance": "demo"}},
             "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}},
             "status": {"conditions": [cond("Suspended", "False", T[1], reason="Resumed")],
                        "jobsStatus": [{"name": "node", "active": 2, "ready": 1}]}})
    for rank, phase, created in ((0, "Failed", "2026-11-30T09:00:05Z"), (0, "Running", "2026-11-30T09:04:05Z"),
                                 (1, "Running", "2026-11-30T09:00:05Z")):
        pod = api.put(trainjob_pod(rank, phase, created))
        api.pod_logs[("ml", pod["metadata"]["name"])] = {"node": f"{phase} node {rank}\n"}
    ref = client.find_job("demo")
    assert ref == JobRef(TRAINJOB, "demo-sam-train", "ml")
    assert client.status(ref).state is State.RUNNING
    assert client.logs(ref)[2] == "Running node 0\n"  # the restarted node 0, not its failed predecessor
    assert client.logs(ref, "worker", 0)[2] == "Running node 1\n"  # worker i = node i + 1


@pytest.mark.parametrize("kind, selector", [(PYTORCHJOB, "training.kubeflow.org/job-name=x"),
                                            (TRAINJOB, "jobset.sigs.k8s.io/jobset-name=x")])
def test_pods_are_selected_by_the_operators_label(api: FakeApiServer, client: LaunchClient, kind: Any,
                                                  selector: str) -> None:
    client.pods(JobRef(kind, "x", "ml"))
    assert api.received("GET", "pods")[-1].query == {"labelSelector": selector}


@pytest.mark.parametrize("name", ["pytorchjob-restart-succeeded", "pytorchjob-failed"])
def test_recordings_are_valid_api_objects(name: str) -> None:
    """Every recorded job (status included), pod and event passes strict schema validation."""
    from tests.k8s.validate import require_crds, validate

    require_crds()
    recording = load_recording(name)
    versions = [int(step["job"]["metadata"]["resourceVersion"]) for step in recording["steps"]]
    assert versions == sorted(versions)
    for obj in [step["job"] for step in recording["steps"]] + recording["pods"] + [
            event for step in recording["steps"] for event in step["events"]]:
        validate(obj)
    for step in recording["steps"]:
        for c in step["job"]["status"]["conditions"]:
            assert set(c) == {"type", "status", "reason", "message", "lastUpdateTime", "lastTransitionTime"}
