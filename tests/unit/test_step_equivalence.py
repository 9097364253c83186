"""The optimised training-step pieces compute the same math as the straightforward code.

Each optimisation keeps its old formula here as a test-only reference and is checked
against it on the same inputs: the same loss values and the same gradients within
fp64 / fp32 rounding (never a change of recipe).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import (
    LossConfig,
    dice_loss,
    focal_loss,
    iou_loss,
    reference_round_loss,
    reference_sam_loss,
    round_loss,
    sam_loss,
)
from trainer.mask_loss import fused_mask_losses, loss_targets
from trainer.prompts import image_region


def random_case(
    n: int, ks: list[int], low: int, size: int, dtype: torch.dtype, seed: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Rounds of random logits (some near 0, some large), blob GT masks, padded sizes."""
    gen = torch.Generator().manual_seed(seed)
    rounds = []
    for k in ks:
        logits = torch.randn(n, k, low, low, generator=gen, dtype=dtype) * 4
        rounds.append((logits.requires_grad_(True), torch.rand(n, k, generator=gen, dtype=dtype)
                       .requires_grad_(True)))
    blobs = torch.rand(n, 1, low // 2, low // 2, generator=gen)
    gt = F.interpolate(blobs, size=(size, size), mode="bilinear", align_corners=False).squeeze(1) > 0.6
    gt[0] = False  # an empty GT mask
    valid_hw = torch.stack([torch.randint(size // 2, size + 1, (n,), generator=gen),
                            torch.randint(size // 2, size + 1, (n,), generator=gen)], dim=1)
    valid_hw[0] = size  # one unpadded image
    return rounds, gt, valid_hw


def grads(out: torch.Tensor, rounds: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Gradients of ``out`` w.r.t. every round's logits and IoU predictions."""
    leaves = [t for pair in rounds for t in pair]
    return list(torch.autograd.grad(out, leaves))


@pytest.mark.parametrize("resolution", ["gt", "low_res"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.6, 0.0), (0.25, 1.0), (0.25, 3.0)])
def test_fused_sam_loss_matches_reference_fp64(resolution: str, padded: bool, alpha: float, gamma: float) -> None:
    """Same loss parts and the same gradients as the separate-term loss, to fp64 rounding."""
    rounds, gt, valid_hw = random_case(5, [3, 1, 3], 8, 32, torch.float64, seed=1)
    valid = torch.tensor([True, True, False, True, True])
    cfg = LossConfig(resolution=resolution, focal_alpha=alpha, focal_gamma=gamma)
    hw = valid_hw if padded else None
    new = sam_loss(rounds, gt, valid, 4, cfg, valid_hw=hw)
    ref = reference_sam_loss(rounds, gt, valid, 4, cfg, valid_hw=hw)
    for key in ("loss_focal", "loss_dice"):
        torch.testing.assert_close(new[key], ref[key], rtol=1e-10, atol=1e-12)
    # The reference's IoU target is counted in fp32 (mask_iou's .float()); ours in the
    # logits' dtype, exact for integer counts: the two agree to fp32 rounding.
    for key in ("loss_iou", "loss"):
        torch.testing.assert_close(new[key], ref[key], rtol=1e-6, atol=1e-9)
    g_new, g_ref = grads(new["loss"], rounds), grads(ref["loss"], rounds)
    for i, (a, b) in enumerate(zip(g_new, g_ref)):
        if i % 2 == 0:  # logits: the IoU term has no gradient there, so fp64-tight
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        else:  # IoU head: 2·(pred - target), the target at fp32 rounding
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_fused_sam_loss_matches_reference_fp32_at_training_sizes() -> None:
    """fp32, 64×64 logits upsampled to 256², padded images: within fp32 rounding of the
    reference, and no further from the fp64 truth than the reference itself is."""
    rounds, gt, valid_hw = random_case(6, [3, 1, 1, 1], 64, 256, torch.float32, seed=2)
    truth_rounds = [(x.detach().double().requires_grad_(True), y.detach().double().requires_grad_(True))
                    for x, y in rounds]
    valid = torch.ones(6, dtype=torch.bool)
    cfg = LossConfig()
    new = sam_loss(rounds, gt, valid, 6, cfg, valid_hw=valid_hw)
    ref = reference_sam_loss(rounds, gt, valid, 6, cfg, valid_hw=valid_hw)
    truth = reference_sam_loss(truth_rounds, gt, valid, 6, cfg, valid_hw=valid_hw)
    for key in ref:
        torch.testing.assert_close(new[key], ref[key], rtol=1e-4, atol=1e-6)
        err_new = (new[key].double() - truth[key]).abs()
        err_ref = (ref[key].double() - truth[key]).abs()
        assert err_new <= 2 * err_ref + 1e-6 * truth[key].abs(), key
    g_truth = grads(truth["loss"], truth_rounds)
    for a, b, c in zip(grads(new["loss"], rounds), grads(ref["loss"], rounds), g_truth):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)
        assert (a.double() - c).norm() <= 2 * (b.double() - c).norm() + 1e-6 * c.norm()


def test_round_loss_matches_reference_and_picks_same_output() -> None:
    """``round_loss`` without precomputed targets: same parts, same supervised index."""
    rounds, gt, valid_hw = random_case(7, [3], 16, 64, torch.float64, seed=3)
    region = image_region(valid_hw, (64, 64))
    valid = torch.ones(7, dtype=torch.bool)
    new = round_loss(*rounds[0], gt, valid, LossConfig(), region)
    ref = reference_round_loss(*rounds[0], gt, valid, LossConfig(), region)
    assert torch.equal(new["best"], ref["best"])
    for key in ("loss_focal", "loss_dice"):
        torch.testing.assert_close(new[key], ref[key], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new["loss_iou"], ref["loss_iou"], rtol=1e-6, atol=1e-9)


def test_fused_terms_match_each_reference_term() -> None:
    """Each fused output (not only their weighted sum) equals its reference function."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 3, 20, 20, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    gt = torch.rand(4, 20, 20, generator=gen) > 0.5
    region = image_region(torch.tensor([[20, 20], [10, 15], [20, 5], [1, 1]]), (20, 20))
    targets = loss_targets(gt, region, 0.25, torch.float64)
    focal, dice, iou = fused_mask_losses(logits, targets, 2.0)
    t = gt.double()
    torch.testing.assert_close(focal, focal_loss(logits, t, 0.25, 2.0, region))
    torch.testing.assert_close(dice, dice_loss(logits, t, region))
    ref_iou = iou_loss(torch.zeros(4, 3, dtype=torch.float64), logits, t, region).sqrt()
    torch.testing.assert_close(iou, ref_iou, rtol=1e-6, atol=1e-9)
    assert not iou.requires_grad  # the IoU target is detached, as mask_iou
    for fused, ref in ((focal, focal_loss(logits, t, 0.25, 2.0, region)), (dice, dice_loss(logits, t, region))):
        w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        g_f, = torch.autograd.grad((fused * w).sum(), logits, retain_graph=True)
        g_r, = torch.autograd.grad((ref * w).sum(), logits)
        torch.testing.assert_close(g_f, g_r)


def test_fused_backward_passes_gradcheck() -> None:
    """The closed-form backward against finite differences (fp64)."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    gt = torch.rand(2, 5, 5, generator=gen) > 0.5
    region = image_region(torch.tensor([[5, 5], [3, 4]]), (5, 5))
    targets = loss_targets(gt, region, 0.25, torch.float64)
    assert torch.autograd.gradcheck(lambda x: fused_mask_losses(x, targets, 2.0)[:2], (logits,))


def test_fused_loss_ignores_non_finite_logits_in_padding() -> None:
    """inf / nan in the padding change neither the loss nor the in-image gradient."""
    rounds, gt, valid_hw = random_case(3, [3], 8, 32, torch.float64, seed=6)
    valid_hw[:] = torch.tensor([16, 20])
    valid = torch.ones(3, dtype=torch.bool)
    clean = rounds[0][0].detach().clone().requires_grad_(True)
    dirty = clean.detach().clone()
    dirty[:, :, 6:, :] = float("nan")
    dirty[:, :, :, 7:] = float("inf")
    dirty.requires_grad_(True)
    out_clean = sam_loss([(clean, rounds[0][1])], gt, valid, 3, LossConfig(), valid_hw=valid_hw)
    out_dirty = sam_loss([(dirty, rounds[0][1])], gt, valid, 3, LossConfig(), valid_hw=valid_hw)
    assert torch.isfinite(out_dirty["loss"])
    torch.testing.assert_close(out_dirty["loss"], out_clean["loss"], rtol=0, atol=0)
    g_clean, = torch.autograd.grad(out_clean["loss"], clean)
    g_dirty, = torch.autograd.grad(out_dirty["loss"], dirty)
    inside = torch.zeros_like(g_clean, dtype=torch.bool)
    inside[:, :, :4, :5] = True  # low-res cells whose upsampled footprint is all image
    torch.testing.assert_close(g_dirty[inside], g_clean[inside], rtol=0, atol=0)


@pytest.mark.parametrize("num_queries,num_keys,heads,dim", [(256, 8, 4, 32), (64, 15, 8, 128), (40, 1, 2, 16)])
def test_few_keys_attention_matches_sdpa(num_queries: int, num_keys: int, heads: int, dim: int) -> None:
    """The keys-major image-to-token attention: SDPA's output and gradients (fp64)."""
    from trainer.model.transformer import few_keys_attention

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(3, n, dim, generator=gen, dtype=torch.float64, requires_grad=True)
               for n in (num_queries, num_keys, num_keys))

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        split = lambda x: x.view(3, x.shape[1], heads, dim // heads).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(3, -1, dim)

    ours, ref = few_keys_attention(q, k, v, heads), sdpa(q, k, v)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_decoder_attention_uses_few_keys_path_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Image-to-token (many queries, few keys) takes the keys-major path on CPU; the
    token-to-image and self attention stay on SDPA; both give the same result."""
    from trainer.model import transformer

    attn = transformer.Attention(64, 4, downsample_rate=2).double()
    gen = torch.Generator().manual_seed(8)
    image = torch.randn(2, 256, 64, generator=gen, dtype=torch.float64)
    tokens = torch.randn(2, 9, 64, generator=gen, dtype=torch.float64)
    assert transformer.few_keys(256, 9) and not transformer.few_keys(9, 256) and not transformer.few_keys(9, 9)
    calls = []
    real = transformer.few_keys_attention
    monkeypatch.setattr(transformer, "few_keys_attention", lambda *a: calls.append(1) or real(*a))
    fast = attn(image, tokens, tokens)
    assert len(calls) == 1  # image -> token took the keys-major path
    attn(tokens, image, image)
    attn(tokens, tokens, tokens)
    assert len(calls) == 1  # token -> image and self attention did not
    monkeypatch.setattr(transformer, "FEW_KEYS_MAX", 0)
    torch.testing.assert_close(fast, attn(image, tokens, tokens), rtol=1e-12, atol=1e-12)
    assert len(calls) == 1


def _attention_with_random_biases(dim: int, heads: int) -> torch.nn.Module:
    from trainer.model.transformer import Attention

    attn = Attention(dim, heads, downsample_rate=2).double()
    with torch.no_grad():  # nonzero biases, so every bias term of the reassociation is exercised
        for p in attn.parameters():
            if p.ndim == 1:
                p.normal_()
    return attn


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((out * w).sum(), leaves)


def _used_params(attn: torch.nn.Module, projections: tuple[str, ...]) -> tuple[list[str], list[torch.Tensor]]:
    named = [(name, p) for name, p in attn.named_parameters() if name.split(".")[0] in projections]
    return [name for name, _ in named], [p for _, p in named]


@pytest.mark.parametrize("num_tokens,num_image,heads,dim", [(7, 49, 4, 64), (11, 30, 8, 256), (1, 5, 2, 16)])
def test_tokens_to_image_through_the_weights_matches_attend(num_tokens: int, num_image: int, heads: int,
                                                            dim: int) -> None:
    """``few_tokens.tokens_to_image`` is ``attend(q, k_proj(x + pe), v_proj(x))`` reassociated:
    same output and gradients (queries, both image inputs, every parameter) in fp64. The
    k_proj bias gradient is zero in exact arithmetic (a constant shift under softmax) on
    both sides; it is still produced, as DDP needs."""
    from trainer.model.few_tokens import tokens_to_image

    gen = torch.Generator().manual_seed(11)
    attn = _attention_with_random_biases(dim, heads)
    n = 3
    q = torch.randn(n, num_tokens, dim // 2, generator=gen, dtype=torch.float64, requires_grad=True)
    key_src, value_src = (torch.randn(n, num_image, dim, generator=gen, dtype=torch.float64, requires_grad=True)
                          for _ in range(2))
    param_names, params = _used_params(attn, ("k_proj", "v_proj", "out_proj"))
    leaves = [q, key_src, value_src, *params]
    ours = tokens_to_image(attn, q, key_src, value_src)
    ref = attn.attend(q, attn.k_proj(key_src), attn.v_proj(value_src))
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    names = ["q", "key_src", "value_src", *param_names]
    for name, a, b in zip(names, _grads(ours, leaves, w), _grads(ref, leaves, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("projected", [False, True], ids=["queries-through", "queries-projected"])
@pytest.mark.parametrize("num_tokens,num_image,heads,dim", [(7, 49, 4, 64), (15, 30, 8, 256), (1, 6, 2, 16)])
def test_image_to_tokens_through_the_weights_matches_attend(projected: bool, num_tokens: int, num_image: int,
                                                            heads: int, dim: int) -> None:
    """``few_tokens.image_to_tokens``, with the queries multiplied through ``W_q`` (plus the
    ``b_q·k`` term, which does change the softmax) or already projected (the factored first
    layer): ``attend(q_proj(x + pe), k, v)`` to fp64 rounding, with every gradient."""
    from trainer.model.few_tokens import image_to_tokens

    gen = torch.Generator().manual_seed(12)
    attn = _attention_with_random_biases(dim, heads)
    n, internal = 2, dim // 2
    k, v = (torch.randn(n, num_tokens, internal, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    image = torch.randn(n, num_image, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    param_names, params = _used_params(attn, ("q_proj", "out_proj"))
    leaves = [k, v, image, *params]
    if projected:
        ours = image_to_tokens(attn, k, v, q=attn.q_proj(image))
    else:
        ours = image_to_tokens(attn, k, v, query_src=image)
    ref = attn.attend(attn.q_proj(image), k, v)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    names = ["k", "v", "image", *param_names]
    for name, a, b in zip(names, _grads(ours, leaves, w), _grads(ref, leaves, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    with pytest.raises(ValueError, match="exactly one of query_src or q"):
        image_to_tokens(attn, k, v)


def test_decoder_multiplies_through_the_weights_only_with_few_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule (h·T < D, CPU only), and a whole vit_b-width decoder round (mask input,
    factored first layer) with the through-weights attentions on vs off: same logits, IoUs
    and gradients to fp32 rounding; with 16 tokens (8·16 = 128 = D) nothing goes through."""
    from trainer.model import transformer
    from trainer.model.build import build_from_spec, spec_for
    from trainer.model.few_tokens import through_pays

    assert through_pays(8, 11, 128, cuda=False) and not through_pays(8, 16, 128, cuda=False)
    assert not through_pays(8, 7, 128, cuda=True)
    torch.manual_seed(6)
    spec = spec_for("vit_b", img_size=96, decoder_dropout=0.0)  # C = 256, 8 heads, a 6×6 grid
    sam = build_from_spec(spec)
    g, n = spec.embedding_grid, 3
    emb = torch.randn(2, spec.prompt_embed_dim, g, g, requires_grad=True)
    mask = torch.randn(n, 1, 4 * g, 4 * g, requires_grad=True)
    idx = torch.tensor([1, 0, 1])
    calls: list[str] = []
    rule = transformer.multiplies_through
    for name in ("tokens_to_image", "image_to_tokens"):
        real = getattr(transformer, name)
        monkeypatch.setattr(transformer, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    for num_points, goes_through in ((4, True), (11, False)):
        coords = torch.rand(n, num_points, 2) * spec.img_size
        labels = torch.randint(0, 2, (n, num_points))
        results = []
        for allowed in (False, True):
            calls.clear()
            monkeypatch.setattr(transformer, "multiplies_through",
                                rule if allowed else (lambda *a: False))
            masks, iou = _decode(sam, emb, idx, coords, labels, mask, True)
            w = torch.randn(masks.shape, generator=torch.Generator().manual_seed(2))
            params = list(sam.mask_decoder.parameters())
            grads_ = torch.autograd.grad((masks * w).sum() + iou.square().sum(), [emb, mask] + params)
            results.append((masks.detach(), iou.detach(), grads_, list(calls)))
        (m1, i1, g1, c1), (m2, i2, g2, c2) = results
        assert c1 == []
        # 2 layers: i2t in both, t2i in layer 2 only (layer 1 is factored), plus the final attention.
        assert sorted(c2) == (sorted(["image_to_tokens"] * 2 + ["tokens_to_image"] * 2) if goes_through else [])
        torch.testing.assert_close(m2, m1, rtol=1e-4, atol=1e-5 * float(m1.abs().max()))
        torch.testing.assert_close(i2, i1, rtol=1e-4, atol=1e-6)
        scale = max(float(a.abs().max()) for a in g1)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-6 * scale)


@pytest.mark.parametrize("shape", [(3, 16, 5, 7), (2, 4, 8, 8), (1, 1, 3, 3)])
def test_layer_norm_2d_closed_form_backward_matches_autograd(shape: tuple[int, ...]) -> None:
    """Same output as the official op sequence, same gradients for x, weight and bias."""
    from trainer.model.common import LayerNorm2d, layer_norm_2d_reference

    gen = torch.Generator().manual_seed(9)
    ln = LayerNorm2d(shape[1]).double()
    with torch.no_grad():
        ln.weight.normal_(generator=gen)
        ln.bias.normal_(generator=gen)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ours, ref = ln(x), layer_norm_2d_reference(x, ln.weight, ln.bias, ln.eps)
    assert torch.equal(ours, ref)  # the forward is the official sequence of ops
    leaves = (x, ln.weight, ln.bias)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: LayerNorm2d.forward(ln, t), (x,))


def test_soft_targets_are_binarised_and_half_logits_summed_in_fp32() -> None:
    """GT given as floats in [0, 1] is the mask ``> 0.5``; fp16 logits give the fp32 loss
    (a 256² region's 65,536 pixels do not fit fp16)."""
    rounds, gt, valid_hw = random_case(3, [3, 1], 64, 256, torch.float32, seed=11)
    valid = torch.ones(3, dtype=torch.bool)
    ref = sam_loss(rounds, gt, valid, 3, LossConfig(), valid_hw=valid_hw)
    soft = torch.where(gt, 0.8, 0.3)
    torch.testing.assert_close(sam_loss(rounds, soft, valid, 3, LossConfig(), valid_hw=valid_hw)["loss"], ref["loss"])
    half = [(x.detach().half().requires_grad_(True), y.detach().half().requires_grad_(True)) for x, y in rounds]
    out = sam_loss(half, gt, valid, 3, LossConfig(), valid_hw=valid_hw)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=2e-3, atol=1e-3)
    grad, = torch.autograd.grad(out["loss"], half[0][0])
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()


def test_custom_backwards_refuse_double_backward() -> None:
    """First derivatives only: a second one raises instead of silently returning zero."""
    from trainer.model.common import LayerNorm2d

    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(LayerNorm2d(4).double()(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def _decode(sam: torch.nn.Module, emb: torch.Tensor, index: torch.Tensor | None, coords: torch.Tensor,
            labels: torch.Tensor, mask: torch.Tensor | None, factored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sparse, dense = sam.prompt_encoder((coords, labels), None, mask, pad_points=False, factored=factored)
    return sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, True, image_index=index)


@pytest.mark.parametrize("images,index", [(1, None), (3, [0, 2, 1, 1, 0]), (5, None)],
                         ids=["one-image", "image-index", "per-prompt"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask-input", "no-mask"])
def test_factored_first_layer_matches_plain_dense_embedding(images: int, index: list[int] | None,
                                                           with_mask: bool) -> None:
    """The decoder's factored first layer (per-image projections + 16-channel mask features,
    ``trainer/model/factored.py``) is the plain ``image + dense`` decoder reassociated: the
    same logits, IoUs and gradients (image embedding, mask input, every parameter) to fp32
    rounding. Gradients that are zero in exact arithmetic (k_proj biases: softmax ignores a
    constant shift) are compared against the largest gradient's scale."""
    from trainer.model.build import build_from_spec, spec_for

    torch.manual_seed(3)
    spec = spec_for("tiny")
    sam = build_from_spec(spec)
    with torch.no_grad():  # non-trivial mask branch and no-mask embedding
        for p in sam.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g, c, n = spec.embedding_grid, spec.prompt_embed_dim, 5
    emb = torch.randn(images, c, g, g, requires_grad=True)
    coords, labels = torch.rand(n, 3, 2) * spec.img_size, torch.randint(0, 2, (n, 3))
    mask = torch.randn(n, 1, 4 * g, 4 * g, requires_grad=True) if with_mask else None
    idx = None if index is None else torch.tensor(index)
    results = []
    for factored in (False, True):
        sam.zero_grad()
        leaves = [emb] + ([mask] if with_mask else [])
        masks, iou = _decode(sam, emb, idx, coords, labels, mask, factored)
        w = torch.randn(masks.shape, generator=torch.Generator().manual_seed(1))
        params = [p for p in sam.parameters()]
        grads_ = torch.autograd.grad((masks * w).sum() + iou.square().sum(), leaves + params, allow_unused=True)
        results.append((masks.detach(), iou.detach(), grads_))
    (m1, i1, g1), (m2, i2, g2) = results
    torch.testing.assert_close(m2, m1, rtol=1e-4, atol=1e-5 * float(m1.abs().max()))
    torch.testing.assert_close(i2, i1, rtol=1e-4, atol=1e-6)
    scale = max(float(a.abs().max()) for a in g1 if a is not None)
    names = ["emb", "mask"][: 1 + with_mask] + [name for name, _ in sam.named_parameters()]
    for name, a, b in zip(names, g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-6 * scale, msg=name)


def test_factored_first_layer_under_bf16_autocast_and_rejects_a_bad_index() -> None:
    """Under CPU bf16 autocast (the GPU recipe's precision) the factored layer agrees with
    the plain one to bf16 rounding; a wrong-length ``image_index`` is named."""
    from trainer.model.build import build_from_spec, spec_for

    torch.manual_seed(4)
    spec = spec_for("tiny")
    sam = build_from_spec(spec)
    g, c = spec.embedding_grid, spec.prompt_embed_dim
    emb, mask = torch.randn(2, c, g, g), torch.randn(4, 1, 4 * g, 4 * g)
    coords, labels, idx = torch.rand(4, 2, 2) * spec.img_size, torch.ones(4, 2, dtype=torch.long), torch.tensor([1, 0, 0, 1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = _decode(sam, emb, idx, coords, labels, mask, False)
        fact, _ = _decode(sam, emb, idx, coords, labels, mask, True)
    assert fact.dtype == plain.dtype
    assert float((fact.float() - plain.float()).abs().max()) <= 0.05 * float(plain.float().abs().max())
    with pytest.raises(ValueError, match="image_index has shape"):
        _decode(sam, emb, idx[:3], coords, labels, mask, True)


def test_low_rank_dense_is_the_prompt_encoders_dense_embedding() -> None:
    """``LowRankDense.to_dense()`` rebuilds exactly what the official path returns (the same
    1×1 conv on the same features; the broadcast no-mask embedding)."""
    from trainer.model.build import build_from_spec, spec_for

    torch.manual_seed(5)
    spec = spec_for("tiny")
    prompt = build_from_spec(spec).prompt_encoder
    g = spec.embedding_grid
    coords, labels = torch.rand(3, 2, 2) * spec.img_size, torch.ones(3, 2, dtype=torch.long)
    for mask in (torch.randn(3, 1, 4 * g, 4 * g), None):
        _, plain = prompt((coords, labels), None, mask, pad_points=False)
        _, factored = prompt((coords, labels), None, mask, pad_points=False, factored=True)
        assert factored.num_prompts == 3 and factored.size == (g, g)
        torch.testing.assert_close(factored.to_dense(), plain, rtol=0, atol=0)
