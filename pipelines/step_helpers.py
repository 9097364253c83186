"""Helpers of the pipeline's steps, copied into the components that list them in ``additional_funcs``.

KFP runs a lightweight component from its source alone, without this module, so these are
plain functions that import what they use (the trainer's library) inside their bodies and
refer to no module-level name; each takes plain values and the trainer's objects. Importing
this module imports neither kfp nor the trainer, so they are testable anywhere.
"""

from typing import Any

#: Annotation carrying the KFP run id on the job the pipeline created: a retried launch step
#: of the same run adopts its job instead of failing on "already exists". (The functions spell
#: it out: a copied function sees no module constants.)
RUN_ID_ANNOTATION = "sam-train/kfp-run-id"



def sam_release_name(job_name: str, run_id: str) -> str:
    """The release (job) name: ``job_name``, or ``sam-train-<first 8 hex digits of the run id>``.

    The chart's full name of a release whose name contains ``sam-train`` is the name itself,
    so the PyTorchJob is called exactly this.
    """
    if job_name:
        return job_name
    digits = "".join(c for c in run_id.lower() if c in "0123456789abcdef")
    if not digits:
        raise ValueError(f"job_name is empty and the run id {run_id!r} has no hex digits to name the job by")
    return f"sam-train-{digits[:8]}"


def sam_job_spec(preset: str, preset_values: str, values_json: str, set_values: list, data_shards: str,
                 run_dir: str, nodes: int, gpus_per_node: int, node_pool: str, image: str,
                 name: str, namespace: str):
    """The :class:`trainer.launch.spec.JobSpec` of the pipeline's inputs.

    Layers, like ``helm install -f presets/<preset>.yaml -f values.yaml --set ...``, then the
    typed pipeline inputs on top: ``data_shards``, ``run_dir`` always; ``nodes`` when > 0,
    ``gpus_per_node`` when >= 0, ``node_pool`` and ``image`` when not empty. The typed inputs
    win so that the job trains on exactly the data the validate step checked.

    ``preset_values`` (``{name: values}``) and ``values_json`` (a values tree) are JSON text,
    not KFP ``dict`` parameters: those travel as protobuf Structs, which turn every integer
    into a float (``nodes: 2.0``), and the chart's schema wants integers.

    Raises:
        ValueError: an unknown preset, JSON that is not an object, or a value the chart would
            refuse (SpecError, naming the key).
    """
    import json

    from trainer.launch.setvalues import deep_merge, parse_set
    from trainer.launch.spec import JobSpec

    presets = json.loads(preset_values or "{}")
    if preset and preset not in presets:
        raise ValueError(f"preset {preset!r} is not a chart preset; choose one of {sorted(presets)} "
                         "(charts/sam-train/presets/), or '' for the chart's defaults")
    try:
        values = json.loads(values_json) if values_json.strip() else {}
    except ValueError as err:
        raise ValueError(f"values_json: not JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"values_json: want a JSON object (a chart values tree), got {type(values).__name__}")
    tree = deep_merge(presets.get(preset, {}) if preset else {}, values)
    for expr in set_values or []:
        parse_set(str(expr), tree, typed=True)
    overlay: dict = {"training": {"dataShards": data_shards, "runDir": run_dir}}
    if nodes > 0:
        overlay["nodes"] = nodes
    if gpus_per_node >= 0:
        overlay["gpusPerNode"] = gpus_per_node
    if node_pool:
        overlay["nodePool"] = {"preset": node_pool}
    if image:
        # docker's reading of a reference: repo[:tag] or repo@sha256:... (the chart takes a
        # sha256: tag as a digest); no tag means latest.
        repository, sep, digest = image.partition("@")
        if sep:
            overlay["image"] = {"repository": repository, "tag": digest}
        elif image.rfind(":") > image.rfind("/"):
            repository, _, tag = image.rpartition(":")
            overlay["image"] = {"repository": repository, "tag": tag}
        else:
            overlay["image"] = {"repository": image, "tag": "latest"}
    return JobSpec.from_values(deep_merge(tree, overlay), name=name, namespace=namespace)


def sam_checkpoint_url(spec) -> str:
    """Where the job writes its checkpoints: ``training.checkpointUrl`` or ``<runDir>/checkpoints``."""
    return spec.training.checkpoint_url or spec.training.run_dir.rstrip("/") + "/checkpoints"


def sam_submit_or_adopt(client: Any, objects: list, run_id: str) -> Any:
    """Create the job's objects and return its ``JobRef``; if the job exists and carries this
    run's id (an earlier attempt of this step), adopt it instead.

    Raises:
        RuntimeError: the job exists and belongs to another run (or to none): left alone.
    """
    from trainer.launch import job_object
    from trainer.launch.client import AlreadyExists

    annotation = "sam-train/kfp-run-id"  # = RUN_ID_ANNOTATION
    job = job_object(objects)
    job["metadata"].setdefault("annotations", {})[annotation] = run_id
    try:
        return client.submit(objects, say=lambda line: print(line, flush=True))
    except AlreadyExists:
        ref = client.find_job(job["metadata"]["name"], namespace=job["metadata"]["namespace"])
        owner = (client.get_job(ref)["metadata"].get("annotations") or {}).get(annotation)
        if owner != run_id:
            raise RuntimeError(f"{ref.describe()} already exists and belongs to run {owner or '(none)'}, not this "
                               f"run {run_id}: set job_name to another name, or delete it ({ref.delete_command()})"
                               ) from None
        print(f"adopting {ref.describe()}, created by an earlier attempt of this step", flush=True)
        return ref


def sam_delete_job(client: Any, ref: Any, why: str) -> None:
    """Delete the job and its ConfigMap/ServiceAccount, ignoring SIGTERM/SIGINT meanwhile (a
    second signal must not stop the clean-up); a failure to delete is printed, not raised."""
    import signal

    from trainer.launch.client import LaunchError

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for line in client.delete(ref):
            print(line, flush=True)
    except LaunchError as err:
        print(f"could not delete {ref.describe()} after {why}: {err}", flush=True)


def sam_failure(client: Any, ref: Any, status: Any, log_lines: int) -> str:
    """``<job> Failed (reason: message); last N lines of pod <master>:`` and that log tail."""
    from trainer.launch.client import LaunchError

    try:
        pod, _, text = client.logs(ref, tail_lines=log_lines)
        tail = f"last {log_lines} lines of pod {pod}:\n{text.rstrip()}"
    except LaunchError as err:  # no pod left (cleanPodPolicy: All), or not scheduled yet
        tail = f"(no log of the master: {err})"
    reason = f" ({status.reason}: {status.message})" if status.reason or status.message else ""
    return f"{ref.describe()} {status.state.value}{reason}; {tail}"


def sam_local_command(objects: list, config_path: str, procs: int) -> tuple:
    """``(argv, env)`` that run the job's training container here: its command with this
    interpreter, ``--standalone --nproc-per-node=<procs>`` for ``trainer.dist``, ``--config
    <config_path>``, the exporter off (``--set metrics.port=0``); env = its ``value`` entries."""
    import os
    import sys

    from trainer.launch import job_object

    job = job_object(objects)
    if job["kind"] == "PyTorchJob":
        replicas = job["spec"]["pytorchReplicaSpecs"]
        pod = (replicas.get("Master") or replicas["Worker"])["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "pytorch")
    else:  # TrainJob: the trainer section carries the node container's command and env
        container = job["spec"]["trainer"]
    command = list(container["command"]) + list(container.get("args") or [])
    argv = []
    for i, arg in enumerate(command):
        if i == 0 and os.path.basename(arg).startswith("python"):
            arg = sys.executable
        elif i > 0 and command[i - 1] == "--config":
            arg = config_path
        argv.append(arg)
        if arg == "trainer.dist" and command[i - 1] == "-m":
            argv += ["--standalone", f"--nproc-per-node={procs}"]
    env = {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}
    return argv + ["--set", "metrics.port=0"], env
