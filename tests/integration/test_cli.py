"""The ``sam-train`` subcommands end to end: train (and its loss curve), export, eval, help."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from trainer.model import spec_for

from .helpers import metrics, overrides, run, train_env

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
    assert is_png(run_dir / "loss_curve.png")  # beside metrics.jsonl, drawn by every finished run

    out = tmp_path / "sam_tiny.pth"
    proc = run([sys.executable, "-m", "trainer", "export", "--checkpoint", str(run_dir / "checkpoints"),
                "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "step-00000003" in proc.stdout
    assert "no official registry entry loads this file" in proc.stderr
    official = official_tiny(official_sam)
    official.load_state_dict(torch.load(out, weights_only=True), strict=True)
    trained = torch.load(run_dir / "checkpoints/step-00000003/model.pt", weights_only=True)
    for key, value in official.state_dict().items():
        assert torch.equal(value, trained[key]), key

    proc = run([sys.executable, "-m", "trainer", "eval", "--checkpoint", str(out), "--shards", shards,
                "--num-images", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = [line.split()[0] for line in proc.stdout.splitlines() if "mIoU" in line]
    assert any(k.startswith("point") for k in scored) and any(k.startswith("box") for k in scored), proc.stdout
    assert "in 3 images" in proc.stdout


def test_eval_all_images_once_and_grid(tmp_path: Path) -> None:
    """``--num-images 0`` scores every image of the shards exactly once and draws the grid."""
    from trainer.data import write_synthetic_shards
    from trainer.evaluate import eval_data_config, iter_eval_batches
    from trainer.model import build_sam, export_official

    write_synthetic_shards(str(tmp_path / "eval"), num_images=5, num_shards=2, seed=4, min_side=96,
                           max_side=160, min_masks=2, max_masks=6, radius_frac=(0.1, 0.4))
    spec = f"{tmp_path}/eval/sa_*.tar"
    masks = sum(int(b.valid.sum()) for b in iter_eval_batches(eval_data_config(spec, 256), 0))
    torch.manual_seed(0)
    weights = export_official(build_sam("tiny"), str(tmp_path / "tiny.pth"))
    grid = tmp_path / "g.png"
    proc = run([sys.executable, "-m", "trainer", "eval", "--checkpoint", weights, "--shards", spec,
                "--num-images", "0", "--points", "1,3", "--grid", str(grid)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({masks} masks in 5 images)" in proc.stdout
    scored = [line.split()[0] for line in proc.stdout.splitlines() if "mIoU" in line]
    assert scored == ["point1_conf", "point1_oracle", "point3", "box"], proc.stdout
    assert grid.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    for bad, named in ((["--num-images", "-1"], "--num-images"), (["--points", "0"], "points"),
                       (["--shards", f"{tmp_path}/missing_*.tar"], "--shards")):
        args = ["--checkpoint", weights, "--shards", spec, *bad]
        proc = run([sys.executable, "-m", "trainer", "eval", *args], timeout=120)
        assert proc.returncode == 2 and named in proc.stderr, (bad, proc.stderr[-2000:])


def test_help_works_without_gpu() -> None:
    for cmd in (["-m", "trainer", "--help"], ["-m", "trainer", "train", "--help"], ["-m", "trainer", "demo", "--help"],
                ["-m", "trainer", "synth", "--help"], ["-m", "trainer", "eval", "--help"],
                ["-m", "trainer", "export", "--help"], ["-m", "trainer", "config", "--help"]):
        proc = run([sys.executable, *cmd], timeout=60)
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert "usage" in proc.stdout.lower()
    proc = run([sys.executable, "-m", "trainer", "bogus"], timeout=60)
    assert proc.returncode == 2 and "unknown command 'bogus'" in proc.stderr, proc


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_sigterm_run_leaves_loss_curve_and_strict_metrics(shards: str, tmp_path: Path) -> None:
    """An interrupted run (preemption: SIGTERM -> 143) still draws loss_curve.png."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer.train", "--config", "tiny_cpu"] + overrides(
        shards, run_dir, "optim.max_iters=400", "optim.milestones=", "checkpoint.every=0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if max((r["step"] for r in metrics(run_dir)), default=0) >= 2:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert is_png(run_dir / "loss_curve.png"), err[-3000:]

    def reject(token: str) -> None:
        raise ValueError(f"non-strict JSON token {token}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2 and all(json.loads(line, parse_constant=reject) for line in lines)
