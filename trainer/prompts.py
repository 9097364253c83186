"""Prompt sampling for SAM's interactive training simulation (SAM_RECIPE.md §1, "Interactive simulation").

Pure tensor functions: masks and a ``torch.Generator`` in, point coordinates and labels
out. Everything is batched over all masks of a step on the masks' device; there is no
Python loop over masks or images, so the per-step cost does not grow with Python
overhead per mask.

Coordinate frame: every coordinate is ``(x, y)`` in pixels of the S×S model input frame
(the image resized longest-side-to-S and zero-padded bottom/right). Sampled points are
integer pixel indices stored as float; the prompt encoder adds 0.5 to hit the pixel
centre, exactly as the official ``PromptEncoder`` does for user clicks.

Valid region: an image is zero-padded to S×S (33% padding for a 3:2 SA-1B photo), and
no user clicks on padding. Given each mask's unpadded size ``valid_hw`` (N×2 ``(h, w)``,
``Batch.input_sizes`` of its image), correction points and background points are
sampled only inside ``[0, w) × [0, h)`` and noisy boxes are clamped to it (our choice;
the paper is silent, SAM_RECIPE.md §1 "Interactive simulation"). ``valid_hw=None`` keeps
the whole frame.

Labels follow the prompt encoder: 1 positive point, 0 negative point, -1 padding,
2 / 3 box top-left / bottom-right corner. A box is therefore two "points", and a
point-prompted round-1 row is ``[pt(1), pad(-1)]`` so that point and box rows have the
same token count and batch into one decoder call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LABEL_PAD = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3

EMPTY_ERROR_POLICIES = ("background", "pad")


@dataclass(kw_only=True)
class PromptConfig:
    """Prompt simulation settings. Defaults are the paper's (SAM_RECIPE.md §1).

    Attributes:
        prob_box: probability that round 1 uses the (noisy) GT box instead of one
            positive point. Paper: 0.5.
        box_noise_frac: std of the Gaussian noise added to each box coordinate, as a
            fraction of the box side (width for x, height for y). Paper: 10%.
        box_noise_max_px: cap on that std, in input-frame pixels. Paper: 20 px.
        num_correction_points: rounds that each add one point sampled from the error
            region. Paper: 8.
        num_no_point_rounds: rounds that add no point (the fed-back mask is the only
            new input). Paper: 2 — one always last, the other(s) at random slots
            among the correction rounds (see ``sample_round_plan``).
        empty_error_policy: what a correction round does for a mask whose prediction
            is perfect (empty error region); paper silent. ``"background"`` (default,
            SAM2's choice): a negative point sampled uniformly from the background
            (inside the image when the valid region is known), which keeps every
            row's prompt count equal to the one the multimask rule assumes
            (``prompts_per_row``). ``"pad"``: a padding point
            (label -1) that the prompt encoder ignores.
        box_multimask: whether a round-1 box alone gets the 3 multimask outputs.
            ``False`` (default): SAM 2's rule, a box is two corner prompts, so it gets
            the single-mask output (token 0), as the official predictor is commonly
            called with ``box=..., multimask_output=False``. ``True``: a box counts as
            one prompt like a single point. The paper does not say (SAM_RECIPE.md §1
            "Single vs multi-mask"; §3 "Prompts": S2 encodes a box as 2 points).
    """

    prob_box: float = 0.5
    box_noise_frac: float = 0.1
    box_noise_max_px: float = 20.0
    num_correction_points: int = 8
    num_no_point_rounds: int = 2
    empty_error_policy: str = "background"
    box_multimask: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob_box <= 1.0:
            raise ValueError(f"prompts.prob_box must be in [0, 1], got {self.prob_box}")
        if self.box_noise_frac < 0:
            raise ValueError(f"prompts.box_noise_frac must be >= 0, got {self.box_noise_frac}")
        if self.box_noise_max_px < 0:
            raise ValueError(
                f"prompts.box_noise_max_px must be >= 0, got {self.box_noise_max_px}"
            )
        if self.num_correction_points < 0:
            raise ValueError(
                f"prompts.num_correction_points must be >= 0, got {self.num_correction_points}"
            )
        if self.num_no_point_rounds < 0:
            raise ValueError(
                f"prompts.num_no_point_rounds must be >= 0, got {self.num_no_point_rounds}"
            )
        if self.num_no_point_rounds > 1 and self.num_correction_points == 0:
            raise ValueError(
                "prompts.num_no_point_rounds > 1 needs num_correction_points >= 1 "
                "(the extra no-point rounds are inserted among the correction rounds)"
            )
        if self.empty_error_policy not in EMPTY_ERROR_POLICIES:
            raise ValueError(
                f"prompts.empty_error_policy must be one of {EMPTY_ERROR_POLICIES}, "
                f"got {self.empty_error_policy!r}"
            )

    @property
    def num_rounds(self) -> int:
        """Total rounds: 1 initial + corrections + no-point rounds (paper: 11)."""
        return 1 + self.num_correction_points + self.num_no_point_rounds


def image_region(valid_hw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The unpadded image pixels of each mask's input frame.

    Args:
        valid_hw: N×2 int ``(h, w)``, the image size after resize and before padding.
        size: (H, W) of the (padded) frame.

    Returns:
        N×H×W bool, True at ``y < h`` and ``x < w`` (images are padded bottom/right).
    """
    h, w = size
    ys = torch.arange(h, device=valid_hw.device)
    xs = torch.arange(w, device=valid_hw.device)
    rows = ys.view(1, h) < valid_hw[:, 0:1]  # N×H
    cols = xs.view(1, w) < valid_hw[:, 1:2]  # N×W
    return rows.unsqueeze(2) & cols.unsqueeze(1)


def sample_points_in_region(
    region: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one pixel uniformly from each row's region.

    Vectorized with cumsum + searchsorted: draw k uniform in [0, count) per row and find
    the (k+1)-th True pixel. Exactly uniform, and only N random numbers are drawn (vs
    N·H·W for random-score + argmax).

    Args:
        region: N×H×W bool.
        generator: on ``region.device``.

    Returns:
        coords: N×2 float, ``(x, y)`` integer pixel indices in the H×W frame
            ((0, 0) where the region is empty).
        exists: N bool, False where the region is empty.
    """
    n, h, w = region.shape
    flat = region.reshape(n, h * w).to(torch.int32)
    # int32 is enough for H·W < 2^31 and halves the memory of the running count.
    cumsum = torch.cumsum(flat, dim=1, dtype=torch.int32)
    count = cumsum[:, -1]
    u = torch.rand(n, generator=generator, device=region.device)
    k = (u * count.float()).floor().to(torch.int32)
    k = torch.minimum(k, (count - 1).clamp(min=0))  # guard u·count rounding up to count
    target = (k + 1).unsqueeze(1)
    index = torch.searchsorted(cumsum, target).squeeze(1).clamp(max=h * w - 1)
    exists = count > 0
    index = torch.where(exists, index, torch.zeros_like(index))
    coords = torch.stack([index % w, torch.div(index, w, rounding_mode="floor")], dim=1)
    return coords.to(torch.float32), exists


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes of boolean masks, in segment-anything's convention
    (``utils/amg.batched_mask_to_box``): x1/y1 are the last mask column/row (inclusive),
    the same as the data pipeline's ``Batch.boxes``.

    Args:
        masks: N×H×W bool.

    Returns:
        N×4 float ``(x0, y0, x1, y1)`` pixel indices; all zeros for empty masks.
    """
    h, w = masks.shape[-2:]
    cols = masks.any(dim=1)  # N×W
    rows = masks.any(dim=2)  # N×H
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    # Masked min/max without a loop: push absent columns out of range.
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    return torch.where(masks.flatten(1).any(dim=1, keepdim=True), boxes, 0.0)


def noisy_boxes(
    boxes: torch.Tensor,
    image_hw: tuple[int, int] | torch.Tensor,
    cfg: PromptConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Jitter boxes with Gaussian noise (SAM_RECIPE.md §1: std 10% of the side, ≤20 px).

    SAM's noise is Gaussian; SAM2's uniform ±bound is a different choice (recipe
    "Discrepancies" 7). Coordinates are clamped to the image, ``[0, w] × [0, h]``: the
    unpadded size per row when given (corners are inclusive pixel indices, so at most
    ``w - 1``, ``h - 1``), so a box never reaches into the padding (the
    paper is silent). Corners are not re-sorted: a flipped box is rare at these noise
    levels and still a valid, if odd, prompt.

    Args:
        boxes: N×4 float XYXY pixels in the input frame.
        image_hw: (H, W) of the input frame, or N×2 ``(h, w)`` per row (``valid_hw``).

    Returns:
        N×4 float XYXY.
    """
    if isinstance(image_hw, torch.Tensor):
        hw = image_hw.to(device=boxes.device, dtype=boxes.dtype)
        upper = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1) - 1  # N×4, last pixel
    else:
        h, w = image_hw
        upper = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=boxes.dtype, device=boxes.device)
    width = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    height = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    side = torch.stack([width, height, width, height], dim=1)
    std = (side * cfg.box_noise_frac).clamp(max=cfg.box_noise_max_px)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device) * std
    noisy = boxes + noise
    return torch.minimum(noisy.clamp(min=0), upper)


def sample_initial_prompts(
    gt_masks: torch.Tensor,
    gt_boxes: torch.Tensor,
    cfg: PromptConfig,
    generator: torch.Generator,
    valid_hw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-1 prompt per mask: a noisy box with ``prob_box``, else one positive point.

    Both kinds are two tokens so that all rows batch together: a point row is
    ``[pt(1), pad(-1)]`` and a box row is ``[top-left(2), bottom-right(3)]``. Empty
    (padding) masks get ``[pad, pad]`` when the point branch is drawn.

    Args:
        gt_masks: N×H×W bool, in the input frame.
        gt_boxes: N×4 float XYXY pixels, in the input frame.
        generator: on ``gt_masks.device``.
        valid_hw: N×2 ``(h, w)`` unpadded size per mask; boxes are clamped to it.

    Returns:
        coords: N×2×2 float ``(x, y)`` pixels; labels: N×2 int64.
    """
    n, h, w = gt_masks.shape
    device = gt_masks.device
    # Draw every random number for every row, whichever branch it takes, so the
    # random stream does not depend on the branch outcome.
    use_box = torch.rand(n, generator=generator, device=device) < cfg.prob_box
    point, exists = sample_points_in_region(gt_masks, generator)
    bounds = (h, w) if valid_hw is None else valid_hw
    box = noisy_boxes(gt_boxes.to(device=device, dtype=torch.float32), bounds, cfg, generator)

    point_coords = torch.stack([point, torch.zeros_like(point)], dim=1)
    box_coords = box.view(n, 2, 2)
    coords = torch.where(use_box.view(n, 1, 1), box_coords, point_coords)

    pos = torch.where(exists, LABEL_POSITIVE, LABEL_PAD)
    point_labels = torch.stack([pos, torch.full_like(pos, LABEL_PAD)], dim=1)
    box_labels = torch.tensor([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], device=device)
    labels = torch.where(use_box.view(n, 1), box_labels.expand(n, 2), point_labels)
    return coords, labels.to(torch.int64)


def sample_correction_points(
    pred_masks: torch.Tensor,
    gt_masks: torch.Tensor,
    cfg: PromptConfig,
    generator: torch.Generator,
    region: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One correction click per mask, uniform over the error region (SAM_RECIPE.md §1).

    The error region is (FN ∪ FP) ∩ ``region``: a prediction spilling into the padding is
    not an error a user can click on (see the module docstring). A point in a false negative (GT=1) is positive, one in a
    false positive (GT=0) is negative, so the label is simply GT at the point. Where the
    error region is empty, ``cfg.empty_error_policy`` decides: ``"background"`` samples
    a negative point from GT's background (padding if GT covers the whole frame);
    ``"pad"`` emits a padding point.

    Args:
        pred_masks: N×H×W bool, the previous prediction at input resolution.
        gt_masks: N×H×W bool.
        generator: on the masks' device.
        region: N×H×W bool clickable pixels (``image_region``), or None for the frame.

    Returns:
        coords: N×1×2 float ``(x, y)`` pixels; labels: N×1 int64.
    """
    error = pred_masks ^ gt_masks
    background = ~gt_masks
    if region is not None:
        error, background = error & region, background & region
    has_error = error.flatten(1).any(dim=1)
    if cfg.empty_error_policy == "background":
        # One sampler call: rows without error sample from the background instead.
        candidates = torch.where(has_error.view(-1, 1, 1), error, background)
    else:
        candidates = error
    point, exists = sample_points_in_region(candidates, generator)
    x = point[:, 0].long()
    y = point[:, 1].long()
    rows = torch.arange(gt_masks.shape[0], device=gt_masks.device)
    in_gt = gt_masks[rows, y, x]
    labels = torch.where(in_gt, LABEL_POSITIVE, LABEL_NEGATIVE)
    labels = torch.where(exists, labels, LABEL_PAD)
    return point.unsqueeze(1), labels.unsqueeze(1).to(torch.int64)


def sample_round_plan(cfg: PromptConfig, generator: torch.Generator) -> list[bool]:
    """Which rounds add a new prompt (SAM_RECIPE.md §1: 1 + 8 + 2 = 11 rounds).

    Round 0 is the initial prompt (always True). The last round is a no-point round
    (when ``num_no_point_rounds >= 1``). The other ``num_no_point_rounds - 1`` no-point
    rounds go to uniformly random slots among the correction rounds, each one
    followed by at least one correction round ("inserted among the 8" — our reading; it
    can sit right after round 1, where the fed-back mask is the only new input).

    One plan is shared by all masks of a step: every row must have the same token
    count to go through one decoder call (the multimask choice may differ per row, see
    ``trainer.interactive``). Draw it from a
    generator seeded identically on all ranks if ranks should share it (not required).

    Returns:
        list of ``num_rounds`` bools, True where the round adds a prompt.
    """
    num_extra = max(cfg.num_no_point_rounds - 1, 0)
    # The last correction round is fixed; the rest plus the extra no-point rounds are
    # shuffled, which places the no-point rounds uniformly among them.
    middle = [True] * max(cfg.num_correction_points - 1, 0) + [False] * num_extra
    device = generator.device
    order = torch.randperm(len(middle), generator=generator, device=device).tolist()
    plan = [True] + [middle[i] for i in order]
    if cfg.num_correction_points > 0:
        plan.append(True)
    if cfg.num_no_point_rounds > 0:
        plan.append(False)
    return plan


def num_prompts_per_round(plan: list[bool]) -> list[int]:
    """Prompts added up to each round, the round-1 point or box counting once.

    ``prompts_per_row`` turns this into each row's count under the box rule.
    """
    counts, total = [], 0
    for adds in plan:
        total += int(adds)
        counts.append(total)
    return counts


def prompts_per_row(num_prompts: int, is_box: torch.Tensor, cfg: PromptConfig) -> torch.Tensor:
    """Each row's prompt count in a round: a box is two prompts unless ``cfg.box_multimask``.

    Args:
        num_prompts: the round's count from ``num_prompts_per_round``.
        is_box: N bool, rows whose round-1 prompt is a box.

    Returns:
        N int64.
    """
    extra = 0 if cfg.box_multimask else 1
    return num_prompts + extra * is_box.to(torch.int64)


def use_multimask(num_prompts: int | torch.Tensor) -> bool | torch.Tensor:
    """Three masks for a single prompt, the single-mask token otherwise (SAM_RECIPE.md §1).

    Works on one count or on the N per-row counts of ``prompts_per_row``. With the
    default box rule a box is two prompts (SAM 2), so only a lone point gets 3 outputs;
    a no-point feedback round right after a point still has one prompt and stays
    multimask.
    """
    return num_prompts == 1
