"""Two-way transformer of the mask decoder (official ``TwoWayTransformer``), SDPA attention.

Training addition: ``dropout`` (0.1 in the paper's training, SAM_RECIPE.md §2 "Gaps")
applied to every attention and MLP output before its residual add (DETR-style residual
dropout; where exactly the paper applies it is unstated). Identity in eval mode.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .common import MLPBlock
from .factored import FactoredTokens
from .few_tokens import image_to_tokens, multiplies_through, tokens_to_image


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may downscale the embedding.

    ``q: B×Nq×C, k/v: B×Nk×C -> B×Nq×C``; internal dim ``C / downsample_rate``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide internal dim {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention and ``out_proj`` of already projected ``q: B×Nq×D``, ``k/v: B×Nk×D``."""
        if not q.is_cuda and few_keys(q.shape[1], k.shape[1]):
            return self.out_proj(few_keys_attention(q, k, v, self.num_heads))
        q, k, v = self._separate_heads(q), self._separate_heads(k), self._separate_heads(v)
        # No bias here, so plain SDPA (flash / memory-efficient on GPU) is exact.
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


def few_keys(num_queries: int, num_keys: int) -> bool:
    """Whether :func:`few_keys_attention` beats SDPA on CPU: the image-to-token attention
    (4096 image tokens over <= ~15 prompt tokens). Measured in ``benchmarks/bench_kernels.py``."""
    return num_keys <= FEW_KEYS_MAX and num_queries >= 4 * num_keys


#: The most keys for which :func:`few_keys_attention` is used on CPU.
FEW_KEYS_MAX = 64


def few_keys_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """``softmax(q·kᵀ/√d)·v`` per head for many queries over few keys, keys-major.

    The same math as SDPA (agrees to fp64 rounding, ``tests/unit/test_step_equivalence.py``): the scores
    are laid out ``B×heads×Nk×Nq`` so the softmax reduces over the short key axis while
    the long query axis stays contiguous; CPU SDPA's per-query-block kernel spends its time
    on overhead when there are only a few keys (2–2.5× slower at SAM's decoder shapes).

    Args:
        q: ``B×Nq×C`` projected queries; k, v: ``B×Nk×C`` (heads merged in C).

    Returns:
        ``B×Nq×C`` attention output, heads merged.
    """
    b, nq, c = q.shape
    nk, d = k.shape[1], c // num_heads
    keys = k.view(b, nk, num_heads, d).transpose(1, 2)  # B×h×Nk×d
    values = v.view(b, nk, num_heads, d).transpose(1, 2)
    queries_t = (q * d**-0.5).view(b, nq, num_heads, d).permute(0, 2, 3, 1)  # B×h×d×Nq
    weights = (keys @ queries_t).softmax(dim=2)  # B×h×Nk×Nq
    out = weights.transpose(2, 3) @ values  # B×h×Nq×d
    return out.transpose(1, 2).reshape(b, nq, c)


class TwoWayAttentionBlock(nn.Module):
    """Self-attn on tokens, token→image cross-attn, MLP on tokens, image→token cross-attn."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.dropout = dropout

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(
        self, queries: Tensor, keys: Tensor | FactoredTokens, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """queries ``B×Nt×C``, keys ``B×(h·w)×C`` (or factored, first layer) -> updated (queries, keys)."""
        if self.skip_first_layer_pe:
            # Official quirk: the first layer replaces (not adds to) the queries.
            queries = self._drop(self.self_attn(q=queries, k=queries, v=queries))
        else:
            q = queries + query_pe
            queries = queries + self._drop(self.self_attn(q=q, k=q, v=queries))
        queries = self.norm1(queries)

        # With few prompt tokens the image side is multiplied through the weights
        # (few_tokens.py); otherwise the image-side projections of both cross-attentions
        # (keys and values of token→image, queries of image→token) are taken up front.
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        num_tokens = queries.shape[1]
        factored = isinstance(keys, FactoredTokens)
        t2i_through = not factored and multiplies_through(t2i, num_tokens, queries)
        i2t_through = multiplies_through(i2t, num_tokens, queries)
        image_q = None
        if factored:
            k, v, image_q = keys.project(t2i.k_proj, key_pe), keys.project(t2i.v_proj), keys.project(i2t.q_proj, key_pe)
            keys = keys.tokens()
        else:
            keys_pe = keys + key_pe  # once for both attentions
            if not t2i_through:
                k, v = t2i.k_proj(keys_pe), t2i.v_proj(keys)
            if not i2t_through:
                image_q = i2t.q_proj(keys_pe)

        q = t2i.q_proj(queries + query_pe)
        attn = tokens_to_image(t2i, q, keys_pe, keys) if t2i_through else t2i.attend(q, k, v)
        queries = self.norm2(queries + self._drop(attn))
        queries = self.norm3(queries + self._drop(self.mlp(queries)))

        token_k, token_v = i2t.k_proj(queries + query_pe), i2t.v_proj(queries)
        if not i2t_through:
            attn = i2t.attend(image_q, token_k, token_v)
        elif image_q is not None:  # factored queries: only out_proj goes through the weights
            attn = image_to_tokens(i2t, token_k, token_v, q=image_q)
        else:
            attn = image_to_tokens(i2t, token_k, token_v, query_src=keys_pe)
        keys = self.norm4(keys + self._drop(attn))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder transformer: tokens and image embedding attend to each other ``depth`` times."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim, activation=activation,
                attention_downsample_rate=attention_downsample_rate, skip_first_layer_pe=(i == 0),
                dropout=dropout,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)
        self.dropout = dropout

    def forward(
        self, image_embedding: Tensor | FactoredTokens, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``B×C×h×w`` image (or :class:`FactoredTokens`), ``B×C×h×w`` or ``1×C×h×w``
        (broadcast) PE, ``B×Nt×C`` tokens -> (``B×Nt×C``, ``B×(h·w)×C``)."""
        # Token-major and contiguous once: every op of the first layer would otherwise run
        # on (and copy out of) the permuted view (~25% of that layer's time on CPU).
        keys = image_embedding
        if not isinstance(keys, FactoredTokens):
            keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        if isinstance(keys, FactoredTokens):  # depth 0
            keys = keys.tokens()
        final = self.final_attn_token_to_image
        if multiplies_through(final, queries.shape[1], queries):
            attn_out = tokens_to_image(final, final.q_proj(queries + point_embedding), keys + key_pe, keys)
        else:
            attn_out = final(q=queries + point_embedding, k=keys + key_pe, v=keys)
        if self.dropout:
            attn_out = F.dropout(attn_out, self.dropout, self.training)
        return self.norm_final_attn(queries + attn_out), keys
