"""The decoder's first-layer image tokens kept factored: per image + low-rank per mask.

In every round the decoder's image tokens are ``src = image[index] + dense`` for each of
the N masks (up to 64 × 11 rounds per step), and its first two-way layer projects ``src``
three times: ``k_proj(src + pe)`` and ``v_proj(src)`` for the token→image attention,
``q_proj(src + pe)`` for the image→token attention. ``dense`` is the prompt encoder's mask
branch, whose last op is a 1×1 convolution from r = ``mask_in_chans`` (16) channels to
C = 256 (``dense = W_c·g + b_c``), or the constant ``no_mask_embed`` when a round has no
mask input. Every projection ``P`` is linear, so

    P(src + pe) = P(image + pe)[index] + g·(W_P·W_c)ᵀ + W_P·b_c

(for the constant: ``+ W_P·e``): the C-wide product runs once per *image*, and per mask
only an r-wide one (16 instead of 256 input channels). That is the same function
reassociated (equal to fp32 rounding, ``tests/unit/test_step_equivalence.py``), not an
approximation; it removes about a fifth of the decoder's multiply-adds per mask and round
(``benchmarks/bench_kernels.py``, "decoder round").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LowRankDense:
    """A dense prompt embedding ``N×C×h×w`` kept as ``weight·features + bias``.

    Attributes:
        features: ``N×r×h×w`` mask features before the mask branch's last 1×1 conv, or
            None when the round has no mask input (the embedding is ``bias`` everywhere).
        weight: ``C×r`` the 1×1 conv's weight (None without features).
        bias: ``C`` the conv's bias, or the ``no_mask_embed`` vector.
        num_prompts: N.
        size: ``(h, w)`` embedding grid.
    """

    features: Tensor | None
    weight: Tensor | None
    bias: Tensor
    num_prompts: int
    size: tuple[int, int]

    def to_dense(self) -> Tensor:
        """The plain ``N×C×h×w`` embedding the official prompt encoder returns."""
        if self.features is None:
            return self.bias.reshape(1, -1, 1, 1).expand(self.num_prompts, -1, *self.size)
        return F.conv2d(self.features, self.weight[:, :, None, None], self.bias)


class FactoredTokens:
    """Token-major ``src = image[index] + dense`` for the first two-way layer, unexpanded.

    Args:
        image: ``B×(h·w)×C`` token-major image embeddings (B = 1: shared by all masks).
        index: N int64, the image of each mask, or None when B = 1.
        dense: the masks' :class:`LowRankDense`.
    """

    def __init__(self, image: Tensor, index: Tensor | None, dense: LowRankDense) -> None:
        self.image = image
        self.index = index
        self.dense = dense
        # N×(h·w)×r, token-major once (r = 16 channels: a small copy).
        self.features = None if dense.features is None else dense.features.flatten(2).transpose(1, 2).contiguous()

    @property
    def num_prompts(self) -> int:
        return self.dense.num_prompts

    def _per_mask(self, per_image: Tensor, weight: Tensor | None, bias: Tensor) -> Tensor:
        """``per_image[index] + features·weightᵀ + bias`` -> ``N×(h·w)×D``."""
        if self.index is not None:
            per_image = per_image.index_select(0, self.index)
        if self.features is None:
            out = per_image + bias
        else:
            out = F.linear(self.features, weight, bias) + per_image  # broadcasts one image over N
        if out.shape[0] != self.num_prompts:  # one image, no mask: the same tokens for every mask
            out = out.expand(self.num_prompts, -1, -1).contiguous()
        return out

    def tokens(self) -> Tensor:
        """``src`` itself, ``N×(h·w)×C`` (the first layer's residual)."""
        return self._per_mask(self.image, self.dense.weight, self.dense.bias)

    def project(self, linear: nn.Linear, pe: Tensor | None = None) -> Tensor:
        """``linear(src + pe)`` (``pe``: ``1×(h·w)×C``, or None for ``linear(src)``) -> ``N×(h·w)×D``."""
        per_image = linear(self.image if pe is None else self.image + pe)
        weight = None if self.dense.weight is None else linear.weight @ self.dense.weight.to(linear.weight.dtype)
        return self._per_mask(per_image, weight, linear.weight @ self.dense.bias.to(linear.weight.dtype))
