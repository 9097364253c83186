"""The optimised pieces of our train step, each against its straightforward baseline.

Every row times the baseline and ours alternately in this process on the same inputs
(forward + backward, median of ``--runs``) and prints how far apart their results are
(the equality itself is asserted in ``tests/unit/test_step_equivalence.py`` and
``test_upsample.py``):

- ``loss``: ``trainer.loss.reference_sam_loss`` (SAM2-style: upsample every output,
  three autograd terms, argmin, gather) vs ``sam_loss`` (the fused, chunked,
  supervised-output-only loss of ``trainer.mask_loss``), 64 masks × 11 rounds, 64→256;
- ``upsample``: ``F.interpolate`` vs ``trainer.upsample.upsample`` (the polyphase CPU
  form) on the loss's per-chunk shape (4 masks, 64→256);
- ``upsample adjoint``: ``aten::upsample_bilinear2d_backward`` vs
  ``trainer.upsample.upsample_adjoint``, 64 masks, 64→256;
- ``image-to-token attention``: SDPA vs ``few_keys_attention`` at the decoder's shapes
  (tiny: 64 masks × 256 image tokens over 9 prompt tokens; vit_b/h at 1024: 16 masks ×
  4096 tokens);
- ``LayerNorm2d``: the official op sequence under autograd vs our closed-form backward;
- ``decoder round, factored first layer``: one decoder round with a mask input (16 masks)
  on ``image + dense`` vs the factored first layer of ``trainer/model/factored.py``, at
  256 px and 1024 px;
- ``decoder round, few-token attention through the weights``: a factored decoder round
  whose cross-attentions project the image side vs multiply it through the weights
  (``trainer/model/few_tokens.py``), at 7, 11 and 15 tokens (256 px) and at 1024 px;
- ``decoder upscaling + mask product``: the official transposed convolutions and product
  vs ``MaskDecoder._upscaled_masks`` (per-pixel matmuls in block order), 256 and 1024 px;
- ``encoder windowed attention``: a ViT-B windowed block's attention, pad then project
  (official) vs ``Attention.forward_windowed`` (project the real tokens only);
- ``AdamW step``: one optimizer step over ViT-B's parameters, PyTorch's CPU default vs
  ``optim.fused``;
- ``allocator``: one tiny decoder round (64 masks, forward + backward) in a fresh
  process with glibc's defaults vs with ``trainer.allocator.retain_freed_memory`` (a
  process-wide setting, so each side runs in its own subprocess).

    python benchmarks/bench_kernels.py [--runs 5]
    python benchmarks/bench_kernels.py --gpu     # on CUDA, bf16: the rows still open there (make bench-gpu)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.loss import LossConfig, reference_sam_loss, sam_loss  # noqa: E402
from trainer.model.common import LayerNorm2d, layer_norm_2d_reference  # noqa: E402
from trainer.model.transformer import few_keys_attention  # noqa: E402
from trainer.upsample import upsample, upsample_adjoint  # noqa: E402


def timed_pair(baseline: Callable[[], Any], ours: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median seconds of ``baseline()`` and ``ours()``, after one warm-up each; the order
    alternates so neither side always runs on the other's cache state."""
    base_t, ours_t = [], []
    for i in range(runs + 1):
        pair = ((baseline, base_t), (ours, ours_t))
        for fn, out in (pair if i % 2 == 0 else pair[::-1]):
            start = time.perf_counter()
            fn()
            if i:
                out.append(time.perf_counter() - start)
    return statistics.median(base_t), statistics.median(ours_t)


def compared(baseline: Callable[[], torch.Tensor], ours: Callable[[], torch.Tensor], runs: int) -> dict[str, float]:
    """The largest absolute difference of one call of each side, then both timed
    (:func:`timed_pair`); a side may run its backward inside and return its output."""
    diff = float((baseline().detach() - ours().detach()).abs().max())
    base_s, ours_s = timed_pair(baseline, ours, runs)
    return {"baseline_s": base_s, "ours_s": ours_s, "max_abs_diff": diff}


def loss_case(masks: int = 64, rounds: int = 11, low: int = 64, size: int = 256, seed: int = 0):
    """Random rounds (round 1 with 3 outputs), blob GT masks, padded image sizes."""
    gen = torch.Generator().manual_seed(seed)
    outs = [((torch.randn(masks, 3 if r == 0 else 1, low, low, generator=gen) * 4).requires_grad_(True),
             torch.rand(masks, 3 if r == 0 else 1, generator=gen).requires_grad_(True)) for r in range(rounds)]
    blobs = torch.rand(masks, 1, low // 2, low // 2, generator=gen)
    gt = F.interpolate(blobs, size=(size, size), mode="bilinear", align_corners=False).squeeze(1) > 0.6
    valid_hw = torch.stack([torch.randint(size // 2, size + 1, (masks,), generator=gen),
                            torch.full((masks,), size)], dim=1)
    return outs, gt, valid_hw


def bench_loss(runs: int, masks: int = 64, rounds: int = 11) -> dict[str, float]:
    outs, gt, valid_hw = loss_case(masks, rounds)
    valid = torch.ones(gt.shape[0], dtype=torch.bool)
    cfg = LossConfig()

    def step(fn: Callable[..., dict[str, torch.Tensor]]) -> float:
        loss = fn(outs, gt, valid, gt.shape[0], cfg, valid_hw=valid_hw)["loss"]
        loss.backward()
        return float(loss.detach())

    ref, ours = step(reference_sam_loss), step(sam_loss)
    base_s, ours_s = timed_pair(lambda: step(reference_sam_loss), lambda: step(sam_loss), runs)
    return {"baseline_s": base_s, "ours_s": ours_s, "rel_diff": abs(ref - ours) / abs(ref)}


def bench_upsample(runs: int) -> dict[str, float]:
    x = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    reps = 50  # one chunk is well under a millisecond: time 50 per run

    def native() -> None:
        for _ in range(reps):
            F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)

    def ours() -> None:
        for _ in range(reps):
            upsample(x, (256, 256))

    diff = float((F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
                  - upsample(x, (256, 256))).abs().max())
    base_s, ours_s = timed_pair(native, ours, runs)
    return {"baseline_s": base_s / reps, "ours_s": ours_s / reps, "max_abs_diff": diff}


def bench_adjoint(runs: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(64, 1, 256, 256, generator=gen)

    def native() -> torch.Tensor:
        return torch.ops.aten.upsample_bilinear2d_backward(grad, [256, 256], [64, 1, 64, 64], False, None, None)

    return compared(native, lambda: upsample_adjoint(grad, (64, 64)), runs)


def bench_attention(runs: int, masks: int, tokens: int, keys: int, dim: int, heads: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(masks, n, dim, generator=gen).requires_grad_(True) for n in (tokens, keys, keys))

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(masks, x.shape[1], heads, dim // heads).transpose(1, 2)

    def sdpa() -> torch.Tensor:
        out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(masks, -1, dim)
        out.sum().backward()
        return out

    def ours() -> torch.Tensor:
        out = few_keys_attention(q, k, v, heads)
        out.sum().backward()
        return out

    return compared(sdpa, ours, runs)


def bench_layer_norm(runs: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, 32, 32, generator=gen).requires_grad_(True)  # tiny's output upscaling
    ln = LayerNorm2d(16)

    def ref() -> torch.Tensor:
        out = layer_norm_2d_reference(x, ln.weight, ln.bias, ln.eps)
        out.square().mean().backward()
        return out

    def ours() -> torch.Tensor:
        out = ln(x)
        out.square().mean().backward()
        return out

    return compared(ref, ours, runs)


def _on(device: str, amp: bool) -> Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]:
    """Wrap a benchmark side: bf16 autocast when ``amp``, and a CUDA sync at the end so
    the timer sees the device's work."""
    def wrap(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def side() -> torch.Tensor:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                out = fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            return out.float()
        return side
    return wrap


def _decoder_round(grid: int, masks: int, points: int = 6, device: str = "cpu") -> Callable[[bool], torch.Tensor]:
    """One SAM decoder round (C = 256, the same for every variant) with a mask input and
    ``points`` prompt points (5 + points tokens), forward + backward; its argument picks
    the factored first layer."""
    from trainer.model.build import build_from_spec, spec_for  # noqa: PLC0415

    torch.manual_seed(0)
    spec = spec_for("vit_b", img_size=16 * grid, decoder_dropout=0.0)
    sam = build_from_spec(spec).to(device)
    prompt, decoder = sam.prompt_encoder, sam.mask_decoder
    emb = torch.randn(1, 256, grid, grid, device=device, requires_grad=True)
    coords = torch.rand(masks, points, 2, device=device) * spec.img_size
    labels = torch.randint(0, 2, (masks, points), device=device)
    mask = torch.randn(masks, 1, 4 * grid, 4 * grid, device=device, requires_grad=True)

    def round_(factored: bool) -> torch.Tensor:
        sparse, dense = prompt((coords, labels), None, mask, pad_points=False, factored=factored)
        low, iou = decoder(emb, prompt.get_dense_pe(), sparse, dense, True)
        (low.float().square().mean() + iou.float().sum()).backward()
        return low

    return round_


def bench_factored_round(runs: int, grid: int, masks: int) -> dict[str, float]:
    """A decoder round: the plain ``image + dense`` first layer vs the factored one."""
    round_ = _decoder_round(grid, masks)
    return compared(lambda: round_(False), lambda: round_(True), runs)


def bench_few_tokens(runs: int, grid: int, masks: int, points: int, device: str = "cpu",
                     amp: bool = False) -> dict[str, float]:
    """A (factored) decoder round with its cross-attentions projecting the image side
    (SDPA / ``few_keys_attention``) vs multiplied through the weights
    (``trainer/model/few_tokens.py``), forced on whatever the device, so that a GPU run
    measures it too (the model uses it on CPU only)."""
    from trainer.model import transformer  # noqa: PLC0415
    from trainer.model.few_tokens import through_pays  # noqa: PLC0415

    round_, rule = _decoder_round(grid, masks, points, device), transformer.multiplies_through

    def forced(attn: torch.nn.Module, tokens: int, like: torch.Tensor) -> bool:  # the CPU rule on any device
        return through_pays(attn.num_heads, tokens, attn.internal_dim, cuda=False)

    def with_rule(through: bool) -> torch.Tensor:
        transformer.multiplies_through = forced if through else (lambda *args: False)
        try:
            return round_(True)
        finally:
            transformer.multiplies_through = rule

    on = _on(device, amp)
    return compared(on(lambda: with_rule(False)), on(lambda: with_rule(True)), runs)


def bench_upscaling(runs: int, grid: int, masks: int, device: str = "cpu", amp: bool = False) -> dict[str, float]:
    """The decoder's output upscaling + mask product, forward + backward: the official
    transposed convolutions then ``hyper_in @ upscaled.view(b, c, h*w)`` vs
    ``MaskDecoder._upscaled_masks`` (per-pixel matmuls in block order)."""
    from trainer.model.build import build_from_spec, spec_for  # noqa: PLC0415

    torch.manual_seed(0)
    decoder = build_from_spec(spec_for("vit_b", img_size=16 * grid)).mask_decoder.to(device)
    # Token-major, as the transformer returns.
    src = torch.randn(masks, grid * grid, 256, device=device, requires_grad=True)
    hyper = torch.randn(masks, 4, 32, device=device, requires_grad=True)

    def official() -> torch.Tensor:
        up = decoder.output_upscaling(src.transpose(1, 2).reshape(masks, 256, grid, grid))
        out = (hyper @ up.reshape(masks, 32, -1)).view(masks, -1, 4 * grid, 4 * grid)
        out.float().square().mean().backward()
        return out

    def ours() -> torch.Tensor:
        out = decoder._upscaled_masks(src, hyper, (grid, grid))
        out.float().square().mean().backward()
        return out

    on = _on(device, amp)
    return compared(on(official), on(ours), runs)


def gpu_rows(runs: int) -> dict[str, dict[str, float]]:
    """The rows whose choice is still open on CUDA (``make bench-gpu``), bf16 at 1024 px."""
    return {
        f"decoder round, few-token attention through the weights, 1024 px: 64 masks, {5 + p} tokens, bf16, "
        "fwd+bwd (project the image side, SDPA)": bench_few_tokens(runs, 64, 64, p, "cuda", amp=True)
        for p in (2, 6, 10)
    } | {"decoder upscaling + mask product, 64 masks at 1024 px, bf16, fwd+bwd (transposed convolutions)":
         bench_upscaling(runs, 64, 64, "cuda", amp=True)}


def bench_windowed_attention(runs: int, grid: int) -> dict[str, float]:
    """A ViT-B windowed encoder block's attention (14×14 windows over a zero-padded grid),
    forward + backward: official order (pad, then qkv) vs ``Attention.forward_windowed``."""
    from trainer.model.attention import Attention, window_partition, window_unpartition  # noqa: PLC0415

    torch.manual_seed(0)
    attn = Attention(768, num_heads=12, use_rel_pos=True, input_size=(14, 14))
    x = torch.randn(1, grid, grid, 768, requires_grad=True)

    def official() -> torch.Tensor:
        windows, pad_hw = window_partition(x, 14)
        out = window_unpartition(attn(windows), 14, pad_hw, (grid, grid))
        out.square().mean().backward()
        return out

    def ours() -> torch.Tensor:
        out = attn.forward_windowed(x, 14)
        out.square().mean().backward()
        return out

    return compared(official, ours, runs)


def bench_adamw(runs: int) -> dict[str, float]:
    """One AdamW step over ViT-B's parameters with our groups: PyTorch's default on CPU
    (a per-parameter loop) vs ``optim.fused`` (the fused kernel)."""
    from trainer.model.build import build_from_spec, spec_for  # noqa: PLC0415
    from trainer.optim import OptimConfig, build_optimizer  # noqa: PLC0415

    torch.manual_seed(0)
    models = [build_from_spec(spec_for("vit_b", img_size=256)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, OptimConfig(fused=fused)) for m, fused in zip(models, (False, True))]
    for model in models:
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    base_s, ours_s = timed_pair(opts[0].step, opts[1].step, runs)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(models[0].parameters(), models[1].parameters()))
    return {"baseline_s": base_s, "ours_s": ours_s, "max_abs_diff": diff}


def decoder_round_seconds(rounds: int) -> float:
    """Median seconds of one tiny decoder round (64 masks, 6 prompt tokens, fwd + bwd)."""
    from trainer.interactive import _decode_round  # noqa: PLC0415
    from trainer.model.build import build_from_spec, spec_for  # noqa: PLC0415

    torch.manual_seed(0)
    spec = spec_for("tiny")
    sam = build_from_spec(spec)
    grid, dim = spec.embedding_grid, spec.prompt_embed_dim
    emb = torch.randn(1, dim, grid, grid, requires_grad=True)
    coords, labels = torch.rand(64, 6, 2) * spec.img_size, torch.randint(0, 2, (64, 6))
    mask = torch.randn(64, 1, 4 * grid, 4 * grid, requires_grad=True)
    times = []
    for i in range(rounds + 1):
        start = time.perf_counter()
        low, iou = _decode_round(sam, emb, None, sam.prompt_encoder.get_dense_pe(), coords, labels, mask, False)
        (low.square().mean() + iou.sum()).backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_allocator(runs: int) -> dict[str, float]:
    """The decoder round in subprocesses without / with ``retain_freed_memory``, alternating
    three times, the fastest of each (process-to-process noise on a shared VM is ~20%)."""
    import subprocess  # noqa: PLC0415

    def child(retain: bool) -> float:
        code = ("import sys; sys.path.insert(0, %r); import bench_kernels as b; from trainer.allocator import "
                "retain_freed_memory; %s print(b.decoder_round_seconds(%d))"
                % (str(Path(__file__).resolve().parent), "retain_freed_memory();" if retain else "", runs))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        return float(out.stdout.strip().splitlines()[-1])

    base, ours = [], []
    for _ in range(3):
        base.append(child(False))
        ours.append(child(True))
    return {"baseline_s": min(base), "ours_s": min(ours)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="only the CUDA rows (gpu_rows), on cuda:0")
    args = parser.parse_args(argv)
    rows = gpu_rows(args.runs) if args.gpu else cpu_rows(args)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}; baseline in brackets")
    for name, row in rows.items():
        check = ", ".join(f"{k} {v:.1e}" for k, v in row.items() if k not in ("baseline_s", "ours_s"))
        print(f"{name}: baseline {row['baseline_s'] * 1e3:.3g} ms, ours {row['ours_s'] * 1e3:.3g} ms, "
              f"ratio {row['baseline_s'] / row['ours_s']:.2f} ({check})")
    return rows


def cpu_rows(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every CPU row (the default)."""
    return {
        "loss, 64 masks x 11 rounds, 64->256, fwd+bwd (reference_sam_loss)": bench_loss(args.runs),
        "upsample, 4 masks 64->256 (F.interpolate)": bench_upsample(args.runs),
        "upsample adjoint, 64 masks 64->256 (aten backward)": bench_adjoint(args.runs),
        "image-to-token attention, tiny: 64 x 256 tokens, 9 keys, fwd+bwd (SDPA)":
            bench_attention(args.runs, 64, 256, 9, 32, 4),
        "image-to-token attention, vit at 1024: 16 x 4096 tokens, 9 keys, fwd+bwd (SDPA)":
            bench_attention(args.runs, 16, 4096, 9, 128, 8),
        "LayerNorm2d, 64 x 16 x 32 x 32, fwd+bwd (official ops under autograd)": bench_layer_norm(args.runs),
        "decoder round, factored first layer, 256 px: 16 masks x 256 tokens, fwd+bwd (image + dense)":
            bench_factored_round(args.runs, 16, 16),
        "decoder round, factored first layer, 1024 px: 16 masks x 4096 tokens, fwd+bwd (image + dense)":
            bench_factored_round(max(args.runs // 2, 1), 64, 16),
        **{f"decoder round, few-token attention through the weights, 256 px: 16 masks, {5 + p} tokens, fwd+bwd "
           "(project the image side)": bench_few_tokens(args.runs, 16, 16, p) for p in (2, 6, 10)},
        "decoder round, few-token attention through the weights, 1024 px: 4 masks, 11 tokens, fwd+bwd "
        "(project the image side)": bench_few_tokens(max(args.runs // 2, 1), 64, 4, 6),
        "decoder upscaling + mask product, 16 masks at 256 px, fwd+bwd (transposed convolutions)":
            bench_upscaling(args.runs, 16, 16),
        "decoder upscaling + mask product, 4 masks at 1024 px, fwd+bwd (transposed convolutions)":
            bench_upscaling(max(args.runs // 2, 1), 64, 4),
        "encoder windowed attention, vit_b at 256 px: 16x16 in 28x28 windows, fwd+bwd (pad, then qkv)":
            bench_windowed_attention(args.runs, 16),
        "encoder windowed attention, vit_b at 1024 px: 64x64 in 70x70 windows, fwd+bwd (pad, then qkv)":
            bench_windowed_attention(max(args.runs // 2, 1), 64),
        "AdamW step, vit_b parameters (PyTorch's CPU default: per-parameter loop)": bench_adamw(args.runs),
        "allocator: tiny decoder round, 64 masks, fwd+bwd (glibc defaults)": bench_allocator(args.runs),
    }


if __name__ == "__main__":
    main()
