"""The polyphase adjoint of bilinear upsampling equals autograd through ``F.interpolate``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.upsample import phase_matrix, upsample, upsample_adjoint


def autograd_adjoint(grad: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    x = low.detach().requires_grad_(True)
    out = F.interpolate(x, size=grad.shape[-2:], mode="bilinear", align_corners=False)
    return torch.autograd.grad(out, x, grad)[0]


@pytest.mark.parametrize("in_hw,out_hw", [
    ((64, 64), (256, 256)),  # the loss: ×4, as every SAM variant
    ((8, 8), (32, 32)),
    ((5, 7), (15, 21)),  # ×3, non-square
    ((3, 10), (6, 40)),  # different scales per axis
    ((1, 4), (4, 16)),  # one input row: both edges fold into it
    ((9, 6), (20, 13)),  # not an integer scale: routed to the native op
])
def test_adjoint_matches_autograd_fp64(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(3, 2, *in_hw, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 2, *out_hw, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(upsample_adjoint(grad, in_hw), autograd_adjoint(grad, low), rtol=1e-12, atol=1e-12)


def test_adjoint_is_the_transpose_of_upsample() -> None:
    """<up(x), g> == <x, up*(g)> for random x, g (the defining property)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 1, 64, 64, generator=gen, dtype=torch.float64)
    lhs = (upsample(x, (64, 64)) * g).sum()
    rhs = (x * upsample_adjoint(g, (16, 16))).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_fp32_adjoint_within_rounding_of_fp64() -> None:
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(4, 1, 256, 256, generator=gen, dtype=torch.float64)
    truth = autograd_adjoint(grad, torch.zeros(4, 1, 64, 64, dtype=torch.float64))  # torch's own, fp64
    torch.testing.assert_close(upsample_adjoint(grad.float(), (64, 64)).double(), truth, rtol=1e-5, atol=1e-5)


def test_phase_weights_sum_to_one() -> None:
    """Each output phase spreads weight 1 over its two inputs (a constant stays constant)."""
    for scale in (2, 3, 4, 5):
        weights = phase_matrix(scale, torch.float64, torch.device("cpu"))
        torch.testing.assert_close(weights.sum(1), torch.ones(scale, dtype=torch.float64))


def test_upsample_is_identity_at_equal_size() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert upsample(x, (8, 8)) is x
    assert upsample_adjoint(x, (8, 8)) is x


@pytest.mark.parametrize("scale", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_polyphase_forward_matches_interpolate(scale: int, dtype: torch.dtype) -> None:
    """The CPU polyphase upsampling equals ``F.interpolate`` to rounding, edges included.

    Against the fp64 interpolation for both dtypes (for scales 3 and 5 PyTorch's own fp32
    source weights carry rounding, e.g. 1/3, ours are exact); at scale 4, SAM's, also
    against fp32 ``F.interpolate`` itself, with the clamped left edge bit-exact.
    """
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(3, 2, 7, 9, generator=gen, dtype=torch.float64) * 4
    x = x64.to(dtype)
    truth = F.interpolate(x.double(), scale_factor=scale, mode="bilinear", align_corners=False)
    out = upsample(x, (7 * scale, 9 * scale))
    assert out.is_contiguous() and out.dtype == dtype
    tol = 1e-13 if dtype == torch.float64 else 4e-6
    torch.testing.assert_close(out.double(), truth, rtol=tol, atol=tol)
    if scale == 4:
        ref = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        assert torch.equal(out[..., :2, :2], ref[..., :2, :2])
