"""Data-parallel scaling: measured 1 vs 2 processes on CPU, and a model of all-reduce vs compute.

**Measured.** ``python -m trainer.dist --standalone --nproc-per-node N -m trainer.train``
on ``tiny_cpu`` (gloo), a few steps each; the median ``time/step_s`` after warm-up from
rank 0's ``metrics.jsonl``. Each rank trains its own batch (weak scaling), so the
efficiency is ``t(1) / t(N)`` (1.0 = free). On a 2-core machine 2 ranks share the cores
with nothing else, so this measures the gloo all-reduce and the synchronisation.

**Model** (32 nodes x 8 GPUs, A100 and H100). Per step DDP all-reduces the gradients once:
``bytes = parameters x 4`` (fp32 buckets) or ``x 2`` (``bf16_compress_hook``). A ring
all-reduce over ``N`` GPUs moves ``2 (N-1)/N x bytes`` through its slowest link plus
``2 (N-1)`` hop latencies. Inside one node that link is NVLink; across nodes, a ring that
visits the 8 GPUs of a node before leaving it crosses each node's NICs once per ring,
and NCCL runs one ring per NIC in parallel, so the bottleneck is the node's total
inter-node bandwidth. DDP overlaps the buckets with backward; what is not hidden behind
``overlap x backward`` (the last bucket is never hidden) adds to the step.

Assumed bandwidths (one direction, per GPU for NVLink, per node for the fabric):

| system | NVLink per GPU | inter-node per node | source |
|---|---|---|---|
| A100 (AWS p4d.24xlarge) | 300 GB/s (NVLink 3, 600 GB/s bidirectional) | 50 GB/s (4 x 100 Gb/s EFA) | NVIDIA A100 datasheet; AWS p4d page |
| H100 (AWS p5.48xlarge) | 450 GB/s (NVLink 4, 900 GB/s bidirectional) | 400 GB/s (32 x 100 Gb/s EFAv2 = 3,200 Gb/s) | NVIDIA H100 datasheet; AWS p5 page |
| H100 (GCP a3-megagpu-8g) | 450 GB/s | 200 GB/s (8 x 200 Gb/s) | GCP A3 Mega docs |

Real NCCL bus bandwidth reaches roughly 70-85% of these; ``EFFICIENCY_OF_LINK`` applies it.

    python benchmarks/scaling.py            # measured (CPU) + model
    python benchmarks/scaling.py --model-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.flops import PEAK_BF16_TFLOPS, train_flops_per_image  # noqa: E402
from trainer.model.build import build_from_spec, spec_for  # noqa: E402
from trainer.prompts import PromptConfig  # noqa: E402

GB = 1e9
#: Fraction of a link's nominal bandwidth NCCL's ring reaches (nccl-tests bus bandwidth).
EFFICIENCY_OF_LINK = 0.8
#: Per-hop latency of a ring step (NCCL over NVLink/EFA: a few microseconds).
HOP_LATENCY_S = 10e-6
#: DDP's default bucket size: the last bucket's all-reduce starts after backward ends.
BUCKET_BYTES = 25 * 2**20
#: Share of a step's compute that is backward (3x forward training: 2/3).
BACKWARD_SHARE = 2.0 / 3.0
GPUS_PER_NODE = 8
NODE_COUNTS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class System:
    """One GPU system of the model: its peak and its links (bytes/s, one direction)."""

    name: str
    gpu: str  # key of PEAK_BF16_TFLOPS
    nvlink_per_gpu: float
    internode_per_node: float


SYSTEMS = (
    System("A100 p4d (4x100 Gb/s EFA)", "A100", 300 * GB, 50 * GB),
    System("H100 p5 (32x100 Gb/s EFA)", "H100 SXM", 450 * GB, 400 * GB),
    System("H100 a3-mega (8x200 Gb/s)", "H100 SXM", 450 * GB, 200 * GB),
)


def parameter_count(variant: str) -> int:
    """Trainable parameters of a SAM variant (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_from_spec(spec_for(variant))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gradient_bytes(params: int, bf16: bool) -> float:
    """Bytes all-reduced per step: fp32 gradients, or bf16 with ``bf16_compress_hook``."""
    return params * (2 if bf16 else 4)


def ring_bandwidth(system: System, nodes: int) -> float:
    """The ring's bottleneck bandwidth: NVLink inside a node, the node's fabric across."""
    link = system.nvlink_per_gpu if nodes == 1 else min(system.nvlink_per_gpu, system.internode_per_node)
    return link * EFFICIENCY_OF_LINK


def allreduce_time(num_bytes: float, world: int, bandwidth: float, hop_latency: float = HOP_LATENCY_S) -> float:
    """Ring all-reduce seconds: ``2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency``."""
    if world <= 1:
        return 0.0
    steps = 2 * (world - 1)
    return steps / world * num_bytes / bandwidth + steps * hop_latency


def exposed_comm(comm_s: float, compute_s: float, last_bucket_s: float,
                 backward_share: float = BACKWARD_SHARE) -> float:
    """All-reduce time not hidden behind backward (the last bucket always shows)."""
    hidden = backward_share * compute_s
    return max(comm_s - hidden, 0.0) + min(last_bucket_s, comm_s)


def scaling_efficiency(compute_s: float, exposed_s: float) -> float:
    """Per-GPU throughput relative to one GPU without communication."""
    return compute_s / (compute_s + exposed_s)


def compute_per_step(variant: str, gpu: str, mfu: float, masks: int = 64) -> float:
    """Seconds of one 1-image step at a given end-to-end MFU (model FLOPs, 11 rounds)."""
    budget = train_flops_per_image(variant, masks, PromptConfig(), False)
    return budget.model_total / (mfu * PEAK_BF16_TFLOPS[gpu] * 1e12)


def model_rows(variant: str, compute: dict[str, float], bf16: bool) -> list[dict[str, Any]]:
    """Efficiency per system, compute scenario and node count for one variant."""
    params = parameter_count(variant)
    num_bytes = gradient_bytes(params, bf16)
    rows = []
    for system in SYSTEMS:
        for label, mfu_or_s in compute.items():
            compute_s = mfu_or_s if label.endswith("s/step") else compute_per_step(variant, system.gpu, mfu_or_s)
            for nodes in NODE_COUNTS:
                world = nodes * GPUS_PER_NODE
                bw = ring_bandwidth(system, nodes)
                comm = allreduce_time(num_bytes, world, bw)
                last = allreduce_time(min(BUCKET_BYTES * (0.5 if bf16 else 1.0), num_bytes), world, bw)
                exposed = exposed_comm(comm, compute_s, last)
                rows.append({"variant": variant, "params": params, "bytes": num_bytes, "bf16": bf16,
                             "system": system.name, "compute": label, "compute_s": compute_s,
                             "nodes": nodes, "allreduce_s": comm, "exposed_s": exposed,
                             "efficiency": scaling_efficiency(compute_s, exposed)})
    return rows


#: Compute scenarios: the paper's 2.72 s/step (A100), and end-to-end MFU targets.
COMPUTE_SCENARIOS: dict[str, float] = {"paper 2.72 s/step": 2.72, "MFU 10%": 0.10, "MFU 40%": 0.40}


def model_table(variants: tuple[str, ...] = ("vit_b", "vit_h")) -> list[dict[str, Any]]:
    """All modelled rows (fp32 and bf16-compressed gradients)."""
    return [row for v in variants for bf16 in (False, True) for row in model_rows(v, COMPUTE_SCENARIOS, bf16)]


def where_scaling_stops(rows: list[dict[str, Any]], threshold: float = 0.9) -> dict[tuple, int | None]:
    """Per (variant, system, compute, bf16): the first node count below ``threshold`` (None: never)."""
    out: dict[tuple, int | None] = {}
    for row in rows:
        key = (row["variant"], row["system"], row["compute"], row["bf16"])
        out.setdefault(key, None)
        if out[key] is None and row["efficiency"] < threshold:
            out[key] = row["nodes"]
    return out


def measure(nprocs: int, steps: int, work: Path) -> float:
    """Median step seconds (rank 0, after 2 warm-up steps) of ``tiny_cpu`` on ``nprocs`` ranks."""
    from trainer.data import write_synthetic_shards  # noqa: PLC0415

    data = work / "data"
    if not data.exists():
        write_synthetic_shards(str(data), num_images=16, num_shards=2, seed=0)
    run_dir = work / f"run{nprocs}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "trainer.dist", "--standalone", "--nproc-per-node", str(nprocs),
           "-m", "trainer.train", "--config", "tiny_cpu",
           "--set", f"data.shards={data}/sa_*.tar", "--set", f"train.run_dir={run_dir}",
           "--set", f"optim.max_iters={steps + 2}", "--set", "optim.warmup_iters=0",
           "--set", "optim.milestones=[]", "--set", "checkpoint.every=0",
           "--set", "eval.shards=", "--set", "checkpoint.resume=off"]
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parent.parent,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["time/step_s"] for r in records if r.get("time/step_s") is not None]
    return float(statistics.median(times[2:] or times))


def print_model(rows: list[dict[str, Any]]) -> None:
    """Efficiency tables and where each scenario drops below 90%."""
    for key, first in where_scaling_stops(rows).items():
        variant, system, compute, bf16 = key
        sel = [r for r in rows if (r["variant"], r["system"], r["compute"], r["bf16"]) == key]
        effs = " ".join(f"{r['nodes']}n:{r['efficiency']:.2f}" for r in sel)
        print(f"  {variant} {'bf16' if bf16 else 'fp32'} {system:28s} {compute:18s} compute "
              f"{sel[0]['compute_s'] * 1e3:7.1f} ms, all-reduce@32n {sel[-1]['allreduce_s'] * 1e3:6.1f} ms | "
              f"{effs} | <90% from {first or 'never (<=32 nodes)'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measured 1- and 2-process step times (unless ``--model-only``) and the model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model-only", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    if not args.model_only:
        work = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
        t1, t2 = measure(1, args.steps, work), measure(2, args.steps, work)
        result["measured"] = {"t1_s": t1, "t2_s": t2, "efficiency": t1 / t2}
        print(f"tiny_cpu measured: 1 process {t1 * 1e3:.1f} ms/step, 2 processes {t2 * 1e3:.1f} ms/step, "
              f"weak-scaling efficiency {t1 / t2:.2f}")
    rows = model_table()
    result["model"] = rows
    print("model (ring all-reduce vs compute, 8 GPUs per node):")
    print_model(rows)
    return result


if __name__ == "__main__":
    main()
