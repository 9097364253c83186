"""``python -m pipelines.submit`` against a fake KFP API server (``tests/pipelines/fake_kfp.py``).

The real ``kfp.Client`` talks real HTTP to a loopback server that answers like the v2beta1
REST API (no KFP backend can run here: it needs a cluster, Argo and MySQL). The tests check
what arrives: the compiled pipeline spec, typed parameters, the service account, and the
exit codes of waiting.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.pipelines import require_kfp
from tests.pipelines.conftest import REPO_ROOT

require_kfp()

from pipelines.submit import main  # noqa: E402
from tests.pipelines.fake_kfp import FakeKfpServer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:This client only works with Kubeflow Pipeline:FutureWarning")
GOLDEN = REPO_ROOT / "pipelines" / "sam_pipeline.yaml"
REQUIRED = ["--param", "data_shards=gs://b/sa1b/sa_*.tar", "--param", "run_dir=gs://b/runs/h1",
            "--param", "eval_shards=gs://b/val/sa_000999.tar", "--param", "preset=vit-h-a100"]


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """kfp.Client reads (and may write) ~/.config/kfp/context.json: keep it in the test's folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)


@pytest.fixture
def kfp_server() -> Iterator[FakeKfpServer]:
    with FakeKfpServer() as server:
        yield server


def test_submit_sends_the_package_with_typed_parameters(kfp_server: FakeKfpServer,
                                                        capsys: pytest.CaptureFixture) -> None:
    code = main(["--host", kfp_server.url, "--package", str(GOLDEN), *REQUIRED, "--param", "nodes=16",
                 "--param", 'eval_tolerations=[{"key": "team", "operator": "Exists"}]',
                 "--param", 'eval_node_selector={"pool": "a100"}',
                 "--set", "training.config.model.mae_checkpoint=gs://b/mae.pth", "--set", "scheduling.gang=volcano",
                 "--service-account", "sam-train-launcher", "--experiment", "sam-h", "--run-name", "vit-h-1"])
    assert code == 0
    (run,) = kfp_server.runs.values()
    assert run["display_name"] == "vit-h-1" and run["service_account"] == "sam-train-launcher"
    assert run["runtime_config"]["parameters"] == {
        "data_shards": "gs://b/sa1b/sa_*.tar", "run_dir": "gs://b/runs/h1", "eval_shards": "gs://b/val/sa_000999.tar",
        "preset": "vit-h-a100", "nodes": 16, "eval_tolerations": [{"key": "team", "operator": "Exists"}],
        "eval_node_selector": {"pool": "a100"},
        "set_values": ["training.config.model.mae_checkpoint=gs://b/mae.pth", "scheduling.gang=volcano"]}
    # The whole compiled package is what the server gets: the pipeline spec and the platform
    # spec (the kfp-kubernetes settings), the package's two YAML documents.
    pipeline_spec, platform_spec = yaml.safe_load_all(GOLDEN.read_text())
    assert run["pipeline_spec"] == {"pipeline_spec": pipeline_spec, "platform_spec": platform_spec}
    (experiment,) = kfp_server.experiments.values()
    assert experiment["display_name"] == "sam-h" and run["experiment_id"] == experiment["experiment_id"]
    assert f"submitted run {run['run_id']}: {kfp_server.url}/#/runs/details/{run['run_id']}" in capsys.readouterr().out


def test_submit_compiles_the_pipeline_when_no_package_is_given(kfp_server: FakeKfpServer) -> None:
    assert main(["--host", kfp_server.url, *REQUIRED]) == 0
    (run,) = kfp_server.runs.values()
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert set(spec["root"]["dag"]["tasks"]) == {"validate-dataset", "validate-dataset-2", "launch-and-wait",
                                                 "evaluate", "export"}


@pytest.mark.parametrize("states, code", [
    (("PENDING", "RUNNING", "SUCCEEDED"), 0),
    (("RUNNING", "FAILED"), 1),
    (("RUNNING", "CANCELING", "CANCELED"), 1),
])
def test_wait_follows_the_run_to_its_end(states: tuple, code: int, capsys: pytest.CaptureFixture) -> None:
    with FakeKfpServer(states=states) as server:
        assert main(["--host", server.url, "--package", str(GOLDEN), *REQUIRED, "--wait", "--interval", "0.05"]) == code
        (run_id,) = server.runs
    printed = capsys.readouterr().out
    for state in dict.fromkeys(states):
        assert f"run {run_id}: {state}" in printed


def test_wait_times_out_with_124(capsys: pytest.CaptureFixture) -> None:
    with FakeKfpServer(states=("RUNNING",)) as server:
        assert main(["--host", server.url, "--package", str(GOLDEN), *REQUIRED, "--wait", "--timeout", "0.3",
                     "--interval", "0.05"]) == 124
    assert "timed out after 0.3s; the run goes on" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--param", "nodez=2"], "--param nodez: the pipeline has no such input (did you mean nodes?)"),
    (["--param", "nodes=two"], "--param nodes=two: not a number_integer"),
    (["--param", "eval_tolerations={}"], "--param eval_tolerations={}: not a list: want a JSON array"),
    (["--param", "nodes"], "--param nodes: want NAME=VALUE"),
])
def test_bad_parameters_exit_2_before_anything_is_sent(kfp_server: FakeKfpServer, capsys: pytest.CaptureFixture,
                                                       args: list, message: str) -> None:
    assert main(["--host", kfp_server.url, "--package", str(GOLDEN), *REQUIRED, *args]) == 2
    assert message in capsys.readouterr().err
    assert kfp_server.requests == []


def test_missing_required_inputs_are_listed(kfp_server: FakeKfpServer, capsys: pytest.CaptureFixture) -> None:
    assert main(["--host", kfp_server.url, "--package", str(GOLDEN), "--param", "preset=tiny-cpu"]) == 2
    assert "missing required pipeline input(s): data_shards, eval_shards, run_dir" in capsys.readouterr().err
    assert kfp_server.requests == []


def test_an_unreachable_server_exits_3(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["--host", f"http://127.0.0.1:{port}", "--package", str(GOLDEN), *REQUIRED]) == 3
    assert f"the KFP API server at http://127.0.0.1:{port} refused or could not be reached" in capsys.readouterr().err
