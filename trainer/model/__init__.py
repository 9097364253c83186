"""SAM model: official-checkpoint-compatible modules plus training additions.

``build_sam(variant, checkpoint=None, **overrides)`` is the entry point.
"""

from .build import (
    VARIANTS,
    CheckpointMismatchError,
    ModelConfig,
    SamSpec,
    build_model,
    build_sam,
    load_sam_state_dict,
    spec_for,
)
from .checkpoint_io import export_official, read_state_dict
from .mae import MaeCheckpointError, MaeLoadReport, load_mae_checkpoint, load_mae_state_dict
from .sam import Sam

__all__ = [
    "VARIANTS", "CheckpointMismatchError", "MaeCheckpointError", "MaeLoadReport", "ModelConfig", "Sam",
    "SamSpec", "build_model", "build_sam", "export_official", "load_mae_checkpoint", "load_mae_state_dict",
    "load_sam_state_dict", "read_state_dict", "spec_for",
]
