"""The launch step against a fake Kubernetes API server: create, wait, fail, time out, cancel.

No kube-apiserver can run here (no container runtime, no kind), so the step talks to
``tests/launch/fake_apiserver.py``: real HTTP and JSON, the real ``kubernetes`` client loaded
from a real kubeconfig (``$KUBECONFIG``), recorded PyTorchJob histories replayed one state
per GET (``tests/launch/recordings``). The step's function runs in this process (so that a
real SIGTERM can be sent to it), and once through ``kfp.local`` (a subprocess running the
component's copied source, as a pod would).
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.pipelines import require_kfp
from tests.pipelines.conftest import preset_values_json

require_kfp()

from tests.launch.fake_apiserver import FakeApiServer, load_recording  # noqa: E402

from pipelines.components import RUN_ID_ANNOTATION, launch_and_wait, sam_job_spec  # noqa: E402
from tests.pipelines.launching import JOB, RUN_DIR, RUN_ID, SHARDS, expected_objects, launch  # noqa: E402


def created(api: FakeApiServer) -> list[dict]:
    return [r.body for r in api.requests if r.method == "POST"]


def deleted(api: FakeApiServer) -> list[str]:
    return [r.path.rsplit("/", 2)[-2] + "/" + r.path.rsplit("/", 1)[-1] for r in api.received("DELETE")]


# --------------------------------------------------------------------------- the job spec


def test_job_spec_layers_preset_values_sets_then_typed_inputs() -> None:
    spec = sam_job_spec(
        "tiny-cpu", preset_values_json(),
        '{"nodes": 3, "gpusPerNode": 1, "training": {"config": {"optim": {"max_iters": 7}}}}',
        ["nodes=4", "training.config.optim.max_iters=9", "training.dataShards=gs://elsewhere/*.tar"],
        SHARDS, RUN_DIR, nodes=5, gpus_per_node=-1, node_pool="gke-a2-ultragpu",
        image="registry.example.com:5000/team/sam-train:1.2", name="demo", namespace="ml")
    assert spec.nodes == 5  # typed input > --set > values_json > preset (2)
    assert spec.gpus_per_node == 1  # -1 keeps what the layers below say
    assert spec.training.config["optim"]["max_iters"] == 9  # --set over values_json
    assert spec.training.data_shards == SHARDS  # the validated shards win over a --set
    assert spec.training.config["data"]["max_masks_per_image"] == 4  # from the preset
    assert spec.node_pool.preset == "gke-a2-ultragpu"
    assert (spec.image.repository, spec.image.tag) == ("registry.example.com:5000/team/sam-train", "1.2")
    assert spec.fullname == JOB


DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("image, repository, tag, ref", [
    ("ghcr.io/sam-k8s/sam-train:0.1.0", "ghcr.io/sam-k8s/sam-train", "0.1.0", "ghcr.io/sam-k8s/sam-train:0.1.0"),
    ("localhost:5000/sam-train", "localhost:5000/sam-train", "latest", "localhost:5000/sam-train:latest"),
    (f"ghcr.io/sam-k8s/sam-train@{DIGEST}", "ghcr.io/sam-k8s/sam-train", DIGEST, f"ghcr.io/sam-k8s/sam-train@{DIGEST}"),
])
def test_job_spec_reads_image_references(image: str, repository: str, tag: str, ref: str) -> None:
    spec = sam_job_spec("tiny-cpu", preset_values_json(), "", [], SHARDS, RUN_DIR, 0, -1, "", image, "demo", "ml")
    assert (spec.image.repository, spec.image.tag) == (repository, tag)
    assert spec.image_ref == ref  # what the pods run


@pytest.mark.parametrize("preset, values_json, sets, message", [
    ("vit-z", "", [], r"preset 'vit-z' is not a chart preset; choose one of \['tiny-cpu', "),
    ("tiny-cpu", "[1, 2]", [], "values_json: want a JSON object"),
    ("tiny-cpu", "{nodes: 2}", [], "values_json: not JSON"),
    ("tiny-cpu", "", ["gpusPerNode=eight"], "gpusPerNode"),
])
def test_job_spec_errors_name_the_input(preset: str, values_json: str, sets: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sam_job_spec(preset, preset_values_json(), values_json, sets, SHARDS, RUN_DIR, 0, -1, "", "", "demo", "ml")


# --------------------------------------------------------------------------- launch and wait


def test_launch_creates_the_charts_objects_and_waits_for_success(api: FakeApiServer,
                                                                 capsys: pytest.CaptureFixture) -> None:
    api.play(load_recording("pytorchjob-restart-succeeded"), store_job=False)
    assert launch() == f"{RUN_DIR}/checkpoints"
    want = expected_objects()
    want[-1]["metadata"].setdefault("annotations", {})[RUN_ID_ANNOTATION] = RUN_ID
    assert [(o["kind"], o["metadata"]["namespace"]) for o in created(api)] == [
        ("ConfigMap", "ml"), ("ServiceAccount", "ml"), ("PyTorchJob", "ml")]
    assert created(api) == want  # exactly the builder's objects (= the chart's), in the context's namespace
    assert deleted(api) == []  # a finished job is kept (runPolicy.ttlSecondsAfterFinished cleans up)
    printed = capsys.readouterr().out
    assert "Restarting" in printed and f"PyTorchJob ml/{JOB} Succeeded" in printed


def test_a_failed_job_fails_the_step_with_the_masters_log(api: FakeApiServer) -> None:
    api.play(load_recording("pytorchjob-failed"), store_job=False)
    with pytest.raises(RuntimeError) as err:
        launch()
    message = str(err.value)
    assert message.startswith(f"PyTorchJob ml/{JOB} Failed (PyTorchJobFailed: PyTorchJob {JOB} is failed because "
                              f"1 Master replica(s) failed.)")
    assert f"last 20 lines of pod {JOB}-master-0:" in message
    assert "worker 0 exited with code 2 (bad config): not restarted" in message
    assert deleted(api) == []  # kept for inspection


def test_timeout_deletes_the_job(api: FakeApiServer) -> None:
    """No operator here: the job never gets a condition (Pending) until the timeout passes."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"PyTorchJob ml/{JOB} was still Pending after timeout_s=1: deleted it"):
        launch(timeout_s=1, poll_interval_s=1)
    assert time.monotonic() - start < 15
    assert deleted(api) == [f"pytorchjobs/{JOB}", f"configmaps/{JOB}-config", f"serviceaccounts/{JOB}"]


def test_sigterm_deletes_the_job(api: FakeApiServer) -> None:
    """KFP cancels a run by terminating its pods: SIGTERM reaches the step, which deletes the job."""
    before = signal.getsignal(signal.SIGTERM)

    def terminate_once_created() -> None:
        deadline = time.monotonic() + 30
        while not api.received("POST", "pytorchjobs") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the step is polling the job now
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_created, daemon=True)
    killer.start()
    with pytest.raises(RuntimeError, match=rf"cancelled \(SIGTERM\): deleted PyTorchJob ml/{JOB}"):
        launch(timeout_s=0, poll_interval_s=1)
    killer.join(timeout=5)
    assert f"pytorchjobs/{JOB}" in deleted(api)
    assert api.stored("pytorchjobs", JOB) is None or api.stored("pytorchjobs", JOB)["metadata"].get(
        "deletionTimestamp")
    assert signal.getsignal(signal.SIGTERM) is before  # the step restores the handlers


def test_a_retried_step_adopts_its_own_job(api: FakeApiServer) -> None:
    job = copy.deepcopy(expected_objects()[-1])
    job["metadata"]["annotations"] = {RUN_ID_ANNOTATION: RUN_ID}
    api.put(job)
    api.play(load_recording("pytorchjob-restart-succeeded"), store_job=False)
    assert launch() == f"{RUN_DIR}/checkpoints"
    assert created(api) == []  # nothing resubmitted


def test_a_job_of_another_run_is_not_touched(api: FakeApiServer) -> None:
    job = copy.deepcopy(expected_objects()[-1])
    job["metadata"]["annotations"] = {RUN_ID_ANNOTATION: "another-run"}
    api.put(job)
    with pytest.raises(RuntimeError, match=rf"PyTorchJob ml/{JOB} already exists and belongs to run another-run, "
                                           rf"not this run {RUN_ID}: set job_name"):
        launch()
    assert created(api) == [] and deleted(api) == []


def test_forbidden_is_one_readable_line(api: FakeApiServer) -> None:
    """Missing RBAC (the chart's launcherRbac) fails the step naming who may not do what."""
    from trainer.launch.client import LaunchError

    api.forbid("create", "pytorchjobs")
    with pytest.raises(LaunchError, match=r"forbidden: .* may not create pytorchjobs\.kubeflow\.org in namespace "
                                          r"\"ml\"; grant it with a Role and RoleBinding") as err:
        launch()
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_the_compiled_step_runs_under_kfp_local(api: FakeApiServer, tmp_path: Path) -> None:
    """The component's copied source (with its additional_funcs) runs in a subprocess like a pod's."""
    from kfp import local

    api.play(load_recording("pytorchjob-restart-succeeded"), store_job=False)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = launch_and_wait(data_shards=SHARDS, run_dir=RUN_DIR, preset="tiny-cpu", preset_values=preset_values_json(),
                           values_json="", set_values=[], nodes=0, gpus_per_node=-1, node_pool="", image="",
                           job_name="demo", namespace="", timeout_s=60, run_id=RUN_ID, poll_interval_s=0)
    assert task.output == f"{RUN_DIR}/checkpoints"
    assert [o["kind"] for o in created(api)] == ["ConfigMap", "ServiceAccount", "PyTorchJob"]
    assert created(api)[-1]["metadata"]["annotations"][RUN_ID_ANNOTATION] == RUN_ID
