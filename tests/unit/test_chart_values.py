"""The chart's values reach the pods as documented, and bad values fail at render time.

- config.toml: loaded by the trainer's own loader (``trainer.config.load_config``), exactly as
  ``python -m trainer.train --config`` in the pod would load it, with the container's ``--set``s;
- restart policy and exit codes agree with ``trainer.dist.ExitCode`` and the README's table;
- ServiceAccount identity annotations, Kueue label, node pool presets (labels from
  /work/shared/LAUNCH.md §6), TrainJob vs PyTorchJob pod settings, NOTES.txt;
- bad values: Helm's message names the offending value.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from tests.k8s import render as r
from tests.k8s.render import RenderError, deep_merge, job_of, notes, pod_view, render
from tests.k8s.validate import CrdsNotPresent, ValidationError, validate
from trainer.dist import ExitCode

RELEASE, NAMESPACE = "rel", "ml"
FULLNAME = "rel-sam-train"
SHARDS, RUN_DIR = "gs://bucket/sa1b/sa_*.tar", "gs://bucket/runs/test"
BASE: dict = {"training": {"dataShards": SHARDS, "runDir": RUN_DIR}}
MAE_CKPT = "gs://bucket/mae_pretrain_vit_huge.pth"
MAE = {"training": {"config": {"model": {"mae_checkpoint": MAE_CKPT}}}}
README = r.REPO_ROOT / "README.md"


def preset_values(preset: str, *more: Mapping[str, Any]) -> dict:
    return deep_merge(r.load_preset(preset), BASE, MAE if preset.startswith("vit") else {}, *more)


def command_of(objects: list[dict]) -> list[str]:
    return pod_view(job_of(objects))["command"]


def config_text(objects: list[dict]) -> str:
    """``config.toml`` of the job's ConfigMap ``<fullname>-config``."""
    configmap = [o for o in r.of_kind(objects, "ConfigMap") if o["metadata"]["name"] == f"{FULLNAME}-config"]
    assert len(configmap) == 1, [o["metadata"]["name"] for o in r.of_kind(objects, "ConfigMap")]
    return configmap[0]["data"]["config.toml"]


def rendered_config(objects: list[dict], tmp_path: Path) -> Any:
    """The job's config as the trainer in the pod resolves it (file + the command's --set)."""
    from trainer.config import load_config
    from trainer.presets import PRESETS, Config

    path = tmp_path / "config.toml"
    path.write_text(config_text(objects))
    command = command_of(objects)
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    return load_config(Config, str(path), overrides, PRESETS)


def _as_config_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------- config.toml


@pytest.mark.parametrize("preset", r.preset_names())
def test_preset_config_loads_with_the_trainers_loader(preset: str, tmp_path: Path) -> None:
    values = preset_values(preset)
    cfg = rendered_config(render(values, name=RELEASE, namespace=NAMESPACE), tmp_path)
    ev = r.effective_values(values)
    assert cfg.data.shards == SHARDS and cfg.train.run_dir == RUN_DIR
    assert cfg.metrics.port == ev["monitoring"]["port"]
    variant = "tiny" if preset == "tiny-cpu" else preset[:5].replace("-", "_")
    assert cfg.model.variant == variant
    # Every setting of the preset file arrives with its value and its type (no 90000.0).
    for section, keys in ev["training"]["config"].items():
        for key, value in keys.items():
            got, want = getattr(getattr(cfg, section), key), _as_config_value(value)
            # An int for a float field is fine (TOML 5 for 5.0); a float for an int field is not.
            same_type = type(got) is type(want) or (type(got) is float and type(want) is int)
            assert got == want and same_type, (f"{section}.{key}", got, value)


def test_int_and_float_settings_keep_their_types(tmp_path: Path) -> None:
    values = preset_values("vit-h-a100", {"training": {"config": {
        "optim": {"max_iters": 90000, "lr": 8e-05}, "eval": {"shards": ["gs://bucket/val/sa_000999.tar"]},
        "train": {"amp": "off"}}}})
    objects = render(values)
    raw = tomllib.loads(config_text(objects))
    assert raw["preset"] == "vit_h"
    assert raw["optim"]["max_iters"] == 90000 and type(raw["optim"]["max_iters"]) is int
    assert raw["optim"]["lr"] == 8e-05 and type(raw["optim"]["lr"]) is float
    assert raw["train"]["amp"] == "off"
    cfg = rendered_config(objects, tmp_path)
    assert cfg.optim.max_iters == 90000 and isinstance(cfg.optim.max_iters, int)
    assert cfg.optim.lr == 8e-05
    assert cfg.eval.shards == ("gs://bucket/val/sa_000999.tar",)
    assert cfg.model.encoder_init == "mae" and cfg.model.mae_checkpoint == MAE_CKPT


def test_config_toml_writer_round_trips_awkward_values() -> None:
    # Raw TOML only (tomllib): the writer's own contract, on keys the trainer has (the schema
    # refuses others) whose values are awkward to write.
    config = {
        "eval": {"shards": ['gs://b/a b "q".tar', "caf\u00e9", "<tag>&", "line1\nline2\t\\ end"]},
        "optim": {"eps": 1.5e-10, "lr": 3.0, "decay_gamma": 2.5, "warmup_iters": 0, "milestones": []},
        "train": {"seed": 123456789012, "amp": "off", "compile": True, "deterministic": False},
        "model": {"pe_seed": -3, "init_checkpoint": ""},
    }
    raw = tomllib.loads(config_text(render(deep_merge(BASE, {"training": {"config": config}}))))
    want = deep_merge(config, {"optim": {"lr": 3}})  # a whole float is written as an int (documented)
    for section, keys in want.items():
        for key, value in keys.items():
            assert raw[section][key] == value, (section, key, raw[section].get(key))
    assert type(raw["train"]["seed"]) is int and type(raw["optim"]["decay_gamma"]) is float
    assert raw["data"]["shards"] == SHARDS and raw["train"]["run_dir"] == RUN_DIR


def test_chart_owned_keys_reach_the_config(tmp_path: Path) -> None:
    values = deep_merge(BASE, {"training": {"preset": "tiny_cpu", "checkpointUrl": "gs://bucket/ckpt/x",
                                            "extraArgs": ["optim.max_iters=290", "train.log_every=5"]},
                               "gpusPerNode": 0, "monitoring": {"port": 9500}})
    objects = render(values)
    cfg = rendered_config(objects, tmp_path)
    assert cfg.checkpoint.url == "gs://bucket/ckpt/x"
    assert cfg.metrics.port == 9500
    assert cfg.optim.max_iters == 290  # --set wins over the file
    assert command_of(objects)[-4:] == ["--set", "optim.max_iters=290", "--set", "train.log_every=5"]
    assert cfg.train.log_every == 5


def test_config_checksum_annotation_follows_the_config() -> None:
    def checksum(values: dict) -> str:
        return pod_view(job_of(render(values)))["annotations"]["checksum/config"]

    assert checksum(BASE) == checksum(deep_merge(BASE, {"nodes": 2}))
    assert checksum(BASE) != checksum(deep_merge(BASE, {"training": {"config": {"optim": {"lr": 1e-4}}}}))


@pytest.mark.parametrize("section, key, owner", [
    ("data", "shards", "training.dataShards"), ("train", "run_dir", "training.runDir"),
    ("metrics", "port", "monitoring.port"), ("checkpoint", "url", "training.checkpointUrl"),
])
def test_training_config_may_not_set_a_chart_owned_key(section: str, key: str, owner: str) -> None:
    values = deep_merge(BASE, {"training": {"config": {section: {key: "x"}}}})
    with pytest.raises(RenderError) as info:
        render(values)
    assert f"training.config.{section}.{key}" in str(info.value) and owner in str(info.value)


def test_command_runs_the_wrapper_with_max_restarts() -> None:
    command = command_of(render(deep_merge(BASE, {"training": {"maxRestarts": 2}})))
    assert command == ["python", "-m", "trainer.dist", "--rdzv-conf=join_timeout=1800,timeout=1800",
                       "--max-restarts", "2", "-m", "trainer.train", "--config", "/etc/sam-train/config.toml"]


# --------------------------------------------------------------------------- exit codes


def readme_policies() -> dict[int, str]:
    """The README's exit-code table: numeric code -> ``permanent`` / ``retried`` (PyTorchJob column)."""
    lines = README.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| exit code |"))
    out: dict[int, str] = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break  # end of the table
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].isdigit():
            out[int(cells[0])] = cells[2].split(",")[0].strip()
    return out


def failure_codes(policy: str) -> set[int]:
    """The trainer's failure codes (``trainer.dist.ExitCode``) that the README gives ``policy``."""
    policies = readme_policies()
    return {int(c) for c in ExitCode if c != ExitCode.OK and policies.get(int(c)) == policy}


def test_exit_codes_agree_with_the_restart_policy_semantics() -> None:
    # PyTorchJob restartPolicy ExitCode: 1-127 fail the job for good, 128-255 restart the pod.
    policies = readme_policies()
    for code in ExitCode:
        if code == ExitCode.OK:
            continue
        assert int(code) in policies, f"README's exit-code table has no row for {code.name} ({int(code)})"
        want = "permanent" if 1 <= code <= 127 else "retried" if 128 <= code <= 255 else "impossible"
        assert policies[int(code)] == want, (code.name, int(code), policies[int(code)])
    assert failure_codes("permanent") and int(ExitCode.PREEMPTED) in failure_codes("retried")


def test_restart_policy_is_exit_code_by_default() -> None:
    job = job_of(render(deep_merge(BASE, {"nodes": 3})))
    assert {s["restartPolicy"] for s in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}


def test_trainjob_runtime_fails_only_permanent_codes() -> None:
    objects = render(deep_merge(BASE, {"jobKind": "trainjob", "nodes": 2, "trainJob": {"createRuntime": True}}))
    runtime = r.one(objects, "TrainingRuntime")
    rjob = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"][0]
    rules = rjob["template"]["spec"]["podFailurePolicy"]["rules"]
    fail_codes = {c for rule in rules if rule["action"] == "FailJob" for c in rule["onExitCodes"]["values"]}
    assert failure_codes("permanent") <= fail_codes
    assert not failure_codes("retried") & fail_codes and all(c < 128 for c in fail_codes)
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] > 0  # 143 is retried


# --------------------------------------------------------------------------- identity, queueing, pools


def test_service_account_annotations_and_pods() -> None:
    values = deep_merge(BASE, {"serviceAccount": {"gcpServiceAccount": "train@proj.iam.gserviceaccount.com",
                                                  "awsRoleArn": "arn:aws:iam::123456789012:role/sam",
                                                  "annotations": {"team": "vision"}}})
    objects = render(values)
    account = r.one(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "train@proj.iam.gserviceaccount.com",
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/sam", "team": "vision"}
    assert pod_view(job_of(objects))["serviceAccountName"] == account["metadata"]["name"] == FULLNAME


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
def test_existing_service_account_is_used_not_created(job_kind: str) -> None:
    objects = render(deep_merge(BASE, {"jobKind": job_kind, "serviceAccount": {"create": False, "name": "ci"}}))
    assert not r.of_kind(objects, "ServiceAccount")
    assert pod_view(job_of(objects))["serviceAccountName"] == "ci"


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
def test_kueue_queue_label(job_kind: str) -> None:
    job = job_of(render(deep_merge(BASE, {"jobKind": job_kind, "scheduling": {"kueueQueue": "team-a"}})))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in job_of(render(deep_merge(BASE, {"jobKind": job_kind})))["metadata"]["labels"]


def test_gang_scheduling_options_reach_the_scheduling_policy() -> None:
    values = deep_merge(BASE, {"nodes": 4, "scheduling": {"gang": "volcano", "queue": "research",
                                                          "scheduleTimeoutSeconds": 600},
                               "nodePool": {"priorityClassName": "high"}})
    job = job_of(render(values))
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "queue": "research",
                                                           "scheduleTimeoutSeconds": 600, "priorityClass": "high"}
    assert pod_view(job)["schedulerName"] == "volcano" and pod_view(job)["priorityClassName"] == "high"


#: Node labels of the platforms (LAUNCH.md §6), extra resources and env per node pool preset.
NODE_POOLS = {
    "gke-a2-highgpu": ({"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, {}, {}),
    "gke-a2-ultragpu": ({"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}, {}, {}),
    "gke-a3-highgpu": ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, {}, {}),
    "eks-p4d": ({"node.kubernetes.io/instance-type": "p4d.24xlarge"}, {"vpc.amazonaws.com/efa": "4"},
                {"FI_PROVIDER": "efa"}),
    "eks-p4de": ({"node.kubernetes.io/instance-type": "p4de.24xlarge"}, {"vpc.amazonaws.com/efa": "4"},
                 {"FI_PROVIDER": "efa"}),
    "eks-p5": ({"node.kubernetes.io/instance-type": "p5.48xlarge"}, {"vpc.amazonaws.com/efa": "32"},
               {"FI_PROVIDER": "efa"}),
    "gpu-operator-a100-40gb": ({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
                               {}, {}),
    "gpu-operator-a100-80gb": ({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                               {}, {}),
    "gpu-operator-h100-80gb": ({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                               {}, {}),
}


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("pool", sorted(NODE_POOLS))
def test_node_pool_preset(pool: str, job_kind: str) -> None:
    labels, extra, env = NODE_POOLS[pool]
    values = deep_merge(BASE, {"jobKind": job_kind, "nodes": 2, "gpusPerNode": 8, "nodePool": {
        "preset": pool, "nodeSelector": {"pool": "training"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]}})
    view = pod_view(job_of(render(values)))
    assert view["nodeSelector"] == {**labels, "pool": "training"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in view["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in view["tolerations"]
    limits = view["resources"]["limits"]
    assert limits["nvidia.com/gpu"] in (8, "8")
    for name, amount in extra.items():
        assert str(limits[name]) == amount
    for name, value in env.items():
        assert view["env"][name]["value"] == value
    if not extra:
        assert not any(k.startswith("vpc.amazonaws.com") for k in limits)


def test_nccl_env_only_on_gpu_pods() -> None:
    gpu = pod_view(job_of(render(deep_merge(BASE, {"nccl": {"socketIfname": "eth0", "ibDisable": True}}))))["env"]
    assert gpu["NCCL_DEBUG"]["value"] == "WARN" and gpu["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert gpu["NCCL_IB_DISABLE"]["value"] == "1" and gpu["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    cpu = pod_view(job_of(render(deep_merge(BASE, {"gpusPerNode": 0}))))["env"]
    assert not [name for name in cpu if "NCCL" in name]


def test_trainer_env_uses_the_trainers_variable_names() -> None:
    from trainer.dist import LOG_FORMAT_ENV
    from trainer.storage import GCS_TOKEN_ENV

    env = pod_view(job_of(render(BASE)))["env"]
    assert env[GCS_TOKEN_ENV]["value"] == "google_default"
    assert env[LOG_FORMAT_ENV]["value"] == "json"
    assert env["SAM_RUN_NAME"]["value"] == FULLNAME  # the `run` label of the metrics (trainer/prom.py)


def test_exporter_off_reaches_the_config(tmp_path: Path) -> None:
    values = deep_merge(BASE, {"monitoring": {"port": 0}, "training": {"preset": "tiny_cpu"}, "gpusPerNode": 0})
    objects = render(values)
    assert rendered_config(objects, tmp_path).metrics.port == 0
    ports = [p["name"] for p in pod_view(job_of(objects))["ports"]]
    assert ports == ["pytorchjob-port"]


def test_gcs_emulator_env() -> None:
    env = pod_view(job_of(render(deep_merge(BASE, {"gcs": {"emulatorHost": "http://gcs:4443", "token": "anon"}}))))["env"]
    assert env["STORAGE_EMULATOR_HOST"]["value"] == "http://gcs:4443"
    assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"]["value"] == "false"
    assert env["SAM_GCS_TOKEN"]["value"] == "anon"


def test_image_tag_and_digest() -> None:
    assert pod_view(job_of(render(BASE)))["image"] == "ghcr.io/sam-k8s/sam-train:0.1.0"  # appVersion
    digest = "sha256:" + "ab" * 32
    view = pod_view(job_of(render(deep_merge(BASE, {"image": {"repository": "reg/sam", "tag": digest}}))))
    assert view["image"] == f"reg/sam@{digest}"


def test_pod_labels_cannot_break_the_selector() -> None:
    values = deep_merge(BASE, {"podLabels": {"app.kubernetes.io/component": "other", "team": "vision"},
                               "monitoring": {"podMonitor": {"enabled": True}}})
    objects = render(values)
    labels = pod_view(job_of(objects))["labels"]
    selector = r.one(objects, "PodMonitor")["spec"]["selector"]["matchLabels"]
    assert labels["team"] == "vision" and selector.items() <= labels.items()


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
def test_run_policy_limits(job_kind: str) -> None:
    ttl = {"ttlSecondsAfterFinished": 3600} if job_kind == "pytorchjob" else {}  # a TrainJob refuses it
    values = deep_merge(BASE, {"jobKind": job_kind, "runPolicy": {
        "activeDeadlineSeconds": 86400, "suspend": True, "backoffLimit": 5, **ttl}})
    spec = job_of(render(values))["spec"]
    if job_kind == "pytorchjob":
        assert {k: spec["runPolicy"][k] for k in ("activeDeadlineSeconds", "ttlSecondsAfterFinished", "suspend",
                                                  "backoffLimit")} == {"activeDeadlineSeconds": 86400,
                                                                       "ttlSecondsAfterFinished": 3600,
                                                                       "suspend": True, "backoffLimit": 5}
    else:
        assert spec["activeDeadlineSeconds"] == 86400 and spec["suspend"] is True


@pytest.mark.parametrize("override, words", [
    ({"scheduling": {"queue": "research"}}, ["scheduling.queue", "volcano"]),
    ({"jobKind": "trainjob", "scheduling": {"schedulerName": "custom"}}, ["scheduling.schedulerName",
                                                                         "trainJob.createRuntime"]),
])
def test_impossible_combinations_fail_naming_the_values(override: dict, words: list[str]) -> None:
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, override))
    assert all(word in str(info.value) for word in words), str(info.value)


# --------------------------------------------------------------------------- TrainJob vs PyTorchJob

SHAPE_CASES = {
    "gpu-pool": {"nodes": 4, "gpusPerNode": 8, "nodePool": {"preset": "eks-p5"}, "shmSize": "32Gi",
                 "env": [{"name": "EXTRA", "value": "1"}], "image": {"tag": "1.2.3", "pullSecrets": ["regcred"]},
                 "extraVolumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "sa1b"}}],
                 "extraVolumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}]},
    "cpu": {"nodes": 2, "gpusPerNode": 0, "cpuProcessesPerNode": 2, "resources": {"requests": {"cpu": "2"}}},
    "own-runtime-gang": {"nodes": 8, "scheduling": {"gang": "scheduler-plugins"}},
}
SAME_FIELDS = ("image", "command", "env", "resources", "nodeSelector", "tolerations", "volumes", "volumeMounts",
               "serviceAccountName", "securityContext", "containerSecurityContext", "affinity",
               "imagePullSecrets", "terminationGracePeriodSeconds", "labels")


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_trainjob_pods_match_the_pytorchjobs(case: str) -> None:
    values = deep_merge(BASE, SHAPE_CASES[case])
    pytorch = pod_view(job_of(render(deep_merge(values, {"jobKind": "pytorchjob"}))))
    objects = render(deep_merge(values, {"jobKind": "trainjob"}))
    trainjob = pod_view(job_of(objects))
    runtimes = r.of_kind(objects, "TrainingRuntime")
    if runtimes:  # the pod settings live in the chart's runtime; the TrainJob sets the container's
        runtime_view = r._template_view(r.runtime_pod_templates(runtimes[0])["node"], "node")
        trainjob = {**runtime_view, **{k: trainjob[k] for k in ("image", "command", "env", "resources")}}
    for field in SAME_FIELDS:
        assert trainjob[field] == pytorch[field], field


# --------------------------------------------------------------------------- NOTES


def test_notes_show_commands_for_this_release() -> None:
    text = notes(deep_merge(BASE, {"nodes": 2}), name="exp7", namespace="team-a")
    commands = [line.strip() for line in text.splitlines() if "kubectl " in line]
    assert commands, text
    assert all("-n team-a" in c or "--namespace team-a" in c or "pod/" in c for c in commands), commands
    assert any("pytorchjob" in c and "exp7-sam-train" in c for c in commands), commands
    assert any("logs" in c and "exp7-sam-train" in c for c in commands), commands
    assert "rel-sam-train" not in text and " ml " not in text


def test_notes_for_a_trainjob() -> None:
    text = notes(deep_merge(BASE, {"jobKind": "trainjob"}), name="exp7", namespace="team-a")
    assert any("trainjob" in line and "exp7-sam-train" in line for line in text.splitlines() if "kubectl" in line)


@pytest.mark.parametrize("preset", ["vit-h-a100", "vit-h-h100"])
def test_notes_print_the_paper_batch(preset: str) -> None:
    text = notes(preset_values(preset))
    assert re.search(r"32 nodes? x 8 process(es)?\b.*= 256 images", text), text
    assert re.search(r"paper\W.{0,40}\b256\b", text), text  # "the paper's global batch for vit_h: 256"
    assert "WARNING" not in text


def test_notes_warn_when_the_global_batch_is_smaller_than_the_papers() -> None:
    text = notes(preset_values("vit-h-a100", {"nodes": 16}))
    assert re.search(r"= 128 images", text), text
    assert "WARNING" in text and "grad_accum=2" in text  # 16 x 8 x 1 x 2 = 256
    assert "WARNING" not in notes(preset_values("vit-h-a100", {"nodes": 16, "training": {"config": {
        "train": {"grad_accum": 2}}}}))


@pytest.mark.parametrize("url, command", [("gs://b/ckpt", "gcloud storage ls gs://b/ckpt"),
                                          ("s3://b/ckpt", "aws s3 ls s3://b/ckpt")])
def test_notes_list_checkpoints_with_the_schemes_tool(url: str, command: str) -> None:
    assert command in notes(deep_merge(BASE, {"training": {"checkpointUrl": url}}))


def test_notes_restart_summary_names_the_permanent_exit_codes() -> None:
    text = notes(BASE)
    found = re.search(r"exit ((?:\d+/)*\d+)\b", text)
    assert found, text
    assert {int(c) for c in found[1].split("/")} == failure_codes("permanent")
    assert str(int(ExitCode.PREEMPTED)) in text


# --------------------------------------------------------------------------- bad values

#: case -> (override, words the message must contain, the stage that must catch it: "values" =
#: values.schema.json, "template" = a `fail`/`required` in the templates). Schema messages name
#: the value by its JSON pointer (`at '/nodePool/preset'`), template ones by its dotted name.
BAD_VALUES = {
    "nodes-0": ({"nodes": 0}, ["'/nodes'"], "values"),
    "gpus-word": ({"gpusPerNode": "eight"}, ["'/gpusPerNode'"], "values"),
    "shm-lots": ({"shmSize": "lots"}, ["'/shmSize'", "'lots'"], "values"),
    "unknown-top-level": ({"nodez": 2}, ["'nodez'"], "values"),
    "unknown-monitoring-key": ({"monitoring": {"portt": 9400}}, ["'/monitoring'", "'portt'"], "values"),
    "node-pool-typo": ({"nodePool": {"preset": "gke-a2-ultragpuu"}}, ["'/nodePool/preset'"], "values"),
    "training-preset-typo": ({"training": {"preset": "vit_hh"}}, ["'/training/preset'"], "values"),
    "config-unknown-section": ({"training": {"config": {"optimizer": {"lr": 1e-4}}}},
                               ["'/training/config'", "'optimizer'"], "values"),
    "missing-shards": ({"training": {"dataShards": ""}}, ["training.dataShards"], "template"),
    "fullname-60": ({"fullnameOverride": "a" * 60}, ["fullnameOverride"], "values"),
    "elastic-min-over-nodes": ({"nodes": 2, "elastic": {"enabled": True, "minNodes": 3}},
                               ["elastic.minNodes", "nodes"], "template"),
    # Finding 16: a finished Master would restart forever.
    "restart-always": ({"restartPolicy": "Always"}, ["'/restartPolicy'"], "values"),
    # Finding 20: /dev/shm needs a size with a unit.
    "shm-zero": ({"shmSize": "0"}, ["'/shmSize'"], "values"),
    "shm-exponent": ({"shmSize": "1e3"}, ["'/shmSize'"], "values"),
    "shm-number": ({"shmSize": 1073741824}, ["'/shmSize'"], "values"),
    "shm-milli": ({"shmSize": "512m"}, ["'/shmSize'"], "values"),
    "shm-zero-gi": ({"shmSize": "0Gi"}, ["shmSize", "1Mi"], "template"),
    # The trainer side of finding 2: torchrun's rendezvous timeout.
    "rendezvous-short": ({"training": {"rendezvousTimeoutSeconds": 30}},
                         ["'/training/rendezvousTimeoutSeconds'"], "values"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_naming_the_value(case: str) -> None:
    override, words, stage = BAD_VALUES[case]
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, override))
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert info.value.stage == stage, str(info.value)


def test_a_release_name_up_to_the_limit_is_a_dns_label() -> None:
    name = "experiment-" + "x" * 19  # + "-sam-train": 40 characters, the most allowed
    job = job_of(render(deep_merge(BASE, {"nodes": 32}), name=name))
    full = job["metadata"]["name"]
    assert full == f"{name}-sam-train" and len(full) == 40
    try:
        validate(job)  # the name is a DNS-1035 label (a PyTorchJob's becomes Service names)
    except CrdsNotPresent:
        pass
    # The longest pod names the operators create stay DNS labels (63).
    assert len(f"{full}-worker-31") <= 63 and len(f"{full}-node-0-31-x7k2p") <= 63


def test_a_long_release_name_fails_instead_of_being_cut() -> None:
    # Finding 20: cut to 40 characters, two long release names could become one job name.
    name = "experiment-" + "x" * 20  # + "-sam-train": 41 characters
    with pytest.raises(RenderError) as info:
        render(BASE, name=name)
    message = str(info.value)
    assert name in message and "40" in message and "fullnameOverride" in message, message


def test_release_name_with_the_chart_name_is_used_as_is() -> None:
    assert job_of(render(BASE, name="sam-train-exp1"))["metadata"]["name"] == "sam-train-exp1"
    assert job_of(render(deep_merge(BASE, {"fullnameOverride": "vit-h-run"})))["metadata"]["name"] == "vit-h-run"


#: Pod mistakes that `helm install` of a PyTorchJob would accept: the CRD's schema cannot see
#: them and the operator's webhook rules (LAUNCH.md §1) do not cover them, so the API server
#: rejects them only when the operator creates the pods (the job then sits without pods, the
#: reason in its events). The chart's own rule (_validate.tpl: "say so at
#: install time instead of in a failed pod") asks for a render-time failure naming the value.
POD_MISTAKES = {
    "mount-without-volume": ({"extraVolumeMounts": [{"name": "data", "mountPath": "/data"}]},
                             ["extraVolumeMounts", "data"]),
    "resource-name-typo": ({"resources": {"limits": {"gpu": "8"}}}, ["resources", "gpu"]),
}


@pytest.mark.parametrize("case", sorted(POD_MISTAKES))
def test_pod_mistakes_fail_at_render_time(case: str) -> None:
    override, words = POD_MISTAKES[case]
    try:
        objects = render(deep_merge(BASE, override))
    except RenderError as err:
        assert all(word in str(err) for word in words), str(err)
        return
    later = []  # what the pods would hit: shown in the failure
    for obj in objects:
        try:
            validate(obj)
        except ValidationError as err:
            later.append(str(err))
        except CrdsNotPresent:
            pass
    pytest.fail("rendered without an error; the API server rejects the pods only when the operator "
                "creates them:\n" + "\n".join(later))


def test_lint_reports_bad_values() -> None:
    assert r.lint_errors(r.lint(deep_merge(BASE, {"nodes": 0})))


# --------------------------------------------------------------------------- review findings (issue 9)


def test_clean_pod_policy_defaults_to_running() -> None:
    # Finding 5: `None` left the Pending/Running Workers of a failed job holding their GPUs.
    assert job_of(render(BASE))["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    job = job_of(render(deep_merge(BASE, {"runPolicy": {"cleanPodPolicy": "None"}})))
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "None"


#: Finding 6: (resources, shmSize) -> words of the message; None: renders.
RESOURCE_CASES = {
    "shm-equals-limit": ({"requests": {"memory": "8Gi"}, "limits": {"memory": "16Gi"}}, "16Gi",
                         ["shmSize", "resources.limits.memory"]),
    "shm-over-limit-other-unit": ({"requests": {"memory": "8Gi"}, "limits": {"memory": "16G"}}, "16Gi",
                                  ["shmSize", "resources.limits.memory"]),
    "no-memory-limit": ({"limits": None}, "16Gi", ["resources.limits.memory", "required"]),
    "memory-request-over-limit": ({"requests": {"memory": "129Gi"}}, "16Gi",
                                  ["resources.requests.memory", "resources.limits.memory"]),
    "cpu-request-over-limit-milli": ({"requests": {"cpu": "1500m"}, "limits": {"cpu": "1"}}, "16Gi",
                                     ["resources.requests.cpu", "resources.limits.cpu"]),
    "decimal-request-over-binary-limit": ({"requests": {"memory": "1.1Gi"}, "limits": {"memory": "1G"}}, "64Mi",
                                          ["resources.requests.memory"]),
    "shm-just-below-limit": ({"requests": {"memory": "8Gi"}, "limits": {"memory": "16Gi"}}, "16383Mi", None),
    "cpu-equal-in-two-notations": ({"requests": {"cpu": "1"}, "limits": {"cpu": "1000m"}}, "16Gi", None),
    "decimal-below-binary": ({"requests": {"memory": "1G"}, "limits": {"memory": "1Gi"}}, "64Mi", None),
    "exponent-request": ({"requests": {"memory": "1e9"}, "limits": {"memory": "1Gi"}}, "64Mi", None),
    "unquoted-number": ({"requests": {"cpu": 2}, "limits": {"cpu": 2.5}}, "16Gi", None),
}


@pytest.mark.parametrize("case", sorted(RESOURCE_CASES))
def test_shm_and_requests_fit_the_limits(case: str) -> None:
    resources, shm, words = RESOURCE_CASES[case]
    values = deep_merge(BASE, {"resources": resources, "shmSize": shm})
    if words is None:
        render(values)
        return
    with pytest.raises(RenderError) as info:
        render(values)
    assert info.value.stage == "template" and all(w in str(info.value) for w in words), str(info.value)


def test_restart_policy_exit_code_needs_a_backoff_limit() -> None:
    # Finding 7: with backoffLimit 0 the operator fails the job at the first pod failure, a drain's 143 too.
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, {"runPolicy": {"backoffLimit": 0}}))
    assert "runPolicy.backoffLimit" in str(info.value) and "ExitCode" in str(info.value)
    render(deep_merge(BASE, {"runPolicy": {"backoffLimit": 0}, "restartPolicy": "Never"}))


@pytest.mark.parametrize("deadline", [None, 86400])
def test_notes_say_backoff_limit_does_not_bound_exit_code_restarts(deadline: int | None) -> None:
    # Finding 7: training-operator v1.9 never counts ExitCode restarts against backoffLimit.
    text = notes(deep_merge(BASE, {"runPolicy": {"activeDeadlineSeconds": deadline},
                                   "monitoring": {"prometheusRule": {"enabled": True}}}))
    restarts = text[text.index("Restarts:"):text.index("Changing the run")]
    assert "without a bound" in restarts and "OnFailure" in restarts and "SamTrainRestartingOften" in restarts
    assert "at most 20 times" not in restarts
    assert ("activeDeadlineSeconds=86400" if deadline else "Set runPolicy.activeDeadlineSeconds") in restarts


def test_values_docs_say_backoff_limit_does_not_bound_exit_code_restarts() -> None:
    text = (r.CHART_DIR / "values.yaml").read_text()
    block = text[text.index("runPolicy:"):text.index("backoffLimit: 20")]
    assert "OnFailure" in block and "without a bound" in block and "activeDeadlineSeconds" in block


@pytest.mark.parametrize("key, owner", [("data.shards", "training.dataShards"), ("train.run_dir", "training.runDir"),
                                        ("checkpoint.url", "training.checkpointUrl"),
                                        ("metrics.port", "monitoring.port")])
def test_extra_args_may_not_set_a_chart_owned_key(key: str, owner: str) -> None:
    # Finding 8: `--set` wins over the file, so it would silently beat the chart's own value.
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, {"training": {"extraArgs": ["optim.lr=1e-4", f"{key}=9999"]}}))
    assert key in str(info.value) and owner in str(info.value) and "training.extraArgs" in str(info.value)


def test_notes_global_batch_reads_extra_args_over_the_config() -> None:
    # Finding 8: NOTES computed the batch from training.config although --set wins in the pod.
    values = preset_values("vit-h-a100", {"nodes": 16, "training": {
        "config": {"data": {"batch_size": 4}, "train": {"grad_accum": 8}},
        "extraArgs": ["data.batch_size=1", "train.grad_accum=1", "train.grad_accum=2"]}})
    text = notes(values)
    assert re.search(r"16 nodes x 8 processes x 1 images \(data.batch_size\) x 2 \(train.grad_accum\) = 256 images",
                     text), text
    assert "WARNING" not in text


def preset_header(name: str) -> str:
    """The leading comment block of ``presets/<name>.yaml``."""
    lines = (r.PRESETS_DIR / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in itertools.takewhile(lambda line: line.startswith("#"), lines))


def _set_lines(text: str) -> dict:
    """``--set a.b=c`` pairs in ``text`` as nested values (YAML-typed, as helm --set types them)."""
    out: dict = {}
    for dotted, value in re.findall(r"--set\s+([A-Za-z][\w.]*)=(\S+)", text):
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _gib(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def _gke_allocatable_gib(memory_gib: float) -> float:
    """GKE's allocatable memory: its kubelet reserve (25% of 4 GiB, 20% of the next 4, 10% of the
    next 8, 6% of the next 112, 2% above 128) and the 100 MiB eviction threshold."""
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)]
    reserved, left = 0.0, memory_gib
    for size, share in tiers:
        reserved += min(left, size) * share
        left -= min(left, size)
    return memory_gib - reserved - 0.1


@pytest.mark.parametrize("preset", ["vit-b-a100", "vit-l-a100", "vit-h-a100"])
def test_a100_presets_give_working_sets_for_the_40gb_gke_pool(preset: str) -> None:
    # Finding 10: the comments said 40 GB pools work, but a2-highgpu-8g has 680 GB, not 1000Gi.
    header = preset_header(preset)
    block = header[header.index("a2-highgpu-8g"):]
    block = block[:block.index("\n#   ", block.index("--set"))]
    sets = _set_lines(block)
    assert sets["nodePool"]["preset"] == "gke-a2-highgpu", block
    values = preset_values(preset, sets)
    resources = pod_view(job_of(render(values)))["resources"]
    allocatable = _gke_allocatable_gib(680)  # a2-highgpu-8g: 680 GB of memory
    assert _gib(resources["requests"]["memory"]) <= allocatable - 8, (resources, allocatable)  # system pods
    assert _gib(resources["requests"]["memory"]) <= _gib(resources["limits"]["memory"])
    assert "model.activation_checkpointing" in header  # 40 GB of GPU memory (ViT-B needs it turned on)


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
def test_suspend_is_rendered_only_when_true(job_kind: str) -> None:
    # Finding 14: a rendered `suspend: false` resumes a job Kueue suspended at every helm upgrade.
    def spec(values: dict) -> dict:
        job = job_of(render(deep_merge(BASE, {"jobKind": job_kind}, values)))
        return job["spec"]["runPolicy"] if job_kind == "pytorchjob" else job["spec"]

    assert "suspend" not in spec({}) and "suspend" not in spec({"runPolicy": {"suspend": False}})
    assert spec({"runPolicy": {"suspend": True}})["suspend"] is True


@pytest.mark.parametrize("preset", r.preset_names())
def test_preset_headers_say_to_set_the_pushed_image(preset: str) -> None:
    # Finding 15: no public image is published yet.
    header = preset_header(preset)
    assert "image.repository=" in header and "image.tag=" in header and "no public image" in header
    readme = (r.CHART_DIR / "README.md").read_text()
    assert "no public image is published yet" in readme.lower() and "image.repository" in readme


@pytest.mark.parametrize("repository, fails", [
    ("reg.io/team/sam-train:1.0", True), ("sam-train:e2e", True), ("reg.io/x@sha256:" + "ab" * 32, True),
    ("localhost:5000/sam-train", False), ("reg.io/team/sam-train", False),
])
def test_image_repository_with_a_tag_is_refused(repository: str, fails: bool) -> None:
    values = deep_merge(BASE, {"image": {"repository": repository}})
    if not fails:
        assert pod_view(job_of(render(values)))["image"] == f"{repository}:0.1.0"
        return
    with pytest.raises(RenderError) as info:
        render(values)
    assert "image.repository" in str(info.value) and "image.tag" in str(info.value), str(info.value)


def test_default_image_repository_is_kept() -> None:
    assert r.chart_defaults()["image"]["repository"] == "ghcr.io/sam-k8s/sam-train"


def test_elastic_refuses_training_max_restarts() -> None:
    # Finding 17: both become torchrun's --max-restarts.
    values = deep_merge(BASE, {"nodes": 2, "elastic": {"enabled": True}, "training": {"maxRestarts": 2}})
    with pytest.raises(RenderError) as info:
        render(values)
    assert "training.maxRestarts" in str(info.value) and "elastic" in str(info.value)


def test_notes_for_elastic_jobs() -> None:
    # Finding 17: what changes with elastic training.
    text = notes(deep_merge(BASE, {"nodes": 4, "elastic": {"enabled": True, "minNodes": 2}}))
    assert "global batch changes with the node count" in text
    assert "data order restarts" in text
    assert "not necessarily worker-0" in text and '"rank": 0' in text


@pytest.mark.parametrize("override, words", [
    ({"jobKind": "trainjob", "runPolicy": {"ttlSecondsAfterFinished": 60}}, ["runPolicy.ttlSecondsAfterFinished"]),
    ({"jobKind": "trainjob", "runPolicy": {"cleanPodPolicy": "None"}}, ["runPolicy.cleanPodPolicy"]),
    ({"jobKind": "trainjob", "runPolicy": {"cleanPodPolicy": "All"}}, ["runPolicy.cleanPodPolicy"]),
    ({"serviceAccount": {"create": False, "gcpServiceAccount": "t@p.iam.gserviceaccount.com"}},
     ["serviceAccount.gcpServiceAccount", "serviceAccount.create"]),
    ({"serviceAccount": {"create": False, "awsRoleArn": "arn:aws:iam::123456789012:role/sam"}},
     ["serviceAccount.awsRoleArn", "serviceAccount.create"]),
    ({"serviceAccount": {"create": False, "annotations": {"a": "b"}}}, ["serviceAccount.annotations"]),
])
def test_values_that_would_be_ignored_fail(override: dict, words: list[str]) -> None:
    # Finding 18: fail instead of silently ignoring.
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, override))
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("shm", ["64Gi", "512Mi", "1G", "1Mi"])
def test_shm_sizes_with_a_unit_render(shm: str) -> None:
    render(deep_merge(BASE, {"shmSize": shm}))


def test_trainjob_notes_port_forward_one_running_pod() -> None:
    # Finding 21: `-o name` printed every pod of index 0 (old and new after a restart).
    text = notes(deep_merge(BASE, {"jobKind": "trainjob"}))
    line = next(line for line in text.splitlines() if line.strip().startswith("POD=$("))
    assert "--field-selector=status.phase=Running" in line and "{.items[0].metadata.name}" in line
    assert "-o name" not in line


def test_manifests_readme_warns_to_replace_the_run_dir() -> None:
    # Finding 22: two runs sharing base's run_dir placeholder resume each other's checkpoints.
    text = (r.REPO_ROOT / "manifests" / "README.md").read_text()
    assert "run_dir" in text and "resume each other's checkpoints" in text


def test_chart_readme_explains_the_init_container_and_pod_security() -> None:
    # Finding 11: the operator's init-pytorch container has no securityContext.
    text = (r.CHART_DIR / "README.md").read_text()
    assert "init-pytorch" in text and "--pytorch-init-container-template-file" in text
    assert "pod-security.kubernetes.io/enforce=baseline" in text


@pytest.mark.parametrize("job_kind, words", [("pytorchjob", "does not restart"), ("trainjob", "immutable")])
def test_notes_and_readme_say_how_to_change_a_run(job_kind: str, words: str) -> None:
    # Finding 13: helm upgrade does not change a running run.
    text = notes(deep_merge(BASE, {"jobKind": job_kind}), name="exp7", namespace="team-a")
    part = text[text.index("Changing the run"):]
    assert words in part.split("\n\n")[0] and "helm uninstall exp7 -n team-a" in part
    readme = (r.CHART_DIR / "README.md").read_text()
    assert "helm upgrade" in readme and "immutable" in readme and "resumes from the newest checkpoint" in readme


@pytest.mark.parametrize("grace, want", [(300, "285"), (600, "585"), (19, "5"), (0, "5")])
def test_shutdown_timeout_follows_the_grace_period(grace: int, want: str) -> None:
    # Finding 1 (chart side): torchrun's workers get the grace period minus 15 s after SIGTERM.
    env = pod_view(job_of(render(deep_merge(BASE, {"terminationGracePeriodSeconds": grace}))))["env"]
    assert env["SAM_SHUTDOWN_TIMEOUT_S"]["value"] == want
    overridden = deep_merge(BASE, {"env": [{"name": "SAM_SHUTDOWN_TIMEOUT_S", "value": "42"}]})
    assert pod_view(job_of(render(overridden)))["env"]["SAM_SHUTDOWN_TIMEOUT_S"]["value"] == "42"


@pytest.mark.parametrize("job_kind", ["pytorchjob", "trainjob"])
def test_rendezvous_timeout_reaches_torchrun(job_kind: str) -> None:
    # Finding 2 (chart side): the command's --rdzv-conf, between trainer.dist and the module.
    objects = render(deep_merge(BASE, {"jobKind": job_kind, "training": {"rendezvousTimeoutSeconds": 900}}))
    command = command_of(objects)
    assert command[:4] == ["python", "-m", "trainer.dist", "--rdzv-conf=join_timeout=900,timeout=900"]
    assert command.index("-m", 3) > 3


def test_elastic_rendezvous_timeout_is_in_the_elastic_policy() -> None:
    job = job_of(render(deep_merge(BASE, {"nodes": 3, "elastic": {"enabled": True}})))
    assert job["spec"]["elasticPolicy"]["rdzvConf"] == [{"key": "join_timeout", "value": "1800"}]
    assert not any(a.startswith("--rdzv") for a in pod_view(job)["command"])
