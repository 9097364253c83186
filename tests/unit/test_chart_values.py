"""The chart's values reach the pods as documented, and bad values fail at render time.

- config.toml: loaded by the trainer's own loader (``trainer.config.load_config``), exactly as
  ``python -m trainer.train --config`` in the pod would load it, with the container's ``--set``s;
- restart policy and exit codes agree with ``trainer.dist.ExitCode`` and the README's table;
- ServiceAccount identity annotations, Kueue label, node pool presets (labels from
  /work/shared/LAUNCH.md §6), TrainJob vs PyTorchJob pod settings, NOTES.txt;
- bad values: Helm's message names the offending value.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import pytest

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
    # Raw TOML only (tomllib), so keys need not be trainer settings: the writer's own contract.
    config = {
        "eval": {"shards": ['gs://b/a b "q".tar', "caf\u00e9", "<tag>&"], "note": "line1\nline2\t\\ end"},
        "optim": {"lr": 1.5e-10, "big": 123456789012, "neg": -3, "half": 2.5, "whole": 3.0, "zero": 0},
        "train": {"amp": "off", "flag": True, "other": False, "empty": "", "nested": {"deep": [1, 2]}},
        "log": {"dotted.key": "x", "list_of_lists": [[1, 2], [3]]},
    }
    raw = tomllib.loads(config_text(render(deep_merge(BASE, {"training": {"config": config}}))))
    want = deep_merge(config, {"optim": {"whole": 3}})  # a whole float is written as an int (documented)
    for section, keys in want.items():
        for key, value in keys.items():
            assert raw[section][key] == value, (section, key, raw[section].get(key))
    assert type(raw["optim"]["big"]) is int and type(raw["optim"]["half"]) is float
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
    assert command == ["python", "-m", "trainer.dist", "--max-restarts", "2",
                       "-m", "trainer.train", "--config", "/etc/sam-train/config.toml"]


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
    values = deep_merge(BASE, {"jobKind": job_kind, "runPolicy": {
        "activeDeadlineSeconds": 86400, "ttlSecondsAfterFinished": 3600, "suspend": True, "backoffLimit": 5}})
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
    ({"jobKind": "trainjob", "trainJob": {"createRuntime": True}, "restartPolicy": "Always"},
     ["restartPolicy", "trainjob"]),
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
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_naming_the_value(case: str) -> None:
    override, words, stage = BAD_VALUES[case]
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, override))
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert info.value.stage == stage, str(info.value)


def test_a_long_release_name_is_cut_to_a_dns_label() -> None:
    name = "experiment-" + "x" * 42
    job = job_of(render(deep_merge(BASE, {"nodes": 32}), name=name))
    full = job["metadata"]["name"]
    assert len(full) <= 40 and full.startswith("experiment-")
    try:
        validate(job)  # the name is a DNS-1035 label (a PyTorchJob's becomes Service names)
    except CrdsNotPresent:
        pass
    # The longest pod names the operators create stay DNS labels (63).
    assert len(f"{full}-worker-31") <= 63 and len(f"{full}-node-0-31-x7k2p") <= 63


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
