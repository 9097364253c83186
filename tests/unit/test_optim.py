"""Optimizer groups, layer-wise lr decay, weight-decay exclusions, lr schedule."""

from __future__ import annotations

import fnmatch
import functools

import pytest
import torch
from torch import nn

from trainer.optim import (
    OPTIM_PRESETS,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    layer_id,
    lr_factor,
    lr_scale,
    optim_preset,
    param_groups,
    uses_weight_decay,
)


@functools.cache
def slim_sam(variant: str) -> nn.Module:
    """The variant's exact parameter names and ranks with a 48-wide encoder.

    The builder does not support the meta device (it calls ``.tolist()``), and a real
    ViT-H is 2.5 GB; names depend only on depth, not width.
    """
    from trainer.model import build_sam

    return build_sam(variant, encoder_embed_dim=48)


def scale_of(groups: list[dict], param: torch.Tensor) -> tuple[float, float]:
    for group in groups:
        if any(p is param for p in group["params"]):
            return group["lr_scale"], group["weight_decay"]
    raise KeyError("parameter not in any group")


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [
        (0, 0.001),
        (125, 0.001 * 0.5 + 0.5),
        (250, 1.0),
        (59_999, 1.0),
        (60_000, 0.1),
        (86_665, 0.1),
        (86_666, 0.01),
        (89_999, 0.01),
    ],
)
def test_lr_factor_vit_h(iteration: int, expected: float) -> None:
    assert lr_factor(iteration, OPTIM_PRESETS["vit_h"]) == pytest.approx(expected)


def test_presets_match_paper() -> None:
    h, b, l = OPTIM_PRESETS["vit_h"], OPTIM_PRESETS["vit_b"], OPTIM_PRESETS["vit_l"]
    assert (h.lr, h.layer_decay, h.max_iters, h.milestones) == (8e-4, 0.8, 90_000, (60_000, 86_666))
    assert (b.lr, b.layer_decay, b.max_iters) == (8e-4, 0.6, 180_000)
    assert (l.lr, l.layer_decay, l.max_iters) == (4e-4, 0.8, 180_000)
    assert b.milestones == l.milestones == (120_000, 173_333)
    for cfg in (h, b, l):
        assert cfg.betas == (0.9, 0.999) and cfg.weight_decay == 0.1 and cfg.warmup_iters == 250
    tiny = OPTIM_PRESETS["tiny"]
    assert tiny.max_iters <= 1000 and tiny.milestones[-1] <= tiny.max_iters
    assert optim_preset("tiny", lr=2e-3).lr == 2e-3
    with pytest.raises(ValueError, match="preset"):
        optim_preset("vit_x")


def test_layer_ids_vit_h_names() -> None:
    assert layer_id("image_encoder.patch_embed.proj.weight", 32) == 0
    assert layer_id("image_encoder.pos_embed", 32) == 0
    assert layer_id("image_encoder.blocks.0.attn.qkv.weight", 32) == 1
    assert layer_id("module.image_encoder.blocks.31.mlp.lin1.bias", 32) == 32
    assert layer_id("module._orig_mod.image_encoder.neck.0.weight", 32) == 33
    assert layer_id("mask_decoder.iou_token.weight", 32) == 33
    assert lr_scale("image_encoder.patch_embed.proj.weight", 32, 0.8) == pytest.approx(0.8**33)
    assert lr_scale("image_encoder.blocks.0.norm1.weight", 32, 0.8) == pytest.approx(0.8**32)
    assert lr_scale("image_encoder.blocks.31.norm1.weight", 32, 0.8) == pytest.approx(0.8)
    assert lr_scale("prompt_encoder.no_mask_embed.weight", 32, 0.8) == 1.0


@pytest.mark.parametrize(("variant", "depth"), [("vit_b", 12), ("vit_h", 32)])
def test_param_groups_layer_decay(variant: str, depth: int) -> None:
    model = slim_sam(variant)
    cfg = OPTIM_PRESETS[variant]
    ld = cfg.layer_decay
    groups = param_groups(model, cfg)
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert len({id(p) for g in groups for p in g["params"]}) == len(params)
    expect = {
        "image_encoder.pos_embed": (ld ** (depth + 1), 0.0),
        "image_encoder.patch_embed.proj.weight": (ld ** (depth + 1), 0.1),
        "image_encoder.patch_embed.proj.bias": (ld ** (depth + 1), 0.0),
        "image_encoder.blocks.0.attn.qkv.weight": (ld**depth, 0.1),
        "image_encoder.blocks.0.attn.rel_pos_h": (ld**depth, 0.0),
        f"image_encoder.blocks.{depth - 1}.mlp.lin2.weight": (ld, 0.1),
        f"image_encoder.blocks.{depth - 1}.norm2.weight": (ld, 0.0),
        "image_encoder.neck.0.weight": (1.0, 0.1),
        "image_encoder.neck.1.weight": (1.0, 0.0),
        "prompt_encoder.point_embeddings.1.weight": (1.0, 0.0),
        "prompt_encoder.not_a_point_embed.weight": (1.0, 0.0),
        "prompt_encoder.no_mask_embed.weight": (1.0, 0.0),
        "prompt_encoder.mask_downscaling.0.weight": (1.0, 0.1),
        "mask_decoder.iou_token.weight": (1.0, 0.0),
        "mask_decoder.mask_tokens.weight": (1.0, 0.0),
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight": (1.0, 0.1),
        "mask_decoder.transformer.layers.0.self_attn.q_proj.bias": (1.0, 0.0),
    }
    for name, (scale, wd) in expect.items():
        got = scale_of(groups, params[name])
        assert got[0] == pytest.approx(scale), name
        assert got[1] == wd, name
    for group in groups:
        assert group["lr"] == pytest.approx(cfg.lr * group["lr_scale"])
    # Distinct scales: layers 0..L+1, each with decay and no-decay groups.
    assert len({g["lr_scale"] for g in groups}) == depth + 2
    assert len(groups) == 2 * (depth + 2)


def test_weight_decay_rule() -> None:
    cfg = OptimConfig()
    assert not uses_weight_decay("module.image_encoder.blocks.3.attn.rel_pos_w", 2, cfg)
    assert not uses_weight_decay("image_encoder.blocks.3.norm1.bias", 1, cfg)
    assert uses_weight_decay("image_encoder.blocks.3.attn.proj.weight", 2, cfg)
    custom = OptimConfig(no_decay_patterns=())
    assert uses_weight_decay("mask_decoder.iou_token.weight", 2, custom)


def test_ddp_prefix_and_frozen_params() -> None:
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    from trainer.model import build_sam

    model = build_sam("tiny")
    model.prompt_encoder.requires_grad_(False)
    plain = param_groups(model, OPTIM_PRESETS["tiny"])
    wrapped = param_groups(Wrapper(model), OPTIM_PRESETS["tiny"])
    assert [(g["group_name"], len(g["params"])) for g in plain] == [
        (g["group_name"], len(g["params"])) for g in wrapped
    ]
    frozen = {id(p) for p in model.prompt_encoder.parameters()}
    assert not any(id(p) in frozen for g in plain for p in g["params"])


def test_scheduler_honours_lr_scale() -> None:
    model = nn.Module()
    model.image_encoder = nn.Module()
    model.image_encoder.patch_embed = nn.Linear(2, 2)
    model.image_encoder.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    model.head = nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, layer_decay=0.5, warmup_iters=10, max_iters=100, milestones=(50,))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    by_name = {g["group_name"]: g for g in optimizer.param_groups}
    # L = 2: patch_embed 0.5^3, blocks.0 0.5^2, blocks.1 0.5, head 1; warmup start 0.001.
    assert by_name["layer0_decay"]["lr"] == pytest.approx(0.125 * 0.001)
    assert by_name["layer3_decay"]["lr"] == pytest.approx(0.001)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert by_name["layer1_decay"]["lr"] == pytest.approx(0.25 * 0.1)
    assert by_name["layer3_no_decay"]["lr"] == pytest.approx(0.1)
    assert by_name["layer3_no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -1e-4}, "lr"),
        ({"warmup_iters": 200, "max_iters": 100, "milestones": ()}, "warmup_iters"),
        ({"milestones": (60_000, 50_000)}, "milestones"),
        ({"milestones": (60_000, 60_000)}, "milestones"),
        ({"milestones": (60_000, 95_000)}, "milestones"),
        ({"layer_decay": 0.0}, "layer_decay"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_start_factor": 0.0}, "warmup_start_factor"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimConfig(**kwargs)


def test_no_decay_exclusions_name_their_source() -> None:
    """Point 19: ViTDet excludes only pos_embed and norms; the rest is attributed elsewhere."""
    from trainer.model import build_sam
    from trainer.optim import NO_DECAY_SOURCES

    cfg = OptimConfig()
    assert set(cfg.no_decay_patterns) == set(NO_DECAY_SOURCES)
    assert [k for k, v in NO_DECAY_SOURCES.items() if v.startswith("ViTDet")] == ["*pos_embed"]
    # On a real model: what we exclude beyond ViTDet's rule (pos_embed + norms) is exactly
    # the non-norm biases (MAE/timm, SAM 2) and the patterns marked "ours".
    ours = [k for k, v in NO_DECAY_SOURCES.items() if v.startswith("ours")]
    norms = {f"{n}.{p}" for n, m in build_sam("tiny").named_modules()
             if "norm" in type(m).__name__.lower() for p in ("weight", "bias")}
    for name, param in build_sam("tiny").named_parameters():
        vitdet_excludes = name.endswith("pos_embed") or name in norms
        if vitdet_excludes:
            assert not uses_weight_decay(name, param.ndim, cfg), name
        elif not uses_weight_decay(name, param.ndim, cfg):
            assert name.endswith(".bias") or any(fnmatch.fnmatchcase(name, k) for k in ours), name


def _tiny_sam(seed: int) -> nn.Module:
    from trainer.model.build import build_sam

    torch.manual_seed(seed)
    return build_sam("tiny")


def test_fused_adamw_is_the_default_and_the_same_update() -> None:
    """``optim.fused`` (default) builds PyTorch's fused AdamW on CPU; three steps with it
    and with PyTorch's default per-parameter loop give the same weights to fp32 rounding,
    every group's lr scale and weight decay included."""
    models, optimizers = [], []
    for fused in (True, False):
        model = _tiny_sam(0)
        opt = build_optimizer(model, OptimConfig(lr=1e-3, fused=fused))
        assert all(g["fused"] is (True if fused else None) for g in opt.param_groups)
        models.append(model)
        optimizers.append(opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    moved = 0.0
    for (name, a), b, start in zip(models[0].named_parameters(), models[1].parameters(),
                                   _tiny_sam(0).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        moved = max(moved, float((a - start).detach().abs().max()))
    assert moved > 1e-3  # the steps did update the weights


def test_resume_takes_the_configured_adamw_implementation() -> None:
    """A checkpoint's saved groups say which kernel ran; ``apply_optim_config`` puts the
    current ``optim.fused`` in place (both directions)."""
    from trainer.presets import tiny_cpu
    from trainer.resume import apply_optim_config

    model = _tiny_sam(0)
    for saved, now in ((False, True), (True, False)):
        cfg = tiny_cpu()
        cfg.optim.fused = saved
        opt = build_optimizer(model, cfg.optim)
        state = opt.state_dict()
        cfg.optim.fused = now
        resumed = build_optimizer(model, cfg.optim)
        resumed.load_state_dict(state)
        assert all(g["fused"] is (True if saved else None) for g in resumed.param_groups)  # as saved
        apply_optim_config(resumed, build_scheduler(resumed, cfg.optim), model, cfg, step=0)
        assert all(g["fused"] is (True if now else None) for g in resumed.param_groups)
