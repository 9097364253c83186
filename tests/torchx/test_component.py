"""The sam_train component's AppDef and its conversion to a JobSpec (in process, no cluster)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.torchx import require_torchx

require_torchx()

from torchx.components.utils import echo  # noqa: E402
from torchx.specs import macros  # noqa: E402

from trainer.config import ConfigError  # noqa: E402
from trainer.launch import JobSpec, SpecError, job_object  # noqa: E402
from trainer.launch.torchx_component import METADATA_KEY, join_overrides, mib_quantity, sam_train  # noqa: E402
from trainer.launch.torchx_scheduler import (  # noqa: E402
    PyTorchJobScheduler, appdef_to_spec, cpu_quantity, split_image)

SHARDS = "gs://bucket/sa1b/sa_*.tar"


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("pieces, joined", [
    (["optim.milestones=50", "60", "train.log_every=1"], ["optim.milestones=50,60", "train.log_every=1"]),
    (["data.shards=a.tar", "b.tar", "c.tar"], ["data.shards=a.tar,b.tar,c.tar"]),
    (["eval.shards=", "model.variant=tiny"], ["eval.shards=", "model.variant=tiny"]),
    (None, []),
])
def test_join_overrides_undoes_torchx_comma_split(pieces: list[str] | None, joined: list[str]) -> None:
    assert join_overrides(pieces) == joined


def test_join_overrides_rejects_a_first_piece_without_key() -> None:
    with pytest.raises(ValueError, match="expected section.key=value"):
        join_overrides(["1000"])


@pytest.mark.parametrize("image, values", [
    ("ghcr.io/sam-k8s/sam-train:0.2.0", {"repository": "ghcr.io/sam-k8s/sam-train", "tag": "0.2.0"}),
    ("registry.local:5000/sam-train", {"repository": "registry.local:5000/sam-train", "tag": ""}),
    ("registry.local:5000/sam-train:dev", {"repository": "registry.local:5000/sam-train", "tag": "dev"}),
    ("r/sam@sha256:abc", {"repository": "r/sam", "tag": "sha256:abc"}),
])
def test_split_image(image: str, values: dict[str, str]) -> None:
    assert split_image(image) == values


def test_quantities() -> None:
    assert (mib_quantity(131072), mib_quantity(1536)) == ("128Gi", "1536Mi")
    assert (cpu_quantity(8), cpu_quantity(1.5)) == ("8", "1500m")


# --------------------------------------------------------------------------- the AppDef


def test_single_node_role_runs_the_pod_command_with_local_rendezvous() -> None:
    app = sam_train(config="tiny_cpu", nproc_per_node=0, cpu_procs=2, data_shards=SHARDS,
                    set=["optim.max_iters=5"], env={"A": "1"})
    (role,) = app.roles
    assert (role.name, role.entrypoint, role.num_replicas) == ("trainer", "python", 1)
    assert role.args == ["-m", "trainer.dist", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "localhost:0", "--rdzv-id", macros.app_id, "-m", "trainer.train",
                         "--config", "tiny_cpu", "--set", f"data.shards={SHARDS}", "--set", "optim.max_iters=5"]
    assert (role.resource.gpu, role.resource.cpu, role.resource.memMB) == (0, 8, 131072)
    assert role.env == {"A": "1"}


def test_multi_node_role_meets_at_rank0_host_through_the_macro() -> None:
    app = sam_train(config="tiny_cpu", nodes=3, nproc_per_node=8, rdzv_port=29555, max_restarts=2)
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    script = macros.Values(img_root="", app_id="app-1", replica_id="0", rank0_env="RANK0_HOST").substitute(role.args[1])
    assert script.startswith("python -m trainer.dist --max-restarts 2 --nnodes 3 --nproc-per-node 8 ")
    assert '--rdzv-endpoint "${RANK0_HOST:=localhost}:29555"' in script
    assert "--rdzv-id 'app-1'" in script
    assert role.resource.gpu == 8 and role.port_map == {"c10d": 29555}


def test_metadata_keeps_the_job_builder_inputs() -> None:
    app = sam_train(config="vit_b", data_shards=SHARDS, run_dir="gs://b/r", node_pool="eks-p4d", gang="volcano",
                    queue="q", kueue_queue="lq", service_account="sa", shm_size="8Gi", cpu_procs=3,
                    set=["train.log_every=5"])
    job = json.loads(app.metadata[METADATA_KEY])
    assert job["config"] == "vit_b"
    assert job["set"] == [f"data.shards={SHARDS}", "train.run_dir=gs://b/r", "train.log_every=5"]
    assert job["values"] == {
        "cpuProcessesPerNode": 3, "shmSize": "8Gi", "nodePool": {"preset": "eks-p4d"},
        "scheduling": {"gang": "volcano", "queue": "q", "kueueQueue": "lq"}, "training": {"maxRestarts": 0},
        "serviceAccount": {"create": False, "name": "sa"}}


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes must be at least 1"),
    ({"nproc_per_node": -1}, "--nproc_per_node must be 0"),
    ({"cpu_procs": 0}, "--cpu_procs must be at least 1"),
    ({"config": ""}, "--config must name"),
])
def test_component_rejects_impossible_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        sam_train(**kwargs)


def test_component_defaults_are_the_charts() -> None:
    """A plain `sam_train` asks for the job values.yaml describes (no silent drift from the chart)."""
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(sam_train).parameters.items()}
    chart = JobSpec(name="x")
    assert defaults["config"] == chart.training.preset
    assert defaults["nproc_per_node"] == chart.gpus_per_node
    assert defaults["cpu_procs"] == chart.cpu_processes_per_node
    assert defaults["image"] == chart.image.repository
    assert defaults["shm_size"] == chart.shm_size
    assert defaults["node_pool"] == chart.node_pool.preset
    assert defaults["gang"] == chart.scheduling.gang
    assert defaults["max_retries"] == chart.run_policy.backoff_limit
    assert defaults["max_restarts"] == chart.training.max_restarts
    assert str(defaults["cpu"]) == chart.resources.requests["cpu"]
    assert mib_quantity(defaults["memMB"]) == chart.resources.limits["memory"]


# --------------------------------------------------------------------------- AppDef -> JobSpec


def test_overrides_become_typed_config_tables_and_dedicated_values() -> None:
    app = sam_train(config="tiny_cpu", nproc_per_node=0, data_shards="a.tar", run_dir="r",
                    set=["optim.max_iters=200", "optim.milestones=100,150", "metrics.port=9600", "data.shards=b.tar",
                         "prompts.prob_box=0.25", "train.compile=true"])
    spec = appdef_to_spec(app, {"job_name": "t"})
    assert spec.training.data_shards == "b.tar"  # the later --set of the key wins, as in a local run
    assert spec.training.run_dir == "r"
    assert spec.monitoring.port == 9600
    assert spec.training.config == {"optim": {"max_iters": 200, "milestones": [100, 150]},
                                    "prompts": {"prob_box": 0.25}, "train": {"compile": True}}
    assert spec.training.extra_args == []  # the pod command stays the chart's plain one


def test_trainer_refuses_a_bad_override_before_anything_is_built() -> None:
    app = sam_train(config="tiny_cpu", data_shards="a.tar", set=["optim.lr=-1"])
    with pytest.raises(ConfigError, match="optim.lr"):
        appdef_to_spec(app, {})
    with pytest.raises(ConfigError, match="optim.no_such_key"):
        appdef_to_spec(sam_train(config="tiny_cpu", data_shards="a.tar", set=["optim.no_such_key=1"]), {})


def test_missing_required_trainer_keys_fail_the_dry_run() -> None:
    with pytest.raises(ConfigError, match="data.shards"):
        appdef_to_spec(sam_train(config="tiny_cpu"), {})
    with pytest.raises(ConfigError, match="encoder_init"):
        appdef_to_spec(sam_train(config="vit_h", data_shards="a.tar"), {})


def test_a_config_file_must_name_its_preset(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[data]\nshards = "a.tar"\n')
    with pytest.raises(ValueError, match="names no preset"):
        appdef_to_spec(sam_train(config=str(path)), {})


def test_chart_rules_apply(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="nodePool.preset"):
        appdef_to_spec(sam_train(config="tiny_cpu", data_shards="a.tar", node_pool="no-such-pool"), {})


def test_role_edits_reach_the_job() -> None:
    """The scheduler reads the role's fields, so a caller adjusting the AppDef is obeyed."""
    app = sam_train(config="tiny_cpu", nproc_per_node=0, data_shards="a.tar")
    role = app.roles[0]
    role.num_replicas, role.image, role.max_retries = 5, "other/image:7", 1
    role.env.update({"X": "y", "TORCHX_JOB_ID": "pytorchjob://s/${app_id}"})  # the runner adds TORCHX_*
    spec = appdef_to_spec(app, {"job_name": "t"})
    assert (spec.nodes, spec.image.repository, spec.image.tag, spec.run_policy.backoff_limit) == (5, "other/image",
                                                                                                   "7", 1)
    assert spec.env == [{"name": "X", "value": "y"}]


def test_default_job_names_are_unique_and_dns_safe() -> None:
    scheduler = PyTorchJobScheduler("s")
    app = sam_train(config="tiny_cpu", nproc_per_node=0, data_shards="a.tar", run_dir="r", name="My_Run")
    names = {scheduler.submit_dryrun(app, {"namespace": "ml"}).request.name for _ in range(3)}
    assert len(names) == 3
    assert all(re.fullmatch(r"my-run-[0-9a-f]{6}-sam-train", n) for n in names), names


@pytest.mark.parametrize("name", ["a-very-long-experiment-name-for-the-vit-h-ablation", "sam-train-" + "x" * 60])
def test_long_app_names_keep_the_random_suffix(name: str) -> None:
    app = sam_train(config="tiny_cpu", nproc_per_node=0, data_shards="a.tar", run_dir="r", name=name)
    full = PyTorchJobScheduler("s").submit_dryrun(app, {"namespace": "ml"}).request.name
    assert len(full) <= 40 and re.search(r"-[0-9a-f]{6}(-sam-train)?$", full), full


def test_dryrun_request_is_namespaced_and_prints_yaml() -> None:
    import yaml

    scheduler = PyTorchJobScheduler("s")
    app = sam_train(config="tiny_cpu", nproc_per_node=0, data_shards="a.tar", run_dir="r")
    info = scheduler.submit_dryrun(app, {"namespace": "ml", "job_name": "sam-train-x"})
    assert info.request.app_id == "ml:sam-train-x"
    assert job_object(list(yaml.safe_load_all(str(info))))["metadata"] == job_object(info.request.objects)["metadata"]


def test_apps_of_other_components_are_refused() -> None:
    scheduler = PyTorchJobScheduler("s")
    with pytest.raises(ValueError, match="sam_train component"):
        scheduler._validate(echo(), "pytorchjob")
    app = sam_train(config="tiny_cpu", data_shards="a.tar", run_dir="r")
    app.roles.append(echo().roles[0])
    with pytest.raises(ValueError, match="one role"):
        scheduler._validate(app, "pytorchjob")
