"""The decoder's cross-attentions multiplied through the projection weights.

Each round, for each of the N masks, the decoder's two-way transformer attends between
the S = h·w image tokens (C = 256 wide) and only T prompt tokens (5 output tokens plus
the prompts: 7 to ~15). Three attentions per layer pair project the *image* side through
a ``C -> D`` linear map (D = 128, the internal dim) per mask: the keys and values of
token→image (layer 2 and the final attention), the queries of image→token, and the
``D -> C`` ``out_proj`` of image→token. With h heads of width d = D/h, every one of those
products can instead be multiplied through the weights on the *token* side:

    token→image   scoresₕ = qₕ·(W_kₕ·x + b_kₕ)      = (qₕ·W_kₕ)·x + qₕ·b_kₕ
                  outₕ    = Aₕ·(X·W_vₕᵀ + b_vₕ)     = (Aₕ·X)·W_vₕᵀ + b_vₕ      (rows of A sum to 1)
    image→token   scoresₕ = (W_qₕ·x + b_qₕ)·kₕ      = x·(W_qₕᵀ·kₕ) + b_qₕ·kₕ
                  out     = Σₕ Aₕ·vₕ·W_oₕᵀ + b_o    = A·[vₕ·W_oₕᵀ]ₕ + b_o

so the S-long products are ``S×C`` by ``C×(h·T)`` instead of ``S×C`` by ``C×D``: a
fraction h·T/D of the multiply-adds (8·11/128 ≈ 0.69 at T = 11; 0.44 in the first
round). It is the same function reassociated (equal to fp32 rounding, with every
parameter's gradient, ``tests/unit/test_step_equivalence.py``), not an approximation.
The ``qₕ·b_kₕ`` shift is constant over the keys, so the softmax ignores it; it stays in
the graph so that ``k_proj.bias`` still receives its (zero) gradient, as DDP expects.

Used where h·T < D (:func:`through_pays`), on CPU, where ``benchmarks/bench_kernels.py``
("few-token attention") measures a decoder round at 256 px 1.19–1.32× faster with 7 tokens,
1.09–1.24× with 11, even with 15, and 1.25× at 1024 px. On CUDA the decoder keeps SDPA until a GPU run measures this path: it saves the
``N×(h·T)×S`` softmax weights for backward instead of the ``N×S×D`` projected keys and
values (less memory while h·T < D), but trades a fused kernel for three batched matmuls
and a softmax; the benchmark row forces it on whatever the device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def multiplies_through(attn: nn.Module, num_tokens: int, like: Tensor) -> bool:
    """Whether the cross-attention ``attn`` (an ``Attention``) with ``num_tokens`` prompt
    tokens runs through its weights (:func:`through_pays`; ``like``: a tensor on its device)."""
    return through_pays(attn.num_heads, num_tokens, attn.internal_dim, like.is_cuda)


def through_pays(num_heads: int, num_tokens: int, internal_dim: int, cuda: bool) -> bool:
    """The rule: fewer multiply-adds (h·T < D), on CPU (module docstring)."""
    return not cuda and num_heads * num_tokens < internal_dim


def tokens_to_image(attn: nn.Module, q: Tensor, key_src: Tensor, value_src: Tensor) -> Tensor:
    """``attn.attend(q, k_proj(key_src), v_proj(value_src))`` without projecting the image.

    Args:
        attn: the ``Attention`` (its ``k_proj``, ``v_proj``, ``out_proj``, ``num_heads``).
        q: ``N×T×D`` projected token queries.
        key_src: ``N×S×C`` image tokens the keys are projected from (``keys + pe``).
        value_src: ``N×S×C`` image tokens the values are projected from.

    Returns:
        ``N×T×C``, after ``out_proj``.
    """
    n, t, dim = q.shape
    heads, width = attn.num_heads, key_src.shape[-1]
    d = dim // heads
    q = q * d**-0.5
    shift = _through_heads(q, attn.k_proj.bias.view(heads, d, 1))  # qₕ·b_kₕ: N×(h·T)×1
    through = _through_heads(q, attn.k_proj.weight.view(heads, d, width))  # qₕ·W_kₕ: N×(h·T)×C
    weights = torch.baddbmm(shift, through, key_src.transpose(1, 2)).softmax(dim=-1)
    mixed = weights @ value_src  # Aₕ·X: N×(h·T)×C
    out = _back_from_heads(mixed, attn.v_proj.weight.view(heads, d, width)) + attn.v_proj.bias  # N×T×D
    return attn.out_proj(out)


def _through_heads(x: Tensor, weight: Tensor) -> Tensor:
    """Each head's slice of ``x`` times that head's weight rows: ``N×T×D`` (D = h·d) and
    ``h×d×C`` -> ``N×(h·T)×C`` (rows head-major; C = 1 for a bias). One ``(N·T)×d`` product per head, so
    the weight's gradient needs no reduction over masks."""
    n, t, dim = x.shape
    heads, d, width = weight.shape
    per_head = x.reshape(n * t, heads, d).transpose(0, 1) @ weight  # h×(N·T)×C
    return per_head.view(heads, n, t, width).transpose(0, 1).reshape(n, heads * t, width)


def _back_from_heads(x: Tensor, weight: Tensor) -> Tensor:
    """The adjoint layout of :func:`_through_heads`: ``N×(h·T)×C`` and ``h×d×C`` ->
    ``N×T×D`` with ``out[:, :, head] = x[:, head] @ weight[head]ᵀ``."""
    n, rows, width = x.shape
    heads, d, _ = weight.shape
    t = rows // heads
    per_head = x.view(n, heads, t, width).transpose(0, 1).reshape(heads, n * t, width) @ weight.transpose(1, 2)
    return per_head.view(heads, n, t, d).permute(1, 2, 0, 3).reshape(n, t, heads * d)


def image_to_tokens(attn: nn.Module, k: Tensor, v: Tensor, *, query_src: Tensor | None = None,
                    q: Tensor | None = None) -> Tensor:
    """``attn.attend(q_proj(query_src), k, v)`` with the image side multiplied through.

    Exactly one of ``query_src`` (``N×S×C``: the queries are projected through the
    weights too) or ``q`` (``N×S×D`` already projected, e.g. factored: only ``out_proj``
    is multiplied through) is given.

    Args:
        attn: the ``Attention`` (its ``q_proj``, ``out_proj``, ``num_heads``).
        k, v: ``N×T×D`` projected token keys and values.

    Returns:
        ``N×S×C``, after ``out_proj``.
    """
    if (query_src is None) == (q is None):
        raise ValueError("image_to_tokens takes exactly one of query_src or q")
    n, t, dim = k.shape
    heads, width = attn.num_heads, attn.out_proj.weight.shape[0]
    d = dim // heads
    k = k * d**-0.5
    # Scores key-major (N×h×T×S), as few_keys_attention: the softmax then reduces over
    # the short key axis with the long image axis contiguous (a softmax over a last dim
    # of ~11 runs several times slower on CPU).
    if query_src is not None:
        through = _through_heads(k, attn.q_proj.weight.view(heads, d, width))  # (W_qₕᵀ·kₕ)ᵀ: N×(h·T)×C
        shift = _through_heads(k, attn.q_proj.bias.view(heads, d, 1))  # b_qₕ·kₕ: N×(h·T)×1
        scores = torch.baddbmm(shift, through, query_src.transpose(1, 2))  # N×(h·T)×S
    else:
        s = q.shape[1]
        k_heads = k.view(n, t, heads, d).transpose(1, 2)  # N×h×T×d
        scores = k_heads @ q.view(n, s, heads, d).permute(0, 2, 3, 1)  # N×h×T×S
    s = scores.shape[-1]
    weights = scores.view(n, heads, t, s).softmax(dim=2).view(n, heads * t, s)
    o_weight = attn.out_proj.weight.view(width, heads, d).transpose(0, 1)  # W_oₕ: h×C×d
    value_out = _through_heads(v, o_weight.transpose(1, 2))  # vₕ·W_oₕᵀ: N×(h·T)×C
    return torch.baddbmm(attn.out_proj.bias, weights.transpose(1, 2), value_out)  # N×S×C
