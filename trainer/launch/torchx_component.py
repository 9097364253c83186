"""The TorchX component of the trainer: ``sam_train(...) -> AppDef``.

One role, ``trainer``, with one replica per node; each replica runs the pod command of the
chart, ``python -m trainer.dist ... -m trainer.train --config ... --set ...``, with the
rendezvous flags that TorchX's own schedulers need (``local_cwd``, ``kubernetes``): a single
node rendezvouses on ``localhost:0`` (a free port), several on rank 0's host, whose address the
scheduler puts in the variable named by the ``${rank0_env}`` macro.

The ``pytorchjob`` scheduler (:mod:`trainer.launch.torchx_scheduler`) does not run that
command: it rebuilds the job the Helm chart would make (ConfigMap ``config.toml``, the
operator's ``PET_*`` variables instead of rendezvous flags) from the role (image, replicas,
GPUs, CPU, memory, env, retries) and from the inputs the AppDef has no field for, kept as JSON
in ``AppDef.metadata[METADATA_KEY]``:

- ``config``: the preset or TOML file (``--config``);
- ``set``: every trainer override in order, the named ones (``data_shards``, ``run_dir``,
  ``checkpoint_url``) first;
- ``values``: the chart values that no AppDef field holds (node pool, gang, queues, service
  account, ``/dev/shm`` size, CPU processes per node, ``training.maxRestarts``).

Usage::

    torchx run -s local_cwd trainer/launch/torchx_component.py:sam_train --config tiny_cpu \\
        --nproc_per_node 0 --cpu_procs 2 --data_shards 'data/train/sa_*.tar' --run_dir runs/tx
    torchx run -s pytorchjob --scheduler_args namespace=ml sam_train --image REGISTRY/sam-train:0.1.0 \\
        --nodes 32 --node_pool gke-a2-ultragpu --data_shards 'gs://b/sa1b/sa_*.tar' --run_dir gs://b/runs/h1 \\
        --set model.encoder_init=mae,model.mae_checkpoint=gs://b/mae_pretrain_vit_huge.pth

TorchX loads this file by path too (``file.py:sam_train``), executing its source outside the
package: it imports only absolute names, and its annotations stay real objects (no
``from __future__ import annotations``) because TorchX reads them to parse the arguments, with
``typing.List``/``Dict``/``Optional`` (its linter accepts only those spellings).
"""

import json
import re
from typing import Dict, List, Optional

from torchx import specs

#: AppDef.metadata key of the JSON job-builder inputs (see the module docstring).
METADATA_KEY = "sam-train/job"
#: Version of that JSON document; the scheduler refuses versions it does not know.
METADATA_VERSION = 1
#: The role's name (one role: every node runs the same command).
ROLE_NAME = "trainer"
#: A trainer override: ``section.key=value`` (``section.sub.key`` too).
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")


def join_overrides(items: Optional[List[str]]) -> List[str]:
    """The ``--set`` overrides, with the pieces TorchX split at commas put back together.

    TorchX parses a ``List[str]`` argument as one comma-separated string, so
    ``--set optim.milestones=50,60,train.log_every=1`` arrives as
    ``["optim.milestones=50", "60", "train.log_every=1"]``. A piece that does not start with
    ``section.key=`` continues the previous override.

    Raises:
        ValueError: the first piece is not an override.
    """
    joined: List[str] = []
    for piece in items or []:
        if _OVERRIDE.match(piece):
            joined.append(piece)
        elif joined:
            joined[-1] = f"{joined[-1]},{piece}"
        else:
            raise ValueError(f"--set {piece!r}: expected section.key=value, e.g. optim.max_iters=1000")
    return joined


def mib_quantity(mib: int) -> str:
    """A Kubernetes memory quantity for ``mib`` MiB: ``128Gi`` when whole GiB, else ``1536Mi``."""
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def sam_train(
    config: str = "vit_h",
    set: Optional[List[str]] = None,
    data_shards: str = "",
    run_dir: str = "",
    checkpoint_url: str = "",
    nodes: int = 1,
    nproc_per_node: int = 8,
    cpu_procs: int = 1,
    image: str = "ghcr.io/sam-k8s/sam-train",
    name: str = "sam-train",
    cpu: int = 8,
    memMB: int = 131072,
    shm_size: str = "16Gi",
    node_pool: str = "none",
    gang: str = "none",
    queue: str = "",
    kueue_queue: str = "",
    service_account: str = "",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 20,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Train SAM with the sam-k8s trainer (python -m trainer.dist -m trainer.train), one replica per node.

    With -s local_cwd (or kubernetes) each replica runs torchrun with rendezvous flags; with
    -s pytorchjob the job is the Helm chart's PyTorchJob (config in a ConfigMap, the operator's
    PET_* variables, node pool, gang scheduling), built by trainer.launch.build.

    Args:
        config: trainer preset (tiny_cpu, vit_b, vit_l, vit_h) or TOML config file (path or URL),
            as `sam-train train --config`
        set: trainer overrides section.key=value, comma-separated, e.g.
            optim.max_iters=1000,optim.milestones=600,900 (a value may hold commas); give all in
            one --set: a repeated --set replaces the earlier one
        data_shards: data.shards: SA-1B tar shards (glob, .txt list or comma list); required
            unless --set or the config file gives it
        run_dir: train.run_dir: logs, metrics.jsonl and checkpoints (object storage on a cluster)
        checkpoint_url: checkpoint.url (empty: <run_dir>/checkpoints)
        nodes: nodes (replicas); each runs nproc_per_node training processes
        nproc_per_node: GPUs per node, one training process each; 0 runs on CPU with cpu_procs
            processes (gloo)
        cpu_procs: training processes per node when nproc_per_node is 0
        image: trainer image, repository[:tag] or repository@sha256:digest (no tag: the chart's
            appVersion); local_cwd ignores it
        name: job name; pytorchjob: the release name, objects are called <name>, or
            <name>-sam-train when name lacks sam-train
        cpu: CPU request of each node's pod (cores)
        memMB: memory request and limit of each node's pod in MiB (the memory-backed /dev/shm
            counts against it)
        shm_size: size limit of the memory-backed /dev/shm (pytorchjob)
        node_pool: node pool preset (pytorchjob): none, gke-a2-highgpu, gke-a2-ultragpu,
            gke-a3-highgpu, eks-p4d, eks-p4de, eks-p5, gpu-operator-a100-40gb,
            gpu-operator-a100-80gb, gpu-operator-h100-80gb
        gang: gang scheduling (pytorchjob): none, volcano or scheduler-plugins
        queue: Volcano queue (pytorchjob, with gang volcano)
        kueue_queue: Kueue LocalQueue (pytorchjob: the kueue.x-k8s.io/queue-name label)
        service_account: existing ServiceAccount of the pods (pytorchjob; empty: the chart
            creates one named like the job)
        env: extra environment variables of the trainer, e.g. NCCL_DEBUG=INFO,FOO=bar
        max_retries: pod failures before the job fails (pytorchjob: runPolicy.backoffLimit)
        max_restarts: python -m trainer.dist --max-restarts: worker restarts inside a pod for
            retryable failures
        rdzv_port: c10d rendezvous port on rank 0's host when nodes > 1 (local_cwd, kubernetes;
            a PyTorchJob uses the operator's)
    """
    overrides = join_overrides(set)
    _check(nodes >= 1, f"--nodes must be at least 1, got {nodes}")
    _check(nproc_per_node >= 0, f"--nproc_per_node must be 0 (CPU) or more, got {nproc_per_node}")
    _check(cpu_procs >= 1, f"--cpu_procs must be at least 1, got {cpu_procs}")
    _check(max_restarts >= 0, f"--max_restarts must be 0 or more, got {max_restarts}")
    _check(bool(config), "--config must name a preset or a TOML file")
    named = [f"data.shards={data_shards}" if data_shards else "",
             f"train.run_dir={run_dir}" if run_dir else "",
             f"checkpoint.url={checkpoint_url}" if checkpoint_url else ""]
    # Named settings first: a later --set of the same key wins, in both launch paths.
    overrides = [item for item in named if item] + overrides
    procs = nproc_per_node if nproc_per_node > 0 else cpu_procs

    dist = ["-m", "trainer.dist"] + (["--max-restarts", str(max_restarts)] if max_restarts else [])
    if nodes == 1:
        rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
    else:
        # "$$" is TorchX's escape for "$": the scheduler fills in the variable's name.
        rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}"]
    train = ["-m", "trainer.train", "--config", config]
    for item in overrides:
        train += ["--set", item]
    args = dist + ["--nnodes", str(nodes), "--nproc-per-node", str(procs)] + rdzv + \
        ["--rdzv-id", specs.macros.app_id] + train
    entrypoint = "python"
    if nodes > 1:
        # Rank 0's host is known only in the replica's environment: let a shell expand it.
        entrypoint, args = "bash", ["-c", " ".join(["python"] + [_shell_quote(a) for a in args])]

    values = {
        "cpuProcessesPerNode": cpu_procs,
        "shmSize": shm_size,
        "nodePool": {"preset": node_pool},
        "scheduling": {"gang": gang, "queue": queue, "kueueQueue": kueue_queue},
        "training": {"maxRestarts": max_restarts},
    }
    if service_account:
        values["serviceAccount"] = {"create": False, "name": service_account}
    job = {"version": METADATA_VERSION, "config": config, "set": overrides, "values": values}
    role = specs.Role(
        name=ROLE_NAME,
        image=image,
        entrypoint=entrypoint,
        args=args,
        env=dict(env or {}),
        num_replicas=nodes,
        max_retries=max_retries,
        resource=specs.Resource(cpu=cpu, gpu=nproc_per_node, memMB=memMB),
        port_map={"c10d": rdzv_port},
    )
    return specs.AppDef(name=name, roles=[role], metadata={METADATA_KEY: json.dumps(job, sort_keys=True)})


def _shell_quote(arg: str) -> str:
    """Quote ``arg`` for bash, except the rank-0 host reference, which must expand."""
    if arg.startswith("$${") and ":=localhost}:" in arg:
        return f'"{arg}"'
    if re.fullmatch(r"[A-Za-z0-9_./:=,@%+-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"
