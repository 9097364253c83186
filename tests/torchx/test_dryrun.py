"""``torchx run --dryrun -s pytorchjob`` (the real CLI): the chart's objects, strictly valid.

Each case gives component arguments and run options, and the chart values a user would give
``helm install`` for the same job, written out by hand here; the printed objects must equal
``build_objects`` of those values (the builder's own tests hold it equal to ``helm template``),
pass the strict CRD and core schemas (``tests/k8s/validate.py``), run the chart's pod command
without TorchX's rendezvous flags, and carry a ``config.toml`` that the trainer loads into
exactly the config the same arguments give a local run.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.torchx import require_torchx

require_torchx()

from tests.k8s.validate import require_crds, validate  # noqa: E402
from tests.torchx.conftest import cli_env  # noqa: E402
from trainer.config import load_config, to_dict  # noqa: E402
from trainer.launch import JobSpec, build_objects, job_object  # noqa: E402
from trainer.presets import PRESETS, Config  # noqa: E402

MARKER = "=== SCHEDULER REQUEST ==="
POD_COMMAND = ["python", "-m", "trainer.dist", "-m", "trainer.train", "--config", "/etc/sam-train/config.toml"]
#: What the component passes torchrun for TorchX's own schedulers, and a PyTorchJob must not get.
TORCHX_ONLY_FLAGS = {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"}
VIT_H_TOML = """\
preset = "vit_h"
[model]
encoder_init = "mae"
mae_checkpoint = "gs://bucket/mae/mae_pretrain_vit_huge.pth"
[optim]
lr = 0.0004
[data]
shards = "gs://bucket/from-the-file/sa_*.tar"
"""


@dataclass
class Case:
    """One job: the component call, and the chart values that describe the same job."""

    component_args: list[str]
    scheduler_args: str
    name: str
    values: dict[str, Any]
    local_config: str  # --config of the equivalent local run
    local_overrides: list[str]  # its --set overrides
    files: dict[str, str] = field(default_factory=dict)  # written to the work dir first


CPU_SETS = ["optim.max_iters=10", "optim.warmup_iters=2", "optim.milestones=4,5", "eval.shards=", "checkpoint.every=0"]

CASES = {
    # Two CPU nodes, everything from the component's own arguments.
    "cpu-2-nodes": Case(
        component_args=["--config", "tiny_cpu", "--nodes", "2", "--nproc_per_node", "0", "--cpu_procs", "2",
                        "--data_shards", "gs://bucket/sa1b/sa_*.tar", "--run_dir", "gs://bucket/runs/tx-cpu",
                        "--set", ",".join(CPU_SETS), "--env", "FOO=1,BAR=two", "--cpu", "2", "--memMB", "4096",
                        "--max_retries", "3", "--image", "registry.example:5000/sam-train:dev", "--shm_size", "1Gi"],
        scheduler_args="namespace=ml,job_name=tx-cpu",
        name="tx-cpu",
        values={
            "image": {"repository": "registry.example:5000/sam-train", "tag": "dev"},
            "nodes": 2, "gpusPerNode": 0, "cpuProcessesPerNode": 2, "shmSize": "1Gi",
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
            "env": [{"name": "FOO", "value": "1"}, {"name": "BAR", "value": "two"}],
            "runPolicy": {"backoffLimit": 3},
            "training": {"preset": "tiny_cpu", "dataShards": "gs://bucket/sa1b/sa_*.tar",
                         "runDir": "gs://bucket/runs/tx-cpu",
                         "config": {"optim": {"max_iters": 10, "warmup_iters": 2, "milestones": [4, 5]},
                                    "eval": {"shards": []}, "checkpoint": {"every": 0}}},
        },
        local_config="tiny_cpu",
        # metrics.port: the chart's monitoring.port (9400) turns the exporter on in pods; locally it is off
        local_overrides=["data.shards=gs://bucket/sa1b/sa_*.tar", "train.run_dir=gs://bucket/runs/tx-cpu", *CPU_SETS,
                         "metrics.port=9400"],
    ),
    # ViT-H on 4 A100 nodes from a config file, with gang scheduling, queues, an existing account;
    # the run options override the component's node pool and add the queue and priority class.
    "vit-h-gang": Case(
        component_args=["--config", "vit_h.toml", "--nodes", "4", "--run_dir", "gs://bucket/runs/vit-h",
                        "--checkpoint_url", "gs://bucket/ckpt/vit-h", "--node_pool", "eks-p4d", "--gang", "volcano",
                        "--kueue_queue", "team-a", "--service_account", "trainer-sa", "--shm_size", "32Gi",
                        "--max_restarts", "2", "--set", "metrics.port=9500,train.log_every=50"],
        scheduler_args="namespace=research,job_name=vit-h,node_pool=gke-a2-ultragpu,queue=big,priority_class=high",
        name="vit-h",
        values={
            "nodes": 4, "gpusPerNode": 8, "shmSize": "32Gi",
            "resources": {"requests": {"cpu": "8", "memory": "128Gi"}, "limits": {"memory": "128Gi"}},
            "nodePool": {"preset": "gke-a2-ultragpu", "priorityClassName": "high"},
            "scheduling": {"gang": "volcano", "queue": "big", "kueueQueue": "team-a"},
            "serviceAccount": {"create": False, "name": "trainer-sa"},
            "monitoring": {"port": 9500},
            "training": {"preset": "vit_h", "dataShards": "gs://bucket/from-the-file/sa_*.tar",
                         "runDir": "gs://bucket/runs/vit-h", "checkpointUrl": "gs://bucket/ckpt/vit-h",
                         "maxRestarts": 2,
                         "config": {"model": {"encoder_init": "mae",
                                              "mae_checkpoint": "gs://bucket/mae/mae_pretrain_vit_huge.pth"},
                                    "optim": {"lr": 0.0004}, "train": {"log_every": 50}}},
        },
        local_config="vit_h.toml",
        local_overrides=["train.run_dir=gs://bucket/runs/vit-h", "checkpoint.url=gs://bucket/ckpt/vit-h",
                         "metrics.port=9500", "train.log_every=50"],
        files={"vit_h.toml": VIT_H_TOML},
    ),
}


def dryrun(torchx_cli: str, case: Case, work: Path) -> list[dict]:
    """Run the CLI's dry run and parse the objects it prints."""
    for name, text in case.files.items():
        (work / name).write_text(text)
    cmd = [torchx_cli, "run", "--dryrun", "-s", "pytorchjob", "--scheduler_args", case.scheduler_args,
           "sam_train", *case.component_args]
    proc = subprocess.run(cmd, cwd=work, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert MARKER in proc.stdout, proc.stdout[-3000:]
    return [doc for doc in yaml.safe_load_all(proc.stdout.split(MARKER, 1)[1]) if doc is not None]


@pytest.fixture(scope="module", params=sorted(CASES))
def printed(request: pytest.FixtureRequest, torchx_cli: str,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, list[dict], Path]:
    case = CASES[request.param]
    work = tmp_path_factory.mktemp(request.param)
    return case, dryrun(torchx_cli, case, work), work


def test_dryrun_equals_the_builder_for_the_same_values(printed: tuple[Case, list[dict], Path]) -> None:
    case, objects, _ = printed
    namespace = case.scheduler_args.split("namespace=")[1].split(",")[0]
    expected = build_objects(JobSpec.from_values(case.values, case.name, namespace))
    assert [o["kind"] for o in objects] == [o["kind"] for o in expected]
    for got, want in zip(objects, expected):
        assert got == want, f"{got['kind']} differs"


def test_dryrun_objects_pass_the_strict_schemas(printed: tuple[Case, list[dict], Path]) -> None:
    require_crds()  # skips, saying why, where ../shared/crds is absent (a user's fresh clone)
    _, objects, _ = printed
    assert job_object(objects)["kind"] == "PyTorchJob"
    for obj in objects:
        validate(obj)


def test_pod_command_is_the_charts_without_rendezvous_flags(printed: tuple[Case, list[dict], Path]) -> None:
    """The operator's PET_* variables place the pods: none of the role's torchrun flags may leak in."""
    case, objects, _ = printed
    job = job_object(objects)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == ({"Master", "Worker"} if case.values["nodes"] > 1 else {"Master"})
    for replica in replicas.values():
        container = replica["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        command = container["command"]
        assert command[:3] == POD_COMMAND[:3] and command[-4:] == POD_COMMAND[-4:], command
        leaked = [arg for arg in command if arg.split("=")[0] in TORCHX_ONLY_FLAGS or "${" in arg]
        assert leaked == [], command
        restarts = case.values.get("training", {}).get("maxRestarts")
        if restarts:
            position = command.index("--max-restarts")
            assert command[position + 1] == str(restarts)
        else:
            assert "--max-restarts" not in command


def test_config_map_loads_as_the_local_run_config(printed: tuple[Case, list[dict], Path]) -> None:
    """The trainer in the pod reads the same config as `sam_train` on local_cwd with these arguments."""
    case, objects, work = printed
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    mounted = work / "mounted-config.toml"
    mounted.write_text(config_map["data"]["config.toml"])
    in_pod = load_config(Config, str(mounted), [], PRESETS)
    local = load_config(Config, str(work / case.local_config) if case.files else case.local_config,
                        case.local_overrides, PRESETS)
    assert to_dict(in_pod) == to_dict(local)
