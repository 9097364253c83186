"""Benchmark: batched prompt simulation + 11 decoder rounds vs a per-mask Python loop.

Times ``trainer.interactive.simulate_interaction`` (all masks of an image in one
prompt-encoder + decoder call per round, prompts sampled with batched tensor ops) against
the straightforward implementation written below (each mask prompted, sampled and decoded
on its own, 11 rounds each), alternating the two in the same process, and prints the time
per image and the ratio. The image encoder is not run: one random image embedding stands
in for it, as the caller encodes each image once either way.

Run (CPU, tiny model, 64 masks):

    python benchmarks/bench_prompts.py

Other variants / GPU / training-like backward:

    python benchmarks/bench_prompts.py --variant vit_h --device cuda --dtype bf16 --backward
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.interactive import select_feedback_mask, simulate_interaction
from trainer.model import build_sam, spec_for
from trainer.prompts import PromptConfig, boxes_from_masks, sample_round_plan


def random_gt_masks(num: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """N×S×S bool ellipses of random centre and radii (2%–40% of the side)."""
    device = generator.device
    ys = torch.arange(size, device=device).view(1, size, 1).float()
    xs = torch.arange(size, device=device).view(1, 1, size).float()
    centre = torch.rand(num, 2, generator=generator, device=device) * size
    radii = (0.02 + 0.38 * torch.rand(num, 2, generator=generator, device=device)) * size
    dx = (xs - centre[:, 0].view(-1, 1, 1)) / radii[:, 0].view(-1, 1, 1)
    dy = (ys - centre[:, 1].view(-1, 1, 1)) / radii[:, 1].view(-1, 1, 1)
    return dx**2 + dy**2 <= 1


def _loop_pick(region: torch.Tensor, generator: torch.Generator) -> tuple[float, float] | None:
    """Uniform pixel of an H×W bool region via nonzero (the usual per-mask way)."""
    ys, xs = torch.nonzero(region, as_tuple=True)
    if len(ys) == 0:
        return None
    j = int(torch.randint(len(ys), (1,), generator=generator, device=generator.device))
    return float(xs[j]), float(ys[j])


def _loop_initial(mask: torch.Tensor, box: torch.Tensor, cfg: PromptConfig,
                  g: torch.Generator) -> tuple[list[list[float]], list[int]]:
    size = mask.shape[-1]
    if float(torch.rand(1, generator=g, device=g.device)) < cfg.prob_box:
        x0, y0, x1, y1 = box.tolist()
        coords = []
        for value, side in ((x0, x1 - x0), (y0, y1 - y0), (x1, x1 - x0), (y1, y1 - y0)):
            std = min(cfg.box_noise_frac * side, cfg.box_noise_max_px)
            noise = float(torch.randn(1, generator=g, device=g.device)) * std
            coords.append(min(max(value + noise, 0.0), float(size)))
        return [coords[:2], coords[2:]], [2, 3]
    point = _loop_pick(mask, g)
    return ([list(point), [0.0, 0.0]], [1, -1]) if point else ([[0.0, 0.0]] * 2, [-1, -1])


def loop_simulation(sam: torch.nn.Module, embedding: torch.Tensor, gt: torch.Tensor,
                    cfg: PromptConfig, g: torch.Generator) -> list[torch.Tensor]:
    """Baseline: for each mask, its own 11 rounds of sampling + prompt encoder + decoder."""
    size = gt.shape[-2:]
    boxes = boxes_from_masks(gt)
    plan = sample_round_plan(cfg, g)
    image_pe = sam.prompt_encoder.get_dense_pe()
    outputs = []
    for mask, box in zip(gt, boxes):
        coords, labels = _loop_initial(mask, box, cfg, g)
        mask_input, num_points = None, 0
        for idx, adds in enumerate(plan):
            if idx > 0 and adds:
                with torch.no_grad():
                    pred = F.interpolate(mask_input.detach().float(), size=size, mode="bilinear",
                                         align_corners=False)[0, 0] > 0
                point = _loop_pick(pred ^ mask, g) or _loop_pick(~mask, g)
                coords.append(list(point) if point else [0.0, 0.0])
                labels.append(int(mask[int(point[1]), int(point[0])]) if point else -1)
                num_points += 1
            c = torch.tensor([coords], device=gt.device)
            lab = torch.tensor([labels], device=gt.device)
            sparse, dense = sam.prompt_encoder(points=(c, lab), boxes=None, masks=mask_input,
                                               pad_points=False)
            low_res, iou = sam.mask_decoder(embedding, image_pe, sparse, dense, num_points == 0)
            outputs.append(low_res)
            mask_input = select_feedback_mask(low_res, iou)
    return outputs


def batched_simulation(sam: torch.nn.Module, embedding: torch.Tensor, gt: torch.Tensor,
                       cfg: PromptConfig, g: torch.Generator) -> list[torch.Tensor]:
    index = torch.zeros(gt.shape[0], dtype=torch.long, device=gt.device)
    return [o.low_res_masks for o in simulate_interaction(sam, embedding, index, gt, None, cfg, g)]


def time_once(fn, sam, embedding, gt, cfg, seed: int, args: argparse.Namespace) -> float:
    device = embedding.device
    g = torch.Generator(device=device).manual_seed(seed)
    emb = embedding.detach().requires_grad_(args.backward)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        outputs = fn(sam, emb, gt, cfg, g)
    if args.backward:
        # Mean of all logits: exercises the same backward graph as the loss would.
        sum(o.float().mean() for o in outputs).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", help="tiny, vit_b, vit_l, vit_h")
    parser.add_argument("--masks", type=int, default=64, help="masks per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs (after 1 warm-up)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast")
    parser.add_argument("--backward", action="store_true", help="also time the backward pass")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = spec_for(args.variant)
    # The encoder is never run: build it narrow so vit_h does not allocate 2.5 GB.
    sam = build_sam(args.variant, encoder_embed_dim=4 * spec.encoder_num_heads).to(device)
    sam.train()
    cfg = PromptConfig()
    grid = spec.embedding_grid
    g = torch.Generator(device=device).manual_seed(0)
    embedding = torch.randn(1, spec.prompt_embed_dim, grid, grid, generator=g, device=device)
    gt = random_gt_masks(args.masks, spec.img_size, g)

    impls = {"batched": batched_simulation, "loop": loop_simulation}
    for fn in impls.values():  # warm-up (allocator, kernels, oneDNN primitives)
        time_once(fn, sam, embedding, gt, cfg, 0, args)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for rep in range(args.repeats):
        for name, fn in impls.items():  # alternate so drift hits both equally
            times[name].append(time_once(fn, sam, embedding, gt, cfg, rep + 1, args))

    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"variant={args.variant} masks={args.masks} rounds={cfg.num_rounds} dtype={args.dtype} "
          f"backward={args.backward} threads={torch.get_num_threads()}")
    for name, values in times.items():
        print(f"{name:8s} per image: median {statistics.median(values) * 1e3:9.1f} ms  "
              f"(runs: {', '.join(f'{v * 1e3:.1f}' for v in values)})")
    ratio = statistics.median(times["loop"]) / statistics.median(times["batched"])
    print(f"speed-up batched vs loop: {ratio:.1f}x")


if __name__ == "__main__":
    main()
