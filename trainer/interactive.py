"""The 11-round interactive training simulation (SAM_RECIPE.md §1 "Interactive simulation").

Per step: the caller encodes each image once; every mask of the step then goes through
ONE prompt-encoder + mask-decoder call per round. Round 1 prompts with a point or a
noisy box; each later round either adds a correction click sampled from the previous
prediction's error region or adds nothing, and always feeds back the previous round's
low-res logits as the mask prompt. Prompt sampling lives in ``trainer.prompts``; the
loss over the returned rounds in ``trainer.loss.sam_loss``.

Multimask per row: a lone point gets the 3 multimask outputs, a box (two corner prompts,
SAM 2's rule; ``PromptConfig.box_multimask``) and any later round the single-mask token
(SAM_RECIPE.md §1 "Single vs multi-mask", §3). Round 1 mixes point and box rows in one
decoder call: the decoder computes all 4 tokens anyway, so each row takes its outputs,
and a single-output row carries its one mask repeated 3× so that the min-over-outputs
loss and the highest-IoU feedback both reduce to that mask (ties pick it; the gradient
reaches token 0 once).

Padding: with ``valid_hw`` (each mask's unpadded image size), correction clicks are drawn
only inside the image and boxes are clamped to it (``trainer.prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from torch import nn

from trainer.upsample import upsample
from trainer.prompts import (
    LABEL_BOX_TOP_LEFT,
    PromptConfig,
    boxes_from_masks,
    image_region,
    num_prompts_per_round,
    prompts_per_row,
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
        multimask: K == 3, i.e. at least one row got the 3 multimask outputs.
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
    #: N bool: rows that got the 3 multimask outputs; the others hold token 0 (×K).
    multimask_rows: torch.Tensor | None = None


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
    return upsample(mask_logits.detach().float(), size).squeeze(1) > 0


def _decode_round(
    sam: nn.Module,
    embeddings: torch.Tensor,
    image_index: torch.Tensor | None,
    image_pe: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    mask_input: torch.Tensor | None,
    multimask: bool | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt-encoder + decoder call for all masks: (N×K×4h×4w logits, N×K IoU).

    ``embeddings`` holds the step's B images and ``image_index`` each mask's (None: one
    image shared by all). The dense prompt stays factored (``trainer/model/factored.py``):
    the decoder's first layer projects each image once, not once per mask.
    ``multimask`` is one flag for all rows, or N bool per row (then K = 3 and rows
    without it carry token 0 repeated, see the module docstring).
    """
    # Our rows already carry the official padding ([pt, pad]; none for boxes).
    sparse, dense = sam.prompt_encoder(
        points=(coords, labels), boxes=None, masks=mask_input, pad_points=False, factored=True
    )
    if isinstance(multimask, bool):
        return sam.mask_decoder(
            image_embeddings=embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            image_index=image_index,
        )
    masks, iou = sam.mask_decoder.predict_masks(embeddings, image_pe, sparse, dense, image_index)  # N×4
    rows = multimask.view(-1, 1)
    iou = torch.where(rows, iou[:, 1:], iou[:, :1].expand(-1, 3))
    masks = torch.where(rows.view(-1, 1, 1, 1), masks[:, 1:], masks[:, :1].expand(-1, 3, -1, -1))
    return masks, iou


def _round_multimask(
    num_prompts: int, is_box: torch.Tensor, num_box: int, cfg: PromptConfig
) -> tuple[bool | torch.Tensor, torch.Tensor]:
    """The decoder's multimask argument for a round, and the N per-row flags.

    The argument is one bool when all rows agree (the official decoder slice) and the N
    bool rows when point and box rows differ (round 1 under SAM 2's box rule).
    """
    kinds = prompts_per_row(num_prompts, torch.tensor([False, True]), cfg)  # a point row, a box row
    point_multi, box_multi = (bool(v) for v in use_multimask(kinds).tolist())
    rows = torch.where(is_box, box_multi, point_multi)
    if num_box == 0:
        return point_multi, rows
    if num_box == is_box.numel() or point_multi == box_multi:
        return box_multi, rows
    return rows, rows


def simulate_interaction(
    sam: nn.Module,
    image_embeddings: torch.Tensor,
    image_index: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_boxes: torch.Tensor | None,
    cfg: PromptConfig,
    generator: torch.Generator,
    checkpoint_rounds: bool = False,
    valid_hw: torch.Tensor | None = None,
) -> list[RoundOutput]:
    """Run the interactive rounds for all masks of a step.

    With ``checkpoint_rounds`` each round's prompt encoder + decoder activations are
    recomputed in backward instead of kept (64 masks × 11 rounds of decoder activations
    dominate training memory at 1024²; see ``benchmarks/bench_step.py``).

    The previous round's logits are fed back **without detaching** (SAM2's choice; the
    paper is silent), so the loss of later rounds also trains earlier rounds through
    the mask prompt. Points accumulate across rounds. The round plan, and so the token
    count, is shared by all masks (``sample_round_plan``); the multimask choice is per
    row (a lone point: 3 outputs; a box or several prompts: 1).

    Args:
        sam: a ``Sam`` (uses ``prompt_encoder`` and ``mask_decoder``).
        image_embeddings: B×C×h×w, ``sam.image_encoder`` output for the step's images.
        image_index: N int64, the image (row of ``image_embeddings``) of each mask.
        gt_masks: N×S×S bool GT masks in the S×S input frame.
        gt_boxes: N×4 XYXY input-frame pixels, or None to use the masks' tight boxes.
        cfg: prompt settings.
        generator: on ``gt_masks.device``; seeds the plan, points and box noise.
        checkpoint_rounds: recompute each round's decoder activations in backward.
        valid_hw: N×2 int ``(h, w)`` unpadded image size of each mask (the engine's
            ``Batch.input_sizes[image_index]``); None treats the whole frame as image.

    Returns:
        ``cfg.num_rounds`` RoundOutputs, in order.
    """
    size = tuple(gt_masks.shape[-2:])
    with torch.no_grad():
        boxes = boxes_from_masks(gt_masks) if gt_boxes is None else gt_boxes
        plan = sample_round_plan(cfg, generator)
        coords, labels = sample_initial_prompts(gt_masks, boxes, cfg, generator, valid_hw)
        region = None if valid_hw is None else image_region(valid_hw.to(gt_masks.device), size)
        is_box = labels[:, 0] == LABEL_BOX_TOP_LEFT
        num_box = int(is_box.sum())  # the step's one host sync here; rounds then need none
    # One image: the decoder broadcasts the 1×C×h×w embedding; several: it gathers per mask.
    index = None if image_embeddings.shape[0] == 1 else image_index
    image_pe = sam.prompt_encoder.get_dense_pe()
    mask_input: torch.Tensor | None = None
    outputs: list[RoundOutput] = []
    for round_idx, (adds_point, num_prompts) in enumerate(zip(plan, num_prompts_per_round(plan))):
        if round_idx > 0 and adds_point:
            with torch.no_grad():
                pred = predicted_masks(mask_input, size)
                new_coords, new_labels = sample_correction_points(pred, gt_masks, cfg, generator, region)
            coords = torch.cat([coords, new_coords], dim=1)
            labels = torch.cat([labels, new_labels], dim=1)
        multimask, rows = _round_multimask(num_prompts, is_box, num_box, cfg)
        if checkpoint_rounds and torch.is_grad_enabled():
            low_res, iou_pred = checkpoint(
                _decode_round, sam, image_embeddings, index, image_pe, coords, labels, mask_input,
                multimask, use_reentrant=False,
            )
        else:
            low_res, iou_pred = _decode_round(
                sam, image_embeddings, index, image_pe, coords, labels, mask_input, multimask
            )
        outputs.append(RoundOutput(low_res, iou_pred, low_res.shape[1] > 1, coords, labels,
                                   mask_input, coords.shape[1], rows))
        mask_input = select_feedback_mask(low_res, iou_pred)
    return outputs
