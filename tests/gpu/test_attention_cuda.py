"""CUDA checks of the encoder attention (opt-in: ``pytest -m gpu tests/gpu``).

On a GPU the rel-pos bias goes to a fused SDPA kernel (memory-efficient: flash takes no
float mask). These tests force that kernel and check outputs and gradients, the bias
gradient included, against the explicit formulation, for 14×14 windows (196 tokens, not
a multiple of 8) and a 64×64 global grid at ViT-H head dim 80.
"""

from __future__ import annotations

import pytest
import torch

from trainer.model.attention import decomposed_rel_pos_bias, reference_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("grid,heads,head_dim", [(14, 16, 80), (64, 4, 80), (14, 12, 64)])
def test_efficient_kernel_matches_reference_with_bias_grad(grid: int, heads: int, head_dim: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    n = grid * grid
    q, k, v = (torch.randn(2 * heads, n, head_dim, device="cuda", requires_grad=True) for _ in range(3))
    rel_h = (torch.randn(2 * grid - 1, head_dim, device="cuda") * 0.1).requires_grad_(True)
    rel_w = (torch.randn(2 * grid - 1, head_dim, device="cuda") * 0.1).requires_grad_(True)
    scale = head_dim**-0.5
    results = []
    for fused in (True, False):
        for t in (q, k, v, rel_h, rel_w):
            t.grad = None
        bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (grid, grid))
        if fused:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                shape = (2, heads, n, head_dim)
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.view(shape), k.view(shape), v.view(shape), attn_mask=bias.view(2, heads, n, n)
                ).reshape(2 * heads, n, head_dim)
        else:
            out = reference_attention(q, k, v, bias, scale)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v, rel_h, rel_w)])
    names = ["out", "q", "k", "v", "rel_pos_h", "rel_pos_w"]
    for name, fused, ref in zip(names, *results):
        tol = 2e-3 * max(1.0, ref.abs().max().item())
        assert (fused - ref).abs().max().item() <= tol, name
