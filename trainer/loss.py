"""SAM's training loss (SAM_RECIPE.md §1 "Losses"; SAM2 ``training/loss_fns.py``).

Per mask and round: ``20·focal + 1·dice`` on the mask logits plus ``1·MSE`` between the
IoU head and the actual IoU of the binarized prediction. With three outputs
(multimask), only the output with the lowest ``20·focal + dice`` is supervised, for the
mask loss and for the IoU head (SAM2's ``supervise_all_iou=False``, "consistent with
SAM"). Losses are summed over masks and rounds and divided by the number of valid masks
(averaged across ranks, see ``num_masks_across_ranks``).

Padding is not image: given each mask's unpadded size (``valid_hw``, N×2 ``(h, w)`` from
``Batch.input_sizes``), focal and dice are averaged over the image pixels only and the
IoU target counts only them, so what the model predicts in the zero padding (33% of the
frame for a 3:2 photo) neither dilutes nor changes the loss and gets no gradient. Our
choice; the paper is silent (SAM_RECIPE.md §1 "Losses"). The official
``postprocess_masks`` likewise crops the padding before masks are used.

Two implementations of the same mathematics: each term as its own function returning
per-output values N×K (``focal_loss``, ``dice_loss``, ``iou_loss``), combined by
:func:`reference_sam_loss`, the straightforward SAM2-style formulation that the tests
and the benchmark baseline use; and :func:`sam_loss`, what training runs, on the fused,
chunked pass of ``trainer.mask_loss`` (2-3× faster on CPU, never materialising the
upsampled logits; equal within fp32 rounding, ``tests/unit/test_step_equivalence.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.mask_loss import LossTargets, loss_targets, supervised_mask_loss
from trainer.prompts import image_region

LOSS_RESOLUTIONS = ("gt", "low_res")


@dataclass(kw_only=True)
class LossConfig:
    """Loss weights and options.

    Attributes:
        weight_focal: focal weight. Paper: 20 (20:1 focal:dice).
        weight_dice: dice weight. Paper: 1.
        weight_iou: IoU-head MSE weight. Paper: 1.
        focal_alpha: focal α; paper silent, SAM2 uses 0.25. A negative value disables
            α-balancing (SAM2 convention).
        focal_gamma: focal γ; paper silent, SAM2 uses 2.
        resolution: where the mask loss is computed; paper silent. ``"gt"`` (SAM2):
            bilinearly upsample the low-res logits to the GT resolution.
            ``"low_res"``: area-downsample the GT to the logits' resolution and
            binarize at 0.5 (16× fewer pixels; cheaper, coarser).
    """

    weight_focal: float = 20.0
    weight_dice: float = 1.0
    weight_iou: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    resolution: str = "gt"

    def __post_init__(self) -> None:
        for name in ("weight_focal", "weight_dice", "weight_iou", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.focal_alpha > 1:
            raise ValueError(f"loss.focal_alpha must be <= 1, got {self.focal_alpha}")
        if self.resolution not in LOSS_RESOLUTIONS:
            raise ValueError(
                f"loss.resolution must be one of {LOSS_RESOLUTIONS}, got {self.resolution!r}"
            )


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss, mean over the pixels of ``region`` (SAM2 ``sigmoid_focal_loss``).

    Args:
        logits: N×K×H×W float mask logits.
        targets: N×H×W (broadcast over K) or N×K×H×W, values in {0, 1}.
        region: N×H×W bool pixels that count (the unpadded image); None = all.

    Returns:
        N×K float.
    """
    targets = _broadcast_targets(targets, logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if region is None:
        return loss.flatten(2).mean(-1)
    # where (not multiply): a non-finite logit in the padding must not leak in as 0·inf.
    inside = torch.where(region.unsqueeze(1), loss, 0.0).flatten(2).sum(-1)
    return inside / _region_count(region).clamp(min=1.0)


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, region: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft dice ``1 - (2·inter + 1) / (sum + 1)`` on sigmoid probabilities (SAM2).

    Args:
        logits: N×K×H×W float.
        targets: N×H×W or N×K×H×W in {0, 1}.
        region: N×H×W bool pixels that count (the unpadded image); None = all.

    Returns:
        N×K float.
    """
    targets = _broadcast_targets(targets, logits)
    prob = logits.sigmoid()
    if region is not None:
        prob = torch.where(region.unsqueeze(1), prob, 0.0)
        targets = torch.where(region.unsqueeze(1), targets, 0.0)
    prob = prob.flatten(2)
    targets = targets.flatten(2)
    inter = (prob * targets).sum(-1)
    total = prob.sum(-1) + targets.sum(-1)
    return 1 - (2 * inter + 1) / (total + 1)


def mask_iou(
    logits: torch.Tensor, targets: torch.Tensor, region: torch.Tensor | None = None
) -> torch.Tensor:
    """IoU of the binarized prediction (logits > 0) with GT inside ``region``; no gradient.

    Two empty masks have IoU 0 (union clamped to 1, as SAM2).

    Args:
        logits: N×K×H×W float; targets: N×H×W or N×K×H×W in {0, 1}.
        region: N×H×W bool pixels that count (the unpadded image); None = all.

    Returns:
        N×K float.
    """
    targets = _broadcast_targets(targets, logits)
    pred = logits.detach() > 0
    gt = targets > 0.5
    if region is not None:
        pred, gt = pred & region.unsqueeze(1), gt & region.unsqueeze(1)
    pred, gt = pred.flatten(2), gt.flatten(2)
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return inter / union.clamp(min=1.0)


def iou_loss(
    iou_pred: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the IoU head and the actual IoU (target detached), SAM_RECIPE.md §1.

    Args:
        iou_pred: N×K float IoU head output (no sigmoid, as in SAM).
        logits: N×K×H×W; targets: N×H×W or N×K×H×W.
        region: N×H×W bool pixels the IoU target counts; None = all.

    Returns:
        N×K float.
    """
    return (iou_pred - mask_iou(logits, targets, region)) ** 2


def _broadcast_targets(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if targets.dim() == 3:
        targets = targets.unsqueeze(1)
    return targets.to(logits.dtype).expand_as(logits)


def _region_count(region: torch.Tensor) -> torch.Tensor:
    """N×H×W bool -> N×1 float pixel count (broadcasts over the K outputs)."""
    return region.flatten(1).sum(-1, keepdim=True).float()


def match_resolution(
    logits: torch.Tensor, gt_masks: torch.Tensor, resolution: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring logits and GT to one resolution (``LossConfig.resolution``).

    Args:
        logits: N×K×h×w low-res logits.
        gt_masks: N×H×W bool/float GT in the input frame.

    Returns:
        (logits N×K×R×R', targets N×R×R' float) at GT (``"gt"``) or logits
        (``"low_res"``) resolution.
    """
    return logits_at(logits, gt_masks.shape[-2:], resolution), targets_at(gt_masks, logits, resolution)


def logits_at(logits: torch.Tensor, gt_hw: Sequence[int], resolution: str) -> torch.Tensor:
    """The logits half of :func:`match_resolution`: N×K×h×w upsampled to ``gt_hw`` for ``"gt"``."""
    if resolution != "gt" or tuple(logits.shape[-2:]) == tuple(gt_hw):
        return logits
    # SAM's postprocess_masks upsamples the same way (align_corners=False).
    return F.interpolate(logits, size=tuple(gt_hw), mode="bilinear", align_corners=False)


def targets_at(gt_masks: torch.Tensor, logits: torch.Tensor, resolution: str) -> torch.Tensor:
    """The GT half of :func:`match_resolution`: N×H×W as ``logits``' dtype, area-downsampled
    and re-binarised to the logits' h×w for ``"low_res"``."""
    gt = gt_masks.to(logits.dtype)
    if resolution == "gt" or logits.shape[-2:] == gt.shape[-2:]:
        return gt
    gt = F.interpolate(gt.unsqueeze(1), size=logits.shape[-2:], mode="area").squeeze(1)
    return (gt >= 0.5).to(logits.dtype)


def match_region(region: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The image region at the resolution of ``logits`` (after ``match_resolution``).

    Args:
        region: N×H×W bool unpadded-image pixels in the input frame.
        logits: N×K×R×R' logits.

    Returns:
        N×R×R' bool; area-downsampled and kept where at least half a cell is image
        (the same rule as the GT under ``resolution="low_res"``).
    """
    if region.shape[-2:] == logits.shape[-2:]:
        return region
    small = F.interpolate(region.unsqueeze(1).float(), size=logits.shape[-2:], mode="area")
    return small.squeeze(1) >= 0.5


def round_loss(
    low_res_masks: torch.Tensor,
    iou_pred: torch.Tensor,
    gt_masks: torch.Tensor,
    valid: torch.Tensor,
    cfg: LossConfig,
    region: torch.Tensor | None = None,
    targets: LossTargets | None = None,
) -> dict[str, torch.Tensor]:
    """Per-mask losses of one round, min-over-outputs when K > 1, padding zeroed.

    Focal, dice, the IoU target and the output choice come from one fused pass
    (``trainer.mask_loss.supervised_mask_loss``, equal to :func:`reference_round_loss`
    within fp32 rounding, for binary GT; where two outputs' weighted losses are within
    rounding of each other the argmin may pick the other one).

    Args:
        low_res_masks: N×K×h×w logits (K = 3 multimask, 1 single).
        iou_pred: N×K.
        gt_masks: N×H×W GT in the input frame.
        valid: N bool; False rows (padding masks) contribute 0 and get zero gradient.
        cfg: loss settings.
        region: N×H×W bool unpadded-image pixels (``image_region``); the loss ignores
            the rest of the frame. None = the whole frame.
        targets: the step's ``LossTargets`` at the loss resolution (``sam_loss`` builds
            them once for all rounds); None builds them here.

    Returns:
        dict ``loss_focal``, ``loss_dice``, ``loss_iou``: each N float (unweighted),
        and ``best`` N int64, the supervised output index.
    """
    if targets is None:
        targets = _step_targets(low_res_masks, gt_masks, region, cfg)
    out_hw = gt_masks.shape[-2:] if cfg.resolution == "gt" else low_res_masks.shape[-2:]
    if low_res_masks.dtype in (torch.float16, torch.bfloat16):  # sums over 1M pixels: fp32
        low_res_masks = low_res_masks.float()
    # The argmin of the weighted mask loss picks the output to supervise (inside the
    # fused function); the other outputs get exactly zero gradient.
    focal, dice, actual_iou, best = supervised_mask_loss(
        low_res_masks, targets, out_hw, cfg.focal_gamma, cfg.weight_focal, cfg.weight_dice)
    iou = (iou_pred.gather(1, best.unsqueeze(1)).squeeze(1) - actual_iou) ** 2
    parts = {"loss_focal": focal, "loss_dice": dice, "loss_iou": iou}
    # where (not multiply) so a non-finite value in a padding row cannot leak in.
    parts = {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in parts.items()}
    parts["best"] = best
    return parts


def _step_targets(
    first_logits: torch.Tensor, gt_masks: torch.Tensor, region: torch.Tensor | None, cfg: LossConfig
) -> LossTargets:
    """The ``LossTargets`` at the loss resolution that every round of the step shares."""
    gt = targets_at(gt_masks, first_logits, cfg.resolution)
    if region is not None:
        region = match_region(region, gt.unsqueeze(1))
    return loss_targets(gt, region, cfg.focal_alpha, first_logits.dtype)


def sam_loss(
    rounds: Sequence[tuple[torch.Tensor, torch.Tensor]],
    gt_masks: torch.Tensor,
    valid: torch.Tensor,
    num_masks: torch.Tensor | float,
    cfg: LossConfig,
    valid_hw: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Total loss over all interactive rounds (summed, SAM2's choice; paper silent).

    Args:
        rounds: per round ``(low_res_masks N×K×h×w, iou_pred N×K)``.
        gt_masks: N×H×W GT in the input frame.
        valid: N bool, False for padding masks.
        num_masks: normaliser, the valid-mask count averaged across ranks
            (``num_masks_across_ranks``); clamped to >= 1.
        cfg: loss settings.
        valid_hw: N×2 int ``(h, w)``, the unpadded image size of each mask's image
            (``Batch.input_sizes[image_index]``): losses and IoU targets cover only
            those pixels. None = the whole frame.

    Returns:
        dict of scalars: ``loss_focal``, ``loss_dice``, ``loss_iou`` (unweighted, each
        summed over rounds and masks / num_masks) and ``loss`` (weighted total, the one
        to backprop).
    """
    return _sum_rounds(rounds, gt_masks, valid, num_masks, cfg, valid_hw, reference=False)


def _sum_rounds(
    rounds: Sequence[tuple[torch.Tensor, torch.Tensor]],
    gt_masks: torch.Tensor,
    valid: torch.Tensor,
    num_masks: torch.Tensor | float,
    cfg: LossConfig,
    valid_hw: torch.Tensor | None,
    reference: bool,
) -> dict[str, torch.Tensor]:
    """The body of :func:`sam_loss` (fused rounds) and :func:`reference_sam_loss`."""
    if len(rounds) == 0:
        raise ValueError("sam_loss needs at least one round")
    valid = valid.to(torch.bool)
    region = None if valid_hw is None else image_region(valid_hw.to(gt_masks.device), gt_masks.shape[-2:])
    totals = {"loss_focal": 0.0, "loss_dice": 0.0, "loss_iou": 0.0}
    if not reference:
        targets = _step_targets(rounds[0][0], gt_masks, region, cfg)  # shared by all rounds
    for low_res_masks, iou_pred in rounds:
        if reference:
            parts = reference_round_loss(low_res_masks, iou_pred, gt_masks, valid, cfg, region)
        else:
            parts = round_loss(low_res_masks, iou_pred, gt_masks, valid, cfg, region, targets)
        totals = {key: value + parts[key].sum() for key, value in totals.items()}
    if isinstance(num_masks, torch.Tensor):
        denom = num_masks.to(gt_masks.device, torch.float32).clamp(min=1.0)
    else:
        denom = max(float(num_masks), 1.0)
    out = {key: value / denom for key, value in totals.items()}
    out["loss"] = (
        cfg.weight_focal * out["loss_focal"]
        + cfg.weight_dice * out["loss_dice"]
        + cfg.weight_iou * out["loss_iou"]
    )
    return out


def reference_round_loss(
    low_res_masks: torch.Tensor,
    iou_pred: torch.Tensor,
    gt_masks: torch.Tensor,
    valid: torch.Tensor,
    cfg: LossConfig,
    region: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The straightforward ``round_loss`` (SAM2 ``loss_fns`` style): the upsampled logits
    of every output, three separate autograd terms, argmin, gather.

    The reference the fused loss is tested against and what the benchmark baseline
    (``benchmarks/baseline.py``) trains with; same arguments and result as :func:`round_loss`.
    """
    logits, targets = match_resolution(low_res_masks, gt_masks, cfg.resolution)
    if region is not None:
        region = match_region(region, logits)
    focal = focal_loss(logits, targets, cfg.focal_alpha, cfg.focal_gamma, region)
    dice = dice_loss(logits, targets, region)
    iou = iou_loss(iou_pred, logits, targets, region)
    combo = cfg.weight_focal * focal + cfg.weight_dice * dice
    best = combo.detach().argmin(dim=1, keepdim=True)
    parts = {
        "loss_focal": focal.gather(1, best).squeeze(1),
        "loss_dice": dice.gather(1, best).squeeze(1),
        "loss_iou": iou.gather(1, best).squeeze(1),
    }
    parts = {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in parts.items()}
    parts["best"] = best.squeeze(1)
    return parts


def reference_sam_loss(
    rounds: Sequence[tuple[torch.Tensor, torch.Tensor]],
    gt_masks: torch.Tensor,
    valid: torch.Tensor,
    num_masks: torch.Tensor | float,
    cfg: LossConfig,
    valid_hw: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`sam_loss` built on :func:`reference_round_loss` (same arguments and result)."""
    return _sum_rounds(rounds, gt_masks, valid, num_masks, cfg, valid_hw, reference=True)


def num_masks_across_ranks(valid: torch.Tensor) -> torch.Tensor:
    """Valid-mask count averaged over ranks, clamped to >= 1 (SAM2 ``num_objects``).

    DDP averages gradients over ranks, so dividing each rank's summed loss by the mean
    count (not the global total) makes the step's gradient the mean over all masks of
    the global batch. Without an initialized process group this is the local count.

    Args:
        valid: N bool.

    Returns:
        0-dim float tensor on ``valid.device``.
    """
    count = valid.to(torch.float32).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)
