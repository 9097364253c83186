"""The root config and the named presets: the paper's values, cross-field checks, frozen keys."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, config_keys, load_config
from trainer.model import spec_for
from trainer.presets import PRESETS, Config


SHARDS = "data.shards=gs://bucket/sa1b/sa_*.tar"


def preset(name: str, *overrides: str) -> Config:
    return load_config(Config, name, [SHARDS, "model.encoder_init=random", *overrides], PRESETS)


def test_vit_h_preset_is_the_paper_recipe() -> None:
    """SAM_RECIPE.md §1 (ViT-H) and the must-implement checklist."""
    cfg = preset("vit_h")
    assert cfg.model.variant == "vit_h" and spec_for("vit_h", **cfg.model.overrides()).drop_path_rate == 0.4
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.layer_decay) == (8e-4, (0.9, 0.999), 0.1, 0.8)
    assert (o.warmup_iters, o.milestones, o.decay_gamma, o.max_iters) == (250, (60_000, 86_666), 0.1, 90_000)
    d = cfg.data
    assert (d.img_size, d.batch_size, d.max_masks_per_image, d.max_mask_area_frac) == (1024, 1, 64, 0.9)
    assert not d.lsj and not d.hflip  # no augmentation in the default recipe
    p = cfg.prompts
    assert (p.num_rounds, p.num_correction_points, p.num_no_point_rounds, p.prob_box) == (11, 8, 2, 0.5)
    assert (p.box_noise_frac, p.box_noise_max_px) == (0.1, 20.0)
    assert (cfg.loss.weight_focal, cfg.loss.weight_dice, cfg.loss.weight_iou) == (20.0, 1.0, 1.0)
    assert cfg.model.activation_checkpointing  # 85 GiB peak without it: must fit 80 GiB cards


@pytest.mark.parametrize("name,lr,ld,dp", [("vit_b", 8e-4, 0.6, 0.6), ("vit_l", 4e-4, 0.8, 0.4)])
def test_vit_b_and_l_presets(name: str, lr: float, ld: float, dp: float) -> None:
    cfg = preset(name)
    assert (cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.max_iters) == (lr, ld, 180_000)
    assert spec_for(name, **cfg.model.overrides()).drop_path_rate == dp
    assert cfg.prompts.num_rounds == 11


def test_shards_are_required() -> None:
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(Config, "vit_h", [], PRESETS)


def test_image_size_must_fit_the_variant() -> None:
    with pytest.raises(ConfigError, match="data.img_size"):
        preset("tiny_cpu", "data.img_size=512")


def test_config_keys_are_frozen() -> None:
    """Every key is public CLI surface (``--set``); adding or renaming one is a deliberate change."""
    assert sorted(config_keys(preset("tiny_cpu"))) == [
        "checkpoint.every", "checkpoint.fresh_if_unusable", "checkpoint.keep_last", "checkpoint.resume",
        "checkpoint.url",
        "data.batch_size", "data.hflip", "data.img_size", "data.jpeg_dct_downscale", "data.jpeg_decoder",
        "data.lsj", "data.lsj_scale", "data.mask_decoder", "data.max_mask_area_frac",
        "data.max_masks_per_image", "data.num_workers", "data.pin_memory", "data.prefetch_factor",
        "data.retry_backoff_s", "data.seed", "data.shard_open_retries", "data.shards", "data.shuffle_shards",
        "eval.at_end", "eval.batch_size", "eval.every", "eval.max_masks_per_image", "eval.num_images",
        "eval.shards",
        "log.format", "log.level",
        "loss.focal_alpha", "loss.focal_gamma", "loss.resolution", "loss.weight_dice", "loss.weight_focal",
        "loss.weight_iou",
        "metrics.addr", "metrics.final_scrape_wait_s", "metrics.gpu", "metrics.peak_tflops", "metrics.port",
        "metrics.run_name",
        "model.activation_checkpointing", "model.decoder_dropout", "model.drop_path_rate",
        "model.encoder_init", "model.init_checkpoint", "model.mae_checkpoint", "model.pe_seed", "model.variant",
        "optim.betas", "optim.decay_gamma", "optim.eps", "optim.fused", "optim.layer_decay", "optim.lr", "optim.max_iters",
        "optim.milestones", "optim.no_decay_patterns", "optim.warmup_iters", "optim.warmup_start_factor",
        "optim.weight_decay",
        "prompts.box_multimask", "prompts.box_noise_frac", "prompts.box_noise_max_px", "prompts.empty_error_policy",
        "prompts.num_correction_points", "prompts.num_no_point_rounds", "prompts.prob_box",
        "train.allow_tf32", "train.amp", "train.compile", "train.cpu_retain_memory", "train.deterministic",
        "train.device",
        "train.find_unused_parameters", "train.grad_accum", "train.grad_clip", "train.log_every",
        "train.max_nonfinite_steps", "train.run_dir", "train.seed",
    ]


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_paper_presets_require_encoder_init(name: str) -> None:
    """Point 15: `--config vit_h --set data.shards=...` alone is not the paper's recipe."""
    with pytest.raises(ConfigError) as err:
        load_config(Config, name, [SHARDS], PRESETS)
    msg = str(err.value)
    assert msg.startswith("model.encoder_init: required")
    assert all(choice in msg for choice in ("'mae'", "'sam'", "'random'", "model.mae_checkpoint",
                                            "model.init_checkpoint", "mae_pretrain_vit_"))


def test_missing_shards_and_encoder_init_reported_together() -> None:
    with pytest.raises(ConfigError, match=r"^data\.shards: required.*model\.encoder_init: required"):
        load_config(Config, "vit_h", [], PRESETS)


def test_paper_preset_with_mae_or_sam_init_loads() -> None:
    mae = load_config(Config, "vit_h", [SHARDS, "model.encoder_init=mae",
                                        "model.mae_checkpoint=gs://b/mae_pretrain_vit_huge.pth"], PRESETS)
    assert (mae.model.encoder_init, mae.model.init_checkpoint) == ("mae", "")
    sam = load_config(Config, "vit_b", [SHARDS, "model.encoder_init=sam",
                                        "model.init_checkpoint=sam_vit_b_01ec64.pth"], PRESETS)
    assert sam.model.encoder_init == "sam"


@pytest.mark.parametrize("overrides,field", [
    (["model.encoder_init=mae"], "model.mae_checkpoint: required"),
    (["model.encoder_init=sam"], "model.init_checkpoint: required"),
    (["model.encoder_init=random", "model.mae_checkpoint=m.pth"], "model.mae_checkpoint: set, but"),
    (["model.encoder_init=mae", "model.mae_checkpoint=m.pth", "model.init_checkpoint=s.pth"],
     "model.init_checkpoint: set, but"),
    (["model.encoder_init=imagenet"], "model.encoder_init: must be one of"),
])
def test_encoder_init_and_its_url_must_agree(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config(Config, "vit_l", [SHARDS, *overrides], PRESETS)


def test_tiny_cpu_needs_no_encoder_init() -> None:
    cfg = load_config(Config, "tiny_cpu", [SHARDS], PRESETS)
    assert cfg.model.encoder_init == "random"


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_paper_presets_do_not_clip_gradients(name: str) -> None:
    """Point 17: the paper states no clipping (SAM_RECIPE.md §1, "Discrepancies" 6)."""
    assert preset(name).train.grad_clip == 0.0
    assert preset(name, "train.grad_clip=1.0").train.grad_clip == 1.0  # still available
