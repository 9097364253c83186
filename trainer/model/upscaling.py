"""The mask decoder's output upscaling and mask product on pixel rows, in block order.

Both upscaling convolutions of SAM's decoder are transposed 2×2 convolutions with stride
2: each maps every input pixel to its own 2×2 block of output pixels, a per-pixel linear
map ``C -> 4·C'`` (one matmul over pixel rows, :func:`pixel_block_linear`). LayerNorm2d,
GELU and the hypernetwork product act per pixel too. So ``MaskDecoder._upscaled_masks``
runs the chain on rows in *block order*: row ``(y, x, i₁, j₁, i₂, j₂)`` holds output pixel
``(4y + 2i₁ + i₂, 4x + 2j₁ + j₂)``, and only the K-channel masks are put into image order,
at the end (:func:`mask_product`), not the 64- and 32-channel upscaled maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

#: An integer dtype as wide as a run of values, so a reorder moves each run as one element.
_RUN_AS_INT = {4: torch.int32, 8: torch.int64}


def pixel_block_linear(pixels: Tensor, conv: nn.ConvTranspose2d) -> Tensor:
    """A 2×2 stride-2 ``ConvTranspose2d`` on pixel rows: ``P×Cin -> (4·P)×Cout``, the
    four output pixels ``(i, j)`` of each input pixel on consecutive rows."""
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)  # Cin×(i, j, Cout)
    return torch.addmm(conv.bias.repeat(4), pixels, weight).view(-1, conv.out_channels)


def _swap(x: Tensor, outer: int, a: int, b: int, run: int) -> Tensor:
    """``x`` (contiguous) as ``outer×a×b×run`` -> ``outer×b×a×run``, contiguous.

    A run of 2-byte or 4-byte values as wide as an int32/int64 moves as one integer
    (bit-exact): a transposing copy of short runs is several times slower per value."""
    as_int = _RUN_AS_INT.get(run * x.element_size())
    flat = x.contiguous().view(-1)
    if as_int is None or flat.storage_offset() % run:  # a dtype view needs an aligned start
        return flat.view(outer, a, b, run).transpose(1, 2).contiguous()
    moved = flat.view(as_int).view(outer, a, b).transpose(1, 2).contiguous()
    return moved.view(x.dtype)


def blocks_to_image(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """``N×K×(16·h·w)`` in block order -> ``N×K×4h×4w`` in image order (two swaps)."""
    (n, k), (h, w) = masks.shape[:2], size
    rows = _swap(masks, n * k * h, w, 2, 8)  # (y, x, i₁, [j₁ i₂ j₂]) -> (y, i₁, x, [j₁ i₂ j₂])
    return _swap(rows, n * k * 2 * h, 2 * w, 2, 2).view(n, k, 4 * h, 4 * w)  # (Y, X, i₂, j₂) -> (Y, i₂, X, j₂)


def image_to_blocks(image: Tensor) -> Tensor:
    """The inverse of :func:`blocks_to_image`: ``N×K×4h×4w`` -> ``N×K×(16·h·w)``."""
    n, k, hh, ww = image.shape
    h, w = hh // 4, ww // 4
    rows = _swap(image, n * k * 2 * h, 2, 2 * w, 2)  # (Y, i₂, X, j₂) -> (Y, X, i₂, j₂)
    return _swap(rows, n * k * h, 2, w, 8).view(n, k, 16 * h * w)  # (y, i₁, x, [...]) -> (y, x, i₁, [...])


class _MaskProduct(torch.autograd.Function):
    """``hyper @ pixelsᵀ`` per mask, put into image order; the backward takes the gradient
    back to block order first, so both products read their operands without a copy."""

    @staticmethod
    def forward(ctx, pixels: Tensor, hyper: Tensor, size: tuple[int, int]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pixels, hyper)
        return blocks_to_image(hyper @ pixels.transpose(1, 2), size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pixels, hyper = ctx.saved_tensors
        blocks = image_to_blocks(grad.to(pixels.dtype))  # N×K×P
        grad_pixels = blocks.transpose(1, 2) @ hyper if ctx.needs_input_grad[0] else None
        grad_hyper = blocks @ pixels if ctx.needs_input_grad[1] else None
        return grad_pixels, grad_hyper, None


def mask_product(pixels: Tensor, hyper: Tensor, size: tuple[int, int]) -> Tensor:
    """The hypernetwork product of the upscaled pixel rows, in image order.

    Args:
        pixels: ``N×(16·h·w)×c`` upscaled features in block order.
        hyper: ``N×K×c`` hypernetwork outputs.
        size: ``(h, w)``, the embedding grid.

    Returns:
        ``N×K×4h×4w`` mask logits.
    """
    device = pixels.device.type  # meta (FLOP counting) has no autocast to ask about
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        pixels = pixels.to(torch.get_autocast_dtype(device))  # the official product runs in the AMP dtype
    return _MaskProduct.apply(pixels, hyper.to(pixels.dtype), size)
