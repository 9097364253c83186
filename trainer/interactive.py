"""The 11-round interactive training simulation (SAM_RECIPE.md §1 "Interactive simulation").

Per step: the caller encodes each image once; every mask of the step then goes through
ONE prompt-encoder + mask-decoder call per round. Round 1 prompts with a point or a
noisy box; each later round either adds a correction click sampled from the previous
prediction's error region or adds nothing, and always feeds back the previous round's
low-res logits as the mask prompt. Prompt sampling lives in ``trainer.prompts``; the
loss over the returned rounds in ``trainer.loss.sam_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from trainer.prompts import (
    PromptConfig,
    boxes_from_masks,
    num_prompts_per_round,
    sample_correction_points,
    sample_initial_prompts,
    sample_round_plan,
    use_multimask,
)


@dataclass
class RoundOutput:
    """What one round produced.

    Attributes:
        low_res_masks: N×K×4h×4w mask logits (K = 3 if ``multimask`` else 1).
        iou_pred: N×K predicted IoU.
        multimask: whether the decoder returned its 3 multimask outputs.
        point_coords: N×P×2 ``(x, y)`` input-frame pixels given to the prompt encoder.
        point_labels: N×P labels (1 pos, 0 neg, -1 pad, 2/3 box corners).
        mask_input: N×1×4h×4w mask prompt of this round (None in round 1).
        num_sparse_tokens: T, the prompt tokens per mask this round.
    """

    low_res_masks: torch.Tensor
    iou_pred: torch.Tensor
    multimask: bool
    point_coords: torch.Tensor
    point_labels: torch.Tensor
    mask_input: torch.Tensor | None
    num_sparse_tokens: int


def select_feedback_mask(low_res_masks: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """The output to feed back: the highest-predicted-IoU one when there are 3.

    Args:
        low_res_masks: N×K×4h×4w logits; iou_pred: N×K.

    Returns:
        N×1×4h×4w unthresholded logits, still attached to the graph.
    """
    if low_res_masks.shape[1] == 1:
        return low_res_masks
    best = iou_pred.detach().argmax(dim=1)
    rows = torch.arange(low_res_masks.shape[0], device=low_res_masks.device)
    return low_res_masks[rows, best].unsqueeze(1)


def predicted_masks(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binarize low-res logits at the input resolution (bilinear, as SAM's postprocess).

    Args:
        mask_logits: N×1×4h×4w logits.
        size: (S, S) input frame.

    Returns:
        N×S×S bool, logits > 0.
    """
    up = F.interpolate(mask_logits.detach().float(), size=size, mode="bilinear", align_corners=False)
    return up.squeeze(1) > 0


def _decode_round(
    sam: nn.Module,
    embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    mask_input: torch.Tensor | None,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt-encoder + decoder call for all masks: (N×K×4h×4w logits, N×K IoU)."""
    # Our rows already carry the official padding ([pt, pad]; none for boxes).
    sparse, dense = sam.prompt_encoder(
        points=(coords, labels), boxes=None, masks=mask_input, pad_points=False
    )
    return sam.mask_decoder(
        image_embeddings=embeddings,
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


def simulate_interaction(
    sam: nn.Module,
    image_embeddings: torch.Tensor,
    image_index: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_boxes: torch.Tensor | None,
    cfg: PromptConfig,
    generator: torch.Generator,
    checkpoint_rounds: bool = False,
) -> list[RoundOutput]:
    """Run the interactive rounds for all masks of a step.

    With ``checkpoint_rounds`` each round's prompt encoder + decoder activations are
    recomputed in backward instead of kept (64 masks × 11 rounds of decoder activations
    dominate training memory at 1024²; see ``benchmarks/bench_step.py``).

    The previous round's logits are fed back **without detaching** (SAM2's choice; the
    paper is silent), so the loss of later rounds also trains earlier rounds through
    the mask prompt. Points accumulate across rounds. The round plan, and so the token
    count and the multimask flag, is shared by all masks (``sample_round_plan``).

    Args:
        sam: a ``Sam`` (uses ``prompt_encoder`` and ``mask_decoder``).
        image_embeddings: B×C×h×w, ``sam.image_encoder`` output for the step's images.
        image_index: N int64, the image (row of ``image_embeddings``) of each mask.
        gt_masks: N×S×S bool GT masks in the S×S input frame.
        gt_boxes: N×4 XYXY input-frame pixels, or None to use the masks' tight boxes.
        cfg: prompt settings.
        generator: on ``gt_masks.device``; seeds the plan, points and box noise.

    Returns:
        ``cfg.num_rounds`` RoundOutputs, in order.
    """
    size = tuple(gt_masks.shape[-2:])
    with torch.no_grad():
        boxes = boxes_from_masks(gt_masks) if gt_boxes is None else gt_boxes
        plan = sample_round_plan(cfg, generator)
        coords, labels = sample_initial_prompts(gt_masks, boxes, cfg, generator)
    # One image: let the decoder broadcast the 1×C×h×w embedding instead of gathering.
    if image_embeddings.shape[0] == 1:
        embeddings = image_embeddings
    else:
        embeddings = image_embeddings.index_select(0, image_index)
    image_pe = sam.prompt_encoder.get_dense_pe()
    mask_input: torch.Tensor | None = None
    outputs: list[RoundOutput] = []
    for round_idx, (adds_point, num_prompts) in enumerate(zip(plan, num_prompts_per_round(plan))):
        if round_idx > 0 and adds_point:
            with torch.no_grad():
                pred = predicted_masks(mask_input, size)
                new_coords, new_labels = sample_correction_points(pred, gt_masks, cfg, generator)
            coords = torch.cat([coords, new_coords], dim=1)
            labels = torch.cat([labels, new_labels], dim=1)
        multimask = use_multimask(num_prompts)
        if checkpoint_rounds and torch.is_grad_enabled():
            low_res, iou_pred = checkpoint(
                _decode_round, sam, embeddings, image_pe, coords, labels, mask_input, multimask,
                use_reentrant=False,
            )
        else:
            low_res, iou_pred = _decode_round(
                sam, embeddings, image_pe, coords, labels, mask_input, multimask
            )
        outputs.append(
            RoundOutput(low_res, iou_pred, multimask, coords, labels, mask_input, coords.shape[1])
        )
        mask_input = select_feedback_mask(low_res, iou_pred)
    return outputs
