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
from trainer.prompts import LABEL_NEGATIVE, LABEL_POSITIVE, PromptConfig

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
