"""Image-encoder forward+backward: ours (SDPA attention) vs the official module.

Both encoders get the same weights (the official ``ImageEncoderViT`` from
``segment-anything==1.0`` with ours' state_dict loaded strictly), run in one process,
alternating iteration by iteration so drift in machine load hits both equally. Prints
median times and the ratio official/ours (>1 means ours is faster).

Run:
    python benchmarks/bench_encoder.py                       # CPU: vit_b widths at 512², fp32
    python benchmarks/bench_encoder.py --variant vit_h --img-size 1024 --batch 1   # GPU: bf16 autocast

On CUDA the default dtype is bf16 autocast; on CPU float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.model import build_sam, spec_for  # noqa: E402
from trainer.model.reference import build_official_sam  # noqa: E402


def official_encoder(variant: str, img_size: int) -> torch.nn.Module:
    """The official ``ImageEncoderViT`` with the variant's sizes at ``img_size``."""
    return build_official_sam(spec_for(variant, img_size=img_size)).image_encoder


def step(encoder: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """One forward+backward; returns seconds (synchronised on CUDA)."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = encoder(x)
    out.float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--img-size", type=int, default=None, help="default: 1024 on CUDA, 512 on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations each (default 10 CUDA / 3 CPU)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    img_size = args.img_size or (1024 if cuda else 512)
    iters = args.iters or (10 if cuda else 3)
    dtype = torch.bfloat16 if cuda else None

    ours = build_sam(args.variant, img_size=img_size, drop_path_rate=0.0,
                     activation_checkpointing=args.activation_checkpointing).image_encoder
    reference = official_encoder(args.variant, img_size)
    reference.load_state_dict(ours.state_dict(), strict=True)
    ours.to(device).train()
    reference.to(device).train()
    x = torch.randn(args.batch, 3, img_size, img_size, device=device)

    for enc in (ours, reference):  # warm-up (allocator, kernels selection)
        step(enc, x, dtype)
    times: dict[str, list[float]] = {"ours": [], "official": []}
    peak: dict[str, float] = {"ours": 0.0, "official": 0.0}
    for _ in range(iters):
        for name, enc in (("ours", ours), ("official", reference)):
            enc.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[name].append(step(enc, x, dtype))
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**30)

    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"image encoder fwd+bwd, {args.variant} at {img_size}², batch {args.batch}, "
          f"{'bf16 autocast' if dtype else 'fp32'}, {where}, {iters} alternating iterations")
    for name in ("official", "ours"):
        ips = args.batch / med[name]
        mem = f", peak {peak[name]:.1f} GiB" if cuda else ""
        print(f"  {name:9s} median {med[name] * 1e3:9.1f} ms  ({ips:6.2f} images/s{mem})")
    print(f"  ratio official/ours = {med['official'] / med['ours']:.2f}x (baseline: official ImageEncoderViT)")


if __name__ == "__main__":
    main()
