"""kind_e2e.sh's control flow, run for real against stand-in tools (``tests/e2e/fake_cli.py``).

No cluster is involved: ``kind``, ``kubectl``, ``helm``, ``docker`` and ``sleep`` on PATH are
wrappers of the fake, which logs each call and answers like the real tool. What this proves
is the script's own logic, which a kind run would otherwise be the first to exercise: the
order of the steps (the GPU node is tainted before anything is scheduled, the job is
installed with the script's value files), that each check fails the run when its condition is
broken, and that the EXIT trap collects diagnostics on failure and always deletes the cluster
(unless ``KEEP_CLUSTER=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tests" / "e2e" / "kind_e2e.sh"
FAKE = REPO_ROOT / "tests" / "e2e" / "fake_cli.py"
TOOLS = ("kind", "kubectl", "helm", "docker", "sleep")


def run_script(tmp_path: Path, scenario: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    """Run kind_e2e.sh with the fakes first on PATH; returns the result, the tool calls, DIAG_DIR."""
    bin_dir, state, diag = tmp_path / "bin", tmp_path / "state", tmp_path / "diag"
    for folder in (bin_dir, state):
        folder.mkdir(exist_ok=True)
    for tool in TOOLS:
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" {tool} "$@"\n')
        wrapper.chmod(0o755)
    log = tmp_path / "calls.log"
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_CLI_SCENARIO": scenario, "FAKE_CLI_STATE": str(state), "FAKE_CLI_LOG": str(log),
        "FAKE_CLI_REAL_SLEEP": shutil.which("sleep") or "/bin/sleep",
        "DIAG_DIR": str(diag), "TMPDIR": str(tmp_path), **env,
    }
    for name in ("KEEP_CLUSTER", "SKIP_BUILD", "DEPLOY", "TIMEOUT_S", "RUNNER_TEMP"):
        if name not in env:
            full_env.pop(name, None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=full_env)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls, diag


def index_of(calls: list[str], prefix: str) -> int:
    for i, call in enumerate(calls):
        if call.startswith(prefix):
            return i
    raise AssertionError(f"no call starting with {prefix!r} in:\n" + "\n".join(calls))


def output(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-6000:]


def test_happy_path_runs_every_step_in_order(tmp_path: Path) -> None:
    proc, calls, diag = run_script(tmp_path, "ok")
    assert proc.returncode == 0, output(proc)
    assert "E2E PASSED" in proc.stdout
    order = [
        "docker build --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH_SPEC=torch==2.13.0",
        "kind create cluster --name sam-e2e --config tests/e2e/kind-config.yaml",
        "kubectl wait --for=condition=Ready node --all",
        "kubectl label node sam-e2e-worker2 nvidia.com/gpu.present=true",
        "kubectl taint node sam-e2e-worker2 nvidia.com/gpu=present:NoSchedule",
        "kubectl patch node sam-e2e-worker2 --subresource=status",
        "kubectl apply --server-side -k github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.4",
        "kubectl rollout status -n kubeflow deployment/training-operator",
        "kind load docker-image sam-train:e2e --name sam-e2e",
        "helm upgrade --install a100-gfd charts/sam-train -n sam-e2e -f charts/sam-train/presets/vit-b-a100.yaml",
        "helm uninstall a100-gfd",
        "helm upgrade --install a100-gke charts/sam-train",
        "kubectl apply -n sam-e2e -f tests/e2e/fake-gcs.yaml",
        "kubectl run synth-shards -n sam-e2e --image=sam-train:e2e",
        "helm upgrade --install sam-train charts/sam-train -n sam-e2e -f charts/sam-train/presets/tiny-cpu.yaml "
        "-f tests/e2e/values-kind.yaml",
        "kubectl run check-checkpoint -n sam-e2e",
        "kind delete cluster --name sam-e2e",
    ]
    positions = [index_of(calls, prefix) for prefix in order]
    assert positions == sorted(positions), "steps out of order:\n" + "\n".join(calls)
    # The A100 checks pass the preset under test to the chart.
    assert "--set nodePool.preset=gpu-operator-a100-80gb --set fullnameOverride=a100-gfd" in calls[positions[9]]
    # Metrics were read through the API server's pod proxy, for both pods.
    for pod in ("sam-train-master-0", "sam-train-worker-0"):
        assert any(f"get --raw /api/v1/namespaces/sam-e2e/pods/{pod}:9400/proxy/metrics" in c for c in calls)
    assert "highest sam_train_step seen" in proc.stdout
    assert not any(c.startswith("kind export logs") for c in calls), "diagnostics collected on success"


def test_failed_job_fails_fast_with_diagnostics_and_cleanup(tmp_path: Path) -> None:
    proc, calls, diag = run_script(tmp_path, "job-fails")
    assert proc.returncode != 0 and "E2E PASSED" not in proc.stdout
    assert "pytorchjob/sam-train Failed: PyTorchJob sam-train is failed" in proc.stderr, output(proc)
    assert not any(c.startswith("kubectl run check-checkpoint") for c in calls)  # stopped at once
    assert index_of(calls, "kind export logs") < index_of(calls, "kind delete cluster --name sam-e2e")
    for name in ("events.txt", "pytorchjobs.yaml", "pods-describe.txt", "training-operator.log", "nodes.txt",
                 "pods/sam-train-master-0.pytorch.log", "kind/kind-version.txt", "docker-build.log"):
        assert (diag / name).is_file(), f"{name} missing from diagnostics: {sorted(diag.rglob('*'))}"
    assert any("logs -n sam-e2e sam-train-master-0 -c pytorch --previous" in c for c in calls)
    assert any("get events -A --sort-by=.metadata.creationTimestamp" in c for c in calls)
    assert not (diag / "work" / "kubeconfig").exists()  # no credentials in the uploaded artifact


@pytest.mark.parametrize(("scenario", "message"), [
    ("gpu-check-misplaced", "landed on sam-e2e-worker, not sam-e2e-worker2"),
    ("cpu-on-gpu-node", "a tiny-cpu pod ran on the tainted GPU node sam-e2e-worker2"),
    ("no-metrics", "no scrape of sam-train-master-0:9400/metrics showed sam_train_step"),
])
def test_each_check_fails_the_run(tmp_path: Path, scenario: str, message: str) -> None:
    proc, calls, _ = run_script(tmp_path, scenario)
    assert proc.returncode != 0, output(proc)
    assert message in proc.stderr, output(proc)
    assert calls[-1].startswith("kind delete cluster") or any(c.startswith("kind delete cluster") for c in calls)


def test_kustomize_deploy_and_keep_cluster(tmp_path: Path) -> None:
    proc, calls, _ = run_script(tmp_path, "ok", DEPLOY="kustomize", KEEP_CLUSTER="1", SKIP_BUILD="1")
    assert proc.returncode == 0, output(proc)
    assert any(c == "kubectl apply --server-side -k manifests/overlays/kind-cpu" for c in calls)
    assert not any(c.startswith("helm upgrade --install sam-train") for c in calls)
    assert not any(c.startswith("docker build") for c in calls) and any(c.startswith("docker image inspect") for c in calls)
    assert not any(c.startswith("kind delete cluster") for c in calls)
    assert "KEEP_CLUSTER=1: cluster sam-e2e left running" in proc.stdout


def test_unknown_deploy_mode_is_refused(tmp_path: Path) -> None:
    proc, _, _ = run_script(tmp_path, "ok", DEPLOY="kubectl", SKIP_BUILD="1")
    assert proc.returncode != 0 and "DEPLOY must be helm or kustomize, not 'kubectl'" in proc.stderr, output(proc)
