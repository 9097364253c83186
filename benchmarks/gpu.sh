#!/usr/bin/env bash
# The GPU part of the benchmark suite (`make bench-gpu`): one short run that writes
# benchmarks/REPORT-gpu.md. Train step ours vs the official-modules baseline for vit_b
# and vit_h at 1024 px, bf16, 1 image x 64 masks x 11 rounds, activation checkpointing
# off and on, 3 timed steps per side after one warm-up, a 2-step profile, MFU against
# the device's bf16 peak (trainer.flops), and the scaling model. A few minutes on one
# H100/H200; a configuration that runs out of memory is reported as failed, the rest run.
# Then bench_kernels --gpu (-> benchmarks/KERNELS-gpu.txt): the few-token attention and the
# upscaling rows at 1024 px in bf16, which decide whether those CPU paths also serve CUDA.
#
#   bash benchmarks/gpu.sh [--peak-tflops N]      # N for a GPU missing from trainer.flops
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device visible to torch" >&2
    exit 2
fi
python -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("segment_anything") else 1)' || {
    echo "benchmarks/gpu.sh: the baseline needs segment-anything==1.0: pip install -e '.[test]'" >&2
    exit 2
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python benchmarks/report.py --gpu "$@"
# The kernel rows whose choice is still open on CUDA (few-token attention, upscaling), bf16.
python benchmarks/bench_kernels.py --gpu --runs 5 | tee benchmarks/KERNELS-gpu.txt
