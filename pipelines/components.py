"""The steps of the SAM training pipeline, as KFP v2 lightweight Python components.

Every component runs on the trainer image (:data:`IMAGE`), which holds the ``trainer``
package with its dependencies and kfp (see ``pipelines/README.md``), so
``packages_to_install=[]`` and ``install_kfp_package=False``: a step's pod needs no PyPI.
KFP copies each function's source (plus the helpers named in ``additional_funcs``, from
:mod:`pipelines.step_helpers`) into the pipeline IR and runs it there, so the bodies import
what they use themselves and call into the trainer's library; the logic lives there, the
components are adapters.

Steps:

- :func:`validate_dataset`: list the shards with the trainer's own listing and checks
  (``trainer.data.shards.list_shards``), decode one sample of the first shard
  (``trainer.data.sa1b``); an empty or unreadable dataset fails with one clear line.
- :func:`launch_and_wait`: the job of ``helm install`` with the same values
  (``trainer.launch.build_objects``), created through the Kubernetes API
  (``trainer.launch.client``) and watched (``trainer.launch.watch.Watcher``); a Failed job
  fails the step with its master's log tail; SIGTERM (the run was cancelled) deletes the job.
- :func:`train_local`: the stand-in for :func:`launch_and_wait` where no cluster exists
  (``kfp.local``): the same objects are built, and the job's pod command runs here.
- :func:`evaluate`: point and box mIoU (``trainer.evaluate``) as a KFP ``Metrics`` artifact.
- :func:`export`: the official ``segment_anything`` ``.pth`` as a KFP ``Model`` artifact.

Compile-time settings (environment variables read when this module is imported):
``SAM_TRAIN_IMAGE`` (the components' image, default :data:`DEFAULT_IMAGE`).
"""

import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from pipelines.step_helpers import (
    RUN_ID_ANNOTATION,
    sam_checkpoint_url,
    sam_delete_job,
    sam_failure,
    sam_job_spec,
    sam_local_command,
    sam_release_name,
    sam_submit_or_adopt,
)

#: The published trainer image of this version (the chart's ``image.repository:appVersion``).
DEFAULT_IMAGE = "ghcr.io/sam-k8s/sam-train:0.1.0"
#: The image every step runs on; KFP fixes it when the component is defined, so it is read
#: from ``SAM_TRAIN_IMAGE`` at import (compile) time.
IMAGE = os.environ.get("SAM_TRAIN_IMAGE", DEFAULT_IMAGE)

__all__ = ["DEFAULT_IMAGE", "IMAGE", "RUN_ID_ANNOTATION", "evaluate", "export", "launch_and_wait", "train_local",
           "validate_dataset"]


# --------------------------------------------------------------------------- validate


@dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False)
def validate_dataset(data_shards: str, max_pairs: int = 8) -> NamedTuple("Outputs", [("num_shards", int),
                                                                                      ("sample", str)]):
    """List the shards of ``data_shards`` and decode one sample of the first shard.

    ``data_shards`` is what ``training.dataShards`` takes: a glob, a ``.txt`` list of URLs,
    a comma list. The listing is the trainer's (every glob matches, every listed file
    exists, credentials resolve, each bucket answers); then up to ``max_pairs`` image/JSON
    pairs of the first shard are read until one decodes as an SA-1B sample (JPEG, RLE masks).

    Returns:
        num_shards: how many shard files the spec names.
        sample: one line describing the decoded sample.

    Raises:
        ValueError: one line naming the problem: no shards, a missing file, a shard that is
            not a tar, no decodable sample in the first ``max_pairs`` pairs.
    """
    import itertools
    import logging
    from collections import namedtuple

    from trainer.data.config import DataConfig
    from trainer.data.sa1b import RawPair, SkipSample, decode_sample, iter_shard
    from trainer.data.shards import ShardListError, list_shards

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        urls = list_shards(data_shards, setting="data_shards")
    except ShardListError as err:
        raise ValueError(f"dataset check failed: {err}") from None
    print(f"data_shards {data_shards!r}: {len(urls)} shard(s), first {urls[0]}, last {urls[-1]}")
    cfg = DataConfig(shards=data_shards, num_workers=0)  # the paper's input size (1024)
    problems: list[str] = []
    for event in itertools.islice(iter_shard(urls[0], retries=2, backoff_s=1.0), max_pairs):
        if not isinstance(event, RawPair):  # a tar-level problem, or half a pair
            problems.append(f"{event.reason}: {event.detail}")
            continue
        try:
            sample = decode_sample(event, cfg, epoch=0)
        except SkipSample as err:
            problems.append(f"{event.stem}: {err}")
            continue
        line = (f"{urls[0]}: {event.stem}: {sample.original_size[0]}x{sample.original_size[1]} JPEG, "
                f"{len(sample.masks)} masks decoded")
        for problem in problems:  # bad pairs before a good one: the trainer skips them too
            print(f"warning: skipped in the first shard: {problem}")
        print(f"dataset OK: {line}")
        return namedtuple("Outputs", ["num_shards", "sample"])(len(urls), line)
    found = "; ".join(problems[:3]) if problems else "it holds no image/JSON pair"
    raise ValueError(f"dataset check failed: data_shards {data_shards!r}: no readable SA-1B sample in the "
                     f"first shard {urls[0]}: {found}")


# --------------------------------------------------------------------------- launch

#: The helpers KFP copies along with the launch components (they run without this package).
_LAUNCH_HELPERS = [sam_release_name, sam_job_spec, sam_checkpoint_url, sam_submit_or_adopt, sam_delete_job,
                   sam_failure, sam_local_command]


@dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False, additional_funcs=_LAUNCH_HELPERS)
def launch_and_wait(data_shards: str, run_dir: str, preset: str, preset_values: str, values_json: str,
                    set_values: list, nodes: int, gpus_per_node: int, node_pool: str, image: str,
                    job_name: str, namespace: str, timeout_s: int, run_id: str,
                    poll_interval_s: int = 30, log_lines: int = 100) -> str:
    """Create the training job through the Kubernetes API and wait for it; returns the checkpoint URL.

    The objects are those of ``helm install`` with the same values (ConfigMap, ServiceAccount,
    PyTorchJob or TrainJob; :func:`~pipelines.step_helpers.sam_job_spec`), named
    :func:`~pipelines.step_helpers.sam_release_name`, in ``namespace`` ('' = this pod's). The
    step talks to the API as the run's service account (the chart's ``launcherRbac``). The job
    carries the run id: a retried step of the same run adopts it; a job of that name from
    another run is an error (:func:`~pipelines.step_helpers.sam_submit_or_adopt`).

    Ends:
        Succeeded: returns the job's checkpoint root (``training.checkpointUrl`` or
            ``<runDir>/checkpoints``).
        Failed: raises RuntimeError with the job's reason and the last ``log_lines`` lines of
            the master's log; the job is kept for inspection.
        ``timeout_s`` passed (0 = no limit): the job is deleted (nobody waits for it any more;
            its checkpoints stay, a new run resumes from them) and RuntimeError is raised.
        SIGTERM or SIGINT (KFP cancels a run by terminating its pods): the job is deleted, then
            RuntimeError is raised.
    """
    import signal

    from trainer.launch import build_objects, job_object
    from trainer.launch.client import LaunchError, connect
    from trainer.launch.watch import State, Watcher

    def interrupted(signum, frame):  # noqa: ARG001 - the signal handler signature
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        client = connect(namespace=namespace or None)
        spec = sam_job_spec(preset, preset_values, values_json, set_values, data_shards, run_dir, nodes, gpus_per_node,
                            node_pool, image, sam_release_name(job_name, run_id), client.namespace)
        objects = build_objects(spec)
        job, ref = job_object(objects), None
        try:
            ref = sam_submit_or_adopt(client, objects, run_id)
            result = Watcher(client, ref, interval=poll_interval_s, timeout=timeout_s or None,
                             log_lines=log_lines).run()
        except KeyboardInterrupt as stop:
            if ref is None:  # stopped while submitting: the job may exist already
                try:
                    ref = client.find_job(job["metadata"]["name"], namespace=spec.namespace)
                except LaunchError:
                    pass
            if ref is not None:
                sam_delete_job(client, ref, str(stop or "SIGINT"))
            raise RuntimeError(f"cancelled ({stop or 'SIGINT'}): deleted {job['kind']} "
                               f"{spec.namespace}/{job['metadata']['name']}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result.timed_out:
        sam_delete_job(client, ref, "the timeout")
        raise RuntimeError(f"{ref.describe()} was still {result.status.state.value} after timeout_s={timeout_s}: "
                           "deleted it")
    if result.status.state is not State.SUCCEEDED:
        raise RuntimeError(sam_failure(client, ref, result.status, log_lines))
    url = sam_checkpoint_url(spec)
    print(f"{ref.describe()} Succeeded; checkpoints: {url}")
    return url


@dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False, additional_funcs=_LAUNCH_HELPERS)
def train_local(data_shards: str, run_dir: str, preset: str, preset_values: str, values_json: str,
                set_values: list, nodes: int, gpus_per_node: int, node_pool: str, image: str,
                job_name: str, namespace: str, timeout_s: int, run_id: str) -> str:
    """The launch step where no cluster exists (``kfp.local``): the job's pod command, run here.

    Same inputs and output as :func:`launch_and_wait`. The objects are built the same way;
    then, instead of creating them, this writes the ConfigMap's ``config.toml`` to a
    temporary directory and runs the training container's command (``python -m trainer.dist
    ... -m trainer.train --config <that file>`` with the container's env values;
    :func:`~pipelines.step_helpers.sam_local_command`) as local processes: one standalone
    node with ``nodes x processes-per-node`` processes, i.e. the job's world size and global
    batch. ``--set metrics.port=0`` turns the Prometheus exporter off (nothing scrapes it;
    fixed ports would collide). ``image``, ``node_pool``, ``namespace`` and the pod settings
    have no local meaning and only shape the objects. ``timeout_s`` (0 = none) bounds the run.

    Raises:
        RuntimeError: training exited non-zero (with the last lines of its output) or timed out.
    """
    import os
    import subprocess
    import tempfile
    from collections import deque

    from trainer.launch import build_objects, job_object

    spec = sam_job_spec(preset, preset_values, values_json, set_values, data_shards, run_dir, nodes, gpus_per_node,
                        node_pool, image, sam_release_name(job_name, run_id), namespace or "default")
    objects = build_objects(spec)
    job = job_object(objects)
    procs = spec.nodes * spec.procs_per_node
    tail: deque = deque(maxlen=40)
    with tempfile.TemporaryDirectory(prefix="sam-train-local-") as tmp:
        config_path = os.path.join(tmp, "config.toml")
        with open(config_path, "w") as f:
            f.write(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["config.toml"])
        argv, env = sam_local_command(objects, config_path, procs)
        print(f"{job['kind']} {job['metadata']['name']} run locally ({spec.nodes} node(s) x "
              f"{spec.procs_per_node} process(es) as {procs} local processes): {' '.join(argv)}", flush=True)
        with subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            try:
                for line in proc.stdout:
                    print(line, end="", flush=True)
                    tail.append(line)
                code = proc.wait(timeout=timeout_s or None)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError(f"local training ran past timeout_s={timeout_s}") from None
    if code != 0:
        raise RuntimeError(f"local training exited {code}; last lines:\n{''.join(tail).rstrip()}")
    return sam_checkpoint_url(spec)


# --------------------------------------------------------------------------- evaluate, export


@dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False)
def evaluate(checkpoint_url: str, eval_shards: str, eval_images: int, metrics: Output[Metrics],
             max_masks: int = 64) -> str:
    """Point and box mIoU of the newest complete checkpoint under ``checkpoint_url``.

    The trainer's evaluation, as ``sam-train eval`` runs it (``trainer.evaluate``,
    SAM_RECIPE.md §6: 1, 2, 3, 5, 9 clicks and a box), on the first ``eval_images`` images
    of ``eval_shards`` (0 = all), with ``max_masks`` masks per image; on the GPU when the
    pod has one. Every mIoU key (``point1_conf``, ``point1_oracle``, ``point2``, ``point3``,
    ``point5``, ``point9``, ``box``) is logged to ``metrics``, with ``masks``, ``images`` and
    ``skipped``.

    Returns:
        The URL of the checkpoint step that was scored (the export step exports that one).

    Raises:
        RuntimeError: no complete checkpoint, an unknown model, bad shards, or no mask scored.
    """
    import logging

    import torch

    from trainer.cli import resolve_weights
    from trainer.config import ConfigError
    from trainer.evaluate import eval_data_config, evaluate as score, iter_eval_batches
    from trainer.model import build_sam, read_state_dict
    from trainer.model.build import guess_variant

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        step_url = resolve_weights(checkpoint_url)
    except SystemExit as err:  # the CLI helper's way of saying "no complete checkpoint"
        raise RuntimeError(str(err.code).removeprefix("error: ")) from None
    state = read_state_dict(step_url)
    variant = guess_variant(state)
    if variant is None:
        raise RuntimeError(f"{step_url}: the weights match no known SAM variant")
    model = build_sam(variant)
    model.load_state_dict(state, strict=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skips: dict = {}
    try:  # what `sam-train eval` does, with errors naming this step's input
        data = eval_data_config(eval_shards, model.image_encoder.img_size, max_masks)
        batches = iter_eval_batches(data, eval_images, 1, skips, setting="eval_shards")
    except (ConfigError, ValueError) as err:
        raise RuntimeError(f"evaluation of {step_url}: {err}") from None
    result = score(model.to(device), batches, device)
    result.skips = dict(sorted(skips.items()))
    if result.num_masks == 0:
        raise RuntimeError(f"no mask scored in eval_shards {eval_shards!r} ({result.num_images} images, "
                           f"skipped: {result.skips or 'none'})")
    print(f"{step_url} ({variant}, {device.type}): {result.num_masks} masks in {result.num_images} images")
    for key, value in result.miou().items():
        print(f"{key:13s} mIoU {value:.4f}")
        metrics.log_metric(key, value)
    metrics.log_metric("masks", result.num_masks)
    metrics.log_metric("images", result.num_images)
    metrics.log_metric("skipped", sum(result.skips.values()))
    metrics.metadata["checkpoint"] = step_url
    metrics.metadata["variant"] = variant
    return step_url


@dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False)
def export(checkpoint_url: str, model: Output[Model]) -> None:
    """Write the weights of ``checkpoint_url`` (a step dir, root or weights file) as the
    official SAM ``.pth`` (a flat fp32 state_dict) to the ``model`` artifact.

    ``segment_anything.sam_model_registry[variant](checkpoint=path)`` loads it for vit_b/l/h
    (metadata ``variant``; ``official_registry`` says whether the registry has an entry).
    """
    from trainer.cli import OFFICIAL_VARIANTS, resolve_weights
    from trainer.model import export_official, read_state_dict
    from trainer.model.build import guess_variant

    try:
        source = resolve_weights(checkpoint_url)
    except SystemExit as err:
        raise RuntimeError(str(err.code).removeprefix("error: ")) from None
    state = read_state_dict(source)
    export_official(state, model.path)
    variant = guess_variant(state) or "unknown"
    model.metadata.update({"variant": variant, "source": source, "framework": "pytorch",
                           "format": "segment_anything state_dict (.pth)",
                           "official_registry": variant in OFFICIAL_VARIANTS})
    print(f"exported {source} ({variant}) -> {model.uri}")
