"""The kind end-to-end test (``tests/e2e/kind_e2e.sh``) and what of it can be checked without kind.

- ``test_kind_e2e``: runs the script where kind, docker, kubectl and helm are installed and a
  Docker engine answers. Our CI machine cannot run kind, so this one SKIPS there, also under
  ``CI=true`` (GitHub Actions runs it: ``.github/workflows/e2e-kind.yaml``).
- Static checks, always run: the script parses (``bash -n``, shellcheck), the workflow runs it,
  every value file, preset and ``--set`` key the script hands to helm exists in the chart.
- The script's in-pod steps without Kubernetes: its synth and checkpoint-check Python run
  against a loopback fake-gcs-server around two processes that get exactly the rendered
  PyTorchJob's command, env and ConfigMap plus the operator's injected variables, and its
  metrics parsing reads a real scrape.
- The script's own values rendered offline, exactly as it installs them (it keeps them in
  files; the arrays are parsed from the script): every object validates, the tiny-cpu job can
  land on kind's untainted workers and fits them, its wiring (image, emulator, bucket, metrics
  port, names) is what the script waits for; each A100 scheduling check selects the node the
  script labels, tolerates its taint and fits its fake GPUs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import yaml

from tests.conftest import GcsServer, free_port, unavailable
from tests.e2e import manifests
from tests.k8s import render as chart

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tests" / "e2e" / "kind_e2e.sh"
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "e2e-kind.yaml"
FAKE_GCS = REPO_ROOT / "tests" / "e2e" / "fake-gcs.yaml"
KIND_CONFIG = REPO_ROOT / "tests" / "e2e" / "kind-config.yaml"
VALUES_YAML = REPO_ROOT / "charts" / "sam-train" / "values.yaml"
E2E_TOOLS = ("kind", "docker", "kubectl", "helm")
SKIP_REASON = ("kind e2e needs kind, docker, kubectl and helm (GitHub Actions: .github/workflows/e2e-kind.yaml); "
               "not available here (our CI machine cannot run kind, so this skips there too)")
#: Labels every kind node carries; a nodeSelector beyond these keeps a pod off kind's workers.
KIND_NODE_LABELS = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}


# ----------------------------------------------------------------------------- the script's facts

def script_text() -> str:
    return SCRIPT.read_text()


def script_scalar(name: str) -> str:
    """The value of ``NAME=value`` at the start of a line of the script (quotes removed)."""
    match = re.search(rf"^{name}=(\S+)", script_text(), re.M)
    assert match, f"{SCRIPT.name} defines no {name}="
    return shlex.split(match.group(1))[0]


def script_array(name: str) -> list[str]:
    """The words of ``NAME=(...)`` in the script, as bash splits them."""
    match = re.search(rf"^{name}=\((.*?)\)", script_text(), re.M | re.S)
    assert match, f"{SCRIPT.name} defines no {name}=(...)"
    return shlex.split(match.group(1), comments=True)


def value_files(words: list[str]) -> list[Path]:
    """The ``-f FILE`` arguments among ``words``."""
    return [REPO_ROOT / words[i + 1] for i, w in enumerate(words) if w == "-f"]


def load_values(files: list[Path], *more: Mapping[str, Any]) -> dict[str, Any]:
    """What ``helm -f f1 -f f2 --set ...`` passes (chart defaults aside)."""
    return chart.deep_merge({}, *[yaml.safe_load(f.read_text()) or {} for f in files], *more)


def set_values(pairs: Mapping[str, str]) -> dict[str, Any]:
    """``--set a.b=c`` pairs as nested values."""
    out: dict[str, Any] = {}
    for dotted, value in pairs.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def a100_checks() -> list[tuple[str, str]]:
    """(release, nodePool.preset) of each scheduling check."""
    return [tuple(item.split(":", 1)) for item in script_array("A100_CHECKS")]  # type: ignore[misc]


def check_set_keys() -> set[str]:
    """The keys ``check_gpu_placement`` passes with ``--set``."""
    return set(re.findall(r"--set\s+([A-Za-z][\w.]*)=", script_text()))


def gpu_node_labels() -> dict[str, str]:
    return dict(item.split("=", 1) for item in script_array("GPU_NODE_LABELS"))


def gpu_node_taint() -> dict[str, str]:
    key_value, effect = script_scalar("GPU_NODE_TAINT").split(":")
    key, value = key_value.split("=")
    return {"key": key, "value": value, "effect": effect}


# ----------------------------------------------------------------------------- scheduling logic

def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, str]) -> bool:
    """The scheduler's rule: does ``toleration`` tolerate ``taint``?"""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint["key"]
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint["value"]


def pod_specs(job: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
        yield replica, spec["template"]["spec"]


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (cores, bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def render_script_values(files: list[Path], extra: Mapping[str, Any], release: str, namespace: str) -> list[dict]:
    return chart.render(load_values(files, extra), name=release, namespace=namespace)


def only(objects: list[dict], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def validate_objects(objects: list[dict]) -> None:
    from tests.k8s import validate
    validate.require_crds()
    validate.validate_all(objects)


# ----------------------------------------------------------------------------- the real run

def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_kind_e2e() -> None:
    """The whole script: 2-node PyTorchJob on kind to Succeeded, checkpoint, metrics, placement."""
    # Deliberately a skip even under CI=true: our CI machine has no kind and cannot run it.
    if any(shutil.which(tool) is None for tool in E2E_TOOLS) or not _docker_answers():
        pytest.skip(SKIP_REASON)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=2700,
                          env=dict(os.environ))
    assert proc.returncode == 0, f"kind_e2e.sh exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-12000:]}"
    assert "E2E PASSED" in proc.stdout


# ----------------------------------------------------------------------------- static checks

def test_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = script_text()
    assert text.splitlines()[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in text
    assert re.search(r"^trap on_exit EXIT$", text, re.M), "no EXIT trap (diagnostics, cleanup)"
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"


def test_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        unavailable("needs `shellcheck` (apt package shellcheck; `make test` installs it as root)")
    proc = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_runs_the_script_with_pinned_actions() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert triggers["push"]["branches"] == ["main"] and triggers["pull_request"]["branches"] == ["main"]
    assert "workflow_dispatch" in triggers
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] == 45
    steps = job["steps"]
    uses = [s["uses"] for s in steps if "uses" in s]
    for ref in uses:  # a moving ref (@main, @v1) would change the test under us
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", ref), ref
    kind_step = next(s for s in steps if s.get("uses", "").startswith("helm/kind-action@"))
    assert re.fullmatch(r"helm/kind-action@v\d+\.\d+\.\d+", kind_step["uses"])
    assert kind_step["with"]["install_only"] is True  # the script creates (and deletes) the cluster
    # The node image in kind-config.yaml is the build for this kind release.
    assert f"kind {kind_step['with']['version']}" in KIND_CONFIG.read_text()
    assert any(re.fullmatch(r"azure/setup-helm@v\d+\.\d+\.\d+", u) for u in uses)
    assert any("tests/e2e/kind_e2e.sh" in s.get("run", "") for s in steps)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "failure()" and upload["with"]["path"] == job["env"]["DIAG_DIR"]


def test_kind_config_is_three_pinned_nodes() -> None:
    config = yaml.safe_load(KIND_CONFIG.read_text())
    assert [n["role"] for n in config["nodes"]] == ["control-plane", "worker", "worker"]
    images = {n["image"] for n in config["nodes"]}
    assert len(images) == 1 and re.fullmatch(r"kindest/node:v1\.31\.\d+@sha256:[0-9a-f]{64}", images.pop())
    # The script dresses the second worker as the GPU node: kind names it <cluster>-worker2.
    assert re.search(r'^GPU_NODE="\$CLUSTER_NAME-worker2"$', script_text(), re.M)


def _chart_keys(values: Any, defaults: Any, path: str = "") -> list[str]:
    """Keys of ``values`` missing from the chart's ``values.yaml`` (free-form maps not descended)."""
    if not isinstance(values, dict) or not isinstance(defaults, dict) or not defaults:
        return []  # a leaf, or a free-form value ({} / [] in values.yaml: training.config, env, ...)
    missing = []
    for key, value in values.items():
        dotted = f"{path}{key}"
        if key not in defaults:
            missing.append(dotted)
        else:
            missing += _chart_keys(value, defaults[key], dotted + ".")
    return missing


def test_every_value_the_script_passes_exists_in_the_chart() -> None:
    defaults = yaml.safe_load(VALUES_YAML.read_text())
    words = script_array("JOB_VALUES") + script_array("CHECK_VALUES")
    files = value_files(words)
    assert files and all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]
    presets = [f for f in files if f.parent.name == "presets"]
    assert {f.name for f in presets} == {"tiny-cpu.yaml", "vit-b-a100.yaml"}
    for f in files:
        missing = _chart_keys(yaml.safe_load(f.read_text()), defaults)
        assert not missing, f"{f.relative_to(REPO_ROOT)}: not in charts/sam-train/values.yaml: {missing}"
    assert check_set_keys() == {"nodePool.preset", "fullnameOverride"}
    assert not _chart_keys(set_values({k: "x" for k in check_set_keys()}), defaults)


def test_script_and_kind_overlay_install_the_same_values() -> None:
    """DEPLOY=kustomize applies manifests/overlays/kind-cpu: it must be the helm values' render."""
    overlay = next(v for v in manifests.OVERLAYS if v.name == "kind-cpu")
    assert [REPO_ROOT / f for f in overlay.value_files] == value_files(script_array("JOB_VALUES"))
    assert not overlay.values
    assert overlay.namespace == script_scalar("NS") and manifests.RELEASE == script_scalar("JOB")
    assert "manifests/overlays/kind-cpu" in script_text()


def test_fake_gcs_manifest() -> None:
    docs = [d for d in yaml.safe_load_all(FAKE_GCS.read_text()) if d]
    deployment, service = only(docs, "Deployment"), only(docs, "Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"fsouza/fake-gcs-server:\d+\.\d+\.\d+", container["image"])  # pinned, not latest
    args = container["args"]
    assert args[args.index("-backend") + 1] == "memory" and args[args.index("-scheme") + 1] == "http"
    emulator = load_values(value_files(script_array("JOB_VALUES")))["gcs"]["emulatorHost"]
    port = int(args[args.index("-port") + 1])
    # The trainer's STORAGE_EMULATOR_HOST names this Service and port, and the Location header
    # of resumable uploads (-external-url) points back at the same address.
    assert emulator == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert service["spec"]["ports"][0]["port"] == port and args[args.index("-external-url") + 1] == emulator
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert re.search(r"^EMULATOR_ENV=\(--env=STORAGE_EMULATOR_HOST=" + re.escape(emulator), script_text(), re.M)
    validate_objects(docs)


# ----------------------------------------------------------------------------- offline renders

def job_render() -> list[dict]:
    return render_script_values(value_files(script_array("JOB_VALUES")), {}, script_scalar("JOB"),
                                script_scalar("NS"))


def test_job_render_validates() -> None:
    validate_objects(job_render())


def test_job_is_what_the_script_waits_for() -> None:
    objects = job_render()
    job = only(objects, "PyTorchJob")
    assert job["metadata"]["name"] == script_scalar("JOB")
    specs = job["spec"]["pytorchReplicaSpecs"]
    # The script scrapes and reads logs of $JOB-master-0 and $JOB-worker-0: exactly those pods.
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    assert not job["spec"]["runPolicy"].get("suspend")  # rendered only when true
    # The script reads the master's log and the pods' placement after Succeeded: pods must stay.
    assert job["spec"]["runPolicy"].get("cleanPodPolicy", "None") == "None"
    for _, spec in pod_specs(job):
        (container,) = spec["containers"]
        assert container["image"] == script_scalar("IMAGE") and container["imagePullPolicy"] == "IfNotPresent"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics-0"] == int(script_scalar("METRICS_PORT"))
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SAM_GCS_TOKEN"] == "anon" and env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
        assert env["STORAGE_EMULATOR_HOST"] == "http://fake-gcs:4443"
    config = only(objects, "ConfigMap")["data"]["config.toml"]
    bucket, run_url = script_scalar("BUCKET"), script_scalar("RUN_URL").replace("$BUCKET", script_scalar("BUCKET"))
    # The synth pod writes gs://$BUCKET/train; the check pod reads $RUN_URL/checkpoints.
    assert f'"gs://{bucket}/train/sa_*.tar"' in config and f'"{run_url}"' in config
    assert "gs://$BUCKET/train" in script_text()


def test_job_lands_on_untainted_kind_workers() -> None:
    """No selector, affinity or toleration keeps the tiny-cpu pods off (or sends them to) the GPU node."""
    job = only(job_render(), "PyTorchJob")
    taint = gpu_node_taint()
    cpu = memory = 0.0
    for replica, spec in pod_specs(job):
        selector = spec.get("nodeSelector") or {}
        assert selector.items() <= KIND_NODE_LABELS.items(), f"{replica}: nodeSelector {selector}"
        assert not (spec.get("affinity") or {}).get("nodeAffinity"), f"{replica}: node affinity"
        assert not any(tolerates(t, taint) for t in spec.get("tolerations") or []), (
            f"{replica} tolerates the GPU taint {taint}: the script's 'not on the GPU node' check could flake")
        resources = spec["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        replicas = job["spec"]["pytorchReplicaSpecs"][replica]["replicas"]
        cpu += quantity(resources["requests"]["cpu"]) * replicas
        memory += quantity(resources["requests"]["memory"]) * replicas
    # Both pods share the one untainted worker (the control plane is tainted) of a 4-vCPU,
    # 16 GB GitHub runner, with the operator and fake-gcs-server.
    assert cpu <= 3 and memory <= 8 * 2**30, (cpu, memory)


@pytest.mark.parametrize("release,preset", a100_checks())
def test_a100_check_schedules_onto_the_dressed_node(release: str, preset: str) -> None:
    files = value_files(script_array("CHECK_VALUES"))
    extra = set_values({"nodePool.preset": preset, "fullnameOverride": release})
    objects = render_script_values(files, extra, release, script_scalar("NS"))
    validate_objects(objects)
    job = only(objects, "PyTorchJob")
    assert job["metadata"]["name"] == release and list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert not job["spec"]["runPolicy"].get("suspend")  # rendered only when true
    labels, taint = gpu_node_labels(), gpu_node_taint()
    (_, spec), = pod_specs(job)
    selector = spec.get("nodeSelector") or {}
    assert selector, f"{preset}: no nodeSelector: nothing ties the pod to GPU nodes"
    # Every selected label is on the dressed node, and none is on the plain worker.
    assert selector.items() <= {**labels, **KIND_NODE_LABELS}.items(), (preset, selector)
    assert set(selector) - set(KIND_NODE_LABELS)
    assert any(tolerates(t, taint) for t in spec.get("tolerations") or []), (preset, spec.get("tolerations"))
    resources = spec["containers"][0]["resources"]
    assert 1 <= int(resources["limits"]["nvidia.com/gpu"]) <= int(script_scalar("FAKE_GPUS"))
    # Small enough for a kind node on a GitHub runner (the preset's real requests would not fit).
    assert quantity(resources["requests"]["cpu"]) <= 1 and quantity(resources["requests"]["memory"]) <= 2**30
    for name, value in resources["limits"].items():
        if name not in ("memory", "nvidia.com/gpu", "cpu"):
            pytest.fail(f"{preset}: extra resource {name}={value} that no kind node has")


# ----------------------------------------------------------------------------- the pod steps, locally

def pod_snippet(name: str) -> str:
    """The Python the script runs in its one-off pod ``name``, with the script's variables filled in."""
    match = re.search(rf'^pod_python {name} \d+ "\n(.*?)^"$', script_text(), re.M | re.S)
    assert match, f"{SCRIPT.name} has no `pod_python {name}` step"
    code = match.group(1)
    for var in ("RUN_URL", "BUCKET"):  # RUN_URL contains $BUCKET
        code = code.replace(f"${var}", script_scalar(var).replace("$BUCKET", script_scalar("BUCKET")))
    assert "$" not in code, f"unexpanded shell variable in pod_python {name}:\n{code}"
    return code


def scrape_step(text: str) -> str:
    """The script's own awk program (scrape_metrics) applied to a scrape."""
    match = re.search(r"awk '(/\^sam_train_step[^']*)'", script_text())
    assert match, "scrape_metrics' awk program not found"
    proc = subprocess.run(["awk", match.group(1)], input=text, capture_output=True, text=True, timeout=10)
    return proc.stdout.strip()


def pod_env(container: dict[str, Any], emulator: str, rank: int, master_port: int) -> dict[str, str]:
    """The container's env from the chart (emulator moved to loopback) plus what the operator injects."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.update({e["name"]: e["value"] for e in container["env"]})
    env.update(STORAGE_EMULATOR_HOST=emulator, PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
               PET_MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), PET_MASTER_PORT=str(master_port),
               WORLD_SIZE="2", RANK=str(rank), PET_NODE_RANK=str(rank), PET_NNODES="2", PET_NPROC_PER_NODE="1")
    return env


def run_snippet(name: str, env: Mapping[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", pod_snippet(name)], capture_output=True, text=True, timeout=300,
                          env=dict(env))
    assert proc.returncode == 0, f"pod_python {name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_script_pod_steps_against_a_local_emulator(gcs_server: GcsServer, tmp_path: Path) -> None:
    """Steps 6, 8 and 9 of the script without a cluster, on loopback (about a minute on 2 cores).

    Two processes stand for the Master and Worker pods: each runs the rendered container's
    command, with its env and the rendered config.toml (the ConfigMap), and the variables
    training-operator injects (LAUNCH.md §1). Each gets its own metrics port, as two pods
    would have their own IPs.
    """
    if shutil.which("sam-train") is None:
        pytest.fail("`sam-train` is not on PATH (pip install -e .): the synth step runs it")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    assert "wrote 4 shards" in run_snippet("synth-shards", env)

    objects = job_render()
    config = tmp_path / "config.toml"
    config.write_text(only(objects, "ConfigMap")["data"]["config.toml"])
    job = only(objects, "PyTorchJob")
    master_port, procs, metrics_ports, logs = free_port(), [], [], []
    for rank, (replica, spec) in enumerate(pod_specs(job)):
        container = spec["containers"][0]
        metrics_ports.append(free_port())
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        command = [str(config) if arg == "/etc/sam-train/config.toml" else arg for arg in container["command"]]
        assert command[0] == "python" and "/etc/sam-train" in mounted
        command = [sys.executable, *command[1:], "--set", f"metrics.port={metrics_ports[-1]}"]
        logs.append(tmp_path / f"{replica}.log")
        procs.append(subprocess.Popen(command, env=pod_env(container, gcs_server.url, rank, master_port),
                                      stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
    steps_seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for port in metrics_ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                        step = scrape_step(resp.read().decode())
                    if step:
                        steps_seen[port] = step
                except OSError:
                    pass  # not serving yet, or already done
            time.sleep(0.5)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    output = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert codes == [0, 0], output
    assert set(steps_seen) == set(metrics_ports) and all(float(v) >= 1 for v in steps_seen.values()), (steps_seen, output)
    assert "training finished at step" in logs[0].read_text()  # the script greps the master's log for it
    assert "(= optim.max_iters) complete and verified" in run_snippet("check-checkpoint", env)
