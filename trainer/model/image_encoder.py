"""ViT image encoder, exactly as segment-anything's ``ImageEncoderViT`` plus training extras.

Faithful to the official model (SAM_RECIPE.md §2): patch embed to a BHWC grid plus an
absolute ``pos_embed`` (1×G×G×D), pre-LN blocks that are windowed (14×14 windows over the
zero-padded grid, padding attended without a mask) except the global blocks, then a
conv neck with no final LayerNorm. Output ``B×256×64×64`` for a 1024² input.

Training additions (not in the official inference code): drop path on both residual
branches, optional activation checkpointing per block, SDPA attention. Windowed blocks
project only the real tokens (``Attention.forward_windowed``, the same math: padding
tokens project to the qkv bias).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, window_partition, window_unpartition  # noqa: F401 (re-exported)
from .common import DropPath, LayerNorm2d, MLPBlock


class Block(nn.Module):
    """Pre-LN transformer block with windowed or global attention and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.drop_path = DropPath(drop_path)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×H×W×C`` -> ``B×H×W×C``."""
        shortcut = x
        x = self.norm1(x)
        x = self.attn.forward_windowed(x, self.window_size) if self.window_size > 0 else self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Image to patch embedding: ``B×3×S×S`` -> ``B×(S/p)×(S/p)×D`` (BHWC)."""

    def __init__(
        self,
        kernel_size: tuple[int, int] = (16, 16),
        stride: tuple[int, int] = (16, 16),
        padding: tuple[int, int] = (0, 0),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT backbone + neck. ``forward(B×3×S×S) -> B×out_chans×(S/p)×(S/p)``.

    ``drop_path_rate`` is spread linearly over depth, ``linspace(0, rate, depth)`` (ViTDet's
    rule; the paper gives only the rate, SAM_RECIPE.md §1).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
        drop_path_rate: float = 0.0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.activation_checkpointing = activation_checkpointing
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size), stride=(patch_size, patch_size),
            in_chans=in_chans, embed_dim=embed_dim,
        )
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                norm_layer=norm_layer, act_layer=act_layer, use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=window_size if i not in global_attn_indexes else 0,
                input_size=(grid, grid), drop_path=rates[i],
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the block in backward: trades ~1/3 more compute for the
                # activations of the whole block (needed for ViT-H at 1024²).
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
