"""Bilinear upsampling of mask logits and its adjoint (the backward), fast on CPU.

The loss compares low-res logits (N×K×h×w, 4× below the input frame) with the GT at
the input resolution after SAM's bilinear upsampling (``align_corners=False``, as the
official ``postprocess_masks``). The forward is ``F.interpolate``. Its adjoint, the
gradient w.r.t. the low-res logits, is what ``aten::upsample_bilinear2d_backward``
computes with a scatter loop that was the largest single op of our CPU step
(``benchmarks/bench_train.py`` profile). For an integer scale ``s`` the map is
separable and polyphase: along one axis, output ``m·s + r`` reads inputs ``m + d``
(d ∈ {−1, 0, 1}) with weights fixed per phase ``r``, and PyTorch's clamping of the
source index at 0 (and of the upper neighbour at ``n − 1``) is exactly a replicate
padding by one input on each side. So along the width the adjoint is one ``(…·n, s) @
(s, 3)`` matmul and two shifted adds, along the height per-phase weighted sums of whole
rows, the padding folded back into the edge inputs:
2.7× faster than the native CPU kernel for 64 masks at 64→256 (same values to fp64
rounding, ``tests/unit/test_upsample.py``). Other scales, and CUDA (whose native kernel
is a plain parallel loop), use the native op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def upsample(logits: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """N×K×h×w -> N×K×H×W bilinear (``align_corners=False``); identity at equal size.

    On CPU with integer scales, the polyphase form (each output phase one weighted sum of
    two shifted inputs, per axis): the native kernel is 1.3-2.3× slower on the loss's
    per-chunk shapes (``benchmarks/bench_kernels.py``). Same values to rounding in fp32 and
    fp64 (half types round twice per axis: the loss and the click sampler upsample fp32).
    """
    h, w = logits.shape[-2:]
    big_h, big_w = (int(v) for v in out_hw)
    if (h, w) == (big_h, big_w):
        return logits
    if logits.is_cuda or big_h % h or big_w % w or logits.dim() != 4:
        return F.interpolate(logits, size=(big_h, big_w), mode="bilinear", align_corners=False)
    return _upsample_rows(_upsample_last_dim(logits, big_w // w), big_h // h)  # via N×K×h×W


def _upsample_rows(x: torch.Tensor, scale: int) -> torch.Tensor:
    """×``scale`` bilinear along dim −2: (…, n, W) -> (…, n·scale, W), whole rows at a time
    (no transpose copy of the full-resolution result)."""
    n, width = x.shape[-2:]
    padded = torch.cat([x[..., :1, :], x, x[..., -1:, :]], dim=-2)
    out = x.new_empty(*x.shape[:-2], n, scale, width)
    for r, row in enumerate(_phase_rows(scale)):
        lo = 0 if row[0] else 1
        torch.add(padded[..., lo:lo + n, :] * row[lo], padded[..., lo + 1:lo + 1 + n, :], alpha=row[lo + 1],
                  out=out[..., r, :])
    out = out.view(*x.shape[:-2], n * scale, width)
    out[..., :_left_edge(scale), :] = x[..., :1, :]
    return out


def _left_edge(scale: int) -> int:
    """Outputs left of the first input's centre, ``(x + 0.5)/scale − 0.5 < 0``: PyTorch clamps
    their source to input 0 (weight exactly 1); the padded form gives a·x0 + b·x0, equal
    only to rounding, so they are copied from input 0."""
    return (scale - 1) // 2 + (scale - 1) % 2


def _upsample_last_dim(x: torch.Tensor, scale: int) -> torch.Tensor:
    """×``scale`` bilinear along the last dim: (…, n) -> (…, n·scale)."""
    n = x.shape[-1]
    padded = torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)  # replicate: PyTorch's index clamp
    out = x.new_empty(*x.shape, scale)
    for r, row in enumerate(_phase_rows(scale)):
        lo = 0 if row[0] else 1  # the phase reads inputs m − 1, m or m, m + 1
        torch.add(padded[..., lo:lo + n] * row[lo], padded[..., lo + 1:lo + 1 + n], alpha=row[lo + 1],
                  out=out[..., r])
    out = out.view(*x.shape[:-1], n * scale)
    out[..., :_left_edge(scale)] = x[..., :1]
    return out


def upsample_adjoint(grad: torch.Tensor, in_hw: Sequence[int]) -> torch.Tensor:
    """The gradient of :func:`upsample` w.r.t. its input: N×K×H×W -> N×K×h×w.

    Args:
        grad: gradient w.r.t. the upsampled N×K×H×W logits.
        in_hw: ``(h, w)``, the low-res size.
    """
    h, w = (int(v) for v in in_hw)
    big_h, big_w = grad.shape[-2:]
    if (big_h, big_w) == (h, w):
        return grad
    if grad.is_cuda or big_h % h or big_w % w:
        return torch.ops.aten.upsample_bilinear2d_backward(
            grad.contiguous(), [big_h, big_w], list(grad.shape[:-2]) + [h, w], False, None, None)
    along_w = _adjoint_last_dim(grad.contiguous(), w, big_w // w)  # N×K×H×w
    return _adjoint_rows(along_w, h, big_h // h)


def _adjoint_rows(grad: torch.Tensor, n_in: int, scale: int) -> torch.Tensor:
    """Adjoint of :func:`_upsample_rows`: (…, n_in·scale, W) -> (…, n_in, W), whole rows."""
    blocks = grad.view(*grad.shape[:-2], n_in, scale, grad.shape[-1])
    taps = [None, None, None]  # contributions to rows m − 1, m, m + 1
    for r, row in enumerate(_phase_rows(scale)):
        for d, weight in enumerate(row):
            if weight:
                term = blocks[..., r, :] * weight
                taps[d] = term if taps[d] is None else taps[d].add_(term)
    out = taps[1]
    if taps[0] is not None:
        out[..., :-1, :] += taps[0][..., 1:, :]
        out[..., 0, :] += taps[0][..., 0, :]  # the replicate padding folds into row 0
    if taps[2] is not None:
        out[..., 1:, :] += taps[2][..., :-1, :]
        out[..., -1, :] += taps[2][..., -1, :]
    return out


def phase_matrix(scale: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``scale×3`` weights: row r (output ``m·scale + r``) onto inputs ``m − 1, m, m + 1``.

    PyTorch's source coordinate for output ``x`` is ``(x + 0.5) / scale − 0.5`` (before
    its clamp at 0, which the caller's replicate padding reproduces).
    """
    weights = torch.zeros(scale, 3, dtype=torch.float64)
    for r in range(scale):
        src = (r + 0.5) / scale - 0.5
        low = math.floor(src)
        frac = src - low
        weights[r, low + 1] += 1.0 - frac
        weights[r, low + 2] += frac
    return weights.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=8)
def _phase_rows(scale: int) -> tuple[tuple[float, float, float], ...]:
    """:func:`phase_matrix` as Python floats (the forward's per-phase scalar weights)."""
    return tuple(tuple(row) for row in phase_matrix(scale, torch.float64, torch.device("cpu")).tolist())


def _adjoint_last_dim(grad: torch.Tensor, n_in: int, scale: int) -> torch.Tensor:
    """Adjoint of ×``scale`` bilinear upsampling along the last dim: (…, n_in·scale) -> (…, n_in)."""
    with torch.autocast(grad.device.type, enabled=False):  # a backward under autocast: stay exact
        taps = grad.reshape(-1, scale) @ phase_matrix(scale, grad.dtype, grad.device)
    taps = taps.view(*grad.shape[:-1], n_in, 3)  # contributions to m − 1, m, m + 1
    out = taps[..., 1].clone()
    out[..., :-1] += taps[..., 1:, 0]
    out[..., 1:] += taps[..., :-1, 2]
    # The replicate padding: what output block 0 sends to input −1 belongs to input 0,
    # what the last block sends past the end belongs to the last input.
    out[..., 0] += taps[..., 0, 0]
    out[..., -1] += taps[..., -1, 2]
    return out
