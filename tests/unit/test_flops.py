"""The analytic FLOP counts of ``trainer.flops`` against ``torch.utils.flop_counter`` on the
real modules, against SAM_RECIPE.md §7, and the peak table / MFU helpers.

Two counts: the model's (what the official ``segment_anything`` modules compute; MFU
uses it) is checked on the official modules, the executed one (what our modules run,
``executed=True``: padding rows skipped, factored first decoder layer, few-token
attentions through the weights on CPU) on ours.

Counting runs under the math SDPA backend: on CPU the default fused kernel
(``_scaled_dot_product_flash_attention_for_cpu``) is missing from the counter's table
(its attention would count 0), and the math path's ``bmm`` are exactly the model FLOPs
(the fused kernels' backward formula adds a QKᵀ recompute, i.e. hardware FLOPs).
The ViT-B encoder runs on the meta device: shapes only, no compute.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer import flops
from trainer.interactive import simulate_interaction
from trainer.loss import LossConfig, sam_loss
from trainer.model.build import build_sam, spec_for
from trainer.model.reference import build_official_sam
from trainer.presets import tiny_cpu
from trainer.prompts import PromptConfig

#: The encoder and decoder counts are exact today; the brief allows 5%.
FORWARD_REL = 0.01


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs the counter sees while ``fn`` runs (forward, and backward if ``fn`` calls it)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@functools.cache
def official_sam(variant: str, device: str, **overrides: Any) -> torch.nn.Module:
    """The official ``Sam`` with the variant's sizes on ``device`` (random weights), once per
    configuration. The official point embedding's boolean indexing has no meta kernel, so
    decoder counts run on CPU."""
    with torch.device(device):
        return build_official_sam(spec_for(variant, **overrides))


def build(variant: str, device: str, **overrides: Any) -> torch.nn.Module:
    """The real model; on meta, ``.to`` also moves the prompt encoder's CPU-drawn PE buffer."""
    torch.manual_seed(0)
    with torch.device(device):
        sam = build_sam(variant, **overrides)
    return sam.to(device)


@pytest.mark.parametrize(("variant", "device", "overrides"), [
    ("tiny", "cpu", {}),
    ("tiny", "cpu", {"img_size": 320}),   # 20×20 grid: windows pad it to 24×24
    ("tiny", "cpu", {"window_size": 0}),  # every block global
    ("vit_b", "meta", {}),                # 1024², 64→70 padded windows
])
def test_encoder_forward_matches_counter(variant: str, device: str, overrides: dict[str, int]) -> None:
    """The model count on the official encoder, the executed count on ours; both are
    equal when no window pads the grid, and ours is smaller when one does."""
    sam = build(variant, device, **overrides)
    spec = spec_for(variant, **overrides)
    image = torch.zeros(1, 3, spec.img_size, spec.img_size, device=device)
    counted = count_flops(lambda: sam.image_encoder(image))
    official = count_flops(lambda: official_sam(variant, device, **overrides).image_encoder(image))
    assert flops.encoder_forward_flops(spec, executed=True) == pytest.approx(counted, rel=FORWARD_REL)
    assert flops.encoder_forward_flops(spec) == pytest.approx(official, rel=FORWARD_REL)
    pads = spec.window_size > 0 and spec.embedding_grid % spec.window_size
    assert (counted < 0.99 * official) if pads else counted == pytest.approx(official, rel=1e-6)


@pytest.mark.parametrize("variant", ["tiny", "vit_b"])
@pytest.mark.parametrize(("num_tokens", "with_mask"), [(2, False), (3, True), (10, True)])
def test_decoder_forward_matches_counter(variant: str, num_tokens: int, with_mask: bool) -> None:
    device = "cpu" if variant == "tiny" else "meta"
    sam = build(variant, device)
    spec = spec_for(variant)
    n, grid = 3, spec.embedding_grid
    embedding = torch.randn(1, spec.prompt_embed_dim, grid, grid, device=device)
    image_pe = sam.prompt_encoder.get_dense_pe()  # once per round for all masks: not per mask
    coords = torch.rand(n, num_tokens, 2, device=device) * spec.img_size
    labels = torch.ones(n, num_tokens, dtype=torch.long, device=device)
    mask_input = torch.randn(n, 1, 4 * grid, 4 * grid, device=device) if with_mask else None

    def our_round() -> None:
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_input, pad_points=False,
                                           factored=True)
        sam.mask_decoder(embedding, image_pe, sparse, dense, multimask_output=num_tokens == 2)

    official = official_sam(variant, "cpu")
    prompt, decoder = official.prompt_encoder, official.mask_decoder
    cpu = {"embedding": torch.randn(1, spec.prompt_embed_dim, grid, grid),
           "mask": None if mask_input is None else torch.randn(n, 1, 4 * grid, 4 * grid),
           # The official encoder appends the padding point itself (boxes=None): one token less.
           "coords": torch.rand(n, num_tokens - 1, 2) * spec.img_size,
           "labels": torch.ones(n, num_tokens - 1, dtype=torch.long)}

    def official_round() -> None:
        sparse, dense = prompt(points=(cpu["coords"], cpu["labels"]), boxes=None, masks=cpu["mask"])
        decoder(cpu["embedding"], prompt.get_dense_pe(), sparse, dense, multimask_output=num_tokens == 2)

    per_mask_model = count_flops(official_round) / n
    executed = count_flops(our_round)
    assert flops.decoder_forward_flops(spec, num_tokens, with_mask) == pytest.approx(per_mask_model, rel=FORWARD_REL)
    expected = n * flops.decoder_forward_flops(spec, num_tokens, with_mask, executed=True)
    expected += flops.decoder_image_flops(spec, with_mask)
    assert expected == pytest.approx(executed, rel=FORWARD_REL)
    assert executed < n * per_mask_model


def _train_step(sam: torch.nn.Module, num_masks: int, checkpoint_rounds: bool) -> tuple[int, int, list[int]]:
    """One image's training step as ``SamTrainModel.forward`` runs it, then backward.

    Returns the counted forward FLOPs, forward + backward FLOPs, and the round plan's
    sparse token counts.
    """
    size = 256
    gt = torch.zeros(num_masks, size, size, dtype=torch.bool)
    for i in range(num_masks):
        gt[i, 20 + 30 * i : 90 + 30 * i, 40 : 110 + 20 * i] = True
    image = torch.randn(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        embeddings = sam.image_encoder(image)
        rounds = simulate_interaction(sam, embeddings, torch.zeros(num_masks, dtype=torch.long), gt, None,
                                      PromptConfig(), torch.Generator().manual_seed(1),
                                      checkpoint_rounds=checkpoint_rounds)
        outputs = [(r.low_res_masks, r.iou_pred) for r in rounds]
        losses = sam_loss(outputs, gt, torch.ones(num_masks, dtype=torch.bool), float(num_masks), LossConfig())
        forward = counter.get_total_flops()
        losses["loss"].backward()
    return forward, counter.get_total_flops(), [r.num_sparse_tokens for r in rounds]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_step_matches_counter(checkpointing: bool) -> None:
    """Forward + backward of a real tiny step (4 masks, 11 rounds, loss) vs the budget.

    The budget's convention (backward = 2× forward) over-counts the counter by exactly the
    patch embedding's input gradient, which autograd skips because the image needs none:
    12% of the tiny encoder's forward, 4% of this step (0.5% of a ViT-B encoder). The
    brief's 10% band is asserted, and the 1% band once that known term is removed.
    """
    num_masks = 4
    sam = build("tiny", "cpu", activation_checkpointing=checkpointing)
    spec = spec_for("tiny", activation_checkpointing=checkpointing)
    forward, total, tokens = _train_step(sam, num_masks, checkpoint_rounds=checkpointing)
    assert len(tokens) == 11 and tokens[0] == 2 and tokens[-1] == 10  # 1 + 8 + 2 rounds, 8 points
    budget = flops.train_flops_per_image(spec, num_masks, tokens, activation_checkpointing=checkpointing,
                                         executed=True)

    # The dense PE is computed once per step, outside the per-mask rounds.
    assert budget.encoder_forward + budget.decoder_forward + flops.dense_pe_flops(spec) == pytest.approx(
        forward, rel=FORWARD_REL)
    assert budget.total == pytest.approx(total, rel=0.10)
    assert budget.total - flops.patch_embed_flops(spec) == pytest.approx(total, rel=0.01)
    assert (budget.recompute > 0) == checkpointing


def test_prompt_config_follows_the_round_plan() -> None:
    spec = spec_for("tiny")
    paper = flops.train_flops_per_image(spec, 8, PromptConfig())
    assert paper.num_rounds == 11
    # Paper plan: the extra no-point round sits in one of 8 equally likely middle slots;
    # the config path averages sampled plans, so it lands on the exact mean.
    plans = [[True] + [slot != k for slot in range(8)] + [True, False] for k in range(8)]
    totals = [flops.train_flops_per_image(spec, 8, flops.tokens_per_round(p)).total for p in plans]
    assert paper.total == pytest.approx(sum(totals) / len(totals), rel=2e-3)
    short = flops.train_flops_per_image(spec, 8, PromptConfig(num_correction_points=2, num_no_point_rounds=1))
    assert short.num_rounds == 4
    assert short.encoder == paper.encoder and short.decoder < 0.5 * paper.decoder
    assert flops.tokens_per_round([True, True, False, True, False]) == [2, 3, 3, 4, 4]


# SAM_RECIPE.md §7 "Encoder forward FLOPs" (GFLOP): analytic, counter, train ≈ 3×.
RECIPE_ENCODER = {"vit_b": (967, 972, 2916), "vit_l": (2976, 2986, 8957), "vit_h": (5946, 5961, 17883)}
# §7 "Decoder and totals": TF per training image with 64 masks × 11 rounds.
RECIPE_TOTAL_TF = {"vit_b": 10.7, "vit_l": 16.8, "vit_h": 25.7}


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_recipe_table(variant: str) -> None:
    spec = spec_for(variant)
    analytic, counted, train = RECIPE_ENCODER[variant]
    forward_gf = flops.encoder_forward_flops(spec) / 1e9
    assert forward_gf == pytest.approx(counted, rel=1e-3)
    assert forward_gf == pytest.approx(analytic, rel=0.01)  # §7's formula rounds the rel-pos term
    budget = flops.train_flops_per_image(spec, 64, PromptConfig(), activation_checkpointing=False)
    assert budget.encoder / 1e9 == pytest.approx(train, rel=1e-3)
    assert budget.total / 1e12 == pytest.approx(RECIPE_TOTAL_TF[variant], rel=0.01)
    for tokens, with_mask in [(2, False), (10, True)]:  # "3.6–3.8 GF per mask per round"
        assert 3.6e9 <= flops.decoder_forward_flops(spec, tokens, with_mask) <= 3.8e9


def test_flops_for_config_and_checkpointing() -> None:
    cfg = tiny_cpu()
    budget = flops.flops_for_config(cfg)
    assert budget == flops.train_flops_per_image("tiny", cfg.data.max_masks_per_image, cfg.prompts, False)
    assert budget.masks_per_image == cfg.data.max_masks_per_image and budget.recompute == 0
    cfg.model.activation_checkpointing = True
    recomputed = flops.flops_for_config(cfg)
    spec = spec_for("tiny")
    assert recomputed.recompute == pytest.approx(flops.encoder_recompute_flops(spec) + budget.decoder_forward)
    assert recomputed.total == pytest.approx(budget.total + recomputed.recompute)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", None),  # not an L4
    ("NVIDIA H100 NVL", None),
    ("Tesla V100-SXM2-16GB", None),
    ("cpu", None),
])
def test_device_peak_table(name: str, tflops: float | None) -> None:
    peak = flops.device_peak_flops(name)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_peak_override_and_mfu() -> None:
    assert flops.device_peak_flops("cpu", override_tflops=100.0) == 100e12
    assert flops.device_peak_flops("NVIDIA L4", override_tflops=50.0) == 50e12
    with pytest.raises(ValueError, match="peak_tflops"):
        flops.device_peak_flops("NVIDIA L4", override_tflops=-1.0)
    # §7: the original run, 0.368 images/s × 25.7 TF on a 312 TF/s A100 ≈ 3%.
    assert flops.mfu(0.368, 25.7e12, 312e12) == pytest.approx(0.0303, abs=5e-4)
    with pytest.raises(ValueError, match="peak"):
        flops.mfu(1.0, 1e12, 0.0)
    budget = flops.train_flops_per_image("vit_h", 64, PromptConfig())
    assert budget.achieved_flops(1.0, 64.0) == pytest.approx(budget.total)
    assert budget.achieved_flops(1.0, 32.0) < budget.total  # fewer masks, fewer FLOPs


def test_startup_summary() -> None:
    budget = flops.train_flops_per_image("vit_h", 64, PromptConfig())
    line = flops.startup_summary(budget, flops.device_peak_flops("NVIDIA A100-SXM4-80GB"))
    assert "encoder 17.88 TF" in line and "total 25.75 TF" in line and "64 masks x 11 rounds" in line
    assert "encoder MFU 5.73%" in line and "end-to-end MFU 8.25%" in line and "312 TFLOP/s" in line
    unknown = flops.startup_summary(budget, None)
    assert "MFU" in unknown and "metrics.peak_tflops" in unknown and "end-to-end MFU" not in unknown
