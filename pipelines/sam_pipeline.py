"""The SAM training pipeline (KFP v2): validate -> launch and wait -> evaluate -> export.

Compile it to IR YAML (what the KFP UI uploads and :mod:`pipelines.submit` sends)::

    python -m pipelines.sam_pipeline --out pipelines/sam_pipeline.yaml
    SAM_TRAIN_IMAGE=registry.example.com/sam-train:0.1.0 python -m pipelines.sam_pipeline --out my.yaml

The DAG (task names as in the IR)::

    validate-dataset (data_shards) --+
                                     +--> launch-and-wait --> evaluate --> export
    validate-dataset-2 (eval_shards)-+

Both shard specs are checked before any GPU is asked for. ``launch-and-wait`` creates the
PyTorchJob of ``helm install -f charts/sam-train/presets/<preset>.yaml`` with the other
inputs layered on top (:func:`pipelines.components.sam_job_spec`) and waits for it;
``evaluate`` scores the newest complete checkpoint (a ``Metrics`` artifact) on a GPU node
(``eval_*`` inputs: accelerator, node selector, tolerations; a memory-backed ``/dev/shm``);
``export`` writes that same checkpoint as the official ``.pth`` (a ``Model`` artifact).
The pipeline's outputs are those two artifacts.

The chart's presets (``charts/sam-train/presets/*.yaml``) are read at compile time and passed
to the launch step as a constant (``preset_values``), so the compiled pipeline does not need
the chart at run time and always uses the presets of the same checkout.

:func:`build_pipeline` takes the launch component: :data:`sam_train_pipeline` uses
:func:`~pipelines.components.launch_and_wait` (a cluster); :data:`sam_train_pipeline_local`
swaps in :func:`~pipelines.components.train_local` (same inputs and output; runs the job's
pod command as local processes) for ``kfp.local``, which has no cluster to create a
PyTorchJob in. Every other step and setting is the same.
"""


import argparse
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import yaml
from kfp import compiler, dsl, kubernetes
from kfp.dsl import Metrics, Model

from pipelines.components import (
    IMAGE,
    evaluate,
    export,
    launch_and_wait,
    train_local,
    validate_dataset,
)

#: The chart presets shipped in this checkout.
PRESETS_DIR = Path(__file__).resolve().parents[1] / "charts" / "sam-train" / "presets"
#: Size limit of the evaluation pod's memory-backed /dev/shm (kfp-kubernetes takes it only
#: as a constant; it counts against the pod's memory).
EVAL_SHM_SIZE = "16Gi"
#: GPU node pools are tainted ``nvidia.com/gpu`` (GKE adds the taint; EKS teams do): the
#: evaluation pod always tolerates it (a constant: a dict default of a pipeline input would
#: make the compiled YAML's header comment change order from run to run).
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: Seconds the launch step waits for the job by default: a week (ViT-H on 256 A100s takes ~68 h).
DEFAULT_TIMEOUT_S = 7 * 24 * 3600


def chart_presets(directory: Path = PRESETS_DIR) -> dict[str, dict]:
    """``{preset name: values}`` of every ``<name>.yaml`` in the chart's presets directory.

    Raises:
        FileNotFoundError: the directory has no presets (the pipeline is compiled from a checkout).
    """
    presets = {path.stem: yaml.safe_load(path.read_text()) or {} for path in sorted(directory.glob("*.yaml"))}
    if not presets:
        raise FileNotFoundError(f"no chart presets in {directory}: compile the pipeline from a checkout of the repo")
    return presets


def build_pipeline(launch_component: Callable, name: str = "sam-train") -> Callable:
    """The pipeline with ``launch_component`` as its training step.

    ``launch_component`` takes the inputs of :func:`pipelines.components.launch_and_wait`
    (the job's values, names, ``timeout_s``, ``run_id``) and returns the checkpoint root URL.
    """
    # JSON text, not a dict constant: KFP would turn its integers into floats (see sam_job_spec).
    presets = json.dumps(chart_presets(), sort_keys=True, separators=(",", ":"))

    @dsl.pipeline(name=name, description="SAM training: validate the SA-1B shards, train as a Kubeflow "
                  "PyTorchJob, evaluate mIoU, export the official .pth.")
    def sam_train(
        data_shards: str,
        run_dir: str,
        eval_shards: str,
        preset: str,
        nodes: int = 0,
        gpus_per_node: int = -1,
        node_pool: str = "",
        image: str = IMAGE,
        values_json: str = "",
        set_values: list = [],
        job_name: str = "",
        namespace: str = "",
        timeout_s: int = DEFAULT_TIMEOUT_S,
        eval_images: int = 500,
        eval_max_masks: int = 64,
        eval_accelerator: str = "nvidia.com/gpu",
        eval_gpus: int = 1,
        eval_node_selector: dict = {},
        eval_tolerations: list = [],
    ) -> NamedTuple("Outputs", [("metrics", Metrics), ("model", Model)]):
        """SAM training run.

        Args:
            data_shards: training shards (``training.dataShards``): a glob, a .txt list, a comma list.
            run_dir: ``training.runDir`` (object storage: gs://, s3://); checkpoints under it.
            eval_shards: held-out shards for the final evaluation (checked before training).
            preset: a chart preset (``vit-h-a100``, ``tiny-cpu``, ...; ``charts/sam-train/presets``),
                or '' for the chart's defaults.
            nodes: pods of the job; 0 keeps the preset's.
            gpus_per_node: GPUs per pod; -1 keeps the preset's, 0 trains on CPU.
            node_pool: ``nodePool.preset`` (``gke-a2-ultragpu``, ``eks-p4d``, ...); '' keeps the preset's.
            image: the trainer image of the job (``repo:tag`` or ``repo@sha256:...``).
            values_json: more chart values as a JSON object (a values tree, like ``-f``), over the preset.
            set_values: Helm ``--set`` expressions (``training.config.optim.max_iters=90000``), over
                ``values_json``.
            job_name: the release/job name; '' names it ``sam-train-<run id prefix>``.
            namespace: where the job goes; '' is the launch step's own namespace.
            timeout_s: seconds to wait for the job (0 = no limit); then it is deleted and the run fails.
            eval_images: images of ``eval_shards`` to score (0 = all).
            eval_max_masks: masks scored per image.
            eval_accelerator: the evaluation pod's accelerator resource.
            eval_gpus: accelerators of the evaluation pod (0 = CPU).
            eval_node_selector: nodeSelector of the evaluation pod.
            eval_tolerations: more tolerations of the evaluation pod (it always tolerates the
                ``nvidia.com/gpu`` taint of GPU pools).
        """
        check_train = validate_dataset(data_shards=data_shards)
        check_eval = validate_dataset(data_shards=eval_shards)
        train = launch_component(
            data_shards=data_shards, run_dir=run_dir, preset=preset, preset_values=presets, values_json=values_json,
            set_values=set_values, nodes=nodes, gpus_per_node=gpus_per_node, node_pool=node_pool, image=image,
            job_name=job_name, namespace=namespace, timeout_s=timeout_s, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).after(check_train, check_eval)
        score = evaluate(checkpoint_url=train.output, eval_shards=eval_shards, eval_images=eval_images,
                         max_masks=eval_max_masks)
        score.set_accelerator_type(eval_accelerator).set_accelerator_limit(eval_gpus)
        kubernetes.add_node_selector_json(score, eval_node_selector)
        kubernetes.add_toleration(score, **GPU_TOLERATION)
        kubernetes.add_toleration_json(score, eval_tolerations)
        kubernetes.empty_dir_mount(score, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=EVAL_SHM_SIZE)
        # The export step exports the checkpoint step the evaluation scored (its output).
        pth = export(checkpoint_url=score.outputs["Output"])
        for task in (check_train, check_eval, train, score, pth):
            # Inputs are URLs whose contents change (new shards, new checkpoints): never reuse a result.
            task.set_caching_options(False)
        outputs = NamedTuple("Outputs", [("metrics", Metrics), ("model", Model)])
        return outputs(metrics=score.outputs["metrics"], model=pth.outputs["model"])

    return sam_train


#: The pipeline: the launch step creates a PyTorchJob (or TrainJob) in the cluster.
sam_train_pipeline = build_pipeline(launch_and_wait)
#: The same pipeline for ``kfp.local``: the launch step runs the job's pod command locally.
sam_train_pipeline_local = build_pipeline(train_local, name="sam-train-local")


def compile_pipeline(out: str, local: bool = False) -> str:
    """Write the IR YAML of the pipeline (or of its local variant) to ``out``; returns ``out``."""
    compiler.Compiler().compile(sam_train_pipeline_local if local else sam_train_pipeline, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.sam_pipeline --out FILE``: compile the pipeline to IR YAML."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.sam_pipeline", description=main.__doc__)
    parser.add_argument("--out", default="pipelines/sam_pipeline.yaml", help="IR YAML to write (default: %(default)s)")
    parser.add_argument("--local", action="store_true",
                        help="compile the kfp.local variant (train_local instead of launch_and_wait)")
    args = parser.parse_args(argv)
    print(f"compiled {compile_pipeline(args.out, args.local)} (steps on image {IMAGE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
