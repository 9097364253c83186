"""Analytic FLOP counts per training image and model FLOPs utilisation (MFU).

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts: matmuls (``Linear``,
the attention ``QKᵀ`` and ``AV``, the decomposed rel-pos einsums), convolutions and
transposed convolutions, at 2 FLOPs per multiply-accumulate. Normalisations,
activations, softmax, interpolation and the loss are element-wise and not counted
(the same convention as the counter and as SAM_RECIPE.md §7). The counts follow the
modules in ``trainer.model`` for any :class:`~trainer.model.build.SamSpec`:

- Image encoder (:func:`encoder_forward_flops`): patch embedding, ``depth`` pre-LN
  blocks, the neck. Windowed blocks run ``qkv``/``proj`` and attention on the zero-padded
  grid (64→70 tokens per side for 1024/16 with 14×14 windows, SAM_RECIPE.md §2
  "Attention"), the MLP on the unpadded grid (``window_unpartition`` crops before it).
  Checked against the counter and against SAM_RECIPE.md §7 (ViT-B/L/H forward 972 /
  2,986 / 5,961 GFLOP counted).
- Prompt encoder + mask decoder (:func:`decoder_forward_flops`): one mask in one round.
  The image embedding is expanded per mask (``MaskDecoder.predict_masks``), so the
  image-side work of the two-way transformer (key/value projections over h·w tokens,
  the image→token attention, the output upscaling) is paid per mask, not per image.
- Model vs executed FLOPs. The counts above are the official model's (SAM_RECIPE.md
  §7; MFU counts them, the paper's convention). Our step executes fewer, the same math
  reassociated (``executed=True``): windowed blocks skip the padding rows
  (``Attention.forward_windowed``: qkv and proj for the real G² tokens only, and the
  queries too where that pays off, keys still over the padded windows), and the
  decoder's first two-way layer projects each image once and each mask through the
  r = ``mask_in_chans`` mask features
  (``trainer/model/factored.py``, per-image part :func:`decoder_image_flops`), and on
  CPU the cross-attentions with few prompt tokens multiply the image side through the
  projection weights (``trainer/model/few_tokens.py``; h·T rows instead of C/2). The
  tests check both against the counter: the model count on the official
  ``segment_anything`` modules, the executed count on ours.
- Training (:func:`train_flops_per_image`): backward ≈ 2× forward, so training ≈ 3×
  forward, plus one more forward of what activation checkpointing recomputes (every
  encoder block but its last matmul, every interactive round's prompt encoder +
  decoder; see ``ImageEncoderViT.forward``, ``simulate_interaction(checkpoint_rounds=...)``
  and :func:`encoder_recompute_flops`).
  The one exact exception to "2×" is the patch embedding, whose input (the image) needs
  no gradient: the counter sees its backward as 1× forward (0.5% of a ViT-B encoder).

MFU = achieved model FLOP/s ÷ the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`),
reported separately for the encoder and end to end (SAM_RECIPE.md §7 "MFU").
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trainer.model.attention import skips_padding_queries
from trainer.model.build import ModelConfig, SamSpec, spec_for
from trainer.model.few_tokens import through_pays
from trainer.prompts import PromptConfig, sample_round_plan

if TYPE_CHECKING:
    from trainer.presets import Config

#: Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's data
#: sheets (they quote 2× these figures "with sparsity"). SAM_RECIPE.md §7 uses A100 312
#: and H100 989.
PEAK_BF16_TFLOPS: dict[str, float] = {"A100": 312.0, "H100 SXM": 989.0, "H100 PCIe": 756.0,
                                      "H200": 989.0, "L4": 121.0}

#: Sparse prompt tokens of round 1: a point plus the padding point, or two box corners
#: (``trainer.prompts.sample_initial_prompts``); each correction point adds one.
ROUND1_TOKENS = 2
#: Output tokens the decoder prepends: the IoU token and 4 mask tokens (3 multimask + 1).
DECODER_OUTPUT_TOKENS = 5
#: Round plans averaged by :func:`sampled_token_plans` (fixed seed: reproducible).
_NUM_PLAN_SAMPLES = 64


def _linear(tokens: int, d_in: int, d_out: int) -> float:
    """``Linear(d_in, d_out)`` applied to ``tokens`` rows (bias not counted)."""
    return 2.0 * tokens * d_in * d_out


def _attention_core(num_q: int, num_k: int, dim: int) -> float:
    """``QKᵀ`` and ``AV`` summed over heads: ``2·(2·Nq·Nk·dim)``, independent of heads."""
    return 4.0 * num_q * num_k * dim


def _padded_side(grid: int, window: int) -> int:
    """Token-grid side after ``window_partition`` pads it to a multiple of ``window``."""
    return math.ceil(grid / window) * window


def patch_embed_flops(spec: SamSpec) -> float:
    """Patch embedding conv (``3→D``, kernel = stride = patch) per image."""
    tokens = spec.embedding_grid**2
    return _linear(tokens, 3 * spec.patch_size**2, spec.encoder_embed_dim)


def encoder_block_flops(spec: SamSpec, global_attention: bool, executed: bool = False) -> float:
    """One encoder block's forward FLOPs per image.

    Global: qkv + proj + MLP (ratio 4) over the G×G grid, attention over all G² tokens and
    the two rel-pos einsums (``bhwc,hkc->bhwk``, each ``2·N·G·D``). Windowed: the grid is
    zero-padded to ``Gp`` (a multiple of the window ``w``) for qkv, proj and attention
    (``(Gp/w)²`` windows of w² tokens, padding attended without a mask), the MLP runs on
    the cropped G² tokens. ``executed``: qkv and proj on the G² real tokens only, and the
    queries too where ``skips_padding_queries`` (each still attending to its window's w²
    keys).
    """
    d, grid = spec.encoder_embed_dim, spec.embedding_grid
    tokens = grid * grid
    mlp = 2 * _linear(tokens, d, 4 * d)
    if global_attention or spec.window_size <= 0:
        side, window = grid, grid
    else:
        side, window = _padded_side(grid, spec.window_size), spec.window_size
    attn_tokens = side * side  # every window holds window² tokens; there are (side/window)² of them
    projected = tokens if executed else attn_tokens
    projections = _linear(projected, d, 3 * d) + _linear(projected, d, d)
    if executed and side != grid and skips_padding_queries(grid, grid, window, d):
        attn_tokens = tokens  # the queries of the real tokens only
    core = _attention_core(attn_tokens, window * window, d)  # each query sees its window
    rel_pos = 2 * (2.0 * attn_tokens * window * d)
    return projections + core + rel_pos + mlp


def neck_flops(spec: SamSpec) -> float:
    """Neck: 1×1 conv ``D→C`` then 3×3 conv ``C→C`` (no bias) over G² tokens."""
    tokens, c = spec.embedding_grid**2, spec.prompt_embed_dim
    return _linear(tokens, spec.encoder_embed_dim, c) + _linear(tokens, 9 * c, c)


def encoder_blocks_flops(spec: SamSpec, executed: bool = False) -> float:
    """All encoder blocks' forward, per image."""
    return sum(encoder_block_flops(spec, i in spec.encoder_global_attn_indexes, executed)
               for i in range(spec.encoder_depth))


def encoder_recompute_flops(spec: SamSpec, executed: bool = False) -> float:
    """What activation checkpointing recomputes in the encoder's backward, per image.

    Every block is re-run, except its last matmul (``mlp.lin2``): the non-reentrant
    ``torch.utils.checkpoint`` (the engine's ``use_reentrant=False``) stops recomputing
    as soon as every tensor backward needs is back (its default early stop), and
    ``lin2``'s output is saved by nothing. Checked with the counter in the unit tests.
    """
    tokens, d = spec.embedding_grid**2, spec.encoder_embed_dim
    return encoder_blocks_flops(spec, executed) - spec.encoder_depth * _linear(tokens, 4 * d, d)


def encoder_forward_flops(spec: SamSpec, executed: bool = False) -> float:
    """Image-encoder forward FLOPs for one ``img_size``² image (patch embed, blocks, neck)."""
    return patch_embed_flops(spec) + encoder_blocks_flops(spec, executed) + neck_flops(spec)


def prompt_encoder_flops(spec: SamSpec, num_prompt_tokens: int, with_mask_prompt: bool) -> float:
    """Prompt encoder for one mask: random-Fourier PE of each point (``2→C/2`` matmul) and,
    with a mask prompt, ``mask_downscaling`` (k2s2 ``1→m/4`` on 4G×4G, k2s2 ``m/4→m``,
    1×1 ``m→C``; m = ``mask_in_chans``). Without one, ``no_mask_embed`` is broadcast (free).
    """
    c, grid, m = spec.prompt_embed_dim, spec.embedding_grid, spec.mask_in_chans
    flops = _linear(num_prompt_tokens, 2, c // 2)
    if with_mask_prompt:
        flops += _linear((2 * grid) ** 2, 4 * 1, m // 4)
        flops += _linear(grid * grid, 4 * (m // 4), m)
        flops += _linear(grid * grid, m, c)
    return flops


def _two_way_layer_flops(spec: SamSpec, num_tokens: int, through: bool = False, first: bool = False) -> float:
    """One ``TwoWayAttentionBlock`` for one mask: ``num_tokens`` queries, G² image keys.

    ``through``: the cross-attentions multiplied through the weights
    (``trainer/model/few_tokens.py``); in the ``first`` (factored) layer only the
    image→token side, whose queries are projected already.
    """
    c, hw = spec.prompt_embed_dim, spec.embedding_grid**2
    ci = c // 2  # cross-attention projects to C/2 (attention_downsample_rate 2)
    self_attn = 4 * _linear(num_tokens, c, c) + _attention_core(num_tokens, num_tokens, c)
    mlp = 2 * _linear(num_tokens, c, spec.decoder_mlp_dim)
    if through:
        heads = spec.decoder_num_heads
        token_to_image = (_cross_attention_flops(num_tokens, hw, c, ci) if first
                          else _token_to_image_through_flops(num_tokens, hw, c, ci, heads))
        image_to_token = _image_to_token_through_flops(num_tokens, hw, c, ci, heads, queries_projected=first)
    else:
        token_to_image = _cross_attention_flops(num_tokens, hw, c, ci)
        image_to_token = _cross_attention_flops(hw, num_tokens, c, ci)
    return self_attn + token_to_image + mlp + image_to_token


def _cross_attention_flops(num_q: int, num_k: int, dim: int, internal: int) -> float:
    """q/k/v projections ``dim→internal``, attention, out projection ``internal→dim``."""
    projections = _linear(num_q, dim, internal) + 2 * _linear(num_k, dim, internal)
    return projections + _attention_core(num_q, num_k, internal) + _linear(num_q, internal, dim)


def _token_to_image_through_flops(num_tokens: int, hw: int, dim: int, internal: int, heads: int) -> float:
    """``few_tokens.tokens_to_image``: the token queries' projection and ``q·W_k``, ``q·b_k``,
    then the (h·T)-row scores and mix over the G² image tokens, ``·W_vᵀ`` and ``out_proj``."""
    tokens = 2 * _linear(num_tokens, dim, internal) + 2 * _linear(num_tokens, internal, dim)
    return tokens + _linear(num_tokens, internal, 1) + 2 * _linear(heads * num_tokens, dim, hw)


def _image_to_token_through_flops(num_tokens: int, hw: int, dim: int, internal: int, heads: int,
                                  queries_projected: bool) -> float:
    """``few_tokens.image_to_tokens``: the token keys' and values' projections, ``v·W_oᵀ``
    and the output ``(G² × h·T) @ (h·T × C)``; the scores either through ``W_qᵀ·k`` (plus
    ``b_q·k``) or, for ``queries_projected``, from the model's query projection."""
    tokens = 2 * _linear(num_tokens, dim, internal) + _linear(num_tokens, internal, dim)
    out = _linear(hw, heads * num_tokens, dim)
    if queries_projected:
        return tokens + out + _linear(hw, dim, internal) + _linear(num_tokens, internal, hw)
    return tokens + out + _linear(num_tokens, internal, dim) + _linear(num_tokens, internal, 1) \
        + _linear(heads * num_tokens, dim, hw)


def mask_decoder_flops(spec: SamSpec, num_prompt_tokens: int, with_mask_prompt: bool = True,
                       executed: bool = False, cuda: bool = False) -> float:
    """Mask decoder for one mask: two-way transformer, final token→image attention,
    output upscaling (two k2s2 transposed convs to 4G×4G), the 4 hypernetwork MLPs, the
    mask product and the IoU head. All 4 mask tokens are computed whatever the
    multimask choice (``predict_masks``), so the count does not depend on it.
    ``executed``: the first layer's three image projections (``C→C/2`` over G² tokens) run
    per mask on the r mask features only (none without a mask prompt; their per-image
    part is :func:`decoder_image_flops`), and with few tokens the cross-attentions run
    through the weights (``few_tokens.through_pays``; not on ``cuda``).
    """
    c, grid = spec.prompt_embed_dim, spec.embedding_grid
    hw = grid * grid
    num_tokens = DECODER_OUTPUT_TOKENS + num_prompt_tokens
    through = executed and through_pays(spec.decoder_num_heads, num_tokens, c // 2, cuda)
    transformer = sum(_two_way_layer_flops(spec, num_tokens, through, first=i == 0)
                      for i in range(spec.decoder_depth))
    if executed and spec.decoder_depth > 0:
        factored = _linear(hw, spec.mask_in_chans, c // 2) if with_mask_prompt else 0.0
        transformer -= 3 * (_linear(hw, c, c // 2) - factored)
    if through:
        transformer += _token_to_image_through_flops(num_tokens, hw, c, c // 2, spec.decoder_num_heads)
    else:
        transformer += _cross_attention_flops(num_tokens, hw, c, c // 2)
    upscaling = _linear(hw, c, 4 * (c // 4)) + _linear(4 * hw, c // 4, 4 * (c // 8))
    hyper = 4 * (2 * _linear(1, c, c) + _linear(1, c, c // 8))
    masks = _linear(4, c // 8, 16 * hw)  # (4 × C/8) @ (C/8 × 4G·4G)
    hidden = spec.iou_head_hidden_dim
    iou_head = _linear(1, c, hidden) + _linear(1, hidden, hidden) + _linear(1, hidden, 4)
    return transformer + upscaling + hyper + masks + iou_head


def decoder_forward_flops(spec: SamSpec, num_prompt_tokens: int, with_mask_prompt: bool,
                          executed: bool = False, cuda: bool = False) -> float:
    """Prompt encoder + mask decoder forward FLOPs for ONE mask in ONE round.

    Args:
        spec: model sizes.
        num_prompt_tokens: sparse prompt tokens of the round (round 1: 2; +1 per
            correction point so far, see :func:`tokens_per_round`).
        with_mask_prompt: the round feeds back the previous logits (every round but the first).
        executed: what our decoder runs per mask (module docstring); add
            :func:`decoder_image_flops` once per image and round.
        cuda: executed on a CUDA device, where the few-token attentions keep the
            model's products (``trainer/model/few_tokens.py``).
    """
    return (prompt_encoder_flops(spec, num_prompt_tokens, with_mask_prompt)
            + mask_decoder_flops(spec, num_prompt_tokens, with_mask_prompt, executed, cuda))


def decoder_image_flops(spec: SamSpec, with_mask_prompt: bool) -> float:
    """Per image and round, what the factored first layer runs once for all the image's
    masks: the three ``C→C/2`` projections of the image tokens and, with a mask prompt,
    the three ``W_P·W_c`` weight products (``C/2×C @ C×r``). Executed FLOPs only: the
    official model pays the projections per mask (:func:`mask_decoder_flops`)."""
    if spec.decoder_depth <= 0:
        return 0.0
    c, hw = spec.prompt_embed_dim, spec.embedding_grid**2
    products = 3 * _linear(c // 2, c, spec.mask_in_chans) if with_mask_prompt else 0.0
    return 3 * _linear(hw, c, c // 2) + products


def dense_pe_flops(spec: SamSpec) -> float:
    """``get_dense_pe``: the G×G positional encoding, computed once per step for all masks."""
    return _linear(spec.embedding_grid**2, 2, spec.prompt_embed_dim // 2)


def tokens_per_round(plan: Sequence[bool]) -> list[int]:
    """Sparse prompt tokens in each round of a round plan (``sample_round_plan``'s output)."""
    counts, points = [], 0
    for idx, adds_point in enumerate(plan):
        points += int(idx > 0 and adds_point)
        counts.append(ROUND1_TOKENS + points)
    return counts


def sampled_token_plans(prompts: PromptConfig, num_samples: int = _NUM_PLAN_SAMPLES) -> list[list[int]]:
    """Token counts per round for ``num_samples`` plans of the real ``sample_round_plan``.

    The plan is random only in where the extra no-point rounds sit; averaging over a
    fixed-seed sample follows any ``PromptConfig`` without re-deriving the plan's rules.
    Where that round sits moves a ViT-B total by about ±0.1% (±0.7% for ``tiny``, whose
    image has few tokens) for the paper's 1 + 8 + 2 rounds.
    """
    generator = torch.Generator().manual_seed(0)
    return [tokens_per_round(sample_round_plan(prompts, generator)) for _ in range(num_samples)]


def _decoder_rounds_flops(spec: SamSpec, plans: Sequence[Sequence[int]], executed: bool = False,
                          cuda: bool = False) -> float:
    """Mean over plans of one mask's prompt encoder + decoder forward, summed over rounds."""
    total = sum(decoder_forward_flops(spec, tokens, with_mask_prompt=r > 0, executed=executed, cuda=cuda)
                for plan in plans for r, tokens in enumerate(plan))
    return total / len(plans)


@dataclass(frozen=True)
class FlopBudget:
    """Analytic FLOPs of one training image (one step at 1 image per GPU).

    ``encoder``, ``decoder`` and ``total`` are TRAINING FLOPs (forward + backward ≈ 3×
    forward, plus the recomputed forward under activation checkpointing, ``recompute``);
    use ``encoder`` for the encoder MFU and ``total`` for the end-to-end MFU. (Strict MFU
    leaves recomputation out, as hardware rather than model FLOPs: subtract ``recompute``.)

    Attributes:
        encoder: image encoder, per image.
        decoder: prompt encoder + mask decoder, all masks × rounds of the image.
        total: ``encoder + decoder``.
        encoder_forward, decoder_forward: the forward passes alone.
        recompute: the part of ``total`` that activation checkpointing recomputes.
        masks_per_image, num_rounds: what the decoder terms assume.
    """

    encoder: float
    decoder: float
    total: float
    encoder_forward: float
    decoder_forward: float
    recompute: float
    masks_per_image: int
    num_rounds: int

    @property
    def model_encoder(self) -> float:
        """Encoder training FLOPs without recomputation (3× forward): the MFU numerator."""
        return 3.0 * self.encoder_forward

    @property
    def model_total(self) -> float:
        """End-to-end training FLOPs without recomputation: MFU counts model FLOPs, not the
        hardware's (PaLM's MFU vs HFU), so activation checkpointing does not inflate it."""
        return 3.0 * (self.encoder_forward + self.decoder_forward)

    @property
    def decoder_per_mask(self) -> float:
        """Training FLOPs of one mask over all its rounds."""
        return self.decoder / max(self.masks_per_image, 1)

    def achieved_flops(self, images_per_s: float, masks_per_s: float) -> float:
        """Model FLOP/s at measured rates; counts the masks actually trained (an image may
        have fewer than ``masks_per_image``), unlike ``images_per_s · total``."""
        return images_per_s * self.encoder + masks_per_s * self.decoder_per_mask


def _as_spec(model: SamSpec | ModelConfig | str) -> SamSpec:
    """The sizes of a spec, a ``model`` config section (with its overrides) or a variant name."""
    if isinstance(model, SamSpec):
        return model
    if isinstance(model, ModelConfig):
        return spec_for(model.variant, **model.overrides())
    return spec_for(model)


def train_flops_per_image(
    model: SamSpec | ModelConfig | str,
    masks_per_image: int,
    prompts: PromptConfig | Sequence[int],
    activation_checkpointing: bool | None = None,
    executed: bool = False,
    cuda: bool = False,
) -> FlopBudget:
    """Training FLOPs per image: the encoder once, prompt encoder + decoder per mask per round.

    Args:
        model: sizes (``SamSpec``), the ``model`` config section, or a variant name.
        masks_per_image: masks trained per image (``data.max_masks_per_image``, 64 in the
            paper; images with fewer masks cost less, see :meth:`FlopBudget.achieved_flops`).
        prompts: the ``prompts`` config (its round plan, averaged over the random
            placement of no-point rounds, see :func:`sampled_token_plans`) or the sparse
            token count of each round of one plan (``RoundOutput.num_sparse_tokens``).
        activation_checkpointing: recompute encoder blocks and decoder rounds in backward;
            None takes ``spec.activation_checkpointing``.
        executed: the FLOPs our step runs instead of the official model's (module
            docstring); MFU counts the model's.
        cuda: the executed FLOPs on a CUDA device (:func:`decoder_forward_flops`).

    Returns:
        The :class:`FlopBudget`. Not counted: ``get_dense_pe`` (``2·G²·C`` once per step,
        :func:`dense_pe_flops`), element-wise ops and the loss.
    """
    if masks_per_image < 0:
        raise ValueError(f"masks_per_image must be >= 0, got {masks_per_image}")
    spec = _as_spec(model)
    recomputes = spec.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    plans = sampled_token_plans(prompts) if isinstance(prompts, PromptConfig) else [list(prompts)]
    if not plans[0]:
        raise ValueError("prompts: a plan needs at least one round")
    enc_fwd = encoder_forward_flops(spec, executed)
    dec_fwd = masks_per_image * _decoder_rounds_flops(spec, plans, executed, cuda)
    if executed and masks_per_image:
        dec_fwd += sum(decoder_image_flops(spec, r > 0) for plan in plans for r in range(len(plan))) / len(plans)
    enc_recompute = encoder_recompute_flops(spec, executed) if recomputes else 0.0
    dec_recompute = dec_fwd if recomputes else 0.0  # each round's prompt encoder + decoder
    encoder = 3 * enc_fwd + enc_recompute
    decoder = 3 * dec_fwd + dec_recompute
    return FlopBudget(encoder=encoder, decoder=decoder, total=encoder + decoder,
                      encoder_forward=enc_fwd, decoder_forward=dec_fwd,
                      recompute=enc_recompute + dec_recompute,
                      masks_per_image=masks_per_image, num_rounds=len(plans[0]))


def flops_for_config(cfg: Config) -> FlopBudget:
    """:func:`train_flops_per_image` of a training config (model, masks per image, prompts,
    activation checkpointing, which also checkpoints the rounds in the engine)."""
    return train_flops_per_image(cfg.model, cfg.data.max_masks_per_image, cfg.prompts,
                                 cfg.model.activation_checkpointing)


def peak_key(device_name: str) -> str | None:
    """The :data:`PEAK_BF16_TFLOPS` entry of a ``torch.cuda.get_device_name()`` string.

    Matches whole name tokens, so ``NVIDIA L40S`` is not an L4 and ``NVIDIA A100-SXM4-80GB``
    is an A100. H100/H200 NVL boards (lower clocks and power) are not in the table.
    """
    tokens = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    if "nvl" in tokens:
        return None
    if "h100" in tokens:
        return "H100 PCIe" if "pcie" in tokens else "H100 SXM"
    if tokens & {"h200", "gh200"}:
        return "H200"
    if "a100" in tokens:
        return "A100"
    if "l4" in tokens:
        return "L4"
    return None


def device_peak_flops(device_name: str, override_tflops: float = 0.0) -> float | None:
    """Dense bf16 peak of one device in FLOP/s (not TFLOP/s).

    Args:
        device_name: e.g. ``torch.cuda.get_device_name(i)``, or ``"cpu"``.
        override_tflops: ``metrics.peak_tflops``; > 0 wins over the table.

    Returns:
        The peak, or None when the device is unknown (CPUs): then no MFU is reported.
    """
    if not math.isfinite(override_tflops) or override_tflops < 0:
        raise ValueError(f"metrics.peak_tflops: must be a finite value >= 0, got {override_tflops!r}")
    if override_tflops > 0:
        return override_tflops * 1e12
    key = peak_key(device_name)
    return None if key is None else PEAK_BF16_TFLOPS[key] * 1e12


def mfu(images_per_s: float, flops_per_image: float, peak: float) -> float:
    """Model FLOPs utilisation: ``images_per_s · flops_per_image / peak`` (0..1 when sane).

    Args:
        images_per_s: measured throughput of this device.
        flops_per_image: training FLOPs per image (``FlopBudget.encoder`` or ``.total``).
        peak: device peak in FLOP/s (:func:`device_peak_flops`).
    """
    if peak <= 0:
        raise ValueError(f"peak must be > 0 FLOP/s, got {peak}")
    return images_per_s * flops_per_image / peak


def _tera(flops: float) -> str:
    """``12.3 TF`` (GF below 1 TF, for the tiny CPU model)."""
    return f"{flops / 1e12:.2f} TF" if flops >= 1e12 else f"{flops / 1e9:.2f} GF"


def startup_summary(budget: FlopBudget, peak: float | None) -> str:
    """One log line: training FLOPs per image and, with a known peak, the MFU at 1 image/s/GPU
    (multiply by the measured images/s for the live value).

    Example (vit_h, 64 masks, A100): ``FLOPs per training image: encoder 17.88 TF, decoder
    7.87 TF (64 masks x 11 rounds), total 25.75 TF (...); at 1 image/s/GPU: encoder MFU
    5.73%, end-to-end MFU 8.25% of 312 TFLOP/s bf16``.
    """
    line = (f"FLOPs per training image: encoder {_tera(budget.encoder)}, decoder {_tera(budget.decoder)} "
            f"({budget.masks_per_image} masks x {budget.num_rounds} rounds), total {_tera(budget.total)} "
            f"(forward {_tera(budget.encoder_forward)} + {_tera(budget.decoder_forward)}, backward 2x forward, "
            f"recompute {_tera(budget.recompute)})")
    if peak is None:
        return line + "; MFU not reported: device peak unknown (set metrics.peak_tflops)"
    # MFU counts model FLOPs (recomputation excluded), as the exported series do.
    return (line + f"; at 1 image/s/GPU: encoder MFU {mfu(1.0, budget.model_encoder, peak):.2%}, end-to-end "
            f"MFU {mfu(1.0, budget.model_total, peak):.2%} of {peak / 1e12:.0f} TFLOP/s bf16 "
            "(model FLOPs, recompute excluded)")
