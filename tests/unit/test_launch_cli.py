"""``sam-train launch`` (``trainer.launch.cli``) end to end against a fake API server on loopback.

No kube-apiserver can run here, so ``tests/launch/fake_apiserver.py`` serves the real
Kubernetes HTTP protocol to the real ``kubernetes`` client, which the command loads from a
kubeconfig file this test writes (``server: http://127.0.0.1:PORT``, a bearer token). Job
histories are recorded API objects (``tests/launch/recordings/``) replayed one per GET.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.launch import require_kubernetes
from tests.launch.fake_apiserver import FakeApiServer, load_recording

require_kubernetes()

from trainer.launch.cli import main  # noqa: E402

PRESET = "charts/sam-train/presets/tiny-cpu.yaml"
VALUES = ["-f", PRESET, "--set", "training.dataShards=gs://sam-demo/synth/sa_*.tar",
          "--set", "training.runDir=gs://sam-demo/runs/demo"]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def kube(api: FakeApiServer, tmp_path: Path) -> list[str]:
    """The cluster flags of a kubeconfig pointing at the fake server (context namespace ml)."""
    return ["--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig"))]


@pytest.fixture(autouse=True)
def no_default_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of this machine's own kube setup leaks in: no kubeconfig, not in a pod."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trainer.launch.watch.sleep", lambda seconds: None)


def states(output: str) -> list[str]:
    return re.findall(r"^\[\s*\d+s\] \S+ \S+: (\w+)", output, flags=re.MULTILINE)


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["submit"], ["status"], ["wait"], ["logs"], ["delete"], ["list"]])
def test_help_works_without_a_cluster(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sam-train launch {' '.join(command)}".rstrip())
    assert "124  --timeout passed while the job was still running" in out  # the exit code table
    if command:
        assert "--kubeconfig" in out and "--context" in out


def test_submit_help_shows_helm_like_inputs_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["submit", "--help"])
    out = capsys.readouterr().out
    for flag in ("-f FILE, --values FILE", "--set KEY=VALUE", "--dry-run", "--replace", "--wait", "--timeout SECONDS",
                 "--delete-on-cancel", "-n NAMESPACE, --namespace NAMESPACE"):
        assert flag in out
    assert "seconds between polls (default: 10.0)" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


# --------------------------------------------------------------------------- submit


PRESETS = sorted(p.name for p in Path("charts/sam-train/presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_prints_exactly_what_submit_sends(api: FakeApiServer, kube: list[str], preset: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    values = ["-f", f"charts/sam-train/presets/{preset}", *VALUES[2:]]
    if preset != "tiny-cpu.yaml":  # the paper's recipe starts from MAE weights
        values += ["--set", "training.config.model.mae_checkpoint=gs://sam-demo/mae/mae_pretrain.pth"]
    assert main(["submit", "demo", *values, *kube, "--dry-run"]) == 0
    text = capsys.readouterr().out
    printed = list(yaml.safe_load_all(text))
    assert not api.requests  # a dry run talks to no cluster
    assert [o["kind"] for o in printed] == ["ConfigMap", "ServiceAccount", "PyTorchJob"]
    assert {o["metadata"]["namespace"] for o in printed} == {"ml"}  # the context's namespace, as in a real submit
    assert "  config.toml: |\n" in text  # the config file reads as a block, as kubectl shows it
    assert main(["submit", "demo", *values, *kube]) == 0
    assert [request.body for request in api.received("POST")] == printed


def test_trainjob_with_its_own_runtime_is_submitted_and_deleted(api: FakeApiServer, kube: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    flags = [*VALUES, *kube, "--set", "jobKind=trainjob", "--set", "trainJob.createRuntime=true"]
    assert main(["submit", "demo", *flags, "--dry-run"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert main(["submit", "demo", *flags]) == 0
    assert [r.body for r in api.received("POST")] == printed
    assert [r.path.rsplit("/", 1)[-1] for r in api.received("POST")] == [
        "configmaps", "serviceaccounts", "trainingruntimes", "trainjobs"]
    capsys.readouterr()
    assert main(["status", "demo", *kube]) == 0
    assert capsys.readouterr().out.startswith("TrainJob ml/demo-sam-train: Created")
    api.foreground_gets = 0
    assert main(["delete", "demo", *kube]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "deleted ConfigMap ml/demo-sam-train-config", "deleted ServiceAccount ml/demo-sam-train",
        "deleted TrainingRuntime ml/demo-sam-train"]
    assert not [o for plural in ("trainjobs", "trainingruntimes", "configmaps", "serviceaccounts")
                for o in api.iter_objects(plural)]


def test_dry_run_needs_no_kubeconfig(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "demo", *VALUES, "--dry-run", "--set", "nodes=3", "--set", "jobKind=trainjob"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    job = objects[-1]
    assert (job["kind"], job["metadata"]["namespace"], job["spec"]["trainer"]["numNodes"]) == ("TrainJob", "default", 3)


def test_submit_prints_what_it_did_and_how_to_follow(api: FakeApiServer, kube: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "demo", *VALUES, *kube, "-n", "team-a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["created ConfigMap team-a/demo-sam-train-config", "created ServiceAccount team-a/demo-sam-train",
                       "created PyTorchJob team-a/demo-sam-train"]
    assert out[3:] == ["watch:  sam-train launch wait demo-sam-train -n team-a",
                       "logs:   sam-train launch logs demo-sam-train -n team-a --follow",
                       "delete: sam-train launch delete demo-sam-train -n team-a"]
    assert api.stored("pytorchjobs", "demo-sam-train", namespace="team-a") is not None


def test_submit_wait_follows_the_recorded_restart_to_success(api: FakeApiServer, kube: list[str], fast_polls: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    api.play(load_recording("pytorchjob-restart-succeeded"), store_job=False)  # the job comes from the submit
    assert main(["submit", "demo", *VALUES, *kube, "--wait", "--interval", "0"]) == 0
    assert states(capsys.readouterr().out) == ["Created", "Running", "Restarting", "Running", "Succeeded"]


def test_wait_on_a_failed_job_exits_1_with_the_master_log(api: FakeApiServer, kube: list[str], fast_polls: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    api.play(load_recording("pytorchjob-failed"))
    assert main(["wait", "demo", *kube]) == 1  # the release name finds demo-sam-train
    out = capsys.readouterr().out
    assert states(out) == ["Created", "Running", "Failed"]
    assert "no shard matches gs://sam-demo/synth/sa_*.tar" in out
    assert "Warning  PyTorchJobFailed: PyTorchJob demo-sam-train is failed because 1 Master replica(s) failed." in out


def test_wait_timeout_exits_124_and_leaves_the_job(api: FakeApiServer, kube: list[str], fast_polls: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    job = load_recording("pytorchjob-restart-succeeded")["steps"][1]["job"]  # Running, for ever
    api.put(job)
    assert main(["wait", "demo-sam-train", *kube, "--timeout", "1e-9"]) == 124
    assert "left as it is; delete it with: sam-train launch delete demo-sam-train -n ml" in capsys.readouterr().out
    assert not api.received("DELETE")


# --------------------------------------------------------------------------- Ctrl-C


def interrupt(seconds: float) -> None:
    raise KeyboardInterrupt


def submit_and_interrupt(api: FakeApiServer, kube: list[str], monkeypatch: pytest.MonkeyPatch,
                         *flags: str) -> int:
    api.play(load_recording("pytorchjob-restart-succeeded"), store_job=False)
    api.foreground_gets = 0
    monkeypatch.setattr("trainer.launch.watch.sleep", interrupt)  # Ctrl-C during the first poll sleep
    return main(["submit", "demo", *VALUES, *kube, "--wait", *flags])


def test_ctrl_c_with_delete_on_cancel_deletes_job_configmap_serviceaccount(
        api: FakeApiServer, kube: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert submit_and_interrupt(api, kube, monkeypatch, "--delete-on-cancel") == 130
    assert [r.path.rsplit("/", 2)[-2:] for r in api.received("DELETE")] == [
        ["pytorchjobs", "demo-sam-train"], ["configmaps", "demo-sam-train-config"],
        ["serviceaccounts", "demo-sam-train"]]
    assert not list(api.iter_objects("configmaps")) and not list(api.iter_objects("pytorchjobs"))
    assert "deleted PyTorchJob ml/demo-sam-train (propagationPolicy Foreground)" in capsys.readouterr().out


def test_ctrl_c_without_a_terminal_leaves_the_job_running(api: FakeApiServer, kube: list[str],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert submit_and_interrupt(api, kube, monkeypatch) == 130
    assert not api.received("DELETE")
    assert ("PyTorchJob ml/demo-sam-train is left running; delete it with: sam-train launch delete demo-sam-train "
            "-n ml") in capsys.readouterr().out


@pytest.mark.parametrize("answer, deleted", [("y", True), ("", False), ("no", False)])
def test_ctrl_c_on_a_terminal_asks(api: FakeApiServer, kube: list[str], monkeypatch: pytest.MonkeyPatch,
                                   answer: str, deleted: bool) -> None:
    questions: list[str] = []
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda q: questions.append(q) or answer)
    assert submit_and_interrupt(api, kube, monkeypatch) == 130
    assert questions == ["delete PyTorchJob ml/demo-sam-train? [y/N] "]
    assert bool(api.received("DELETE")) is deleted


# --------------------------------------------------------------------------- errors -> one line + exit code


def test_missing_crd_is_one_line_exit_3(api: FakeApiServer, kube: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    api.uninstall("kubeflow.org")
    assert main(["submit", "demo", *VALUES, *kube]) == 3
    assert capsys.readouterr().err == ("error: the PyTorchJob CRD (kubeflow.org/v1) is not installed in the cluster: "
                                       "install training-operator v1.9 (README 'On a cluster')\n")


def test_existing_job_is_refused_exit_3(api: FakeApiServer, kube: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "demo", *VALUES, *kube]) == 0
    assert main(["submit", "demo", *VALUES, *kube]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists: pass --replace" in err


def test_forbidden_is_one_line_exit_3(api: FakeApiServer, kube: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    api.forbid("create", "configmaps")
    assert main(["submit", "demo", *VALUES, *kube]) == 3
    err = capsys.readouterr().err
    assert err.startswith('error: forbidden: service account "ml/launcher" may not create configmaps in namespace "ml"')
    assert err.count("\n") == 1


def test_bad_values_are_usage_errors_before_any_request(api: FakeApiServer, kube: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "demo", *VALUES, *kube, "--set", "gpusPerNod=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gpusPerNod" in err and err.count("\n") == 1
    assert not api.requests


def test_unreachable_cluster_exit_4(api: FakeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    config = api.write_kubeconfig(tmp_path / "kc")
    config.write_text(config.read_text().replace(api.url, f"http://127.0.0.1:{free_port()}"))
    assert main(["status", "demo", "--kubeconfig", str(config)]) == 4
    assert "connection refused" in capsys.readouterr().err


def test_unknown_context_exit_2(kube: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", *kube, "--context", "prod"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot use the kubeconfig")


# --------------------------------------------------------------------------- status, logs, delete, list


def test_status_logs_list_delete(api: FakeApiServer, kube: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    api.play(load_recording("pytorchjob-failed"))
    assert main(["status", "demo", *kube]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PyTorchJob ml/demo-sam-train: Created")
    assert "pod demo-sam-train-master-0: Failed, 0 restarts, node gke-ml-cpu-pool-0a2b" in out

    assert main(["logs", "demo", *kube, "--tail", "1"]) == 0
    assert '"msg": "worker 0 exited with code 2 (bad config): not restarted"' in capsys.readouterr().out
    assert main(["logs", "demo", *kube, "--replica", "worker", "--index", "0", "--follow"]) == 0
    assert "waiting for rendezvous" in capsys.readouterr().out

    assert main(["list", *kube]) == 0
    assert re.match(r"PyTorchJob\s+demo-sam-train\s+\w+\s+2026-11-30T09:00:00Z", capsys.readouterr().out)

    assert main(["delete", "demo", *kube, "--propagation", "Background"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "deleted PyTorchJob ml/demo-sam-train (propagationPolicy Background)"
    assert api.received("DELETE")[0].body["propagationPolicy"] == "Background"
    assert main(["delete", "demo", *kube]) == 3  # gone now
    assert "no PyTorchJob or TrainJob named 'demo'" in capsys.readouterr().err


def test_kubeconfig_from_the_environment(api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "env-kubeconfig", namespace="team-b")))
    assert main(["list"]) == 0
    assert capsys.readouterr().out == "no PyTorchJob or TrainJob in namespace team-b\n"
    assert api.requests[0].path == "/apis/kubeflow.org/v1/namespaces/team-b/pytorchjobs"
