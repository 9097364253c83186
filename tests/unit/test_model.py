"""Model behaviour beyond parity: attention kernels, training extras, errors, tiny training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.model import CheckpointMismatchError, build_sam, export_official, load_sam_state_dict, spec_for
from trainer.model import attention
from trainer.model.attention import Attention
from trainer.model.image_encoder import Block, window_partition, window_unpartition


@pytest.mark.parametrize("window_size", [6, 0], ids=["windowed", "global"])
def test_sdpa_block_matches_reference_outputs_and_grads(window_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDPA path equals the explicit softmax((q·s)kᵀ + B)v formulation, forward and backward."""
    monkeypatch.setattr(attention, "SDPA_ON_CPU", True)  # CPU runs the explicit path by default
    monkeypatch.setattr(attention, "REAL_QUERY_BANDS_MIN_MACS", 0)  # the bands at this small size too
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    grid = 16
    block = Block(dim=48, num_heads=3, use_rel_pos=True, window_size=window_size, input_size=(grid, grid)).double()
    with torch.no_grad():  # non-zero rel-pos tables so the bias matters
        block.attn.rel_pos_h.normal_(0, 0.5)
        block.attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, grid, grid, 48, dtype=torch.float64)
    results, sdpa_calls = [], []
    for use_sdpa in (True, False):
        block.attn.use_sdpa = use_sdpa
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        results.append((out.detach(), xi.grad.clone(), grads))
        sdpa_calls.append(len(calls))
    (o1, gx1, g1), (o2, gx2, g2) = results
    # The first pass ran SDPA (once per band of windows: 2×2 bands of a 16-grid in 6-windows),
    # the second the explicit formulation.
    assert sdpa_calls == ([4, 4] if window_size else [1, 1])
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-10)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-10, msg=name)
    assert g1["attn.rel_pos_h"].abs().sum() > 0


@pytest.mark.parametrize("bands", [True, False], ids=["query-bands", "padded-queries"])
@pytest.mark.parametrize("hw,window,qkv_bias", [((16, 16), 6, True), ((10, 13), 4, True), ((12, 12), 6, True),
                                                ((9, 9), 7, False)], ids=["pad", "pad-hw", "no-pad", "no-bias"])
def test_windowed_attention_skips_padding_rows_same_math(hw: tuple[int, int], window: int, qkv_bias: bool,
                                                         bands: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``forward_windowed`` (qkv of the real tokens, bias added after padding; queries of the
    real tokens only in bands of windows, or padded in one call for small grids) equals the
    official order, pad -> qkv -> attention -> proj -> crop: outputs and every gradient."""
    monkeypatch.setattr(attention, "REAL_QUERY_BANDS_MIN_MACS", 0 if bands else 2**62)
    torch.manual_seed(0)
    attn = Attention(24, num_heads=2, qkv_bias=qkv_bias, use_rel_pos=True, input_size=(window, window)).double()
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
        if qkv_bias:
            attn.qkv.bias.normal_(0, 1.0)  # padded keys then differ from zero keys
    x = torch.randn(2, *hw, 24, dtype=torch.float64)

    def official(xi: torch.Tensor) -> torch.Tensor:
        windows, pad_hw = window_partition(xi, window)
        return window_unpartition(attn(windows), window, pad_hw, hw)

    results = []
    for fn in (official, lambda xi: attn.forward_windowed(xi, window)):
        attn.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad.clone(), {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (o1, gx1, g1), (o2, gx2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(gx2, gx1, rtol=1e-10, atol=1e-11)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-10, atol=1e-11, msg=name)


def test_attention_rejects_missing_input_size() -> None:
    with pytest.raises(ValueError, match="input_size"):
        Attention(32, num_heads=2, use_rel_pos=True, input_size=None)


def test_variant_sizes_match_official_counts() -> None:
    """Official totals (SAM_RECIPE.md §2): 93.7M / 312.3M / 641.1M parameters, 314/482/594 keys."""
    for variant, keys, millions in (("vit_b", 314, 93.7), ("vit_l", 482, 312.3), ("vit_h", 594, 641.1)):
        with torch.device("meta"):
            model = build_sam(variant)
        assert len(model.state_dict()) == keys
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_drop_path_rates_follow_recipe() -> None:
    assert spec_for("vit_h").drop_path_rate == 0.4
    assert spec_for("vit_l").drop_path_rate == 0.4
    assert spec_for("vit_b").drop_path_rate == 0.6
    with torch.device("meta"):
        model = build_sam("vit_b")
    rates = [blk.drop_path.drop_prob for blk in model.image_encoder.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.6) < 1e-6
    assert all(a < b for a, b in zip(rates, rates[1:]))


def test_unknown_override_is_named() -> None:
    with pytest.raises(ValueError, match="window_sz"):
        build_sam("tiny", window_sz=3)
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'"):
        build_sam("vit_x")


def test_wrong_variant_checkpoint_names_variant_and_keys(tmp_path) -> None:
    with torch.device("meta"):
        tiny = build_sam("tiny")
    small = build_sam("tiny", encoder_embed_dim=48, encoder_num_heads=2)
    path = tmp_path / "other.pth"
    export_official(small, str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        build_sam("tiny", checkpoint=str(path))
    message = str(err.value)
    assert "'tiny'" in message and "image_encoder.pos_embed" in message and "(1, 16, 16, 48)" in message
    with pytest.raises(CheckpointMismatchError, match="looks like a vit_b"):
        with torch.device("meta"):
            vit_b = build_sam("vit_b")
        load_sam_state_dict(tiny, vit_b.state_dict(), "tiny")


def test_checkpoint_roundtrip_strict(tmp_path) -> None:
    model = build_sam("tiny")
    path = tmp_path / "tiny.pth"
    export_official(model, str(path))
    again = build_sam("tiny", checkpoint=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_gaussian_pe_is_seeded_not_global_rng() -> None:
    torch.manual_seed(1)
    a = build_sam("tiny").prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    torch.manual_seed(2)
    b = build_sam("tiny").prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert torch.equal(a, b)
    c = build_sam("tiny", pe_seed=5).prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert not torch.equal(a, c)


def test_activation_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = build_sam("tiny")
    ckpt = build_sam("tiny", activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 256, 256)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.image_encoder(x).square().mean().backward()
        grads.append(model.image_encoder.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_prompt_encoder_compiles_without_graph_breaks() -> None:
    """No data-dependent boolean indexing: dynamo traces the whole encoder as one graph."""
    model = build_sam("tiny").prompt_encoder
    coords = torch.rand(4, 3, 2) * 256
    labels = torch.tensor([[1, 0, -1], [2, 3, -1], [1, 1, 1], [0, -1, -1]])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    sparse, dense = compiled((coords, labels), None, None, pad_points=False)
    ref_sparse, ref_dense = model((coords, labels), None, None, pad_points=False)
    torch.testing.assert_close(sparse, ref_sparse)
    torch.testing.assert_close(dense, ref_dense)


def test_box_as_labelled_points_equals_box_path() -> None:
    model = build_sam("tiny").prompt_encoder
    boxes = torch.tensor([[10.0, 20.0, 100.0, 200.0], [0.0, 0.0, 255.0, 255.0]])
    via_boxes, _ = model(None, boxes, None)
    corners = boxes.reshape(2, 2, 2)
    labels = torch.tensor([[2, 3], [2, 3]])
    via_points, _ = model((corners, labels), None, None, pad_points=False)
    torch.testing.assert_close(via_points, via_boxes)


def test_decoder_accepts_per_prompt_embeddings() -> None:
    model = build_sam("tiny").eval()
    emb = torch.randn(2, 64, 16, 16)
    coords = torch.rand(3, 1, 2) * 256
    sparse, dense = model.prompt_encoder((coords, torch.ones(3, 1, dtype=torch.long)), None, None)
    pe = model.prompt_encoder.get_dense_pe()
    index = torch.tensor([0, 1, 1])
    masks, iou = model.mask_decoder(emb[index], pe, sparse, dense, True)
    one, _ = model.mask_decoder(emb[1:2], pe, sparse[2:], dense[2:], True)
    torch.testing.assert_close(masks[2:], one)
    with pytest.raises(ValueError, match="image_embeddings has batch 2"):
        model.mask_decoder(emb, pe, sparse, dense, True)


@pytest.mark.parametrize("size", [(3, 5), (4, 4), (1, 2)])
def test_upscaled_masks_on_pixel_rows_match_the_convolutions(size: tuple[int, int]) -> None:
    """``MaskDecoder._upscaled_masks`` (the 2×2 stride-2 transposed convs as per-pixel
    matmuls in block order, native LayerNorm, masks reordered at the end) is the official
    ``output_upscaling`` then ``hyper_in @ upscaled.view(b, c, h*w)``: same logits and
    gradients (tokens, hypernetwork outputs, every upscaling parameter) in fp64, h ≠ w."""
    from trainer.model.common import layer_norm_2d_reference

    torch.manual_seed(5)
    decoder = build_sam("tiny").mask_decoder.double()
    with torch.no_grad():
        for p in decoder.output_upscaling.parameters():
            p.normal_()  # nonzero biases, a non-trivial LayerNorm affine
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    h, w = size
    n, c = 3, decoder.transformer_dim
    src = torch.randn(n, h * w, c, dtype=torch.float64, requires_grad=True)
    hyper = torch.randn(n, 4, c // 8, dtype=torch.float64, requires_grad=True)

    def official() -> torch.Tensor:
        x = conv1(src.transpose(1, 2).reshape(n, c, h, w))
        x = act2(conv2(act1(layer_norm_2d_reference(x, norm.weight, norm.bias, norm.eps))))
        return (hyper @ x.view(n, c // 8, 16 * h * w)).view(n, -1, 4 * h, 4 * w)

    ours, ref = decoder._upscaled_masks(src, hyper, (h, w)), official()
    assert ours.shape == (n, 4, 4 * h, 4 * w)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    leaves = [src, hyper, *decoder.output_upscaling.parameters()]
    weight = torch.randn(ref.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((ours * weight).sum(), leaves), torch.autograd.grad((ref * weight).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _naive_blocks_to_image(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, k = masks.shape[:2]
    return masks.reshape(n, k, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(n, k, 4 * h, 4 * w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_block_order_reorders_are_exact_inverses(dtype: torch.dtype) -> None:
    """``upscaling.blocks_to_image`` is the block-order -> image-order permutation (against
    one eight-dimensional permute) and ``image_to_blocks`` its inverse, bit for bit: runs
    moved as integers keep every bit pattern, NaN payloads included."""
    from trainer.model.upscaling import blocks_to_image, image_to_blocks

    n, k, h, w = 2, 3, 5, 3
    bits = torch.randint(-(2**15), 2**15, (n, k, 16 * h * w * dtype.itemsize // 2), dtype=torch.int16,
                         generator=torch.Generator().manual_seed(0))
    masks = bits.view(dtype)  # every bit pattern, NaNs and infinities among them
    image = blocks_to_image(masks, (h, w))
    assert image.shape == (n, k, 4 * h, 4 * w)
    assert torch.equal(image.view(torch.int16), _naive_blocks_to_image(masks, h, w).contiguous().view(torch.int16))
    assert torch.equal(image_to_blocks(image).view(torch.int16), bits)
    # A contiguous view that starts mid-run (e.g. a gradient carved out of a larger buffer).
    for tensor, reorder, expected in ((masks, lambda t: blocks_to_image(t, (h, w)), image),
                                      (image, image_to_blocks, masks)):
        shifted = torch.cat([tensor.reshape(-1)[:1], tensor.reshape(-1)])[1:].view(tensor.shape)
        assert shifted.storage_offset() == 1
        assert torch.equal(reorder(shifted).view(torch.int16), expected.view(torch.int16))


def test_mask_product_gradients_and_autocast_dtype() -> None:
    """``upscaling.mask_product``: its custom backward passes gradcheck (fp64) and matches
    autograd through the plain product in fp32 (the integer-run reorders); under CPU bf16
    autocast it returns bf16, as the official ``hyper_in @ upscaled`` does."""
    from trainer.model.upscaling import mask_product

    gen = torch.Generator().manual_seed(1)
    h, w = 2, 3
    pixels = torch.randn(2, 16 * h * w, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    hyper = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: mask_product(p, q, (h, w)), (pixels, hyper))
    p32, q32 = (t.detach().float().requires_grad_(True) for t in (pixels, hyper))
    ours = mask_product(p32, q32, (h, w))
    ref = _naive_blocks_to_image(q32 @ p32.transpose(1, 2), h, w)
    torch.testing.assert_close(ours, ref)
    g = torch.randn(ref.shape, generator=gen)
    for a, b in zip(torch.autograd.grad((ours * g).sum(), (p32, q32)), torch.autograd.grad((ref * g).sum(), (p32, q32))):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mask_product(p32, q32, (h, w)).dtype == torch.bfloat16


def test_tiny_trains_on_a_fixed_batch() -> None:
    """A few AdamW steps on one batch reduce a simple mask loss (BCE + dice)."""
    torch.manual_seed(0)
    model = build_sam("tiny")
    image = torch.randn(1, 3, 256, 256)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    target = (((yy - 30) ** 2 + (xx - 24) ** 2) < 15**2).float()[None, None]
    point = torch.tensor([[[24 * 4.0, 30 * 4.0]]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_fn() -> torch.Tensor:
        emb = model.image_encoder(image)
        sparse, dense = model.prompt_encoder((point, torch.ones(1, 1, dtype=torch.long)), None, None)
        logits, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        return F.binary_cross_entropy_with_logits(logits, target) + dice

    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
