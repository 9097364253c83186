"""MAE initialisation: real MAE key names and shapes (synthetic values), mapping, errors.

The ViT-H case builds the encoder with the real ViT-H width/heads/patch but 2 blocks
instead of 32 (and a matching 2-block checkpoint): per-block keys and shapes are the
real ones, and the test stays within CI memory and time.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.model import MaeCheckpointError, build_sam, load_mae_checkpoint, load_mae_state_dict
from trainer.model.mae import resize_patch_kernel, resize_pos_embed


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding with the zero cls row: ``1×(1+G²)×D``."""
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([emb(ys), emb(xs)], dim=1).float()
    return torch.cat([torch.zeros(1, dim), table], dim=0)[None]


def mae_state(dim: int, depth: int, patch: int, grid: int, full_model: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's ``model`` dict with MAE's real key names and shapes."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.02  # noqa: E731
    state = {
        "cls_token": r(1, 1, dim),
        "pos_embed": sincos_pos_embed(dim, grid),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
            p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
            p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
            p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim),
        })
    if full_model:
        state["mask_token"] = r(1, 1, 512)
        state["decoder_embed.weight"] = r(512, dim)
        state["decoder_pred.bias"] = r(768)
    return state


def test_vit_b_patch16_at_224_loads(tmp_path) -> None:
    model = build_sam("vit_b")
    state = mae_state(768, 12, patch=16, grid=14, full_model=True)
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": state}, path)
    report = load_mae_checkpoint(model.image_encoder, str(path), variant="vit_b")
    enc = model.image_encoder.state_dict()
    torch.testing.assert_close(enc["blocks.3.mlp.lin1.weight"], state["blocks.3.mlp.fc1.weight"])
    torch.testing.assert_close(enc["blocks.11.attn.qkv.bias"], state["blocks.11.attn.qkv.bias"])
    torch.testing.assert_close(enc["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    assert enc["pos_embed"].shape == (1, 64, 64, 768)
    assert report.source_grid == 14 and report.source_patch == 16
    assert set(report.unexpected) == {"cls_token", "norm.weight", "norm.bias", "mask_token",
                                      "decoder_embed.weight", "decoder_pred.bias"}
    expected_missing = {f"blocks.{i}.attn.rel_pos_{a}" for i in range(12) for a in "hw"} | {
        "neck.0.weight", "neck.1.weight", "neck.1.bias", "neck.2.weight", "neck.3.weight", "neck.3.bias"}
    assert set(report.missing) == expected_missing
    assert all(enc[k].abs().sum() == 0 for k in expected_missing if "rel_pos" in k)


def test_vit_h_patch14_kernel_resized_to_16() -> None:
    model = build_sam("vit_h", encoder_depth=2, encoder_global_attn_indexes=(1,))
    state = mae_state(1280, 2, patch=14, grid=16)
    report = load_mae_state_dict(model.image_encoder, state, variant="vit_h")
    enc = model.image_encoder.state_dict()
    assert report.source_patch == 14 and report.source_grid == 16
    assert enc["patch_embed.proj.weight"].shape == (1280, 3, 16, 16)
    assert enc["pos_embed"].shape == (1, 64, 64, 1280)
    torch.testing.assert_close(enc["blocks.1.mlp.lin2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_patch_kernel_resize_preserves_response_to_constant_image() -> None:
    """A smooth 14×14 kernel on a constant patch gives the same response after the 16×16 resize."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 14), torch.linspace(0, 1, 14), indexing="ij")
    smooth = torch.stack([torch.sin(2 * xx + c) * torch.cos(yy - c) for c in range(3)])[None]
    resized = resize_patch_kernel(smooth, 16)
    assert resized.shape == (1, 3, 16, 16)
    before, after = smooth.sum().item(), resized.sum().item()
    assert math.isclose(before, after, rel_tol=0.03), (before, after)
    naive = torch.nn.functional.interpolate(smooth, size=(16, 16), mode="bicubic", align_corners=False).sum()
    assert naive.item() > 1.2 * before  # without the rescale the response grows ≈ (16/14)²


def test_pos_embed_interpolation_on_a_known_pattern() -> None:
    """Channel 0 = row index, channel 1 = column index: BHWC orientation and grid mapping."""
    g, out = 14, 64
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    table = torch.stack([ys, xs, torch.full_like(ys, 3.0)], dim=-1).reshape(g * g, 3)
    cls = torch.full((1, 3), 1e6)  # must be dropped, never blended in
    resized = resize_pos_embed(torch.cat([cls, table])[None], out)
    assert resized.shape == (1, out, out, 3)
    src = (torch.arange(out) + 0.5) * g / out - 0.5  # align_corners=False source coordinate
    inner = (src >= 1) & (src <= g - 2)  # all four bicubic taps inside the grid
    # Cubic convolution (a=-0.75) reproduces a ramp to within ~0.05; a transposed grid or
    # an align_corners=True mapping would be off by 0.25 or more.
    torch.testing.assert_close(resized[0, inner][:, 0, 0], src[inner], atol=0.06, rtol=0)
    torch.testing.assert_close(resized[0, 0, inner][:, 1], src[inner], atol=0.06, rtol=0)
    torch.testing.assert_close(resized[..., 2], torch.full((1, out, out), 3.0), atol=1e-5, rtol=0)
    assert resized.abs().max() < 100


def test_checkpoint_for_another_variant_fails_naming_keys() -> None:
    model = build_sam("vit_b")
    state = mae_state(1280, 2, patch=14, grid=16)
    with pytest.raises(MaeCheckpointError) as err:
        load_mae_state_dict(model.image_encoder, state, variant="vit_b")
    msg = str(err.value)
    assert "'vit_b'" in msg and "blocks.0.attn.qkv.weight" in msg and "(3840, 1280)" in msg
    assert "missing from the checkpoint" in msg


def test_deeper_checkpoint_is_reported() -> None:
    model = build_sam("tiny")
    state = mae_state(96, 6, patch=16, grid=14)
    with pytest.raises(MaeCheckpointError, match="beyond the encoder depth"):
        load_mae_state_dict(model.image_encoder, state, variant="tiny")


# ------------------------------------------------------------- model.encoder_init (point 15)


def test_config_mae_init_loads_timm_checkpoint(tmp_path, caplog) -> None:
    """``model.encoder_init=mae`` through the config loader and ``build_model``."""
    from trainer.config import load_config
    from trainer.model import build_model
    from trainer.presets import PRESETS, Config

    state = mae_state(96, 4, patch=16, grid=14, full_model=True)
    path = tmp_path / "mae_pretrain_tiny.pth"
    torch.save({"model": state}, path)
    cfg = load_config(Config, "tiny_cpu", ["data.shards=x.tar", "model.encoder_init=mae",
                                           f"model.mae_checkpoint={path}"], PRESETS)
    with caplog.at_level("INFO", logger="trainer.model"):
        model = build_model(cfg.model)
    enc = model.image_encoder.state_dict()
    torch.testing.assert_close(enc["blocks.2.mlp.lin1.weight"], state["blocks.2.mlp.fc1.weight"])
    torch.testing.assert_close(enc["blocks.0.norm1.weight"], state["blocks.0.norm1.weight"])
    assert enc["pos_embed"].shape == (1, 16, 16, 96)
    assert "MAE init" in caplog.text


def test_random_init_of_a_paper_variant_warns(caplog) -> None:
    from trainer.model import ModelConfig, build_model

    with caplog.at_level("INFO", logger="trainer.model"):
        build_model(ModelConfig(variant="vit_b", encoder_init="random"))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "model.encoder_init=random" in warnings[0].getMessage()
    assert "vit_b" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.model"):
        build_model(ModelConfig(variant="tiny", encoder_init="random"))
    assert [r.levelname for r in caplog.records] == ["INFO"]  # tiny_cpu: one INFO line, no warning


def test_build_model_rejects_the_required_marker() -> None:
    from trainer.model import ModelConfig, build_model
    from trainer.model.build import REQUIRED_ENCODER_INIT

    with pytest.raises(ValueError, match="model.encoder_init: required"):
        build_model(ModelConfig(variant="tiny", encoder_init=REQUIRED_ENCODER_INIT))
