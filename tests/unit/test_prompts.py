"""Prompt sampling: placement, labels, box-noise statistics, round plan, determinism."""

from __future__ import annotations

import pytest
import torch

from trainer.prompts import (
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_NEGATIVE,
    LABEL_PAD,
    LABEL_POSITIVE,
    PromptConfig,
    boxes_from_masks,
    image_region,
    noisy_boxes,
    num_prompts_per_round,
    prompts_per_row,
    sample_correction_points,
    sample_initial_prompts,
    sample_points_in_region,
    sample_round_plan,
    use_multimask,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_masks(n: int, size: int, seed: int) -> torch.Tensor:
    """Random rectangles plus salt noise, some tiny; N×size×size bool."""
    g = gen(seed)
    masks = torch.rand(n, size, size, generator=g) < 0.02
    corners = torch.randint(0, size - 4, (n, 2), generator=g)
    sides = torch.randint(1, size // 2, (n, 2), generator=g)
    for i in range(n):
        y, x = corners[i].tolist()
        h, w = sides[i].tolist()
        masks[i, y:y + h, x:x + w] = True
    return masks


def at(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Value of masks N×H×W at coords N×2 (x, y)."""
    rows = torch.arange(masks.shape[0])
    return masks[rows, coords[:, 1].long(), coords[:, 0].long()]


def test_points_inside_region_and_empty_flag() -> None:
    masks = random_masks(200, 32, seed=1)
    masks[7] = False
    coords, exists = sample_points_in_region(masks, gen())
    assert coords.shape == (200, 2) and coords.dtype == torch.float32
    assert not exists[7] and exists.sum() == 199
    assert at(masks, coords)[exists].all()
    assert (coords == coords.round()).all()


def test_point_sampler_is_uniform() -> None:
    # One 4-pixel region sampled many times: each pixel ~1/4 of the draws.
    region = torch.zeros(20_000, 6, 6, dtype=torch.bool)
    region[:, 1, 1] = region[:, 1, 4] = region[:, 3, 2] = region[:, 5, 5] = True
    coords, _ = sample_points_in_region(region, gen(3))
    flat = (coords[:, 1] * 6 + coords[:, 0]).long()
    freq = torch.bincount(flat, minlength=36)[[7, 10, 20, 35]].float() / 20_000
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.015)


def test_boxes_from_masks_inclusive_corner() -> None:
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    assert boxes_from_masks(masks).tolist() == [[3, 2, 8, 4], [0, 0, 0, 0]]


def test_initial_prompts_point_inside_and_box_layout() -> None:
    masks = random_masks(300, 48, seed=2)
    boxes = boxes_from_masks(masks)
    coords, labels = sample_initial_prompts(masks, boxes, PromptConfig(), gen())
    assert coords.shape == (300, 2, 2) and labels.shape == (300, 2)
    is_point = labels[:, 0] == LABEL_POSITIVE
    is_box = labels[:, 0] == LABEL_BOX_TOP_LEFT
    assert (is_point | is_box).all()
    assert (labels[is_point, 1] == LABEL_PAD).all()
    assert (labels[is_box, 1] == LABEL_BOX_BOTTOM_RIGHT).all()
    assert at(masks, coords[:, 0])[is_point].all()
    assert 0.4 < is_box.float().mean() < 0.6  # prob_box = 0.5
    assert (coords >= 0).all() and (coords <= 48).all()


def test_initial_prompts_prob_box_extremes_and_empty_mask() -> None:
    masks = random_masks(20, 16, seed=3)
    masks[0] = False
    boxes = boxes_from_masks(masks)
    _, labels = sample_initial_prompts(masks, boxes, PromptConfig(prob_box=1.0), gen())
    assert (labels == torch.tensor([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT])).all()
    _, labels = sample_initial_prompts(masks, boxes, PromptConfig(prob_box=0.0), gen())
    assert labels[0].tolist() == [LABEL_PAD, LABEL_PAD]
    assert (labels[1:, 0] == LABEL_POSITIVE).all()


@pytest.mark.parametrize(("side", "expected_std"), [(50.0, 5.0), (150.0, 15.0), (400.0, 20.0)])
def test_box_noise_scale_and_cap(side: float, expected_std: float) -> None:
    # Width `side`, height side/2: x noise uses the width, y noise the height (capped).
    n = 20_000
    boxes = torch.tensor([[600.0, 600.0, 600.0 + side, 600.0 + side / 2]]).expand(n, 4)
    noisy = noisy_boxes(boxes, (4096, 4096), PromptConfig(), gen(4))
    std = (noisy - boxes).std(dim=0)
    expected_y = min(0.1 * side / 2, 20.0)
    expected = torch.tensor([expected_std, expected_y, expected_std, expected_y])
    assert torch.allclose(std, expected, rtol=0.03)
    assert (noisy - boxes).mean(dim=0).abs().max() < 0.05 * expected_std + 0.05


def test_box_noise_clamped_to_frame() -> None:
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(1000, 4)
    noisy = noisy_boxes(boxes, (64, 64), PromptConfig(), gen(5))
    assert (noisy >= 0).all() and (noisy <= 64).all()


def test_correction_points_land_in_error_with_right_label() -> None:
    gt = random_masks(400, 32, seed=6)
    pred = random_masks(400, 32, seed=7)
    coords, labels = sample_correction_points(pred, gt, PromptConfig(), gen())
    assert coords.shape == (400, 1, 2) and labels.shape == (400, 1)
    pt = coords[:, 0]
    fn, fp = at(gt & ~pred, pt), at(pred & ~gt, pt)
    assert (fn | fp).all()
    assert (labels[fn, 0] == LABEL_POSITIVE).all()
    assert (labels[fp, 0] == LABEL_NEGATIVE).all()
    assert fn.any() and fp.any()


def test_correction_on_perfect_prediction() -> None:
    gt = random_masks(10, 16, seed=8)
    gt[9] = True  # GT covers the frame: no background either
    coords, labels = sample_correction_points(gt, gt, PromptConfig(), gen())
    assert (labels[:9, 0] == LABEL_NEGATIVE).all()
    assert not at(gt[:9], coords[:9, 0]).any()  # a background point
    assert labels[9, 0] == LABEL_PAD
    _, labels = sample_correction_points(gt, gt, PromptConfig(empty_error_policy="pad"), gen())
    assert (labels == LABEL_PAD).all()


def test_round_plan_default() -> None:
    cfg = PromptConfig()
    for seed in range(50):
        plan = sample_round_plan(cfg, gen(seed))
        assert len(plan) == cfg.num_rounds == 11
        assert plan[0] is True
        assert sum(plan[1:]) == 8  # correction points
        assert plan.count(False) == 2 and plan[-1] is False
        inserted = plan.index(False)
        assert 1 <= inserted <= 8 and plan[inserted + 1] is True  # among the 8
    slots = {sample_round_plan(cfg, gen(s)).index(False) for s in range(200)}
    assert slots == set(range(1, 9))


def test_round_plan_configurable() -> None:
    plan = sample_round_plan(PromptConfig(num_correction_points=3, num_no_point_rounds=3), gen())
    assert len(plan) == 7 and sum(plan) == 4 and plan[-1] is False and plan[-2] is True
    assert sample_round_plan(PromptConfig(num_correction_points=0, num_no_point_rounds=1), gen()) == [
        True, False
    ]
    assert sample_round_plan(PromptConfig(num_no_point_rounds=0), gen()) == [True] * 9


def test_multimask_rule() -> None:
    plan = [True, False, True, True, False]
    counts = num_prompts_per_round(plan)
    assert counts == [1, 1, 2, 3, 3]
    assert [use_multimask(c) for c in counts] == [True, True, False, False, False]


def test_same_seed_same_output() -> None:
    masks = random_masks(64, 32, seed=9)
    boxes = boxes_from_masks(masks)
    pred = random_masks(64, 32, seed=10)
    cfg = PromptConfig()

    def run(seed: int) -> list[torch.Tensor]:
        g = gen(seed)
        c, l = sample_initial_prompts(masks, boxes, cfg, g)
        c2, l2 = sample_correction_points(pred, masks, cfg, g)
        plan = torch.tensor(sample_round_plan(cfg, g))
        return [c, l, c2, l2, plan]

    for a, b in zip(run(11), run(11)):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(run(11), run(12)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prob_box": 1.5},
        {"box_noise_frac": -0.1},
        {"box_noise_max_px": -1.0},
        {"num_correction_points": -1},
        {"num_no_point_rounds": -1},
        {"num_correction_points": 0, "num_no_point_rounds": 2},
        {"empty_error_policy": "nope"},
    ],
)
def test_config_validation_names_field(kwargs: dict) -> None:
    field = next(iter(kwargs)) if len(kwargs) == 1 else "num_no_point_rounds"
    with pytest.raises(ValueError, match=field):
        PromptConfig(**kwargs)


# ------------------------------------------------- valid region: padding is not image (point 18)


def random_valid_hw(n: int, size: int, seed: int) -> torch.Tensor:
    """N×2 (h, w): one side the full frame, the other 1/3 to all of it (SA-1B 3:2 and 4:3)."""
    g = gen(seed)
    short = torch.randint(size // 3, size + 1, (n,), generator=g)
    full = torch.full((n,), size)
    portrait = torch.rand(n, generator=g) < 0.5
    return torch.stack([torch.where(portrait, full, short), torch.where(portrait, short, full)], dim=1)


def test_image_region_is_the_top_left_rectangle() -> None:
    region = image_region(torch.tensor([[2, 3], [4, 1]]), (4, 5))
    assert region.shape == (2, 4, 5)
    assert region[0].int().tolist() == [[1, 1, 1, 0, 0]] * 2 + [[0] * 5] * 2
    assert region[1].int().tolist() == [[1, 0, 0, 0, 0]] * 4


@pytest.mark.parametrize("policy", ["background", "pad"])
def test_no_correction_point_lands_in_padding(policy: str) -> None:
    """Over 50 seeds × 64 masks of random image sizes, no click lands in the padding:
    neither when the prediction spills over the whole frame (even seeds) nor when its
    only error is in the padding (odd seeds: then the image holds no error at all)."""
    size, n = 48, 64
    cfg = PromptConfig(empty_error_policy=policy)
    for seed in range(50):
        hw = random_valid_hw(n, size, seed)
        region = image_region(hw, (size, size))
        gt = random_masks(n, size, seed) & region
        if seed % 2 == 0:
            pred = torch.ones(n, size, size, dtype=torch.bool)  # FP everywhere
        else:
            pred = gt | ~region  # perfect inside the image, all wrong in the padding
        coords, labels = sample_correction_points(pred, gt, cfg, gen(seed), region)
        x, y = coords[:, 0, 0], coords[:, 0, 1]
        placed = labels[:, 0] != LABEL_PAD
        assert ((x < hw[:, 1]) & (y < hw[:, 0]))[placed].all(), seed
        if seed % 2 == 0 or policy == "background":
            assert placed.all(), seed  # an error (or background) point inside the image
        else:
            assert not placed.any(), seed  # "pad": no error inside the image, no click
        if seed % 2 == 1 and policy == "background":
            assert (labels[:, 0] == LABEL_NEGATIVE).all()


def test_noisy_boxes_clamped_to_each_image() -> None:
    boxes = torch.tensor([[0.0, 0.0, 99.0, 59.0], [0.0, 0.0, 59.0, 99.0]]).repeat(500, 1)
    hw = torch.tensor([[60, 100], [100, 60]]).repeat(500, 1)
    noisy = noisy_boxes(boxes, hw, PromptConfig(), gen(3))
    assert (noisy >= 0).all()
    # Corners are inclusive pixel indices: at most the last pixel, w - 1 and h - 1.
    assert (noisy[:, [0, 2]] <= hw[:, 1:2] - 1).all() and (noisy[:, [1, 3]] <= hw[:, 0:1] - 1).all()
    assert (noisy[0::2, 2] == 99.0).any() and (noisy[1::2, 3] == 99.0).any()  # clamps were reached


# ------------------------------------------------------- box rule: single vs multi-mask (point 16)


def test_a_box_is_two_prompts_by_default() -> None:
    """SAM_RECIPE.md §1 "Single vs multi-mask", §3: SAM 2 encodes a box as two points."""
    is_box = torch.tensor([False, True])
    assert use_multimask(prompts_per_row(1, is_box, PromptConfig())).tolist() == [True, False]
    assert use_multimask(prompts_per_row(2, is_box, PromptConfig())).tolist() == [False, False]
    flipped = PromptConfig(box_multimask=True)
    assert use_multimask(prompts_per_row(1, is_box, flipped)).tolist() == [True, True]
    assert use_multimask(prompts_per_row(2, is_box, flipped)).tolist() == [False, False]
