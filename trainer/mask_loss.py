"""The fused per-pixel mask loss: focal, dice and the IoU target in one pass, and the
min-over-outputs supervision with the upsampling inside (``trainer.loss`` uses it).

Same formulas as ``trainer.loss.focal_loss`` / ``dice_loss`` / ``mask_iou`` (checked
against them in ``tests/unit/test_step_equivalence.py``), rewritten for speed:

- per-pixel constants (α weight, region, target) are combined once per step
  (:class:`LossTargets`) instead of once per round;
- with ``v = x·(1 − 2t)`` (the logit signed against the target), ``1 − p_t = σ(v)`` and
  the cross-entropy is ``softplus(v)``, so the focal term needs one sigmoid and one
  softplus; the dice sums reuse the same ``σ(v)`` (``p = t + (1 − 2t)·σ(v)``);
- rows are processed in chunks of about 1 MiB of logits on CPU (each pass over a cache-sized
  chunk instead of over 64 masks × 65,536 pixels in memory: 1.9× on the loss benchmark);
- nothing per-pixel is saved for backward: the backward recomputes from the logits;
- :class:`_SupervisedMaskLoss` takes the low-res logits, upsamples inside, picks the
  supervised output (lowest ``w_f·focal + w_d·dice``, SAM_RECIPE.md §1 "Losses") in the
  forward, and in the backward recomputes the upsampling and the pixel gradient for
  that one output only (the other two outputs of a multimask row get exactly zero
  gradient, as through the reference's gather), then applies the upsampling's adjoint
  (``trainer.upsample``). Neither the N×K×H×W upsampled logits nor their gradient for
  the unsupervised outputs is ever kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from trainer.upsample import upsample, upsample_adjoint

#: Elements per chunk of the per-pixel passes: 1 MiB of fp32 logits per chunk on CPU (with
#: the chunk's per-pixel constants and temporaries a few MiB, cache-sized; measured best
#: of 2^15..2^30 on the loss benchmark), and large on CUDA, where chunking only bounds the
#: temporaries' memory.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 25}


@dataclass
class LossTargets:
    """Per-pixel constants of the fused loss, built once per step and shared by all rounds.

    Per-pixel fields are N×HW (flattened pixels) in the logits' dtype: the α weight, the
    region and the target are combined once per step instead of once per round.

    Attributes:
        flip: ``1 − 2·target``: ``v = x·flip`` is the logit signed against the target.
        focal_weight: α-balancing weight times the region (0 outside the image).
        target_in: target inside the region.
        flip_in: ``flip`` times the region.
        flip_focal: ``flip`` times ``focal_weight`` (the backward's focal factor).
        region: 1 inside the region, 0 outside (the backward's dice factor).
        inside: N×HW bool, the region (None when the region is the whole frame).
        target_in_bool: N×HW bool, ``target_in > 0``.
        target_sum: N×1, target pixels inside the region.
        count: N×1, region pixels clamped to >= 1 (the mean's divisor).
    """

    flip: torch.Tensor
    focal_weight: torch.Tensor
    target_in: torch.Tensor
    flip_in: torch.Tensor
    flip_focal: torch.Tensor
    region: torch.Tensor
    inside: torch.Tensor | None
    target_in_bool: torch.Tensor
    target_sum: torch.Tensor
    count: torch.Tensor

    def rows(self, sl: slice) -> LossTargets:
        """The same constants for rows ``sl`` (views, no copy)."""
        return LossTargets(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[sl]
                              for f in dataclasses.fields(self)})


def loss_targets(
    targets: torch.Tensor, region: torch.Tensor | None, alpha: float, dtype: torch.dtype
) -> LossTargets:
    """Build ``LossTargets`` from N×H×W targets and an optional N×H×W bool region.

    The identities of the fused pass hold for t ∈ {0, 1}: targets are binarised at 0.5
    (GT masks are binary; the reference's IoU target uses the same threshold). Built in
    fp32 at least, so pixel counts cannot overflow a half-precision type.
    """
    n = targets.shape[0]
    dtype = torch.promote_types(dtype, torch.float32)
    t = (targets.reshape(n, -1) > 0.5).to(dtype)
    inside = None if region is None else region.reshape(n, -1).to(torch.bool)
    r = torch.ones_like(t) if inside is None else inside.to(dtype)
    a_t = torch.ones_like(t) if alpha < 0 else (1 - alpha) + (2 * alpha - 1) * t
    t_in = t * r
    flip = 1 - 2 * t
    return LossTargets(
        flip=flip, focal_weight=a_t * r, target_in=t_in, flip_in=flip * r, flip_focal=flip * a_t * r,
        region=r, inside=inside,
        target_in_bool=t_in > 0, target_sum=t_in.sum(-1, keepdim=True),
        count=r.sum(-1, keepdim=True).clamp(min=1.0),
    )


def _chunks(n: int, per_row: int, device: torch.device) -> Iterator[slice]:
    """Row slices of at most ``CHUNK_ELEMENTS`` elements (at least one row each)."""
    step = max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(per_row, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def needs_guard(logits: torch.Tensor, t: LossTargets) -> bool:
    """Whether the logits outside the region must be zeroed before the pixel math.

    With finite logits the region-zeroed weights already cancel every padding pixel
    exactly (finite·0 = 0), so the guard only matters for a non-finite value in the
    padding (0·inf = nan). On CPU one finiteness check of the (low-res) logits is far
    cheaper than a ``where`` over every full-resolution chunk; on CUDA the check would be
    a host sync per round, so the guard is always applied there.
    """
    if t.inside is None:
        return False
    return logits.is_cuda or not bool(torch.isfinite(logits).all())


def _guarded(x: torch.Tensor, t: LossTargets, guard: bool) -> torch.Tensor:
    """``x`` (n×K×P) with the logits outside the region set to 0 when ``guard``."""
    return torch.where(t.inside.unsqueeze(1), x, 0.0) if guard else x


def _pow(q: torch.Tensor, gamma: float) -> torch.Tensor:
    return q * q if gamma == 2 else q.pow(gamma)


def _forward_sums(x: torch.Tensor, t: LossTargets, gamma: float, guard: bool) -> torch.Tensor:
    """Per-row sums of one chunk: n×K×5 (focal sum, Σσ(v)·t_in, Σσ(v)·flip_in, IoU ∩, pred)."""
    x = _guarded(x, t, guard)
    v = x * t.flip.unsqueeze(1)
    q = torch.sigmoid(v)  # 1 − p_t
    focal_px = F.softplus(v).mul_(_pow(q, gamma)) if gamma != 0 else F.softplus(v)
    pred = x > 0
    # Counts in int32 (exact; a bool sum would first widen every pixel to int64).
    if t.inside is not None:
        pred_in = (pred & t.inside.unsqueeze(1)).sum(-1, dtype=torch.int32)
    else:
        pred_in = pred.sum(-1, dtype=torch.int32)
    # torch's cascade summation throughout (a matmul's running fp32 sum over 1M pixels is
    # measurably less accurate, and a matmul would count as model FLOPs in flop counters).
    return torch.stack([
        focal_px.mul_(t.focal_weight.unsqueeze(1)).sum(-1),
        (q * t.target_in.unsqueeze(1)).sum(-1),
        q.mul_(t.flip_in.unsqueeze(1)).sum(-1),
        (pred & t.target_in_bool.unsqueeze(1)).sum(-1, dtype=torch.int32).to(x.dtype),
        pred_in.to(x.dtype),
    ], dim=-1)


def _terms(sums: torch.Tensor, t: LossTargets) -> tuple[torch.Tensor, ...]:
    """(focal, dice, IoU, dice ∩, dice denominator), each N×K, from the N×K×5 sums."""
    focal = sums[..., 0] / t.count
    inter = t.target_sum - sums[..., 1]  # Σ p·t_in, with p = t + flip·σ(v)
    denom = t.target_sum + sums[..., 2] + t.target_sum + 1  # Σ p·r + Σ t_in + 1
    dice = 1 - (2 * inter + 1) / denom
    union = sums[..., 4] + t.target_sum - sums[..., 3]
    iou = sums[..., 3] / union.clamp(min=1.0)
    return focal, dice, iou, inter, denom


def _pixel_sums(logits: torch.Tensor, t: LossTargets, gamma: float, guard: bool,
                out_hw: Sequence[int] | None = None) -> torch.Tensor:
    """N×K×5 sums of N×K×h×w logits, chunked over rows.

    With ``out_hw`` each chunk is upsampled to it first (so the N×K×H×W upsampled
    logits are never materialised, only one cache-sized chunk at a time).
    """
    n, k = logits.shape[:2]
    per_row = k * (math.prod(out_hw) if out_hw is not None else logits[0, 0].numel())
    sums = []
    for sl in _chunks(n, per_row, logits.device):
        x = logits[sl] if out_hw is None else upsample(logits[sl], out_hw)
        sums.append(_forward_sums(x.reshape(x.shape[0], k, -1), t.rows(sl), gamma, guard))
    return torch.cat(sums)


def _pixel_grad(x: torch.Tensor, t: LossTargets, gamma: float, guard: bool, scale_focal: torch.Tensor,
                c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """d(Σ focal·g_f + dice·g_d)/dx of one chunk (n×K×P logits; n×K×1 row factors).

    With v = flip·x and q = σ(v): d[softplus(v)·q^γ]/dx = flip·q^γ·(q + γ·softplus(v)·(1−q));
    dice = 1 − (2I+1)/D has d/dp = r·c1 − t_in·c2 and dp/dx = q·(1−q) for t ∈ {0, 1}.
    """
    x = _guarded(x, t, guard)
    v = x * t.flip.unsqueeze(1)
    q = torch.sigmoid(v)
    one_minus_q = 1 - q
    if gamma != 0:
        grad = F.softplus(v).mul_(one_minus_q).mul_(gamma).add_(q).mul_(_pow(q, gamma))
    else:
        grad = q.clone()
    grad.mul_(t.flip_focal.unsqueeze(1)).mul_(scale_focal)
    if t.inside is None:
        d_dice = torch.addcmul(c1, t.target_in.unsqueeze(1), c2, value=-1)  # c1 − c2·t
    else:  # r·c1 − c2·t_in: the region factor (0 in the padding)
        d_dice = torch.addcmul(c1 * t.region.unsqueeze(1), t.target_in.unsqueeze(1), c2, value=-1)
    return grad.add_(d_dice.mul_(one_minus_q.mul_(q)))


def _grad_logits(logits: torch.Tensor, t: LossTargets, gamma: float, guard: bool, grad_focal: torch.Tensor,
                 grad_dice: torch.Tensor, inter: torch.Tensor, denom: torch.Tensor,
                 out_hw: Sequence[int] | None = None) -> torch.Tensor:
    """The gradient w.r.t. N×K×h×w logits, chunked over rows.

    With ``out_hw``, the logits are upsampled to it per chunk and the chunk's pixel
    gradient is brought back to h×w by the upsampling's adjoint.
    """
    n, k, h, w = logits.shape
    scale_focal = (grad_focal / t.count).unsqueeze(2)
    c1 = (grad_dice * (2 * inter + 1) / denom**2).unsqueeze(2)
    c2 = (grad_dice * 2 / denom).unsqueeze(2)
    per_row = k * (math.prod(out_hw) if out_hw is not None else h * w)
    parts = []
    for sl in _chunks(n, per_row, logits.device):
        x = logits[sl] if out_hw is None else upsample(logits[sl], out_hw)
        rows = x.shape[0]
        grad = _pixel_grad(x.reshape(rows, k, -1), t.rows(sl), gamma, guard, scale_focal[sl], c1[sl], c2[sl])
        grad = grad.view(x.shape)
        parts.append(grad if out_hw is None else upsample_adjoint(grad, (h, w)))
    return torch.cat(parts)


class _MaskTerms(torch.autograd.Function):
    """Focal, dice and IoU target (each N×K) of N×K×H×W logits at the loss resolution."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, t: LossTargets, gamma: float):  # type: ignore[override]
        guard = needs_guard(logits, t)
        focal, dice, iou, inter, denom = _terms(_pixel_sums(logits, t, gamma, guard), t)
        ctx.save_for_backward(logits, inter, denom)
        ctx.targets, ctx.gamma, ctx.guard = t, gamma, guard
        ctx.mark_non_differentiable(iou)
        return focal, dice, iou

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_focal: torch.Tensor, grad_dice: torch.Tensor, _grad_iou: torch.Tensor):  # type: ignore[override]
        logits, inter, denom = ctx.saved_tensors
        grad = _grad_logits(logits, ctx.targets, ctx.gamma, ctx.guard, grad_focal, grad_dice, inter, denom)
        return grad, None, None


def fused_mask_losses(
    logits: torch.Tensor, targets: LossTargets, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(focal, dice, IoU target), each N×K, of N×K×H×W logits; see ``_MaskTerms``."""
    return _MaskTerms.apply(logits, targets, gamma)


class _SupervisedMaskLoss(torch.autograd.Function):
    """Min-over-outputs mask loss of N×K×h×w low-res logits, upsampled inside.

    Returns focal, dice and the IoU target of the supervised output (each N) and its
    index ``best`` (N int64).
    """

    @staticmethod
    def forward(ctx, low_res: torch.Tensor, t: LossTargets, out_hw: tuple[int, int],  # type: ignore[override]
                gamma: float, weight_focal: float, weight_dice: float):
        low_res = low_res.contiguous()
        guard = needs_guard(low_res, t)  # finite low-res logits upsample to finite logits
        with torch.no_grad():
            focal, dice, iou, inter, denom = _terms(_pixel_sums(low_res, t, gamma, guard, out_hw), t)
            best = (weight_focal * focal + weight_dice * dice).argmin(dim=1, keepdim=True)  # N×1
            picked = [v.gather(1, best).squeeze(1) for v in (focal, dice, iou, inter, denom)]
        ctx.save_for_backward(low_res, best, picked[3], picked[4])
        ctx.targets, ctx.gamma, ctx.out_hw, ctx.guard = t, gamma, out_hw, guard
        best_rows = best.squeeze(1)
        ctx.mark_non_differentiable(picked[2], best_rows)
        return picked[0], picked[1], picked[2], best_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_focal: torch.Tensor, grad_dice: torch.Tensor, *_unused: torch.Tensor):  # type: ignore[override]
        low_res, best, inter, denom = ctx.saved_tensors
        n, k, h, w = low_res.shape
        index = best.view(n, 1, 1, 1).expand(n, 1, h, w)
        chosen = low_res.gather(1, index)  # N×1×h×w
        grad_low = _grad_logits(chosen, ctx.targets, ctx.gamma, ctx.guard, grad_focal.unsqueeze(1),
                                grad_dice.unsqueeze(1), inter.unsqueeze(1), denom.unsqueeze(1), ctx.out_hw)
        if k == 1:
            return grad_low, None, None, None, None, None
        return torch.zeros_like(low_res).scatter_(1, index, grad_low), None, None, None, None, None


def supervised_mask_loss(
    low_res: torch.Tensor, targets: LossTargets, out_hw: Sequence[int], gamma: float,
    weight_focal: float, weight_dice: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(focal, dice, IoU target, best) of the supervised output of each row (each N).

    Args:
        low_res: N×K×h×w logits (upsampled to ``out_hw`` inside).
        targets: the step's ``LossTargets`` at ``out_hw``.
        out_hw: the loss resolution (H, W).
        gamma: focal γ; weight_focal / weight_dice: the weights the argmin uses.
    """
    return _SupervisedMaskLoss.apply(low_res, targets, tuple(int(v) for v in out_hw), gamma,
                                     weight_focal, weight_dice)
