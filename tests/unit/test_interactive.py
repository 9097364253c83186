"""The 11-round simulation with the tiny model: rounds, tokens, feedback, gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.interactive import (
    RoundOutput,
    predicted_masks,
    select_feedback_mask,
    simulate_interaction,
)
from trainer.loss import LossConfig, sam_loss
from trainer.prompts import LABEL_BOX_TOP_LEFT, LABEL_NEGATIVE, LABEL_PAD, LABEL_POSITIVE, PromptConfig, image_region

NUM_IMAGES, NUM_MASKS, SIZE = 2, 6, 256


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    from trainer.model import build_sam

    torch.manual_seed(0)
    return build_sam("tiny")


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(NUM_IMAGES, 64, 16, 16, generator=g, requires_grad=True)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1])
    gt = torch.zeros(NUM_MASKS, SIZE, SIZE, dtype=torch.bool)
    for i in range(NUM_MASKS):
        y, x = torch.randint(0, SIZE // 2, (2,), generator=g).tolist()
        gt[i, y:y + 40 + 10 * i, x:x + 60] = True
    return embeddings, image_index, gt


def run(sam: torch.nn.Module, seed: int = 0, **cfg: object) -> tuple[list[RoundOutput], torch.Tensor, torch.Tensor]:
    embeddings, image_index, gt = make_batch()
    g = torch.Generator().manual_seed(seed)
    outputs = simulate_interaction(sam, embeddings, image_index, gt, None, PromptConfig(**cfg), g)
    return outputs, embeddings, gt


@pytest.fixture(scope="module")
def simulated(sam: torch.nn.Module) -> tuple[list[RoundOutput], torch.Tensor, torch.Tensor]:
    """One default 11-round run with autograd on, shared by the read-only tests."""
    return run(sam)


def plan_of(outputs: list[RoundOutput]) -> list[bool]:
    """Recover which rounds added a point from the growing prompt tensors."""
    sizes = [o.point_labels.shape[1] for o in outputs]
    return [True] + [b > a for a, b in itertools.pairwise(sizes)]


def test_eleven_rounds_tokens_and_multimask(simulated: tuple[list[RoundOutput], torch.Tensor, torch.Tensor]) -> None:
    outputs, _, _ = simulated
    assert len(outputs) == 11
    plan = plan_of(outputs)
    assert sum(plan[1:]) == 8 and plan[-1] is False and plan.count(False) == 2
    num_points = 0
    for idx, (out, adds) in enumerate(zip(outputs, plan)):
        num_points += int(adds and idx > 0)
        # Two round-1 tokens (point + pad, or two box corners) plus one per correction.
        assert out.num_sparse_tokens == 2 + num_points
        assert out.point_coords.shape == (NUM_MASKS, 2 + num_points, 2)
        assert out.multimask == (num_points == 0)
        k = 3 if out.multimask else 1
        assert out.low_res_masks.shape == (NUM_MASKS, k, 64, 64)
        assert out.iou_pred.shape == (NUM_MASKS, k)
        assert (out.mask_input is None) == (idx == 0)
        if idx > 0:  # earlier prompts are kept: points accumulate
            prev = outputs[idx - 1].point_coords
            assert torch.equal(out.point_coords[:, : prev.shape[1]], prev)


def test_fed_back_mask_is_highest_iou(simulated: tuple[list[RoundOutput], torch.Tensor, torch.Tensor]) -> None:
    outputs, _, _ = simulated
    for prev, cur in itertools.pairwise(outputs):
        best = prev.iou_pred.argmax(dim=1)
        expected = prev.low_res_masks[torch.arange(NUM_MASKS), best].unsqueeze(1)
        assert torch.equal(cur.mask_input, expected)
        assert cur.mask_input.grad_fn is not None  # not detached
    # The selection itself, on a hand-made case.
    masks = torch.arange(2 * 3.0).view(2, 3, 1, 1)
    iou = torch.tensor([[0.1, 0.9, 0.2], [0.7, 0.1, 0.3]])
    assert select_feedback_mask(masks, iou).flatten().tolist() == [1.0, 3.0]


def test_correction_points_come_from_error_region(simulated: tuple[list[RoundOutput], torch.Tensor, torch.Tensor]) -> None:
    outputs, _, gt = simulated
    rows = torch.arange(NUM_MASKS)
    checked = 0
    for prev, cur in itertools.pairwise(outputs):
        if cur.point_labels.shape[1] == prev.point_labels.shape[1]:
            continue
        pred = predicted_masks(cur.mask_input, (SIZE, SIZE))
        x, y = cur.point_coords[:, -1, 0].long(), cur.point_coords[:, -1, 1].long()
        label = cur.point_labels[:, -1]
        has_error = (pred ^ gt).flatten(1).any(dim=1)
        in_error = (pred ^ gt)[rows, y, x]
        assert in_error[has_error].all()
        assert (label == torch.where(gt[rows, y, x], LABEL_POSITIVE, LABEL_NEGATIVE)).all()
        checked += 1
    assert checked == 8


def test_gradient_reaches_image_embeddings(
    sam: torch.nn.Module, simulated: tuple[list[RoundOutput], torch.Tensor, torch.Tensor]
) -> None:
    outputs, embeddings, gt = simulated
    valid = torch.ones(NUM_MASKS, dtype=torch.bool)
    rounds = [(o.low_res_masks, o.iou_pred) for o in outputs]
    loss = sam_loss(rounds, gt, valid, num_masks=NUM_MASKS, cfg=LossConfig())["loss"]
    sam.zero_grad()
    loss.backward()
    assert embeddings.grad is not None
    assert embeddings.grad[0].abs().sum() > 0 and embeddings.grad[1].abs().sum() > 0
    assert sam.prompt_encoder.mask_downscaling[0].weight.grad.abs().sum() > 0  # fed-back path


def test_single_image_broadcast_matches_gather(sam: torch.nn.Module) -> None:
    embeddings, _, gt = make_batch()
    one = embeddings[:1].detach()
    index = torch.zeros(NUM_MASKS, dtype=torch.long)
    cfg = PromptConfig()
    with torch.no_grad():
        a = simulate_interaction(sam, one, index, gt, None, cfg, torch.Generator().manual_seed(3))
        b = simulate_interaction(
            sam, one.expand(2, -1, -1, -1), index, gt, None, cfg, torch.Generator().manual_seed(3)
        )
    for x, y in zip(a, b):
        assert torch.allclose(x.low_res_masks, y.low_res_masks, atol=1e-5)


def test_same_seed_same_rounds(sam: torch.nn.Module) -> None:
    with torch.no_grad():
        a, _, _ = run(sam, seed=5, num_correction_points=3)
        b, _, _ = run(sam, seed=5, num_correction_points=3)
    for x, y in zip(a, b):
        assert torch.equal(x.point_coords, y.point_coords)
        assert torch.equal(x.point_labels, y.point_labels)
        assert torch.equal(x.low_res_masks, y.low_res_masks)


def test_configurable_round_count(sam: torch.nn.Module) -> None:
    with torch.no_grad():
        outputs, _, _ = run(sam, num_correction_points=2, num_no_point_rounds=1)
    assert len(outputs) == 4
    assert [o.num_sparse_tokens for o in outputs] == [2, 3, 4, 4]
    assert [o.multimask for o in outputs] == [True, False, False, False]


def test_checkpointed_rounds_give_the_same_loss_and_gradients(sam: torch.nn.Module) -> None:
    results = []
    for checkpoint_rounds in (False, True):
        sam.zero_grad()
        embeddings, image_index, gt = make_batch(seed=3)
        g = torch.Generator().manual_seed(7)
        outputs = simulate_interaction(sam, embeddings, image_index, gt, None, PromptConfig(), g,
                                       checkpoint_rounds=checkpoint_rounds)
        loss = sam_loss([(o.low_res_masks, o.iou_pred) for o in outputs], gt,
                        torch.ones(NUM_MASKS, dtype=torch.bool), NUM_MASKS, LossConfig())["loss"]
        loss.backward()
        grads = [p.grad.clone() for p in sam.mask_decoder.parameters() if p.grad is not None]
        results.append((loss.detach(), embeddings.grad.clone(), grads))
    (l0, e0, g0), (l1, e1, g1) = results
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(e0, e1)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------- box rule: single vs multi-mask (point 16)


def decode(sam: torch.nn.Module, embeddings: torch.Tensor, out: RoundOutput, multimask: bool) -> torch.Tensor:
    """The official decoder call for a round's prompts (masks N×K×4h×4w)."""
    sparse, dense = sam.prompt_encoder(points=(out.point_coords, out.point_labels), boxes=None,
                                       masks=out.mask_input, pad_points=False)
    return sam.mask_decoder(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                            multimask_output=multimask)[0]


def test_round1_box_gets_single_mask_and_point_gets_three(sam: torch.nn.Module) -> None:
    """SAM_RECIPE.md §1 "Single vs multi-mask", §3: a box is two corner prompts (SAM 2)."""
    embeddings, image_index, gt = make_batch()
    emb = embeddings.detach()[image_index]
    for seed in range(20):  # until round 1 mixes boxes and points
        with torch.no_grad():
            outputs = simulate_interaction(sam, emb, torch.arange(NUM_MASKS), gt, None, PromptConfig(),
                                           torch.Generator().manual_seed(seed))
        is_box = outputs[0].point_labels[:, 0] == LABEL_BOX_TOP_LEFT
        if 0 < int(is_box.sum()) < NUM_MASKS:
            break
    first = outputs[0]
    assert torch.equal(first.multimask_rows, ~is_box)
    assert first.low_res_masks.shape[1] == 3
    with torch.no_grad():
        single, multi = decode(sam, emb, first, False), decode(sam, emb, first, True)
    torch.testing.assert_close(first.low_res_masks[~is_box], multi[~is_box])
    # A box row carries its single-mask output in all three slots.
    torch.testing.assert_close(first.low_res_masks[is_box], single[is_box].expand(-1, 3, -1, -1))
    # The no-point round right after round 1 keeps the rule; later rounds are single.
    for out in outputs[1:]:
        expected = ~is_box & (out.num_sparse_tokens == 2)
        assert torch.equal(out.multimask_rows, expected)


def test_box_multimask_setting_flips_the_rule(sam: torch.nn.Module) -> None:
    with torch.no_grad():
        outputs, _, _ = run(sam, seed=1, prob_box=1.0, box_multimask=True)
    assert outputs[0].multimask and outputs[0].multimask_rows.all()
    with torch.no_grad():
        outputs, _, _ = run(sam, seed=1, prob_box=1.0)
    assert not outputs[0].multimask and outputs[0].low_res_masks.shape[1] == 1
    with torch.no_grad():
        outputs, _, _ = run(sam, seed=1, prob_box=0.0)
    assert outputs[0].multimask_rows.all() and outputs[0].low_res_masks.shape[1] == 3


def test_all_box_step_still_reaches_every_decoder_parameter(sam: torch.nn.Module) -> None:
    """DDP without find_unused_parameters needs a gradient (zero is fine) on every parameter."""
    sam.zero_grad()
    outputs, _, gt = run(sam, seed=2, prob_box=1.0, num_correction_points=1, num_no_point_rounds=0)
    rounds = [(o.low_res_masks, o.iou_pred) for o in outputs]
    sam_loss(rounds, gt, torch.ones(NUM_MASKS, dtype=torch.bool), NUM_MASKS, LossConfig())["loss"].backward()
    missing = [n for n, p in sam.mask_decoder.named_parameters() if p.grad is None]
    assert missing == []


# ------------------------------------------------- padding is not image (point 18)


def test_no_click_or_box_in_padding(sam: torch.nn.Module) -> None:
    """Whole simulation with each mask's unpadded size: every click and box is in its image."""
    embeddings, image_index, gt = make_batch()
    valid_hw = torch.tensor([[256, 150], [170, 256]])[image_index]  # image 0 portrait, 1 landscape
    gt &= image_region(valid_hw, (SIZE, SIZE))
    for seed in range(4):
        with torch.no_grad():
            outputs = simulate_interaction(sam, embeddings.detach(), image_index, gt, None, PromptConfig(),
                                           torch.Generator().manual_seed(seed), valid_hw=valid_hw)
        last = outputs[-1]
        x, y = last.point_coords[..., 0], last.point_coords[..., 1]
        placed = last.point_labels != LABEL_PAD
        assert (x <= valid_hw[:, 1:2])[placed].all() and (y <= valid_hw[:, 0:1])[placed].all()
        clicks = placed & (last.point_labels <= LABEL_POSITIVE)  # points, not box corners
        assert (x < valid_hw[:, 1:2])[clicks].all() and (y < valid_hw[:, 0:1])[clicks].all()
