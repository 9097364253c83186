"""Model sizes and builders: the only place that knows variant sizes.

Official sizes from segment-anything ``build_sam.py`` (SAM_RECIPE.md §2 "Builders");
drop-path rates from the paper (§1: ViT-H/L 0.4, ViT-B 0.6).

``tiny`` is our CPU configuration for laptops and CI (seconds per training step on 2
cores): 256² input, patch 16 (16×16 token grid), 4 blocks of width 96 with 3 heads
(head dim 32), 6×6 windows (so the 16×16 grid is zero-padded to 18×18, exercising the
same padding path as the official 64→70), global blocks 1 and 3, a 64-dim prompt space
(image embedding 64×16×16, low-res masks 64×64) and a 2-layer decoder with MLP 256 and
4 heads. About 0.79M parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SamSpec:
    """Every size of a SAM model. Field names double as ``build_sam`` overrides."""

    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    drop_path_rate: float = 0.0
    decoder_dropout: float = 0.1
    activation_checkpointing: bool = False
    pe_seed: int = 0

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError("encoder_embed_dim must be divisible by encoder_num_heads")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(f"encoder_global_attn_indexes {bad} outside depth {self.encoder_depth}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0.0 <= self.decoder_dropout < 1.0:
            raise ValueError(f"decoder_dropout must be in [0, 1), got {self.decoder_dropout}")

    @property
    def embedding_grid(self) -> int:
        return self.img_size // self.patch_size


VARIANTS: dict[str, SamSpec] = {
    "vit_b": SamSpec(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     encoder_global_attn_indexes=(2, 5, 8, 11), drop_path_rate=0.6),
    "vit_l": SamSpec(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                     encoder_global_attn_indexes=(5, 11, 17, 23), drop_path_rate=0.4),
    "vit_h": SamSpec(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                     encoder_global_attn_indexes=(7, 15, 23, 31), drop_path_rate=0.4),
    "tiny": SamSpec(img_size=256, encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=3,
                    encoder_global_attn_indexes=(1, 3), window_size=6, prompt_embed_dim=64,
                    decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64,
                    drop_path_rate=0.0, decoder_dropout=0.0),
}


def spec_for(variant: str, **overrides: Any) -> SamSpec:
    """The :class:`SamSpec` of ``variant`` with ``overrides`` applied (names checked)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(VARIANTS)}")
    names = {f.name for f in dataclasses.fields(SamSpec)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown build_sam override(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(VARIANTS[variant], **overrides)


def build_from_spec(spec: SamSpec) -> Sam:
    """Construct a randomly initialised :class:`Sam` from sizes."""
    grid = spec.embedding_grid
    encoder = ImageEncoderViT(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.encoder_embed_dim,
        depth=spec.encoder_depth, num_heads=spec.encoder_num_heads, mlp_ratio=4.0,
        out_chans=spec.prompt_embed_dim, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, rel_pos_zero_init=True, window_size=spec.window_size,
        global_attn_indexes=spec.encoder_global_attn_indexes, drop_path_rate=spec.drop_path_rate,
        activation_checkpointing=spec.activation_checkpointing,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim, image_embedding_size=(grid, grid),
        input_image_size=(spec.img_size, spec.img_size), mask_in_chans=spec.mask_in_chans,
        pe_seed=spec.pe_seed,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth, embedding_dim=spec.prompt_embed_dim, mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_num_heads, dropout=spec.decoder_dropout,
        ),
        transformer_dim=spec.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder)


def build_sam(variant: str, checkpoint: str | None = None, **overrides: Any) -> Sam:
    """Build SAM ``variant`` (``tiny``, ``vit_b``, ``vit_l``, ``vit_h``).

    Args:
        variant: model size, see :data:`VARIANTS`.
        checkpoint: optional URL/path of an official SAM ``.pth`` or one of our training
            checkpoints (a dict with a ``model`` entry); loaded with ``strict=True``.
        overrides: :class:`SamSpec` fields, e.g. ``drop_path_rate=0.1``.

    Returns:
        The model in train mode (call ``.eval()`` for inference).
    """
    model = build_from_spec(spec_for(variant, **overrides))
    if checkpoint is not None:
        from .checkpoint_io import read_state_dict

        load_sam_state_dict(model, read_state_dict(checkpoint), variant)
    return model


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model variant; the message names the keys."""


def guess_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Which known variant a SAM state_dict belongs to, from encoder width and depth."""
    qkv = state_dict.get("image_encoder.blocks.0.attn.qkv.weight")
    if qkv is None:
        return None
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, spec in VARIANTS.items():
        if spec.encoder_embed_dim == qkv.shape[1] and spec.encoder_depth == depth:
            return name
    return None


def describe_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Human-readable differences between ``model``'s keys/shapes and ``state_dict``."""
    expected = model.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    out = problems[:limit]
    if missing:
        out.append(f"missing from checkpoint ({len(missing)}): {missing[:limit]}")
    if unexpected:
        out.append(f"unexpected in checkpoint ({len(unexpected)}): {unexpected[:limit]}")
    return out


def load_sam_state_dict(model: Sam, state_dict: dict[str, torch.Tensor], variant: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the variant and keys."""
    problems = describe_mismatch(model, state_dict)
    if problems:
        guess = guess_variant(state_dict)
        hint = f" (it looks like a {guess} checkpoint)" if guess and guess != variant else ""
        raise CheckpointMismatchError(
            f"checkpoint does not match SAM variant {variant!r}{hint}; first mismatches: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


#: The three ways to initialise the image encoder (``ModelConfig.encoder_init``).
ENCODER_INITS = ("mae", "sam", "random")
#: ``model.encoder_init`` of the paper presets: no default is the paper's recipe without a
#: checkpoint we cannot ship, so ``trainer.presets.Config.validate`` demands a choice.
REQUIRED_ENCODER_INIT = "<required: mae | sam | random>"


@dataclass(kw_only=True)
class ModelConfig:
    """The ``model`` section of the training config.

    Image-encoder initialisation is one choice, ``encoder_init``, plus the URL it needs
    (SAM_RECIPE.md §1 "init": the paper starts from an MAE-pretrained ViT; §5 the mapping):

    - ``"mae"``: ``mae_checkpoint`` is a facebookresearch/mae pretrain checkpoint
      (``mae_pretrain_vit_{base,large,huge}.pth``, timm layout); the encoder is initialised
      from it, the prompt encoder and decoder start random. The paper's recipe.
    - ``"sam"``: ``init_checkpoint`` is an official SAM ``.pth`` or one of our checkpoints;
      the whole model starts from it (fine-tuning).
    - ``"random"``: no checkpoint. For a paper variant this logs a WARNING at build time:
      with layer decay 0.8 the first blocks of a random ViT-H train at ~lr·0.8^33 ≈ 5e-7.

    The paper presets default to :data:`REQUIRED_ENCODER_INIT`, which config loading
    rejects (exit 2) naming the three choices; ``tiny_cpu`` and the section default are
    ``"random"`` (logged at INFO for ``tiny``). A URL that the choice does not use is an
    error, not silently ignored.
    """

    #: SAM size: tiny, vit_b, vit_l, vit_h.
    variant: str = "tiny"
    #: Image-encoder initialisation: mae (from mae_checkpoint), sam (from init_checkpoint)
    #: or random (warns for vit_b/l/h). The paper presets require it to be set.
    encoder_init: str = "random"
    #: Official SAM .pth or one of our checkpoints (URL or path); used iff encoder_init = "sam".
    init_checkpoint: str = ""
    #: facebookresearch/mae pretrain checkpoint (URL or path); used iff encoder_init = "mae".
    mae_checkpoint: str = ""
    #: Stochastic depth rate; negative = the variant's recipe value (0.4 H/L, 0.6 B).
    drop_path_rate: float = -1.0
    #: Decoder residual dropout (paper: 0.1); negative = the variant's default.
    decoder_dropout: float = -1.0
    #: Recompute each encoder block and each interactive decoder round in backward to save
    #: activation memory (needed for ViT-H with 64 masks × 11 rounds on 80 GiB cards).
    activation_checkpointing: bool = False
    #: Seed of the prompt encoder's Gaussian PE matrix (identical on all ranks).
    pe_seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: unknown {self.variant!r}; choose one of {sorted(VARIANTS)}")
        self._check_encoder_init()
        if self.drop_path_rate >= 1.0:
            raise ValueError(f"drop_path_rate: must be < 1, got {self.drop_path_rate}")
        if self.decoder_dropout >= 1.0:
            raise ValueError(f"decoder_dropout: must be < 1, got {self.decoder_dropout}")

    def _check_encoder_init(self) -> None:
        """``encoder_init`` is a known choice and exactly its URL field is set."""
        if self.encoder_init == REQUIRED_ENCODER_INIT:
            return  # a preset's marker: Config.validate rejects it with the full explanation
        if self.encoder_init not in ENCODER_INITS:
            raise ValueError(f"encoder_init: must be one of {ENCODER_INITS}, got {self.encoder_init!r}")
        needs = {"mae": "mae_checkpoint", "sam": "init_checkpoint"}.get(self.encoder_init)
        for name in ("mae_checkpoint", "init_checkpoint"):
            if name == needs and not getattr(self, name):
                raise ValueError(f"{name}: required by encoder_init={self.encoder_init!r} (a URL or path)")
            if name != needs and getattr(self, name):
                wanted = "mae" if name == "mae_checkpoint" else "sam"
                raise ValueError(f"{name}: set, but encoder_init={self.encoder_init!r} does not use it; "
                                 f"set encoder_init={wanted!r} or clear {name}")

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"activation_checkpointing": self.activation_checkpointing, "pe_seed": self.pe_seed}
        if self.drop_path_rate >= 0:
            out["drop_path_rate"] = self.drop_path_rate
        if self.decoder_dropout >= 0:
            out["decoder_dropout"] = self.decoder_dropout
        return out


def encoder_init_required_message() -> str:
    """The config error for a paper preset without ``model.encoder_init`` (names all choices)."""
    return ("model.encoder_init: required for the paper presets; choose one of: "
            "'mae' with model.mae_checkpoint=<url>/mae_pretrain_vit_{base,large,huge}.pth (the paper's "
            "MAE-pretrained encoder), 'sam' with model.init_checkpoint=<url>/sam_vit_*.pth (fine-tune "
            "an official SAM checkpoint), or 'random' (from scratch; not the paper's recipe, logs a warning)")


def build_model(cfg: ModelConfig) -> Sam:
    """Build the model of a training config, initialised as ``cfg.encoder_init`` says.

    Raises:
        ValueError: ``encoder_init`` is still a preset's required marker.
    """
    if cfg.encoder_init == REQUIRED_ENCODER_INIT:
        raise ValueError(encoder_init_required_message())
    model = build_sam(cfg.variant, checkpoint=cfg.init_checkpoint or None, **cfg.overrides())
    if cfg.encoder_init == "mae":
        from .mae import load_mae_checkpoint

        load_mae_checkpoint(model.image_encoder, cfg.mae_checkpoint, variant=cfg.variant)
    elif cfg.encoder_init == "sam":
        log.info("model.encoder_init=sam: whole model initialised from %s", cfg.init_checkpoint)
    elif cfg.variant == "tiny":
        log.info("model.encoder_init=random: the tiny model starts from random weights")
    else:
        log.warning("model.encoder_init=random: the %s image encoder starts from random weights, not the "
                    "paper's MAE initialisation (SAM_RECIPE.md §1); with layer-wise lr decay its first "
                    "blocks barely train. Set model.encoder_init=mae and model.mae_checkpoint for the "
                    "paper's recipe", cfg.variant)
    return model
