"""Access to the official ``segment-anything`` modeling code, the parity reference.

The package's ``__init__`` imports its predictor, which imports torchvision (not usable
beside the CPU torch build on our machines). The modeling code needs only torch, so we
register the package without running its ``__init__`` and import the submodules
directly. Used by tests and benchmarks; ``segment-anything==1.0`` is a test dependency.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

    from .build import SamSpec


def import_official_sam() -> types.ModuleType:
    """Return the ``segment_anything`` package with ``modeling`` and ``build_sam`` loaded."""
    if "segment_anything.build_sam" in sys.modules:
        return sys.modules["segment_anything"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything==1.0 is needed as the reference: pip install -e '.[test]'")
    if "segment_anything" not in sys.modules:
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = pkg
    importlib.import_module("segment_anything.modeling")
    importlib.import_module("segment_anything.build_sam")
    return sys.modules["segment_anything"]


def build_official_sam(spec: SamSpec) -> nn.Module:
    """The official ``Sam`` with ``spec``'s sizes, randomly initialised on the current
    default device (``with torch.device("meta"):`` for shapes only)."""
    import torch.nn as nn  # noqa: PLC0415

    modeling = import_official_sam().modeling
    grid, c = spec.embedding_grid, spec.prompt_embed_dim
    encoder = modeling.ImageEncoderViT(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.encoder_embed_dim,
        depth=spec.encoder_depth, num_heads=spec.encoder_num_heads, mlp_ratio=4.0, out_chans=c,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, rel_pos_zero_init=True,
        window_size=spec.window_size, global_attn_indexes=spec.encoder_global_attn_indexes,
    )
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=c, image_embedding_size=(grid, grid), input_image_size=(spec.img_size, spec.img_size),
        mask_in_chans=spec.mask_in_chans,
    )
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=c,
                                               mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_num_heads),
        transformer_dim=c, iou_head_depth=3, iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    return modeling.Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder)
