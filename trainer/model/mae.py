"""Initialise SAM's image encoder from a facebookresearch/mae pretrain checkpoint.

MAE ships timm-layout ViT weights under ``ckpt["model"]`` (SAM_RECIPE.md §5):
``cls_token`` (1×1×D), ``pos_embed`` (1×(1+G²)×D, fixed 2-D sin-cos, cls row 0),
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``; full MAE models add ``mask_token`` and ``decoder_*``. ViT-B/L are patch 16 at
224 (G=14); **ViT-H is patch 14** (G=16).

Mapping into ``image_encoder``:

- ``mlp.fc1/fc2`` -> ``mlp.lin1/lin2``; norms, qkv, proj keep their names.
- ``pos_embed``: drop the cls row, reshape to G×G, bicubic-resize (as MAE's
  ``interpolate_pos_embed``) to the encoder grid (64×64 at 1024²), store BHWC.
- ``patch_embed.proj.weight``: a kernel of another size (14×14 for ViT-H) is resized
  bicubically to 16×16 as ViTDet did, then scaled by ``(k_old/k_new)²`` so that the
  response to a locally constant image is preserved (a bicubic resize alone would grow
  it by ≈(16/14)² because the kernel covers more pixels). The paper does not state the
  method; ``tests/unit/test_mae.py`` checks this property.
- Dropped: ``cls_token``, ``norm.*`` (SAM has no final norm), ``mask_token``, ``decoder_*``.
- Left at their init: ``rel_pos_h/w`` (zero), ``neck.*``.
"""

from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import storage

log = logging.getLogger(__name__)

_DROP = re.compile(r"^(cls_token|norm\.(weight|bias)|mask_token|decoder_.*|fc_norm\..*|head\..*)$")


@dataclass
class MaeLoadReport:
    """What :func:`load_mae_state_dict` did: keys the encoder kept at init (``missing``)
    and checkpoint keys it dropped on purpose (``unexpected``)."""

    missing: list[str]
    unexpected: list[str]
    source_grid: int
    source_patch: int


class MaeCheckpointError(ValueError):
    """The MAE checkpoint does not fit the encoder; the message names keys and shapes."""


def _map_key(key: str) -> str:
    return key.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``1×(1+G²)×D`` (with cls row) or ``1×G²×D`` -> ``1×grid×grid×D`` (BHWC), bicubic."""
    tokens = pos_embed[0]
    g = int(round(tokens.shape[0] ** 0.5))
    if g * g != tokens.shape[0]:
        tokens = tokens[1:]  # drop the cls row
        g = int(round(tokens.shape[0] ** 0.5))
    if g * g != tokens.shape[0]:
        raise MaeCheckpointError(f"pos_embed has {pos_embed.shape[1]} tokens: not a square grid (+cls)")
    x = tokens.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    if g != grid:
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous()


def resize_patch_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    """``D×3×k×k`` -> ``D×3×size×size``: bicubic resize, rescaled by ``(k/size)²``."""
    k = weight.shape[-1]
    if k == size:
        return weight
    resized = F.interpolate(weight.float(), size=(size, size), mode="bicubic", align_corners=False)
    return resized * (k * k) / (size * size)


def _check_fit(src: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], variant: str) -> None:
    """Raise :class:`MaeCheckpointError` naming depth and shape mismatches (depth first)."""
    problems = []
    extra = sorted({k.split(".")[1] for k in src if k.startswith("blocks.") and k not in expected}, key=int)
    if extra:
        problems.append(f"checkpoint has blocks {extra[:5]}... beyond the encoder depth")
    missing = sorted(
        {k.split(".")[1] for k in expected if k.startswith("blocks.") and "rel_pos" not in k and k not in src}, key=int
    )
    if missing:
        problems.append(f"encoder blocks {missing[:5]}... are missing from the checkpoint")
    problems += [
        f"{k}: checkpoint {tuple(v.shape)} vs encoder {tuple(expected[k].shape)}"
        for k, v in src.items()
        if k in expected and k not in ("pos_embed", "patch_embed.proj.weight") and v.shape != expected[k].shape
    ]
    if problems:
        raise MaeCheckpointError(f"MAE checkpoint does not fit SAM variant {variant!r}: " + "; ".join(problems[:6]))


def load_mae_state_dict(encoder: nn.Module, mae_state: dict[str, torch.Tensor], variant: str = "?") -> MaeLoadReport:
    """Load MAE weights (``ckpt["model"]`` layout) into an ``ImageEncoderViT`` in place."""
    expected = encoder.state_dict()
    mapped = {_map_key(k): v for k, v in mae_state.items() if not _DROP.match(k)}
    _check_fit(mapped, expected, variant)
    unexpected = sorted(k for k in mae_state if _DROP.match(k) or _map_key(k) not in expected)
    kept = {k: v for k, v in mapped.items() if k in expected}
    if "pos_embed" not in kept or "patch_embed.proj.weight" not in kept:
        raise MaeCheckpointError("MAE checkpoint lacks pos_embed or patch_embed.proj.weight")

    src_patch = kept["patch_embed.proj.weight"].shape[-1]
    src_tokens = kept["pos_embed"].shape[1]
    grid = expected["pos_embed"].shape[1]
    kept["pos_embed"] = resize_pos_embed(kept["pos_embed"], grid)
    kept["patch_embed.proj.weight"] = resize_patch_kernel(
        kept["patch_embed.proj.weight"], expected["patch_embed.proj.weight"].shape[-1]
    )
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if kept[key].shape != expected[key].shape:
            raise MaeCheckpointError(
                f"MAE checkpoint does not fit SAM variant {variant!r}: {key} maps to "
                f"{tuple(kept[key].shape)}, encoder expects {tuple(expected[key].shape)}"
            )
    result = encoder.load_state_dict({k: v.to(expected[k].dtype) for k, v in kept.items()}, strict=False)
    missing = sorted(result.missing_keys)
    src_grid = math.isqrt(src_tokens - 1) if math.isqrt(src_tokens - 1) ** 2 == src_tokens - 1 else math.isqrt(src_tokens)
    log.info("MAE init (%s): loaded %d tensors; kept at init %d keys %s; dropped %s",
             variant, len(kept), len(missing), missing, unexpected)
    return MaeLoadReport(missing=missing, unexpected=unexpected, source_grid=src_grid, source_patch=src_patch)


def load_mae_checkpoint(encoder: nn.Module, url: str, variant: str = "?") -> MaeLoadReport:
    """Read an MAE ``.pth`` from any URL and load it with :func:`load_mae_state_dict`."""
    with storage.open_url(url, "rb") as f:
        ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise MaeCheckpointError(f"{url}: no state_dict under 'model'")
    return load_mae_state_dict(encoder, state, variant)
