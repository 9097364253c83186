"""The trainer image: built offline from the repo's Dockerfile, run as a 2-node PyTorchJob.

Facts of the image (user, labels, default command, contents), then two containers with a
PyTorchJob's environment training against a GCS emulator: a clean run, a node drain
(SIGTERM: checkpoint, exit 143, resume), and a node lost without warning (SIGKILL: the
survivor exits with a retried code). Helpers: docker_env.py (build), jobs.py (the job).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from trainer.dist import ExitCode

from .docker_env import REPO_ROOT, buildkit_client, container_run, docker, timed, unavailable
from .jobs import TwoNodeJob, json_records, non_json_lines

pytestmark = pytest.mark.slow

#: The Helm chart's pod command (charts/sam-train/templates/_pod.tpl, without --max-restarts).
POD_COMMAND = ["python", "-m", "trainer.dist", "-m", "trainer.train", "--config", "/etc/sam-train/config.toml"]
OCI_LABELS = ("title", "description", "source", "licenses", "version", "revision")


def inspect(image: str) -> dict:
    return json.loads(docker("image", "inspect", image).stdout)[0]


def test_image_config_user_labels_and_default_command(image: str) -> None:
    config = inspect(image)["Config"]
    assert config["User"] in ("1000:1000", "1000"), config["User"]  # numeric: runAsNonRoot can check it
    labels = config.get("Labels") or {}
    for name in OCI_LABELS:
        assert labels.get(f"org.opencontainers.image.{name}"), (name, labels)
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert config["Cmd"] == POD_COMMAND
    assert not config.get("Entrypoint"), config.get("Entrypoint")  # the chart's `command:` replaces Cmd only
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1" and env["SAM_LOG_FORMAT"] == "json"
    assert env["HOME"] == "/home/sam" and env["MPLCONFIGDIR"].startswith("/home/sam/")
    assert config["WorkingDir"].startswith("/home/sam")
    secretish = [k for k in env if re.search(r"TOKEN|SECRET|PASSWORD|KEY|CREDENTIAL", k)]
    assert not secretish, secretish


#: Runs inside the container (no network) and prints what it found as one JSON object.
PROBE = r"""
import json, os, shutil, subprocess, sys
facts = {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "home": os.environ["HOME"]}
cli = subprocess.run(["sam-train", "--help"], capture_output=True, text=True, timeout=60)
facts["help_rc"], facts["help"] = cli.returncode, cli.stdout
import gcsfs, s3fs, torch, trainer
facts["trainer"] = trainer.__file__
facts["torch"], facts["torch_cuda"] = torch.__version__, torch.version.cuda
for name in ("HOME", "MPLCONFIGDIR"):
    probe = os.path.join(os.environ[name], ".write-probe")
    try:
        open(probe, "w").close(); os.remove(probe); facts[name + "_writable"] = True
    except OSError as err:
        facts[name + "_writable"] = str(err)
facts["compilers"] = [c for c in ("gcc", "cc", "g++", "clang") if shutil.which(c)]
found = []
for root, dirs, files in os.walk("/"):
    if root in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    for d in dirs:
        path = os.path.join(root, d)
        if d == ".git" or path in ("/src", "/wheelhouse", "/dist") or path.endswith("/.cache/pip"):
            found.append(path)
    for f in files:
        path = os.path.join(root, f)
        if f.startswith(("torch-", "sam_k8s_trainer-")) and f.endswith(".whl"):  # the wheelhouse
            found.append(path)
        elif f in ("test_image.py", "docker_env.py", "conftest.py", "Dockerfile") and "site-packages" not in root:
            found.append(path)
        elif f == "pyproject.toml" and "sam-k8s-trainer" in open(path, errors="replace").read():
            found.append(path)
        elif f == "engine.py" and root.endswith("/trainer") and "site-packages" not in root:
            found.append(path)
facts["forbidden"] = found
facts["workdir_entries"] = os.listdir(os.getcwd())
print(json.dumps(facts))
"""


def test_inside_the_image_non_root_cli_imports_and_nothing_extra(image: str) -> None:
    proc = container_run(image, "python", "-c", PROBE, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (facts["uid"], facts["gid"]) == (1000, 1000)
    assert facts["help_rc"] == 0 and "train" in facts["help"] and "synth" in facts["help"], facts["help"]
    assert "/site-packages/trainer/" in facts["trainer"], facts["trainer"]  # the installed wheel, no source tree
    assert facts["torch"].startswith("2.13.0") and facts["torch"].endswith("+cpu"), facts["torch"]
    assert facts["torch_cuda"] is None
    assert facts["HOME_writable"] is True and facts["MPLCONFIGDIR_writable"] is True, facts
    assert facts["compilers"] == [], facts["compilers"]
    assert facts["forbidden"] == [], facts["forbidden"]
    assert facts["workdir_entries"] == [], facts["workdir_entries"]


@pytest.mark.parametrize("builder", ["legacy", "buildkit"])
@pytest.mark.parametrize("wheelhouse", ["absent", "empty"])
def test_dockerfile_builds_without_a_wheelhouse(base_image: str, tmp_path: Path, builder: str,
                                                wheelhouse: str) -> None:
    """The optional ``.whl*`` COPY accepts a missing or empty wheelhouse with both builders
    (the online build's path; built up to the stage that copies it, from a clean context)."""
    client = shutil.which("docker") if builder == "legacy" else buildkit_client()
    if client is None:
        unavailable("no docker CLI here builds with BuildKit (Debian's docker.io 20.10 does; "
                    "a newer CLI needs the buildx plugin)")
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, context / name)
    shutil.copytree(REPO_ROOT / "trainer", context / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    if wheelhouse == "empty":
        (context / ".whl").mkdir()
    tag = f"sam-train-ctx-test:{wheelhouse}-{builder}"
    env = dict(os.environ, DOCKER_BUILDKIT="0" if builder == "legacy" else "1")
    try:
        proc = subprocess.run([client, "build", "--network", "none", "--target", "pip", "--build-arg",
                               f"BASE_IMAGE={base_image}", "-t", tag, str(context)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        listing = container_run(tag, "ls", "-A", "/wheelhouse")
        assert listing.returncode == 0 and listing.stdout.split() == ["README.md"], listing
    finally:
        docker("rmi", "-f", tag, check=False)


def complete_steps(run_dir: str) -> list[int]:
    """Steps with a ``COMPLETE`` marker under ``<run_dir>/checkpoints`` in the bucket."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    path = run_dir.removeprefix("gs://")
    markers = fs.glob(f"{path}/checkpoints/step-*/COMPLETE")
    return sorted(int(m.split("/")[-2].split("-")[1]) for m in markers)


def wait_past_first_checkpoint(job: TwoNodeJob, run_dir: str, timeout: float = 180) -> int:
    """Poll the bucket and the Master's log until a checkpoint is complete and training has
    moved on by a step (so a signal now cannot land in the step that saved it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for container in (job.master, job.worker):
            assert container.running(), f"{container.name} exited early{job.describe()}"
        steps = complete_steps(run_dir)
        if steps and job.progress_step() > steps[-1]:
            return steps[-1]
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint and progress past it within {timeout:.0f} s{job.describe()}")


def test_two_nodes_train_to_a_complete_checkpoint_with_json_logs(job: TwoNodeJob) -> None:
    run_dir = job.run_dir("clean")
    with timed("2-node run (6 steps)"):
        job.start(run_dir, max_iters=6, every=3)
        codes = job.wait(timeout=240)
    assert codes == (0, 0), f"exit codes {codes}{job.describe()}"
    assert complete_steps(run_dir) == [3, 6], job.describe()
    master, worker = job.logs()
    for name, text in (("master", master), ("worker", worker)):
        assert non_json_lines(text) == [], f"{name} logged non-JSON lines{job.describe()}"
    records = json_records(master)
    assert all(r["rank"] == 0 and {"ts", "level", "msg"} <= r.keys() for r in records)
    assert any(r["msg"].startswith("global batch 2 images = 1 per rank x 2 ranks") for r in records), job.describe()
    assert any(r["msg"].startswith("training finished at step 6") for r in records), job.describe()
    assert [r["step"] for r in records if r.get("logger") == "trainer.metrics" and "loss/total" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["rank"] == 1 for r in json_records(worker))


def test_drain_sigterm_checkpoints_exits_143_then_both_resume(job: TwoNodeJob) -> None:
    run_dir = job.run_dir("drain")
    with timed("2-node drain run (until SIGTERM)"):
        job.start(run_dir, max_iters=400, every=5)
        seen = wait_past_first_checkpoint(job, run_dir)
        job.worker.kill("TERM")  # what the kubelet sends when the Worker's node is drained
        codes = job.wait(timeout=120)
    assert codes == (ExitCode.PREEMPTED, ExitCode.PREEMPTED), f"exit codes {codes}{job.describe()}"
    steps = complete_steps(run_dir)
    assert steps and steps[-1] > seen, f"no checkpoint newer than step {seen}: {steps}{job.describe()}"
    stopped = steps[-1]
    master, worker = job.logs()
    assert f"checkpoint at step {stopped} written; exiting 143" in master, job.describe()
    assert "SIGTERM received" in worker, job.describe()
    for name, text in (("master", master), ("worker", worker)):
        assert non_json_lines(text) == [], f"{name} logged non-JSON lines{job.describe()}"

    with timed("2-node resume run"):
        job.start(run_dir, max_iters=stopped + 2, every=5)
        codes = job.wait(timeout=240)
    assert codes == (0, 0), f"exit codes after restart {codes}{job.describe()}"
    messages = [r["msg"] for r in json_records(job.master.logs())]
    resumed = f"resumed from {run_dir}/checkpoints/step-{stopped:08d} (step {stopped})"
    assert resumed in messages, job.describe()
    assert any(m.startswith(f"training finished at step {stopped + 2}") for m in messages), job.describe()
    assert complete_steps(run_dir)[-1] == stopped + 2


@pytest.mark.parametrize("victim", ["worker", "master"])
def test_sigkill_of_one_node_ends_the_other_with_a_retried_code(job: TwoNodeJob, victim: str) -> None:
    """A node lost without warning (``docker kill``: SIGKILL): the survivor's next collective
    fails and it must exit with a code that restartPolicy ExitCode retries (128-255), not 1."""
    run_dir = job.run_dir(f"kill-{victim}")
    with timed(f"2-node run, SIGKILL of the {victim}"):
        job.start(run_dir, max_iters=400, every=5)
        wait_past_first_checkpoint(job, run_dir)
        killed, survivor = (job.worker, job.master) if victim == "worker" else (job.master, job.worker)
        start = time.monotonic()
        killed.kill("KILL")
        code = survivor.wait(timeout=120)
        elapsed = time.monotonic() - start
    print(f"[image tests] SIGKILL of the {victim}: the {survivor.name.split('-')[-2]} exited {code} "
          f"after {elapsed:.1f} s", flush=True)
    assert killed.wait(timeout=30) == 128 + 9
    assert code == ExitCode.PEER_LOST and 128 <= code <= 255, f"survivor exit {code}{job.describe()}"
    assert elapsed < 60, f"the survivor took {elapsed:.0f} s to notice{job.describe()}"
    survivor_log = survivor.logs()
    assert "a collective failed: another rank died or stopped answering" in survivor_log, job.describe()
    assert non_json_lines(survivor_log) == [], job.describe()
