"""Prompt encoder, exactly as segment-anything's ``PromptEncoder`` (same keys and outputs).

Differences from the official code, none of which changes an output for official inputs:

- Point embedding uses ``torch.where`` and a label lookup instead of boolean-mask indexed
  assignment, so it is ``torch.compile``-friendly (SAM_RECIPE.md §2).
- Labels 2 and 3 in the *points* tensor are box top-left / bottom-right corners (they get
  ``point_embeddings[2]`` / ``[3]``, exactly what the official ``_embed_boxes`` adds), so
  boxes and points batch in one tensor during training.
- ``forward`` takes an optional keyword ``pad_points``: the official code appends one
  padding point whenever ``boxes is None``; training passes ``pad_points=False`` with its
  own padding so every row has the same token set the official inference path would give.
- The Gaussian PE matrix is drawn from a fixed-seed generator, so it is identical on
  every rank without relying on the global RNG (it is also a persistent buffer).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .common import LayerNorm2d
from .factored import LowRankDense

#: Point labels understood by :meth:`PromptEncoder.forward`.
LABEL_PAD, LABEL_NEG, LABEL_POS, LABEL_BOX_TL, LABEL_BOX_BR = -1, 0, 1, 2, 3


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding (official ``PositionEmbeddingRandom``)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats), generator=gen, device="cpu")
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``...×2`` coords in [0,1] -> ``...×C`` [sin, cos] features."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense PE for an ``h×w`` grid of pixel centres: ``C×h×w``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``B×N×2`` (x, y) pixel coords in an ``image_size`` (h, w) frame -> ``B×N×C``."""
        scale = coords_input.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._pe_encoding((coords_input * scale).to(torch.float))


class PromptEncoder(nn.Module):
    """Encodes points, boxes and masks for the mask decoder.

    Coordinates are ``(x, y)`` pixels in the resized, padded ``input_image_size`` frame
    (1024×1024 for the full models); boxes are XYXY in the same frame.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        pe_seed: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, seed=pe_seed)
        self.num_point_embeddings: int = 4  # neg, pos, box TL, box BR
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: ``1×C×h×w``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _label_table(self) -> torch.Tensor:
        """``5×C`` embeddings indexed by ``label + 1`` (pad, neg, pos, box TL, box BR)."""
        return torch.cat(
            [self.not_a_point_embed.weight] + [emb.weight for emb in self.point_embeddings], dim=0
        )

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``B×N×2`` coords + ``B×N`` labels -> ``B×N'×C`` (N' = N+1 when ``pad``)."""
        points = points + 0.5  # shift to the pixel centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), LABEL_PAD)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        # Padding points carry no position, only the not-a-point embedding.
        pe = torch.where((labels == LABEL_PAD).unsqueeze(-1), torch.zeros_like(pe), pe)
        index = (labels.long() + 1).clamp(0, 4)
        return pe + self._label_table().to(pe.dtype)[index]

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``B×4`` XYXY boxes -> ``B×2×C`` corner embeddings."""
        coords = (boxes + 0.5).reshape(-1, 2, 2)
        corner = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner_emb = torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return corner + corner_emb.to(corner.dtype)

    def _get_batch_size(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        *,
        pad_points: bool | None = None,
        factored: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | LowRankDense]:
        """Embed prompts.

        Args:
            points: ``(coords B×N×2 float, labels B×N int)``; labels 1 fg, 0 bg, −1 pad,
                2/3 box corners.
            boxes: ``B×4`` XYXY or None.
            masks: ``B×1×4h×4w`` low-res mask logits or None.
            pad_points: append a padding point; None = official rule (``boxes is None``).
            factored: return the dense embedding as :class:`LowRankDense` factors (the mask
                branch's last 1×1 conv not applied) for the decoder's factored first layer.

        Returns:
            sparse ``B×T×C`` and dense ``B×C×h×w`` embeddings.
        """
        bs = self._get_batch_size(points, boxes, masks)
        sparse = torch.empty((bs, 0, self.embed_dim), device=self._get_device())
        if points is not None:
            coords, labels = points
            pad = (boxes is None) if pad_points is None else pad_points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=pad)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if factored:
            return sparse, self._factored_dense(masks, bs)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse, dense

    def _factored_dense(self, masks: torch.Tensor | None, num_prompts: int) -> LowRankDense:
        """The dense embedding's factors: mask features before the last 1×1 conv, or ``no_mask_embed``."""
        if masks is None:
            return LowRankDense(None, None, self.no_mask_embed.weight[0], num_prompts, self.image_embedding_size)
        *features_layers, last = self.mask_downscaling
        features = masks
        for layer in features_layers:
            features = layer(features)
        return LowRankDense(features, last.weight.flatten(1), last.bias, num_prompts, tuple(features.shape[-2:]))
