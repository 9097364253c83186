"""Encoder self-attention with decomposed relative position bias.

The official ``Attention`` computes ``softmax((q·s)kᵀ + B) v`` with the bias
``B[b, (qh,qw), (kh,kw)] = rel_h[b,qh,qw,kh] + rel_w[b,qh,qw,kw]`` built from the
*unscaled* query (SAM_RECIPE.md §2 "Attention and fused kernels"). That maps exactly onto
``F.scaled_dot_product_attention(q, k, v, attn_mask=B)``; PyTorch then picks a fused
kernel that accepts an additive float mask with gradient (memory-efficient on CUDA,
flash does not take a mask). On CPU, where SDPA would run its math kernel, the explicit
formulation :func:`reference_attention` is used: about 10% faster there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


#: Use SDPA on CPU too (tests compare the two paths there); off: explicit is faster on CPU.
SDPA_ON_CPU = False


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather relative-position embeddings for every (query, key) offset.

    Args:
        q_size: query length along one axis; k_size: key length along the same axis.
        rel_pos: ``L×C`` table; linearly interpolated when ``L != 2·max(q,k)−1``.

    Returns:
        ``q_size×k_size×C`` embeddings.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias from decomposed relative positions (MViTv2).

    Args:
        q: unscaled queries ``B×(H·W)×C`` (B counts batch × heads).
        rel_pos_h, rel_pos_w: ``(2H−1)×C`` / ``(2W−1)×C`` tables.
        size: ``(H, W)`` token grid (queries and keys share it).

    Returns:
        ``B×(H·W)×(H·W)`` bias, same dtype as ``q``.
    """
    h, w = size
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    b, _, dim = q.shape
    r_q = q.reshape(b, h, w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    n = h * w
    if q.is_cuda and n % 8:
        # Memory-efficient kernels want the bias row stride aligned to 8 elements
        # (196-token windows are not): allocate padded, hand SDPA a sliced view.
        padded = q.new_empty(b, n, n + (-n) % 8)
        bias = padded[..., :n]
        bias.view(b, h, w, h, w).copy_(rel_h[..., :, None] + rel_w[..., None, :])
        return bias
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, n)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``B×H×W×C`` into ``(B·nW)×ws×ws×C`` windows, zero-padding H and W up to a multiple."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: back to ``B×H×W×C`` with padding removed."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The official explicit formulation ``softmax((q·s)kᵀ + B) v`` (``B×N×C`` inputs)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention over a ``B×H×W×C`` token grid with rel-pos bias.

    Parameters (official names): ``qkv``, ``proj``, ``rel_pos_h`` ``(2H−1)×hd``,
    ``rel_pos_w`` ``(2W−1)×hd``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×H×W×C`` -> ``B×H×W×C``."""
        return self.proj(self._attend(self.qkv(x)))

    def forward_windowed(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """``window_unpartition(self(window_partition(x)))`` without projecting the padding.

        ``x``: ``B×H×W×C`` real tokens -> ``B×H×W×C``. The official block zero-pads the grid
        to whole windows *before* ``qkv``, so every padding token projects to exactly the
        qkv bias, and ``proj`` of padding positions is cropped away. Projecting only the
        real tokens (bias added after padding, so its gradient still counts every padded
        key and value) is the same math with fewer rows: at 256² (16×16 tokens in
        28×28 padded windows) it skips 2/3 of the windowed blocks' qkv and proj rows, at
        1024² (64² in 70²) 16%. Padding keys still take part in the softmax, as official.
        """
        h, w = x.shape[1], x.shape[2]
        if h % window_size == 0 and w % window_size == 0:
            windows, pad_hw = window_partition(x, window_size)
            return window_unpartition(self(windows), window_size, pad_hw, (h, w))
        qkv = F.linear(x, self.qkv.weight)
        windows, pad_hw = window_partition(qkv, window_size)
        if self.qkv.bias is not None:
            windows = windows + self.qkv.bias
        out = window_unpartition(self._attend(windows), window_size, pad_hw, (h, w))
        return self.proj(out)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Projected ``B×H×W×3C`` qkv -> ``B×H×W×C`` attention output, heads merged (before ``proj``)."""
        b, h, w, _ = qkv.shape
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        # Training on CPU: SDPA's math kernel with a float mask that needs a gradient is ~10%
        # slower than the explicit formulation (tiny and ViT-B encoders, forward + backward).
        # Without grad (CPU evaluation) SDPA has a fused kernel and does not materialise the
        # N×N scores: keep it there.
        if self.use_sdpa and (qkv.is_cuda or SDPA_ON_CPU or not torch.is_grad_enabled()):
            # Fused kernels want 4-D (batch, heads, tokens, dim); splitting dim 0 is a view.
            shape4 = (b, self.num_heads, h * w, -1)
            mask4 = None if bias is None else bias.view(b, self.num_heads, h * w, h * w)
            out = F.scaled_dot_product_attention(
                q.view(shape4), k.view(shape4), v.view(shape4), attn_mask=mask4
            )
        else:
            out = reference_attention(q, k, v, bias, self.scale)
        return out.reshape(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
