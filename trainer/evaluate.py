"""Evaluation: mIoU with one center point and with a box (SAM_RECIPE.md §6).

For each GT mask the model gets one prompt and returns its 3 multimask outputs:

- ``point``: the "center" point, the pixel farthest from the mask boundary (max of the
  interior L2 distance transform, computed with a 1-px zero border so a mask touching
  the image edge still has a boundary there; deterministic);
- ``box``: the mask's tight XYXY box.

Two scores per prompt type: ``conf`` uses the model's most confident output (highest
predicted IoU; the paper's default) and ``oracle`` the best of the 3 against GT. IoU is
computed at the model's input resolution, inside the unpadded image area (low-res logits
upsampled bilinearly, thresholded at 0 — the official ``postprocess_masks`` without the
final resize to the original photo size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from trainer.data import Batch
from trainer.prompts import boxes_from_masks

METRICS = ("point_conf", "point_oracle", "box_conf", "box_oracle")


def center_points(masks: torch.Tensor) -> torch.Tensor:
    """``N×H×W`` bool -> ``N×2`` (x, y): the interior pixel farthest from the boundary."""
    out = torch.zeros(masks.shape[0], 2)
    for i, mask in enumerate(masks.cpu().numpy().astype(np.uint8)):
        padded = np.pad(mask, 1)
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out[i] = torch.tensor([float(x), float(y)])
    return out


@dataclass
class EvalResult:
    """Per-metric sums of IoU and the mask count; ``miou`` gives the means."""

    sums: dict[str, float] = field(default_factory=lambda: {m: 0.0 for m in METRICS})
    num_masks: int = 0
    num_images: int = 0

    def add(self, ious: dict[str, torch.Tensor]) -> None:
        for key, value in ious.items():
            self.sums[key] += float(value.sum())
        self.num_masks += int(next(iter(ious.values())).numel())

    def miou(self) -> dict[str, float]:
        return {k: v / max(self.num_masks, 1) for k, v in self.sums.items()}


def _ious(logits: torch.Tensor, gt: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``N×K×4h×4w`` logits vs ``N×S×S`` GT -> ``N×K`` IoU inside the ``hw`` image area."""
    size = gt.shape[-2:]
    pred = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False) > 0
    pred = pred[..., : hw[0], : hw[1]]
    target = gt[:, None, : hw[0], : hw[1]]
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    return inter / union.clamp(min=1)


def eval_prompts(gt: torch.Tensor) -> dict[str, dict]:
    """Prompt-encoder inputs for each GT mask (``N×S×S`` bool): ``point`` (its center
    point, one positive click, ``N×1×2``) and ``box`` (its tight XYXY box, ``N×4``)."""
    point = center_points(gt).to(gt.device)[:, None, :]
    labels = torch.ones(gt.shape[0], 1, dtype=torch.long, device=gt.device)
    return {"point": dict(points=(point, labels), boxes=None), "box": dict(points=None, boxes=boxes_from_masks(gt))}


@torch.no_grad()
def evaluate_image(sam: torch.nn.Module, image: torch.Tensor, gt: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """IoUs of every GT mask of one image for each metric.

    Args:
        sam: a ``Sam`` (eval mode is the caller's job).
        image: ``3×S×S`` normalised, padded input; gt: ``N×S×S`` bool masks; hw: unpadded size.

    Returns:
        ``{metric: N IoUs}``.
    """
    emb = sam.image_encoder(image[None])
    pe = sam.prompt_encoder.get_dense_pe()
    out = {}
    for kind, prompt in eval_prompts(gt).items():
        sparse, dense = sam.prompt_encoder(masks=None, **prompt)
        logits, iou_pred = sam.mask_decoder(emb, pe, sparse, dense, multimask_output=True)
        ious = _ious(logits, gt, hw)
        out[f"{kind}_conf"] = ious.gather(1, iou_pred.argmax(dim=1, keepdim=True)).squeeze(1)
        out[f"{kind}_oracle"] = ious.max(dim=1).values
    return out


def evaluate(sam: torch.nn.Module, batches: Iterable[Batch], num_images: int, device: torch.device) -> EvalResult:
    """mIoU over the first ``num_images`` images of ``batches`` (valid masks only)."""
    was_training = sam.training
    sam.eval()
    result = EvalResult()
    try:
        for batch in batches:
            for i in range(batch.images.shape[0]):
                if result.num_images >= num_images:
                    return result
                gt = batch.masks[i][batch.valid[i]].to(device)
                hw = (int(batch.input_sizes[i, 0]), int(batch.input_sizes[i, 1]))
                if gt.shape[0]:
                    result.add(evaluate_image(sam, batch.images[i].to(device), gt, hw))
                result.num_images += 1
            if result.num_images >= num_images:
                return result
    finally:
        sam.train(was_training)
    return result
