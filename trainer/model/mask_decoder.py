"""Mask decoder, exactly as segment-anything's ``MaskDecoder`` (same keys and outputs).

Extensions (training; the official call gives the official result):

- ``image_embeddings`` may hold one row per prompt (``N×C×h×w``, e.g. gathered with
  ``emb[image_index]``), or the step's B images with ``image_index`` naming each prompt's,
  as well as the official single image (``1×C×h×w``, broadcast to every prompt).
- ``dense_prompt_embeddings`` may be a :class:`~trainer.model.factored.LowRankDense`
  (``PromptEncoder(..., factored=True)``): the first two-way layer then projects each
  image once and each mask through the 16-channel mask features (``factored.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .common import LayerNorm2d
from .factored import FactoredTokens, LowRankDense
from .upscaling import mask_product, pixel_block_linear


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between (official ``MLP``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks and their IoU from prompt tokens."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor | LowRankDense,
        multimask_output: bool,
        image_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks.

        Args:
            image_embeddings: ``1×C×h×w`` (shared), ``N×C×h×w`` (one per prompt) or
                ``B×C×h×w`` with ``image_index``.
            image_pe: ``1×C×h×w`` dense positional encoding.
            sparse_prompt_embeddings: ``N×T×C``; dense_prompt_embeddings: ``N×C×h×w``
                or its :class:`LowRankDense` factors.
            multimask_output: return the 3 multimask outputs (tokens 1–3) instead of token 0.
            image_index: N int64, the row of ``image_embeddings`` of each prompt.

        Returns:
            low-res mask logits ``N×K×4h×4w`` and predicted IoU ``N×K`` (K = 3 or 1).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_index
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor | LowRankDense, image_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """All ``num_mask_tokens`` masks ``N×4×4h×4w`` and IoUs ``N×4`` (arguments as :meth:`forward`)."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype).unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        if image_index is not None and image_index.shape != (n,):
            raise ValueError(f"image_index has shape {tuple(image_index.shape)}; expected ({n},), one per prompt")
        if image_index is None and image_embeddings.shape[0] not in (1, n):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]}; expected 1 (shared) "
                f"or {n} (one per prompt), or pass image_index"
            )
        h, w = image_embeddings.shape[2:]
        if isinstance(dense_prompt_embeddings, LowRankDense):
            image = image_embeddings.flatten(2).transpose(1, 2).contiguous()  # B×(h·w)×C, once per image
            src = FactoredTokens(image, image_index, dense_prompt_embeddings)
        else:
            if image_index is not None:
                image_embeddings = image_embeddings.index_select(0, image_index)
            src = image_embeddings.expand(n, -1, -1, -1) + dense_prompt_embeddings

        hs, src = self.transformer(src, image_pe, tokens)  # the 1×C×h×w PE broadcasts over masks
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        return self._upscaled_masks(src, hyper_in, (h, w)), self.iou_prediction_head(iou_token_out)

    def _upscaled_masks(self, src: Tensor, hyper_in: Tensor, size: tuple[int, int]) -> Tensor:
        """``hyper_in @ output_upscaling(src)`` over channels, on pixel rows in block order.

        The same function as the official ``output_upscaling`` then
        ``hyper_in @ upscaled.view(b, c, h*w)`` (fp32 rounding, ``tests/unit/test_model.py``):
        the transposed convolutions as per-pixel matmuls, the token-major ``src`` without a
        transpose, only the K-channel masks reordered (``trainer/model/upscaling.py``).
        ``benchmarks/bench_kernels.py`` ("upscaling + mask product") measures it against the
        convolutions.

        Args:
            src: ``N×(h·w)×C`` the transformer's token-major image output.
            hyper_in: ``N×K×C/8`` the hypernetwork outputs.
            size: ``(h, w)``.

        Returns:
            ``N×K×4h×4w`` mask logits.
        """
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        n, (h, w) = src.shape[0], size
        pixels = pixel_block_linear(src.reshape(-1, src.shape[-1]), conv1)  # (N·h·w·4)×C/4
        # The native LayerNorm over the last dim is LayerNorm2d on these rows; under
        # autocast it returns fp32, cast back so the saved activations keep the AMP dtype.
        normed = F.layer_norm(pixels, (pixels.shape[-1],), norm.weight, norm.bias, norm.eps).to(pixels.dtype)
        pixels = act2(pixel_block_linear(act1(normed), conv2)).view(n, 16 * h * w, -1)  # N×(16·h·w)×C/8
        return mask_product(pixels, hyper_in, (h, w))
