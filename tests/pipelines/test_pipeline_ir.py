"""The compiled pipeline (IR YAML): DAG, inputs and outputs, platform settings, the golden file.

The IR is what the KFP backend runs, so these tests read the compiled YAML rather than the
Python objects: task names and dependencies, where each task input comes from, the pipeline's
parameters with their types and defaults, the kfp-kubernetes settings per executor, and
that ``pipelines/sam_pipeline.yaml`` is what ``python -m pipelines.sam_pipeline`` writes now.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipelines import require_kfp
from tests.pipelines.conftest import REPO_ROOT

require_kfp()

from pipelines import components  # noqa: E402
from pipelines.sam_pipeline import (EVAL_SHM_SIZE, GPU_TOLERATION, compile_pipeline,  # noqa: E402
                                    sam_train_pipeline, sam_train_pipeline_local)

GOLDEN = REPO_ROOT / "pipelines" / "sam_pipeline.yaml"
REQUIRED = object()
#: name -> (IR parameter type, default); REQUIRED: no default.
PARAMETERS = {
    "data_shards": ("STRING", REQUIRED),
    "run_dir": ("STRING", REQUIRED),
    "eval_shards": ("STRING", REQUIRED),
    "preset": ("STRING", REQUIRED),
    "nodes": ("NUMBER_INTEGER", 0),
    "gpus_per_node": ("NUMBER_INTEGER", -1),
    "node_pool": ("STRING", ""),
    "image": ("STRING", components.DEFAULT_IMAGE),
    "values_json": ("STRING", ""),
    "set_values": ("LIST", []),
    "job_name": ("STRING", ""),
    "namespace": ("STRING", ""),
    "timeout_s": ("NUMBER_INTEGER", 7 * 24 * 3600),
    "eval_images": ("NUMBER_INTEGER", 500),
    "eval_max_masks": ("NUMBER_INTEGER", 64),
    "eval_accelerator": ("STRING", "nvidia.com/gpu"),
    "eval_gpus": ("NUMBER_INTEGER", 1),
    "eval_node_selector": ("STRUCT", {}),
    "eval_tolerations": ("LIST", []),
}


def load_ir(text: str) -> dict:
    """The pipeline spec with its platform spec (``platforms``): the IR file holds both documents."""
    merged: dict = {}
    for doc in yaml.safe_load_all(text):
        merged.update(doc or {})
    return merged


def compiled(tmp_path: Path, pipeline=sam_train_pipeline) -> dict:
    from kfp import compiler

    out = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    return load_ir(out.read_text())


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return compiled(tmp_path_factory.mktemp("ir"))


def _source(value: dict) -> tuple[str, str] | str:
    """Where a task input comes from: ("input", name), (task, output) or ("constant", value)."""
    if "componentInputParameter" in value:
        return ("input", value["componentInputParameter"])
    if "taskOutputParameter" in value:
        out = value["taskOutputParameter"]
        return (out["producerTask"], out["outputParameterKey"])
    return ("constant", json.dumps(value["runtimeValue"]["constant"]))


def test_dag_tasks_and_dependencies(ir: dict) -> None:
    tasks = ir["root"]["dag"]["tasks"]
    deps = {name: sorted(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps == {
        "validate-dataset": [],
        "validate-dataset-2": [],
        "launch-and-wait": ["validate-dataset", "validate-dataset-2"],
        "evaluate": ["launch-and-wait"],
        "export": ["evaluate"],
    }
    inputs = {name: {key: _source(v) for key, v in task["inputs"]["parameters"].items()}
              for name, task in tasks.items()}
    # Both shard specs are checked before training; the evaluation scores what training wrote,
    # and the export exports the step the evaluation scored.
    assert inputs["validate-dataset"] == {"data_shards": ("input", "data_shards")}
    assert inputs["validate-dataset-2"] == {"data_shards": ("input", "eval_shards")}
    assert inputs["evaluate"]["checkpoint_url"] == ("launch-and-wait", "Output")
    assert inputs["evaluate"]["eval_shards"] == ("input", "eval_shards")
    assert inputs["export"] == {"checkpoint_url": ("evaluate", "Output")}
    launch = inputs["launch-and-wait"]
    for name in ("data_shards", "run_dir", "preset", "values_json", "set_values", "nodes", "gpus_per_node",
                 "node_pool", "image", "job_name", "namespace", "timeout_s"):
        assert launch[name] == ("input", name), name
    assert launch["run_id"] == ("constant", json.dumps("{{$.pipeline_job_uuid}}"))


def test_parameters_names_types_defaults(ir: dict) -> None:
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(PARAMETERS)
    for name, (kind, default) in PARAMETERS.items():
        assert params[name]["parameterType"] == kind, name
        if default is REQUIRED:
            assert "defaultValue" not in params[name] and not params[name].get("isOptional"), name
        else:
            assert params[name]["defaultValue"] == default, name
            assert params[name]["isOptional"] is True, name


def test_outputs_are_typed_artifacts(ir: dict) -> None:
    outputs = ir["root"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "metrics": "system.Metrics", "model": "system.Model"}
    selectors = ir["root"]["dag"]["outputs"]["artifacts"]
    assert selectors["metrics"]["artifactSelectors"] == [{"outputArtifactKey": "metrics", "producerSubtask": "evaluate"}]
    assert selectors["model"]["artifactSelectors"] == [{"outputArtifactKey": "model", "producerSubtask": "export"}]
    components_ = ir["components"]
    assert components_["comp-evaluate"]["outputDefinitions"]["artifacts"]["metrics"]["artifactType"][
        "schemaTitle"] == "system.Metrics"
    assert components_["comp-export"]["outputDefinitions"]["artifacts"]["model"]["artifactType"][
        "schemaTitle"] == "system.Model"
    validate_outputs = components_["comp-validate-dataset"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in validate_outputs.items()} == {"num_shards": "NUMBER_INTEGER",
                                                                           "sample": "STRING"}


def test_platform_settings(ir: dict) -> None:
    """GPU, node selector, tolerations and /dev/shm on the evaluation only; the launch step
    only talks to the API server: no accelerator, no node constraints."""
    executors = ir["deploymentSpec"]["executors"]
    resources = executors["exec-evaluate"]["container"]["resources"]["accelerator"]
    assert resources == {"resourceCount": "{{$.inputs.parameters['pipelinechannel--eval_gpus']}}",
                         "resourceType": "{{$.inputs.parameters['pipelinechannel--eval_accelerator']}}"}
    eval_inputs = ir["root"]["dag"]["tasks"]["evaluate"]["inputs"]["parameters"]
    assert _source(eval_inputs["pipelinechannel--eval_gpus"]) == ("input", "eval_gpus")
    assert _source(eval_inputs["pipelinechannel--eval_accelerator"]) == ("input", "eval_accelerator")
    for name in ("exec-launch-and-wait", "exec-validate-dataset", "exec-export"):
        assert "resources" not in executors[name]["container"], name

    platform = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(platform) == {"exec-evaluate"}
    evaluate = platform["exec-evaluate"]
    assert evaluate["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": EVAL_SHM_SIZE,
                                           "volumeName": "dshm"}]
    assert evaluate["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "eval_node_selector"}}
    assert evaluate["tolerations"] == [GPU_TOLERATION,
                                       {"tolerationJson": {"componentInputParameter": "eval_tolerations"}}]


def test_steps_run_on_the_trainer_image_without_pip(ir: dict) -> None:
    for name, executor in ir["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == components.IMAGE, name
        command = " ".join(container["command"])
        assert "pip install" not in command, name  # packages_to_install=[], install_kfp_package=False
        assert "kfp.dsl.executor_main" in command, name


def test_caching_is_off_for_every_task(ir: dict) -> None:
    """Inputs are URLs whose contents change: a cached result would skip training or scoring."""
    for name, task in ir["root"]["dag"]["tasks"].items():
        assert not task["cachingOptions"].get("enableCache", False), name


def test_launch_step_source_is_self_contained(ir: dict) -> None:
    """KFP runs a component from its copied source: helpers come along, constants are spelled out."""
    source = ir["deploymentSpec"]["executors"]["exec-launch-and-wait"]["container"]["command"][-1]
    for helper in ("sam_release_name", "sam_job_spec", "sam_checkpoint_url", "sam_submit_or_adopt", "sam_delete_job",
                   "sam_failure", "sam_local_command", "launch_and_wait"):
        assert f"\ndef {helper}(" in source, helper
    assert f'"{components.RUN_ID_ANNOTATION}"' in source
    compile(source, "ephemeral_component.py", "exec")


def test_preset_values_are_the_charts(ir: dict) -> None:
    """The presets compiled into the pipeline are the chart's, as Helm reads them (``-f``)."""
    from tests.k8s.render import load_preset, preset_names

    constant = ir["root"]["dag"]["tasks"]["launch-and-wait"]["inputs"]["parameters"]["preset_values"]
    presets = json.loads(constant["runtimeValue"]["constant"])
    assert sorted(presets) == preset_names()
    for name in presets:
        assert presets[name] == load_preset(name), name
    assert presets["tiny-cpu"]["nodes"] == 2 and isinstance(presets["tiny-cpu"]["nodes"], int)


def test_local_variant_differs_only_in_the_launch_step(tmp_path: Path, ir: dict) -> None:
    local = compiled(tmp_path, sam_train_pipeline_local)
    assert local["root"]["inputDefinitions"] == ir["root"]["inputDefinitions"]
    assert local["root"]["outputDefinitions"] == ir["root"]["outputDefinitions"]
    rename = {"train-local": "launch-and-wait"}
    tasks = {rename.get(k, k): v for k, v in local["root"]["dag"]["tasks"].items()}
    assert set(tasks) == set(ir["root"]["dag"]["tasks"])
    for name, task in tasks.items():
        theirs = ir["root"]["dag"]["tasks"][name]
        assert [rename.get(d, d) for d in task.get("dependentTasks", [])] == theirs.get("dependentTasks", []), name
        assert set(task["inputs"]["parameters"]) == set(theirs["inputs"]["parameters"]), name
    assert local["platforms"] == ir["platforms"]


def _compile_in_subprocess(out: Path, image: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SAM_TRAIN_IMAGE"}
    if image is not None:
        env["SAM_TRAIN_IMAGE"] = image
    subprocess.run([sys.executable, "-m", "pipelines.sam_pipeline", "--out", str(out)], cwd=REPO_ROOT, env=env,
                   check=True, capture_output=True, text=True, timeout=120)


def test_golden_yaml_is_up_to_date(tmp_path: Path) -> None:
    """``pipelines/sam_pipeline.yaml`` is what compiling gives now (regenerate: make pipeline)."""
    out = tmp_path / "fresh.yaml"
    _compile_in_subprocess(out, image=None)
    assert GOLDEN.exists(), "pipelines/sam_pipeline.yaml is missing: python -m pipelines.sam_pipeline"
    assert out.read_text() == GOLDEN.read_text(), (
        "pipelines/sam_pipeline.yaml is stale: regenerate it with python -m pipelines.sam_pipeline "
        "--out pipelines/sam_pipeline.yaml")


def test_image_comes_from_the_environment_at_compile_time(tmp_path: Path) -> None:
    out = tmp_path / "custom.yaml"
    _compile_in_subprocess(out, image="registry.example.com/team/sam-train:1.2.3")
    doc = load_ir(out.read_text())
    images = {e["container"]["image"] for e in doc["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/team/sam-train:1.2.3"}
    # The job runs the steps' image unless the run says otherwise.
    assert doc["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == \
        "registry.example.com/team/sam-train:1.2.3"


def test_compile_pipeline_writes_the_file(tmp_path: Path) -> None:
    out = compile_pipeline(str(tmp_path / "p.yaml"))
    assert load_ir(Path(out).read_text())["pipelineInfo"]["name"] == "sam-train"
