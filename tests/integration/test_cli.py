"""The ``sam-train`` subcommands a user runs after training: export and eval."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from trainer.model import spec_for

from .helpers import overrides, run

pytestmark = pytest.mark.slow


def official_tiny(official_sam):
    """The official segment_anything classes built at our tiny sizes."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    s = spec_for("tiny")
    grid = s.img_size // s.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=s.img_size, patch_size=s.patch_size, embed_dim=s.encoder_embed_dim, depth=s.encoder_depth,
            num_heads=s.encoder_num_heads, mlp_ratio=4, out_chans=s.prompt_embed_dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            global_attn_indexes=s.encoder_global_attn_indexes, window_size=s.window_size),
        prompt_encoder=PromptEncoder(embed_dim=s.prompt_embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(s.img_size, s.img_size), mask_in_chans=s.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=s.prompt_embed_dim, iou_head_depth=3,
            iou_head_hidden_dim=s.iou_head_hidden_dim,
            transformer=TwoWayTransformer(depth=s.decoder_depth, embedding_dim=s.prompt_embed_dim,
                                          mlp_dim=s.decoder_mlp_dim, num_heads=s.decoder_num_heads)),
    ).eval()


def test_train_export_loads_in_official_model_and_eval_runs(shards: str, tmp_path: Path, official_sam) -> None:
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "trainer.train", "--config", "tiny_cpu"]
               + overrides(shards, run_dir, "optim.max_iters=3", "optim.milestones=", "checkpoint.every=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "sam_tiny.pth"
    proc = run([sys.executable, "-m", "trainer", "export", "--checkpoint", str(run_dir / "checkpoints"),
                "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "step-00000003" in proc.stdout
    official = official_tiny(official_sam)
    official.load_state_dict(torch.load(out, weights_only=True), strict=True)
    trained = torch.load(run_dir / "checkpoints/step-00000003/model.pt", weights_only=True)
    for key, value in official.state_dict().items():
        assert torch.equal(value, trained[key]), key

    proc = run([sys.executable, "-m", "trainer", "eval", "--checkpoint", str(out), "--shards", shards,
                "--num-images", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for metric in ("point_conf", "point_oracle", "box_conf", "box_oracle"):
        assert metric in proc.stdout
    assert "in 3 images" in proc.stdout


def test_help_works_without_gpu() -> None:
    for cmd in (["-m", "trainer", "--help"], ["-m", "trainer", "train", "--help"], ["-m", "trainer", "demo", "--help"],
                ["-m", "trainer", "synth", "--help"], ["-m", "trainer", "eval", "--help"],
                ["-m", "trainer", "export", "--help"]):
        proc = run([sys.executable, *cmd], timeout=60)
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert "usage" in proc.stdout.lower()
