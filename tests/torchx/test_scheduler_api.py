"""The ``pytorchjob`` scheduler against a fake Kubernetes API server (tests/launch/fake_apiserver.py).

No kube-apiserver can run here: the fake one speaks the real HTTP protocol on loopback to the
real ``kubernetes`` client (configured from a real kubeconfig, found through ``KUBECONFIG`` as a
user's would be), and replays job histories recorded from training-operator v1.9 (successive
GETs of a job answer successive recorded states). Submit, describe, wait, list, cancel and log
iteration go through TorchX's runner or CLI where a user would use them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.torchx import require_torchx

require_torchx()

from torchx.runner import get_runner  # noqa: E402
from torchx.schedulers.api import Stream  # noqa: E402
from torchx.specs import AppState  # noqa: E402

from tests.launch.fake_apiserver import load_recording  # noqa: E402
from tests.torchx.conftest import cli_env  # noqa: E402
from trainer.launch.torchx_scheduler import PyTorchJobScheduler  # noqa: E402

RECORDED = "ml:demo-sam-train"  # the recordings' job
COMPONENT_ARGS = ["--config", "tiny_cpu", "--nodes", "2", "--nproc_per_node", "0", "--data_shards", "gs://b/sa_*.tar",
                  "--run_dir", "gs://b/runs/tx"]


@pytest.fixture
def api(fake_api: tuple, monkeypatch: pytest.MonkeyPatch) -> object:
    """The fake server, with ``KUBECONFIG`` pointing at it (describe/list/logs get no run options)."""
    server, kubeconfig = fake_api
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return server


def server_fields_removed(obj: dict) -> dict:
    meta = {k: v for k, v in obj["metadata"].items()
            if k not in ("uid", "creationTimestamp", "resourceVersion", "generation")}
    return {**obj, "metadata": meta}


def test_run_submits_the_dry_run_objects_then_status_and_cancel(api) -> None:
    with get_runner() as runner:
        dryrun = runner.dryrun_component("sam_train", COMPONENT_ARGS, "pytorchjob",
                                         cfg={"namespace": "ml", "job_name": "tx"})
        handle = runner.schedule(dryrun)
        assert handle == "pytorchjob://torchx/ml:tx-sam-train"
        for obj in dryrun.request.objects:
            plural = {"ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "PyTorchJob": "pytorchjobs"}
            stored = api.stored(plural[obj["kind"]], obj["metadata"]["name"])
            assert stored is not None and server_fields_removed(stored) == obj, obj["kind"]

        status = runner.status(handle)
        assert status is not None and status.state == AppState.SUBMITTED  # no operator: no condition yet
        assert PyTorchJobScheduler("s").describe("ml:tx-sam-train").roles[0].num_replicas == 2

        runner.cancel(handle)
        deletes = [r.path for r in api.received("DELETE")]
        assert deletes[0].endswith("/pytorchjobs/tx-sam-train")
        assert any(p.endswith("/configmaps/tx-sam-train-config") for p in deletes)
        assert any(p.endswith("/serviceaccounts/tx-sam-train") for p in deletes)
        # Foreground deletion: the job lingers with a deletionTimestamp for one GET, then is gone.
        assert runner.status(handle).state == AppState.CANCELLED
        assert runner.status(handle) is None


def test_describe_follows_a_restart_to_success(api) -> None:
    recording = load_recording("pytorchjob-restart-succeeded")
    api.play(recording)
    scheduler = PyTorchJobScheduler("s")
    answers = [scheduler.describe(RECORDED) for _ in recording["steps"]]
    assert [a.state for a in answers] == [AppState.PENDING, AppState.RUNNING, AppState.RUNNING, AppState.RUNNING,
                                          AppState.RUNNING, AppState.SUCCEEDED]
    assert answers[2].msg.startswith("Restarting: PyTorchJobRestarting: ")
    assert "1 Worker replica(s) failed" in answers[2].msg
    (statuses,) = answers[-1].roles_statuses
    assert [(r.id, r.hostname) for r in statuses.replicas] == [(0, "demo-sam-train-master-0"),
                                                               (1, "demo-sam-train-worker-0")]
    assert answers[-1].roles[0].num_replicas == 2 and answers[-1].roles[0].entrypoint == "python"


def test_runner_wait_ends_with_the_jobs_final_state(api) -> None:
    api.play(load_recording("pytorchjob-failed"))
    with get_runner() as runner:
        status = runner.wait(f"pytorchjob://torchx/{RECORDED}", wait_interval=0.01)
    assert status is not None and status.state == AppState.FAILED
    assert status.msg.startswith("Failed: ")


def test_describe_of_a_missing_job_is_none(api) -> None:
    assert PyTorchJobScheduler("s").describe("ml:nothing-here") is None
    assert not PyTorchJobScheduler("s").exists("ml:nothing-here")


def test_list_shows_the_namespaces_pytorchjobs(api) -> None:
    recording = load_recording("pytorchjob-restart-succeeded")
    api.play(recording)
    other = recording["steps"][-1]["job"]
    api.put({**other, "metadata": {**other["metadata"], "name": "other-sam-train"}})
    listed = {(a.app_id, a.state) for a in PyTorchJobScheduler("s").list()}
    # The replayed job has no status until its first GET: no condition yet is SUBMITTED.
    assert listed == {("ml:demo-sam-train", AppState.SUBMITTED), ("ml:other-sam-train", AppState.SUCCEEDED)}


def test_log_iter_reads_the_replica_pods_training_container(api) -> None:
    recording = load_recording("pytorchjob-failed")
    api.play(recording)
    scheduler = PyTorchJobScheduler("s")
    master = recording["logs"]["demo-sam-train-master-0"]["pytorch"]
    lines = list(scheduler.log_iter(RECORDED, "trainer", 0))
    assert "".join(lines) == master and all(line.endswith("\n") for line in lines)
    assert list(scheduler.log_iter(RECORDED, "trainer", 0, regex="preflight")) == \
        [line for line in lines if "preflight" in line]
    # Node 1 is Worker 0; its init container's log is not the training log.
    worker = list(scheduler.log_iter(RECORDED, "trainer", 1))
    assert "".join(worker) == recording["logs"]["demo-sam-train-worker-0"]["pytorch"]
    queries = [r.query for r in api.received("GET", "pods") if r.path.endswith("/log")]
    assert [q["container"] for q in queries] == ["pytorch"] * 3


def test_log_iter_follow_and_since_reach_the_api(api) -> None:
    from datetime import datetime, timedelta

    api.play(load_recording("pytorchjob-failed"))
    # Long enough for many 4 KiB chunks, with 2-byte characters that chunks will cut in half.
    master = "".join(f"step {i}: vérifié ✓\n" for i in range(3000))
    api.pod_logs[("ml", "demo-sam-train-master-0")]["pytorch"] = master
    scheduler = PyTorchJobScheduler("s")
    followed = list(scheduler.log_iter(RECORDED, "trainer", 0, should_tail=True,
                                       since=datetime.now() - timedelta(minutes=5)))
    assert followed == master.splitlines(keepends=True)  # whole lines, however the stream was chunked
    query = [r.query for r in api.received("GET", "pods") if r.path.endswith("/log")][-1]
    assert query["follow"].lower() == "true"
    assert 290 <= int(query["sinceSeconds"]) <= 310


@pytest.mark.parametrize("kwargs, message", [
    ({"streams": Stream.STDERR}, "only the combined log stream"),
    ({"until": "now"}, "cannot end a log at a time"),
    ({"role_name": "worker"}, "no role 'worker'"),
])
def test_log_iter_refuses_what_the_pod_log_api_cannot_do(api, kwargs: dict, message: str) -> None:
    args = {"app_id": RECORDED, "role_name": "trainer", **kwargs}
    with pytest.raises(ValueError, match=message):
        list(PyTorchJobScheduler("s").log_iter(**args))


def test_cli_status_and_log(api, torchx_cli: str, tmp_path: Path) -> None:
    """`torchx status` and `torchx log` in a subprocess, reaching the fake server over loopback."""
    recording = load_recording("pytorchjob-restart-succeeded")
    api.play(recording)
    for _ in recording["steps"]:  # move the replay to its last state (Succeeded)
        PyTorchJobScheduler("s").describe(RECORDED)
    env = cli_env(KUBECONFIG=str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    status = subprocess.run([torchx_cli, "status", f"pytorchjob://torchx/{RECORDED}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    assert "SUCCEEDED" in status.stdout
    log = subprocess.run([torchx_cli, "log", "--regex", "finished", f"pytorchjob://torchx/{RECORDED}/trainer/0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert log.returncode == 0, log.stderr[-3000:]
    assert "finished: 30 steps" in log.stdout
    assert "checkpoint" not in log.stdout  # the regex kept only the matching line


def test_cli_run_submits_and_cancel_deletes(api, torchx_cli: str, tmp_path: Path) -> None:
    """`torchx run -s pytorchjob` then `torchx cancel`, as a user types them."""
    env = cli_env(KUBECONFIG=str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    run = subprocess.run([torchx_cli, "run", "-s", "pytorchjob", "--scheduler_args", "job_name=tx", "sam_train",
                          *COMPONENT_ARGS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    handle = "pytorchjob://torchx/ml:tx-sam-train"  # namespace ml: the kube context's
    assert handle in run.stdout.splitlines()
    job = api.stored("pytorchjobs", "tx-sam-train")
    assert job is not None and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    cancel = subprocess.run([torchx_cli, "cancel", handle], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert cancel.returncode == 0, cancel.stderr[-3000:]
    deleted = [r.path for r in api.received("DELETE", "pytorchjobs")]
    assert deleted == ["/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs/tx-sam-train"]
