"""A fair training-step baseline built from the official ``segment_anything`` modules.

The official ``Sam`` (ImageEncoderViT, PromptEncoder, MaskDecoder, TwoWayTransformer) is
built with our model's sizes and loaded with our weights (the state_dict layouts are the
same; ``trainer.model.checkpoint_io.clean_state_dict`` strips wrapper prefixes). The step
is the straightforward loop a user of the official code would write, kept fair:

- the same images, masks, prompts (our prompt sampler, same generator seed and call order,
  so the same round plan, round-1 points/boxes and error-region clicks) and loss
  (``trainer.loss.reference_sam_loss``, the straightforward SAM2-style formulation of
  our loss: focal 20 / dice 1 / IoU MSE on the upsampled logits of every output);
- per round, all masks of an image through the official prompt encoder and decoder in ONE
  batched call (the official decoder repeats the image embedding per mask, as the official
  predictor batches prompts); previous low-res logits fed back as the mask prompt;
- box rows use the official box embedding (``_embed_boxes``), point rows
  ``_embed_points(pad=False)``: our rows already carry the official ``[point, pad]`` pair;
- the same AdamW parameter groups, threads and autocast dtype; activation checkpointing
  (when on) per encoder block and per decoder round, as ours.

    python benchmarks/baseline.py --config tiny_cpu --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts: bench_train

from trainer.data import Batch  # noqa: E402
from trainer.loss import LossConfig, reference_sam_loss  # noqa: E402
from trainer.model.build import SamSpec  # noqa: E402
from trainer.model.checkpoint_io import clean_state_dict  # noqa: E402
from trainer.model.reference import build_official_sam  # noqa: E402
from trainer.optim import OptimConfig, build_optimizer  # noqa: E402
from trainer.prompts import (  # noqa: E402
    LABEL_BOX_TOP_LEFT,
    PromptConfig,
    image_region,
    num_prompts_per_round,
    prompts_per_row,
    sample_correction_points,
    sample_initial_prompts,
    sample_round_plan,
    use_multimask,
)

#: Sections of the baseline step, timed with a device sync at each boundary.
BASELINE_SECTIONS = ("encoder", "prompt_sampling", "decoder_rounds", "loss", "backward", "optimizer")


class _Checkpointed(nn.Module):
    """Recompute a module's activations in backward (our encoder's per-block AC)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.inner, x, use_reentrant=False)
        return self.inner(x)


def build_official(spec: SamSpec, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The official ``Sam`` with ``spec``'s sizes, loaded strictly with ``state_dict``."""
    sam = build_official_sam(spec)
    sam.load_state_dict(clean_state_dict(state_dict), strict=True)
    return sam


def enable_checkpointing(official: nn.Module) -> None:
    """Wrap each encoder block for recomputation (after the weights and optimizer exist)."""
    blocks = official.image_encoder.blocks
    for i, block in enumerate(blocks):
        blocks[i] = _Checkpointed(block)


@dataclass
class SectionTimer:
    """Wall time per named section, synchronising the device at each boundary."""

    device: torch.device
    totals: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def sparse_embeddings(pe: nn.Module, coords: torch.Tensor, labels: torch.Tensor, is_box: torch.Tensor) -> torch.Tensor:
    """Official token embeddings: box rows' first two tokens via ``_embed_boxes``."""
    points = pe._embed_points(coords, labels, pad=False)  # N×P×C
    boxes = pe._embed_boxes(coords[:, :2].reshape(-1, 4))  # N×2×C
    first = torch.where(is_box.view(-1, 1, 1), boxes, points[:, :2])
    return torch.cat([first, points[:, 2:]], dim=1)


def decode_image(official: nn.Module, embedding: torch.Tensor, image_pe: torch.Tensor, coords: torch.Tensor,
                 labels: torch.Tensor, is_box: torch.Tensor, mask_input: torch.Tensor | None,
                 multimask_rows: torch.Tensor, uniform: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One official prompt-encoder + decoder call for all masks of one image.

    Returns N×K×h×w logits and N×K IoU: K = 3 or 1 when all rows agree (the official
    slice); for mixed point/box rows K = 3 and single-mask rows carry token 0 repeated, as
    in ours, so the min-over-outputs loss and the feedback choice reduce to that mask.
    """
    pe = official.prompt_encoder
    sparse = sparse_embeddings(pe, coords, labels, is_box)
    _, dense = pe(points=None, boxes=None, masks=mask_input)
    masks, iou = official.mask_decoder.predict_masks(embedding, image_pe, sparse, dense)  # N×4
    if uniform is not None:  # all rows of the step agree: the official ``MaskDecoder.forward`` slice
        keep = slice(1, None) if uniform else slice(0, 1)
        return masks[:, keep], iou[:, keep]
    rows = multimask_rows.view(-1, 1)
    iou = torch.where(rows, iou[:, 1:], iou[:, :1].expand(-1, 3))
    masks = torch.where(rows.view(-1, 1, 1, 1), masks[:, 1:], masks[:, :1].expand(-1, 3, -1, -1))
    return masks, iou


def _feedback(low_res: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """The highest-predicted-IoU output's logits (kept in the graph), N×1×h×w."""
    best = iou.detach().argmax(dim=1)
    return low_res[torch.arange(low_res.shape[0], device=low_res.device), best].unsqueeze(1)


def _decode_round(official: nn.Module, embeddings: torch.Tensor, image_index: torch.Tensor,
                  image_pe: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, is_box: torch.Tensor,
                  mask_input: torch.Tensor | None, multi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All masks of the step, one batched call per image, outputs in mask order.

    ``multi`` is N bool (3 outputs per row); when all rows of the step agree, every image
    gets the same K (3 or 1), else K = 3 with per-row selection (as ours).
    """
    uniform = bool(multi[0]) if bool(multi.all()) or not bool(multi.any()) else None
    lows, ious = [], []
    for b in range(embeddings.shape[0]):
        rows = (image_index == b).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        prev = None if mask_input is None else mask_input[rows]
        low, iou = decode_image(official, embeddings[b:b + 1], image_pe, coords[rows], labels[rows],
                                is_box[rows], prev, multi[rows], uniform)
        lows.append(low)
        ious.append(iou)
    return torch.cat(lows), torch.cat(ious)


def baseline_losses(official: nn.Module, batch: Batch, prompts: PromptConfig, loss_cfg: LossConfig,
                    generator: torch.Generator, amp_dtype: torch.dtype | None, timer: SectionTimer,
                    checkpoint_rounds: bool = False,
                    replay: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The official-modules forward and loss of one batch (``loss`` is the total to backprop).

    With ``replay`` (each round's ``(point_coords, point_labels)`` recorded from our step)
    the prompts are taken from it instead of sampled: an error-region click depends on
    the binarised previous prediction, so one pixel whose logit sits within fp32 rounding
    of 0 can move every later click of a row, and the loss check must not depend on that.
    """
    device_type = batch.images.device.type
    image_index = batch.valid.nonzero()[:, 0]
    gt = batch.masks[batch.valid]
    valid_hw = batch.input_sizes.to(gt.device)[image_index]
    size = tuple(gt.shape[-2:])
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        with timer("encoder"):
            embeddings = official.image_encoder(batch.images)
        with timer("prompt_sampling"), torch.no_grad():
            plan = sample_round_plan(prompts, generator)  # same call order as trainer.interactive
            coords, labels = sample_initial_prompts(gt, batch.boxes[batch.valid], prompts, generator, valid_hw)
            region = image_region(valid_hw, size)
            is_box = labels[:, 0] == LABEL_BOX_TOP_LEFT
        image_pe = official.prompt_encoder.get_dense_pe()
        mask_input: torch.Tensor | None = None
        rounds: list[tuple[torch.Tensor, torch.Tensor]] = []
        for r, (adds, count) in enumerate(zip(plan, num_prompts_per_round(plan))):
            if replay is not None:
                coords, labels = replay[r]
            elif r > 0 and adds:
                with timer("prompt_sampling"), torch.no_grad():
                    up = F.interpolate(mask_input.detach().float(), size=size, mode="bilinear", align_corners=False)
                    new_c, new_l = sample_correction_points(up.squeeze(1) > 0, gt, prompts, generator, region)
                coords, labels = torch.cat([coords, new_c], 1), torch.cat([labels, new_l], 1)
            multi = use_multimask(prompts_per_row(count, is_box, prompts))
            args = (official, embeddings, image_index, image_pe, coords, labels, is_box, mask_input, multi)
            with timer("decoder_rounds"):
                if checkpoint_rounds and torch.is_grad_enabled():
                    low, iou = checkpoint(_decode_round, *args, use_reentrant=False)
                else:
                    low, iou = _decode_round(*args)
            rounds.append((low, iou))
            mask_input = _feedback(low, iou)
    with timer("loss"), torch.autocast(device_type, enabled=False):
        valid = torch.ones(gt.shape[0], dtype=torch.bool, device=gt.device)
        outputs = [(low.float(), iou.float()) for low, iou in rounds]
        return reference_sam_loss(outputs, gt, valid, float(gt.shape[0]), loss_cfg, valid_hw=valid_hw)


@dataclass
class BaselineStep:
    """The official model, its optimizer and settings: ``step(batch, seed)`` trains once."""

    official: nn.Module
    optimizer: torch.optim.Optimizer
    prompts: PromptConfig
    loss_cfg: LossConfig
    amp_dtype: torch.dtype | None
    device: torch.device
    checkpointing: bool = False
    timer: SectionTimer = field(init=False)

    def __post_init__(self) -> None:
        self.timer = SectionTimer(self.device)

    @classmethod
    def create(cls, spec: SamSpec, state_dict: dict[str, torch.Tensor], prompts: PromptConfig,
               loss_cfg: LossConfig, optim: OptimConfig, amp_dtype: torch.dtype | None,
               device: torch.device, checkpointing: bool = False) -> BaselineStep:
        """Build the official model from our weights, the same AdamW groups, optional AC."""
        official = build_official(spec, state_dict).to(device).train()
        optimizer = build_optimizer(official, optim)  # same names -> same groups and lr scales
        if checkpointing:
            enable_checkpointing(official)
        return cls(official, optimizer, prompts, loss_cfg, amp_dtype, device, checkpointing)

    def losses(self, batch: Batch, seed: int,
               replay: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """Forward + loss with the prompt generator seeded as the engine seeds ours."""
        generator = torch.Generator(self.device).manual_seed(seed)
        torch.manual_seed(seed)
        return baseline_losses(self.official, batch, self.prompts, self.loss_cfg, generator,
                               self.amp_dtype, self.timer, self.checkpointing, replay)

    def step(self, batch: Batch, seed: int) -> dict[str, float]:
        """One full training step (forward, loss, backward, AdamW); returns the losses."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(batch, seed)
        with self.timer("backward"):
            losses["loss"].backward()
        with self.timer("optimizer"):
            self.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}


def median(values: list[float]) -> float:
    """The median (robust to one slow outlier run on a shared machine)."""
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Check equal losses, then time baseline vs ours alternately for one configuration."""
    from bench_train import CONFIGS, run_config  # noqa: PLC0415 (bench_train imports this module)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_cpu", choices=sorted(CONFIGS))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    result = run_config(CONFIGS[args.config], runs=args.runs, profile=False)
    print(f"ratio baseline/ours {result['ratio']:.2f}")
    return result


if __name__ == "__main__":
    main()
