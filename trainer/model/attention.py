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

#: Windowed blocks skip the padding queries (``Attention.forward_windowed``'s bands) when
#: their attention would cost at least this many multiply-adds per image (padding rows ×
#: window keys × width): ViT-B at 256² saves ~8e7 and runs 2.4× faster, the tiny model's
#: ~2e5 would run 0.75× (four small calls instead of one; measured fwd+bwd on CPU).
REAL_QUERY_BANDS_MIN_MACS = 2**24


def skips_padding_queries(h: int, w: int, window_size: int, dim: int) -> bool:
    """Whether ``Attention.forward_windowed`` takes the real queries only on an ``h×w``
    grid of width ``dim`` (per image, so the choice, and ``trainer.flops``' executed
    count, do not depend on the batch size)."""
    padded_rows = -(-h // window_size) * -(-w // window_size) * window_size**2 - h * w
    return padded_rows * window_size**2 * dim >= REAL_QUERY_BANDS_MIN_MACS


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
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int],
    q_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Additive attention bias from decomposed relative positions (MViTv2).

    Args:
        q: unscaled queries ``B×(qh·qw)×C`` (B counts batch × heads).
        rel_pos_h, rel_pos_w: ``(2H−1)×C`` / ``(2W−1)×C`` tables.
        size: ``(H, W)`` key grid.
        q_size: ``(qh, qw)``: the queries sit at the top-left ``qh×qw`` positions of the
            key grid (a window's real tokens); None: the whole grid, as official.

    Returns:
        ``B×(qh·qw)×(H·W)`` bias, same dtype as ``q``.
    """
    h, w = size
    qh, qw = size if q_size is None else q_size
    rh = get_rel_pos(h, h, rel_pos_h)[:qh].to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w)[:qw].to(q.dtype)
    b, _, dim = q.shape
    r_q = q.reshape(b, qh, qw, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    n, nq = h * w, qh * qw
    if q.is_cuda and n % 8:
        # Memory-efficient kernels want the bias row stride aligned to 8 elements
        # (196-token windows are not): allocate padded, hand SDPA a sliced view.
        padded = q.new_empty(b, nq, n + (-n) % 8)
        bias = padded[..., :n]
        bias.view(b, qh, qw, h, w).copy_(rel_h[..., :, None] + rel_w[..., None, :])
        return bias
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, nq, n)


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
        """``window_unpartition(self(window_partition(x)))`` without computing for the padding.

        ``x``: ``B×H×W×C`` real tokens -> ``B×H×W×C``. The official block zero-pads the grid
        to whole windows *before* ``qkv`` and crops after ``proj``, so:

        - every padding token projects to exactly the qkv bias: ``qkv`` runs on the real
          tokens only and the bias is added after padding (its gradient still counts
          every padded key and value);
        - a padding position's query and output are cropped away: queries are taken for
          the real tokens only, in up to four bands of windows (full windows, the last
          window column, row and corner; :func:`_window_bands`), each attending to its
          whole padded ``ws×ws`` window of keys, rel-pos bias sliced to the real rows.

        The same math with fewer rows: at 256² (16×16 tokens in 28×28 padded windows) it
        skips 2/3 of the windowed blocks' qkv, attention and proj rows, at 1024² (64² in
        70²) 16%. Padding keys take part in the softmax, as official. Where the padding
        queries' attention is below :data:`REAL_QUERY_BANDS_MIN_MACS` (the tiny model) the
        queries stay padded in one call: the band calls' overhead would cost more.
        """
        h, w = x.shape[1], x.shape[2]
        if h % window_size == 0 and w % window_size == 0:
            windows, pad_hw = window_partition(x, window_size)
            return window_unpartition(self(windows), window_size, pad_hw, (h, w))
        c = x.shape[-1]
        qkv = F.linear(x, self.qkv.weight)  # B×H×W×3C, real tokens only
        if not skips_padding_queries(h, w, window_size, c):
            # Small grids (the tiny model): four band calls cost more than the padded queries.
            windows, pad_hw = window_partition(qkv, window_size)
            if self.qkv.bias is not None:
                windows = windows + self.qkv.bias
            return self.proj(window_unpartition(self._attend(windows), window_size, pad_hw, (h, w)))
        q = qkv[..., :c]
        kv, _ = window_partition(qkv[..., c:], window_size)  # (B·nW)×ws×ws×2C
        if self.qkv.bias is not None:
            q = q + self.qkv.bias[:c]
            kv = kv + self.qkv.bias[c:]
        return self.proj(self._attend_real_queries(q, kv, window_size))

    def _attend_real_queries(self, q: torch.Tensor, kv: torch.Tensor, ws: int) -> torch.Tensor:
        """Windowed attention for the real queries only.

        Args:
            q: ``B×H×W×C`` projected queries of the real tokens.
            kv: ``(B·nh·nw)×ws×ws×2C`` projected keys and values of the padded windows.

        Returns:
            ``B×H×W×C`` attention output, heads merged (before ``proj``).
        """
        b, h, w, c = q.shape
        heads = self.num_heads
        d = c // heads
        nh, nw = -(-h // ws), -(-w // ws)
        kv = kv.view(b, nh, nw, ws * ws, 2, heads, d)
        rows = []
        for r0, nr, qh in _window_bands(h, ws):
            cols = []
            for c0, nc, qw in _window_bands(w, ws):
                # The band's windows, each with its qh×qw real queries at the top left.
                qb = q[:, r0 * ws : r0 * ws + nr * qh, c0 * ws : c0 * ws + nc * qw]
                qb = qb.reshape(b, nr, qh, nc, qw, heads, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, qh * qw, d)
                kb, vb = kv[:, r0 : r0 + nr, c0 : c0 + nc].permute(4, 0, 1, 2, 5, 3, 6).reshape(2, -1, ws * ws, d)
                bias = None
                if self.use_rel_pos:
                    bias = decomposed_rel_pos_bias(qb, self.rel_pos_h, self.rel_pos_w, (ws, ws), (qh, qw))
                out = self._heads_attention(qb, kb, vb, bias)
                cols.append(out.view(b, nr, nc, heads, qh, qw, d).permute(0, 1, 4, 2, 5, 3, 6)
                            .reshape(b, nr * qh, nc * qw, c))
            rows.append(torch.cat(cols, dim=2) if len(cols) > 1 else cols[0])
        return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Projected ``B×H×W×3C`` qkv -> ``B×H×W×C`` attention output, heads merged (before ``proj``)."""
        b, h, w, _ = qkv.shape
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        out = self._heads_attention(q, k, v, bias)
        return out.reshape(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)

    def _heads_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``softmax((q·s)kᵀ + bias) v`` for ``(B·heads)×Nq×d`` queries over ``(B·heads)×Nk×d``."""
        # Training on CPU: SDPA's math kernel with a float mask that needs a gradient is ~10%
        # slower than the explicit formulation (tiny and ViT-B encoders, forward + backward).
        # Without grad (CPU evaluation) SDPA has a fused kernel and does not materialise the
        # N×N scores: keep it there.
        if self.use_sdpa and (q.is_cuda or SDPA_ON_CPU or not torch.is_grad_enabled()):
            # Fused kernels want 4-D (batch, heads, tokens, dim); splitting dim 0 is a view.
            b = q.shape[0] // self.num_heads
            mask4 = None if bias is None else bias.view(b, self.num_heads, *bias.shape[1:])
            out = F.scaled_dot_product_attention(
                *(t.view(b, self.num_heads, *t.shape[1:]) for t in (q, k, v)), attn_mask=mask4
            )
            return out.view(q.shape[0], q.shape[1], -1)
        return reference_attention(q, k, v, bias, self.scale)


def _window_bands(n: int, ws: int) -> list[tuple[int, int, int]]:
    """Along one axis of ``n`` real tokens in ``ws``-wide windows: ``(first window, number of
    windows, real tokens per window)`` for the full windows and the last partial one."""
    full, rest = divmod(n, ws)
    return ([(0, full, ws)] if full else []) + ([(full, 1, rest)] if rest else [])
