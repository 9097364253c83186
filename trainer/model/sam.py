"""The SAM container module (official ``Sam``): encoders, decoder, pre/post-processing."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

#: RGB 0–255 normalisation from the official code (SAM_RECIPE.md §1 "Input").
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """Segment Anything: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    The state_dict is exactly the official one; ``pixel_mean``/``pixel_std`` are
    non-persistent buffers as upstream. Training code calls the three submodules directly
    (see ``trainer.interactive``); :meth:`forward` keeps the official per-image inference API.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, ...] = PIXEL_MEAN,
        pixel_std: tuple[float, ...] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """Official inference API: per image dicts with ``image`` (3×H×W, resized so the
        long side is ``img_size``), ``original_size`` and optional ``point_coords``,
        ``point_labels``, ``boxes``, ``mask_inputs``. Returns ``masks`` (bool, original
        size), ``iou_predictions`` and ``low_res_logits`` per image."""
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, emb in zip(batched_input, embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=emb.unsqueeze(0), image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """``B×K×4h×4w`` logits -> ``B×K×H×W`` logits in the original frame: upsample to the
        padded input, crop the padding, resize to ``original_size``."""
        size = self.image_encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a ``3×H×W`` RGB 0–255 image, then zero-pad bottom/right to square."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))
