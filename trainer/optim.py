"""AdamW with layer-wise lr decay, and SAM's warmup + step schedule (SAM_RECIPE.md §1, §5).

Parameter groups are keyed by (lr_scale, weight_decay):

- lr_scale: ViTDet's layer-wise decay on the image encoder (SAM_RECIPE.md §5):
  ``patch_embed`` / ``pos_embed`` are layer 0 → ld^(L+1); ``blocks.i`` is layer i+1 →
  ld^(L−i); everything else (neck, prompt encoder, mask decoder) is layer L+1 → 1.0.
- weight_decay: 0.1 (paper). The paper lists no exclusions (SAM_RECIPE.md §1, table
  "weight decay"; "Discrepancies" 6), so every exclusion below is a choice, each with
  its source in :data:`NO_DECAY_SOURCES`:

  - ViTDet (detectron2 ``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py``:
    ``overrides={"pos_embed": {"weight_decay": 0.0}}`` with ``configs/common/optim.py``'s
    ``weight_decay_norm=0.0``) excludes only ``pos_embed`` and norm weights/biases; it
    decays every other bias and the ``rel_pos_h/w`` tables (its ViT-H LVIS config
    excludes nothing).
  - Every 1-D parameter (all biases as well as norms): MAE fine-tuning / timm
    (``param_groups_lrd``: ``ndim == 1``) and SAM 2 (``*bias*`` and LayerNorm) do this;
    ViTDet does not for non-norm biases.
  - Ours: ``rel_pos_h/w`` (position tables like ``pos_embed``) and the prompt encoder's /
    decoder's learned embeddings and tokens (``point_embeddings``, ``not_a_point_embed``,
    ``no_mask_embed``, ``iou_token``, ``mask_tokens``), treated like ViT's ``cls_token``
    (excluded by MAE/timm): lookup vectors, not weights of a linear map; decaying them
    only pulls prompts toward zero.

  Configurable via ``no_decay_patterns`` (``--set optim.no_decay_patterns=*pos_embed``
  gives ViTDet's rule except for the non-norm biases).

Names may carry wrapper prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``);
they are stripped before matching.
"""

from __future__ import annotations

import bisect
import fnmatch
import itertools
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from trainer.model.checkpoint_io import strip_wrapper_prefix
_BLOCK_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.")

#: Where each default no-decay pattern comes from (1-D parameters are excluded by rule:
#: MAE/timm and SAM 2; ViTDet excludes only the norms among them). See the module docstring.
NO_DECAY_SOURCES: dict[str, str] = {
    "*pos_embed": "ViTDet (detectron2 ViTDet configs), MAE/timm",
    "*rel_pos_h": "ours (a position table like pos_embed; ViTDet decays it)",
    "*rel_pos_w": "ours (a position table like pos_embed; ViTDet decays it)",
    "*point_embeddings.*": "ours (prompt lookup vector, like a cls_token in MAE/timm)",
    "*not_a_point_embed.*": "ours (prompt lookup vector, like a cls_token in MAE/timm)",
    "*no_mask_embed.*": "ours (prompt lookup vector, like a cls_token in MAE/timm)",
    "*iou_token.*": "ours (output token, like a cls_token in MAE/timm)",
    "*mask_tokens.*": "ours (output tokens, like a cls_token in MAE/timm)",
}


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and lr-schedule settings; presets in ``OPTIM_PRESETS``.

    Attributes:
        lr: peak (post-warmup) learning rate. Paper ViT-H: 8e-4.
        betas: AdamW betas. Paper: (0.9, 0.999).
        eps: AdamW eps. Paper silent; PyTorch default 1e-8.
        weight_decay: AdamW decoupled weight decay. Paper: 0.1.
        layer_decay: layer-wise lr decay on the image encoder. Paper ViT-H: 0.8.
        warmup_iters: linear warmup length in iterations. Paper: 250.
        warmup_start_factor: lr factor at iteration 0. Paper silent; ViTDet's 0.001.
        max_iters: total iterations. Paper ViT-H: 90,000.
        milestones: iterations at which the lr is multiplied by ``decay_gamma``
            (strictly increasing, <= max_iters). Paper ViT-H: (60,000, 86,666).
        decay_gamma: step decay factor. Paper: 0.1.
        no_decay_patterns: fnmatch patterns (on names without wrapper prefixes) of
            parameters without weight decay, in addition to all 1-D parameters. Paper
            silent; the defaults' sources are in ``NO_DECAY_SOURCES``.
        fused: PyTorch's fused AdamW kernel (CPU and CUDA): the same update in one pass
            per parameter group. PyTorch's default otherwise runs a per-parameter loop on
            CPU (6× slower for ViT-B, ``benchmarks/bench_kernels.py``) and ``foreach`` on
            CUDA. false: that default. A resumed run takes this setting, not the
            checkpoint's.
    """

    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    layer_decay: float = 0.8
    warmup_iters: int = 250
    warmup_start_factor: float = 0.001
    max_iters: int = 90_000
    milestones: tuple[int, ...] = (60_000, 86_666)
    decay_gamma: float = 0.1
    no_decay_patterns: tuple[str, ...] = field(default=tuple(NO_DECAY_SOURCES))
    fused: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.milestones = tuple(int(m) for m in self.milestones)
        self.no_decay_patterns = tuple(self.no_decay_patterns)
        if self.lr < 0:
            raise ValueError(f"optim.lr must be >= 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.max_iters <= 0:
            raise ValueError(f"optim.max_iters must be > 0, got {self.max_iters}")
        if not 0 <= self.warmup_iters <= self.max_iters:
            raise ValueError(
                f"optim.warmup_iters must be in [0, max_iters={self.max_iters}], "
                f"got {self.warmup_iters}"
            )
        if not 0 < self.warmup_start_factor <= 1:
            raise ValueError(
                f"optim.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}"
            )
        ms = self.milestones
        if any(b <= a for a, b in itertools.pairwise(ms)) or (ms and ms[0] <= 0):
            raise ValueError(f"optim.milestones must be positive and strictly increasing, got {ms}")
        if ms and ms[-1] > self.max_iters:
            raise ValueError(
                f"optim.milestones must be <= max_iters={self.max_iters}, got {ms}"
            )
        if not 0 < self.decay_gamma <= 1:
            raise ValueError(f"optim.decay_gamma must be in (0, 1], got {self.decay_gamma}")


def _scaled_milestones(max_iters: int) -> tuple[int, int]:
    # ViT-B/L decay points are not in the paper; we keep ViT-H's fractions of the run
    # (60k/90k = 2/3 and 86,666/90k ≈ 26/27), i.e. 120,000 and 173,333 for 180k.
    return (max_iters * 2 // 3, max_iters * 26 // 27)


OPTIM_PRESETS: dict[str, OptimConfig] = {
    # SAM_RECIPE.md §1: lr 8e-4, ld 0.8, 90k iterations, ×0.1 at 60k and 86,666.
    "vit_h": OptimConfig(),
    # SAM_RECIPE.md §1 (ViT-B/L): 180k iterations; B lr 8e-4 ld 0.6, L lr 4e-4 ld 0.8.
    "vit_b": OptimConfig(
        lr=8e-4, layer_decay=0.6, max_iters=180_000, milestones=_scaled_milestones(180_000)
    ),
    "vit_l": OptimConfig(
        lr=4e-4, layer_decay=0.8, max_iters=180_000, milestones=_scaled_milestones(180_000)
    ),
    # A CPU smoke-run preset (not from the paper): short warmup, few hundred steps.
    "tiny": OptimConfig(
        lr=1e-3, layer_decay=0.9, warmup_iters=20, max_iters=300,
        milestones=_scaled_milestones(300),
    ),
}


def optim_preset(name: str, **overrides: object) -> OptimConfig:
    """A copy of ``OPTIM_PRESETS[name]`` with field overrides (validated)."""
    if name not in OPTIM_PRESETS:
        raise ValueError(f"optim preset must be one of {sorted(OPTIM_PRESETS)}, got {name!r}")
    return replace(OPTIM_PRESETS[name], **overrides)


def layer_id(name: str, num_layers: int) -> int:
    """ViTDet layer index of a parameter (SAM_RECIPE.md §5).

    Args:
        name: parameter name, wrapper prefixes allowed.
        num_layers: L, the number of image-encoder blocks.

    Returns:
        0 for ``image_encoder.patch_embed`` / ``pos_embed``, i+1 for
        ``image_encoder.blocks.i``, L+1 for everything else.
    """
    name = strip_wrapper_prefix(name)
    if name.startswith(("image_encoder.patch_embed.", "image_encoder.pos_embed")):
        return 0
    match = _BLOCK_RE.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def lr_scale(name: str, num_layers: int, layer_decay: float) -> float:
    """Layer-wise lr multiplier ld^(L+1−layer_id): ld^(L+1), ld^(L−i), or 1.0."""
    return layer_decay ** (num_layers + 1 - layer_id(name, num_layers))


def uses_weight_decay(name: str, ndim: int, cfg: OptimConfig) -> bool:
    """False for 1-D parameters and names matching ``cfg.no_decay_patterns``."""
    if ndim <= 1:
        return False
    name = strip_wrapper_prefix(name)
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.no_decay_patterns)


def count_encoder_layers(names: list[str]) -> int:
    """L = number of distinct ``image_encoder.blocks.i`` (0 without an encoder)."""
    ids = {int(m.group(1)) for n in names if (m := _BLOCK_RE.match(strip_wrapper_prefix(n)))}
    return max(ids) + 1 if ids else 0


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay and weight-decay exclusions.

    Frozen parameters (``requires_grad=False``) are left out.

    Returns:
        list of dicts with ``params``, ``lr`` (= cfg.lr · lr_scale), ``lr_scale``,
        ``weight_decay`` and ``group_name`` (``layer{id}_{decay|no_decay}``), sorted
        by layer id so group order is deterministic across ranks.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    num_layers = count_encoder_layers([n for n, _ in named])
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        lid = layer_id(name, num_layers)
        decay = uses_weight_decay(name, param.ndim, cfg)
        key = (lid, decay)
        if key not in groups:
            scale = cfg.layer_decay ** (num_layers + 1 - lid)
            groups[key] = {
                "params": [],
                "lr": cfg.lr * scale,
                "lr_scale": scale,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "group_name": f"layer{lid}_{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def lr_factor(iteration: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at ``iteration`` (0-based; SAM_RECIPE.md §1).

    Linear warmup from ``warmup_start_factor`` to 1 over ``warmup_iters``, then ×
    ``decay_gamma`` at each milestone reached (``iteration >= milestone``). The warmup
    multiplies the step schedule, as detectron2's ``WarmupParamScheduler``.
    """
    step = cfg.decay_gamma ** bisect.bisect_right(cfg.milestones, iteration)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        return step * (cfg.warmup_start_factor * (1 - alpha) + alpha)
    return step


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, cfg)``; each group's lr already holds its scale."""
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
        weight_decay=cfg.weight_decay, **implementation(model, cfg),
    )


#: Devices PyTorch's fused AdamW runs on (others raise at construction).
FUSED_DEVICES = ("cpu", "cuda")


def implementation(model: nn.Module, cfg: OptimConfig) -> dict[str, bool | None]:
    """AdamW's ``fused`` / ``foreach`` arguments for ``cfg.fused`` and where the model lives:
    fused when asked for and every parameter is a float tensor on a supported device."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.fused and bool(params) and all(
        p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": None}


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping ``lr_factor`` once per iteration.

    LambdaLR multiplies each group's ``initial_lr`` (= cfg.lr · lr_scale, set by
    ``param_groups``), so the layer-wise scales are kept. Call ``scheduler.step()``
    after every ``optimizer.step()``.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
