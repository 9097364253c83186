"""Loss terms against hand-computed values; min-over-masks; padding; normalization."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.loss import (
    LossConfig,
    dice_loss,
    focal_loss,
    iou_loss,
    mask_iou,
    match_region,
    match_resolution,
    num_masks_across_ranks,
    round_loss,
    sam_loss,
)

LN2 = math.log(2.0)


def test_focal_hand_values() -> None:
    # Logit 0 → p = 0.5, CE = ln 2, (1 - p_t)^2 = 0.25; α_t = 0.25 (pos) / 0.75 (neg).
    logits = torch.zeros(1, 1, 1, 2)
    targets = torch.tensor([[[1.0, 0.0]]])
    expected = (0.25 * 0.25 * LN2 + 0.75 * 0.25 * LN2) / 2
    assert focal_loss(logits, targets).item() == pytest.approx(expected)
    # Logit 2 on a positive: p = σ(2), CE = -ln σ(2), weight (1 - σ(2))^2 · 0.25.
    p = torch.sigmoid(torch.tensor(2.0)).item()
    value = focal_loss(torch.full((1, 1, 1, 1), 2.0), torch.ones(1, 1, 1)).item()
    assert value == pytest.approx(0.25 * (1 - p) ** 2 * -math.log(p))
    # γ = 0, α < 0: plain BCE.
    assert focal_loss(logits, targets, alpha=-1, gamma=0).item() == pytest.approx(LN2)


def test_dice_hand_values() -> None:
    # p = [0.5, 0.5], t = [1, 0]: inter 0.5, sum 2 → 1 - (1 + 1) / 3.
    logits = torch.zeros(1, 1, 1, 2)
    targets = torch.tensor([[[1.0, 0.0]]])
    assert dice_loss(logits, targets).item() == pytest.approx(1 / 3)
    # Confident and right → ~0; empty GT with confident-empty prediction → ~0 (the +1).
    big = torch.tensor([[[[30.0, -30.0]]]])
    assert dice_loss(big, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-big.abs(), torch.zeros(1, 1, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_iou_hand_values_and_target_detached() -> None:
    logits = torch.tensor([[[[1.0, -1.0, 1.0, 1.0]]]], requires_grad=True)
    targets = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    assert mask_iou(logits, targets).item() == pytest.approx(0.25)  # inter 1, union 4
    iou_pred = torch.tensor([[0.5]], requires_grad=True)
    loss = iou_loss(iou_pred, logits, targets)
    assert loss.item() == pytest.approx(0.0625)
    loss.sum().backward()
    assert logits.grad is None  # the actual IoU is a detached target
    assert iou_pred.grad.item() == pytest.approx(2 * 0.25)
    assert mask_iou(torch.full((1, 1, 2, 2), -1.0), torch.zeros(1, 2, 2)).item() == 0.0


def test_terms_shape_n_by_k() -> None:
    logits = torch.randn(5, 3, 8, 8)
    targets = torch.rand(5, 8, 8) > 0.5
    for term in (focal_loss(logits, targets), dice_loss(logits, targets)):
        assert term.shape == (5, 3)
    assert iou_loss(torch.rand(5, 3), logits, targets).shape == (5, 3)


def test_min_over_masks_picks_best_and_blocks_others() -> None:
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[:, 2:6, 2:6] = True
    good = torch.where(gt, 8.0, -8.0)
    logits = torch.stack([-good, good, torch.zeros_like(good)], dim=1)  # N×3×8×8
    logits[1] = logits[1, [2, 0, 1]]  # row 1: the good output is index 2
    logits.requires_grad_(True)
    iou_pred = torch.rand(2, 3, requires_grad=True)
    parts = round_loss(logits, iou_pred, gt, torch.ones(2, dtype=torch.bool), LossConfig())
    assert parts["best"].tolist() == [1, 2]
    total = 20 * parts["loss_focal"] + parts["loss_dice"] + parts["loss_iou"]
    total.sum().backward()
    for row, best in enumerate([1, 2]):
        others = [k for k in range(3) if k != best]
        assert (logits.grad[row, others] == 0).all()
        assert logits.grad[row, best].abs().sum() > 0
        assert (iou_pred.grad[row, others] == 0).all()
        assert iou_pred.grad[row, best] != 0
    expected = focal_loss(good.unsqueeze(1), gt)[:, 0]
    assert torch.allclose(parts["loss_focal"], expected)


def test_padding_masks_contribute_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(4, 16, 16, generator=gen) > 0.5
    logits = torch.randn(4, 3, 4, 4, generator=gen, requires_grad=True)
    iou_pred = torch.rand(4, 3, generator=gen, requires_grad=True)
    valid = torch.tensor([True, False, True, False])
    out = sam_loss([(logits, iou_pred)], gt, valid, num_masks=2, cfg=LossConfig())
    out["loss"].backward()
    assert (logits.grad[~valid] == 0).all() and (iou_pred.grad[~valid] == 0).all()
    # Changing the padding rows (even to non-finite values) leaves the loss unchanged.
    logits2 = logits.detach().clone()
    logits2[1] = float("nan")
    logits2[3] = 100.0
    out2 = sam_loss([(logits2, iou_pred.detach())], gt, valid, num_masks=2, cfg=LossConfig())
    assert torch.allclose(out2["loss"], out["loss"].detach())


def test_sam_loss_combines_rounds_and_normalizes() -> None:
    gen = torch.Generator().manual_seed(1)
    gt = torch.rand(3, 16, 16, generator=gen) > 0.5
    valid = torch.ones(3, dtype=torch.bool)
    rounds = [
        (torch.randn(3, 3, 4, 4, generator=gen), torch.rand(3, 3, generator=gen)),
        (torch.randn(3, 1, 4, 4, generator=gen), torch.rand(3, 1, generator=gen)),
    ]
    cfg = LossConfig()
    out = sam_loss(rounds, gt, valid, num_masks=torch.tensor(6.0), cfg=cfg)
    assert set(out) == {"loss", "loss_focal", "loss_dice", "loss_iou"}
    manual = {"loss_focal": 0.0, "loss_dice": 0.0, "loss_iou": 0.0}
    for low_res, iou in rounds:
        parts = round_loss(low_res, iou, gt, valid, cfg)
        for key in manual:
            manual[key] += parts[key].sum() / 6
    for key, value in manual.items():
        assert torch.allclose(out[key], value)
    assert torch.allclose(
        out["loss"], 20 * manual["loss_focal"] + manual["loss_dice"] + manual["loss_iou"]
    )
    # num_masks is clamped to >= 1.
    zero = sam_loss(rounds, gt, valid, num_masks=0, cfg=cfg)["loss"]
    assert torch.allclose(zero, sam_loss(rounds, gt, valid, num_masks=1, cfg=cfg)["loss"])


def test_resolution_options() -> None:
    logits = torch.randn(2, 3, 4, 4)
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[:, :8, :6] = True
    up, target = match_resolution(logits, gt, "gt")
    assert up.shape == (2, 3, 16, 16) and target.shape == (2, 16, 16)
    ref = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(up, ref)
    same, small = match_resolution(logits, gt, "low_res")
    assert same is logits and small.shape == (2, 4, 4)
    assert small[0].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 2 + [[0.0] * 4] * 2  # ≥ half covered


def test_num_masks_across_ranks(tmp_path: Path) -> None:
    valid = torch.tensor([True, False, True])
    assert num_masks_across_ranks(valid).item() == 2.0
    assert num_masks_across_ranks(torch.zeros(3, dtype=torch.bool)).item() == 1.0
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert num_masks_across_ranks(valid).item() == 2.0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weight_focal": -1.0}, "weight_focal"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"focal_alpha": 1.5}, "focal_alpha"),
        ({"resolution": "full"}, "resolution"),
    ],
)
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LossConfig(**kwargs)


# --------------------------------------------------------- padding is not image (point 18)


def padded_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low-res logits N×3×16×16 for a 64² frame, GT inside each image, (h, w) per mask."""
    gen = torch.Generator().manual_seed(seed)
    valid_hw = torch.tensor([[40, 64], [64, 24], [32, 48]])  # multiples of 4: cells align
    gt = torch.zeros(3, 64, 64, dtype=torch.bool)
    gt[0, 10:30, 5:50] = True
    gt[1, 20:60, 2:20] = True
    gt[2, 0:32, 10:48] = True  # touches the image's bottom and right edges
    logits = torch.randn(3, 3, 16, 16, generator=gen) * 3
    iou_pred = torch.rand(3, 3, generator=gen)
    return logits, iou_pred, gt, valid_hw


def scribble_padding(logits: torch.Tensor, valid_hw: torch.Tensor, value: float) -> torch.Tensor:
    """Overwrite low-res cells that no image pixel's bilinear upsampling reads.

    Output pixel y < h = 4m reads low-res rows up to m (align_corners=False), so rows and
    columns from m + 1 on touch only padding.
    """
    out = logits.clone()
    for i, (h, w) in enumerate(valid_hw.tolist()):
        out[i, :, h // 4 + 1:, :] = value
        out[i, :, :, w // 4 + 1:] = value
    return out


@pytest.mark.parametrize("resolution", ["gt", "low_res"])
def test_loss_ignores_predictions_in_padding(resolution: str) -> None:
    logits, iou_pred, gt, valid_hw = padded_case()
    cfg = LossConfig(resolution=resolution)
    valid = torch.ones(3, dtype=torch.bool)
    logits.requires_grad_(True)
    out = sam_loss([(logits, iou_pred)], gt, valid, 3, cfg, valid_hw=valid_hw)
    out["loss"].backward()
    for value in (30.0, -30.0, float("inf")):  # confident fg, bg, even non-finite
        other = sam_loss([(scribble_padding(logits.detach(), valid_hw, value), iou_pred)], gt, valid, 3, cfg,
                         valid_hw=valid_hw)
        for key in out:
            torch.testing.assert_close(other[key], out[key].detach(), rtol=0, atol=0)
    untouched = scribble_padding(torch.ones_like(logits), valid_hw, 0.0) == 0
    assert (logits.grad[untouched] == 0).all()  # no gradient from the padding
    # Without the valid region the same change does move the loss (the test can fail).
    whole = sam_loss([(logits.detach(), iou_pred)], gt, valid, 3, cfg)["loss"]
    moved = sam_loss([(scribble_padding(logits.detach(), valid_hw, 30.0), iou_pred)], gt, valid, 3, cfg)["loss"]
    assert not torch.allclose(whole, moved)


def test_focal_and_dice_average_over_image_pixels() -> None:
    """Easy padding pixels no longer dilute the mean: one wrong pixel in a 2-pixel image."""
    logits = torch.tensor([[[[-10.0, -10.0, -10.0, -10.0]]]])  # confident background everywhere
    gt = torch.tensor([[[True, False, False, False]]])
    region = torch.tensor([[[True, True, False, False]]])
    per_pixel = focal_loss(logits[..., :1], gt[..., :1])  # the one wrong pixel's loss
    assert focal_loss(logits, gt, region=region).item() == pytest.approx(per_pixel.item() / 2)
    assert focal_loss(logits, gt).item() == pytest.approx(per_pixel.item() / 4)
    assert dice_loss(logits, gt, region).item() == pytest.approx(dice_loss(logits[..., :2], gt[..., :2]).item())


def test_iou_target_counts_only_image_pixels() -> None:
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True
    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, :2, :] = True  # the image is the top half
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0
    logits[0, 0, 2:, :] = 5.0  # "foreground" predicted in the padding
    assert mask_iou(logits, gt, region).item() == pytest.approx(1.0)
    assert mask_iou(logits, gt).item() == pytest.approx(4 / 12)


def test_region_follows_the_low_res_rule() -> None:
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, :10, :16] = True
    small = match_region(region, torch.zeros(1, 3, 4, 4))
    assert small[0, :, 0].tolist() == [True, True, True, False]  # cell 2 is 2/4 image: kept
    assert match_region(region, torch.zeros(1, 3, 16, 16)) is region
