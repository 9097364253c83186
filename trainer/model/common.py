"""Small building blocks shared by the SAM modules (official names and shapes)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable


class MLPBlock(nn.Module):
    """Two-layer MLP ``lin1 -> act -> lin2`` (official key names ``mlp.lin1/lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of a ``B×C×H×W`` tensor (eps 1e-6, as official).

    The forward is the official sequence of ops (so the same values); the backward is
    the closed form of :class:`_LayerNorm2dFn` instead of autograd through those nine ops
    (the decoder runs three of these per round for every mask: 1.4-2× faster on CPU,
    ``benchmarks/bench_kernels.py``; backward keeps the normalised input, the per-pixel
    std and the weight instead of every intermediate). First derivatives only.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LayerNorm2dFn.apply(x, self.weight, self.bias, self.eps)


def layer_norm_2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The official ``LayerNorm2d.forward``, op for op (``B×C×H×W``)."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


class _LayerNorm2dFn(torch.autograd.Function):
    """Channel LayerNorm with a closed-form backward.

    With x̂ = (x − μ)/σ over channels and y = w·x̂ + b: dx = (ĝ − mean_c ĝ − x̂·mean_c(ĝ·x̂))/σ
    where ĝ = w·dy; dw = Σ dy·x̂ and db = Σ dy over batch and pixels.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):  # type: ignore[override]
        centred = x - x.mean(1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(1, keepdim=True) + eps)
        normed = centred / std
        ctx.save_for_backward(normed, std, weight)
        return weight[:, None, None] * normed + bias[:, None, None]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        normed, std, weight = ctx.saved_tensors
        grad_weight = (grad * normed).sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad * weight[:, None, None]
            proj = (g * normed).mean(1, keepdim=True)
            grad_x = (g - g.mean(1, keepdim=True)).sub_(normed * proj).div_(std)
        return grad_x, grad_weight, grad_bias, None


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``drop_prob``.

    Not in the official (inference-only) code; the paper trains with drop path 0.4 for
    ViT-H (SAM_RECIPE.md §1). Kept outputs are rescaled by ``1/keep`` so the expectation
    is unchanged; identity in eval mode.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
